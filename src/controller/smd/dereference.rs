//! Step 2, dereference: everything a SecureModelDeployment's rendering depends on that is not in
//! the object, and the live children. Reads only: the image pin (kept from the status, named by
//! the spec, or resolved in the registry), the serving certificate (kept, or issued by the CA;
//! issuing writes nothing), the key Secret and PVC of an encrypted model ([`model_key`], read
//! first so its owner can be set before anything else can fail), Moat's own helper image, and the
//! cached children.

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    jiff::Timestamp,
};
use kube::ResourceExt;

use crate::{
    controller::{Context, Error, apply::cached, certs, resolve, weights},
    image::ImageError,
    pki::Identity,
    render::{self, Valid},
};

/// What [`read`] found.
pub(super) struct Dereferenced {
    /// The image the pods run.
    pub pin: resolve::Pin,
    /// The registry failed, and the pods keep the earlier pin in `pin`.
    pub image_failure: Option<ImageError>,
    /// The serving certificate.
    pub certified: certs::Certified,
    /// Moat's own image for the decrypting init container and the gate, pinned (empty with
    /// neither).
    pub helper_image: String,
    /// The identities the gate lets through.
    pub gate_identities: std::collections::BTreeSet<String>,
    /// The children as the caches hold them.
    pub live: Live,
}

/// The cached children of one SecureModelDeployment, by kind.
pub(super) struct Live {
    pub service_accounts: Vec<ServiceAccount>,
    pub secrets: Vec<Secret>,
    pub network_policies: Vec<NetworkPolicy>,
    pub services: Vec<Service>,
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
    pub deployments: Vec<Deployment>,
    pub config_maps: Vec<ConfigMap>,
}

/// The key Secret of an encrypted model, checked with its PVC source (reads only).
pub(super) async fn model_key(ctx: &Context, valid: &Valid<'_>) -> Result<Option<Secret>, Error> {
    let smd = valid.smd();
    match &smd.spec.model {
        Some(model) => Ok(Some(
            weights::read(ctx, smd, model)
                .await
                .map_err(Error::Weights)?,
        )),
        None => Ok(None),
    }
}

/// Reads what `valid` needs. No unpinned image ever reaches a pod: when the registry fails and
/// the pods have no digest yet, this fails and nothing is applied; when they have one, they keep
/// it and the failure is carried in [`Dereferenced::image_failure`].
pub(super) async fn read(
    ctx: &Context,
    valid: &Valid<'_>,
    now: Timestamp,
) -> Result<Dereferenced, Error> {
    let smd = valid.smd();
    let namespace = smd.namespace().unwrap_or_default();
    let name = smd.name_any();
    let (pin, image_failure) = match resolve::pin(ctx, smd, now).await {
        Ok(pin) => (pin, None),
        Err(e) if e.is_spec_error() => return Err(Error::Image(e)),
        Err(e) => match smd.status.as_ref().and_then(|s| s.image.clone()) {
            Some(previous) => (
                resolve::Pin {
                    status: previous,
                    resolved: false,
                },
                Some(e),
            ),
            None => return Err(Error::Image(e)),
        },
    };
    let helper_image = if smd.spec.model.is_some() || render::gate::enforced(smd) {
        resolve::helper(ctx).await.map_err(Error::Image)?
    } else {
        String::new()
    };
    let gate_identities = ctx.clients.identities(smd, &ctx.settings.ca.trust_domain);
    let c = &ctx.caches;
    let live = Live {
        service_accounts: cached(&c.service_accounts, &namespace, &name),
        secrets: cached(&c.secrets, &namespace, &name),
        network_policies: cached(&c.network_policies, &namespace, &name),
        services: cached(&c.services, &namespace, &name),
        pod_disruption_budgets: cached(&c.pod_disruption_budgets, &namespace, &name),
        deployments: cached(&c.deployments, &namespace, &name),
        config_maps: cached(&c.config_maps, &namespace, &name),
    };
    let secret_name = render::tls_secret_name(&name);
    let identity = Identity::server(&namespace, &name, &name, &ctx.settings.ca.cluster_domain);
    let certified = certs::certificate(
        ctx,
        &namespace,
        &secret_name,
        live.secrets.iter().find(|s| s.name_any() == secret_name),
        &identity,
        valid.certificate_lifetime,
        now.as_second(),
    )
    .await?;
    Ok(Dereferenced {
        pin,
        image_failure,
        certified,
        helper_image,
        gate_identities,
        live,
    })
}
