//! Builders for the objects tests declare: one place that knows what a minimal valid
//! SecureModelDeployment and ModelClient look like, used by the unit tests, the integration tests
//! in `tests/` and the e2e suite. A test states only what it is about:
//!
//! ```
//! use moat::fixture;
//! let smd = fixture::smd("fraud").namespace("ml").replicas(1).build().expect("valid");
//! assert_eq!(smd.spec.replicas, 1);
//! ```
//!
//! The builders hold the object as JSON, the form `kubectl apply` and server-side apply send, so
//! [`SmdFixture::json`] sets exactly the fields a test named (nothing defaulted by serde), and
//! [`SmdFixture::build`] reads it back through the CRD types as the API server's clients do.

use serde_json::{Map, Value, json};

use crate::api::{ModelClient, SecureModelDeployment};

/// An image reference pinned by digest, so that no registry is asked for it.
pub const IMAGE: &str = "registry.example.com/serving/model-server@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// A SecureModelDeployment `name` with the smallest valid spec: [`IMAGE`] on port 8000 with
/// limits of 1 CPU and 1Gi, and nothing else (no namespace, so an `Api` in a namespace sets it).
pub fn smd(name: &str) -> SmdFixture {
    SmdFixture(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment",
        "metadata": {"name": name},
        "spec": {"server": {"image": IMAGE, "port": 8000,
                            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}}
    }))
}

/// A ModelClient `name` asking for a certificate to call the model `model_name` in
/// `model_namespace`, as ServiceAccount `name`, stored in the Secret `<name>-client`.
pub fn model_client(name: &str, model_namespace: &str, model_name: &str) -> ModelClientFixture {
    ModelClientFixture(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "ModelClient",
        "metadata": {"name": name},
        "spec": {"deploymentRef": {"namespace": model_namespace, "name": model_name},
                 "serviceAccountName": name, "secretName": format!("{name}-client")}
    }))
}

/// A SecureModelDeployment under construction; see [`smd`].
#[derive(Clone, Debug)]
pub struct SmdFixture(Value);

impl SmdFixture {
    /// `metadata.namespace`.
    pub fn namespace(self, namespace: &str) -> Self {
        self.set(&["metadata", "namespace"], json!(namespace))
    }

    /// `metadata.uid`, as the API server assigns it (owner references need one).
    pub fn uid(self, uid: &str) -> Self {
        self.set(&["metadata", "uid"], json!(uid))
    }

    /// `metadata.generation`, as the API server counts spec changes.
    pub fn generation(self, generation: i64) -> Self {
        self.set(&["metadata", "generation"], json!(generation))
    }

    /// `spec.replicas`.
    pub fn replicas(self, replicas: i32) -> Self {
        self.set(&["spec", "replicas"], json!(replicas))
    }

    /// `spec.server.image`.
    pub fn image(self, image: &str) -> Self {
        self.set(&["spec", "server", "image"], json!(image))
    }

    /// `spec.server.port`.
    pub fn port(self, port: i32) -> Self {
        self.set(&["spec", "server", "port"], json!(port))
    }

    /// `spec.server.resources.limits`.
    pub fn limits(self, cpu: &str, memory: &str) -> Self {
        self.set(
            &["spec", "server", "resources", "limits"],
            json!({"cpu": cpu, "memory": memory}),
        )
    }

    /// `spec.access.clients`: the JSON list of client rules.
    pub fn clients(self, clients: Value) -> Self {
        self.set(&["spec", "access", "clients"], clients)
    }

    /// `spec.access.egress`: the JSON list of egress rules.
    pub fn egress(self, egress: Value) -> Self {
        self.set(&["spec", "access", "egress"], egress)
    }

    /// `spec.tls.certificateLifetime`, for example `24h`.
    pub fn certificate_lifetime(self, lifetime: &str) -> Self {
        self.set(&["spec", "tls", "certificateLifetime"], json!(lifetime))
    }

    /// `spec.model`: the JSON model spec (source, digest, key, mount path, size).
    pub fn model(self, model: Value) -> Self {
        self.set(&["spec", "model"], model)
    }

    /// `spec.imagePullSecrets`, by Secret name.
    pub fn image_pull_secrets(self, names: &[&str]) -> Self {
        let refs: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
        self.set(&["spec", "imagePullSecrets"], Value::Array(refs))
    }

    /// Any other field, by its path of JSON keys (`&["spec", "server", "args"]`).
    pub fn set(mut self, path: &[&str], value: Value) -> Self {
        put(&mut self.0, path, value);
        self
    }

    /// The object as JSON: what `kubectl apply` would send.
    pub fn json(&self) -> Value {
        self.0.clone()
    }

    /// The object through the CRD types; an error names a field the types reject.
    pub fn build(&self) -> Result<SecureModelDeployment, serde_json::Error> {
        serde_json::from_value(self.0.clone())
    }
}

/// A ModelClient under construction; see [`model_client`].
#[derive(Clone, Debug)]
pub struct ModelClientFixture(Value);

impl ModelClientFixture {
    /// `metadata.namespace`.
    pub fn namespace(self, namespace: &str) -> Self {
        self.set(&["metadata", "namespace"], json!(namespace))
    }

    /// `metadata.uid`, as the API server assigns it.
    pub fn uid(self, uid: &str) -> Self {
        self.set(&["metadata", "uid"], json!(uid))
    }

    /// `spec.serviceAccountName`: the identity in the certificate.
    pub fn service_account(self, name: &str) -> Self {
        self.set(&["spec", "serviceAccountName"], json!(name))
    }

    /// `spec.secretName`: where the certificate is stored.
    pub fn secret(self, name: &str) -> Self {
        self.set(&["spec", "secretName"], json!(name))
    }

    /// `spec.certificateLifetime`, for example `24h`.
    pub fn certificate_lifetime(self, lifetime: &str) -> Self {
        self.set(&["spec", "certificateLifetime"], json!(lifetime))
    }

    /// Any other field, by its path of JSON keys.
    pub fn set(mut self, path: &[&str], value: Value) -> Self {
        put(&mut self.0, path, value);
        self
    }

    /// The object as JSON: what `kubectl apply` would send.
    pub fn json(&self) -> Value {
        self.0.clone()
    }

    /// The object through the CRD types; an error names a field the types reject.
    pub fn build(&self) -> Result<ModelClient, serde_json::Error> {
        serde_json::from_value(self.0.clone())
    }
}

/// Sets `value` at `path`, creating objects on the way (and replacing anything that is not one).
fn put(target: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *target = value;
        return;
    };
    let mut here = target;
    for key in parents {
        if !here.is_object() {
            *here = Value::Object(Map::new());
        }
        let Value::Object(map) = here else { return };
        here = map
            .entry((*key).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !here.is_object() {
        *here = Value::Object(Map::new());
    }
    if let Value::Object(map) = here {
        map.insert((*last).to_string(), value);
    }
}

/// What breaks a rule of the Pod Security "restricted" profile (pod-security-admission,
/// "latest") or one of Moat's own (local disk requested and bounded, no service links, ...), for
/// the property tests and the `smd_render` fuzz target: empty when the pod passes.
pub fn restricted_violations(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
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
    if psc.run_as_user == Some(0) {
        v.push("pod runAsUser 0".into());
    }
    for id in [psc.run_as_user, psc.run_as_group, psc.fs_group] {
        if id.is_none_or(|id| id < 10000) {
            v.push(format!("pod UID/GID {id:?} below 10000"));
        }
    }
    let containers: Vec<&k8s_openapi::api::core::v1::Container> = pod
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
        // Moat's own rule (scanners ask for it): local disk requested and bounded.
        let res = c.resources.clone().unwrap_or_default();
        for (what, q) in [("requests", &res.requests), ("limits", &res.limits)] {
            if !q
                .as_ref()
                .is_some_and(|q| q.contains_key("ephemeral-storage"))
            {
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
        // Moat's own rules on top of the profile.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimal_objects_are_valid_and_carry_what_was_set() {
        let smd = smd("fraud")
            .namespace("ml")
            .generation(3)
            .replicas(1)
            .clients(json!([{"namespace": "payments", "serviceAccounts": ["checkout"]}]))
            .certificate_lifetime("24h")
            .image_pull_secrets(&["pull"])
            .build()
            .expect("valid SMD");
        assert_eq!(smd.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(smd.metadata.generation, Some(3));
        assert_eq!(smd.spec.replicas, 1);
        assert_eq!(smd.spec.server.image, IMAGE);
        assert_eq!(smd.spec.access.clients.len(), 1);
        assert_eq!(smd.spec.image_pull_secrets.len(), 1);
        let mc = model_client("checkout", "ml", "fraud")
            .namespace("payments")
            .build()
            .expect("valid ModelClient");
        assert_eq!(mc.spec.service_account_name, "checkout");
        assert_eq!(mc.spec.secret_name, "checkout-client");
        assert_eq!(mc.spec.deployment_ref.namespace, "ml");
    }

    #[test]
    fn json_holds_only_what_was_named_and_set_replaces_non_objects() {
        let v = smd("m").json();
        assert!(v["spec"].get("replicas").is_none(), "{v}");
        assert!(v["spec"].get("access").is_none(), "{v}");
        let v = smd("m")
            .set(&["spec", "server"], json!("x"))
            .set(&["spec", "server", "port"], json!(9000))
            .json();
        assert_eq!(v["spec"]["server"], json!({"port": 9000}));
        assert!(
            smd("m")
                .set(&["spec", "server"], json!(null))
                .build()
                .is_err()
        );
    }
}
