//! The Secret with the model's serving certificate: type `kubernetes.io/tls`, with `tls.crt`,
//! `tls.key` and `ca.crt` (the trust bundle, for verifying clients). The certificate itself is
//! issued by the reconciler (`crate::pki`) and passed in; rendering only places it.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};

use super::{Ctx, ServingTls};

/// Name of the serving certificate Secret of the SecureModelDeployment `name`.
pub fn secret_name(name: &str) -> String {
    format!("{name}-tls")
}

pub(crate) fn render(ctx: &Ctx, tls: &ServingTls) -> Secret {
    Secret {
        metadata: ctx.meta(secret_name(&ctx.name)),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(tls_data(tls)),
        immutable: None,
        string_data: None,
    }
}

/// `tls.crt`, `tls.key` and `ca.crt` of a `kubernetes.io/tls` Secret.
pub(crate) fn tls_data(tls: &ServingTls) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (
            "tls.crt".to_string(),
            ByteString(tls.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(tls.key_pem.clone().into_bytes()),
        ),
        (
            "ca.crt".to_string(),
            ByteString(tls.ca_bundle_pem.clone().into_bytes()),
        ),
    ])
}
