//! Encrypted model artifacts: age files (X25519 recipients) holding a tar archive.
//!
//! - [`keygen_secret`]: an age identity in a Kubernetes Secret manifest, and its recipient.
//! - [`encrypt`]: a directory (or one file) as a tar archive inside an age stream, with the age
//!   crate; the standard `age` tool produces the same format (`tar -c ... | age -r ...`).
//! - [`decrypt`]: fetch (file or HTTPS), verify the SHA-256 of the artifact, decrypt on every core
//!   and extract safely into a target directory, which holds the model only if everything
//!   verified and is left empty otherwise.
//!
//! Decryption reads the age header itself ([`header`]) and opens the payload's STREAM chunks in
//! parallel with ring ([`stream`], [`pipeline`]); see `docs/architecture.md` for why.

mod error;
pub mod extract;
pub mod header;
pub mod pipeline;
pub mod source;
pub mod stream;

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, BufWriter, Read, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

use age::secrecy::ExposeSecret as _;
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use ring::digest;

pub use error::ModelError;
pub use extract::{Extracted, MARKER};
pub use pipeline::Sizing;
pub use source::Source;

use crate::quantity;

/// Annotation on a generated Secret with the identity's recipient (public, for `moat encrypt`).
pub const RECIPIENT_ANNOTATION: &str = "moat.dev/recipient";

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `--sha256`: 64 hex digits, optionally prefixed by `sha256:`.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], ModelError> {
    let usage = || ModelError::Usage {
        flag: "--sha256",
        reason: "expected 64 hexadecimal digits (the output of sha256sum)".into(),
    };
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    if s.len() != 64 || !s.is_ascii() {
        return Err(usage());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| usage())?;
    }
    Ok(out)
}

/// Parses `--size-limit`: bytes, or a Kubernetes quantity such as `20Gi` or `500M`.
pub fn parse_size_limit(s: &str) -> Result<u64, ModelError> {
    match quantity::parse(s) {
        Some(v) if v >= 1.0 && v < u64::MAX as f64 => Ok(v as u64),
        _ => Err(ModelError::Usage {
            flag: "--size-limit",
            reason: format!("{s:?} is not a positive size (bytes, or a quantity such as 20Gi)"),
        }),
    }
}

/// Reads the X25519 identities of an age identity file (`AGE-SECRET-KEY-1...` lines; blank lines
/// and `#` comments are skipped). Messages name the line, never its content.
pub fn read_identities(path: &Path) -> Result<Vec<age::x25519::Identity>, ModelError> {
    let identity_error = |reason: String| ModelError::Identity {
        path: path.display().to_string(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => identity_error("not text".into()),
        _ => ModelError::io("reading the identity file", path, e),
    })?;
    let mut identities = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("AGE-PLUGIN-") {
            return Err(identity_error(format!(
                "line {} is a plugin identity; Moat supports X25519 identities (AGE-SECRET-KEY-1...)",
                n + 1
            )));
        }
        let identity = age::x25519::Identity::from_str(line).map_err(|_| {
            identity_error(format!(
                "line {} is not an age X25519 identity (AGE-SECRET-KEY-1...)",
                n + 1
            ))
        })?;
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(identity_error(
            "holds no identity (AGE-SECRET-KEY-1...)".into(),
        ));
    }
    Ok(identities)
}

/// What `moat decrypt` needs.
pub struct DecryptOptions<'a> {
    /// Where the artifact is.
    pub source: &'a Source,
    /// The expected SHA-256 of the artifact file.
    pub sha256: [u8; 32],
    /// Identities to unwrap the file key with.
    pub identities: &'a [age::x25519::Identity],
    /// The identity file, for messages.
    pub identity_file: &'a Path,
    /// The directory to extract into (created if absent; must be empty, or hold an earlier
    /// extraction by Moat, which is replaced).
    pub target: &'a Path,
    /// Most bytes the extracted files may hold.
    pub size_limit: Option<u64>,
    /// Extra CA certificates (PEM) for an HTTPS source.
    pub ca_file: Option<&'a Path>,
    /// How long an HTTPS download may wait for data before it fails.
    pub read_timeout: std::time::Duration,
    /// Threads and buffers.
    pub sizing: Sizing,
}

impl std::fmt::Debug for DecryptOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptOptions")
            .field("source", &self.source)
            .field("sha256", &hex(&self.sha256))
            .field(
                "identities",
                &format_args!("<{} redacted>", self.identities.len()),
            )
            .field("identity_file", &self.identity_file)
            .field("target", &self.target)
            .field("size_limit", &self.size_limit)
            .field("ca_file", &self.ca_file)
            .field("sizing", &self.sizing)
            .finish()
    }
}

/// What `moat decrypt` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decrypted {
    /// Bytes of the artifact read (and hashed).
    pub artifact_bytes: u64,
    /// The extracted files and their bytes.
    pub extracted: Extracted,
}

/// Fetches, verifies, decrypts and extracts an artifact into `opts.target`. On success the
/// target holds the archive's files and directories and [`MARKER`]; on any failure it is left
/// empty (nothing becomes visible before the final chunk and the digest verified).
pub fn decrypt(opts: &DecryptOptions<'_>) -> Result<Decrypted, ModelError> {
    let staging = extract::Staging::prepare(opts.target)?;
    match decrypt_into(opts, staging.dir()) {
        Ok(done) => {
            staging.commit(&hex(&opts.sha256))?;
            Ok(done)
        }
        Err(e) => {
            // The original failure is the one to report; a leftover staging directory is
            // removed by the next run.
            let _ = staging.abort();
            Err(e)
        }
    }
}

fn decrypt_into(opts: &DecryptOptions<'_>, dir: &Path) -> Result<Decrypted, ModelError> {
    let input = opts.source.open(opts.ca_file, opts.read_timeout)?;
    let mut input = BufReader::with_capacity(64 * 1024, pipeline::HashingReader::new(input));
    let header = header::read_header(&mut input)?;
    let file_key = header::unwrap_file_key(
        &header,
        opts.identities,
        &opts.identity_file.display().to_string(),
    )?;
    header::verify_mac(&header, &file_key)?;
    let mut nonce = [0u8; stream::PAYLOAD_NONCE];
    input.read_exact(&mut nonce).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ModelError::Truncated("the payload nonce is missing"),
        _ => ModelError::Io {
            what: format!("reading {}", opts.source),
            error: e,
        },
    })?;
    let key = stream::PayloadKey::new(&file_key, &nonce)?;
    drop(file_key);
    let mut plain = pipeline::start(input, key, opts.sizing)?;
    let extracted = match extract::extract(&mut plain, dir, opts.size_limit) {
        Ok(done) => done,
        // A broken stream (modified, truncated, unreadable) explains a broken archive.
        Err(e) => return Err(plain.take_failure().unwrap_or(e)),
    };
    let (digest, artifact_bytes) = plain.finish()?;
    if digest != opts.sha256 {
        return Err(ModelError::DigestMismatch {
            expected: hex(&opts.sha256),
            actual: hex(&digest),
        });
    }
    Ok(Decrypted {
        artifact_bytes,
        extracted,
    })
}

/// Parses recipients (`age1...`).
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient, ModelError> {
    age::x25519::Recipient::from_str(s.trim()).map_err(|_| ModelError::Usage {
        flag: "--recipient",
        reason: format!("{s:?} is not an age X25519 recipient (age1...)"),
    })
}

/// Reads a recipients file: one `age1...` per line; blank lines and `#` comments skipped.
pub fn read_recipients_file(path: &Path) -> Result<Vec<age::x25519::Recipient>, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io("opening", path, e))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| ModelError::io("reading", path, e))?;
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            out.push(parse_recipient(line)?);
        }
    }
    Ok(out)
}

/// Writes through to `inner`, hashing every byte.
struct HashingWriter<W> {
    inner: W,
    hash: digest::Context,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What `moat encrypt` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encrypted {
    /// SHA-256 of the artifact, lower-case hex (for `spec.model.sha256` / `--sha256`).
    pub sha256: String,
    /// Size of the artifact.
    pub bytes: u64,
    /// Regular files archived.
    pub files: u64,
}

/// Encrypts `input` to `recipients` into `output`: a directory becomes a tar archive of its
/// contents (paths relative to it); a single file becomes a tar archive holding that file under
/// its name, so decryption always extracts a tar. Symbolic links and special files are refused
/// (decryption would refuse them). `output` appears only when complete.
pub fn encrypt(
    input: &Path,
    recipients: &[age::x25519::Recipient],
    output: &Path,
) -> Result<Encrypted, ModelError> {
    if recipients.is_empty() {
        return Err(ModelError::Usage {
            flag: "--recipient",
            reason: "at least one recipient is needed".into(),
        });
    }
    let name = output
        .file_name()
        .ok_or_else(|| ModelError::Usage {
            flag: "--output",
            reason: format!("{} is not a file name", output.display()),
        })?
        .to_string_lossy()
        .into_owned();
    if fs::symlink_metadata(output).is_ok() {
        return Err(ModelError::Usage {
            flag: "--output",
            reason: format!(
                "{} exists; Moat does not overwrite artifacts",
                output.display()
            ),
        });
    }
    let partial = output.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let result = encrypt_to(input, recipients, &partial).and_then(|done| {
        fs::rename(&partial, output)
            .map(|()| done)
            .map_err(|e| ModelError::io("renaming into", output, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

fn encrypt_to(
    input: &Path,
    recipients: &[age::x25519::Recipient],
    output: &Path,
) -> Result<Encrypted, ModelError> {
    let meta = fs::symlink_metadata(input).map_err(|e| ModelError::io("reading", input, e))?;
    let mut entries = Vec::new();
    if meta.is_dir() {
        walk(input, Path::new(""), &mut entries)?;
    } else if meta.is_file() {
        let name = input.file_name().ok_or_else(|| ModelError::EncryptInput {
            path: input.display().to_string(),
            reason: "has no file name".into(),
        })?;
        entries.push((input.to_path_buf(), PathBuf::from(name)));
    } else {
        return Err(ModelError::EncryptInput {
            path: input.display().to_string(),
            reason: "is neither a regular file nor a directory".into(),
        });
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(output)
        .map_err(|e| ModelError::io("creating", output, e))?;
    let sink = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: digest::Context::new(&digest::SHA256),
        bytes: 0,
    };
    let write_error = |e: io::Error| ModelError::io("writing", output, e);
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| ModelError::Encrypt(e.to_string()))?;
    let stream = encryptor.wrap_output(sink).map_err(write_error)?;
    let mut tar = tar::Builder::new(stream);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut files = 0;
    for (path, name) in &entries {
        tar.append_path_with_name(path, name)
            .map_err(|e| ModelError::io("archiving", path, e))?;
        files += u64::from(path.is_file());
    }
    let stream = tar.into_inner().map_err(write_error)?;
    let mut sink = stream.finish().map_err(write_error)?;
    sink.flush().map_err(write_error)?;
    let file = sink
        .inner
        .into_inner()
        .map_err(|e| write_error(e.into_error()))?;
    file.sync_all().map_err(write_error)?;
    Ok(Encrypted {
        sha256: hex(sink.hash.finish().as_ref()),
        bytes: sink.bytes,
        files,
    })
}

/// Lists a directory tree, parents before children, sorted by name; refuses anything but
/// regular files and directories.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> Result<(), ModelError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|e| ModelError::io("listing", dir, e))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| ModelError::io("listing", dir, e))?;
    children.sort();
    for name in children {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let kind = fs::symlink_metadata(&path)
            .map_err(|e| ModelError::io("reading", &path, e))?
            .file_type();
        if kind.is_dir() {
            out.push((path.clone(), rel.clone()));
            walk(&path, &rel, out)?;
        } else if kind.is_file() {
            out.push((path, rel));
        } else {
            return Err(ModelError::EncryptInput {
                path: path.display().to_string(),
                reason: if kind.is_symlink() {
                    "is a symbolic link; model archives hold only regular files and directories (copy the file in its place)".into()
                } else {
                    "is not a regular file or directory".into()
                },
            });
        }
    }
    Ok(())
}

/// A generated identity as a Secret manifest.
pub struct GeneratedKey {
    /// The Secret manifest, YAML. Holds the private key.
    pub secret_yaml: String,
    /// The identity's recipient (`age1...`), public.
    pub recipient: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("recipient", &self.recipient)
            .finish_non_exhaustive()
    }
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::render::is_dns1123_label)
}

/// Generates an X25519 identity and puts it, as an age identity file, under `key` in a Secret
/// manifest named `name` (in `namespace`, if given). The recipient is also annotated on the
/// Secret ([`RECIPIENT_ANNOTATION`]).
pub fn keygen_secret(
    name: &str,
    namespace: Option<&str>,
    key: &str,
) -> Result<GeneratedKey, ModelError> {
    if !is_dns1123_subdomain(name) {
        return Err(ModelError::Usage {
            flag: "--name",
            reason: format!("{name:?} is not a Secret name (a DNS-1123 subdomain)"),
        });
    }
    if let Some(ns) = namespace.filter(|ns| !crate::render::is_dns1123_label(ns)) {
        return Err(ModelError::Usage {
            flag: "--namespace",
            reason: format!("{ns:?} is not a namespace name (a DNS-1123 label)"),
        });
    }
    if key.is_empty()
        || key.len() > 253
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ModelError::Usage {
            flag: "--key",
            reason: format!("{key:?} is not a Secret key (letters, digits, -, _ and .)"),
        });
    }
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let file = format!(
        "# age identity generated by moat keygen\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: namespace.map(str::to_string),
            annotations: Some(BTreeMap::from([(
                RECIPIENT_ANNOTATION.to_string(),
                recipient.clone(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(file.into_bytes()),
        )])),
        ..Secret::default()
    };
    let secret_yaml = serde_yaml::to_string(&secret)
        .map_err(|_| ModelError::Internal("serializing the Secret"))?;
    Ok(GeneratedKey {
        secret_yaml,
        recipient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_digests_and_sizes() {
        let hex64 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let d = parse_sha256(hex64).expect("hex");
        assert_eq!(hex(&d), hex64);
        assert_eq!(
            parse_sha256(&format!("sha256:{}", hex64.to_uppercase())).expect("prefixed"),
            d
        );
        for bad in ["", "abc", &hex64[1..], &format!("{}zz", &hex64[2..])] {
            assert!(parse_sha256(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size_limit("20Gi").expect("Gi"), 20 << 30);
        assert_eq!(parse_size_limit("1000").expect("bytes"), 1000);
        assert_eq!(parse_size_limit("1.5k").expect("k"), 1500);
        for bad in ["", "0", "-5", "10Xi", "0.5"] {
            assert!(parse_size_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keygen_refuses_invalid_names() {
        assert!(keygen_secret("Bad_Name", None, "identity").is_err());
        assert!(keygen_secret("ok", Some("Bad.NS"), "identity").is_err());
        assert!(keygen_secret("ok", None, "a/b").is_err());
        let key = keygen_secret("model-key", Some("ml"), "identity").expect("keygen");
        assert!(key.recipient.starts_with("age1"));
        assert!(!format!("{key:?}").contains("AGE-SECRET-KEY"));
    }
}
