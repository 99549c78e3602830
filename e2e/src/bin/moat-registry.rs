//! A registry on loopback for scripts (`make demo`): Debian's `docker-registry` with TLS from its
//! own CA and basic auth (`moat_e2e::registry`), with small images pushed under the given
//! `repository:tag` names. Writes a shell file of variables (`MOAT_REGISTRY_HOST`,
//! `MOAT_REGISTRY_CA_FILE`, `MOAT_REGISTRY_DOCKERCONFIGJSON`, and a `MOAT_REGISTRY_DIGEST_<n>`
//! per image) and serves until it gets SIGTERM or SIGINT; then it stops the registry.
//!
//! Usage: `moat-registry <env-file> <repository:tag>...`

use anyhow::{Context, Result};
use moat_e2e::registry::{Registry, RegistryOptions, TestImage};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    moat_e2e::exit_on_error(run().await)
}

async fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let env_file = args
        .next()
        .context("usage: moat-registry <env-file> <repository:tag>...")?;
    let mut registry = Registry::start(RegistryOptions::default()).await?;
    let dir = std::path::Path::new(&env_file)
        .parent()
        .context("the env file needs a directory")?
        .to_path_buf();
    let auth = dir.join("dockerconfigjson");
    write_private(&auth, &registry.dockerconfigjson())?;
    let mut vars = vec![
        format!("MOAT_REGISTRY_HOST={}", registry.host()),
        format!("MOAT_REGISTRY_CA_FILE={}", registry.ca_file().display()),
        format!("MOAT_REGISTRY_DOCKERCONFIGJSON={}", auth.display()),
    ];
    for (i, image) in args.enumerate() {
        let digest = registry.push(&image, &TestImage::single(&image)).await?;
        vars.push(format!("MOAT_REGISTRY_DIGEST_{i}={digest}"));
    }
    vars.push(String::new());
    write_private(std::path::Path::new(&env_file), vars.join("\n").as_bytes())?;
    // Serve until told to stop; then stop the registry process (and wait for it); dropping the
    // registry removes its files.
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    registry.stop().await?;
    Ok(())
}

/// Writes `bytes` to `path`, readable by this user only (it holds a password).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
