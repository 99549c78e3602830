//! Dereference step for images: what digest the pods run. Pure decisions come from
//! [`crate::image`]; this reads the pull Secrets and asks the registry when a tag must be
//! resolved.

use k8s_openapi::{
    api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{Api, ResourceExt};

use super::Context;
use crate::{
    api::{ImageStatus, SecureModelDeployment},
    image::{self, ImageError, Plan, RESOLVE_ANNOTATION},
};

/// Type of the Secrets Moat reads registry credentials from.
const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";

/// The image pin of `smd`: kept from the status, taken from the spec's digest, or resolved in
/// the registry now (then `resolved` is true).
pub(super) struct Pin {
    /// What goes into the status (and `pinned` into the pod template).
    pub status: ImageStatus,
    /// The registry was asked in this reconcile.
    pub resolved: bool,
}

/// Pins `smd`'s image. Reads the pull Secrets only when the registry must be asked.
pub(super) async fn pin(
    ctx: &Context,
    smd: &SecureModelDeployment,
    now: Timestamp,
) -> Result<Pin, ImageError> {
    let image = &smd.spec.server.image;
    let previous = smd.status.as_ref().and_then(|s| s.image.as_ref());
    let request = smd
        .annotations()
        .get(RESOLVE_ANNOTATION)
        .map(String::as_str);
    let plan = image::plan(
        image,
        smd.spec.image_policy.unwrap_or_default(),
        &ctx.settings.image.allowed_registries,
        previous,
        request,
    )?;
    let status = |pinned: String, resolved_at: Option<Time>| ImageStatus {
        requested: image.clone(),
        pinned,
        resolved_at,
        resolve_request: request.map(str::to_string),
        // Set by the status step, which knows whether the pods run the helper.
        helper: None,
    };
    match plan {
        Plan::Keep(kept) => Ok(Pin {
            status: kept,
            resolved: false,
        }),
        Plan::Digest(pinned) => Ok(Pin {
            status: status(pinned, None),
            resolved: false,
        }),
        Plan::Resolve(reference) => {
            let secrets = pull_secrets(ctx, smd).await?;
            let credentials = image::credentials(&secrets, reference.registry())?;
            let digest = ctx
                .settings
                .image
                .registry
                .digest(&reference, credentials)
                .await
                .inspect_err(|e| ctx.metrics.image_resolution(e.reason()))?;
            ctx.metrics.image_resolution("pinned");
            Ok(Pin {
                status: status(image::pinned(&reference, &digest), Some(Time(now))),
                resolved: true,
            })
        }
    }
}

/// The `.dockerconfigjson` of every Secret in `spec.imagePullSecrets`, read fresh (they are not
/// Moat's and not cached), in order.
async fn pull_secrets(
    ctx: &Context,
    smd: &SecureModelDeployment,
) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let namespace = smd.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut out = Vec::new();
    for r in &smd.spec.image_pull_secrets {
        let problem = |problem: String| ImageError::PullSecret {
            name: r.name.clone(),
            problem,
        };
        let secret = api
            .get_opt(&r.name)
            .await
            .map_err(|e| problem(format!("cannot be read: {e}")))?
            .ok_or_else(|| problem(format!("does not exist in namespace {namespace}")))?;
        if secret.type_.as_deref() != Some(DOCKER_CONFIG_JSON) {
            return Err(problem(format!("is not of type {DOCKER_CONFIG_JSON}")));
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
            .map(|b| b.0.clone())
            .ok_or_else(|| problem("has no .dockerconfigjson".into()))?;
        out.push((r.name.clone(), bytes));
    }
    Ok(out)
}

/// Moat's own image for helper containers, pinned: as given when it names a digest, otherwise
/// resolved in its registry once per operator process (anonymously; the allow-list, which is
/// about model images, does not apply to the platform team's own choice).
pub(super) async fn helper(ctx: &Context) -> Result<String, ImageError> {
    let settings = &ctx.settings.image;
    settings
        .helper_pin
        .get_or_try_init(|| async {
            match image::plan(
                &settings.helper_image,
                crate::api::ImagePolicy::Resolve,
                &[],
                None,
                None,
            )? {
                Plan::Digest(pinned) => Ok(pinned),
                Plan::Keep(kept) => Ok(kept.pinned),
                Plan::Resolve(reference) => {
                    let digest = settings
                        .registry
                        .digest(&reference, None)
                        .await
                        .inspect_err(|e| ctx.metrics.image_resolution(e.reason()))?;
                    ctx.metrics.image_resolution("pinned");
                    Ok(image::pinned(&reference, &digest))
                }
            }
        })
        .await
        .cloned()
}
