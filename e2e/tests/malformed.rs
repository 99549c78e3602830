//! A malformed object on a watch is skipped and reported, never fatal: one SecureModelDeployment
//! that does not decode into Moat's types (here written straight into etcd, as a restore of an old
//! backup or an object stored under another schema would leave it) must not stop the others from
//! being reconciled, nor an operator from starting.

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{
    NamespaceOptions, Operator, TestEnv, etcdctl, wait_condition, wait_event, wait_for_value,
    wait_until, with_namespace,
};
use serde_json::{Value, json};

/// The SMD `name` as stored, read without Moat's types.
fn raw_api(env: &TestEnv) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("moat.dev", "v1alpha1", "SecureModelDeployment");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "securemodeldeployments");
    Api::namespaced_with(env.client.clone(), &env.namespace, &resource)
}

/// Rewrites the stored SMD `name` so that `spec.server.port` is a string: the API server serves
/// it, and Moat's types (an integer port) cannot decode it.
async fn corrupt(env: &TestEnv, name: &str) -> Result<()> {
    let key = format!(
        "/registry/moat.dev/securemodeldeployments/{}/{name}",
        env.namespace
    );
    let stored = etcdctl(&["get", &key, "--print-value-only"]).await?;
    let mut object: Value = serde_json::from_slice(&stored)
        .with_context(|| format!("the value under {key} is not JSON"))?;
    object["spec"]["server"]["port"] = json!("eight thousand");
    etcdctl(&["put", &key, &object.to_string()]).await?;
    Ok(())
}

/// Waits until the stored SMD `name` reports `Stalled` with reason `Malformed`; its message.
async fn wait_malformed(env: &TestEnv, name: &str) -> Result<String> {
    let raw = raw_api(env);
    wait_for_value(
        moat_e2e::DEADLINE,
        &format!("{name} Stalled/{}", conditions::reason::MALFORMED),
        || async {
            let obj = raw.get(name).await?;
            let stalled = obj.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["type"] == conditions::STALLED
                        && c["status"] == "True"
                        && c["reason"] == conditions::reason::MALFORMED
                });
            Ok(stalled.and_then(|c| c["message"].as_str().map(str::to_string)))
        },
    )
    .await
}

async fn replicas(env: &TestEnv, name: &str) -> Result<Option<i32>> {
    Ok(env
        .api::<Deployment>()
        .get_opt(name)
        .await?
        .and_then(|d| d.spec)
        .and_then(|s| s.replicas))
}

async fn scale(env: &TestEnv, name: &str, to: i32) -> Result<()> {
    env.api::<SecureModelDeployment>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": to}})),
        )
        .await?;
    wait_until(&format!("Deployment {name} at {to} replicas"), || async {
        Ok(replicas(env, name).await? == Some(to))
    })
    .await
}

#[tokio::test]
async fn a_malformed_model_is_reported_and_skipped_while_the_others_are_reconciled() {
    with_namespace(
        "malformed-object",
        NamespaceOptions::restricted(),
        |env| async move {
            let op = env.operator().start().await?;
            let smds = env.api::<SecureModelDeployment>();
            let pp = PostParams::default();
            for name in ["good", "bad"] {
                let smd = fixture::smd(name).replicas(1).build()?;
                smds.create(&pp, &smd).await?;
            }
            wait_condition(&env, "bad", conditions::READY, "RolloutComplete").await?;

            corrupt(&env, "bad").await?;
            let message = wait_malformed(&env, "bad").await?;
            ensure!(
                message.contains("cannot decode") && message.contains("invalid type"),
                "the condition names what is wrong: {message}"
            );
            wait_event(
                &env,
                &env.namespace,
                "bad",
                conditions::reason::MALFORMED,
                &["invalid type"],
            )
            .await?;
            // The other model is still reconciled by the same operator.
            scale(&env, "good", 2).await?;

            // A fresh operator lists a scope that holds the malformed object: its cache fills,
            // it turns ready, and it reconciles the others.
            op.kill().await;
            let op = Operator::start(&env.namespace).await?;
            wait_until("the new operator's caches to sync", || async {
                Ok(op.metrics.encode()?.contains("moat_caches_synced 1"))
            })
            .await?;
            scale(&env, "good", 1).await?;
            // The bad model's children are kept as they were, not deleted.
            ensure!(
                replicas(&env, "bad").await? == Some(1),
                "the malformed model's Deployment was changed"
            );

            // Fixed through the API, it is reconciled again.
            smds.patch(
                "bad",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"server": {"port": 8000}, "replicas": 2}})),
            )
            .await?;
            wait_until("Deployment bad at 2 replicas", || async {
                Ok(replicas(&env, "bad").await? == Some(2))
            })
            .await?;
            let ready = wait_condition(&env, "bad", conditions::READY, "RolloutComplete").await?;
            ensure!(!ready.is_empty(), "the Ready condition has a message");
            Ok(())
        },
    )
    .await;
}
