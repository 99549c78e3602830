//! The `moat operator` command line as a pod runs it: its flags, refusal of bad ones, and the
//! metrics and probe endpoints on separate addresses. No cluster is needed: the endpoints serve
//! before the first API call, and the kubeconfig points at a closed port.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MOAT: &str = env!("CARGO_BIN_EXE_moat");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `(status code, body)` of `GET path`, or `None` while nothing listens.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unreachable_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .expect("write kubeconfig");
    path
}

#[test]
fn help_lists_the_flags_operators_expect() {
    let out = Command::new(MOAT)
        .args(["operator", "--help"])
        .output()
        .expect("run moat");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--leader-elect",
        "--lease-duration-seconds",
        "--metrics-addr",
        "--health-probe-addr",
        "--namespaces",
        "--log-format",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let dir = tempdir();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--namespaces", "team-a,Team_B"],
            "\"Team_B\" is not a namespace name",
        ),
        (&["--log-format", "xml"], "invalid value 'xml'"),
        (
            &["--dns-pod-label", "kube-dns"],
            "--dns-pod-label must be key=value",
        ),
        (
            &["--default-runtime-class-name", "G Visor"],
            "--default-runtime-class-name: \"G Visor\" is not a class name",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(MOAT)
            .arg("operator")
            .args(args)
            .env("KUBECONFIG", unreachable_kubeconfig(&dir))
            .output()
            .expect("run moat");
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn metrics_and_probes_serve_on_their_own_addresses() {
    let dir = tempdir();
    let (metrics, probes) = (free_port(), free_port());
    let _moat = Killed(
        Command::new(MOAT)
            .args([
                "operator",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
                "--health-probe-addr",
                &format!("127.0.0.1:{probes}"),
                "--namespaces",
                "team-a,team-b",
            ])
            .env("KUBECONFIG", unreachable_kubeconfig(&dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moat"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthz = loop {
        if let Some(r) = get(probes, "/healthz") {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on the probe port"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(healthz.0, 200);
    // Alive, but not ready: the API server does not answer, so no cache can fill.
    let (code, why) = get(probes, "/readyz").expect("readyz");
    assert_eq!(code, 503);
    assert!(why.contains("caches"), "{why}");
    // Metrics live on the metrics address only, and the probes only on theirs.
    assert_eq!(get(probes, "/metrics").map(|r| r.0), Some(404));
    assert_eq!(get(metrics, "/healthz").map(|r| r.0), Some(404));
    let (code, body) = get(metrics, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "moat_reconcile_total",
        "moat_reconcile_duration_seconds",
        "moat_leader",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-cli-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Errors a person reads are one line naming what failed, never a backtrace, whatever
/// `RUST_BACKTRACE` says (CI's machine sets `RUST_BACKTRACE=1`).
#[test]
fn errors_are_one_line_even_with_rust_backtrace_set() {
    let dir = tempdir();
    let missing = dir.join("missing.yaml");
    let missing = missing.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 3] = [
        (&["render", "-f", missing], "missing.yaml"),
        (
            &[
                "decrypt",
                "--source",
                "file:///nonexistent/m.age",
                "--sha256",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "--identity",
                missing,
                "--target",
                "/nonexistent/target",
            ],
            "moat: error:",
        ),
        (
            &["encrypt", "-R", missing, missing, "-o", missing],
            "moat: error:",
        ),
    ];
    for (args, want) in cases {
        for backtrace in ["1", "full"] {
            let out = Command::new(MOAT)
                .args(args)
                .env("RUST_BACKTRACE", backtrace)
                .env("RUST_LIB_BACKTRACE", backtrace)
                .output()
                .expect("run moat");
            assert!(!out.status.success(), "{args:?} succeeded");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(want), "{args:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
            assert!(!err.contains("Stack backtrace"), "{args:?}: {err}");
        }
    }
}

/// `moat render` as the operator would apply it: the server image pinned to a given digest and
/// the helper image pinned, so a GitOps review shows exactly what will run.
#[test]
fn render_pins_the_images_it_is_given() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/full.yaml");
    let digest = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let helper = format!("ghcr.io/moat-dev/moat@sha256:{}", "1".repeat(64));
    let run = |args: &[&str]| {
        Command::new(MOAT)
            .arg("render")
            .args(args)
            .output()
            .expect("run moat")
    };
    let out = run(&[
        "-f",
        fixture,
        "--image-digest",
        digest,
        "--helper-image",
        &helper,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let images: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert!(
        images.contains(&format!("registry.example.com:5000/serving/vllm@{digest}").as_str()),
        "{images:?}"
    );
    // The init container and the gate run the pinned helper; nothing runs a tag.
    assert_eq!(
        images.iter().filter(|i| **i == helper).count(),
        2,
        "{images:?}"
    );
    assert!(images.iter().all(|i| i.contains("@sha256:")), "{images:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("is a tag"), "{err}");

    // Without them, the tag is rendered as written, with a note saying what the pods get.
    let out = run(&["-f", fixture]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("image: registry.example.com:5000/serving/vllm:v0.6.3")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resolve or --image-digest"));

    // Refused, with the reason on one line.
    let minimal = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minimal.yaml");
    for (args, want) in [
        (
            vec!["-f", fixture, "--image-digest", "sha256:abc"],
            "is not sha256:",
        ),
        (
            vec!["-f", minimal, "--image-digest", digest],
            "differs from the digest the spec's image names",
        ),
        (
            vec!["-f", fixture, "--helper-image", "ghcr.io/moat-dev/moat:v1"],
            "names no digest",
        ),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}
