//! Publishing Kubernetes Events (never fatal).

use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

use crate::telemetry::metrics::Metrics;

/// Publishes an Event about `regarding`; failures are logged, never fatal.
pub(crate) async fn publish(
    recorder: &Recorder,
    metrics: &Metrics,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: related,
    };
    metrics.api_write("Event", "create");
    if let Err(e) = recorder.publish(&event, regarding).await {
        warn!(error = %e, "could not publish an Event");
    }
}
