//! The functional core stays pure: no module of `core/`, `render/` or `api/` (nor `quantity.rs` or `fixture.rs`)
//! may talk to the API server, read the clock, spawn tasks, or depend on the controller (whose
//! error type carries `kube::Error`). A newcomer who adds such a call to a pure module gets this
//! failure, naming the file and line, instead of a reconciler logic that only e2e can test.

use std::path::{Path, PathBuf};

/// What a pure module must not mention, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("kube::Client", "a Kubernetes client"),
    ("kube::Api", "a Kubernetes API handle"),
    ("Api<", "a Kubernetes API handle"),
    ("Client::", "a Kubernetes client"),
    (
        "crate::controller",
        "the imperative shell (and its kube::Error-carrying Error)",
    ),
    ("super::controller", "the imperative shell"),
    ("Timestamp::now", "the clock (pass the time in)"),
    ("SystemTime::now", "the clock (pass the time in)"),
    ("Instant::now", "the clock (pass the time in)"),
    ("tokio::", "async I/O or tasks"),
    ("std::fs::", "the file system"),
    ("std::net::", "the network"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn pure_files() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for dir in ["core", "render", "api"] {
        rust_files(&src.join(dir), &mut files);
    }
    files.push(src.join("quantity.rs"));
    files.push(src.join("fixture.rs"));
    files
}

/// Whether `line` names `pattern` as a path of its own (`ModelClient::crd` is not `Client::`).
fn mentions(line: &str, pattern: &str) -> bool {
    line.match_indices(pattern).any(|(i, _)| {
        !line[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Every forbidden mention in `text`, as `line: pattern (why)`; test modules are exempt.
fn violations(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or(line);
        for (pattern, why) in FORBIDDEN {
            if mentions(line, pattern) {
                found.push(format!("{}: {pattern} ({why})", n + 1));
            }
        }
    }
    found
}

#[test]
fn pure_modules_never_reach_the_api_server_the_clock_or_the_shell() {
    let files = pure_files();
    assert!(files.len() > 10, "found only {files:?}");
    let mut all = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for v in violations(&text) {
            all.push(format!("{}:{v}", file.display()));
        }
    }
    assert!(
        all.is_empty(),
        "impure code in pure modules:\n{}",
        all.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_forbids() {
    let impure = "use kube::Client;\nfn f(api: Api<Secret>) { let t = Timestamp::now(); }\nuse crate::controller::Error;\n#[cfg(test)]\nmod tests { use kube::Client; }\n";
    let found = violations(impure);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(violations("// kube::Client in a comment\nfn pure() {}\n").is_empty());
    assert!(violations("let crd = ModelClient::crd();\n").is_empty());
}
