//! The model server Deployment. The pod template passes Pod Security "restricted": non-root
//! (UID/GID 10001), read-only root filesystem with a size-limited writable `/tmp`, all
//! capabilities dropped, no privilege escalation, seccomp RuntimeDefault, no host namespaces or
//! hostPath, no service links, no API token. Rolling updates never drop below the ready count.

use serde_json::{Value, json};

use k8s_openapi::api::apps::v1::Deployment;

use super::{
    Ctx, RUN_AS_ID, RenderError, Resolved, SERVER_EPHEMERAL_LIMIT, SERVER_EPHEMERAL_REQUEST,
    SERVING_PORT_NAME, TLS_HASH_ANNOTATION, TLS_MOUNT_PATH, TMP_SIZE_LIMIT,
    container_security_context, gate, model, scanners, tls_secret, typed,
};

/// Name of the model server's port when the gate is in front of it.
pub const UPSTREAM_PORT_NAME: &str = "model";
use crate::api::{Placement, Probe, ProbeScheme, SecretFile};
use crate::core::revision;

/// The Deployment's progress deadline unless `spec.rollout.progressDeadlineSeconds` sets one
/// (Kubernetes' own default).
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
use std::collections::BTreeMap;

use super::validate::secret_file_dir;

pub(crate) fn render(
    ctx: &Ctx,
    resolved: &Resolved,
    placement_defaults: &Placement,
) -> Result<Deployment, RenderError> {
    let server = &ctx.smd.spec.server;
    let selector = ctx.selector();
    let gated = gate::enforced(ctx.smd);
    // With the gate, the Service's port name belongs to the gate; the server's port is for
    // the gate and the kubelet's probes only.
    let server_port_name = if gated {
        UPSTREAM_PORT_NAME
    } else {
        SERVING_PORT_NAME
    };

    let mut container = serde_json::Map::new();
    container.insert("name".into(), json!("server"));
    // Pinned by the reconciler (`repository@sha256:...`); never the tag from the spec.
    container.insert("image".into(), json!(resolved.image));
    if let Some(command) = &server.command {
        container.insert("command".into(), json!(command));
    }
    if !server.args.is_empty() {
        container.insert("args".into(), json!(server.args));
    }
    // The certificate files, named for the server's flags (`--ssl-certfile
    // $(MOAT_TLS_CERT_FILE)` in args). User variables may not start with MOAT_.
    let mut env = vec![
        json!({"name": "MOAT_TLS_CERT_FILE", "value": format!("{TLS_MOUNT_PATH}/tls.crt")}),
        json!({"name": "MOAT_TLS_KEY_FILE", "value": format!("{TLS_MOUNT_PATH}/tls.key")}),
        json!({"name": "MOAT_TLS_CA_FILE", "value": format!("{TLS_MOUNT_PATH}/ca.crt")}),
    ];
    for var in &server.env {
        env.push(
            serde_json::to_value(var).map_err(|source| RenderError::Build {
                kind: "Deployment",
                source,
            })?,
        );
    }
    container.insert("env".into(), Value::Array(env));
    container.insert(
        "ports".into(),
        json!([{"name": server_port_name, "containerPort": server.port, "protocol": "TCP"}]),
    );
    let limits = &server.resources.limits;
    let requests = server
        .resources
        .requests
        .clone()
        .unwrap_or(crate::api::ResourceRequests {
            cpu: None,
            memory: None,
            ephemeral_storage: None,
        });
    let (disk_request, disk_limit) = server_ephemeral_storage(&server.resources);
    let mut resources = json!({
        "limits": {"cpu": limits.cpu, "memory": limits.memory, "ephemeral-storage": disk_limit},
        "requests": {
            "cpu": requests.cpu.as_ref().unwrap_or(&limits.cpu),
            "memory": requests.memory.as_ref().unwrap_or(&limits.memory),
            "ephemeral-storage": disk_request,
        },
    });
    // Extended resources (accelerators): Kubernetes requires the request to equal the limit.
    for (name, count) in &server.resources.extended {
        resources["limits"][name] = json!(count.to_string());
        resources["requests"][name] = json!(count.to_string());
    }
    container.insert("resources".into(), resources);
    container.insert(
        "readinessProbe".into(),
        probe(server.readiness_probe.as_ref(), server_port_name, &[]),
    );
    // A slow model load never counts as a hang: liveness starts once the startup probe passes,
    // which allows 30 minutes by default.
    container.insert(
        "startupProbe".into(),
        probe(
            server.startup_probe.as_ref(),
            server_port_name,
            &[("periodSeconds", 10), ("failureThreshold", 180)],
        ),
    );
    container.insert(
        "livenessProbe".into(),
        probe(
            server.liveness_probe.as_ref(),
            server_port_name,
            &[
                ("periodSeconds", 20),
                ("timeoutSeconds", 5),
                ("failureThreshold", 3),
            ],
        ),
    );
    container.insert("securityContext".into(), container_security_context());
    let exceptions = scanner_exceptions(ctx, &container);
    let model = ctx
        .smd
        .spec
        .model
        .as_ref()
        .map(|m| model::render(m, resolved));
    let mut mounts = vec![
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "tls", "mountPath": TLS_MOUNT_PATH, "readOnly": true}),
    ];
    if let Some(m) = &model {
        mounts.push(m.server_mount.clone());
    }
    if server.shared_memory.is_some() {
        mounts.push(json!({"name": "shm", "mountPath": "/dev/shm"}));
    }
    let secret_files = secret_file_volumes(&server.secret_files);
    for (name, dir, _) in &secret_files {
        mounts.push(json!({"name": name, "mountPath": dir, "readOnly": true}));
    }
    container.insert("volumeMounts".into(), Value::Array(mounts));
    let mut template_meta = json!({"labels": ctx.labels()});
    // The gate reloads the certificate itself; without it most servers read it only at start.
    if !gated && !ctx.smd.spec.tls.reloads_certificates {
        template_meta["annotations"] = json!({TLS_HASH_ANNOTATION: resolved.tls.hash()});
    }
    let mut pod_spec = json!({
        "serviceAccountName": ctx.name,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [Value::Object(container)],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
            // Readable by the server's group only (fsGroup), never writable.
            {"name": "tls", "secret": {
                "secretName": tls_secret::secret_name(&ctx.name),
                "defaultMode": 0o440,
            }},
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            },
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            },
        ],
    });
    let mut init_containers = Vec::new();
    if let Some(m) = model {
        init_containers.push(m.init_container);
        if let Some(volumes) = pod_spec["volumes"].as_array_mut() {
            volumes.extend(m.volumes);
        }
    }
    if gated {
        // After the model is decrypted: the gate is ready only when the server is anyway.
        init_containers.push(gate::container(ctx, resolved));
        if let Some(volumes) = pod_spec["volumes"].as_array_mut() {
            volumes.push(gate::volume(ctx));
        }
    }
    if !init_containers.is_empty() {
        pod_spec["initContainers"] = Value::Array(init_containers);
    }
    if let Some(size) = &server.shared_memory
        && let Some(volumes) = pod_spec["volumes"].as_array_mut()
    {
        // Charged to the pod's memory, like the model's volume (validation counts both).
        volumes.push(json!({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}));
    }
    if let Some(volumes) = pod_spec["volumes"].as_array_mut() {
        volumes.extend(secret_files.into_iter().map(|(_, _, volume)| volume));
    }
    place(
        &mut pod_spec,
        &effective_placement(ctx.smd.spec.placement.as_ref(), placement_defaults),
    );
    // The Secrets Moat resolved the image with let the kubelet pull it too.
    if !ctx.smd.spec.image_pull_secrets.is_empty() {
        pod_spec["imagePullSecrets"] = json!(ctx.smd.spec.image_pull_secrets);
    }

    let mut meta = ctx.meta(ctx.name.clone());
    meta.annotations = Some(scanners::annotations(&exceptions)).filter(|a| !a.is_empty());
    // The revision this template is: its hash, as a label the pods carry.
    // Hashed as the typed template serializes, which is how the reconciler reads it back.
    let template: k8s_openapi::api::core::v1::PodTemplateSpec = super::typed(
        "Deployment",
        json!({"metadata": template_meta, "spec": pod_spec}),
    )?;
    let template = serde_json::to_value(&template).map_err(|source| super::RenderError::Build {
        kind: "Deployment",
        source,
    })?;
    let hash = revision::template_hash(&template);
    let template = revision::with_label(template, &hash);
    let deadline = ctx
        .smd
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.progress_deadline_seconds)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS);
    typed(
        "Deployment",
        json!({
            "metadata": meta,
            "spec": {
                "replicas": ctx.smd.spec.replicas,
                "revisionHistoryLimit": 5,
                "selector": {"matchLabels": selector},
                "strategy": {
                    "type": "RollingUpdate",
                    // Never fewer ready pods than requested during a rollout.
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                // After it, a revision that is not ready is rolled back (core::revision).
                "progressDeadlineSeconds": deadline,
                "template": template,
            },
        }),
    )
}

/// The scanners' checks the Deployment does not follow ([`scanners`]): always the pull policy
/// (every image is pinned by digest) and pod anti-affinity (topology spread instead); the
/// replica count, identical probes and Secrets in variables when the spec asks for them.
fn scanner_exceptions(
    ctx: &Ctx,
    server: &serde_json::Map<String, Value>,
) -> Vec<scanners::Exception> {
    let spec = &ctx.smd.spec;
    let mut out = vec![scanners::IMAGE_PULL_POLICY, scanners::HOST_ANTI_AFFINITY];
    if spec.replicas < 2 {
        out.push(scanners::FEW_REPLICAS);
    }
    if let (Some(readiness), Some(liveness)) =
        (server.get("readinessProbe"), server.get("livenessProbe"))
        && same_check(readiness, liveness)
    {
        out.push(scanners::IDENTICAL_PROBES);
    }
    if spec.server.env.iter().any(|v| {
        v.value_from
            .as_ref()
            .is_some_and(|f| f.secret_key_ref.is_some())
    }) {
        out.push(scanners::SECRET_ENV);
    }
    out
}

/// Whether two rendered probes check the same thing, as kube-score compares them: a GET of the
/// same path on the same port, or a connection to the same port (timings aside).
fn same_check(a: &Value, b: &Value) -> bool {
    match (a.get("httpGet"), b.get("httpGet")) {
        (Some(x), Some(y)) => x.get("path") == y.get("path") && x.get("port") == y.get("port"),
        (None, None) => a.get("tcpSocket").is_some() && a.get("tcpSocket") == b.get("tcpSocket"),
        _ => false,
    }
}

/// The server's ephemeral-storage request and limit: the spec's, else the defaults; a request
/// defaulted is never above the limit.
pub fn server_ephemeral_storage(resources: &crate::api::Resources) -> (String, String) {
    let limit = resources
        .limits
        .ephemeral_storage
        .clone()
        .unwrap_or_else(|| SERVER_EPHEMERAL_LIMIT.to_string());
    let request = match resources
        .requests
        .as_ref()
        .and_then(|r| r.ephemeral_storage.clone())
    {
        Some(request) => request,
        None => {
            let default = crate::quantity::parse(SERVER_EPHEMERAL_REQUEST);
            match (default, crate::quantity::parse(&limit)) {
                (Some(d), Some(l)) if l < d => limit.clone(),
                _ => SERVER_EPHEMERAL_REQUEST.to_string(),
            }
        }
    };
    (request, limit)
}

/// Prefix of the volumes that hold `spec.server.secretFiles`.
pub const SECRET_FILES_VOLUME: &str = "secret-files";

/// The volumes of `spec.server.secretFiles`, one per directory (in path order), each with its
/// name, mount path and volume: a projected volume of the Secrets' keys, mode 0440 (the server's
/// group reads, nobody writes), which the kubelet updates when a Secret is rotated (a `subPath`
/// mount would not be).
fn secret_file_volumes(files: &[SecretFile]) -> Vec<(String, String, Value)> {
    let mut by_dir: BTreeMap<&str, BTreeMap<&str, Vec<Value>>> = BTreeMap::new();
    for file in files {
        let dir = secret_file_dir(&file.path);
        let name = file.path.rsplit('/').next().unwrap_or_default();
        by_dir
            .entry(dir)
            .or_default()
            .entry(file.secret_name.as_str())
            .or_default()
            .push(json!({"key": file.key, "path": name, "mode": 0o440}));
    }
    by_dir
        .into_iter()
        .enumerate()
        .map(|(i, (dir, secrets))| {
            let name = format!("{SECRET_FILES_VOLUME}-{i}");
            let sources: Vec<Value> = secrets
                .into_iter()
                .map(|(secret, items)| json!({"secret": {"name": secret, "items": items}}))
                .collect();
            let volume = json!({
                "name": name,
                "projected": {"sources": sources, "defaultMode": 0o440},
            });
            (name, dir.to_string(), volume)
        })
        .collect()
}

/// The model's placement: each field of `spec` where it is set, else the operator's default.
pub fn effective_placement(spec: Option<&Placement>, defaults: &Placement) -> Placement {
    let spec = spec.cloned().unwrap_or_default();
    Placement {
        node_selector: if spec.node_selector.is_empty() {
            defaults.node_selector.clone()
        } else {
            spec.node_selector
        },
        tolerations: if spec.tolerations.is_empty() {
            defaults.tolerations.clone()
        } else {
            spec.tolerations
        },
        node_affinity: spec
            .node_affinity
            .or_else(|| defaults.node_affinity.clone()),
        priority_class_name: spec
            .priority_class_name
            .or_else(|| defaults.priority_class_name.clone()),
        runtime_class_name: spec
            .runtime_class_name
            .or_else(|| defaults.runtime_class_name.clone()),
    }
}

/// The placement in the pod spec, field by field; absent fields stay unset.
fn place(pod_spec: &mut Value, placement: &Placement) {
    if !placement.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(placement.node_selector);
    }
    if !placement.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(placement.tolerations);
    }
    if let Some(affinity) = &placement.node_affinity {
        pod_spec["affinity"] = json!({"nodeAffinity": affinity});
    }
    if let Some(class) = &placement.priority_class_name {
        pod_spec["priorityClassName"] = json!(class);
    }
    if let Some(class) = &placement.runtime_class_name {
        pod_spec["runtimeClassName"] = json!(class);
    }
}

/// A probe of the serving port: `probe` as given (TCP without `httpGet`), its unset timings from
/// `defaults`.
fn probe(probe: Option<&Probe>, port_name: &str, defaults: &[(&str, i32)]) -> Value {
    let default = Probe::default();
    let probe = probe.unwrap_or(&default);
    let mut out = serde_json::Map::new();
    match &probe.http_get {
        // Behind the gate the server listens on loopback only: the gate's health port checks it
        // there for the kubelet (a GET of the path, or a connection).
        _ if port_name == UPSTREAM_PORT_NAME => {
            let path = match &probe.http_get {
                Some(http) => format!(
                    "/upstream?{}",
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair("path", &http.path)
                        .finish()
                ),
                None => "/upstream".to_string(),
            };
            out.insert(
                "httpGet".into(),
                json!({"path": path, "port": gate::HEALTH_PORT, "scheme": "HTTP"}),
            );
        }
        Some(http) => {
            let scheme = match http.scheme.unwrap_or(ProbeScheme::Http) {
                ProbeScheme::Http => "HTTP",
                ProbeScheme::Https => "HTTPS",
            };
            out.insert(
                "httpGet".into(),
                json!({"path": http.path, "port": port_name, "scheme": scheme}),
            );
        }
        None => {
            out.insert("tcpSocket".into(), json!({"port": port_name}));
        }
    }
    for (key, value) in [
        ("initialDelaySeconds", probe.initial_delay_seconds),
        ("periodSeconds", probe.period_seconds),
        ("timeoutSeconds", probe.timeout_seconds),
        ("failureThreshold", probe.failure_threshold),
    ] {
        if let Some(v) = value.or_else(|| defaults.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
        {
            out.insert(key.into(), json!(v));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator's defaults fill what the spec leaves unset, and never override what it sets.
    #[test]
    fn placement_defaults_fill_only_unset_fields() {
        let defaults = Placement {
            priority_class_name: Some("models".into()),
            runtime_class_name: Some("gvisor".into()),
            node_selector: [("pool".to_string(), "models".to_string())].into(),
            ..Placement::default()
        };
        let none = effective_placement(None, &defaults);
        assert_eq!(none, defaults);
        let spec = Placement {
            priority_class_name: Some("critical".into()),
            node_selector: [("pool".to_string(), "gpu".to_string())].into(),
            ..Placement::default()
        };
        let merged = effective_placement(Some(&spec), &defaults);
        assert_eq!(merged.priority_class_name.as_deref(), Some("critical"));
        assert_eq!(merged.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(merged.node_selector, spec.node_selector);
        assert_eq!(
            effective_placement(Some(&spec), &Placement::default()),
            spec
        );
    }
}
