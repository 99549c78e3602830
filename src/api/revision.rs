//! `ModelRevision`: one immutable thing Moat ran, or would run, for a SecureModelDeployment.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The label on every ModelRevision naming its SecureModelDeployment (also the pods' label
/// `moat.dev/revision` names the revision they run).
pub const REVISION_MODEL_LABEL: &str = "moat.dev/model";

/// An immutable record of one distinct pod template Moat rendered for a SecureModelDeployment:
/// the pinned image, the model's digest, the template's hash and the template itself, when Moat
/// first saw it and who changed the spec that led to it. Moat creates one for every new template,
/// keeps the last `spec.rollout.revisionHistoryLimit` (default 10) and rolls the pods back to the
/// last known-good one when a new revision fails. Its spec is immutable; Moat records the
/// approvals of the revision in its status.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "ModelRevision",
    namespaced,
    shortname = "mrev",
    category = "moat",
    derive = "PartialEq",
    status = "ModelRevisionStatus",
    doc = "An immutable revision of a SecureModelDeployment: the pod template Moat ran, its image and weights digests, when it was first seen and who changed the spec.",
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        description = "The SecureModelDeployment"
    ),
    printcolumn(
        name = "Revision",
        type_ = "integer",
        json_path = ".spec.revision",
        description = "Revision number, counting up per SecureModelDeployment"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.image",
        description = "The server image, pinned by digest"
    ),
    printcolumn(
        name = "Weights",
        type_ = "string",
        json_path = ".spec.modelSha256",
        description = "SHA-256 of the encrypted model artifact"
    ),
    printcolumn(
        name = "Author",
        type_ = "string",
        json_path = ".spec.author",
        description = "Who last changed the spec, from the admission request"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a ModelRevision is immutable; change the SecureModelDeployment instead"))]
pub struct ModelRevisionSpec {
    /// The SecureModelDeployment, in this namespace, this is a revision of.
    #[schemars(length(min = 1, max = 63))]
    pub model: String,

    /// The revision number: 1 for the first, one more than the highest kept for every new one.
    #[schemars(range(min = 1))]
    pub revision: i64,

    /// SHA-256 of the rendered pod template (without the `moat.dev/revision` label), hex: what
    /// tells two revisions apart. The ModelRevision is named `<model>-<first 10 digits>`.
    #[schemars(length(min = 64, max = 64))]
    pub template_hash: String,

    /// The server image of the template, `repository@sha256:<digest>`.
    #[schemars(length(max = 512))]
    pub image: String,

    /// `spec.model.sha256` of the SecureModelDeployment: the encrypted weights this revision
    /// serves (absent for a model without Moat-managed weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub model_sha256: Option<String>,

    /// The SecureModelDeployment's `metadata.generation` when this revision was first seen.
    pub generation: i64,

    /// Who last changed the SecureModelDeployment's spec, as the chart's MutatingAdmissionPolicy
    /// recorded it from the admission request (annotation `moat.dev/spec-author`). `unknown`
    /// when the policy is not installed; `moat` when only Moat's own inputs changed (a renewed
    /// certificate, a new helper image).
    #[schemars(length(max = 512))]
    pub author: String,

    /// When Moat first saw this revision.
    pub first_seen: Time,

    /// The pod template Moat rendered, exactly as it puts it into the Deployment (without the
    /// `moat.dev/revision` label): what a rollback restores.
    #[schemars(schema_with = "any_object")]
    pub template: serde_json::Value,
}

/// What Moat recorded about a revision: the approvals that count for it (two-person approval,
/// `spec.approval` of the SecureModelDeployment) and those that do not, with why.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelRevisionStatus {
    /// Approvals that count: each by a different user, none by the revision's author, naming
    /// this revision's digests, given within their validity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<RecordedApproval>,
    /// Approvals that do not count, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedApproval>,
}

/// One approval that counts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecordedApproval {
    /// The user who approved, as the API server authenticated them.
    pub approver: String,
    /// The ModelApproval's name.
    pub approval: String,
    /// When the approval was created (its `metadata.creationTimestamp`).
    pub at: Time,
}

/// One approval that does not count.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RefusedApproval {
    /// The ModelApproval's name.
    pub approval: String,
    /// Why it does not count, in one line.
    pub reason: String,
}

/// One user's approval of one revision of a SecureModelDeployment (two-person control,
/// `spec.approval.required`). It names the revision and its exact digests; the chart's admission
/// policy lets users create one only in their own name (`spec.approver` must be the requesting
/// user), and nobody can change one. It counts when its approver is neither the revision's author
/// nor someone who approved it already, and while it is younger than
/// `spec.approval.validFor`.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moat.dev",
    version = "v1alpha1",
    kind = "ModelApproval",
    namespaced,
    shortname = "mapr",
    category = "moat",
    derive = "PartialEq",
    doc = "One user's approval of one revision of a SecureModelDeployment, naming its exact digests.",
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        description = "The SecureModelDeployment"
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".spec.revision",
        description = "The ModelRevision approved"
    ),
    printcolumn(
        name = "Approver",
        type_ = "string",
        json_path = ".spec.approver",
        description = "Who approved"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a ModelApproval cannot be changed; delete it and create another"))]
pub struct ModelApprovalSpec {
    /// The SecureModelDeployment, in this namespace.
    #[schemars(length(min = 1, max = 63))]
    pub model: String,

    /// The ModelRevision approved (`kubectl get modelrevisions -l moat.dev/model=<model>`).
    #[schemars(length(min = 1, max = 253))]
    pub revision: String,

    /// The revision's image, exactly as the ModelRevision names it (`repository@sha256:...`).
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// The revision's weights digest (its `modelSha256`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub model_sha256: Option<String>,

    /// Who approves: must be the requesting user's name, as `kubectl auth whoami` prints it
    /// (the chart's admission policy refuses any other).
    #[schemars(length(min = 1, max = 512))]
    pub approver: String,

    /// Why, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
}

/// An object of any shape: the schema keeps every field.
fn any_object(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
