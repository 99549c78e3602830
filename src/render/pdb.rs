//! PodDisruptionBudget: with two or more replicas, voluntary disruptions (node drains) take at
//! most one pod at a time. A pod that is not ready (a crash loop, a model that failed to load)
//! may always be evicted (`unhealthyPodEvictionPolicy: AlwaysAllow`): it serves nothing, and
//! keeping it would block node drains for no one's benefit.

use serde_json::json;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use super::{Ctx, RenderError, typed};

pub(crate) fn render(ctx: &Ctx) -> Result<Option<PodDisruptionBudget>, RenderError> {
    if ctx.smd.spec.replicas < 2 {
        return Ok(None);
    }
    typed(
        "PodDisruptionBudget",
        json!({
            "metadata": ctx.meta(ctx.name.clone()),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": ctx.selector()},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            }
        }),
    )
    .map(Some)
}
