//! A SecureModelDeployment from arbitrary JSON or YAML (one document, as `moat render -f` reads
//! it) through what the reconciler runs on it: `render::validated` (validate and parse), then
//! `render::build` with the offline inputs of `moat render` and with inputs as the operator
//! resolves them (a pinned image, consented identities, a quarantine), the objects
//! as they are applied, the YAML `moat render` prints, and the gate's policy.
//!
//! Asserts: no panic; a spec that validates always builds (no internal error), the same way
//! twice, into objects and YAML; its pods pass Pod Security "restricted" (the rules of
//! `moat::fixture::restricted_violations`, as the property tests check them); the gate's policy
//! file parses back as the gate reads it; and a spec that does not validate is never rendered.

#![no_main]

use std::collections::BTreeSet;

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
        let v = moat::fixture::restricted_violations(pod);
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
