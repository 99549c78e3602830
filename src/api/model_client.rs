//! `ModelClient`: a workload's request for a client certificate to call a model over mutual TLS.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{CertificateStatus, LIFETIME_RULE, default_certificate_lifetime};

/// A request, made in the client's own namespace, for a client certificate to call a
/// SecureModelDeployment over mutual TLS. Moat issues it only with two-sided consent: this object
/// asks, and the SecureModelDeployment's `spec.access.clients` must list this namespace and
/// `serviceAccountName`. The certificate names the client by its SPIFFE ID
/// (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>`) and is stored in the Secret
/// `secretName` in this namespace, owned by this object. When either side withdraws, Moat stops
/// renewing and deletes the Secret.
// Several printer columns share `type_ = "string"`; clippy takes that for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "ModelClient",
    namespaced,
    shortname = "mc",
    category = "moat",
    status = "ModelClientStatus",
    derive = "PartialEq",
    doc = "A workload's request for a client certificate to call a SecureModelDeployment over mutual TLS.",
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the certificate is issued and current"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) ready"
    ),
    printcolumn(
        name = "Secret",
        type_ = "string",
        json_path = ".spec.secretName",
        description = "Secret with the client certificate"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelClientSpec {
    /// The SecureModelDeployment to call.
    pub deployment_ref: DeploymentRef,

    /// The ServiceAccount, in this namespace, of the pods that call the model: the identity in
    /// the certificate. Must be listed in the model's `spec.access.clients[].serviceAccounts`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("serviceAccountName must be a ServiceAccount name (a DNS-1123 subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: String,

    /// Name of the Secret (type `kubernetes.io/tls`, with `tls.crt`, `tls.key` and `ca.crt`) Moat
    /// writes in this namespace. Moat never overwrites a Secret it did not create.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("secretName must be a Secret name (a DNS-1123 subdomain)"))]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,

    /// Lifetime of the client certificate, a duration such as `24h` (30s to 2160h). Renewed at
    /// two thirds of its lifetime. Defaults to 24h.
    #[serde(default = "default_certificate_lifetime")]
    #[x_kube(validation = Rule::new(LIFETIME_RULE).message("certificateLifetime must be a duration of hours, minutes and seconds such as 24h or 90m, between 30s and 2160h"))]
    #[schemars(length(min = 2, max = 32))]
    pub certificate_lifetime: String,
}

/// A SecureModelDeployment in any namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentRef {
    /// Namespace of the SecureModelDeployment.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("namespace must be a DNS-1123 label"))]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the SecureModelDeployment.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Observed state, written only by Moat: `observedGeneration`, the conditions `Ready`,
/// `Reconciling` and `Stalled` (reason `NotAllowed` while the model does not consent), and the
/// issued certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelClientStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (the certificate is issued and current), `Reconciling` and `Stalled` (the model
    /// does not allow this client, or the Secret name belongs to someone else).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The client certificate Moat issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
}
