//! Validation in the reconciler: the schema's rules again (the CRD may have been installed
//! without them, or edited) plus what the schema cannot express. Every error says what to change.

use std::{collections::BTreeSet, fmt, net::IpAddr, sync::LazyLock};

use regex::Regex;

use crate::api::{
    DNS_LABEL_PATTERN, ENV_NAME_PATTERN, IMAGE_REFERENCE_PATTERN, MAX_CERTIFICATE_LIFETIME,
    MAX_NAME_LENGTH, MIN_CERTIFICATE_LIFETIME, RESERVED_ENV_PREFIX, SecureModelDeploymentSpec,
};
use crate::quantity;

static IMAGE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(IMAGE_REFERENCE_PATTERN).ok());
static ENV_NAME: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(ENV_NAME_PATTERN).ok());
static DNS_LABEL: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(DNS_LABEL_PATTERN).ok());
static DNS_SUBDOMAIN: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$").ok());
static DNS_1035: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new("^[a-z]([-a-z0-9]*[a-z0-9])?$").ok());

static LABEL_KEY: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$").ok()
});
static LABEL_VALUE: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").ok());

/// Problems with a label selector (`key: value` pairs), as the API server would report them.
fn check_labels(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    field: &str,
    err: &mut impl FnMut(String, String),
) {
    for (k, v) in labels.into_iter().flatten() {
        let name_len = k.rsplit('/').next().map_or(0, str::len);
        if !matches(&LABEL_KEY, k) || name_len > 63 || k.len() > 317 {
            err(field.to_string(), format!("{k:?} is not a valid label key"));
        }
        if !matches(&LABEL_VALUE, v) || v.len() > 63 {
            err(
                format!("{field}.{k}"),
                format!("{v:?} is not a valid label value"),
            );
        }
    }
}

static LIFETIME: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new("^([0-9]+(h|m|s))+$").ok());

/// Parses a certificate lifetime (`24h`, `90m`, `1h30m`) and checks it is between
/// [`MIN_CERTIFICATE_LIFETIME`] and [`MAX_CERTIFICATE_LIFETIME`].
pub fn certificate_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let parsed = if matches(&LIFETIME, s) {
        humantime::parse_duration(s).ok()
    } else {
        None
    };
    match parsed {
        Some(d) if (MIN_CERTIFICATE_LIFETIME..=MAX_CERTIFICATE_LIFETIME).contains(&d) => Ok(d),
        Some(_) => Err(format!("{s:?} must be between 30s and 2160h")),
        None => Err(format!(
            "{s:?} is not a duration of hours, minutes and seconds such as 24h or 90m"
        )),
    }
}

/// Seconds an approval counts when `spec.approval.validFor` is not set (24h).
pub const DEFAULT_APPROVAL_VALIDITY: u64 = 24 * 3600;

/// Parses `spec.approval.validFor` (`24h`, `90m`): between 1m and 720h; the default without it.
pub fn approval_validity(s: Option<&str>) -> Result<std::time::Duration, String> {
    let Some(s) = s else {
        return Ok(std::time::Duration::from_secs(DEFAULT_APPROVAL_VALIDITY));
    };
    let parsed = if matches(&LIFETIME, s) {
        humantime::parse_duration(s).ok()
    } else {
        None
    };
    let range = std::time::Duration::from_secs(60)..=std::time::Duration::from_secs(720 * 3600);
    match parsed {
        Some(d) if range.contains(&d) => Ok(d),
        Some(_) => Err(format!("{s:?} must be between 1m and 720h")),
        None => Err(format!(
            "{s:?} is not a duration of hours, minutes and seconds such as 24h or 90m"
        )),
    }
}

/// Whether `s` is a DNS-1123 subdomain of at most 253 characters (the names of PriorityClasses,
/// RuntimeClasses, Secrets, ...).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && matches(&DNS_SUBDOMAIN, s)
}

/// Whether `s` is a valid namespace name: a DNS-1123 label of at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && matches(&DNS_LABEL, s)
}

/// Whether `s` matches; fails closed (no match) if a pattern did not compile, which the unit
/// test `patterns_compile` rules out.
fn matches(re: &LazyLock<Option<Regex>>, s: &str) -> bool {
    re.as_ref().is_some_and(|re| re.is_match(s))
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

    if name.len() > MAX_NAME_LENGTH || !matches(&DNS_1035, name) {
        err(
            "metadata.name".into(),
            format!("must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters"),
        );
    }
    if !(1..=100).contains(&spec.replicas) {
        err("spec.replicas".into(), "must be between 1 and 100".into());
    }
    if let Some(approval) = &spec.approval {
        if !(0..=5).contains(&approval.required) {
            err(
                "spec.approval.required".into(),
                "must be between 0 and 5".into(),
            );
        }
        if let Err(message) = approval_validity(approval.valid_for.as_deref()) {
            err("spec.approval.validFor".into(), message);
        }
    }
    if let Some(rollout) = &spec.rollout {
        if rollout
            .progress_deadline_seconds
            .is_some_and(|d| !(10..=86400).contains(&d))
        {
            err(
                "spec.rollout.progressDeadlineSeconds".into(),
                "must be between 10 and 86400".into(),
            );
        }
        if rollout
            .revision_history_limit
            .is_some_and(|l| !(2..=100).contains(&l))
        {
            err(
                "spec.rollout.revisionHistoryLimit".into(),
                "must be between 2 and 100".into(),
            );
        }
    }
    let server = &spec.server;
    if server.image.len() > 512 || !matches(&IMAGE, &server.image) {
        err(
            "spec.server.image".into(),
            format!(
                "{:?} is not an image reference such as registry.example.com/team/server:v1",
                server.image
            ),
        );
    }
    if spec.image_policy == Some(crate::api::ImagePolicy::RequireDigest)
        && !server.image.contains("@sha256:")
    {
        err(
            "spec.server.image".into(),
            "must name a digest (repository@sha256:<digest>) because spec.imagePolicy is RequireDigest".into(),
        );
    }
    if !(1024..=65535).contains(&server.port) {
        err(
            "spec.server.port".into(),
            "must be between 1024 and 65535 (the pods run without the capability to bind lower ports)".into(),
        );
    }
    if let Some(gate) = &spec.gate
        && gate.mode != Some(crate::api::GateMode::Disabled)
    {
        let gate_port = gate.port.unwrap_or(super::gate::DEFAULT_PORT);
        if !(1024..=65535).contains(&gate_port) {
            err(
                "spec.gate.port".into(),
                "must be between 1024 and 65535 (the gate runs without the capability to bind lower ports)".into(),
            );
        }
        if [super::gate::HEALTH_PORT, super::gate::METRICS_PORT].contains(&gate_port) {
            err(
                "spec.gate.port".into(),
                format!("{gate_port} is taken by the gate's own health or metrics endpoint"),
            );
        }
        if let Some(limits) = &gate.limits
            && let Some(max) = &limits.max_request_bytes
            && crate::quantity::parse(max).is_none_or(|b| b < 1.0)
        {
            err(
                "spec.gate.limits.maxRequestBytes".into(),
                format!("{max:?} is not a size such as 16Mi"),
            );
        }
    }
    if super::gate::enforced_spec(spec) {
        let gate_port = spec
            .gate
            .as_ref()
            .and_then(|g| g.port)
            .unwrap_or(super::gate::DEFAULT_PORT);
        if [
            gate_port,
            super::gate::HEALTH_PORT,
            super::gate::METRICS_PORT,
        ]
        .contains(&server.port)
        {
            err(
                "spec.server.port".into(),
                format!(
                    "{} is taken by Moat's gate in the pod (ports {gate_port}, {} and {}); choose another, or set spec.gate.port",
                    server.port,
                    super::gate::HEALTH_PORT,
                    super::gate::METRICS_PORT
                ),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, env) in server.env.iter().enumerate() {
        let field = format!("spec.server.env[{i}]");
        if !matches(&ENV_NAME, &env.name) {
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
        if let Some(secret) = env
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            && let Some(why) = forbidden_secret(spec, name, &secret.name)
        {
            err(
                format!("{field}.valueFrom.secretKeyRef.name"),
                format!("{}: {why}", secret.name),
            );
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
        if !matches(&DNS_LABEL, &client.namespace) || client.namespace.len() > 63 {
            err(
                format!("spec.access.clients[{i}].namespace"),
                "must be a namespace name".into(),
            );
        }
        let field = format!("spec.access.clients[{i}].podSelector");
        check_labels(client.pod_selector.as_ref(), &field, &mut err);
        for (j, sa) in client.service_accounts.iter().enumerate() {
            if sa.len() > 253 || !matches(&DNS_SUBDOMAIN, sa) {
                err(
                    format!("spec.access.clients[{i}].serviceAccounts[{j}]"),
                    format!("{sa:?} is not a ServiceAccount name"),
                );
            }
        }
    }
    if let Err(message) = certificate_lifetime(&spec.tls.certificate_lifetime) {
        err("spec.tls.certificateLifetime".into(), message);
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
                if !matches(&DNS_LABEL, ns) || ns.len() > 63 {
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
        check_labels(
            rule.pod_selector.as_ref(),
            &format!("{field}.podSelector"),
            &mut err,
        );
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
    if let Some(model) = &spec.model {
        validate_model(model, &mut err);
    }
    let shm = spec.server.shared_memory.as_deref();
    if let Some(q) = shm
        && crate::quantity::parse(q).is_none_or(|v| v <= 0.0)
    {
        err(
            "spec.server.sharedMemory".into(),
            format!("{q:?} is not a positive quantity such as 1Gi"),
        );
    }
    let memory = crate::quantity::parse(&spec.server.resources.limits.memory);
    if let (Some(floor), Some(memory)) = (
        super::model::server_memory_floor_mi(spec.model.as_ref(), shm),
        memory,
    ) && memory < floor as f64 * crate::quantity::MI
    {
        let mut held = Vec::new();
        if let Some(model) = &spec.model {
            held.push(format!(
                "the decrypted model (spec.model.sizeLimit {}, in a memory-backed volume)",
                model.size_limit
            ));
        }
        if let Some(q) = shm {
            held.push(format!("/dev/shm (spec.server.sharedMemory {q})"));
        }
        err(
            "spec.server.resources.limits.memory".into(),
            format!(
                "{} cannot hold {}: both stay charged to the pod's memory, and the server needs \
                 {}Mi beside them; set at least {floor}Mi, or lower the sizes",
                spec.server.resources.limits.memory,
                held.join(" and "),
                super::model::WORKING_MEMORY_MI
            ),
        );
    }
    validate_secret_files(spec, &mut err);
    for (i, file) in spec.server.secret_files.iter().enumerate() {
        if let Some(why) = forbidden_secret(spec, name, &file.secret_name) {
            err(
                format!("spec.server.secretFiles[{i}].secretName"),
                format!("{}: {why}", file.secret_name),
            );
        }
    }
    let (disk_request, disk_limit) =
        super::deployment::server_ephemeral_storage(&spec.server.resources);
    match (
        crate::quantity::parse(&disk_request),
        crate::quantity::parse(&disk_limit),
    ) {
        (_, None) => err(
            "spec.server.resources.limits.ephemeralStorage".into(),
            format!("{disk_limit:?} is not a positive quantity such as 1Gi"),
        ),
        (None, _) => err(
            "spec.server.resources.requests.ephemeralStorage".into(),
            format!("{disk_request:?} is not a positive quantity such as 256Mi"),
        ),
        (Some(request), Some(limit)) => {
            let floor = super::SERVER_EPHEMERAL_FLOOR_MI as f64 * crate::quantity::MI;
            if limit < floor {
                err(
                    "spec.server.resources.limits.ephemeralStorage".into(),
                    format!(
                        "{disk_limit} cannot hold the server's /tmp ({}) and its logs; set at \
                         least {}Mi",
                        super::TMP_SIZE_LIMIT,
                        super::SERVER_EPHEMERAL_FLOOR_MI
                    ),
                );
            }
            if request <= 0.0 {
                err(
                    "spec.server.resources.requests.ephemeralStorage".into(),
                    format!("{disk_request:?} is not a positive quantity such as 256Mi"),
                );
            } else if request > limit {
                err(
                    "spec.server.resources.requests.ephemeralStorage".into(),
                    format!("{disk_request} exceeds the limit {disk_limit}"),
                );
            }
        }
    }
    for (name, count) in &spec.server.resources.extended {
        let field = format!("spec.server.resources.extended[{name:?}]");
        if !is_extended_resource_name(name) {
            err(
                field.clone(),
                "must be an extended resource name such as nvidia.com/gpu: a vendor domain, \
                 '/', and a name; not a kubernetes.io resource (cpu and memory go in limits)"
                    .into(),
            );
        }
        if !(1..=1024).contains(count) {
            err(
                field,
                format!("{count} is not a whole number from 1 to 1024"),
            );
        }
    }
    if let Some(placement) = &spec.placement {
        check_labels(
            Some(&placement.node_selector),
            "spec.placement.nodeSelector",
            &mut err,
        );
        for (field, class) in [
            ("priorityClassName", &placement.priority_class_name),
            ("runtimeClassName", &placement.runtime_class_name),
        ] {
            if let Some(class) = class
                && !is_dns1123_subdomain(class)
            {
                err(
                    format!("spec.placement.{field}"),
                    format!("{class:?} is not a DNS-1123 subdomain"),
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

/// Whether `name` is an extended resource name: `<domain>/<name>`, the domain a DNS subdomain
/// with at least one dot and not Kubernetes' own (`kubernetes.io`, `*.kubernetes.io`,
/// `k8s.io`), the name a label name of at most 63 characters.
pub fn is_extended_resource_name(name: &str) -> bool {
    static NAME: LazyLock<Option<Regex>> =
        LazyLock::new(|| Regex::new("^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$").ok());
    let Some((domain, resource)) = name.split_once('/') else {
        return false;
    };
    let kubernetes = ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|k| domain == *k || domain.ends_with(&format!(".{k}")));
    domain.contains('.') && is_dns1123_subdomain(domain) && !kubernetes && matches(&NAME, resource)
}

/// Why the model server may not read Secret `secret` (the model's decryption key, which only the
/// decrypting init container gets, or Moat's own Secret for the model), or `None`.
fn forbidden_secret(spec: &SecureModelDeploymentSpec, name: &str, secret: &str) -> Option<String> {
    if spec
        .model
        .as_ref()
        .is_some_and(|m| m.decryption_key_secret_ref.name == secret)
    {
        return Some(
            "is the model's decryption key Secret, which only the decrypting init container \
             reads; the server gets the decrypted model, never the key"
                .into(),
        );
    }
    if secret == super::tls_secret::secret_name(name) {
        return Some(format!(
            "is Moat's own Secret for this model; the server reads its certificate and key at \
             {}",
            super::TLS_MOUNT_PATH
        ));
    }
    None
}

/// Directories a Secret file may not be mounted in (the mount would hide what the image and
/// the runtime keep there) or under (`/tmp`, `/dev`, `/proc`, `/sys` and Moat's own volumes).
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/etc",
    "/home",
    "/opt",
    "/root",
    "/run",
    "/run/secrets",
    "/srv",
    "/var",
    "/var/lib",
    "/var/run",
    "/var/run/secrets",
];
/// Trees no Secret file may be mounted in, at any depth: programs, libraries and trust stores
/// of the image, the kernel's and the runtime's, and Moat's own (`/run` is `/var/run` on many
/// images).
const RESERVED_TREES: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc/pki",
    "/etc/ssl",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run/moat",
    "/run/secrets/kubernetes.io",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
    "/var/run/moat",
    "/var/run/secrets/kubernetes.io",
];

/// Whether `path` is `dir` or under it.
fn within(path: &str, dir: &str) -> bool {
    path == dir
        || dir == "/"
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The directory a Secret file is mounted into: everything before the last `/`.
pub fn secret_file_dir(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn validate_secret_files(spec: &SecureModelDeploymentSpec, err: &mut impl FnMut(String, String)) {
    let files = &spec.server.secret_files;
    let model_path = spec
        .model
        .as_ref()
        .map(|m| m.mount_path.trim_end_matches('/'));
    let mut dirs: Vec<&str> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let field = format!("spec.server.secretFiles[{i}]");
        let path = file.path.as_str();
        let components: Vec<&str> = path.split('/').skip(1).collect();
        // The kubelet keeps a projected volume's own files under `..`-prefixed names.
        let file_name = components.last().copied().unwrap_or_default();
        if !path.starts_with('/')
            || components
                .iter()
                .any(|c| c.is_empty() || *c == "." || *c == "..")
            || file_name.starts_with("..")
            || path.contains(':')
        {
            err(
                format!("{field}.path"),
                format!(
                    "{path:?} is not an absolute file path without '.', '..', '//', ':' or a \
                     trailing '/'"
                ),
            );
            continue;
        }
        let dir = secret_file_dir(path);
        if SYSTEM_DIRS.contains(&dir) {
            err(
                format!("{field}.path"),
                format!(
                    "{dir} would be replaced by a directory holding only Secret files; put the \
                     file in a directory of its own, for example /var/run/secrets/app/{}",
                    path.rsplit('/').next().unwrap_or_default()
                ),
            );
        } else if let Some(tree) = RESERVED_TREES.iter().find(|t| within(dir, t)) {
            err(
                format!("{field}.path"),
                format!("{path} is under {tree}, which Secret files may not be mounted in"),
            );
        } else if let Some(model) = model_path
            && (within(dir, model) || within(model, dir))
        {
            err(
                format!("{field}.path"),
                format!(
                    "{path} overlaps the model's mountPath {model}; give the Secret files a \
                     directory of their own"
                ),
            );
        }
        if files[..i].iter().any(|f| f.path == file.path) {
            err(format!("{field}.path"), format!("{path} is listed twice"));
        }
        if !is_dns1123_subdomain(&file.secret_name) {
            err(
                format!("{field}.secretName"),
                format!("{:?} is not a DNS-1123 subdomain", file.secret_name),
            );
        }
        if file.key.is_empty()
            || file.key == "."
            || file.key == ".."
            || !file
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            err(
                format!("{field}.key"),
                format!(
                    "{:?} may contain only letters, digits, '-', '_' and '.'",
                    file.key
                ),
            );
        }
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    // One read-only directory per distinct directory: one inside another would be mounted over
    // it, or hide its files.
    for (i, a) in dirs.iter().enumerate() {
        for b in &dirs[i + 1..] {
            if within(a, b) || within(b, a) {
                err(
                    "spec.server.secretFiles".into(),
                    format!(
                        "the directories {a} and {b} are nested; put the files of both in one \
                         directory, or in two side by side"
                    ),
                );
            }
        }
    }
}

/// Whether a path has a `..` component.
fn has_dot_dot(path: &str) -> bool {
    path.split('/').any(|c| c == "..")
}

fn validate_model(model: &crate::api::ModelSpec, err: &mut impl FnMut(String, String)) {
    let source = &model.source;
    match (&source.url, &source.pvc) {
        (Some(_), Some(_)) | (None, None) => err(
            "spec.model.source".into(),
            "set exactly one of url and pvc".into(),
        ),
        (Some(url), None) => {
            let rest = url.strip_prefix("https://").unwrap_or_default();
            if rest.is_empty() || url.chars().any(char::is_whitespace) {
                err(
                    "spec.model.source.url".into(),
                    format!("{url:?} must be an https:// URL; plain HTTP is refused"),
                );
            }
        }
        (None, Some(pvc)) => {
            if !matches(&DNS_SUBDOMAIN, &pvc.claim_name) || pvc.claim_name.len() > 253 {
                err(
                    "spec.model.source.pvc.claimName".into(),
                    "must be a PersistentVolumeClaim name (a DNS-1123 subdomain)".into(),
                );
            }
            if pvc.path.is_empty() || pvc.path.starts_with('/') || has_dot_dot(&pvc.path) {
                err(
                    "spec.model.source.pvc.path".into(),
                    "must be a path relative to the volume without '..'".into(),
                );
            }
        }
    }
    if source.ca_config_map_ref.is_some() && source.url.is_none() {
        err(
            "spec.model.source.caConfigMapRef".into(),
            "applies only to a url source".into(),
        );
    }
    if model.sha256.len() != 64
        || !model
            .sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        err(
            "spec.model.sha256".into(),
            "must be 64 lower-case hex digits (sha256sum of the encrypted artifact)".into(),
        );
    }
    let path = &model.mount_path;
    let reserved = ["/tmp", "/var/run/moat"]
        .iter()
        .any(|r| path == r || path.starts_with(&format!("{r}/")));
    if !path.starts_with('/') || path == "/" || has_dot_dot(path) || path.contains(':') || reserved
    {
        err(
            "spec.model.mountPath".into(),
            format!(
                "{path:?} must be an absolute path without '..' or ':', and not /, /tmp or under /var/run/moat"
            ),
        );
    }
    if quantity::parse(&model.size_limit).is_none_or(|v| v <= 0.0) {
        err(
            "spec.model.sizeLimit".into(),
            "must be a positive quantity such as 20Gi".into(),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_compile_and_match_what_they_should() {
        for re in [
            &IMAGE,
            &ENV_NAME,
            &DNS_LABEL,
            &DNS_1035,
            &LABEL_KEY,
            &LABEL_VALUE,
        ] {
            assert!(re.is_some());
        }
        for ok in [
            "nginx",
            "nginx:1.27",
            "registry.example.com:5000/a/b:v1",
            "r.io/m@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "localhost/x_y__z-w",
        ] {
            assert!(matches(&IMAGE, ok), "{ok}");
        }
        for bad in [
            "",
            "upper/CASE",
            "a b",
            "r/m@sha256:short",
            "-lead/x",
            "x:tag with space",
            "a;rm -rf /",
        ] {
            assert!(!matches(&IMAGE, bad), "{bad}");
        }
        assert!(matches(&LABEL_KEY, "app.kubernetes.io/name") && matches(&LABEL_KEY, "app"));
        assert!(!matches(&LABEL_KEY, "bad key") && !matches(&LABEL_VALUE, "-x"));
        assert_eq!(parse_cidr("10.0.0.0/8"), Some(8));
        assert_eq!(parse_cidr("::/0"), Some(0));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("nonsense"), None);
    }

    /// The server's memory limit must hold the decrypted model plus 256Mi: table of limits and
    /// sizes, in the spellings users write.
    #[test]
    fn the_server_memory_limit_must_hold_the_model_and_the_server() {
        use crate::fixture;
        for (memory, size, ok) in [
            ("4Gi", "2Gi", true),
            ("2304Mi", "2Gi", true),
            ("2303Mi", "2Gi", false),
            ("2Gi", "2Gi", false),
            ("1Gi", "2Gi", false),
            ("3G", "2Gi", true),
            ("16Gi", "15Gi", true),
            ("16Gi", "15.9Gi", false),
        ] {
            let smd = fixture::smd("m")
                .limits("1", memory)
                .model(serde_json::json!({
                    "source": {"url": "https://artifacts.example.com/m.tar.age"},
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "decryptionKeySecretRef": {"name": "k", "key": "identity"},
                    "mountPath": "/models/m", "sizeLimit": size
                }))
                .build()
                .expect("decodes");
            let result = validate(&smd.spec, "m");
            assert_eq!(result.is_ok(), ok, "{memory} for {size}: {result:?}");
            if let Err(errors) = result {
                let e = errors
                    .iter()
                    .find(|e| e.field == "spec.server.resources.limits.memory")
                    .expect("the memory limit is named");
                assert!(
                    e.message.contains("cannot hold the decrypted model"),
                    "{}",
                    e.message
                );
            }
        }
    }

    /// `spec.model` with the decryption key in Secret `k`, mounted at `/models/m`.
    fn model_json(size_limit: &str) -> serde_json::Value {
        serde_json::json!({
            "source": {"url": "https://artifacts.example.com/m.tar.age"},
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "decryptionKeySecretRef": {"name": "k", "key": "identity"},
            "mountPath": "/models/m", "sizeLimit": size_limit
        })
    }

    #[test]
    fn the_server_reads_neither_the_decryption_key_nor_moats_own_secret() {
        use crate::fixture;
        let model = model_json("1Gi");
        for (secret, ok) in [("k", false), ("m-tls", false), ("other", true)] {
            let smd = fixture::smd("m")
                .limits("1", "4Gi")
                .model(model.clone())
                .set(
                    &["spec", "server", "env"],
                    serde_json::json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "a"}}}]),
                )
                .build()
                .expect("decodes");
            match validate(&smd.spec, "m") {
                Ok(()) => assert!(ok, "{secret} accepted"),
                Err(errors) => {
                    assert!(!ok, "{secret}: {errors:?}");
                    assert!(
                        errors.iter().any(|e| e.field
                            == "spec.server.env[0].valueFrom.secretKeyRef.name"
                            && e.message.starts_with(secret)),
                        "{errors:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ephemeral_storage_holds_tmp_and_the_logs() {
        use crate::fixture;
        for (limit, request, ok) in [
            (None, None, true),
            (Some("320Mi"), None, true),
            (Some("319Mi"), None, false),
            (Some("2Gi"), Some("2Gi"), true),
            (Some("1Gi"), Some("2Gi"), false),
            (None, Some("1Gi"), true),
            (None, Some("2Gi"), false),
            (Some("lots"), None, false),
            (None, Some("0"), false),
        ] {
            let mut f = fixture::smd("m");
            if let Some(l) = limit {
                f = f.set(
                    &["spec", "server", "resources", "limits", "ephemeralStorage"],
                    serde_json::json!(l),
                );
            }
            if let Some(r) = request {
                f = f.set(
                    &[
                        "spec",
                        "server",
                        "resources",
                        "requests",
                        "ephemeralStorage",
                    ],
                    serde_json::json!(r),
                );
            }
            let smd = f.build().expect("decodes");
            let result = validate(&smd.spec, "m");
            assert_eq!(result.is_ok(), ok, "{limit:?} {request:?}: {result:?}");
            if let Err(errors) = result {
                assert!(
                    errors.iter().all(|e| e.field.ends_with("ephemeralStorage")),
                    "{errors:?}"
                );
            }
        }
        // A limit below the default request lowers the request with it.
        let smd = fixture::smd("m")
            .set(
                &["spec", "server", "resources", "limits", "ephemeralStorage"],
                serde_json::json!("200Mi"),
            )
            .build()
            .expect("decodes");
        assert_eq!(
            super::super::deployment::server_ephemeral_storage(&smd.spec.server.resources),
            ("200Mi".to_string(), "200Mi".to_string())
        );
    }

    #[test]
    fn secret_files_need_a_directory_of_their_own() {
        use crate::fixture;
        let model = model_json("1Gi");
        let file =
            |path: &str| serde_json::json!({"path": path, "secretName": "hf", "key": "token"});
        /// The error's field and a word of its message; `None` when the spec is valid.
        type Want = Option<(&'static str, &'static str)>;
        let cases: &[(&[&str], Want)] = &[
            (&["/var/run/secrets/hf/token"], None),
            (
                &["/var/run/secrets/hf/token", "/var/run/secrets/hf/other"],
                None,
            ),
            (&["/etc/app/token", "/var/run/secrets/db/password"], None),
            (
                &["/token"],
                Some(("secretFiles[0].path", "directory of its own")),
            ),
            (
                &["/etc/token"],
                Some(("secretFiles[0].path", "/var/run/secrets/app/token")),
            ),
            (
                &["/var/run/secrets/token"],
                Some(("secretFiles[0].path", "directory")),
            ),
            (
                &["/tmp/x/token"],
                Some(("secretFiles[0].path", "under /tmp")),
            ),
            (
                &["/dev/shm/token"],
                Some(("secretFiles[0].path", "under /dev")),
            ),
            (
                &["/var/run/moat/tls/x"],
                Some(("secretFiles[0].path", "under /var/run/moat")),
            ),
            (
                &["/var/run/secrets/kubernetes.io/serviceaccount/token"],
                Some(("secretFiles[0].path", "kubernetes.io")),
            ),
            (
                &["/models/m/token"],
                Some(("secretFiles[0].path", "overlaps the model")),
            ),
            (
                &["/models/token"],
                Some(("secretFiles[0].path", "overlaps the model")),
            ),
            (
                &["/etc/app/../token"],
                Some(("secretFiles[0].path", "absolute file path")),
            ),
            (
                &["/etc/app//token"],
                Some(("secretFiles[0].path", "absolute file path")),
            ),
            (
                &["/etc/app/"],
                Some(("secretFiles[0].path", "absolute file path")),
            ),
            (
                &["etc/app/token"],
                Some(("secretFiles[0].path", "absolute file path")),
            ),
            (
                &["/etc/app/..data"],
                Some(("secretFiles[0].path", "absolute file path")),
            ),
            (
                &["/usr/lib/app/token"],
                Some(("secretFiles[0].path", "under /usr")),
            ),
            (
                &["/etc/ssl/certs/token"],
                Some(("secretFiles[0].path", "under /etc/ssl")),
            ),
            (
                &["/run/secrets/token"],
                Some(("secretFiles[0].path", "directory")),
            ),
            (
                &["/run/moat/tls/x"],
                Some(("secretFiles[0].path", "under /run/moat")),
            ),
            (
                &["/etc/app/token", "/etc/app/token"],
                Some(("secretFiles[1].path", "listed twice")),
            ),
            (
                &["/etc/app/token", "/etc/app/more/token"],
                Some(("secretFiles", "nested")),
            ),
        ];
        for (paths, want) in cases {
            let files: Vec<_> = paths.iter().map(|p| file(p)).collect();
            let smd = fixture::smd("m")
                .limits("1", "4Gi")
                .model(model.clone())
                .set(&["spec", "server", "secretFiles"], serde_json::json!(files))
                .build()
                .expect("decodes");
            let result = validate(&smd.spec, "m");
            match (want, result) {
                (None, Ok(())) => {}
                (Some((field, word)), Err(errors)) => {
                    assert!(
                        errors
                            .iter()
                            .any(|e| e.field == format!("spec.server.{field}")
                                && e.message.contains(word)),
                        "{paths:?}: want {field} saying {word:?}, got {errors:?}"
                    );
                }
                (want, got) => panic!("{paths:?}: want {want:?}, got {got:?}"),
            }
        }
        // The Secret and the key are checked as the kubelet needs them.
        for (secret, key, field) in [
            ("Bad_Name", "token", "secretName"),
            ("hf", "a/b", "key"),
            ("hf", "..", "key"),
            // The model's decryption key and Moat's own Secret stay out of the server.
            ("k", "identity", "secretName"),
            ("m-tls", "tls.key", "secretName"),
        ] {
            let smd = fixture::smd("m")
                .limits("1", "4Gi")
                .model(model.clone())
                .set(
                    &["spec", "server", "secretFiles"],
                    serde_json::json!([{"path": "/etc/app/t", "secretName": secret, "key": key}]),
                )
                .build()
                .expect("decodes");
            let errors = validate(&smd.spec, "m").expect_err("invalid");
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == format!("spec.server.secretFiles[0].{field}")),
                "{errors:?}"
            );
        }
    }

    /// /dev/shm is charged to the pod's memory too: with and without a model.
    #[test]
    fn the_server_memory_limit_must_hold_shared_memory_too() {
        use crate::fixture;
        let model = model_json("2Gi");
        for (memory, shm, with_model, ok) in [
            ("1280Mi", "1Gi", false, true),
            ("1279Mi", "1Gi", false, false),
            ("3328Mi", "1Gi", true, true),
            ("3327Mi", "1Gi", true, false),
            ("64Gi", "0", false, false),
            ("64Gi", "lots", false, false),
        ] {
            let mut f = fixture::smd("m")
                .limits("1", memory)
                .set(&["spec", "server", "sharedMemory"], serde_json::json!(shm));
            if with_model {
                f = f.model(model.clone());
            }
            let smd = f.build().expect("decodes");
            let result = validate(&smd.spec, "m");
            assert_eq!(
                result.is_ok(),
                ok,
                "{memory} for shm {shm}, model {with_model}: {result:?}"
            );
            if let Err(errors) = result
                && shm == "1Gi"
            {
                let e = errors
                    .iter()
                    .find(|e| e.field == "spec.server.resources.limits.memory")
                    .expect("the memory limit is named");
                assert!(
                    e.message
                        .contains("/dev/shm (spec.server.sharedMemory 1Gi)"),
                    "{}",
                    e.message
                );
            }
        }
    }

    #[test]
    fn extended_resources_are_vendor_names_with_whole_counts() {
        for ok in [
            "nvidia.com/gpu",
            "amd.com/gpu",
            "example.com/fpga_v2",
            "gpu.intel.com/i915",
        ] {
            assert!(is_extended_resource_name(ok), "{ok}");
        }
        for bad in [
            "gpu",
            "nvidia/gpu",
            "cpu",
            "kubernetes.io/gpu",
            "foo.kubernetes.io/x",
            "k8s.io/x",
            "Nvidia.com/gpu",
            "nvidia.com/",
            "nvidia.com/-x",
        ] {
            assert!(!is_extended_resource_name(bad), "{bad}");
        }
        for (count, ok) in [
            (1, true),
            (1024, true),
            (0, false),
            (-1, false),
            (1025, false),
        ] {
            let smd = crate::fixture::smd("m")
                .set(
                    &["spec", "server", "resources", "extended"],
                    serde_json::json!({"nvidia.com/gpu": count}),
                )
                .build()
                .expect("decodes");
            let result = validate(&smd.spec, "m");
            assert_eq!(result.is_ok(), ok, "{count}: {result:?}");
        }
        let smd = crate::fixture::smd("m")
            .set(&["spec", "server", "resources", "extended"], serde_json::json!({"memory": 1}))
            .set(&["spec", "placement"], serde_json::json!({"priorityClassName": "Bad_Name", "nodeSelector": {"bad key": "v"}}))
            .build()
            .expect("decodes");
        let fields: Vec<String> = validate(&smd.spec, "m")
            .expect_err("invalid")
            .into_iter()
            .map(|e| e.field)
            .collect();
        for want in [
            "spec.server.resources.extended[\"memory\"]",
            "spec.placement.priorityClassName",
            "spec.placement.nodeSelector",
        ] {
            assert!(fields.iter().any(|f| f == want), "{want} not in {fields:?}");
        }
    }
}
