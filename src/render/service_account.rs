//! The model's dedicated ServiceAccount: no API token is mounted and no RBAC is bound to it.

use k8s_openapi::api::core::v1::ServiceAccount;

use super::{Ctx, RenderError};

pub(crate) fn render(ctx: &Ctx) -> Result<ServiceAccount, RenderError> {
    Ok(ServiceAccount {
        metadata: ctx.meta(ctx.name.clone()),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}
