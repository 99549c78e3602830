//! The reconcile of one SecureModelDeployment, as a pipeline of named steps, each in its own
//! file:
//!
//! 1. validate ([`render::validated`], pure, once);
//! 2. [`dereference`]: read what rendering needs and the live children (reads only); the key
//!    Secret of an encrypted model first, whose owner (crypto-shredding) is written at once,
//!    before anything else can fail;
//! 3. [`build`]: the desired children, and which of their changes are Moat's own (pure);
//! 4. [`revisions`]: record the revision the pod template is (a ModelRevision), and put the
//!    last known-good one into the Deployment while the spec asks for one that failed;
//! 5. [`apply`]: the only writes, in the stated order (ServiceAccount, Secret, NetworkPolicies
//!    before the Deployment), Events included;
//! 6. [`status`]: observe the rollout, judge the revision the pods run, and write the status.
//!
//! An error stops the pipeline; [`reconcile`] reports it as its [`Disposition`] says.

mod apply;
mod build;
mod dereference;
mod revisions;
mod status;

use std::sync::Arc;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Resource, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::warn;

use super::{
    Context, Disposition, Error, context,
    guard::{self, Guarded},
};
use crate::{api::SecureModelDeployment, render};

/// One reconcile of one SecureModelDeployment. Everything it logs carries the object's
/// namespace and name (a span per reconcile).
#[tracing::instrument(skip_all, fields(kind = "SecureModelDeployment", namespace = %smd.namespace().unwrap_or_default(), name = %smd.name_any()))]
pub async fn reconcile(
    smd: Arc<SecureModelDeployment>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let key = ObjectRef::from_obj(&*smd);
    if smd.meta().deletion_timestamp.is_some() {
        // Children carry a controller ownerReference; the garbage collector removes them.
        ctx.forget_failures(&key);
        return Ok(Action::await_change());
    }
    // ModelClients in every watch scope re-check consent (no receiver yet is fine).
    let _ = ctx
        .smd_changes
        .send((smd.namespace().unwrap_or_default(), smd.name_any()));
    let now = context::now();
    let result = converge(&smd, &ctx, now).await;
    let Err(e) = &result else {
        ctx.forget_failures(&key);
        return result;
    };
    ctx.metrics.reconcile_failed(e.metric_label());
    let disposition = e.disposition();
    if disposition == Disposition::Transient {
        status::report_retrying(&smd, &ctx, e, now).await;
        return result;
    }
    status::report_stalled(&smd, &ctx, e, now).await?;
    Ok(match disposition {
        Disposition::StalledRetry => Action::requeue(ctx.backoff(&key)),
        Disposition::StalledResync => {
            ctx.forget_failures(&key);
            Action::requeue(ctx.settings.resync_period)
        }
        Disposition::AwaitChange | Disposition::Transient => {
            ctx.forget_failures(&key);
            Action::await_change()
        }
    })
}

/// The pipeline.
async fn converge(
    smd: &SecureModelDeployment,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action, Error> {
    let valid = render::validated(smd).map_err(Error::Invalid)?;
    let key = dereference::model_key(ctx, &valid).await?;
    apply::key_owner(ctx, smd, key.as_ref()).await?;
    let facts = dereference::read(ctx, &valid, now).await?;
    let mut built = build::build(&valid, &ctx.settings.facts, &facts)?;
    let live = facts
        .live
        .deployments
        .iter()
        .find(|d| d.metadata.name == smd.metadata.name);
    let revisions = revisions::prepare(ctx, smd, &mut built, live, &Time(now)).await?;
    let applied = apply::apply(ctx, smd, &facts, built, revisions, now).await?;
    if let Some(e) = facts.image_failure {
        // The registry failed but the pods keep their earlier digest, and every other child was
        // kept as desired; the failure is reported and retried.
        return Err(Error::Image(e));
    }
    status::report(
        ctx,
        smd,
        facts.pin,
        facts.helper_image,
        facts.certified,
        applied,
        now,
    )
    .await
}

/// A SecureModelDeployment that does not decode: reported on its own ([`guard::report_malformed`]),
/// while every other model is reconciled. ModelClients that refer to it re-check consent.
pub(super) async fn malformed(
    smd: &Guarded<SecureModelDeployment>,
    why: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let _ = ctx
        .smd_changes
        .send((smd.namespace().unwrap_or_default(), smd.name_any()));
    ctx.metrics.reconcile_failed("malformed");
    guard::report_malformed(smd, why, ctx).await
}

/// Retries with exponential backoff per object (see [`Context::backoff`]).
pub(super) fn error_policy(
    smd: Arc<Guarded<SecureModelDeployment>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let delay = ctx.backoff(&ObjectRef::from_obj(&*smd));
    warn!(name = %smd.name_any(), error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
