//! Reading, applying, repairing and pruning the children of one SecureModelDeployment.
//!
//! Steady state costs no write: a child is written only when the live object lacks something
//! Moat wants ([`drift::differences`]) or carries fields another manager added
//! ([`drift::foreign_fields`]). Added fields are first moved into Moat's managed-fields entry, so
//! the forced apply that follows removes them.

use std::collections::BTreeSet;

use k8s_openapi::{
    NamespaceResourceScope, api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{events::EventType, reflector::Store},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tracing::{info, warn};

use super::{Context, Error, FIELD_MANAGER, Repair, events::publish};
use crate::core::drift;
use crate::{
    api::{SecureModelDeployment, conditions::reason},
    render::{BREAK_GLASS_ANNOTATION, DEPLOYMENT_LABEL, with_type},
};

/// What Moat needs of a child kind: a namespaced Kubernetes type it can serialize and read.
pub(crate) trait Child:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + k8s_openapi::Resource
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
{
}

impl<K> Child for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned
{
}

pub(crate) use crate::core::drift::OwnChanges;

/// Applies the children of one SecureModelDeployment, kind by kind.
pub(crate) struct Applier<'a> {
    ctx: &'a Context,
    smd: &'a SecureModelDeployment,
    namespace: &'a str,
    converged_before: bool,
    own: OwnChanges,
    now: Timestamp,
    repairs: Vec<Repair>,
    notes: Vec<(EventType, &'static str, String, ObjectReference)>,
}

enum Outcome {
    Unchanged,
    Created,
    Updated(String),
    /// A change by someone else reverted; with the reason the child carried when the change
    /// was made through break-glass.
    Repaired {
        change: String,
        break_glass: Option<String>,
    },
}

impl<'a> Applier<'a> {
    pub(crate) fn new(
        ctx: &'a Context,
        smd: &'a SecureModelDeployment,
        namespace: &'a str,
        converged_before: bool,
        own: OwnChanges,
        now: Timestamp,
    ) -> Self {
        Self {
            ctx,
            smd,
            namespace,
            converged_before,
            own,
            now,
            repairs: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Makes the live objects of kind `K` exactly `desired`: creates, repairs and updates them,
    /// and deletes the ones of this SecureModelDeployment that are no longer desired. `live` is
    /// what the cache holds. Returns the live objects after the writes.
    pub(crate) async fn ensure<K: Child>(
        &mut self,
        desired: Vec<K>,
        live: &[K],
    ) -> Result<Vec<K>, Error> {
        let kind = kind::<K>();
        let api: Api<K> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let uid = self.smd.uid();
        let ours = |o: &K| drift::controlled_by(o.owner_references(), uid.as_deref());

        let mut result = Vec::with_capacity(desired.len());
        let desired_names: BTreeSet<String> = desired.iter().map(|d| d.name_any()).collect();
        for want in desired {
            let name = want.name_any();
            let cached = live.iter().find(|o| o.name_any() == name && ours(o));
            let (obj, outcome) = self.ensure_one(&api, want, cached, &ours).await?;
            let related = obj.object_ref(&());
            match outcome {
                Outcome::Unchanged => {}
                Outcome::Created => self.notes.push((
                    EventType::Normal,
                    reason::CREATED,
                    format!("Created {kind} {name}"),
                    related,
                )),
                Outcome::Updated(what) => self.notes.push((
                    EventType::Normal,
                    reason::UPDATED,
                    format!("Updated {kind} {name}: {what}"),
                    related,
                )),
                Outcome::Repaired {
                    change,
                    break_glass,
                } => {
                    let owner = self.smd.name_any();
                    self.ctx.metrics.drift_repaired(
                        "SecureModelDeployment",
                        self.namespace,
                        &owner,
                        kind,
                    );
                    let note = match &break_glass {
                        Some(why) => {
                            self.ctx
                                .metrics
                                .break_glass_used(self.namespace, &owner, kind);
                            warn!(kind, name = %name, change = %change, reason = %why, "break-glass change repaired");
                            (
                                reason::BREAK_GLASS,
                                format!(
                                    "Break-glass change to {kind} {name} (reason: {why}) recorded and reverted: {change}"
                                ),
                            )
                        }
                        None => {
                            info!(kind, name = %name, change = %change, "drift repaired");
                            (
                                reason::DRIFT_REPAIRED,
                                format!(
                                    "Reverted a change to {kind} {name} made outside Moat: {change}"
                                ),
                            )
                        }
                    };
                    self.notes
                        .push((EventType::Warning, note.0, note.1, related));
                    self.repairs.push(Repair {
                        kind: kind.into(),
                        name: name.clone(),
                        change,
                        at: Time(self.now),
                    });
                }
            }
            result.push(obj);
        }

        for stale in live
            .iter()
            .filter(|o| ours(o) && !desired_names.contains(&o.name_any()))
        {
            let name = stale.name_any();
            if !delete_exact(self.ctx, &api, &name, stale.uid()).await? {
                // Already gone, or replaced (the cache lagged): nothing to report.
                continue;
            }
            self.notes.push((
                EventType::Normal,
                reason::DELETED,
                format!("Deleted {kind} {name}, no longer needed"),
                stale.object_ref(&()),
            ));
        }
        Ok(result)
    }

    /// Leaves a child alone when it is as desired, otherwise writes it. The cached copy serves
    /// the fast path only: before any write the object is read fresh, so a cache that lags behind
    /// the API server never causes a wrong write, a false drift count or a false conflict. What to
    /// write is decided by [`drift::plan`].
    async fn ensure_one<K: Child>(
        &self,
        api: &Api<K>,
        want: K,
        cached: Option<&K>,
        ours: &impl Fn(&K) -> bool,
    ) -> Result<(K, Outcome), Error> {
        let kind = kind::<K>();
        let name = want.name_any();
        let body = with_type(&want).map_err(|source| Error::Serialize { kind, source })?;
        let own = self
            .own
            .get(&(kind, name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let decide = |live: Option<&K>| -> Result<drift::Plan, Error> {
            let json = live
                .map(serde_json::to_value)
                .transpose()
                .map_err(|source| Error::Serialize { kind, source })?;
            let managed = live
                .and_then(|l| l.meta().managed_fields.as_deref())
                .unwrap_or_default();
            Ok(drift::plan(
                &body,
                json.as_ref().map(|j| (j, managed)),
                FIELD_MANAGER,
                self.converged_before,
                own,
            ))
        };
        if let Some(c) = cached
            && decide(Some(c))? == drift::Plan::Leave
        {
            return Ok((c.clone(), Outcome::Unchanged));
        }
        let current = api
            .get_opt(&name)
            .await
            .map_err(|source| Error::Read { kind, source })?;
        if let Some(live) = &current {
            if !ours(live) {
                return Err(Error::Conflict { kind, name });
            }
            if live.meta().deletion_timestamp.is_some() {
                // Being deleted; it is recreated when the deletion completes (watch event).
                return Ok((live.clone(), Outcome::Unchanged));
            }
        }
        // A break-glass change: the reason on the changed child, or on the deleted one (which
        // the watch kept).
        let live_reason = current.as_ref().and_then(|live| {
            drift::break_glass_reason(live.meta().annotations.as_ref(), BREAK_GLASS_ANNOTATION)
        });
        let outcome = match decide(current.as_ref())? {
            // `plan` leaves only an object that exists; were it absent, applying creates it.
            drift::Plan::Leave => match current {
                Some(live) => return Ok((live, Outcome::Unchanged)),
                None => Outcome::Created,
            },
            drift::Plan::Create { drift: true } => Outcome::Repaired {
                change: "deleted".into(),
                break_glass: self
                    .ctx
                    .deleted_with_reason
                    .take(kind, self.namespace, &name),
            },
            drift::Plan::Create { drift: false } => Outcome::Created,
            drift::Plan::Apply {
                foreign,
                what,
                drift,
            } => {
                if let (false, Some(live)) = (foreign.is_empty(), &current) {
                    // Move the fields others added into Moat's entry so the apply removes them.
                    let managed = live.meta().managed_fields.clone().unwrap_or_default();
                    let managed_fields = drift::transfer(&managed, &foreign, FIELD_MANAGER);
                    let patch = json!({"metadata": {
                        "resourceVersion": live.resource_version(),
                        "managedFields": managed_fields,
                    }});
                    self.ctx.metrics.api_write(kind, "patch-managed-fields");
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|source| Error::TakeOver {
                            kind,
                            name: name.clone(),
                            source,
                        })?;
                }
                let what = summarize(&what);
                if drift {
                    Outcome::Repaired {
                        change: what,
                        break_glass: live_reason.clone(),
                    }
                } else {
                    Outcome::Updated(what)
                }
            }
        };
        let applied = apply_as_moat(self.ctx, api, &name, &body).await?;
        let raw_reason = current
            .as_ref()
            .and_then(|live| live.meta().annotations.as_ref())
            .and_then(|a| a.get(BREAK_GLASS_ANNOTATION));
        if let (Some(raw), Some(_), Outcome::Repaired { .. }) = (raw_reason, &live_reason, &outcome)
        {
            // Recorded: the reason goes, so the next break-glass change must give its own.
            let applied = self.remove_reason(api, applied, raw).await?;
            return Ok((applied, outcome));
        }
        Ok((applied, outcome))
    }

    /// Removes the break-glass reason annotation from `obj`, with a JSON patch that first tests
    /// it still holds the value `raw` Moat recorded: a newer reason (another break-glass change
    /// since) stays for the repair of that change. Any other change in between (the Deployment
    /// controller's status) does not stop it.
    async fn remove_reason<K: Child>(&self, api: &Api<K>, obj: K, raw: &str) -> Result<K, Error> {
        let kind = kind::<K>();
        let name = obj.name_any();
        let path = format!(
            "/metadata/annotations/{}",
            BREAK_GLASS_ANNOTATION.replace('~', "~0").replace('/', "~1")
        );
        let patch = Patch::<()>::Json(
            serde_json::from_value(json!([
                {"op": "test", "path": path, "value": raw},
                {"op": "remove", "path": path},
            ]))
            .map_err(|source| Error::Serialize { kind, source })?,
        );
        self.ctx.metrics.api_write(kind, "patch-annotations");
        match api.patch(&name, &PatchParams::default(), &patch).await {
            Ok(patched) => Ok(patched),
            // Gone, or the reason changed or went (the test failed): the next reconcile judges.
            Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(obj),
            Err(source) => Err(Error::Apply { kind, name, source }),
        }
    }

    /// Adds an Event about the SecureModelDeployment itself, published with the others.
    pub(crate) fn note(&mut self, type_: EventType, reason: &'static str, text: String) {
        let regarding = self.smd.object_ref(&());
        self.notes.push((type_, reason, text, regarding));
    }

    /// Publishes the Events collected while applying, in the background so the next reconcile
    /// does not wait for them, and returns the drift repairs.
    pub(crate) fn finish(self) -> Vec<Repair> {
        let events = group_notes(self.notes);
        if !events.is_empty() {
            let recorder = self.ctx.recorder.clone();
            let metrics = self.ctx.metrics.clone();
            let regarding = self.smd.object_ref(&());
            tokio::spawn(async move {
                for (type_, reason, note, related) in events {
                    publish(
                        &recorder, &metrics, &regarding, type_, reason, note, related,
                    )
                    .await;
                }
            });
        }
        self.repairs
    }
}

/// Server-side applies `body` (a whole object with its type) as Moat's one field manager, forcing
/// ownership of every field in it; counted in `moat_api_writes_total`.
pub(crate) async fn apply_as_moat<K: Child>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    body: &serde_json::Value,
) -> Result<K, Error> {
    let kind = kind::<K>();
    ctx.metrics.api_write(kind, "apply");
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| Error::Apply {
        kind,
        name: name.to_string(),
        source,
    })
}

/// Deletes `name` only if it is still the object with `uid`, so a same-named object created since
/// (the cache lagged) is kept. Returns whether this call deleted it: `false` when it was already
/// gone or replaced.
pub(crate) async fn delete_exact<K: Child>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    uid: Option<String>,
) -> Result<bool, Error> {
    let kind = kind::<K>();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    ctx.metrics.api_write(kind, "delete");
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(source) => Err(Error::Prune {
            kind,
            name: name.to_string(),
            source,
        }),
    }
}

/// Merge-patches the status subresource of `name` with `patch` (`{"status": ...}`); counted in
/// `moat_api_writes_total` under `kind`.
pub(crate) async fn patch_status<K>(
    ctx: &Context,
    api: &Api<K>,
    kind: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    ctx.metrics.api_write(kind, "patch-status");
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(Error::Status)?;
    Ok(())
}

/// One Event per reason for routine work (`Created`, `Updated`, `Deleted`: every child named in
/// one note), and one per object for drift repairs (with the object as the related object), so a
/// new SecureModelDeployment costs one Event write, not one per child.
fn group_notes(
    notes: Vec<(EventType, &'static str, String, ObjectReference)>,
) -> Vec<(EventType, &'static str, String, Option<ObjectReference>)> {
    const MAX_NOTE: usize = 1000;
    let mut grouped: Vec<(EventType, &'static str, String, Option<ObjectReference>)> = Vec::new();
    for (type_, why, note, related) in notes {
        if why == reason::DRIFT_REPAIRED || why == reason::BREAK_GLASS {
            grouped.push((type_, why, note, Some(related)));
            continue;
        }
        match grouped
            .iter_mut()
            .find(|(_, r, _, rel)| *r == why && rel.is_none())
        {
            Some((_, _, text, _)) => {
                text.push_str("; ");
                text.push_str(&note);
            }
            None => grouped.push((type_, why, note, None)),
        }
    }
    for (_, _, text, _) in &mut grouped {
        if text.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - 3;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
    }
    grouped
}

/// The cached children of kind `K` of the SecureModelDeployment `name` (by label).
pub(crate) fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state_filter(|o| {
            o.namespace().as_deref() == Some(namespace)
                && o.labels().get(DEPLOYMENT_LABEL).map(String::as_str) == Some(name)
        })
        .into_iter()
        .map(|o| (*o).clone())
        .collect()
}
/// The kind of a child, as a static label for metrics, Events, errors and `status.drift`.
pub(crate) fn kind<K: k8s_openapi::Resource>() -> &'static str {
    K::KIND
}

/// At most five items, then a count, so Events and status stay short.
fn summarize(items: &[String]) -> String {
    const MAX: usize = 5;
    if items.len() <= MAX {
        items.join("; ")
    } else {
        format!(
            "{}; and {} more",
            items[..MAX].join("; "),
            items.len() - MAX
        )
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        core::v1::{Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    };

    use super::kind;

    /// Every child kind is named by its own kind in metrics, Events, errors and `status.drift`
    /// (the serving-certificate Secret was once reported as `Object`).
    #[test]
    fn every_child_kind_has_its_own_label() {
        assert_eq!(kind::<Secret>(), "Secret");
        assert_eq!(kind::<ServiceAccount>(), "ServiceAccount");
        assert_eq!(kind::<NetworkPolicy>(), "NetworkPolicy");
        assert_eq!(kind::<Service>(), "Service");
        assert_eq!(kind::<PodDisruptionBudget>(), "PodDisruptionBudget");
        assert_eq!(kind::<Deployment>(), "Deployment");
    }
}
