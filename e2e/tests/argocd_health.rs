//! The Argo CD health check in `examples/gitops/argocd/health.lua`, run by a real Lua interpreter
//! (Debian's lua5.4, installed by `make deps`) against statuses that Moat's own status code
//! produces: Healthy, Progressing and Degraded (every Stalled reason), and unchanged by status
//! fields it does not read.
//! Needs no cluster; `e2e/tests/gitops.rs` runs the same check on a live status.

use k8s_openapi::{
    api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use moat::{
    api::SecureModelDeployment,
    controller::Error,
    core::status,
    fixture,
    render::{RenderError, ValidationError},
};
use serde_json::{Value, json};

fn health(obj: &Value) -> (String, String) {
    moat_e2e::argocd_health(obj).expect("run the Argo CD health check")
}

fn smd(generation: i64) -> SecureModelDeployment {
    fixture::smd("m")
        .namespace("n")
        .generation(generation)
        .build()
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
    let (status, message) = health(&with_status(
        s.clone(),
        status::stalled(&s, &e.failure(), now()),
    ));
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
            status::stalled(&s, &conflict.failure(), now())
        ))
        .0,
        "Degraded"
    );
}

/// Degraded follows `Stalled=True` whatever its reason: every reason Moat can stall with (the
/// list in `conditions::reason::STALLED`, so a new one is covered without editing this test)
/// gives Degraded with Moat's message, and a reason the script has never heard of does too.
#[test]
fn every_stalled_reason_is_degraded() {
    let s = smd(2);
    let mut reasons: Vec<&str> = moat::api::conditions::reason::STALLED.to_vec();
    reasons.push("AReasonOfAFutureVersion");
    for reason in reasons {
        let failure = status::Failure {
            reason,
            message: format!("stalled because {reason}"),
        };
        let (status, message) = health(&with_status(
            s.clone(),
            status::stalled(&s, &failure, now()),
        ));
        assert_eq!(status, "Degraded", "Stalled/{reason} gave {status}");
        assert_eq!(message, format!("stalled because {reason}"));
    }
    // A transient failure being retried is progress, not a stall.
    let failure = status::Failure {
        reason: moat::api::conditions::reason::REGISTRY_UNREACHABLE,
        message: "the registry did not answer".into(),
    };
    let stalled_first = with_status(
        s.clone(),
        status::stalled(
            &s,
            &status::Failure {
                reason: moat::api::conditions::reason::DECRYPTION_KEY_MISSING,
                message: "no key".into(),
            },
            now(),
        ),
    );
    let mut again: SecureModelDeployment = serde_json::from_value(stalled_first).expect("smd");
    again.metadata.generation = Some(2);
    let (status, _) = health(&with_status(
        again.clone(),
        status::retrying(&again, &failure, now()),
    ));
    assert_eq!(status, "Progressing");
}
