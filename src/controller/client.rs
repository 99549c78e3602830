//! The ModelClient controller: client certificates with two-sided consent.
//!
//! A ModelClient asks, in the client's namespace; the referenced SecureModelDeployment consents
//! when one of its `spec.access.clients` names that namespace and lists the ServiceAccount. With
//! consent Moat issues a client certificate into the Secret `spec.secretName` (owned by the
//! ModelClient, so deleting the ModelClient deletes it) and renews it at two thirds of its
//! lifetime. Without consent, or when consent is withdrawn, the Secret is deleted and the status
//! says why. Moat never writes a Secret it did not create.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt, controller::Action, events::EventType, reflector::ObjectRef,
        watcher,
    },
};
use tracing::warn;

use super::{
    Context, Error, apply, certs,
    context::{self, Backoff},
    events::publish,
    guard::{self, Guarded},
    models::{Lookup, Models},
};
use crate::{
    api::{
        ModelClient, ModelClientStatus,
        conditions::{self, STALLED, reason},
    },
    core::drift,
    pki::Identity,
    render::{self, MANAGED_BY},
};

pub use crate::render::MODEL_CLIENT_LABEL;

pub use crate::core::consent::consent;

/// What the ModelClient reconciles share: the operator's shared context (client, settings,
/// metrics, Events, the CA, the caches of this scope), the SecureModelDeployment caches of every
/// scope, and their own backoff.
pub(super) struct ClientContext {
    shared: Arc<Context>,
    models: Models,
    failures: Backoff,
}

impl ClientContext {
    fn backoff(&self, mc: &Guarded<ModelClient>) -> std::time::Duration {
        self.failures
            .failed(ObjectRef::from_obj(mc).erase(), tokio::time::Instant::now())
    }

    fn forget_failures(&self, mc: &Guarded<ModelClient>) {
        self.failures.forget(&ObjectRef::from_obj(mc).erase());
    }
}

/// Whether `mc` asks for a certificate to call the model `namespace/name`.
fn refers_to(mc: &Guarded<ModelClient>, namespace: &str, name: &str) -> bool {
    mc.object.as_ref().is_ok_and(|mc| {
        mc.spec.deployment_ref.namespace == namespace && mc.spec.deployment_ref.name == name
    })
}

/// What the ModelClient watch of one scope feeds: the shared cache (the gates' identities are
/// read from it), its fill signal, and the announcement of the model a changed or deleted
/// ModelClient names.
pub(super) struct Reflector {
    pub writer: kube::runtime::reflector::store::Writer<Guarded<ModelClient>>,
    pub synced: tokio::sync::watch::Sender<bool>,
    pub changes: tokio::sync::broadcast::Sender<(String, String)>,
    /// The ModelClients whose Secret changed or went, sent once the shared Secret cache holds
    /// the change.
    pub secrets: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Guarded<ModelClient>>>,
}

/// The ModelClient that controls `secret`, if any.
pub(super) fn owner(secret: &Secret) -> Option<ObjectRef<Guarded<ModelClient>>> {
    let namespace = secret.namespace()?;
    secret
        .owner_references()
        .iter()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == ModelClient::kind(&())
                && o.api_version == ModelClient::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name).within(&namespace))
}

/// Runs the ModelClient controller for one watch scope until dropped. It has no watch of its own
/// on SecureModelDeployments: every reconcile (and deletion) of a model, in any scope, is
/// announced on `smd_changes`, and the model is then read from `models`.
pub(super) async fn run(
    client: Client,
    ns: Option<String>,
    shared: Arc<Context>,
    models: Models,
    ca_changes: impl futures::Stream<Item = ()> + Send + 'static,
    reflector: Reflector,
) {
    let mcs: Api<Guarded<ModelClient>> = super::api(&client, ns.as_deref());
    let Reflector {
        writer,
        synced,
        changes,
        secrets,
    } = reflector;
    let secret_changes = futures::stream::unfold(secrets, |mut rx| async move {
        rx.recv().await.map(|owner| (owner, rx))
    });
    let announce = move |mc: &Guarded<ModelClient>| {
        if let Ok(mc) = &mc.object {
            let target = &mc.spec.deployment_ref;
            let _ = changes.send((target.namespace.clone(), target.name.clone()));
        }
    };
    let store = writer.as_reader();
    let stream = watcher(mcs, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Apply(mc) | watcher::Event::Delete(mc)) => announce(mc),
            Ok(watcher::Event::InitDone) => {
                synced.send_replace(true);
            }
            _ => {}
        })
        .applied_objects();
    let controller = Controller::for_stream(stream, store).trigger_backoff(super::NoMergedBackoff);
    let referring = controller.store();
    // A change to a model's access list re-checks the ModelClients here that refer to it.
    let changed = futures::stream::unfold(shared.smd_changes.subscribe(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(model) => return Some((model, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .flat_map(move |(namespace, name)| {
        futures::stream::iter(
            referring
                .state()
                .iter()
                .filter(|mc| refers_to(mc, &namespace, &name))
                .map(|mc| ObjectRef::from_obj(&**mc))
                .collect::<Vec<_>>(),
        )
    });
    let ctx = Arc::new(ClientContext {
        shared,
        models,
        failures: Backoff::default(),
    });
    controller
        .reconcile_on(secret_changes)
        .reconcile_on(changed)
        .reconcile_all_on(ca_changes)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "ModelClient reconcile failed");
            }
        })
        .await;
}

/// Retries with backoff per ModelClient (`context::backoff_delay`: as long as it has been
/// failing, 1 s to 5 minutes), as the SecureModelDeployment controller does.
fn error_policy(mc: Arc<Guarded<ModelClient>>, e: &Error, ctx: Arc<ClientContext>) -> Action {
    let delay = ctx.backoff(&mc);
    warn!(name = %mc.name_any(), error = %e, retry_in = ?delay, "ModelClient reconcile failed; retrying");
    Action::requeue(delay)
}

fn now() -> Time {
    Time(context::now())
}

#[tracing::instrument(skip_all, fields(kind = "ModelClient", namespace = %mc.namespace().unwrap_or_default(), name = %mc.name_any()))]
async fn reconcile(
    mc: Arc<Guarded<ModelClient>>,
    ctx: Arc<ClientContext>,
) -> Result<Action, Error> {
    let result = match &mc.object {
        Ok(decoded) => converge(decoded.clone(), &ctx).await,
        Err(why) => guard::report_malformed(&mc, why, &ctx.shared).await,
    };
    if result.is_ok() {
        ctx.forget_failures(&mc);
    }
    result
}

/// The reason the model `target` gives no consent, or `Ok` when it consents.
async fn verdict(mc: &ModelClient, models: &Models) -> Result<(), String> {
    let target = &mc.spec.deployment_ref;
    match models.get(&target.namespace, &target.name).await {
        Lookup::Found(smd) => consent(mc, Some(&smd)),
        Lookup::Missing => consent(mc, None),
        Lookup::Malformed(why) => Err(format!(
            "SecureModelDeployment {}/{} cannot be decoded ({why}); it gives no consent until fixed",
            target.namespace, target.name
        )),
        Lookup::NotWatched => Err(format!(
            "Moat does not watch namespace {}, where SecureModelDeployment {} would be; add it to the operator's namespaces",
            target.namespace, target.name
        )),
    }
}

async fn converge(mc: Arc<ModelClient>, ctx: &ClientContext) -> Result<Action, Error> {
    let shared = &*ctx.shared;
    if mc.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = mc.namespace().unwrap_or_default();
    let secret_name = mc.spec.secret_name.clone();
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
    let uid = mc.uid();
    let ours = |s: &Secret| drift::controlled_by(s.owner_references(), uid.as_deref());
    // The cache holds Secrets labelled as Moat's; an unlabelled one of the same name is found by
    // the fresh read before any write.
    let cached = shared
        .caches
        .secrets
        .get(&ObjectRef::new(&secret_name).within(&namespace))
        .map(|s| (*s).clone());
    if let Some(other) = cached.as_ref().filter(|s| !ours(s)) {
        return conflict(&mc, shared, other).await;
    }

    let consented = verdict(&mc, &ctx.models).await;
    tracing::debug!(?consented, "consent of the model");
    if let Err(why) = consented {
        // Withdrawn (or never given) consent: no certificate, no renewal.
        if let Some(secret) = &cached
            && apply::delete_exact(shared, &secrets, &secret_name, secret.uid()).await?
        {
            publish(
                &shared.recorder,
                &shared.metrics,
                &mc.object_ref(&()),
                EventType::Normal,
                reason::CERTIFICATE_WITHDRAWN,
                format!("Deleted Secret {secret_name}: {why}"),
                None,
            )
            .await;
        }
        let mut st = stalled(&mc, reason::NOT_ALLOWED, &why);
        st.certificate = None;
        write_status(&mc, shared, st, false).await?;
        return Ok(Action::requeue(shared.settings.resync_period));
    }

    let lifetime = match render::certificate_lifetime(&mc.spec.certificate_lifetime) {
        Ok(l) => l,
        Err(message) => {
            let why = format!("spec.certificateLifetime: {message}");
            write_status(&mc, shared, stalled(&mc, reason::INVALID_SPEC, &why), true).await?;
            return Ok(Action::await_change());
        }
    };
    let identity = Identity::client(&namespace, &mc.spec.service_account_name);
    let now_s = context::now().as_second();
    let (mut certified, mut desired, mut differs, mut existed) =
        plan(shared, &mc, &identity, lifetime, now_s, cached).await?;
    if differs {
        // Before writing, a fresh read: the cache may lag behind our own last write, and a
        // Secret of this name that is not Moat's is never overwritten.
        let fresh = secrets
            .get_opt(&secret_name)
            .await
            .map_err(|source| Error::Read {
                kind: "Secret",
                source,
            })?;
        if let Some(other) = fresh.as_ref().filter(|s| !ours(s)) {
            return conflict(&mc, shared, other).await;
        }
        (certified, desired, differs, existed) =
            plan(shared, &mc, &identity, lifetime, now_s, fresh).await?;
    }
    if differs {
        let body = render::with_type(&desired).map_err(|source| Error::Serialize {
            kind: "Secret",
            source,
        })?;
        apply::apply_as_moat(shared, &secrets, &secret_name, &body).await?;
        let had_certificate = mc.status.as_ref().is_some_and(|s| s.certificate.is_some());
        let (why, type_, text) = match (certified.issued, existed) {
            (Some(_), false) if had_certificate => (
                reason::DRIFT_REPAIRED,
                EventType::Warning,
                format!(
                    "Secret {secret_name} was deleted outside Moat; issued certificate {} anew",
                    certified.info.serial
                ),
            ),
            (Some(why), _) => (
                reason::CERTIFICATE_ISSUED,
                EventType::Normal,
                format!(
                    "Issued client certificate {} for {} in Secret {secret_name} ({why})",
                    certified.info.serial,
                    identity.spiffe_id(&shared.settings.ca.trust_domain)
                ),
            ),
            (None, _) => (
                reason::DRIFT_REPAIRED,
                EventType::Warning,
                format!("Secret {secret_name} was changed outside Moat; restored it"),
            ),
        };
        if why == reason::DRIFT_REPAIRED {
            shared.metrics.drift_repaired(
                "ModelClient",
                &mc.namespace().unwrap_or_default(),
                &mc.name_any(),
                "Secret",
            );
        }
        publish(
            &shared.recorder,
            &shared.metrics,
            &mc.object_ref(&()),
            type_,
            why,
            text,
            None,
        )
        .await;
    }
    let mut st = mc.status.clone().unwrap_or_default();
    let generation = mc.metadata.generation;
    st.observed_generation = generation;
    let message = format!(
        "client certificate for {} in Secret {secret_name}, renewed at {}",
        identity.spiffe_id(&shared.settings.ca.trust_domain),
        certified.status(&secret_name).renew_at.0
    );
    conditions::set_kstatus(
        &mut st.conditions,
        [
            (true, reason::CERTIFICATE_ISSUED, message),
            (false, reason::AS_EXPECTED, String::new()),
            (false, reason::AS_EXPECTED, String::new()),
        ],
        generation,
        &now(),
    );
    st.certificate = Some(certified.status(&secret_name));
    write_status(&mc, shared, st, false).await?;
    Ok(Action::requeue(
        shared
            .settings
            .resync_period
            .min(certified.renew_in(context::now().as_second())),
    ))
}

/// The certificate to keep or issue given the `live` Secret (this ModelClient's), the Secret that
/// holds it, whether that differs from `live`, and whether `live` exists.
async fn plan(
    ctx: &Context,
    mc: &ModelClient,
    identity: &Identity,
    lifetime: std::time::Duration,
    now: i64,
    live: Option<Secret>,
) -> Result<(certs::Certified, Secret, bool, bool), Error> {
    let secret_name = &mc.spec.secret_name;
    let namespace = mc.namespace().unwrap_or_default();
    let certified = certs::certificate(
        ctx,
        &namespace,
        secret_name,
        live.as_ref(),
        identity,
        lifetime,
        now,
    )
    .await?;
    let desired =
        render::client_secret(mc, secret_name, &certified.tls()).map_err(Error::Invalid)?;
    let differs = live.as_ref().is_none_or(|l| {
        l.data != desired.data
            || l.labels().get(MODEL_CLIENT_LABEL) != Some(&mc.name_any())
            || l.labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                != Some(MANAGED_BY)
    });
    Ok((certified, desired, differs, live.is_some()))
}

/// A Secret named `spec.secretName` exists and is not this ModelClient's: Stalled until the user
/// chooses another name or removes it.
async fn conflict(mc: &ModelClient, ctx: &Context, other: &Secret) -> Result<Action, Error> {
    let why = format!(
        "Secret {} already exists and was not created for this ModelClient; \
         Moat never overwrites it. Choose another spec.secretName or delete the Secret",
        other.name_any()
    );
    write_status(mc, ctx, stalled(mc, reason::CONFLICT, &why), true).await?;
    Ok(Action::requeue(ctx.settings.resync_period))
}

fn stalled(mc: &ModelClient, why: &str, message: &str) -> ModelClientStatus {
    let mut st = mc.status.clone().unwrap_or_default();
    let generation = mc.metadata.generation;
    st.observed_generation = generation;
    conditions::set_stalled(&mut st.conditions, why, message, generation, &now());
    st
}

/// Writes the status when it differs (ignoring transition times); a Warning Event when `warn` and
/// the status changed.
async fn write_status(
    mc: &ModelClient,
    ctx: &Context,
    new: ModelClientStatus,
    warn: bool,
) -> Result<(), Error> {
    let old = mc.status.clone().unwrap_or_default();
    if old.observed_generation == new.observed_generation
        && old.certificate == new.certificate
        && conditions::same_ignoring_time(&old.conditions, &new.conditions)
    {
        return Ok(());
    }
    let api: Api<ModelClient> =
        Api::namespaced(ctx.client.clone(), &mc.namespace().unwrap_or_default());
    // `certificate: null` removes a withdrawn certificate from the status.
    let patch = serde_json::json!({"status": {
        "observedGeneration": new.observed_generation,
        "conditions": new.conditions,
        "certificate": new.certificate,
    }});
    apply::patch_status(ctx, &api, "ModelClient", &mc.name_any(), &patch).await?;
    if let (true, Some(c)) = (warn, new.conditions.iter().find(|c| c.type_ == STALLED)) {
        publish(
            &ctx.recorder,
            &ctx.metrics,
            &mc.object_ref(&()),
            EventType::Warning,
            &c.reason,
            c.message.clone(),
            None,
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn secret(owners: Vec<OwnerReference>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("fraud-client".into()),
                namespace: Some("shop".into()),
                owner_references: Some(owners),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn reference(kind: &str, api_version: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: "checkout".into(),
            uid: "u".into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    #[test]
    fn a_client_secret_names_the_model_client_that_controls_it() {
        let api = ModelClient::api_version(&()).to_string();
        let owned = secret(vec![reference("ModelClient", &api, true)]);
        assert_eq!(
            owner(&owned),
            Some(ObjectRef::new("checkout").within("shop"))
        );
        // Not the controller, another kind, another group: no ModelClient to re-check.
        for other in [
            reference("ModelClient", &api, false),
            reference("SecureModelDeployment", &api, true),
            reference("ModelClient", "example.com/v1", true),
        ] {
            assert_eq!(owner(&secret(vec![other])), None);
        }
    }
}
