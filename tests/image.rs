//! Moat's image as the tests build it (`e2e/moat-image.sh`, without a container daemon) and as
//! users build it (`Dockerfile`) run the same way: the same entrypoint, default command and user,
//! the binary at the same path, and the CA bundle registries are verified with. The script's
//! archive is also reproducible: the same binary gives the same digest.

use std::{path::Path, process::Command};

use serde_json::Value;

/// The final stage of the Dockerfile: (ENTRYPOINT, CMD, USER, COPY destinations).
fn dockerfile() -> (Value, Value, String, Vec<String>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("read the Dockerfile");
    let last = text.rsplit("\nFROM ").next().expect("a final stage");
    let (mut entrypoint, mut cmd, mut user, mut copies) = (Value::Null, Value::Null, None, vec![]);
    for line in last.lines() {
        if let Some(v) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = serde_json::from_str(v).expect("ENTRYPOINT in exec form");
        } else if let Some(v) = line.strip_prefix("CMD ") {
            cmd = serde_json::from_str(v).expect("CMD in exec form");
        } else if let Some(v) = line.strip_prefix("USER ") {
            user = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("COPY ") {
            copies.push(
                v.split_whitespace()
                    .last()
                    .expect("a destination")
                    .to_string(),
            );
        }
    }
    (entrypoint, cmd, user.expect("a USER"), copies)
}

/// Runs the image script `script` (under `e2e/`) with `--archive out` and `args`; returns the
/// digest it prints.
fn build_archive(script: &str, out: &Path, args: &[&str]) -> String {
    let built = Command::new("bash")
        .arg(format!("{}/e2e/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg("--archive")
        .arg(out)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run e2e/{script}: {e}"));
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    String::from_utf8_lossy(&built.stdout).trim().to_string()
}

/// Moat's image from the binary this test run built.
fn build(out: &Path) -> String {
    build_archive("moat-image.sh", out, &[env!("CARGO_BIN_EXE_moat")])
}

/// Unpacks the OCI archive into `layout`; returns the manifest `digest` names and its config.
fn unpack(archive: &Path, layout: &Path, digest: &str) -> (Value, Value) {
    std::fs::create_dir(layout).expect("mkdir");
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(layout)
        .status()
        .expect("tar");
    assert!(untar.success());
    let manifest: Value = serde_json::from_slice(&blob(layout, digest)).expect("manifest");
    let config: Value = serde_json::from_slice(&blob(
        layout,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    ))
    .expect("config");
    (manifest, config)
}

fn blob(dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    std::fs::read(dir.join("blobs/sha256").join(hex)).expect("read a blob")
}

#[test]
fn the_built_image_runs_like_the_dockerfiles_and_is_reproducible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("moat.tar");
    let digest = build(&archive);
    assert!(digest.starts_with("sha256:"), "{digest}");
    let again = dir.path().join("again.tar");
    assert_eq!(build(&again), digest, "the same binary gave another digest");

    let layout = dir.path().join("layout");
    let (manifest, config) = unpack(&archive, &layout, &digest);
    let (entrypoint, cmd, user, copies) = dockerfile();
    assert_eq!(config["config"]["Entrypoint"], entrypoint);
    assert_eq!(config["config"]["Cmd"], cmd);
    assert_eq!(config["config"]["User"], Value::String(user));

    let layer = layout.join("blobs/sha256").join(
        manifest["layers"][0]["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("layer digest"),
    );
    let listing = Command::new("tar")
        .arg("-tvf")
        .arg(&layer)
        .output()
        .expect("tar -t");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let has = |path: &str, executable: bool| {
        listing.lines().any(|l| {
            l.ends_with(&format!(" .{path}"))
                && l.starts_with('-')
                && (!executable || l.starts_with("-rwxr-xr-x"))
        })
    };
    // The Dockerfile copies the binary into the image; distroless/static brings the CA bundle.
    assert_eq!(copies, ["/moat"], "the Dockerfile's COPY changed");
    for path in &copies {
        assert!(has(path, true), "no executable {path} in:\n{listing}");
    }
    assert!(
        has("/etc/ssl/certs/ca-certificates.crt", false),
        "no CA bundle in:\n{listing}"
    );
}

/// The model server image of the local cluster (`e2e/model-server-image.sh`, Debian's Python and
/// `e2e/model-server/serve.py`) is reproducible too, and its config names a non-root user and the
/// server as the entrypoint.
#[test]
fn the_model_server_image_is_reproducible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let build = |name: &str| build_archive("model-server-image.sh", &dir.path().join(name), &[]);
    let digest = build("a.tar");
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(
        build("b.tar"),
        digest,
        "the same inputs gave another digest"
    );

    let layout = dir.path().join("layout");
    let (_, config) = unpack(&dir.path().join("a.tar"), &layout, &digest);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/bin/python3", "-B", "/app/serve.py"])
    );
    assert_eq!(config["config"]["User"], "65532:65532");
}
