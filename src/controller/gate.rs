//! Announcing a new gate policy or serving certificate to the running model pods. The gate
//! reads its policy from a ConfigMap volume and its certificate from a Secret volume, which the
//! kubelet refreshes at its periodic pod sync (a minute or more). Any change to a pod makes the
//! kubelet sync that pod at once, which remounts its ConfigMap and Secret volumes; so Moat sets
//! the annotation `moat.dev/gate-policy: <hash>` on each model pod when the policy changes, and
//! `moat.dev/tls-hash: <hash>` when the certificate or its CA bundle does. The pods keep no API
//! access: the kubelet does the delivery.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use tracing::warn;

use super::{Context, Error};
use crate::{api::SecureModelDeployment, render::DEPLOYMENT_LABEL};

/// Sets `annotation: hash` on every pod of `smd` that does not carry it yet. A pod that cannot
/// be annotated still gets the new files at the kubelet's next periodic sync; that is logged,
/// and the reconcile goes on.
pub(super) async fn announce(
    ctx: &Context,
    smd: &SecureModelDeployment,
    namespace: &str,
    annotation: &str,
    hash: &str,
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let pods = api
        .list(&ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={}", smd.name_any())))
        .await
        .map_err(|source| Error::Read {
            kind: "Pod",
            source,
        })?;
    for pod in pods.items {
        if pod.annotations().get(annotation).map(String::as_str) == Some(hash)
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let patch = json!({"metadata": {"annotations": {annotation: hash}}});
        ctx.metrics.api_write("Pod", "patch-annotation");
        if let Err(e) = api
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            warn!(pod = %pod.name_any(), %annotation, error = %e, "could not announce a change to a pod; its kubelet delivers it at its next sync");
        }
    }
    Ok(())
}
