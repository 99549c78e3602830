//! Pure rendering: `(SecureModelDeployment, Facts) -> Children`. No client, no clock, no
//! randomness: the same input always produces byte-identical children, so `moat render` output
//! is stable for review and GitOps diffs, and the operator applies exactly what it shows.

mod client_secret;
mod deployment;
pub mod gate;
pub mod model;
mod network_policy;
mod pdb;
pub mod scanners;
mod service;
mod service_account;
mod tls_secret;
pub mod validate;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::SecureModelDeployment;

pub use client_secret::{MODEL_CLIENT_LABEL, client_secret};
pub use tls_secret::secret_name as tls_secret_name;
pub use validate::{
    ValidationError, approval_validity, certificate_lifetime, is_dns1123_label,
    is_dns1123_subdomain, validate,
};

/// Where the serving certificate Secret is mounted in the model pods.
pub const TLS_MOUNT_PATH: &str = "/var/run/moat/tls";
/// Pod-template annotation with a hash of the certificate and CA bundle: a new certificate rolls
/// the pods unless `spec.tls.reloadsCertificates` is set.
pub const TLS_HASH_ANNOTATION: &str = "moat.dev/tls-hash";

/// The serving certificate the reconciler issued (or kept) for a SecureModelDeployment, and the
/// trust bundle. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingTls {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// CA certificates to trust for clients (and that signed the certificate), PEM.
    pub ca_bundle_pem: String,
}

impl std::fmt::Debug for ServingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingTls")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_bundle_pem", &self.ca_bundle_pem)
            .finish()
    }
}

impl ServingTls {
    /// Stand-ins for offline renders (`moat render`): the operator issues the real certificate.
    pub fn placeholder() -> Self {
        let text = "<issued by the Moat operator at reconcile>".to_string();
        Self {
            cert_pem: text.clone(),
            key_pem: text.clone(),
            ca_bundle_pem: text,
        }
    }

    /// Hash of what the pods load at start: the certificate and the CA bundle.
    pub fn hash(&self) -> String {
        let mut data = self.cert_pem.clone().into_bytes();
        data.extend_from_slice(self.ca_bundle_pem.as_bytes());
        crate::pki::sha256_hex(&data)[..16].to_string()
    }
}

/// What the reconciler dereferenced for one SecureModelDeployment (from the API server, its CA
/// and the registry): the inputs of rendering that are not in the object itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The serving certificate.
    pub tls: ServingTls,
    /// The server image the pods run, `repository@sha256:...` once pinned.
    pub image: String,
    /// Moat's own image for the decrypting init container and the gate, pinned like `image`.
    pub helper_image: String,
    /// The client identities (SPIFFE IDs) the gate lets through: each ModelClient for this
    /// model that its `spec.access.clients` consents to.
    pub gate_identities: std::collections::BTreeSet<String>,
    /// Why the model is quarantined ([`gate::quarantine`]), if it is.
    pub quarantine: Option<String>,
}

/// Moat's own image, used for helper containers when the operator is not told otherwise
/// (`--helper-image`).
pub const DEFAULT_HELPER_IMAGE: &str = concat!("ghcr.io/moat-dev/moat:", env!("CARGO_PKG_VERSION"));

impl Resolved {
    /// Inputs for offline renders (`moat render`): placeholder certificate data, and the image
    /// as the spec names it, normalised to `repository@digest` when it names a digest. A tag is
    /// left as written: only the operator asks the registry.
    pub fn offline(smd: &SecureModelDeployment) -> Self {
        let image = &smd.spec.server.image;
        let image = match crate::image::parse(image) {
            Ok(r) => match r.digest() {
                Some(d) => crate::image::pinned(&r, d),
                None => image.clone(),
            },
            Err(_) => image.clone(),
        };
        Self {
            tls: ServingTls::placeholder(),
            image,
            helper_image: DEFAULT_HELPER_IMAGE.into(),
            gate_identities: std::collections::BTreeSet::new(),
            quarantine: gate::quarantine(smd),
        }
    }
}

/// Label carrying the name of the SecureModelDeployment a child belongs to; also the pod selector.
pub const DEPLOYMENT_LABEL: &str = "moat.dev/deployment";
/// Annotation a member of the break-glass group sets on a child, with the reason, to change or
/// delete it past the chart's ValidatingAdmissionPolicy. Moat records every change it repairs on
/// a child that carries it (a `BreakGlass` Event, `moat_break_glass_total`), then removes it.
pub const BREAK_GLASS_ANNOTATION: &str = "moat.dev/break-glass-reason";
/// `app.kubernetes.io/managed-by` value on every child.
pub const MANAGED_BY: &str = "moat";
/// UID and GID the model server runs as.
pub const RUN_AS_ID: i64 = 10001;
/// Size limit of the writable `/tmp` volume.
pub const TMP_SIZE_LIMIT: &str = "256Mi";
/// The server's local disk (logs and `/tmp`) without `resources.*.ephemeralStorage`.
pub const SERVER_EPHEMERAL_REQUEST: &str = "256Mi";
/// See [`SERVER_EPHEMERAL_REQUEST`].
pub const SERVER_EPHEMERAL_LIMIT: &str = "1Gi";
/// The least `resources.limits.ephemeralStorage`: `/tmp` and 64Mi of logs.
pub const SERVER_EPHEMERAL_FLOOR_MI: u64 = 320;
/// Local disk of Moat's own containers (the decrypting init container, the gate): their logs
/// only (the kubelet rotates them at 10Mi, five files), nothing else is written to disk.
pub const HELPER_EPHEMERAL_REQUEST: &str = "64Mi";
/// See [`HELPER_EPHEMERAL_REQUEST`].
pub const HELPER_EPHEMERAL_LIMIT: &str = "256Mi";
/// Name of the serving port in the pod and the Service.
pub const SERVING_PORT_NAME: &str = "serving";

/// Facts about the cluster and the operator's configuration that rendering depends on.
/// The reconciler reads them; rendering never does I/O.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// Namespace of the cluster DNS pods.
    pub dns_namespace: String,
    /// Labels of the cluster DNS pods.
    pub dns_pod_labels: BTreeMap<String, String>,
    /// The platform team's placement for every model: each field applies where the model's
    /// `spec.placement` leaves it unset (operator flags `--default-priority-class-name`,
    /// `--default-runtime-class-name`).
    pub placement_defaults: crate::api::Placement,
    /// Namespace whose pods may scrape the gates' metrics (operator flag
    /// `--monitoring-namespace`); without it nobody outside the pod can.
    pub monitoring_namespace: Option<String>,
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            dns_namespace: "kube-system".into(),
            dns_pod_labels: BTreeMap::from([("k8s-app".into(), "kube-dns".into())]),
            placement_defaults: crate::api::Placement::default(),
            monitoring_namespace: None,
        }
    }
}

/// Every object Moat generates for one SecureModelDeployment. The reconciler destructures this
/// without `..`, so a new child kind cannot be silently skipped when applying.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Children {
    /// Dedicated identity without an API token or RBAC.
    pub service_account: ServiceAccount,
    /// The serving certificate, key and CA bundle.
    pub tls_secret: Secret,
    /// Default deny, then what `spec.access` allows.
    pub network_policies: Vec<NetworkPolicy>,
    /// ClusterIP Service for the serving port.
    pub service: Service,
    /// The gate's policy (absent when `spec.gate.mode` is `Disabled`).
    pub gate_policy: Option<ConfigMap>,
    /// Present when `replicas >= 2`.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// The model server pods.
    pub deployment: Deployment,
}

/// Why a SecureModelDeployment cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The spec fails a rule the schema could not express (or the CRD was installed without it).
    #[error("{}", format_errors(.0))]
    Invalid(Vec<ValidationError>),
    /// The object has no namespace (only namespaced objects can be rendered).
    #[error("the object has no namespace; set metadata.namespace")]
    MissingNamespace,
    /// The object has no uid yet (it was not read from the API server), so nothing can be owned
    /// by it.
    #[error("the object has no uid yet; it must be read from the API server")]
    MissingUid,
    /// A generated object does not deserialize into its Kubernetes type (a bug in Moat).
    #[error("internal error building {kind}: {source}")]
    Build {
        /// Kind being built.
        kind: &'static str,
        /// What went wrong.
        source: serde_json::Error,
    },
    /// A generated object names fields its Kubernetes type does not have (a bug in Moat: a
    /// misspelt field).
    #[error("internal error building {kind}: unknown fields {}", fields.join(", "))]
    UnknownFields {
        /// Kind being built.
        kind: &'static str,
        /// Paths of the fields the type dropped.
        fields: Vec<String>,
    },
    /// Writing YAML failed.
    #[error("writing YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
}

fn format_errors(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Renders every child of `smd` offline (see [`Resolved::offline`]).
pub fn render(smd: &SecureModelDeployment, facts: &Facts) -> Result<Children, RenderError> {
    render_with(smd, facts, &Resolved::offline(smd))
}

/// Renders every child of `smd` with what the reconciler `resolved`.
pub fn render_with(
    smd: &SecureModelDeployment,
    facts: &Facts,
    resolved: &Resolved,
) -> Result<Children, RenderError> {
    build(&validated(smd)?, facts, resolved)
}

/// A SecureModelDeployment whose spec passed [`validate`], with what validation parsed: the only
/// input of [`build`], so a pipeline that validates once cannot render an unchecked spec.
#[derive(Clone, Debug)]
pub struct Valid<'a> {
    smd: &'a SecureModelDeployment,
    /// `spec.tls.certificateLifetime`, parsed.
    pub certificate_lifetime: std::time::Duration,
}

impl<'a> Valid<'a> {
    /// The validated object.
    pub fn smd(&self) -> &'a SecureModelDeployment {
        self.smd
    }
}

/// Validates `smd` (every problem at once) and parses what rendering needs.
pub fn validated(smd: &SecureModelDeployment) -> Result<Valid<'_>, RenderError> {
    validate(&smd.spec, &smd.name_any()).map_err(RenderError::Invalid)?;
    let certificate_lifetime =
        certificate_lifetime(&smd.spec.tls.certificate_lifetime).map_err(|message| {
            RenderError::Invalid(vec![ValidationError {
                field: "spec.tls.certificateLifetime".into(),
                message,
            }])
        })?;
    Ok(Valid {
        smd,
        certificate_lifetime,
    })
}

/// Renders every child of a validated SecureModelDeployment with what the reconciler `resolved`.
pub fn build(valid: &Valid, facts: &Facts, resolved: &Resolved) -> Result<Children, RenderError> {
    let ctx = Ctx::new(valid.smd)?;
    Ok(Children {
        service_account: service_account::render(&ctx)?,
        tls_secret: tls_secret::render(&ctx, &resolved.tls),
        network_policies: network_policy::render(&ctx, facts, resolved)?,
        service: service::render(&ctx)?,
        gate_policy: if gate::enforced(valid.smd) {
            Some(gate::config_map(&ctx, &gate::policy(valid.smd, resolved))?)
        } else {
            None
        },
        pod_disruption_budget: pdb::render(&ctx)?,
        deployment: deployment::render(&ctx, resolved, &facts.placement_defaults)?,
    })
}

/// What every child renderer needs.
pub(crate) struct Ctx<'a> {
    pub smd: &'a SecureModelDeployment,
    pub name: String,
    pub namespace: String,
    owner: Option<OwnerReference>,
}

impl<'a> Ctx<'a> {
    fn new(smd: &'a SecureModelDeployment) -> Result<Self, RenderError> {
        Ok(Self {
            smd,
            name: smd.name_any(),
            namespace: smd.namespace().ok_or(RenderError::MissingNamespace)?,
            owner: smd.controller_owner_ref(&()),
        })
    }

    /// Labels on every child.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".into(), "moat-model".into()),
            ("app.kubernetes.io/instance".into(), self.name.clone()),
            ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
            (DEPLOYMENT_LABEL.into(), self.name.clone()),
        ])
    }

    /// The labels that select the model pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(DEPLOYMENT_LABEL.into(), self.name.clone())])
    }

    /// Metadata of a child named `name`: labels and the controller ownerReference (absent when
    /// rendering offline an object that has no UID yet).
    pub fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }
}

/// The security context of every container Moat renders: what Pod Security "restricted"
/// requires plus a read-only root filesystem and a fixed non-root UID/GID.
pub(crate) fn container_security_context() -> serde_json::Value {
    serde_json::json!({
        "allowPrivilegeEscalation": false,
        "privileged": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Deserializes a JSON body into a typed object, naming the kind on failure. k8s-openapi ignores
/// keys it does not know, so a misspelt field would silently vanish: every key of `value` must
/// survive the round trip through the type, or this fails naming the lost fields.
pub(crate) fn typed<T: serde::de::DeserializeOwned + Serialize>(
    kind: &'static str,
    value: serde_json::Value,
) -> Result<T, RenderError> {
    let obj: T = serde_json::from_value(value.clone())
        .map_err(|source| RenderError::Build { kind, source })?;
    let back = serde_json::to_value(&obj).map_err(|source| RenderError::Build { kind, source })?;
    let lost = crate::core::drift::differences(&value, &back);
    if lost.is_empty() {
        Ok(obj)
    } else {
        Err(RenderError::UnknownFields { kind, fields: lost })
    }
}

/// One generated object as data: its kind, its name and its JSON body (with `apiVersion` and
/// `kind`).
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// `K::KIND` of its Kubernetes type.
    pub kind: &'static str,
    /// `metadata.name`.
    pub name: String,
    /// The body Moat applies.
    pub body: serde_json::Value,
}

impl Children {
    /// Every child as data, in apply order.
    pub fn objects(&self) -> Result<Vec<Object>, RenderError> {
        let Children {
            service_account,
            tls_secret,
            network_policies,
            service,
            gate_policy,
            pod_disruption_budget,
            deployment,
        } = self;
        let mut out = vec![object(service_account)?, object(tls_secret)?];
        for np in network_policies {
            out.push(object(np)?);
        }
        out.push(object(service)?);
        if let Some(cm) = gate_policy {
            out.push(object(cm)?);
        }
        if let Some(pdb) = pod_disruption_budget {
            out.push(object(pdb)?);
        }
        out.push(object(deployment)?);
        Ok(out)
    }
}

fn object<K>(obj: &K) -> Result<Object, RenderError>
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource + Serialize,
{
    Ok(Object {
        kind: K::KIND,
        name: obj.name_any(),
        body: with_type(obj).map_err(|source| RenderError::Build {
            kind: K::KIND,
            source,
        })?,
    })
}

/// The children as a multi-document YAML stream (what `moat render` prints).
pub fn to_yaml(children: &Children) -> Result<String, RenderError> {
    children
        .objects()?
        .iter()
        .map(|o| {
            serde_yaml::to_string(&o.body)
                .map(|d| format!("---\n{d}"))
                .map_err(RenderError::Yaml)
        })
        .collect()
}

/// An object as JSON with `apiVersion` and `kind` set.
pub fn with_type<K>(obj: &K) -> Result<serde_json::Value, serde_json::Error>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let mut v = serde_json::to_value(obj)?;
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_misspelt_field_fails_the_render_instead_of_vanishing() {
        let good = json!({"metadata": {"name": "m"}, "spec": {"selector": {"a": "b"}, "ports": [{"port": 80}]}});
        assert!(typed::<Service>("Service", good).is_ok());
        let bad = json!({"metadata": {"name": "m"}, "spec": {"selectr": {"a": "b"}, "ports": [{"port": 80, "nmae": "x"}]}});
        let err = typed::<Service>("Service", bad).expect_err("unknown fields");
        assert_eq!(
            err.to_string(),
            "internal error building Service: unknown fields spec.ports[0].nmae, spec.selectr"
        );
    }
}
