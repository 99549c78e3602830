//! The decrypting init container and its volumes, for a SecureModelDeployment with
//! `spec.model`. The plaintext lives only in a memory-backed `emptyDir` (size-limited), written
//! by the init container and mounted read-only into the server; the key Secret and the source
//! volume are mounted into the init container alone.

use serde_json::{Value, json};

use super::{Resolved, container_security_context};
use crate::api::ModelSpec;

/// Name of the init container.
pub const INIT_CONTAINER: &str = "decrypt-model";
/// Where the init container writes the decrypted model (the same volume the server mounts).
pub const TARGET_PATH: &str = "/var/run/moat/model";
/// Where the key Secret is mounted in the init container.
pub const KEY_PATH: &str = "/var/run/moat/model-key";
/// Where a PVC source is mounted in the init container.
pub const SOURCE_PATH: &str = "/var/run/moat/model-source";
/// Where the CA bundle of a URL source is mounted in the init container.
pub const CA_PATH: &str = "/var/run/moat/model-ca";
/// File names inside the key and CA mounts.
const IDENTITY_FILE: &str = "identity";
const CA_FILE: &str = "ca.crt";

/// CPU bounds of the init container: it uses up to two cores while decrypting but asks the
/// scheduler for less, since an init container's request counts against the node even though it
/// runs before the server.
const INIT_CPU_LIMIT: &str = "2";
const INIT_CPU_REQUEST: &str = "250m";

/// Memory, in MiB, that `moat decrypt` needs for itself (buffers of the parallel decryption;
/// bounded whatever the artifact's size), and the least the server must have beside the model.
pub const WORKING_MEMORY_MI: u64 = 256;

/// The init container's memory limit and request: the plaintext it writes into the
/// `medium: Memory` volume is charged to its memory cgroup, so its limit must hold `sizeLimit`
/// plus its working memory. A fixed 256Mi got it OOM-killed on any model above about 200 MiB.
/// After it exits the pages stay charged to the pod, which is why validation requires the
/// server's memory limit to hold them too ([`server_memory_floor_mi`]).
pub fn init_memory(model: &ModelSpec) -> String {
    let size = crate::quantity::mebibytes_ceil(&model.size_limit).unwrap_or(0);
    format!("{}Mi", size.saturating_add(WORKING_MEMORY_MI))
}

/// The least `server.resources.limits.memory` (MiB) for a model of `sizeLimit` and a
/// `/dev/shm` of `shared_memory`: the plaintext, which stays charged to the pod's memory after
/// the init container exits, what the server puts in shared memory, and the server's own working
/// memory. `None` when there is neither, or when a size is not a quantity.
pub fn server_memory_floor_mi(
    model: Option<&ModelSpec>,
    shared_memory: Option<&str>,
) -> Option<u64> {
    if model.is_none() && shared_memory.is_none() {
        return None;
    }
    let size = match model {
        Some(m) => crate::quantity::mebibytes_ceil(&m.size_limit)?,
        None => 0,
    };
    let shm = match shared_memory {
        Some(q) => crate::quantity::mebibytes_ceil(q)?,
        None => 0,
    };
    Some(size.saturating_add(shm).saturating_add(WORKING_MEMORY_MI))
}

/// What `spec.model` adds to the pod.
pub(crate) struct ModelPod {
    /// The init container.
    pub init_container: Value,
    /// Volumes to add to the pod.
    pub volumes: Vec<Value>,
    /// The read-only mount of the decrypted model into the server.
    pub server_mount: Value,
}

/// The init container's command line: the contract with `moat decrypt`.
pub fn decrypt_args(model: &ModelSpec) -> Vec<String> {
    let source = match (&model.source.url, &model.source.pvc) {
        (Some(url), _) => url.clone(),
        (None, Some(pvc)) => format!("file://{SOURCE_PATH}/{}", pvc.path),
        // validate() refuses a source with neither; render something that fails closed.
        (None, None) => String::new(),
    };
    let mut args = vec![
        "decrypt".to_string(),
        format!("--source={source}"),
        format!("--sha256={}", model.sha256),
        format!("--identity={KEY_PATH}/{IDENTITY_FILE}"),
        format!("--target={TARGET_PATH}"),
        format!("--size-limit={}", model.size_limit),
        "--termination-message-path=/dev/termination-log".to_string(),
    ];
    if model.source.ca_config_map_ref.is_some() {
        args.push(format!("--ca-file={CA_PATH}/{CA_FILE}"));
    }
    args
}

pub(crate) fn render(model: &ModelSpec, resolved: &Resolved) -> ModelPod {
    let mut mounts = vec![
        json!({"name": "model", "mountPath": TARGET_PATH}),
        json!({"name": "model-key", "mountPath": KEY_PATH, "readOnly": true}),
    ];
    let mut volumes = vec![
        json!({"name": "model", "emptyDir": {"medium": "Memory", "sizeLimit": model.size_limit}}),
        // Readable by the pod's group only; the server container does not mount it.
        json!({"name": "model-key", "secret": {
            "secretName": model.decryption_key_secret_ref.name,
            "items": [{"key": model.decryption_key_secret_ref.key, "path": IDENTITY_FILE}],
            "defaultMode": 0o440,
        }}),
    ];
    if let Some(pvc) = &model.source.pvc {
        mounts.push(json!({"name": "model-source", "mountPath": SOURCE_PATH, "readOnly": true}));
        volumes.push(json!({"name": "model-source", "persistentVolumeClaim": {
            "claimName": pvc.claim_name, "readOnly": true,
        }}));
    }
    if let Some(ca) = &model.source.ca_config_map_ref {
        mounts.push(json!({"name": "model-ca", "mountPath": CA_PATH, "readOnly": true}));
        volumes.push(json!({"name": "model-ca", "configMap": {
            "name": ca.name,
            "items": [{"key": ca.key, "path": CA_FILE}],
            "defaultMode": 0o440,
        }}));
    }
    let init_memory = init_memory(model);
    let init_container = json!({
        "name": INIT_CONTAINER,
        "image": resolved.helper_image,
        "args": decrypt_args(model),
        "resources": {
            "limits": {
                "cpu": INIT_CPU_LIMIT,
                "memory": init_memory,
                "ephemeral-storage": super::HELPER_EPHEMERAL_LIMIT,
            },
            "requests": {
                "cpu": INIT_CPU_REQUEST,
                "memory": init_memory,
                "ephemeral-storage": super::HELPER_EPHEMERAL_REQUEST,
            },
        },
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        // The one-line reason `moat decrypt` writes on failure; Moat shows it in the status.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    ModelPod {
        init_container,
        volumes,
        server_mount: json!({"name": "model", "mountPath": model.mount_path, "readOnly": true}),
    }
}
