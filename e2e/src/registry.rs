//! A real OCI registry on loopback for image-pinning tests: Debian's `docker-registry`
//! (distribution 2.8) served over TLS from a throwaway CA, optionally behind htpasswd basic auth,
//! with images pushed to it by `skopeo` from OCI layouts written here.
//!
//! The registry runs as a child process (`docker-registry serve <config.yml>`), never as the
//! systemd service the package installs. Everything it stores lives in a temporary directory
//! removed when the [`Registry`] is dropped; the process is killed then too.
//!
//! # Which digest to compare with
//!
//! For a multi-arch image, `skopeo inspect --format '{{.Digest}}'` (skopeo 1.9) reports the digest
//! of the **index** (the manifest the tag points at), not that of the platform manifest it picks
//! for `.Architecture`/`.Layers`: with `--override-arch arm64` the architecture and layers change
//! but `.Digest` stays the same, and it equals the sha256 of `skopeo inspect --raw` (the index
//! bytes) and the registry's `Docker-Content-Digest` for the tag. [`Registry::inspect_digest`]
//! and [`Registry::index_digest`] therefore agree for single- and multi-arch images (the harness
//! test checks it), and both are what an operator that pins the index must pin. The per-platform
//! manifests' digests are [`TestImage::platform_digests`].
//!
//! Pushes use `--preserve-digests`: the layer is gzip-compressed already, so skopeo copies every
//! blob and manifest byte for byte, and the digest in the registry is [`TestImage::digest`],
//! known before the push.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use flate2::{Compression, GzBuilder};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::json;
use tokio::process::{Child, Command};

/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long the registry may take to answer on `/v2/` after it is started (a deadline, sized for
/// a busy machine: see [`crate::DEADLINE`]).
const READY_TIMEOUT: Duration = crate::DEADLINE;

/// How a [`Registry`] is set up.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Basic-auth credentials (username, password) the registry demands for every request,
    /// pulls included; `None`: anonymous access, no auth configured.
    pub credentials: Option<(String, String)>,
}

impl Default for RegistryOptions {
    /// With basic auth: user `moat`, a fixed password.
    fn default() -> Self {
        Self {
            credentials: Some(("moat".into(), "loopback-registry-password".into())),
        }
    }
}

impl RegistryOptions {
    /// No authentication: anyone may pull and push.
    pub fn anonymous() -> Self {
        Self { credentials: None }
    }
}

/// Credentials for one `skopeo` call.
#[derive(Clone, Copy, Debug)]
pub enum Creds<'a> {
    /// The registry's own credentials (none if it is anonymous).
    Registry,
    /// No credentials at all.
    Anonymous,
    /// These credentials.
    Basic(&'a str, &'a str),
}

/// A `docker-registry` on `127.0.0.1:<port>` with TLS from its own CA.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    opts: RegistryOptions,
    ca_pem: String,
    child: Option<Child>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host())
            .field("dir", &self.dir.path())
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until it answers on `/v2/` (401 with
    /// auth, 200 without).
    pub async fn start(opts: RegistryOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("moat-registry-")
            .tempdir()
            .context("creating the registry's temporary directory")?;
        let port = free_port()?;
        let (ca_pem, server) = certificates()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("certs.d"))?;
        std::fs::create_dir_all(root.join("storage"))?;
        std::fs::write(root.join("certs.d/ca.crt"), &ca_pem)?;
        std::fs::write(root.join("server.crt"), &server.0)?;
        std::fs::write(root.join("server.key"), &server.1)?;
        // An empty auth file, so skopeo never picks up credentials stored on the machine.
        std::fs::write(root.join("auth.json"), r#"{"auths":{}}"#)?;
        // Our own signature policy (accept anything), so the machine's /etc/containers does not
        // matter.
        std::fs::write(
            root.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        let auth = match &opts.credentials {
            Some((user, password)) => {
                let out = run(
                    Command::new("htpasswd").args(["-Bbn", user, password]),
                    "htpasswd (apache2-utils)",
                )
                .await?;
                std::fs::write(root.join("htpasswd"), &out.stdout)?;
                json!({"htpasswd": {"realm": "moat-e2e", "path": root.join("htpasswd")}})
            }
            None => json!({}),
        };
        let mut config = json!({
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": true}},
            "storage": {
                "filesystem": {"rootdirectory": root.join("storage")},
                "delete": {"enabled": true},
            },
            "http": {
                "addr": format!("127.0.0.1:{port}"),
                "tls": {"certificate": root.join("server.crt"), "key": root.join("server.key")},
            },
        });
        if opts.credentials.is_some() {
            config["auth"] = auth;
        }
        // JSON is YAML.
        std::fs::write(root.join("config.yml"), serde_json::to_vec_pretty(&config)?)?;
        let mut registry = Self {
            dir,
            port,
            opts,
            ca_pem,
            child: None,
        };
        registry.spawn().await?;
        Ok(registry)
    }

    async fn spawn(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the registry is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry; e2e/deps.sh)")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let want = if self.opts.credentials.is_some() {
            "401"
        } else {
            "200"
        };
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "docker-registry exited with {status} before answering; its log:\n{}",
                    self.log()
                );
            }
            let code = self.probe().await?;
            if code == want {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "docker-registry on {} did not answer /v2/ with {want} within {READY_TIMEOUT:?} \
                     (last: {code}); its log:\n{}",
                    self.host(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The HTTP status `/v2/` answers with, as curl prints it: `000` when nothing answers.
    async fn probe(&self) -> Result<String> {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg("--cacert")
            .arg(self.ca_file())
            .arg(format!("https://{}/v2/", self.host()))
            .output()
            .await
            .context("running curl")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Whether the registry process is running and answers on `/v2/` (any HTTP status).
    pub async fn is_up(&self) -> bool {
        self.child.is_some() && self.probe().await.is_ok_and(|code| code != "000")
    }

    /// Kills the registry; its storage, port and certificates are kept for [`Self::restart`].
    /// Connections to [`Self::host`] are refused until then.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing docker-registry")?;
        }
        Ok(())
    }

    /// Starts the registry again on the same port with the same storage, certificate and
    /// credentials (stopping it first if it runs), and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    /// `127.0.0.1:<port>`: the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>/<repo_tag>`: an image reference for a pod spec or a resolver.
    pub fn image_ref(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host())
    }

    /// The CA certificate (PEM) that signed the registry's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate's file (PEM, `ca.crt`).
    pub fn ca_file(&self) -> PathBuf {
        self.cert_dir().join("ca.crt")
    }

    /// A directory holding only `ca.crt`, for `skopeo --cert-dir`.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// The username the registry demands (empty when anonymous).
    pub fn username(&self) -> &str {
        self.opts.credentials.as_ref().map_or("", |c| c.0.as_str())
    }

    /// The password the registry demands (empty when anonymous).
    pub fn password(&self) -> &str {
        self.opts.credentials.as_ref().map_or("", |c| c.1.as_str())
    }

    /// The `.dockerconfigjson` of an imagePullSecret (type `kubernetes.io/dockerconfigjson`) for
    /// this registry: `{"auths": {"127.0.0.1:PORT": {"username", "password", "auth"}}}`.
    pub fn dockerconfigjson(&self) -> Vec<u8> {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.username(),
            self.password()
        ));
        serde_json::to_vec(&json!({"auths": {self.host(): {
            "username": self.username(),
            "password": self.password(),
            "auth": auth,
        }}}))
        .unwrap_or_default()
    }

    /// The registry's own log (stdout and stderr of every run), for failure messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Pushes `image` as `repo:tag` (`repo_tag`) with skopeo from an OCI layout written for it,
    /// and returns the digest the registry then reports for the tag (for a multi-arch image, the
    /// index digest). Fails if that is not [`TestImage::digest`].
    pub async fn push(&self, repo_tag: &str, image: &TestImage) -> Result<String> {
        let layout = tempfile::Builder::new()
            .prefix("layout-")
            .tempdir_in(self.dir.path())?;
        let expected = image.write_layout(layout.path(), "image")?;
        let mut cmd = self.skopeo("copy");
        if let Some((user, password)) = &self.opts.credentials {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg("--dest-cert-dir")
            .arg(self.cert_dir())
            .arg("--preserve-digests");
        if image.is_multi_arch() {
            cmd.args(["--multi-arch", "all"]);
        }
        cmd.arg(format!("oci:{}:image", layout.path().display()))
            .arg(format!("docker://{}", self.image_ref(repo_tag)));
        run(
            &mut cmd,
            &format!("skopeo copy to {}", self.image_ref(repo_tag)),
        )
        .await?;
        let digest = self.inspect_digest(repo_tag).await?;
        ensure!(
            digest == expected,
            "pushed {repo_tag}: the registry reports {digest}, the layout had {expected}"
        );
        Ok(digest)
    }

    /// Points `repo_tag` at `image` (a push under the same tag) and returns the new digest.
    pub async fn move_tag(&self, repo_tag: &str, image: &TestImage) -> Result<String> {
        self.push(repo_tag, image).await
    }

    /// Deletes the manifest `repo_tag` points at (`skopeo delete`). The distribution API has no
    /// tag deletion: this removes the manifest by digest, and with it every tag on it.
    pub async fn delete(&self, repo_tag: &str) -> Result<()> {
        let mut cmd = self.skopeo("delete");
        self.source_flags(&mut cmd, Creds::Registry);
        cmd.arg(format!("docker://{}", self.image_ref(repo_tag)));
        run(
            &mut cmd,
            &format!("skopeo delete {}", self.image_ref(repo_tag)),
        )
        .await?;
        Ok(())
    }

    /// `skopeo inspect --format '{{.Digest}}'` with the registry's credentials: the digest of
    /// the manifest the tag points at, the index for a multi-arch image (see the module docs).
    pub async fn inspect_digest(&self, repo_tag: &str) -> Result<String> {
        self.inspect_digest_as(repo_tag, Creds::Registry).await
    }

    /// [`Self::inspect_digest`] with other credentials; the error carries skopeo's stderr
    /// (e.g. `unauthorized: authentication required`).
    pub async fn inspect_digest_as(&self, repo_tag: &str, creds: Creds<'_>) -> Result<String> {
        let mut cmd = self.skopeo("inspect");
        self.source_flags(&mut cmd, creds);
        cmd.args(["--format", "{{.Digest}}"])
            .arg(format!("docker://{}", self.image_ref(repo_tag)));
        let out = run(
            &mut cmd,
            &format!("skopeo inspect {}", self.image_ref(repo_tag)),
        )
        .await?;
        let digest = String::from_utf8(out.stdout)?.trim().to_string();
        ensure!(
            is_digest(&digest),
            "skopeo inspect printed {digest:?}, not a sha256 digest"
        );
        Ok(digest)
    }

    /// The manifest `repo_tag` points at, byte for byte (`skopeo inspect --raw`): the index for
    /// a multi-arch image.
    pub async fn raw_manifest(&self, repo_tag: &str) -> Result<Vec<u8>> {
        let mut cmd = self.skopeo("inspect");
        self.source_flags(&mut cmd, Creds::Registry);
        cmd.arg("--raw")
            .arg(format!("docker://{}", self.image_ref(repo_tag)));
        Ok(run(
            &mut cmd,
            &format!("skopeo inspect --raw {}", self.image_ref(repo_tag)),
        )
        .await?
        .stdout)
    }

    /// `sha256:` of [`Self::raw_manifest`]: the digest a pod must be pinned to (the index digest
    /// for a multi-arch image). Equal to [`Self::inspect_digest`] with skopeo 1.9.
    pub async fn index_digest(&self, repo_tag: &str) -> Result<String> {
        Ok(sha256_digest(&self.raw_manifest(repo_tag).await?))
    }

    fn skopeo(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("skopeo");
        cmd.arg("--policy")
            .arg(self.dir.path().join("policy.json"))
            .arg(subcommand)
            .arg("--authfile")
            .arg(self.dir.path().join("auth.json"));
        cmd
    }

    fn source_flags(&self, cmd: &mut Command, creds: Creds<'_>) {
        let creds = match creds {
            Creds::Registry => self
                .opts
                .credentials
                .as_ref()
                .map(|(u, p)| format!("{u}:{p}")),
            Creds::Anonymous => None,
            Creds::Basic(u, p) => Some(format!("{u}:{p}")),
        };
        match creds {
            Some(c) => cmd.arg("--creds").arg(c),
            None => cmd.arg("--no-creds"),
        };
        cmd.arg("--cert-dir").arg(self.cert_dir());
    }
}

/// A small image to push: one gzip layer with a single file `seed.txt` whose content derives
/// from the seed, so different seeds give different digests and equal seeds equal ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestImage {
    /// One linux/amd64 image manifest.
    Single {
        /// Content of the layer's file.
        seed: String,
    },
    /// An OCI index with a linux/amd64 and a linux/arm64 manifest.
    MultiArch {
        /// Content of the layers' files (followed by the architecture).
        seed: String,
    },
}

/// The architectures of a [`TestImage::MultiArch`] image.
pub const MULTI_ARCH_PLATFORMS: [&str; 2] = ["amd64", "arm64"];

impl TestImage {
    /// A single-platform (linux/amd64) image.
    pub fn single(seed: &str) -> Self {
        Self::Single { seed: seed.into() }
    }

    /// A multi-arch image: an index of linux/amd64 and linux/arm64.
    pub fn multi_arch(seed: &str) -> Self {
        Self::MultiArch { seed: seed.into() }
    }

    /// Whether this is an index of several platforms.
    pub fn is_multi_arch(&self) -> bool {
        matches!(self, Self::MultiArch { .. })
    }

    /// The digest of the top-level manifest (the index for a multi-arch image), the one the
    /// registry reports for a tag after [`Registry::push`].
    pub fn digest(&self) -> String {
        self.build().top.digest
    }

    /// `(architecture, manifest digest)` of each platform; one entry for a single image.
    pub fn platform_digests(&self) -> Vec<(String, String)> {
        self.build().platforms
    }

    fn build(&self) -> Built {
        let mut blobs = Vec::new();
        match self {
            Self::Single { seed } => {
                let m = image_manifest(&mut blobs, seed, "amd64");
                Built {
                    platforms: vec![("amd64".into(), m.digest.clone())],
                    top: m,
                    blobs,
                }
            }
            Self::MultiArch { seed } => {
                let manifests: Vec<(String, Descriptor)> = MULTI_ARCH_PLATFORMS
                    .iter()
                    .map(|arch| {
                        let m = image_manifest(&mut blobs, &format!("{seed}\n{arch}"), arch);
                        (arch.to_string(), m)
                    })
                    .collect();
                let index = json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": manifests.iter().map(|(arch, m)| json!({
                        "mediaType": OCI_MANIFEST,
                        "digest": m.digest,
                        "size": m.size,
                        "platform": {"architecture": arch, "os": "linux"},
                    })).collect::<Vec<_>>(),
                });
                let top = add_blob(&mut blobs, OCI_INDEX, json_bytes(&index));
                Built {
                    platforms: manifests
                        .into_iter()
                        .map(|(arch, m)| (arch, m.digest))
                        .collect(),
                    top,
                    blobs,
                }
            }
        }
    }

    /// Writes an OCI image layout into `dir` with this image under the ref name `tag`; returns
    /// the top-level digest.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<String> {
        let built = self.build();
        let blob_dir = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blob_dir)?;
        for (digest, bytes) in &built.blobs {
            let hex = digest.trim_start_matches("sha256:");
            std::fs::write(blob_dir.join(hex), bytes)?;
        }
        std::fs::write(
            dir.join("oci-layout"),
            json_bytes(&json!({"imageLayoutVersion": "1.0.0"})),
        )?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": built.top.media_type,
                "digest": built.top.digest,
                "size": built.top.size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(dir.join("index.json"), json_bytes(&index))?;
        Ok(built.top.digest)
    }
}

struct Built {
    top: Descriptor,
    platforms: Vec<(String, String)>,
    blobs: Vec<(String, Vec<u8>)>,
}

struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: usize,
}

fn add_blob(
    blobs: &mut Vec<(String, Vec<u8>)>,
    media_type: &'static str,
    bytes: Vec<u8>,
) -> Descriptor {
    let digest = sha256_digest(&bytes);
    let size = bytes.len();
    if !blobs.iter().any(|(d, _)| *d == digest) {
        blobs.push((digest.clone(), bytes));
    }
    Descriptor {
        media_type,
        digest,
        size,
    }
}

fn image_manifest(blobs: &mut Vec<(String, Vec<u8>)>, content: &str, arch: &str) -> Descriptor {
    let tar = tar_one_file("seed.txt", content.as_bytes());
    let diff_id = sha256_digest(&tar);
    let layer = add_blob(blobs, OCI_LAYER_GZIP, gzip(&tar));
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = add_blob(blobs, OCI_CONFIG, json_bytes(&config));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
    });
    add_blob(blobs, OCI_MANIFEST, json_bytes(&manifest))
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", moat::pki::sha256_hex(bytes))
}

/// Whether `s` is `sha256:` followed by 64 lower-case hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A POSIX (ustar) tar archive of one regular file, mode 0644, owned by root, mtime 0.
fn tar_one_file(name: &str, content: &[u8]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let digits = field.len() - 1;
        let text = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    }
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], 0o644); // mode
    octal(&mut header[108..116], 0); // uid
    octal(&mut header[116..124], 0); // gid
    octal(&mut header[124..136], content.len() as u64); // size
    octal(&mut header[136..148], 0); // mtime
    header[156] = b'0'; // regular file
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces, then written as 6 octal digits,
    // NUL, space.
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(content);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.resize(tar.len() + 1024, 0); // two zero blocks end the archive
    tar
}

/// Deterministic gzip (mtime 0, no file name).
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// Runs `cmd`, failing with `what`, the exit status and stderr when it does not succeed.
async fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("{what}: cannot run it (e2e/deps.sh installs it)"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A fresh CA (PEM) and a serving certificate and key (PEM) it signed for `127.0.0.1` (IP SAN)
/// and `localhost`.
fn certificates() -> Result<(String, (String, String))> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "moat e2e registry CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), (cert.pem(), key.serialize_pem())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_layer_extracts_with_system_tar() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("layer.tar.gz");
        std::fs::write(&archive, gzip(&tar_one_file("seed.txt", b"hello seed"))).expect("write");
        let status = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.path())
            .status()
            .expect("tar");
        assert!(status.success());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("seed.txt")).expect("read"),
            "hello seed"
        );
    }

    #[test]
    fn digests_follow_the_seed_and_platforms_differ() {
        let a = TestImage::single("a");
        assert_eq!(a.digest(), TestImage::single("a").digest());
        assert_ne!(a.digest(), TestImage::single("b").digest());
        assert!(is_digest(&a.digest()));
        let m = TestImage::multi_arch("a");
        let platforms = m.platform_digests();
        assert_eq!(platforms.len(), 2);
        assert_ne!(platforms[0].1, platforms[1].1);
        assert!(!platforms.iter().any(|(_, d)| *d == m.digest()));
    }
}
