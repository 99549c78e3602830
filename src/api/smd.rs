//! `SecureModelDeployment`: a model server that Moat turns into a hardened workload.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Regular expression for an image reference: `[registry[:port]/]repository[:tag][@sha256:<hex>]`
/// (the grammar of the distribution reference library, lower-case repository paths).
pub const IMAGE_REFERENCE_PATTERN: &str = r"^((([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(\.([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(:[0-9]+)?/)?[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// Regular expression for an environment variable name Moat accepts (a C identifier).
pub const ENV_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// Prefix of the environment variables Moat injects itself; users may not set them.
pub const RESERVED_ENV_PREFIX: &str = "MOAT_";

/// Longest SecureModelDeployment name: children are named `<name>-<suffix>` and the Service name
/// must stay a DNS-1035 label.
pub const MAX_NAME_LENGTH: usize = 50;

/// Regular expression for a DNS-1123 label (namespace names).
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A model server that Moat runs as a hardened workload: a dedicated ServiceAccount without API
/// access, pods that pass Pod Security "restricted", default-deny NetworkPolicies, a ClusterIP
/// Service and a PodDisruptionBudget. Moat repairs any change made to what it generated.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "SecureModelDeployment",
    namespaced,
    shortname = "smd",
    category = "moat",
    status = "SecureModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A model server that Moat runs as a hardened workload and keeps that way.",
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Whether every replica runs the current spec and is ready"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.readyReplicas", description = "Ready replicas"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.image.pinned", description = "Image in the pod template, pinned by digest"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revisions.serving.revision", description = "The revision the pods run (see `kubectl get modelrevisions`)"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter) of at most 50 characters, because Moat names the Service after it")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.imagePolicy) || self.imagePolicy != 'RequireDigest' || self.server.image.contains('@sha256:')").message("spec.imagePolicy is RequireDigest: spec.server.image must name a digest (repository@sha256:<digest>)"))]
#[x_kube(validation = Rule::new("!has(oldSelf.approval) || oldSelf.approval.required == 0 || (has(self.approval) && self.approval.required >= oldSelf.approval.required)").message("spec.approval.required cannot be lowered or removed: the change would switch off the two-person control meant to check it; delete and recreate the SecureModelDeployment to lower it (or have a cluster admin do so)"))]
pub struct SecureModelDeploymentSpec {
    /// Number of model server pods. Defaults to 2; with 2 or more Moat adds a
    /// PodDisruptionBudget so voluntary disruptions keep at least one pod serving.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,

    /// The model server container.
    pub server: ServerSpec,

    /// Who may call the model and what the model may call. Everything else is denied by
    /// NetworkPolicy.
    #[serde(default)]
    pub access: AccessSpec,

    /// The model's mutual-TLS certificate, issued by Moat's CA and mounted into the pods.
    #[serde(default)]
    pub tls: TlsSpec,

    /// The model weights, kept encrypted at rest (age format). An init container running
    /// `moat decrypt` streams the artifact, verifies its SHA-256, decrypts it into a
    /// memory-backed volume and exits; the server then mounts that volume read-only at
    /// `mountPath`. The decryption key is mounted into the init container only. Any failure
    /// (wrong key, changed or truncated artifact, digest mismatch, unsafe archive, too large)
    /// stops the pod before the server starts, and the reason appears in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,

    /// How `spec.server.image` becomes the digest the pods run. `Resolve` (default): a tag is
    /// resolved in the registry once, when the image changes or the annotation
    /// `moat.dev/resolve-image` gets a new value, and the pods get `repository@sha256:...`.
    /// `RequireDigest`: the image must already name a digest; tags are rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_policy: Option<ImagePolicy>,

    /// Secrets of type `kubernetes.io/dockerconfigjson` in this namespace: Moat reads the
    /// credentials for the image's registry from them (the first Secret with an entry for that
    /// registry wins) to resolve the tag, and the pods get them as `imagePullSecrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub image_pull_secrets: Vec<SecretRef>,

    /// Where the model's pods may run: the nodes (selector, tolerations, node affinity), their
    /// PriorityClass, and their RuntimeClass (a sandbox such as gVisor or Kata for models you do
    /// not fully trust).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,

    /// Moat's gate: a sidecar in every model pod that terminates mTLS on the serving port and
    /// lets through only callers this model consented to (a client certificate from Moat's CA
    /// whose ServiceAccount is listed in `access.clients` and holds a ModelClient for this model),
    /// within the limits below; it writes one audit line per request and can quarantine the
    /// model. On by default; the model server then listens on `127.0.0.1:<server.port>` in plain
    /// HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,

    /// How a new revision rolls out, how long Moat waits for it, and how many past revisions
    /// (ModelRevision objects) it keeps. A new revision whose pods fail to decrypt the model,
    /// crash-loop, or are not ready within `progressDeadlineSeconds` is rolled back to the last
    /// known-good revision: the spec is left as it is, and the status says Stalled, reason
    /// `RolledBack`, until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// Two-person control: a new revision (new image, weights or anything else in the pods) goes
    /// live only after `required` users approved it with a ModelApproval naming its exact digests;
    /// until then the pods keep running the previous revision (a first revision waits with no
    /// pods), and the status says what is awaited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

/// Two-person approval of new revisions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalSpec {
    /// How many different users, none of them the revision's author, must approve a new
    /// revision. 0 turns approval off. Once above 0 it can be raised but not lowered or removed
    /// (the API server refuses such a change).
    #[schemars(range(min = 0, max = 5))]
    pub required: i32,

    /// How long an approval counts after it was given, a duration such as `24h` (default). An
    /// approval that expired before the revision went live does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('1m') && duration(self) <= duration('720h')").message("validFor must be a duration such as 24h or 90m, between 1m and 720h"))]
    #[schemars(length(min = 2, max = 32))]
    pub valid_for: Option<String>,
}

/// Rollout of new revisions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Seconds a rollout of a new revision may go without progress (the Deployment's
    /// `progressDeadlineSeconds`: a replica becoming ready is progress) before Moat rolls back to
    /// the last known-good revision. Defaults to 600. Give a slow model load room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: Option<i32>,

    /// How many ModelRevisions Moat keeps for this model, the current and the last known-good
    /// always among them. Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 100))]
    pub revision_history_limit: Option<i32>,
}

/// The gate in front of the model server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.port) || self.port != 15081 && self.port != 15090").message("gate.port 15081 and 15090 are the gate's health and metrics ports"))]
pub struct GateSpec {
    /// `Enforce` (default): every request passes the gate. `Disabled`: no gate; the model
    /// server gets the serving port and certificate and must enforce identity itself (its
    /// status then says the endpoint is not enforced by Moat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<GateMode>,

    /// Port the gate listens on in the pod; the Service's port forwards to it. Defaults to
    /// 15443. Must differ from `server.port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// What the model server speaks on loopback: `HTTP1` (default; HTTP/2 clients are served
    /// too) or `HTTP2` (cleartext, for gRPC servers such as Triton's KServe v2 endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<GateUpstreamProtocol>,

    /// Limits on every request. Going over one is answered at once with 413, 404, 405 or 429
    /// and a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<GateLimits>,

    /// Record the SHA-256 of every request body in the audit log (sizes are always recorded;
    /// bodies never are).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_body_hash: bool,

    /// Quarantine from the spec: the gate refuses every request and closes every open
    /// connection, the NetworkPolicy denies all ingress, and the pods keep running for
    /// forensics. The annotation `moat.dev/quarantine: <reason>` does the same without a
    /// change to the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineSpec>,
}

/// Whether the gate runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// The gate enforces identity, limits, audit and quarantine.
    Enforce,
    /// No gate: the model server alone guards its endpoint.
    Disabled,
}

/// The model server's protocol behind the gate.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateUpstreamProtocol {
    /// HTTP/1.1.
    #[serde(rename = "HTTP1")]
    Http1,
    /// HTTP/2 without TLS (prior knowledge), for gRPC.
    #[serde(rename = "HTTP2")]
    Http2,
}

/// The gate's limits; each unset field has a safe default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GateLimits {
    /// Largest request body, a quantity such as `16Mi` (the default). Larger: 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub max_request_bytes: Option<String>,

    /// Methods allowed (default GET, HEAD and POST). Others: 405.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(m, m in ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'])").message("methods must be HTTP methods in upper case"))]
    #[schemars(length(max = 7))]
    pub methods: Vec<String>,

    /// Paths allowed: exact (`/v1/models`) or a prefix ending in `*` (`/v1/*`). Default: every
    /// path. Others: 404. Paths with dot segments or encoded separators are always refused (400).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(p, p.startsWith('/') && !p.contains('..') && (!p.contains('*') || (p.endsWith('*') && p.indexOf('*') == size(p) - 1)))").message("paths must start with / and may only end in *"))]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub paths: Vec<String>,

    /// Requests per second one caller (identity) may make on average, per gate (pod). Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: Option<i32>,

    /// Requests one caller may make at once above that rate. Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<i32>,

    /// Requests one caller may have in flight at once, per gate. Default 64. More: 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent_requests: Option<i32>,

    /// Seconds a client has for the TLS handshake and a request's headers. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub header_timeout_seconds: Option<i32>,

    /// Seconds a connection may stay open with no request in flight. Default 300. A request in
    /// flight, a long stream included, is never cut by a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub idle_timeout_seconds: Option<i32>,
}

/// A quarantine and why.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineSpec {
    /// Why, for the refusals, the audit log and the status (for example an incident number).
    #[schemars(length(min = 1, max = 256))]
    pub reason: String,
}

/// Where the model's pods run. Every field is passed to the pod template as is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Labels a node must carry to run the pods, for example `nvidia.com/gpu.present: "true"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the pods tolerate, for example `nvidia.com/gpu` with effect `NoSchedule` on GPU
    /// nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,

    /// Node affinity, as in a pod's `affinity.nodeAffinity`: required and preferred node
    /// selector terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<k8s_openapi::api::core::v1::NodeAffinity>,

    /// PriorityClass of the pods, which decides who is preempted when the cluster is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("priorityClassName must be a PriorityClass name (a DNS-1123 subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// RuntimeClass of the pods, for example `gvisor` or `kata`: a sandboxed runtime that puts
    /// another kernel boundary between the model server and the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("runtimeClassName must be a RuntimeClass name (a DNS-1123 subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
}

/// How images are pinned.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ImagePolicy {
    /// Resolve a tag to its digest in the registry and pin it.
    #[default]
    Resolve,
    /// Accept only images that already name a digest.
    RequireDigest,
}

/// A Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("name must be a Secret name (a DNS-1123 subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Rule (CEL) for a certificate lifetime: a Go duration of hours, minutes and seconds between
/// 30 seconds and 90 days.
pub const LIFETIME_RULE: &str = "self.matches('^([0-9]+(h|m|s))+$') && duration(self) >= duration('30s') && duration(self) <= duration('2160h')";

/// Shortest certificate lifetime Moat accepts.
pub const MIN_CERTIFICATE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest certificate lifetime Moat accepts (90 days).
pub const MAX_CERTIFICATE_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(2160 * 3600);

/// The serving certificate of the model. Moat issues it from its own CA for the Service's DNS
/// names and the SPIFFE ID of the model's ServiceAccount, stores it in the Secret `<name>-tls`
/// (`tls.crt`, `tls.key`, `ca.crt`), mounts that read-only at `/var/run/moat/tls` and names the
/// files in `MOAT_TLS_CERT_FILE`, `MOAT_TLS_KEY_FILE` and `MOAT_TLS_CA_FILE`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Lifetime of the serving certificate, a duration such as `24h` or `90m` (30s to 2160h).
    /// Moat renews it at two thirds of its lifetime. Defaults to 24h.
    #[serde(default = "default_certificate_lifetime")]
    #[x_kube(validation = Rule::new(LIFETIME_RULE).message("certificateLifetime must be a duration of hours, minutes and seconds such as 24h or 90m, between 30s and 2160h"))]
    #[schemars(length(min = 2, max = 32))]
    pub certificate_lifetime: String,

    /// Set true when the model server reloads its certificate files when they change. Otherwise
    /// (the default) Moat rolls the pods when the certificate or the CA bundle changes, because
    /// most servers read their certificate only at start.
    #[serde(default)]
    pub reloads_certificates: bool,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            certificate_lifetime: default_certificate_lifetime(),
            reloads_certificates: false,
        }
    }
}

/// Encrypted model weights and where the server finds them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the encrypted artifact comes from: an HTTPS URL or a PersistentVolumeClaim.
    pub source: ModelSource,

    /// SHA-256 of the encrypted artifact (the `.age` file), 64 lower-case hex digits, as
    /// `sha256sum` prints it. Checked while streaming, before anything becomes visible to the
    /// server.
    #[x_kube(validation = Rule::new("self.matches('^[a-f0-9]{64}$')").message("sha256 must be 64 lower-case hex digits (sha256sum of the encrypted artifact)"))]
    #[schemars(length(min = 64, max = 64))]
    pub sha256: String,

    /// The key of a Secret in this namespace holding the age identity
    /// (`AGE-SECRET-KEY-1...`, as `moat keygen` writes it) that decrypts the artifact. Mounted
    /// into the decrypting init container only, never into the model server.
    pub decryption_key_secret_ref: KeyRef,

    /// Absolute path where the model server finds the decrypted model (read-only), for example
    /// `/models/fraud`. Not `/`, `/tmp` or under `/var/run/moat`.
    #[x_kube(validation = Rule::new("self.startsWith('/') && self != '/' && !self.contains('/../') && !self.endsWith('/..') && !self.contains(':')").message("mountPath must be an absolute path without '..' or ':', and not '/'"))]
    #[x_kube(validation = Rule::new("self != '/tmp' && !self.startsWith('/tmp/') && self != '/var/run/moat' && !self.startsWith('/var/run/moat/')").message("mountPath must not be /tmp or under /var/run/moat, where Moat mounts its own volumes"))]
    #[schemars(length(min = 2, max = 256))]
    pub mount_path: String,

    /// Size limit of the memory-backed volume the model is decrypted into, such as `20Gi`;
    /// extraction stops with an error past it. The plaintext is charged to the memory of the pod:
    /// the init container's memory is `sizeLimit` plus 256Mi, and `server.resources.limits.memory`
    /// must be at least `sizeLimit` plus 256Mi (a smaller limit is refused as InvalidSpec).
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("sizeLimit must be a positive quantity such as 20Gi"))]
    #[schemars(length(max = 64))]
    pub size_limit: String,

    /// Crypto-shredding: when true, Moat makes this SecureModelDeployment an owner of the key
    /// Secret, so deleting the SecureModelDeployment makes the garbage collector delete the key,
    /// and the artifact at rest can no longer be decrypted by anyone. Default false.
    #[serde(default)]
    pub delete_key_with_deployment: bool,
}

/// Where an encrypted model artifact is read from. Exactly one of `url` and `pvc`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.pvc)").message("set exactly one of url and pvc"))]
#[x_kube(validation = Rule::new("!has(self.caConfigMapRef) || has(self.url)").message("caConfigMapRef applies only to a url source"))]
pub struct ModelSource {
    /// HTTPS URL of the encrypted artifact. The server's certificate is verified (system roots,
    /// plus `caConfigMapRef`); plain HTTP is refused. Allow the destination in
    /// `spec.access.egress`, the only way out of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') && size(self) > 8").message("url must start with https://"))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,

    /// A key of a ConfigMap in this namespace with PEM CA certificates to trust for `url`
    /// besides the system roots (a private artifact server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map_ref: Option<KeyRef>,

    /// A PersistentVolumeClaim in this namespace holding the artifact, mounted read-only into
    /// the init container only. Its StorageClass must be one the platform team declared
    /// encrypted (operator flag `--encrypted-storage-classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
}

/// An artifact on a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("claimName must be a DNS-1123 subdomain"))]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,

    /// Path of the artifact inside the volume, relative, for example `models/fraud-v3.tar.age`.
    #[x_kube(validation = Rule::new("!self.startsWith('/') && self != '..' && !self.startsWith('../') && !self.contains('/../') && !self.endsWith('/..')").message("path must be relative to the volume and must not contain '..'"))]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
}

/// Default certificate lifetime: 24 hours.
pub fn default_certificate_lifetime() -> String {
    "24h".into()
}

fn default_replicas() -> i32 {
    2
}

/// The model server container. Moat adds the hardened security context itself; it cannot be
/// weakened from here.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Container image of the model server: `registry/repository:tag` or
    /// `registry/repository@sha256:<digest>`.
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", IMAGE_REFERENCE_PATTERN.replace('\\', "\\\\"))).message("image must be a valid image reference such as registry.example.com/team/server:v1 or ...@sha256:<64 hex digits>"))]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Entrypoint override. Passed to the container runtime as an argument vector, never to a
    /// shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 4096)))]
    pub command: Option<Vec<String>>,

    /// Arguments to the model server. Passed as an argument vector, never to a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), inner(length(max = 4096)))]
    pub args: Vec<String>,

    /// Environment variables of the model server, each a literal value or a reference to a
    /// key of a Secret or ConfigMap in the same namespace. Names are unique; names starting with
    /// `MOAT_` are reserved for what Moat injects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<EnvVar>,

    /// TCP port the model server listens on inside the pod. The pods run without capabilities,
    /// so ports below 1024 are not allowed.
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Compute resources. Limits for cpu and memory are required.
    pub resources: Resources,

    /// How Kubernetes decides a pod is ready to serve. Without it, a TCP connection to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,

    /// How Kubernetes decides the server has started: a model server may load weights for many
    /// minutes, and liveness is checked only after this succeeds. Without it, a TCP connection
    /// to `port` every 10 s for up to 30 minutes (`failureThreshold` 180); fields you set
    /// replace those defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,

    /// How Kubernetes decides the server hangs, and restarts it. Without it, a TCP connection to
    /// `port` every 20 s, restarting after 3 failures in a row; fields you set replace those
    /// defaults. Behind mTLS use TCP (the kubelet has no client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,

    /// Size of a memory-backed `/dev/shm` for the server, for example `2Gi`: vLLM and PyTorch
    /// share tensors between processes through it, and the container runtime's default is
    /// 64Mi. It is charged to the pod's memory, so `resources.limits.memory` must hold it too
    /// (with the decrypted model and 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("sharedMemory must be a positive quantity such as 1Gi"))]
    #[schemars(length(max = 64))]
    pub shared_memory: Option<String>,

    /// Keys of Secrets in the SecureModelDeployment's namespace, mounted into the server as
    /// read-only files (mode 0440: the server's group reads them, nobody writes them), for
    /// example a Hugging Face token at `/var/run/secrets/hf/token`. Prefer this to an
    /// environment variable from a Secret: a file is not inherited by every process the server
    /// starts, is not in the environment a crash report or `/proc/<pid>/environ` shows, and
    /// follows a rotated Secret without a restart. Each path's directory becomes a read-only
    /// directory holding only the files listed for it, hiding what the image had there, so give
    /// the files a directory of their own: not `/`, a top-level system directory, `/tmp`,
    /// `/dev`, `/proc`, `/sys`, under `/var/run/moat`, or the model's mountPath.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["path"]))]
    pub secret_files: Vec<SecretFile>,
}

/// A key of a Secret, mounted into the model server as a read-only file.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretFile {
    /// Absolute path of the file in the server container, for example
    /// `/var/run/secrets/hf/token`.
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.endsWith('/') && !self.contains('//') && !self.contains('/./') && !self.contains('/../') && !self.endsWith('/.') && !self.endsWith('/..') && !self.contains(':')").message("path must be an absolute file path without '.', '..', '//', ':' or a trailing '/'"))]
    #[schemars(length(min = 2, max = 256))]
    pub path: String,
    /// Name of the Secret, in the SecureModelDeployment's namespace.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("secretName must be a DNS-1123 subdomain"))]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key within the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("key may contain only letters, digits, '-', '_' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// An environment variable of the model server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)").message("set exactly one of value and valueFrom"))]
pub struct EnvVar {
    /// Name of the variable: a C identifier not starting with `MOAT_`.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*$')").message("env name must be a C identifier: letters, digits and '_', not starting with a digit"))]
    #[x_kube(validation = Rule::new("!self.startsWith('MOAT_')").message("env names starting with MOAT_ are reserved for variables Moat injects"))]
    #[schemars(length(min = 1, max = 128))]
    pub name: String,

    /// Literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub value: Option<String>,

    /// Value taken from a key of a Secret or ConfigMap in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)").message("set exactly one of secretKeyRef and configMapKeyRef"))]
pub struct EnvVarSource {
    /// A key of a Secret in the SecureModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// A key of a ConfigMap in the SecureModelDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

/// A key of an object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("name must be a DNS-1123 subdomain"))]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within it.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message("key may contain only letters, digits, '-', '_' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Compute resources of the model server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.requests) || !has(self.requests.cpu) || quantity(self.requests.cpu).compareTo(quantity(self.limits.cpu)) <= 0").message("resources.requests.cpu must not exceed resources.limits.cpu"))]
#[x_kube(validation = Rule::new("!has(self.requests) || !has(self.requests.memory) || quantity(self.requests.memory).compareTo(quantity(self.limits.memory)) <= 0").message("resources.requests.memory must not exceed resources.limits.memory"))]
pub struct Resources {
    /// Upper bounds; both cpu and memory are required.
    pub limits: ResourceLimits,
    /// What the scheduler reserves. Each defaults to the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceRequests>,

    /// Extended resources such as accelerators, as `vendor-domain/name: count`, for example
    /// `nvidia.com/gpu: 1` or `amd.com/gpu: 2`. Whole numbers from 1 to 1024; Kubernetes
    /// requires an extended resource's request to equal its limit, so Moat sets both.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extended: BTreeMap<String, i64>,
}

/// Resource limits (Kubernetes quantities such as `500m`, `4`, `16Gi`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLimits {
    /// CPU limit, for example `4` or `1500m`.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("cpu must be a positive quantity such as 500m or 4"))]
    #[schemars(length(max = 64))]
    pub cpu: String,
    /// Memory limit, for example `16Gi`.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("memory must be a positive quantity such as 512Mi or 16Gi"))]
    #[schemars(length(max = 64))]
    pub memory: String,
    /// Local disk the server may use: its logs and the writable `/tmp` (256Mi). At least
    /// 320Mi; default 1Gi. Beyond it the kubelet evicts the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("ephemeralStorage must be a positive quantity such as 1Gi"))]
    #[schemars(length(max = 64))]
    pub ephemeral_storage: Option<String>,
}

/// Resource requests (Kubernetes quantities).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequests {
    /// CPU request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("cpu must be a positive quantity such as 500m or 4"))]
    #[schemars(length(max = 64))]
    pub cpu: Option<String>,
    /// Memory request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("memory must be a positive quantity such as 512Mi or 16Gi"))]
    #[schemars(length(max = 64))]
    pub memory: Option<String>,
    /// Local disk the scheduler reserves for the server. Default 256Mi (or the limit, if
    /// lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("ephemeralStorage must be a positive quantity such as 256Mi"))]
    #[schemars(length(max = 64))]
    pub ephemeral_storage: Option<String>,
}

/// A probe against the serving port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Probe with an HTTP GET; without it, a TCP connection to the serving port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    /// Seconds after the container starts before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,
    /// Seconds between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub period_seconds: Option<i32>,
    /// Seconds after which a probe times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: Option<i32>,
    /// Consecutive failures before the pod is marked not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: Option<i32>,
}

/// An HTTP GET against the serving port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetProbe {
    /// Path to request, starting with `/`.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("httpGet.path must start with '/'"))]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// `HTTP` or `HTTPS`. Defaults to `HTTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<ProbeScheme>,
}

/// Scheme of an HTTP probe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeScheme {
    /// Plain HTTP.
    Http,
    /// HTTPS (the certificate is not verified by the kubelet).
    Https,
}

/// Network access of the model pods. Without entries, nothing may call the model and the model
/// may call nothing but cluster DNS.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// Pods allowed to call the model on its serving port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub clients: Vec<ClientRule>,
    /// Destinations the model may call, besides cluster DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub egress: Vec<EgressRule>,
}

/// Pods allowed to call the model: pods in `namespace`, optionally only those matching
/// `podSelector`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientRule {
    /// Namespace of the client pods.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("namespace must be a DNS-1123 label"))]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Labels the client pods must carry (all of them). Without it, every pod in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub pod_selector: Option<BTreeMap<String, String>>,
    /// ServiceAccounts in `namespace` that may obtain a client certificate for this model with a
    /// ModelClient. Without entries the namespace has network access only and gets no
    /// certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(sa, sa.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'))").message("serviceAccounts must be ServiceAccount names (DNS-1123 subdomains)"))]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub service_accounts: Vec<String>,
}

/// A destination the model may call.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cidr) != has(self.namespace)").message("set exactly one of cidr and namespace"))]
#[x_kube(validation = Rule::new("!has(self.podSelector) || has(self.namespace)").message("podSelector requires namespace"))]
pub struct EgressRule {
    /// An IP block outside the cluster, for example `10.20.0.0/16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be an IPv4 or IPv6 CIDR such as 10.20.0.0/16"))]
    #[schemars(length(max = 64))]
    pub cidr: Option<String>,
    /// A namespace in the cluster whose pods the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("namespace must be a DNS-1123 label"))]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// With `namespace`: only pods carrying these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub pod_selector: Option<BTreeMap<String, String>>,
    /// Destination ports. At least one: Moat never opens every port.
    #[schemars(length(min = 1, max = 16), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
    /// Transport protocol of the ports. Defaults to TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Transport protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// Observed state, written only by Moat. Follows kstatus: `observedGeneration` and the
/// conditions `Ready`, `Reconciling` and `Stalled`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecureModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (every replica runs the current spec and is ready), `Reconciling` (Moat is
    /// converging the children or the rollout is progressing) and `Stalled` (Moat cannot make
    /// progress without a change, for example an invalid spec). Abnormal-true for the last two.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Pods of the model Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// Pods of the model Deployment that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Pods that run the current pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,

    /// The image the pods run: what the spec asked for and the digest Moat pinned it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStatus>,

    /// Changes to generated objects made by someone else and reverted by Moat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftStatus>,

    /// The serving certificate Moat issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,

    /// Whether Moat's gate guards the endpoint, and what it enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,

    /// The model's revisions (ModelRevision objects): the one the spec asks for, the one the
    /// pods run, the last known-good, and a failed one Moat rolled back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionsStatus>,
}

/// Where the model's revisions stand.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RevisionsStatus {
    /// The revision the current spec renders to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<RevisionRef>,
    /// The revision in the Deployment's pod template: the current one, or the last known-good
    /// after a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<RevisionRef>,
    /// The last revision that had every replica ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_known_good: Option<RevisionRef>,
    /// A revision that failed (and was rolled back from, when a known-good one existed). Kept
    /// while the spec still asks for it; a changed spec goes out normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<FailedRevision>,
    /// How many ModelRevisions Moat keeps for this model now.
    #[serde(default)]
    pub history: i32,
    /// The last revision that had the approvals `spec.approval` requires (it may go live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<RevisionRef>,
    /// What the current revision awaits before it goes live (two-person approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<AwaitingApproval>,
}

/// A revision waiting for approvals.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AwaitingApproval {
    /// The revision.
    pub revision: RevisionRef,
    /// Approvals required.
    pub required: i32,
    /// Users whose approvals count so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
}

/// One revision, by name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRef {
    /// Name of the ModelRevision.
    pub name: String,
    /// Its revision number.
    pub revision: i64,
    /// Its pod template's hash.
    pub template_hash: String,
}

/// A revision whose rollout failed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailedRevision {
    /// The revision.
    pub revision: RevisionRef,
    /// Why: `ModelDecryptionFailed`, `CrashLoop` or `ProgressDeadlineExceeded`.
    pub reason: String,
    /// What failed, in one line.
    pub message: String,
    /// When Moat found the failure.
    pub at: Time,
    /// The SecureModelDeployment's `metadata.generation` the failure was found at: while the
    /// spec stays at it, the pods stay on the last known-good revision, even when Moat's own
    /// inputs (a renewed certificate, a new helper image) change the failed template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// What guards the model's endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// True when Moat's gate enforces identity, limits, audit and quarantine; false when
    /// `spec.gate.mode` is `Disabled` and the model server alone guards its endpoint.
    pub enforced: bool,
    /// One line for people: what guards the endpoint.
    pub message: String,
    /// Client identities (SPIFFE IDs) the gate lets through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Why the model is quarantined, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// SHA-256 of the policy last given to the gate (tells Moat's own policy changes from
    /// someone else's edits of the policy ConfigMap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
}

/// The pinned image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// `spec.server.image` when it was pinned.
    pub requested: String,
    /// The reference in the pod template: `registry/repository@sha256:<digest>`.
    pub pinned: String,
    /// When the tag was resolved in the registry (absent when the spec already named a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Time>,
    /// The value of the annotation `moat.dev/resolve-image` honoured by the last resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_request: Option<String>,
    /// Moat's own image in the `decrypt-model` init container, pinned by digest (only with
    /// `spec.model`). When an operator upgrade changes it, the rollout is Moat's own update, not
    /// drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper: Option<String>,
}

/// A certificate Moat issued and keeps renewed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The Secret holding `tls.crt`, `tls.key` and `ca.crt`.
    pub secret_name: String,
    /// Serial number of the certificate, hex.
    pub serial: String,
    /// When the certificate expires.
    pub not_after: Time,
    /// When Moat renews it (two thirds into its lifetime).
    pub renew_at: Time,
    /// Hash of the certificate and the trust bundle written beside it (as the pod template's
    /// `moat.dev/tls-hash` annotation carries it). When Moat itself changes either (a renewal,
    /// a CA rotation, expired CAs pruned from the bundle), the objects that follow are updated,
    /// not counted as drift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hash: Option<String>,
}

/// Drift repairs of one SecureModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DriftStatus {
    /// How many times Moat reverted a change to, or recreated, one of the generated objects.
    pub repairs: i64,
    /// The most recent repair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair: Option<DriftRepair>,
}

/// One drift repair.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftRepair {
    /// Kind of the repaired object.
    pub kind: String,
    /// Name of the repaired object.
    pub name: String,
    /// What had changed, for example `deleted`, `changed spec.template.spec.containers` or
    /// `fields set by kubectl-edit: spec.template.spec.hostNetwork`.
    pub change: String,
    /// When Moat repaired it.
    pub at: Time,
}
