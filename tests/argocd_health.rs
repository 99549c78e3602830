//! The Argo CD health check in `examples/gitops/argocd/health.lua`, run by a real Lua interpreter
//! (Debian's lua5.4, installed by `make deps`) against statuses that Moat's own status code
//! produces: Healthy, Progressing and Degraded, and unchanged by status fields it does not read.

use std::process::Command;

use k8s_openapi::{
    api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use moat::{
    api::SecureModelDeployment,
    controller::{Error, status},
    render::{RenderError, ValidationError},
};
use serde_json::{Value, json};

fn lua() -> String {
    std::env::var("MOAT_LUA").unwrap_or_else(|_| "lua5.4".into())
}

/// A JSON value as a Lua table constructor.
fn to_lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        ),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(to_lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{}] = {}", to_lua(&Value::String(k.clone())), to_lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn health(obj: &Value) -> (String, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gitops/argocd/health.lua"
    );
    let harness = format!(
        "obj = {}\nlocal hs = dofile(\"{script}\")\nio.write(hs.status, \"\\t\", hs.message)",
        to_lua(obj)
    );
    let out = Command::new(lua()).args(["-e", &harness]).output().unwrap_or_else(|e| {
        panic!("running {}: {e}; install it with `make deps` (Debian package lua5.4) or set MOAT_LUA", lua())
    });
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, message) = text.split_once('\t').expect("status<TAB>message");
    (status.to_string(), message.to_string())
}

fn smd(generation: i64) -> SecureModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment",
        "metadata": {"name": "m", "namespace": "n", "generation": generation},
        "spec": {"server": {"image": "r.example.com/m:v1", "port": 8000, "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}}
    }))
    .expect("smd")
}

fn deployment(status: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "m", "generation": 1},
        "spec": {"replicas": 2, "selector": {}, "template": {}},
        "status": status
    }))
    .expect("deployment")
}

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).expect("time"))
}

fn with_status(mut s: SecureModelDeployment, st: moat::api::SecureModelDeploymentStatus) -> Value {
    s.status = Some(st);
    serde_json::to_value(s).expect("json")
}

#[test]
fn ready_is_healthy_and_unknown_status_fields_do_not_matter() {
    let s = smd(3);
    let d = deployment(
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let mut obj = with_status(s.clone(), status::converged(&s, Some(&d), now()));
    assert_eq!(health(&obj).0, "Healthy");
    // Fields and conditions added by later versions do not change the verdict.
    obj["status"]["futureField"] = json!({"nested": [1, 2]});
    obj["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
        .push(json!({"type": "FutureCondition", "status": "False", "reason": "X", "message": ""}));
    assert_eq!(health(&obj).0, "Healthy");
}

#[test]
fn rolling_out_and_unobserved_are_progressing() {
    let s = smd(3);
    let d = deployment(
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1, "availableReplicas": 1}),
    );
    let (status, message) = health(&with_status(
        s.clone(),
        status::converged(&s, Some(&d), now()),
    ));
    assert_eq!(status, "Progressing");
    assert!(message.contains("1 of 2 replicas are ready"), "{message}");
    assert_eq!(
        health(&serde_json::to_value(smd(1)).expect("json")).0,
        "Progressing"
    );
    // A status that describes an older generation is not trusted, even if it says Ready.
    let old = smd(3);
    let ready = deployment(
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let mut obj = with_status(old.clone(), status::converged(&old, Some(&ready), now()));
    obj["metadata"]["generation"] = json!(4);
    assert_eq!(health(&obj).0, "Progressing");
}

#[test]
fn invalid_specs_and_failed_rollouts_are_degraded() {
    let s = smd(2);
    let e = Error::Invalid(RenderError::Invalid(vec![ValidationError {
        field: "spec.server.port".into(),
        message: "must be between 1024 and 65535".into(),
    }]));
    let (status, message) = health(&with_status(s.clone(), status::stalled(&s, &e, now())));
    assert_eq!(status, "Degraded");
    assert!(message.contains("spec.server.port"), "{message}");
    let failed = deployment(
        json!({"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}),
    );
    assert_eq!(
        health(&with_status(
            s.clone(),
            status::converged(&s, Some(&failed), now())
        ))
        .0,
        "Degraded"
    );
    let conflict = Error::Conflict {
        kind: "Service",
        name: "m".into(),
    };
    assert_eq!(
        health(&with_status(
            s.clone(),
            status::stalled(&s, &conflict, now())
        ))
        .0,
        "Degraded"
    );
}
