//! ClusterIP Service for the serving port.

use serde_json::json;

use k8s_openapi::api::core::v1::Service;

use super::{Ctx, RenderError, SERVING_PORT_NAME, typed};

pub(crate) fn render(ctx: &Ctx) -> Result<Service, RenderError> {
    typed(
        "Service",
        json!({
            "metadata": ctx.meta(ctx.name.clone()),
            "spec": {
                "type": "ClusterIP",
                "selector": ctx.selector(),
                "ports": [{
                    "name": SERVING_PORT_NAME,
                    "port": ctx.smd.spec.server.port,
                    "targetPort": SERVING_PORT_NAME,
                    "protocol": "TCP",
                }],
            }
        }),
    )
}
