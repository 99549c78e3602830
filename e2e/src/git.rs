//! A Git repository served over smart HTTP on loopback, for the GitOps controllers of
//! `tests/flux.rs`: a bare repository behind `git http-backend`, run as a CGI program by busybox's
//! `httpd` (Debian's busybox-static, already installed for the real node), read-only (no
//! receive-pack over HTTP). Tests commit in a working clone and push to the bare repository
//! through the filesystem, as a developer's push would land.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

/// The branch every commit goes to.
pub const BRANCH: &str = "main";

/// A served repository; the server stops and the files go when it is dropped.
pub struct GitServer {
    dir: tempfile::TempDir,
    httpd: Child,
    port: u16,
}

impl GitServer {
    /// Creates an empty bare repository `repo.git` and serves it on a free loopback port.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("moat-git-").tempdir()?;
        let root = dir.path();
        let bare = root.join("repos/repo.git");
        std::fs::create_dir_all(&bare)?;
        git(
            &bare,
            &["init", "--quiet", "--bare", "--initial-branch", BRANCH],
        )?;
        let work = root.join("work");
        std::fs::create_dir_all(&work)?;
        git(&work, &["init", "--quiet", "--initial-branch", BRANCH])?;
        git(&work, &["remote", "add", "origin", path_str(&bare)?])?;

        let cgi = root.join("www/cgi-bin");
        std::fs::create_dir_all(&cgi)?;
        let script = cgi.join("git");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexport GIT_PROJECT_ROOT='{}' GIT_HTTP_EXPORT_ALL=1\nexec git http-backend\n",
                path_str(&root.join("repos"))?
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;

        let port = free_port()?;
        let httpd = Command::new(busybox())
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(root.join("www"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting busybox httpd (Debian package busybox-static)")?;
        let server = Self { dir, httpd, port };
        server.wait_serving()?;
        Ok(server)
    }

    /// The repository's URL, as a GitRepository's `spec.url` names it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cgi-bin/git/repo.git", self.port)
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Writes `files` (path relative to the repository, content), commits them with `message`
    /// and pushes; returns the new commit's hash.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> Result<String> {
        let work = self.work();
        for (path, content) in files {
            let file = work.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&file, content)?;
            git(&work, &["add", path])?;
        }
        git(&work, &["commit", "--quiet", "-m", message])?;
        self.push()
    }

    /// `git revert` of the last commit, pushed; returns the new commit's hash.
    pub fn revert_head(&self) -> Result<String> {
        git(&self.work(), &["revert", "--no-edit", "HEAD"])?;
        self.push()
    }

    /// The content of `path` at the last commit.
    pub fn show(&self, path: &str) -> Result<String> {
        git(&self.work(), &["show", &format!("HEAD:{path}")])
    }

    fn push(&self) -> Result<String> {
        let work = self.work();
        git(&work, &["push", "--quiet", "origin", BRANCH])?;
        Ok(git(&work, &["rev-parse", "HEAD"])?.trim().to_string())
    }

    /// Waits until the server answers a smart-HTTP ref advertisement (busybox forks at once, but
    /// the socket may not be bound yet).
    fn wait_serving(&self) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            let out = Command::new("git")
                .args(["ls-remote", &self.url()])
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            if started.elapsed() > crate::DEADLINE {
                bail!(
                    "git ls-remote {}: {}",
                    self.url(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.httpd.kill();
        let _ = self.httpd.wait();
    }
}

/// busybox: `MOAT_BUSYBOX`, else Debian's `/bin/busybox`.
fn busybox() -> String {
    std::env::var("MOAT_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A loopback port nobody listens on now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `git args` in `dir` as a test author; its standard output.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Moat e2e",
            "-c",
            "user.email=e2e@moat.dev",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
