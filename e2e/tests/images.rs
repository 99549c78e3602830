//! Image pinning against a real registry on loopback (Debian's `docker-registry`, TLS from its
//! own CA, basic auth), with images pushed by skopeo, and the local control plane: a tag becomes
//! the digest skopeo reports in the pod template and the status; moving the tag changes nothing
//! until the spec changes or re-resolution is requested; credentials come from the
//! imagePullSecrets; policies refuse what they must; a registry outage leaves running workloads
//! untouched.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
    image::Registry as Resolver,
};
use moat_e2e::{
    DEADLINE, NamespaceOptions, Operator, TestEnv, deadline_after_backoff,
    registry::{Registry, RegistryOptions, TestImage},
    wait_condition, wait_event, wait_for, wait_smd, wait_smd_within, with_namespace,
};
use serde_json::json;

/// The model `name`: one replica of `image`, pulled with the Secrets `pull_secrets`.
fn smd(name: &str, image: &str, pull_secrets: &[&str]) -> fixture::SmdFixture {
    fixture::smd(name)
        .replicas(1)
        .image(image)
        .image_pull_secrets(pull_secrets)
}

async fn pull_secret(env: &TestEnv, name: &str, dockerconfigjson: &[u8]) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": k8s_openapi::ByteString(dockerconfigjson.to_vec())}
    }))?;
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// An operator for the test's namespace that trusts the registry's CA.
async fn operator(env: &TestEnv, registry: &Registry, allowed: &[&str]) -> Result<Operator> {
    let resolver = Resolver::new(Some(registry.ca_pem()), Duration::from_secs(5))
        .map_err(anyhow::Error::msg)?;
    env.operator()
        .settings(|s| {
            s.image.registry = resolver;
            s.image.allowed_registries = allowed.iter().map(|a| a.to_string()).collect();
        })
        .start()
        .await
}

async fn pod_image(env: &TestEnv, name: &str) -> Result<Option<String>> {
    Ok(env
        .api::<Deployment>()
        .get_opt(name)
        .await?
        .and_then(|d| d.spec)
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.image))
}

async fn wait_pod_image(env: &TestEnv, name: &str, want: &str) -> Result<()> {
    wait_pod_image_within(DEADLINE, env, name, want).await
}

/// [`wait_pod_image`] with another deadline (see [`deadline_after_backoff`]).
async fn wait_pod_image_within(
    timeout: Duration,
    env: &TestEnv,
    name: &str,
    want: &str,
) -> Result<()> {
    wait_for(
        timeout,
        &format!("the pods of {name} to run {want}"),
        || async { Ok(pod_image(env, name).await?.as_deref() == Some(want)) },
    )
    .await
}

/// Waits until `status.image.pinned` of `name` is `pinned` (Moat writes the status after it has
/// applied the Deployment, so a pod template with the digest does not mean the status has it);
/// returns the SecureModelDeployment.
async fn wait_pinned(env: &TestEnv, name: &str, pinned: &str) -> Result<SecureModelDeployment> {
    wait_smd(
        &env.api(),
        name,
        &format!("status.image.pinned {pinned}"),
        |s| {
            s.status
                .as_ref()
                .and_then(|s| s.image.as_ref())
                .is_some_and(|i| i.pinned == pinned)
        },
    )
    .await
}

/// Makes the operator reconcile `name` (a label change is a watch event) and waits until a
/// reconcile that started after the change has completed. Only `name` exists in the operator's
/// namespace when this is used, so that reconcile is one of `name`.
async fn nudge(env: &TestEnv, op: &Operator, name: &str, value: &str) -> Result<()> {
    let mark = op.reconciles_started()?;
    let p = json!({"metadata": {"labels": {"e2e-nudge": value}}});
    env.api::<SecureModelDeployment>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?;
    op.wait_reconciles_after(
        mark,
        1,
        &format!("{name} after the label e2e-nudge={value}"),
    )
    .await
}

#[tokio::test]
async fn tags_are_pinned_once_and_only_moved_on_request() {
    with_namespace("images-pin", NamespaceOptions::restricted(), |env| async move {
        let registry = Registry::start(RegistryOptions::default()).await?;
        let op = operator(&env, &registry, &[]).await?;
        pull_secret(&env, "pull", &registry.dockerconfigjson()).await?;
        let smds: Api<SecureModelDeployment> = env.api();

        // 1. A tag resolves to exactly what skopeo reports; the pods get repository@digest.
        let first = registry.push("serving/model:v1", &TestImage::single("one")).await?;
        let tag = registry.image_ref("serving/model:v1");
        let repo = registry.image_ref("serving/model");
        smds.create(&PostParams::default(), &smd("model", &tag, &["pull"]).build()?).await?;
        wait_pod_image(&env, "model", &format!("{repo}@{first}")).await?;
        println!("pinned {tag} to {first}");
        let status = wait_pinned(&env, "model", &format!("{repo}@{first}")).await?.status.context("status")?;
        let image = status.image.context("status.image")?;
        ensure!(image.requested == tag && image.pinned == format!("{repo}@{first}"), "{image:?}");
        ensure!(image.resolved_at.is_some(), "resolvedAt missing");
        let pod = env.api::<Deployment>().get("model").await?.spec.and_then(|s| s.template.spec).context("pod")?;
        let pulls: Vec<String> = pod.image_pull_secrets.unwrap_or_default().into_iter().map(|r| r.name).collect();
        ensure!(pulls == ["pull"], "imagePullSecrets of the pods: {pulls:?}");
        wait_event(&env, &env.namespace, "model", "ImagePinned", &[&first])
            .await
            .context("no ImagePinned Event naming the digest")?;

        // 2. Moving the tag changes nothing until asked; a new annotation value re-resolves.
        let moved = registry.move_tag("serving/model:v1", &TestImage::single("two")).await?;
        ensure!(moved != first, "the tag did not move");
        nudge(&env, &op, "model", "1").await?;
        ensure!(pod_image(&env, "model").await?.as_deref() == Some(&format!("{repo}@{first}")[..]), "the moved tag reached the pods");
        let p = json!({"metadata": {"annotations": {"moat.dev/resolve-image": "2026-11-23T18:00:00Z"}}});
        smds.patch("model", &PatchParams::default(), &Patch::Merge(&p)).await?;
        wait_pod_image(&env, "model", &format!("{repo}@{moved}")).await?;
        let image = wait_pinned(&env, "model", &format!("{repo}@{moved}")).await?.status.and_then(|s| s.image).context("status.image")?;
        ensure!(image.resolve_request.as_deref() == Some("2026-11-23T18:00:00Z"), "{image:?}");
        // ...and a spec change resolves the new tag.
        let second = registry.push("serving/model:v2", &TestImage::single("three")).await?;
        let p = json!({"spec": {"server": {"image": registry.image_ref("serving/model:v2")}}});
        smds.patch("model", &PatchParams::default(), &Patch::Merge(&p)).await?;
        wait_pod_image(&env, "model", &format!("{repo}@{second}")).await?;

        // A multi-arch image is pinned by its index digest.
        let index = registry.push("serving/multi:v1", &TestImage::multi_arch("four")).await?;
        ensure!(index == registry.index_digest("serving/multi:v1").await?);
        smds.create(&PostParams::default(), &smd("multi", &registry.image_ref("serving/multi:v1"), &["pull"]).build()?)
            .await?;
        wait_pod_image(&env, "multi", &format!("{}@{index}", registry.image_ref("serving/multi"))).await?;
        wait_condition(&env, "multi", conditions::READY, "RolloutComplete").await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn credentials_and_policies_give_clear_status() {
    with_namespace("images-policy", NamespaceOptions::restricted(), |env| async move {
        let registry = Registry::start(RegistryOptions::default()).await?;
        let _op = operator(&env, &registry, &[]).await?;
        registry.push("serving/model:v1", &TestImage::single("one")).await?;
        let tag = registry.image_ref("serving/model:v1");
        let smds: Api<SecureModelDeployment> = env.api();
        let deployments: Api<Deployment> = env.api();

        // A pull Secret that does not exist.
        smds.create(&PostParams::default(), &smd("missing", &tag, &["nope"]).build()?).await?;
        let m = wait_condition(&env, "missing", conditions::STALLED, "ImagePullSecretRejected").await?;
        ensure!(m.contains("image pull Secret nope") && m.contains("does not exist"), "{m}");
        // No credentials at all: the registry refuses.
        smds.create(&PostParams::default(), &smd("anonymous", &tag, &[]).build()?).await?;
        let m = wait_condition(&env, "anonymous", conditions::STALLED, "ImagePullSecretRejected").await?;
        ensure!(m.contains("refused access") && m.contains("spec.imagePullSecrets"), "{m}");
        // Wrong credentials, then fixed: Moat retries (with backoff) and pins.
        let wrong = json!({"auths": {registry.host(): {
            "username": registry.username(), "password": "wrong-password"
        }}});
        pull_secret(&env, "pull", wrong.to_string().as_bytes()).await?;
        smds.create(&PostParams::default(), &smd("wrong", &tag, &["pull"]).build()?).await?;
        let failing_since = Instant::now();
        let m = wait_condition(&env, "wrong", conditions::STALLED, "ImagePullSecretRejected").await?;
        ensure!(!m.contains("wrong-password"), "the password leaked into the status: {m}");
        for name in ["missing", "anonymous", "wrong"] {
            ensure!(deployments.get_opt(name).await?.is_none(), "{name} got a Deployment without a digest");
        }
        let p = json!({"data": {".dockerconfigjson": k8s_openapi::ByteString(registry.dockerconfigjson())}});
        env.api::<Secret>().patch("pull", &PatchParams::default(), &Patch::Merge(&p)).await?;
        // Moat does not watch pull Secrets: its retries (with backoff) notice the fix.
        moat_e2e::wait_condition_within(deadline_after_backoff(failing_since), &env, "wrong", conditions::READY, "RolloutComplete").await?;
        ensure!(pod_image(&env, "wrong").await?.is_some_and(|i| i.contains("@sha256:")));

        // A tag that does not exist.
        smds.create(&PostParams::default(), &smd("unknown", &registry.image_ref("serving/model:v9"), &["pull"]).build()?)
            .await?;
        let m = wait_condition(&env, "unknown", conditions::STALLED, "ImageNotFound").await?;
        ensure!(m.contains("serving/model:v9") && m.contains("not found"), "{m}");

        // RequireDigest: the API server refuses a tag.
        let strict = smd("strict", &tag, &["pull"]).set(&["spec", "imagePolicy"], json!("RequireDigest"));
        let e = smds
            .create(&PostParams::default(), &strict.build()?)
            .await
            .expect_err("a tag under RequireDigest");
        ensure!(e.to_string().contains("must name a digest"), "{e}");
        let digest = registry.inspect_digest("serving/model:v1").await?;
        let strict = strict.image(&format!("{}@{digest}", registry.image_ref("serving/model")));
        smds.create(&PostParams::default(), &strict.build()?).await?;
        wait_pod_image(&env, "strict", &format!("{}@{digest}", registry.image_ref("serving/model"))).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn registries_outside_the_allow_list_are_refused() {
    with_namespace(
        "images-allow",
        NamespaceOptions::restricted(),
        |env| async move {
            let registry = Registry::start(RegistryOptions::default()).await?;
            let _op = operator(&env, &registry, &["trusted.example.com"]).await?;
            registry
                .push("serving/model:v1", &TestImage::single("one"))
                .await?;
            pull_secret(&env, "pull", &registry.dockerconfigjson()).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            smds.create(
                &PostParams::default(),
                &smd("model", &registry.image_ref("serving/model:v1"), &["pull"]).build()?,
            )
            .await?;
            let m =
                wait_condition(&env, "model", conditions::STALLED, "RegistryNotAllowed").await?;
            ensure!(
                m.contains(&format!("registry {} is not allowed", registry.host())),
                "{m}"
            );
            ensure!(m.contains("trusted.example.com"), "{m}");
            ensure!(
                env.api::<Deployment>().get_opt("model").await?.is_none(),
                "deployed from a registry not allowed"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_registry_outage_leaves_running_workloads_untouched() {
    with_namespace("images-outage", NamespaceOptions::restricted(), |env| async move {
        let mut registry = Registry::start(RegistryOptions::default()).await?;
        let op = operator(&env, &registry, &[]).await?;
        pull_secret(&env, "pull", &registry.dockerconfigjson()).await?;
        let first = registry.push("serving/model:v1", &TestImage::single("one")).await?;
        let second = registry.push("serving/model:v2", &TestImage::single("two")).await?;
        let repo = registry.image_ref("serving/model");
        let smds: Api<SecureModelDeployment> = env.api();
        smds.create(&PostParams::default(), &smd("model", &registry.image_ref("serving/model:v1"), &["pull"]).build()?)
            .await?;
        wait_condition(&env, "model", conditions::READY, "RolloutComplete").await?;
        wait_pod_image(&env, "model", &format!("{repo}@{first}")).await?;
        let deployments: Api<Deployment> = env.api();
        let generation = deployments.get("model").await?.metadata.generation;

        let outage = Instant::now();
        registry.stop().await?;
        // Drift is still repaired from the pin, without the registry.
        let p = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil.example.com/miner:latest"}]}}}});
        deployments.patch("model", &PatchParams::default(), &Patch::Strategic(p)).await?;
        wait_pod_image(&env, "model", &format!("{repo}@{first}")).await?;
        // A new tag cannot be resolved: the pods keep their digest, the status says why.
        let generation = deployments.get("model").await?.metadata.generation.max(generation);
        let p = json!({"spec": {"server": {"image": registry.image_ref("serving/model:v2")}}});
        smds.patch("model", &PatchParams::default(), &Patch::Merge(&p)).await?;
        let m = wait_condition(&env, "model", conditions::RECONCILING, "RegistryUnreachable").await?;
        ensure!(m.contains("serving/model:v2") && m.contains("retrying"), "{m}");
        // "Untouched" is observed over a bounded window, counted in attempts rather than seconds:
        // two more failed reconciles after the condition was reported (retries after the backoff,
        // 2 s and more by then; idle, about as long as the 3 s sleep this replaces). Each attempt
        // applies the children again and is a chance to change the pods. Only "model" exists in
        // the namespace yet, so these reconciles are its own.
        let mark = op.reconciles_started()?;
        op.wait_reconciles_after(mark, 2, "model retrying during the outage").await?;
        ensure!(pod_image(&env, "model").await?.as_deref() == Some(&format!("{repo}@{first}")[..]));
        ensure!(deployments.get("model").await?.metadata.generation == generation, "the Deployment changed during the outage");
        let image = smds.get("model").await?.status.and_then(|s| s.image).context("status.image")?;
        ensure!(image.pinned == format!("{repo}@{first}"), "status.image changed: {image:?}");
        // A model with no digest yet gets no Deployment at all.
        smds.create(&PostParams::default(), &smd("fresh", &registry.image_ref("serving/model:v1"), &["pull"]).build()?)
            .await?;
        wait_condition(&env, "fresh", conditions::RECONCILING, "RegistryUnreachable").await?;
        ensure!(deployments.get_opt("fresh").await?.is_none(), "deployed without a digest");

        // The registry comes back: the retries (with backoff, grown while the outage lasted) pin
        // the new tag.
        registry.restart().await?;
        wait_pod_image_within(deadline_after_backoff(outage), &env, "model", &format!("{repo}@{second}")).await?;
        wait_pod_image_within(deadline_after_backoff(outage), &env, "fresh", &format!("{repo}@{first}")).await?;
        wait_smd_within(deadline_after_backoff(outage), &smds, "model", "status.image.pinned to the new tag's digest", |s| {
            s.status.as_ref().and_then(|s| s.image.as_ref()).is_some_and(|i| i.pinned == format!("{repo}@{second}"))
        })
        .await?;
        println!("names in {}: {:?}", env.namespace, smds.list(&ListParams::default()).await?.items.iter().map(|s| s.name_any()).collect::<Vec<_>>());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn moats_own_helper_image_is_pinned_too() {
    with_namespace("images-helper", NamespaceOptions::restricted(), |env| async move {
        // Moat's own image comes from a registry that needs no credentials.
        let registry = Registry::start(RegistryOptions::anonymous()).await?;
        let digest = registry.push("moat:0.1", &TestImage::single("moat")).await?;
        let resolver = Resolver::new(Some(registry.ca_pem()), Duration::from_secs(5))
            .map_err(anyhow::Error::msg)?;
        let _op = env
            .operator()
            .settings(|s| {
                s.image.registry = resolver;
                s.image.helper_image = registry.image_ref("moat:0.1");
            })
            .start()
            .await?;
        let key: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key"},
            "stringData": {"identity": "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"}
        }))?;
        env.api::<Secret>().create(&PostParams::default(), &key).await?;
        let model = smd("model", moat_e2e::TEST_IMAGE, &[]).limits("1", "2Gi").model(json!({
            "source": {"url": "https://artifacts.example.com/m.tar.age"},
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "decryptionKeySecretRef": {"name": "key", "key": "identity"},
            "mountPath": "/models/m", "sizeLimit": "1Gi"
        }));
        let smds: Api<SecureModelDeployment> = env.api();
        smds.create(&PostParams::default(), &model.build()?).await?;
        let want = format!("{}@{digest}", registry.image_ref("moat"));
        wait_for(DEADLINE, "the init container to run the pinned helper", || async {
            let init = env
                .api::<Deployment>()
                .get_opt("model")
                .await?
                .and_then(|d| d.spec)
                .and_then(|s| s.template.spec)
                .and_then(|p| p.init_containers)
                .and_then(|c| c.into_iter().next())
                .and_then(|c| c.image);
            Ok(init.as_deref() == Some(want.as_str()))
        })
        .await?;
        Ok(())
    })
    .await;
}
