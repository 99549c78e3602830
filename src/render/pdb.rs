//! PodDisruptionBudget: with two or more replicas, voluntary disruptions (node drains) take at
//! most one pod at a time.

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
            }
        }),
    )
    .map(Some)
}
