//! A SecureModelDeployment from arbitrary JSON or YAML (one document, as `moat render -f` reads
//! it) through what the reconciler runs on it: `render::validated` (validate and parse), then
//! `render::build` with the offline inputs of `moat render` and with inputs as the operator
//! resolves them (a pinned image, consented identities, a quarantine), the objects
//! as they are applied, the YAML `moat render` prints, and the gate's policy.
//!
//! Asserts: no panic; a spec that validates always builds (no internal error), the same way
//! twice, into objects and YAML; its pods pass Pod Security "restricted" (the rules of
//! `tests/restricted.rs`); the gate's policy file parses back as the gate reads it; and a spec
//! that does not validate is never rendered.

#![no_main]

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use libfuzzer_sys::fuzz_target;
use moat::{
    api::SecureModelDeployment,
    gate::policy::Policy,
    render::{self, Facts, Resolved, ServingTls},
};

/// The object, read as `moat render -f` reads it (one JSON or YAML document; JSON is YAML too,
/// but serde_json is what reads objects from the API server).
fn object(data: &[u8]) -> Option<SecureModelDeployment> {
    if data.trim_ascii_start().starts_with(b"{") {
        serde_json::from_slice(data).ok()
    } else {
        serde_yaml::from_slice(data).ok()
    }
}

/// The rules of the Pod Security "restricted" profile and Moat's own, as `tests/restricted.rs`
/// checks them (a copy: keep the two in step).
fn violations(pod: &PodSpec) -> Vec<String> {
    let mut v = Vec::new();
    let psc = pod.security_context.clone().unwrap_or_default();
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        v.push("host namespaces".into());
    }
    if pod.host_users == Some(true) {
        v.push("hostUsers".into());
    }
    for vol in pod.volumes.iter().flatten() {
        let allowed = vol.config_map.is_some()
            || vol.csi.is_some()
            || vol.downward_api.is_some()
            || vol.empty_dir.is_some()
            || vol.ephemeral.is_some()
            || vol.persistent_volume_claim.is_some()
            || vol.projected.is_some()
            || vol.secret.is_some();
        if !allowed || vol.host_path.is_some() {
            v.push(format!("volume {} has a restricted type", vol.name));
        }
    }
    if psc.sysctls.as_ref().is_some_and(|s| !s.is_empty()) {
        v.push("sysctls".into());
    }
    let pod_non_root = psc.run_as_non_root == Some(true);
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|s| s.type_.clone());
    for id in [psc.run_as_user, psc.run_as_group, psc.fs_group] {
        if id.is_none_or(|id| id < 10000) {
            v.push(format!("pod UID/GID {id:?} below 10000"));
        }
    }
    let containers: Vec<&Container> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .collect();
    for c in containers {
        let sc = c.security_context.clone().unwrap_or_default();
        let n = &c.name;
        if sc.privileged == Some(true) {
            v.push(format!("{n}: privileged"));
        }
        let res = c.resources.clone().unwrap_or_default();
        for (what, q) in [("requests", &res.requests), ("limits", &res.limits)] {
            if !q.as_ref().is_some_and(|q| q.contains_key("ephemeral-storage")) {
                v.push(format!("{n}: no ephemeral-storage {what}"));
            }
        }
        if sc.allow_privilege_escalation != Some(false) {
            v.push(format!("{n}: allowPrivilegeEscalation != false"));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|c| c == "ALL") {
            v.push(format!("{n}: capabilities not dropped"));
        }
        if caps
            .add
            .unwrap_or_default()
            .iter()
            .any(|c| c != "NET_BIND_SERVICE")
        {
            v.push(format!("{n}: capabilities added"));
        }
        if !(sc.run_as_non_root == Some(true) || (sc.run_as_non_root.is_none() && pod_non_root)) {
            v.push(format!("{n}: runAsNonRoot"));
        }
        if sc.run_as_user == Some(0) {
            v.push(format!("{n}: runAsUser 0"));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.clone())
            .or(pod_seccomp.clone());
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{n}: seccomp"));
        }
        if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
            v.push(format!("{n}: procMount"));
        }
        if c.ports
            .iter()
            .flatten()
            .any(|p| p.host_port.is_some_and(|h| h != 0))
        {
            v.push(format!("{n}: hostPort"));
        }
        if sc.read_only_root_filesystem != Some(true) {
            v.push(format!("{n}: writable root filesystem"));
        }
        let limits = c
            .resources
            .clone()
            .unwrap_or_default()
            .limits
            .unwrap_or_default();
        if !limits.contains_key("cpu") || !limits.contains_key("memory") {
            v.push(format!("{n}: no resource limits"));
        }
    }
    if pod.automount_service_account_token != Some(false) {
        v.push("API token mounted".into());
    }
    if pod.enable_service_links != Some(false) {
        v.push("service links enabled".into());
    }
    v
}

/// What the operator resolves for a model: a pinned image, a real-looking certificate,
/// consented identities, and the quarantine of the spec or annotation.
fn operator_inputs(smd: &SecureModelDeployment) -> Resolved {
    let digest = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    Resolved {
        tls: ServingTls {
            cert_pem: "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nMII=\n-----END PRIVATE KEY-----\n".into(),
            ca_bundle_pem: "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n".into(),
        },
        image: format!("registry.example.com/serving/model@{digest}"),
        helper_image: format!("ghcr.io/moat-dev/moat@{digest}"),
        gate_identities: BTreeSet::from(["spiffe://cluster.local/ns/payments/sa/checkout".into()]),
        quarantine: render::gate::quarantine(smd),
    }
}

fn check(smd: &SecureModelDeployment) {
    let facts = Facts::default();
    let valid = match render::validated(smd) {
        Ok(valid) => valid,
        Err(e) => {
            let _ = e.to_string();
            assert!(
                render::render(smd, &facts).is_err(),
                "an invalid spec rendered"
            );
            return;
        }
    };
    for resolved in [Resolved::offline(smd), operator_inputs(smd)] {
        let children = render::build(&valid, &facts, &resolved)
            .unwrap_or_else(|e| panic!("a spec that validates does not build: {e}"));
        let again = render::build(&valid, &facts, &resolved).expect("builds twice");
        assert_eq!(children, again, "rendering is not deterministic");
        children
            .objects()
            .unwrap_or_else(|e| panic!("the objects of a valid spec: {e}"));
        render::to_yaml(&children).unwrap_or_else(|e| panic!("the YAML of a valid spec: {e}"));
        let pod = children
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("a pod template");
        let v = violations(pod);
        assert!(
            v.is_empty(),
            "a valid spec renders pods that are not restricted: {v:?}"
        );
        if render::gate::enforced(smd) {
            let policy = render::gate::policy(smd, &resolved);
            let (text, _) = render::gate::policy_json(&policy).expect("the policy as JSON");
            let read: Policy = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the gate cannot read its policy: {e}\n{text}"));
            assert_eq!(read, policy, "the policy changes on its way to the gate");
            let cm = children.gate_policy.as_ref().expect("a policy ConfigMap");
            let data = cm
                .data
                .as_ref()
                .and_then(|d| d.get(render::gate::POLICY_FILE));
            assert_eq!(data, Some(&text), "the ConfigMap holds another policy");
        } else {
            assert!(children.gate_policy.is_none(), "a policy without the gate");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(mut smd) = object(data) else {
        return;
    };
    // As `moat render` does; the API server always sets one.
    if smd.metadata.namespace.is_none() {
        smd.metadata.namespace = Some("default".into());
    }
    check(&smd);
});
