//! Moat driven through Git by a real GitOps controller: Flux's source-controller and
//! kustomize-controller (pinned, built by `e2e/flux.sh`, run as processes against the local
//! control plane) sync a SecureModelDeployment from a Git repository served over smart HTTP on
//! loopback (`moat_e2e::git`). The Kustomization waits for the model's health (kstatus, as Flux
//! does), so it is Ready only when the model is. A commit whose new revision never becomes ready
//! (its pods cannot be scheduled, 10 s progress deadline) is rolled back by Moat while the spec in
//! the cluster stays what Git says (only kustomize-controller writes it), and the Kustomization
//! reports the failure; `git revert` brings everything back to Ready.

use anyhow::{Context, Result, ensure};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{
    DEADLINE, NamespaceOptions, TestEnv, current_condition, flux, git::GitServer, is_ready,
    kstatus, wait_for_value, wait_smd, with_namespace,
};
use serde_json::{Value, json};

const MODEL: &str = "scorer";
const FILE: &str = "deploy/scorer.yaml";
/// The name of the GitRepository and of the Kustomization.
const SYNC: &str = "models";

fn git_repositories(env: &TestEnv) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository");
    Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "gitrepositories"),
    )
}

fn kustomizations(env: &TestEnv) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization");
    Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &ApiResource::from_gvk_with_plural(&gvk, "kustomizations"),
    )
}

/// The model as committed to Git: two replicas on the kwok nodes, plus `change` merged into the
/// spec.
fn manifest(namespace: &str, change: &Value) -> Result<String> {
    let mut obj = fixture::smd(MODEL).namespace(namespace).replicas(2).json();
    if let (Some(spec), Some(extra)) = (obj["spec"].as_object_mut(), change.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    Ok(serde_yaml::to_string(&obj)?)
}

/// Flux's revision string for a commit on `main`.
fn revision(commit: &str) -> String {
    format!("main@sha1:{commit}")
}

/// The Kustomization's Ready condition (status, reason, message) and its last applied and last
/// attempted revisions.
fn sync_state(k: &DynamicObject) -> (Option<(String, String, String)>, String, String) {
    let status = &k.data["status"];
    let generation = k.metadata.generation;
    let ready = status["conditions"].as_array().and_then(|cs| {
        cs.iter()
            .find(|c| c["type"] == "Ready" && c["observedGeneration"].as_i64() == generation)
            .map(|c| {
                let s = |f: &str| c[f].as_str().unwrap_or_default().to_string();
                (s("status"), s("reason"), s("message"))
            })
    });
    let s = |f: &str| status[f].as_str().unwrap_or_default().to_string();
    (ready, s("lastAppliedRevision"), s("lastAttemptedRevision"))
}

/// Waits until the Kustomization has attempted `commit` and its Ready condition is `ready`;
/// returns the condition's reason and message.
async fn wait_sync(env: &TestEnv, commit: &str, ready: bool) -> Result<(String, String)> {
    let api = kustomizations(env);
    let want = revision(commit);
    let expected = if ready { "True" } else { "False" };
    wait_for_value(
        DEADLINE * 2,
        &format!("Kustomization {SYNC}: Ready={expected} at {want}"),
        || async {
            let k = api.get(SYNC).await?;
            let (cond, applied, attempted) = sync_state(&k);
            Ok(cond.and_then(|(status, reason, message)| {
                (status == expected
                    && attempted == want
                    && (!ready || (applied == want && reason != "Progressing")))
                    .then_some((reason, message))
            }))
        },
    )
    .await
}

/// Every field Git sets in the spec has the same value in the cluster, and only
/// kustomize-controller manages fields of the spec (Moat never writes it).
async fn spec_is_gits(env: &TestEnv, git: &GitServer) -> Result<()> {
    let in_git: Value = serde_yaml::from_str(&git.show(FILE)?)?;
    let smds = env.api::<SecureModelDeployment>();
    let live = smds.get(MODEL).await?;
    let live_spec = serde_json::to_value(&live.spec)?;
    subset(&in_git["spec"], &live_spec, "spec")?;
    let spec_managers: Vec<String> = live
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:spec").is_some())
        })
        .filter_map(|m| m.manager)
        .collect();
    ensure!(
        spec_managers == ["kustomize-controller"],
        "the spec's field managers are {spec_managers:?}"
    );
    Ok(())
}

/// `want` (from Git) is contained in `got` (the cluster's object): same scalars, every key.
fn subset(want: &Value, got: &Value, path: &str) -> Result<()> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                subset(v, g.get(k).unwrap_or(&Value::Null), &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                subset(a, b, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => {
            ensure!(
                want == got,
                "{path}: Git says {want}, the cluster has {got}"
            );
            Ok(())
        }
    }
}

/// Deletes the Flux objects while the controllers still run (their finalizers need them), so
/// the test namespace can go; a finalizer left by a controller that died is removed.
async fn delete_flux_objects(env: &TestEnv) {
    for api in [kustomizations(env), git_repositories(env)] {
        let _ = api.delete(SYNC, &DeleteParams::default()).await;
        let gone = wait_for_value(DEADLINE, "the Flux object deleted", || async {
            Ok(api.get_opt(SYNC).await?.is_none().then_some(()))
        })
        .await;
        if gone.is_err() {
            let _ = api
                .patch(
                    SYNC,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_syncs_a_model_from_git_and_moat_rolls_back_a_failed_commit_without_touching_the_spec()
{
    let binaries = flux::binaries().expect("build or find the Flux controllers (e2e/flux.sh)");
    flux::install_crds(&binaries).expect("install the Flux CRDs");
    with_namespace("flux-git", NamespaceOptions::default(), |env| async move {
        let mut controllers = flux::Controllers::start(&binaries, &env.namespace)?;
        let outcome = scenario(&env, &mut controllers).await;
        if outcome.is_err() {
            for name in ["source-controller", "kustomize-controller"] {
                eprintln!(
                    "--- {name} (last lines)\n{}",
                    controllers.log_tail(name, 40)
                );
            }
        }
        delete_flux_objects(&env).await;
        drop(controllers);
        outcome
    })
    .await;
}

async fn scenario(env: &TestEnv, controllers: &mut flux::Controllers) -> Result<()> {
    let ns = env.namespace.as_str();
    let git = GitServer::start()?;
    let good = git.commit(
        &[(FILE, &manifest(ns, &json!({}))?)],
        "scorer: two replicas",
    )?;
    let _op = env.operator().start().await?;

    git_repositories(env)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                "metadata": {"name": SYNC, "namespace": ns},
                "spec": {"url": git.url(), "interval": "5s", "ref": {"branch": "main"}, "timeout": "60s"}
            }))?,
        )
        .await
        .context("creating the GitRepository")?;
    kustomizations(env)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                "metadata": {"name": SYNC, "namespace": ns},
                "spec": {"sourceRef": {"kind": "GitRepository", "name": SYNC}, "path": "./deploy",
                         "interval": "10m", "retryInterval": "10s", "timeout": "3m",
                         "prune": true, "wait": true}
            }))?,
        )
        .await
        .context("creating the Kustomization")?;

    // 1. Git's model is synced and Moat makes it Ready. (The Kustomization's first health check
    //    says little: kstatus calls an object with no status at all Current, and a just-created
    //    SecureModelDeployment has none until Moat's first reconcile. From then on its
    //    `status.observedGeneration` makes every later check wait for Moat.)
    let (reason, message) = wait_sync(env, &good, true).await?;
    controllers.check_running()?;
    eprintln!("flux: first commit applied and healthy: {reason}: {message}");
    let smds = env.api::<SecureModelDeployment>();
    let ready = wait_smd(&smds, MODEL, "Ready", is_ready).await?;
    let revs = ready
        .status
        .and_then(|s| s.revisions)
        .context("no status.revisions")?;
    let known_good = revs
        .last_known_good
        .clone()
        .context("no known-good revision")?;
    spec_is_gits(env, &git).await?;

    // 2. A commit whose pods can never be scheduled (no node has the label), with a 10 s
    //    progress deadline: Moat rolls the Deployment back to the known-good revision, the spec
    //    stays Git's, and the Kustomization's health check fails.
    let bad = git.commit(
        &[(
            FILE,
            &manifest(
                ns,
                &json!({"placement": {"nodeSelector": {"moat.dev/pool": "nowhere"}},
                        "rollout": {"progressDeadlineSeconds": 10}}),
            )?,
        )],
        "scorer: move to the nowhere pool",
    )?;
    let rolled_back = wait_smd(&smds, MODEL, "Stalled=True, RolledBack", |s| {
        current_condition(s, conditions::STALLED)
            .is_some_and(|c| c.status == "True" && c.reason == conditions::reason::ROLLED_BACK)
    })
    .await?;
    let revs = rolled_back
        .status
        .as_ref()
        .and_then(|s| s.revisions.clone())
        .context("no status.revisions")?;
    ensure!(
        revs.serving.as_ref() == Some(&known_good)
            && revs.current.as_ref() != Some(&known_good)
            && revs.failed.is_some(),
        "after the rollback: {revs:?}"
    );
    let (status, message) = kstatus(&serde_json::to_value(&rolled_back)?).await?;
    ensure!(status == "Failed", "kstatus says {status}: {message}");
    let (reason, message) = wait_sync(env, &bad, false).await?;
    eprintln!("flux: the failing commit is reported: {reason}: {message}");
    ensure!(
        message.contains(MODEL),
        "the Kustomization's message does not name the model: {message}"
    );
    spec_is_gits(env, &git).await?;
    let live = smds.get(MODEL).await?;
    ensure!(
        live.spec
            .rollout
            .as_ref()
            .and_then(|r| r.progress_deadline_seconds)
            == Some(10),
        "the spec is not the failing commit's: {:?}",
        live.spec.rollout
    );
    controllers.check_running()?;

    // 3. `git revert`: the spec is the known-good revision again, Moat says Ready, and so does
    //    the Kustomization.
    let reverted = git.revert_head()?;
    let (reason, message) = wait_sync(env, &reverted, true).await?;
    eprintln!("flux: the revert is applied and healthy: {reason}: {message}");
    let back = wait_smd(&smds, MODEL, "Ready again", is_ready).await?;
    let revs = back
        .status
        .and_then(|s| s.revisions)
        .context("no status.revisions")?;
    ensure!(
        revs.current.as_ref() == Some(&known_good)
            && revs.serving.as_ref() == Some(&known_good)
            && revs.failed.is_none(),
        "after the revert: {revs:?}"
    );
    spec_is_gits(env, &git).await?;
    controllers.check_running()?;
    Ok(())
}
