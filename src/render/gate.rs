//! Moat's gate in the model pod: a native sidecar (an init container with `restartPolicy:
//! Always`) running `moat gate` from Moat's own image, pinned, and the ConfigMap `<name>-gate`
//! with its policy. The Service's port and the NetworkPolicy lead to the gate only; the model
//! server listens on the pod's loopback.

use serde_json::{Value, json};

use k8s_openapi::api::core::v1::ConfigMap;

use super::{
    Ctx, RenderError, Resolved, SERVING_PORT_NAME, TLS_MOUNT_PATH, container_security_context,
    typed,
};
use crate::{
    api::{GateMode, GateUpstreamProtocol, SecureModelDeployment},
    gate::policy::{AuditPolicy, Limits, Policy, Quarantine},
};

/// Name of the sidecar.
pub const CONTAINER: &str = "gate";
/// Where the gate listens when `spec.gate.port` is unset.
pub const DEFAULT_PORT: i32 = 15443;
/// The gate's plaintext `/healthz` and `/readyz`, for the kubelet only.
pub const HEALTH_PORT: i32 = 15081;
/// The gate's plaintext `/metrics`, open only to the monitoring namespace.
pub const METRICS_PORT: i32 = 15090;
/// Name of the metrics port.
pub const METRICS_PORT_NAME: &str = "gate-metrics";
/// Where the policy ConfigMap is mounted in the gate.
pub const POLICY_MOUNT_PATH: &str = "/var/run/moat/gate";
/// The policy's file (and key in the ConfigMap).
pub const POLICY_FILE: &str = "policy.json";
/// Annotation on a SecureModelDeployment that quarantines it without a change to its spec; its
/// value says why.
pub const QUARANTINE_ANNOTATION: &str = "moat.dev/quarantine";
/// Annotation Moat sets on the model pods with the policy's hash: the change makes the kubelet
/// refresh the pod's ConfigMap volume at once, instead of at its next periodic sync.
pub const POLICY_HASH_ANNOTATION: &str = "moat.dev/gate-policy";

/// Whether the gate guards `smd`'s endpoint.
pub fn enforced(smd: &SecureModelDeployment) -> bool {
    enforced_spec(&smd.spec)
}

/// Whether the gate guards the endpoint of a model with `spec`.
pub fn enforced_spec(spec: &crate::api::SecureModelDeploymentSpec) -> bool {
    spec.gate
        .as_ref()
        .and_then(|g| g.mode)
        .unwrap_or(GateMode::Enforce)
        == GateMode::Enforce
}

/// The port the gate listens on.
pub fn port(smd: &SecureModelDeployment) -> i32 {
    smd.spec
        .gate
        .as_ref()
        .and_then(|g| g.port)
        .unwrap_or(DEFAULT_PORT)
}

/// The port that takes the model's traffic in the pod: the gate's, or the server's without it.
pub fn entry_port(smd: &SecureModelDeployment) -> i32 {
    if enforced(smd) {
        port(smd)
    } else {
        smd.spec.server.port
    }
}

/// Why `smd` is quarantined, if it is: the spec's reason, else the annotation's value.
pub fn quarantine(smd: &SecureModelDeployment) -> Option<String> {
    if let Some(q) = smd.spec.gate.as_ref().and_then(|g| g.quarantine.as_ref()) {
        return Some(format!("spec.gate.quarantine: {}", q.reason));
    }
    smd.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(QUARANTINE_ANNOTATION))
        .map(|why| {
            let why = why.trim();
            if why.is_empty() {
                format!("annotation {QUARANTINE_ANNOTATION}")
            } else {
                format!("annotation {QUARANTINE_ANNOTATION}: {why}")
            }
        })
}

/// The gate's policy for `smd`: the consented identities and the quarantine the reconciler
/// resolved, and the limits of `spec.gate` over the gate's defaults.
pub fn policy(smd: &SecureModelDeployment, resolved: &Resolved) -> Policy {
    let spec = smd.spec.gate.clone().unwrap_or_default();
    let l = spec.limits.unwrap_or_default();
    let d = Limits::default();
    let positive = |v: Option<i32>, default: u32| {
        v.and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default)
    };
    let limits = Limits {
        max_request_bytes: l
            .max_request_bytes
            .as_deref()
            .and_then(crate::quantity::parse)
            .filter(|b| *b >= 1.0)
            .map_or(d.max_request_bytes, |b| b as u64),
        methods: if l.methods.is_empty() {
            d.methods
        } else {
            l.methods
        },
        paths: if l.paths.is_empty() { d.paths } else { l.paths },
        requests_per_second: positive(l.requests_per_second, d.requests_per_second),
        burst: positive(l.burst, d.burst),
        max_concurrent_requests: positive(l.max_concurrent_requests, d.max_concurrent_requests),
        header_timeout_seconds: positive(l.header_timeout_seconds, d.header_timeout_seconds),
        idle_timeout_seconds: positive(l.idle_timeout_seconds, d.idle_timeout_seconds),
    };
    Policy {
        identities: resolved.gate_identities.clone(),
        quarantine: resolved
            .quarantine
            .clone()
            .map(|reason| Quarantine { reason }),
        limits,
        audit: AuditPolicy {
            body_hash: spec.audit_body_hash,
        },
    }
}

/// The policy as the gate reads it, and its hash (recorded in status and on the pods).
pub fn policy_json(policy: &Policy) -> Result<(String, String), RenderError> {
    let text = serde_json::to_string_pretty(policy).map_err(|source| RenderError::Build {
        kind: "ConfigMap",
        source,
    })?;
    let hash = crate::pki::sha256_hex(text.as_bytes())[..16].to_string();
    Ok((text, hash))
}

/// Name of the policy ConfigMap.
pub fn config_map_name(name: &str) -> String {
    format!("{name}-gate")
}

pub(crate) fn config_map(ctx: &Ctx, policy: &Policy) -> Result<ConfigMap, RenderError> {
    let (text, _) = policy_json(policy)?;
    typed(
        "ConfigMap",
        json!({
            "metadata": ctx.meta(config_map_name(&ctx.name)),
            "data": {POLICY_FILE: text},
        }),
    )
}

/// The sidecar.
pub(crate) fn container(ctx: &Ctx, resolved: &Resolved) -> Value {
    let smd = ctx.smd;
    let protocol = match smd.spec.gate.as_ref().and_then(|g| g.upstream_protocol) {
        Some(GateUpstreamProtocol::Http2) => "http2",
        _ => "http1",
    };
    let args = vec![
        "gate".to_string(),
        format!("--listen=0.0.0.0:{}", port(smd)),
        format!("--upstream=127.0.0.1:{}", smd.spec.server.port),
        format!("--upstream-protocol={protocol}"),
        format!("--health-listen=0.0.0.0:{HEALTH_PORT}"),
        format!("--metrics-listen=0.0.0.0:{METRICS_PORT}"),
        format!("--cert={TLS_MOUNT_PATH}/tls.crt"),
        format!("--key={TLS_MOUNT_PATH}/tls.key"),
        format!("--ca={TLS_MOUNT_PATH}/ca.crt"),
        format!("--policy={POLICY_MOUNT_PATH}/{POLICY_FILE}"),
    ];
    json!({
        "name": CONTAINER,
        "image": resolved.helper_image,
        // A native sidecar: started before the server, stopped after it, restarted if it dies.
        "restartPolicy": "Always",
        "args": args,
        "ports": [
            {"name": SERVING_PORT_NAME, "containerPort": port(smd), "protocol": "TCP"},
            {"name": "gate-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        // Ready only when the model server accepts connections.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "gate-health"},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "gate-health"},
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {
            "limits": {
                "cpu": "1",
                "memory": "128Mi",
                "ephemeral-storage": super::HELPER_EPHEMERAL_LIMIT,
            },
            "requests": {
                "cpu": "50m",
                "memory": "32Mi",
                "ephemeral-storage": super::HELPER_EPHEMERAL_REQUEST,
            },
        },
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "tls", "mountPath": TLS_MOUNT_PATH, "readOnly": true},
            {"name": "gate-policy", "mountPath": POLICY_MOUNT_PATH, "readOnly": true},
        ],
    })
}

/// The pod volume of the policy.
pub(crate) fn volume(ctx: &Ctx) -> Value {
    json!({"name": "gate-policy", "configMap": {
        "name": config_map_name(&ctx.name),
        "defaultMode": 0o440,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn quarantine_comes_from_the_spec_or_the_annotation() {
        let smd = fixture::smd("m").namespace("n").build().expect("smd");
        assert_eq!(quarantine(&smd), None);
        let mut annotated = smd.clone();
        annotated.metadata.annotations =
            Some([(QUARANTINE_ANNOTATION.to_string(), "INC-7".to_string())].into());
        assert_eq!(
            quarantine(&annotated).as_deref(),
            Some("annotation moat.dev/quarantine: INC-7")
        );
        let mut spec = annotated.clone();
        spec.spec.gate = Some(crate::api::GateSpec {
            quarantine: Some(crate::api::QuarantineSpec {
                reason: "from git".into(),
            }),
            ..Default::default()
        });
        assert_eq!(
            quarantine(&spec).as_deref(),
            Some("spec.gate.quarantine: from git")
        );
        let p = policy(&spec, &Resolved::offline(&spec));
        assert!(p.quarantine.is_some());
    }

    #[test]
    fn limits_fill_from_the_defaults() {
        let mut smd = fixture::smd("m").namespace("n").build().expect("smd");
        smd.spec.gate = Some(crate::api::GateSpec {
            limits: Some(crate::api::GateLimits {
                max_request_bytes: Some("1Ki".into()),
                paths: vec!["/v1/*".into()],
                burst: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        });
        let p = policy(&smd, &Resolved::offline(&smd));
        assert_eq!(p.limits.max_request_bytes, 1024);
        assert_eq!(p.limits.paths, vec!["/v1/*".to_string()]);
        assert_eq!(p.limits.burst, 5);
        assert_eq!(p.limits.methods, Limits::default().methods);
        assert_eq!(
            p.limits.requests_per_second,
            Limits::default().requests_per_second
        );
    }
}
