//! The CRDs checked in under `crds/` are exactly what `moat crd` generates from the Rust types.
//! When this fails, run `make manifests` and commit the result.

#[test]
fn checked_in_crds_match_the_rust_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/moat.dev_crds.yaml");
    let checked_in = std::fs::read_to_string(&path).expect("crds/moat.dev_crds.yaml exists");
    let generated = moat::api::crds_yaml().expect("CRDs serialize");
    assert!(
        checked_in == generated,
        "{} is out of date: run `make manifests` and commit the result",
        path.display()
    );
}

#[test]
fn the_chart_carries_the_same_crds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = std::fs::read_to_string(root.join("charts/moat/files/moat.dev_crds.yaml"))
        .expect("charts/moat/files/moat.dev_crds.yaml exists");
    assert!(
        chart == moat::api::crds_yaml().expect("CRDs serialize"),
        "the chart's CRDs are out of date: run `make manifests` and commit the result"
    );
}

#[test]
fn every_schema_property_is_documented() {
    // `kubectl explain` shows these descriptions; an undocumented field is a bug.
    let crds = moat::api::crds();
    for crd in crds {
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(&version.schema).expect("schema");
            let mut missing = Vec::new();
            walk(
                &schema["openAPIV3Schema"]["properties"]["spec"],
                "spec",
                &mut missing,
            );
            // A kind without a status (ModelRevision: immutable) has nothing there to document.
            let status = &schema["openAPIV3Schema"]["properties"]["status"];
            if !status.is_null() {
                walk(status, "status", &mut missing);
            }
            assert!(missing.is_empty(), "undocumented fields: {missing:?}");
        }
    }
}

fn walk(schema: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    if schema
        .get("description")
        .and_then(|d| d.as_str())
        .is_none_or(str::is_empty)
    {
        missing.push(path.to_string());
    }
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            walk(v, &format!("{path}.{k}"), missing);
        }
    }
    // Items of a list of objects are documented per property; scalar items by the list itself.
    // Conditions are Kubernetes' own type, documented upstream.
    let item_props = schema
        .get("items")
        .and_then(|i| i.get("properties"))
        .and_then(|p| p.as_object())
        .filter(|_| !path.ends_with("conditions"));
    for (k, v) in item_props.into_iter().flatten() {
        walk(v, &format!("{path}[].{k}"), missing);
    }
}

#[test]
fn moat_crd_prints_the_checked_in_file() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("crd")
        .output()
        .expect("run moat crd");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        moat::api::crds_yaml().expect("yaml")
    );
}

#[test]
fn moat_render_prints_the_children_and_rejects_bad_input() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["render", "-f"])
        .arg(&example)
        .output()
        .expect("run moat render");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let kinds: Vec<String> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let v: serde_yaml::Value = serde_yaml::from_str(d).expect("yaml document");
            v["kind"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Secret",
            "NetworkPolicy",
            "NetworkPolicy",
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
            "Deployment"
        ]
    );

    let dir = tempdir();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&example)
            .expect("fixture")
            .replace("port: 8000", "port: 80"),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["render", "-f"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.server.port: must be between 1024 and 65535"),
        "{err}"
    );
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("moat-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tempdir");
    d
}
