//! Validation in the reconciler: the schema's rules again (the CRD may have been installed
//! without them, or edited) plus what the schema cannot express. Every error says what to change.

use std::{collections::BTreeSet, fmt, net::IpAddr, sync::LazyLock};

use regex::Regex;

use crate::api::{
    DNS_LABEL_PATTERN, ENV_NAME_PATTERN, IMAGE_REFERENCE_PATTERN, MAX_NAME_LENGTH,
    RESERVED_ENV_PREFIX, SecureModelDeploymentSpec,
};
use crate::quantity;

static IMAGE: LazyLock<Regex> = LazyLock::new(|| regex(IMAGE_REFERENCE_PATTERN));
static ENV_NAME: LazyLock<Regex> = LazyLock::new(|| regex(ENV_NAME_PATTERN));
static DNS_LABEL: LazyLock<Regex> = LazyLock::new(|| regex(DNS_LABEL_PATTERN));
static DNS_1035: LazyLock<Regex> = LazyLock::new(|| regex("^[a-z]([-a-z0-9]*[a-z0-9])?$"));

fn regex(pattern: &str) -> Regex {
    // The patterns are constants covered by unit tests; an invalid one matches nothing.
    Regex::new(pattern).unwrap_or_else(|_| Regex::new("[^\\s\\S]").expect("trivial regex"))
}

/// One problem with a spec: the field and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// JSON path of the offending field, for example `spec.server.env[2].name`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Checks `spec` of the SecureModelDeployment called `name`; returns every problem found.
pub fn validate(spec: &SecureModelDeploymentSpec, name: &str) -> Result<(), Vec<ValidationError>> {
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(ValidationError { field, message });

    if name.len() > MAX_NAME_LENGTH || !DNS_1035.is_match(name) {
        err(
            "metadata.name".into(),
            format!("must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters"),
        );
    }
    if !(1..=100).contains(&spec.replicas) {
        err("spec.replicas".into(), "must be between 1 and 100".into());
    }
    let server = &spec.server;
    if server.image.len() > 512 || !IMAGE.is_match(&server.image) {
        err(
            "spec.server.image".into(),
            format!(
                "{:?} is not an image reference such as registry.example.com/team/server:v1",
                server.image
            ),
        );
    }
    if !(1024..=65535).contains(&server.port) {
        err(
            "spec.server.port".into(),
            "must be between 1024 and 65535 (the pods run without the capability to bind lower ports)".into(),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, env) in server.env.iter().enumerate() {
        let field = format!("spec.server.env[{i}]");
        if !ENV_NAME.is_match(&env.name) {
            err(
                format!("{field}.name"),
                format!(
                    "{:?} is not a valid variable name (letters, digits, '_')",
                    env.name
                ),
            );
        }
        if env.name.starts_with(RESERVED_ENV_PREFIX) {
            err(
                format!("{field}.name"),
                format!("names starting with {RESERVED_ENV_PREFIX} are reserved for Moat"),
            );
        }
        if !seen.insert(env.name.as_str()) {
            err(
                format!("{field}.name"),
                format!("{:?} is set more than once", env.name),
            );
        }
        match (&env.value, &env.value_from) {
            (Some(_), Some(_)) | (None, None) => err(
                field.clone(),
                "set exactly one of value and valueFrom".into(),
            ),
            (None, Some(from))
                if from.secret_key_ref.is_some() == from.config_map_key_ref.is_some() =>
            {
                err(
                    format!("{field}.valueFrom"),
                    "set exactly one of secretKeyRef and configMapKeyRef".into(),
                )
            }
            _ => {}
        }
    }
    let limits = &server.resources.limits;
    let requests = server.resources.requests.as_ref();
    for (what, limit, request) in [
        ("cpu", &limits.cpu, requests.and_then(|r| r.cpu.as_ref())),
        (
            "memory",
            &limits.memory,
            requests.and_then(|r| r.memory.as_ref()),
        ),
    ] {
        let limit_value = quantity::parse(limit);
        match limit_value {
            Some(v) if v > 0.0 => {}
            _ => err(
                format!("spec.server.resources.limits.{what}"),
                format!("{limit:?} is not a positive quantity"),
            ),
        }
        if let Some(request) = request {
            match (quantity::parse(request), limit_value) {
                (Some(r), Some(l)) if r > l => err(
                    format!("spec.server.resources.requests.{what}"),
                    format!("request {request} exceeds the limit {limit}"),
                ),
                (Some(r), _) if r > 0.0 => {}
                _ => err(
                    format!("spec.server.resources.requests.{what}"),
                    format!("{request:?} is not a positive quantity"),
                ),
            }
        }
    }
    for (i, client) in spec.access.clients.iter().enumerate() {
        if !DNS_LABEL.is_match(&client.namespace) || client.namespace.len() > 63 {
            err(
                format!("spec.access.clients[{i}].namespace"),
                "must be a namespace name".into(),
            );
        }
    }
    for (i, rule) in spec.access.egress.iter().enumerate() {
        let field = format!("spec.access.egress[{i}]");
        match (&rule.cidr, &rule.namespace) {
            (Some(cidr), None) => match parse_cidr(cidr) {
                Some(0) => err(
                    format!("{field}.cidr"),
                    format!("{cidr} allows every address; list the networks the model needs"),
                ),
                Some(_) => {}
                None => err(
                    format!("{field}.cidr"),
                    format!("{cidr:?} is not a CIDR such as 10.20.0.0/16"),
                ),
            },
            (None, Some(ns)) => {
                if !DNS_LABEL.is_match(ns) || ns.len() > 63 {
                    err(
                        format!("{field}.namespace"),
                        "must be a namespace name".into(),
                    );
                }
            }
            _ => err(
                field.clone(),
                "set exactly one of cidr and namespace".into(),
            ),
        }
        if rule.pod_selector.is_some() && rule.namespace.is_none() {
            err(format!("{field}.podSelector"), "requires namespace".into());
        }
        if rule.ports.is_empty() {
            err(
                format!("{field}.ports"),
                "list at least one port; Moat never opens every port".into(),
            );
        }
        for (j, port) in rule.ports.iter().enumerate() {
            if !(1..=65535).contains(port) {
                err(
                    format!("{field}.ports[{j}]"),
                    "must be between 1 and 65535".into(),
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The prefix length of a CIDR, or `None` when it is not one.
fn parse_cidr(cidr: &str) -> Option<u8> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(prefix)
}
