//! NetworkPolicies for the model pods: one that denies all ingress and egress, and one that
//! allows exactly what `spec.access` declares (plus cluster DNS). Policies are additive, so the
//! deny-all policy keeps the pods isolated even if the allow policy is deleted.

use serde_json::{Value, json};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{Ctx, Facts, RenderError, Resolved, typed};
use crate::api::Protocol;

/// Label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub(crate) fn render(
    ctx: &Ctx,
    facts: &Facts,
    resolved: &Resolved,
) -> Result<Vec<NetworkPolicy>, RenderError> {
    let deny = typed(
        "NetworkPolicy",
        json!({
            "metadata": ctx.meta(format!("{}-deny-all", ctx.name)),
            "spec": {
                "podSelector": {"matchLabels": ctx.selector()},
                "policyTypes": ["Ingress", "Egress"],
            }
        }),
    )?;

    let access = &ctx.smd.spec.access;
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".into(), json!({"matchLabels": ctx.selector()}));
    spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
    let quarantined = super::gate::enforced(ctx.smd) && resolved.quarantine.is_some();
    let mut ingress = Vec::new();
    // Quarantined: no ingress at all (the deny-all policy alone remains in force).
    if !access.clients.is_empty() && !quarantined {
        let from: Vec<Value> = access
            .clients
            .iter()
            .map(|c| {
                json!({
                    "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: c.namespace}},
                    "podSelector": {"matchLabels": c.pod_selector.clone().unwrap_or_default()},
                })
            })
            .collect();
        ingress.push(json!({
            "from": from,
            "ports": [{"protocol": "TCP", "port": super::gate::entry_port(ctx.smd)}],
        }));
    }
    if let (Some(ns), true) = (&facts.monitoring_namespace, super::gate::enforced(ctx.smd)) {
        ingress.push(json!({
            "from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}}}],
            "ports": [{"protocol": "TCP", "port": super::gate::METRICS_PORT}],
        }));
    }
    if !ingress.is_empty() {
        spec.insert("ingress".into(), Value::Array(ingress));
    }
    let mut egress = vec![json!({
        "to": [{
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: facts.dns_namespace}},
            "podSelector": {"matchLabels": facts.dns_pod_labels},
        }],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    })];
    for rule in &access.egress {
        let to = match (&rule.cidr, &rule.namespace) {
            (Some(cidr), _) => json!([{"ipBlock": {"cidr": cidr}}]),
            (None, Some(ns)) => json!([{
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: ns}},
                "podSelector": {"matchLabels": rule.pod_selector.clone().unwrap_or_default()},
            }]),
            // Rejected by validation; render nothing rather than an open rule.
            (None, None) => continue,
        };
        let protocol = rule.protocol.unwrap_or(Protocol::Tcp).as_str();
        let ports: Vec<Value> = rule
            .ports
            .iter()
            .map(|p| json!({"protocol": protocol, "port": p}))
            .collect();
        egress.push(json!({"to": to, "ports": ports}));
    }
    spec.insert("egress".into(), Value::Array(egress));
    let allow = typed(
        "NetworkPolicy",
        json!({
            "metadata": ctx.meta(format!("{}-allow", ctx.name)),
            "spec": spec,
        }),
    )?;
    Ok(vec![deny, allow])
}
