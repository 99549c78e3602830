//! HTTP endpoints: `/metrics` (Prometheus), `/healthz` (liveness) and `/readyz` (readiness).

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::Metrics;

/// State shared with the endpoints. `/readyz` answers from [`Metrics::readiness`].
#[derive(Clone)]
pub struct Health {
    metrics: Arc<Metrics>,
}

impl Health {
    /// New endpoint state.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// Serves `/metrics` on `metrics_addr` and the probes on `probe_addr` (or also on
/// `metrics_addr` when it is `None`) until the process ends.
pub async fn serve(
    metrics_addr: SocketAddr,
    probe_addr: Option<SocketAddr>,
    health: Health,
) -> std::io::Result<()> {
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health.clone());
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state(health);
    match probe_addr {
        None => {
            let listener = tokio::net::TcpListener::bind(metrics_addr).await?;
            axum::serve(listener, metrics.merge(probes)).await
        }
        Some(probe_addr) => {
            let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
            let probe_listener = tokio::net::TcpListener::bind(probe_addr).await?;
            tokio::try_join!(
                async { axum::serve(metrics_listener, metrics).await },
                async { axum::serve(probe_listener, probes).await },
            )
            .map(|_| ())
        }
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    match h.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    match h.metrics.readiness() {
        Ok(why) => (StatusCode::OK, why),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
