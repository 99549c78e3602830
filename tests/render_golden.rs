//! Golden-file tests of the pure renders: each fixture under `tests/fixtures/` renders exactly
//! the YAML under `tests/golden/`. Regenerate after an intended change with
//! `UPDATE_GOLDEN=1 cargo test --test render_golden` and review the diff.

use std::path::Path;

use moat::{
    api::SecureModelDeployment,
    render::{Facts, render, to_yaml},
};

/// Compares `rendered` with `tests/golden/<name>.yaml` (or writes it with UPDATE_GOLDEN=1).
fn compare(name: &str, rendered: &str) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, rendered).expect("write golden");
    }
    let expected =
        std::fs::read_to_string(&golden).expect("golden file (UPDATE_GOLDEN=1 creates it)");
    assert_eq!(
        rendered,
        expected,
        "render of {name} differs from {}",
        golden.display()
    );
}

fn check(fixture: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let input = std::fs::read_to_string(dir.join("fixtures").join(format!("{fixture}.yaml")))
        .expect("fixture");
    let smd: SecureModelDeployment = serde_yaml::from_str(&input).expect("fixture parses");
    let first = to_yaml(&render(&smd, &Facts::default()).expect("renders")).expect("yaml");
    let second = to_yaml(&render(&smd, &Facts::default()).expect("renders")).expect("yaml");
    assert_eq!(first, second, "rendering is not deterministic");
    compare(fixture, &first);
}

/// The client certificate Secret of a ModelClient: owned by it, labelled with its name, the
/// certificate data as issued.
#[test]
fn model_client_secret() {
    let mc = moat::fixture::model_client("checkout-to-fraud", "ml-prod", "fraud-scorer")
        .namespace("payments")
        .uid("00000000-0000-0000-0000-0000000000c1")
        .service_account("checkout")
        .secret("fraud-scorer-client-tls")
        .build()
        .expect("ModelClient");
    let tls = moat::render::ServingTls {
        cert_pem: "CERT".into(),
        key_pem: "KEY".into(),
        ca_bundle_pem: "CA".into(),
    };
    let secret =
        moat::render::client_secret(&mc, "fraud-scorer-client-tls", &tls).expect("renders");
    let yaml =
        serde_yaml::to_string(&moat::render::with_type(&secret).expect("json")).expect("yaml");
    compare("model-client-secret", &yaml);
    let mut no_uid = mc.clone();
    no_uid.metadata.uid = None;
    assert!(moat::render::client_secret(&no_uid, "s", &tls).is_err());
}

#[test]
fn minimal() {
    check("minimal");
}

#[test]
fn full() {
    check("full");
}

#[test]
fn pvc_model() {
    check("pvc-model");
}

#[test]
fn quickstart_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(dir.join("examples/quickstart.yaml")).expect("example");
    let smd = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).ok()?;
            (v.get("kind")?.as_str()? == "SecureModelDeployment").then_some(v)
        })
        .next()
        .expect("the example contains a SecureModelDeployment");
    let smd: SecureModelDeployment = serde_yaml::from_value(smd).expect("example parses");
    let children = render(&smd, &Facts::default()).expect("the example renders");
    assert_eq!(children.network_policies.len(), 2);
    assert!(children.pod_disruption_budget.is_some());
}

use serde::Deserialize;

#[test]
fn pdb_only_with_two_or_more_replicas() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut smd: SecureModelDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("minimal.yaml")).expect("fixture"))
            .expect("parses");
    assert!(
        render(&smd, &Facts::default())
            .expect("renders")
            .pod_disruption_budget
            .is_none()
    );
    smd.spec.replicas = 2;
    assert!(
        render(&smd, &Facts::default())
            .expect("renders")
            .pod_disruption_budget
            .is_some()
    );
}

#[test]
fn children_carry_the_labels_and_the_controller_owner_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let smd: SecureModelDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("full.yaml")).expect("fixture"))
            .expect("parses");
    let c = render(&smd, &Facts::default()).expect("renders");
    let metas = [
        &c.service_account.metadata,
        &c.network_policies[0].metadata,
        &c.network_policies[1].metadata,
        &c.service.metadata,
        &c.deployment.metadata,
        &c.pod_disruption_budget.as_ref().expect("pdb").metadata,
    ];
    for m in metas {
        let labels = m.labels.clone().unwrap_or_default();
        assert_eq!(
            labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("moat")
        );
        assert_eq!(
            labels.get("moat.dev/deployment").map(String::as_str),
            Some("fraud-scorer")
        );
        let owners = m.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].kind, "SecureModelDeployment");
        assert_eq!(owners[0].uid, "7d4c7e4a-1f59-4f0e-8f2e-3c5b8a0d9e21");
    }
}

/// Every SecureModelDeployment under `examples/` renders, and every `$(VAR)` its server's
/// arguments use is defined in the rendered container (Kubernetes leaves undefined ones as text).
#[test]
fn examples_render_and_reference_only_defined_variables() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = vec![root.join("quickstart.yaml")];
    for dir in ["mtls", "gitops/models"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("examples dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    let var = regex::Regex::new(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)").expect("regex");
    let mut rendered = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).expect("yaml");
            if v.get("kind").and_then(|k| k.as_str()) != Some("SecureModelDeployment") {
                continue;
            }
            let smd: SecureModelDeployment = serde_yaml::from_value(v).expect("example parses");
            let c = render(&smd, &Facts::default())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let container = &c
                .deployment
                .spec
                .as_ref()
                .expect("spec")
                .template
                .spec
                .as_ref()
                .expect("pod")
                .containers[0];
            let defined: Vec<&str> = container
                .env
                .iter()
                .flatten()
                .map(|e| e.name.as_str())
                .collect();
            for arg in container.args.iter().flatten() {
                for cap in var.captures_iter(arg) {
                    assert!(
                        defined.contains(&&cap[1]),
                        "{}: {arg} uses undefined {}",
                        file.display(),
                        &cap[1]
                    );
                }
            }
            rendered += 1;
        }
    }
    assert!(rendered >= 4, "only {rendered} examples found");
}

/// The operator's placement defaults reach the pod template where the spec names none, and the
/// spec's own choice wins over them.
#[test]
fn placement_defaults_reach_the_pods() {
    let facts = Facts {
        placement_defaults: moat::api::Placement {
            priority_class_name: Some("models".into()),
            runtime_class_name: Some("gvisor".into()),
            ..Default::default()
        },
        ..Facts::default()
    };
    let pod = |smd: &SecureModelDeployment| {
        render(smd, &facts)
            .expect("renders")
            .deployment
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod")
    };
    let plain = moat::fixture::smd("m")
        .namespace("ml")
        .uid("00000000-0000-0000-0000-000000000001")
        .build()
        .expect("smd");
    let p = pod(&plain);
    assert_eq!(p.priority_class_name.as_deref(), Some("models"));
    assert_eq!(p.runtime_class_name.as_deref(), Some("gvisor"));
    let own = moat::fixture::smd("m")
        .namespace("ml")
        .uid("00000000-0000-0000-0000-000000000001")
        .set(
            &["spec", "placement"],
            serde_json::json!({"priorityClassName": "critical"}),
        )
        .build()
        .expect("smd");
    let p = pod(&own);
    assert_eq!(p.priority_class_name.as_deref(), Some("critical"));
    assert_eq!(p.runtime_class_name.as_deref(), Some("gvisor"));
}
