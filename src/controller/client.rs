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
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};
use tracing::warn;

use super::{Context, Error, FIELD_MANAGER, certs, context, events::publish};
use crate::{
    api::{
        ModelClient, ModelClientStatus, SecureModelDeployment,
        conditions::{self, STALLED, reason},
    },
    pki::Identity,
    render::{self, MANAGED_BY},
};

pub use crate::render::MODEL_CLIENT_LABEL;

pub use crate::core::consent::consent;

/// Runs the ModelClient controller for one watch scope until dropped.
pub(super) async fn run(
    client: Client,
    ns: Option<String>,
    ctx: Arc<Context>,
    ca_changes: impl futures::Stream<Item = ()> + Send + 'static,
) {
    let mcs: Api<ModelClient> = super::api(&client, ns.as_deref());
    let smds: Api<SecureModelDeployment> = super::api(&client, ns.as_deref());
    let secrets: Api<Secret> = super::api(&client, ns.as_deref());
    let controller = Controller::new(mcs, watcher::Config::default().any_semantic());
    let store = controller.store();
    // Models reconciled in any watch scope re-check the ModelClients here that refer to them.
    let referring = store.clone();
    let changed = futures::stream::unfold(ctx.smd_changes.subscribe(), |mut rx| async move {
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
                .filter(|mc| {
                    mc.spec.deployment_ref.namespace == namespace
                        && mc.spec.deployment_ref.name == name
                })
                .map(|mc| ObjectRef::from_obj(&**mc))
                .collect::<Vec<_>>(),
        )
    });
    controller
        // A change to a model's access list re-checks the ModelClients that refer to it.
        .watches(smds, watcher::Config::default(), move |smd| {
            let (namespace, name) = (smd.namespace().unwrap_or_default(), smd.name_any());
            store
                .state()
                .iter()
                .filter(|mc| {
                    mc.spec.deployment_ref.namespace == namespace
                        && mc.spec.deployment_ref.name == name
                })
                .map(|mc| ObjectRef::from_obj(&**mc))
                .collect::<Vec<_>>()
        })
        .owns(
            secrets,
            watcher::Config::default().labels(MODEL_CLIENT_LABEL),
        )
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

/// Retries with backoff per ModelClient (`context::backoff_delay`: as long as it has been failing,
/// 1 s to 5 minutes), as the
/// SecureModelDeployment controller does.
fn error_policy(mc: Arc<ModelClient>, e: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&ObjectRef::from_obj(&*mc));
    warn!(name = %mc.name_any(), error = %e, retry_in = ?delay, "ModelClient reconcile failed; retrying");
    Action::requeue(delay)
}

fn now() -> Time {
    Time(context::now())
}

#[tracing::instrument(skip_all, fields(kind = "ModelClient", namespace = %mc.namespace().unwrap_or_default(), name = %mc.name_any()))]
async fn reconcile(mc: Arc<ModelClient>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(&*mc);
    let result = converge(mc, ctx.clone()).await;
    if result.is_ok() {
        ctx.forget_failures(&key);
    }
    result
}

async fn converge(mc: Arc<ModelClient>, ctx: Arc<Context>) -> Result<Action, Error> {
    if mc.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = mc.namespace().unwrap_or_default();
    let secret_name = mc.spec.secret_name.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::Read {
            kind: "Secret",
            source,
        })?;
    let uid = mc.uid();
    let ours = live.as_ref().is_some_and(|s| {
        s.owner_references()
            .iter()
            .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
    });
    if live.is_some() && !ours {
        let why = format!(
            "Secret {secret_name} already exists and was not created for this ModelClient; \
             Moat never overwrites it. Choose another spec.secretName or delete the Secret"
        );
        write_status(&mc, &ctx, stalled(&mc, reason::CONFLICT, &why), true).await?;
        return Ok(Action::requeue(ctx.settings.resync_period));
    }

    let target = &mc.spec.deployment_ref;
    let smd = Api::<SecureModelDeployment>::namespaced(ctx.client.clone(), &target.namespace)
        .get_opt(&target.name)
        .await;
    let verdict = match smd {
        Ok(smd) => consent(&mc, smd.as_ref()),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(format!(
            "Moat may not read SecureModelDeployments in namespace {}; it must watch that namespace",
            target.namespace
        )),
        Err(source) => {
            return Err(Error::Read {
                kind: "SecureModelDeployment",
                source,
            });
        }
    };
    if let Err(why) = verdict {
        // Withdrawn (or never given) consent: no certificate, no renewal.
        if let (true, Some(secret)) = (ours, live.as_ref()) {
            ctx.metrics.api_write("Secret", "delete");
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: secret.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match secrets.delete(&secret_name, &dp).await {
                Ok(_) => {
                    publish(
                        &ctx.recorder,
                        &ctx.metrics,
                        &mc.object_ref(&()),
                        EventType::Normal,
                        reason::CERTIFICATE_WITHDRAWN,
                        format!("Deleted Secret {secret_name}: {why}"),
                        None,
                    )
                    .await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(source) => {
                    return Err(Error::Prune {
                        kind: "Secret",
                        name: secret_name,
                        source,
                    });
                }
            }
        }
        let mut st = stalled(&mc, reason::NOT_ALLOWED, &why);
        st.certificate = None;
        write_status(&mc, &ctx, st, false).await?;
        return Ok(Action::requeue(ctx.settings.resync_period));
    }

    let lifetime = match render::certificate_lifetime(&mc.spec.certificate_lifetime) {
        Ok(l) => l,
        Err(message) => {
            let why = format!("spec.certificateLifetime: {message}");
            write_status(&mc, &ctx, stalled(&mc, reason::INVALID_SPEC, &why), true).await?;
            return Ok(Action::await_change());
        }
    };
    let identity = Identity::client(&namespace, &mc.spec.service_account_name);
    let certified = certs::certificate(
        &ctx,
        &namespace,
        &secret_name,
        live.as_ref().filter(|_| ours),
        &identity,
        lifetime,
        context::now().as_second(),
    )
    .await?;
    let desired =
        render::client_secret(&mc, &secret_name, &certified.tls()).map_err(Error::Invalid)?;
    let differs = live.as_ref().is_none_or(|l| {
        l.data != desired.data
            || l.labels().get(MODEL_CLIENT_LABEL) != Some(&mc.name_any())
            || l.labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                != Some(MANAGED_BY)
    });
    if differs {
        ctx.metrics.api_write("Secret", "apply");
        secrets
            .patch(
                &secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(
                    render::with_type(&desired).map_err(|source| Error::Serialize {
                        kind: "Secret",
                        source,
                    })?,
                ),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: "Secret",
                name: secret_name.clone(),
                source,
            })?;
        let had_certificate = mc.status.as_ref().is_some_and(|s| s.certificate.is_some());
        let note = match (certified.issued, live.is_some()) {
            (Some(_), false) if had_certificate => Some((
                reason::DRIFT_REPAIRED,
                EventType::Warning,
                format!(
                    "Secret {secret_name} was deleted outside Moat; issued certificate {} anew",
                    certified.info.serial
                ),
            )),
            (Some(why), _) => Some((
                reason::CERTIFICATE_ISSUED,
                EventType::Normal,
                format!(
                    "Issued client certificate {} for {} in Secret {secret_name} ({why})",
                    certified.info.serial,
                    identity.spiffe_id(&ctx.settings.ca.trust_domain)
                ),
            )),
            (None, _) => Some((
                reason::DRIFT_REPAIRED,
                EventType::Warning,
                format!("Secret {secret_name} was changed outside Moat; restored it"),
            )),
        };
        if let Some((why, type_, text)) = note {
            if why == reason::DRIFT_REPAIRED {
                ctx.metrics.drift_repaired("Secret");
            }
            publish(
                &ctx.recorder,
                &ctx.metrics,
                &mc.object_ref(&()),
                type_,
                why,
                text,
                None,
            )
            .await;
        }
    }
    let mut st = mc.status.clone().unwrap_or_default();
    let generation = mc.metadata.generation;
    st.observed_generation = generation;
    let message = format!(
        "client certificate for {} in Secret {secret_name}, renewed at {}",
        identity.spiffe_id(&ctx.settings.ca.trust_domain),
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
    write_status(&mc, &ctx, st, false).await?;
    Ok(Action::requeue(
        ctx.settings
            .resync_period
            .min(certified.renew_in(context::now().as_second())),
    ))
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
    ctx.metrics.api_write("ModelClient", "patch-status");
    // `certificate: null` removes a withdrawn certificate from the status.
    let patch = serde_json::json!({"status": {
        "observedGeneration": new.observed_generation,
        "conditions": new.conditions,
        "certificate": new.certificate,
    }});
    api.patch_status(
        &mc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::Status)?;
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
