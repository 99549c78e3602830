//! Flux's source-controller and kustomize-controller as processes on this machine against the
//! local control plane, for `tests/flux.rs`: built once into the component cache by `e2e/flux.sh`
//! (pinned versions from `e2e/flux/*/go.mod`), run with the cluster's admin kubeconfig, watching
//! only one namespace, every listener on loopback, stopped when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{DEADLINE, git::free_port, tool};

/// The e2e directory (where `flux.sh` is).
const E2E_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// The two controllers' binaries and the CRD directories of the modules they were built from.
pub struct Binaries {
    /// source-controller.
    pub source_controller: PathBuf,
    /// kustomize-controller.
    pub kustomize_controller: PathBuf,
    /// Directories of CRD manifests (`config/crd/bases` of each module).
    pub crds: Vec<PathBuf>,
}

/// Builds the controllers with `e2e/flux.sh build` (at once when they are in the cache already:
/// the script then only checks) and returns where they are.
pub fn binaries() -> Result<Binaries> {
    let script = Path::new(E2E_DIR).join("flux.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("build")
        .stdin(Stdio::null())
        .status()
        .context("running e2e/flux.sh build")?;
    ensure!(status.success(), "e2e/flux.sh build failed");
    let out = Command::new("bash")
        .arg(&script)
        .arg("env")
        .stdin(Stdio::null())
        .output()
        .context("running e2e/flux.sh env")?;
    ensure!(out.status.success(), "e2e/flux.sh env failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let var = |name: &str| -> Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(str::to_string)
            .with_context(|| format!("e2e/flux.sh env printed no {name}"))
    };
    Ok(Binaries {
        source_controller: var("MOAT_FLUX_SOURCE_CONTROLLER")?.into(),
        kustomize_controller: var("MOAT_FLUX_KUSTOMIZE_CONTROLLER")?.into(),
        crds: var("MOAT_FLUX_CRDS")?
            .split(':')
            .map(PathBuf::from)
            .collect(),
    })
}

/// Installs the Flux CRDs the two controllers watch and waits until they are established:
/// GitRepository and Kustomization from `MOAT_GITOPS_CRDS` (the ones the GitOps examples are
/// checked against, `e2e/cluster.sh`), the other source kinds (Bucket, HelmChart, HelmRepository,
/// OCIRepository, ExternalArtifact) from the source-controller module that was built.
pub fn install_crds(binaries: &Binaries) -> Result<()> {
    let gitops = PathBuf::from(tool("MOAT_GITOPS_CRDS")?);
    let mut files = vec![
        gitops.join("source.toolkit.fluxcd.io_gitrepositories.yaml"),
        gitops.join("kustomize.toolkit.fluxcd.io_kustomizations.yaml"),
    ];
    for dir in &binaries.crds {
        for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !files.iter().any(|f| f.file_name() == path.file_name()) && name.ends_with(".yaml") {
                files.push(path);
            }
        }
    }
    let kubectl = tool("MOAT_KUBECTL")?;
    let mut args = vec!["apply", "--server-side", "--force-conflicts"];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for f in &names {
        args.extend(["-f", f.as_str()]);
    }
    let out = Command::new(&kubectl).args(&args).output()?;
    ensure!(
        out.status.success(),
        "installing the Flux CRDs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&kubectl)
        .args(["wait", "--for=condition=Established", "--timeout"])
        .arg(format!("{}s", DEADLINE.as_secs()))
        .args(names.iter().flat_map(|f| ["-f", f.as_str()]))
        .output()?;
    ensure!(
        out.status.success(),
        "the Flux CRDs are not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The two controllers, running; killed (and their files removed) on drop.
pub struct Controllers {
    children: Vec<(&'static str, Child, u16)>,
    dir: tempfile::TempDir,
}

impl Controllers {
    /// Starts source-controller and kustomize-controller for the objects in `namespace` (their
    /// `RUNTIME_NAMESPACE`, with `--watch-all-namespaces=false`), without leader election, and
    /// waits until both report ready on their health endpoints.
    pub fn start(binaries: &Binaries, namespace: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("moat-flux-").tempdir()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let storage_addr = format!("127.0.0.1:{}", free_port()?);
        let mut controllers = Self {
            children: Vec::new(),
            dir,
        };
        let source_args = vec![
            format!("--storage-path={}", storage.display()),
            format!("--storage-addr={storage_addr}"),
            format!("--storage-adv-addr={storage_addr}"),
        ];
        controllers.spawn(
            "source-controller",
            &binaries.source_controller,
            namespace,
            source_args,
        )?;
        controllers.spawn(
            "kustomize-controller",
            &binaries.kustomize_controller,
            namespace,
            vec!["--no-remote-bases=true".into()],
        )?;
        controllers.wait_ready()?;
        Ok(controllers)
    }

    fn spawn(
        &mut self,
        name: &'static str,
        binary: &Path,
        namespace: &str,
        mut args: Vec<String>,
    ) -> Result<()> {
        let health = free_port()?;
        args.extend([
            "--watch-all-namespaces=false".into(),
            "--enable-leader-election=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()?),
            format!("--health-addr=127.0.0.1:{health}"),
            "--log-encoding=console".into(),
        ]);
        let log = std::fs::File::create(self.log_path(name))?;
        let child = Command::new(binary)
            .args(&args)
            .env("RUNTIME_NAMESPACE", namespace)
            .env("KUBECONFIG", tool("KUBECONFIG")?)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.children.push((name, child, health));
        Ok(())
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last `lines` lines of a controller's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails, with the end of its log, when a controller has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let mut exited = None;
        for (name, child, _) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                exited = Some((*name, status));
                break;
            }
        }
        match exited {
            Some((name, status)) => bail!("{name} exited ({status}):\n{}", self.log_tail(name, 30)),
            None => Ok(()),
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let ports: Vec<(&'static str, u16)> =
            self.children.iter().map(|(n, _, p)| (*n, *p)).collect();
        for (name, port) in ports {
            while !healthy(port) {
                self.check_running()?;
                if started.elapsed() > DEADLINE {
                    bail!(
                        "{name} not ready on 127.0.0.1:{port}/readyz:\n{}",
                        self.log_tail(name, 30)
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        Ok(())
    }
}

/// Whether `GET /readyz` on the loopback `port` answers 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
