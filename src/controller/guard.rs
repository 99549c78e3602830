//! Watches that survive a malformed object.
//!
//! kube's watcher decodes every object of a list or watch event into the Rust type; one object
//! that does not decode (stored under an older schema, written to etcd directly, or refused by a
//! stricter type than the CRD schema) fails the whole list, so the cache never fills and no
//! object in the scope is reconciled. [`Guarded`] decodes the metadata, which the API server
//! guarantees, and the rest separately: a malformed object arrives as `Err` with the reason, is
//! reported on its own (a warning, an Event and a Stalled condition), and every other object is
//! reconciled as usual.

use std::{borrow::Cow, sync::Arc};

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use tracing::warn;

use super::{Context, Error, context, events::publish};
use crate::api::conditions::{self, reason};

/// An object from a watch: its metadata, and the object or why it could not be decoded.
#[derive(Clone, Debug)]
pub struct Guarded<K> {
    meta: ObjectMeta,
    /// The decoded object, or the decoding error (one line, naming the field).
    pub object: Result<Arc<K>, String>,
    /// `status.conditions` of an object that did not decode, where they decode (so a report of
    /// the failure is written once, not on every watch event its own write causes).
    conditions: Vec<Condition>,
}

impl<K> Guarded<K> {
    /// A decoded object.
    pub fn new(object: K) -> Self
    where
        K: Resource,
    {
        Self {
            meta: object.meta().clone(),
            object: Ok(Arc::new(object)),
            conditions: Vec::new(),
        }
    }
}

impl Guarded<crate::api::SecureModelDeployment> {
    /// `status.conditions`: the decoded object's, or those read from a malformed one.
    pub fn conditions(&self) -> &[Condition] {
        match &self.object {
            Ok(smd) => smd
                .status
                .as_ref()
                .map_or(&[], |st| st.conditions.as_slice()),
            Err(_) => &self.conditions,
        }
    }
}

impl<K: Resource> Resource for Guarded<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Guarded<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let meta = match value.get("metadata") {
            Some(m) => ObjectMeta::deserialize(m).map_err(serde::de::Error::custom)?,
            None => return Err(serde::de::Error::missing_field("metadata")),
        };
        let conditions = value
            .pointer("/status/conditions")
            .and_then(|c| Vec::<Condition>::deserialize(c).ok())
            .unwrap_or_default();
        let object = K::deserialize(value)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let conditions = if object.is_ok() {
            Vec::new()
        } else {
            conditions
        };
        Ok(Self {
            meta,
            object,
            conditions,
        })
    }
}

/// Reports an object that did not decode, and waits for it to change: a warning in the log;
/// `Stalled=True` with reason [`reason::MALFORMED`] and the decoding error in its status (a
/// merge patch of the conditions, which needs no decoded object); and a Warning Event when that
/// status is new. Nothing else is read or written for it.
pub(super) async fn report_malformed<K>(
    guarded: &Guarded<K>,
    why: &str,
    ctx: &Context,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    let message = format!(
        "Moat cannot decode this {kind}: {why}. Fix that field (kubectl edit) or apply the object again"
    );
    warn!(error = %why, "skipping a malformed {kind}");
    let generation = guarded.meta.generation;
    let mut new = guarded.conditions.clone();
    conditions::set_stalled(
        &mut new,
        reason::MALFORMED,
        &message,
        generation,
        &Time(context::now()),
    );
    if conditions::same_ignoring_time(&guarded.conditions, &new) {
        return Ok(Action::await_change());
    }
    let api: Api<Guarded<K>> =
        Api::namespaced(ctx.client.clone(), &guarded.namespace().unwrap_or_default());
    let patch =
        serde_json::json!({"status": {"observedGeneration": generation, "conditions": new}});
    super::apply::patch_status(ctx, &api, &kind, &guarded.name_any(), &patch).await?;
    publish(
        &ctx.recorder,
        &ctx.metrics,
        &guarded.object_ref(&()),
        EventType::Warning,
        reason::MALFORMED,
        message,
        None,
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{api::SecureModelDeployment, fixture};

    #[test]
    fn a_malformed_object_keeps_its_metadata_and_says_what_is_wrong() {
        let good = fixture::smd("good").namespace("ml").json();
        let mut bad = fixture::smd("bad").namespace("ml").json();
        bad["spec"]["server"]["port"] = json!("eight thousand");
        // A list of both decodes: one bad item no longer fails the whole list.
        let items: Vec<Guarded<SecureModelDeployment>> =
            serde_json::from_value(json!([good, bad])).expect("the list decodes");
        assert_eq!(items[0].meta().name.as_deref(), Some("good"));
        let decoded = items[0].object.as_ref().expect("good decodes");
        assert_eq!(decoded.spec.server.port, 8000);
        assert_eq!(items[1].meta().name.as_deref(), Some("bad"));
        assert_eq!(items[1].meta().namespace.as_deref(), Some("ml"));
        let why = items[1].object.as_ref().expect_err("bad does not decode");
        assert!(why.contains("invalid type"), "{why}");
    }

    #[test]
    fn the_kind_is_the_inner_kind_and_an_object_without_metadata_fails() {
        assert_eq!(
            Guarded::<SecureModelDeployment>::kind(&()),
            "SecureModelDeployment"
        );
        assert_eq!(
            Guarded::<SecureModelDeployment>::api_version(&()),
            "moat.dev/v1alpha1"
        );
        assert!(serde_json::from_value::<Guarded<SecureModelDeployment>>(json!({})).is_err());
    }
}
