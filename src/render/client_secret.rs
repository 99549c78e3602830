//! The Secret with a ModelClient's client certificate: type `kubernetes.io/tls`, in the client's
//! namespace, controlled by the ModelClient (deleting the ModelClient deletes it), labelled with
//! the ModelClient's name. The certificate is issued by the reconciler and passed in.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Resource, ResourceExt};

use super::{MANAGED_BY, RenderError, ServingTls, tls_secret::tls_data};
use crate::api::ModelClient;

/// Label on client certificate Secrets: the ModelClient they belong to.
pub const MODEL_CLIENT_LABEL: &str = "moat.dev/model-client";

/// The client certificate Secret `name` of `mc`, holding `tls`.
pub fn client_secret(
    mc: &ModelClient,
    name: &str,
    tls: &ServingTls,
) -> Result<Secret, RenderError> {
    let owner = mc
        .controller_owner_ref(&())
        .ok_or(RenderError::MissingUid)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(mc.namespace().ok_or(RenderError::MissingNamespace)?),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                ),
                (
                    "app.kubernetes.io/name".to_string(),
                    "moat-client".to_string(),
                ),
                (MODEL_CLIENT_LABEL.to_string(), mc.name_any()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(tls_data(tls)),
        ..Secret::default()
    })
}
