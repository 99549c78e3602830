//! Building the operator's Kubernetes client, with Moat's User-Agent.

use kube::Client;

/// The User-Agent of Moat's API requests (audit logs attribute writes to it).
pub const USER_AGENT: &str = concat!("moat-operator/", env!("CARGO_PKG_VERSION"));

/// A client for the operator: the inferred configuration (KUBECONFIG out of cluster, the
/// ServiceAccount in cluster) with Moat's User-Agent.
pub async fn client() -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    client_from(config)
}

/// A client from `config` with Moat's User-Agent.
pub fn client_from(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Client::try_from(config)
}
