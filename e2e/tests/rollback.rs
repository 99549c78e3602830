//! Revisions and automatic rollback on the real node (kubelet, containerd, runc): a model whose
//! new revision fails to decrypt, crash-loops, or is not ready within its progress deadline is
//! rolled back to the last known-good revision by Moat, with the spec untouched; the known-good
//! pods never stop serving; a reverted spec goes back to Ready; the history is kept to its limit
//! and survives an operator restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{PersistentVolume, Pod, Secret},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use moat::{
    api::{ModelRevision, SecureModelDeployment, conditions},
    core::revision::{REVISION_LABEL, short},
    fixture,
};
use moat_e2e::{
    NamespaceOptions, TestEnv,
    artifacts::{age_identity, encrypted_model, publish_store, pvc_store, sha256_of},
    real_node_image, wait_condition, wait_ready, with_namespace,
};
use serde_json::{Value, json};

const MODEL: &str = "scorer";

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The model: two replicas serving the weights `artifact` (whose digest is `digest`) with
/// `args` for `/bin/sh -c`, rolled back after 30 s without progress, 3 revisions kept.
fn model(artifact: &str, digest: &str, args: &str) -> Result<SecureModelDeployment> {
    Ok(fixture::smd(MODEL)
        .replicas(2)
        .image(&real_node_image()?)
        .limits("100m", "512Mi")
        .set(&["spec", "server", "command"], json!(["/bin/sh", "-c"]))
        .set(&["spec", "server", "args"], json!([args]))
        .set(&["spec", "gate"], json!({"mode": "Disabled"}))
        .set(
            &["spec", "rollout"],
            json!({"progressDeadlineSeconds": 30, "revisionHistoryLimit": 3}),
        )
        .model(json!({
            "source": {"pvc": {"claimName": "store", "path": artifact}},
            "sha256": digest,
            "decryptionKeySecretRef": {"name": "model-key", "key": "identity"},
            "mountPath": "/models/m",
            "sizeLimit": "16Mi"
        }))
        .build()?)
}

const SERVE: &str = "exec httpd -f -p 8000 -h /models/m";

/// The pods of the model by the revision they run: (revision label, ready, being deleted).
async fn pods(env: &TestEnv) -> Result<Vec<(String, bool, bool)>> {
    let list = env
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("moat.dev/deployment={MODEL}")))
        .await?;
    Ok(list
        .items
        .iter()
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            (
                p.labels().get(REVISION_LABEL).cloned().unwrap_or_default(),
                ready,
                p.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect())
}

/// Applies `change` to the spec, waits until Moat rolls the model back to the known-good
/// revision `good` with `reason` recorded for the failed one, and returns the seconds from
/// the failure's detection (`status.revisions.failed.at`) until the failed pods are gone and
/// the known-good revision serves at full replicas. Throughout, the known-good revision keeps
/// two ready pods.
async fn fails_and_rolls_back(
    env: &TestEnv,
    change: Value,
    good: &str,
    reason: &str,
) -> Result<f64> {
    let smds = env.api::<SecureModelDeployment>();
    let deployments = env.api::<Deployment>();
    smds.patch(
        MODEL,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": change})),
    )
    .await?;
    let changed = smds.get(MODEL).await?;
    let deadline = std::time::Instant::now() + moat_e2e::DEADLINE + Duration::from_secs(60);
    let mut min_good_ready = usize::MAX;
    loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "no rollback of {MODEL} to {good} for {reason}: {:?}",
            smds.get(MODEL).await?.status
        );
        let now = wall();
        let pods = pods(env).await?;
        let good_ready = pods
            .iter()
            .filter(|(r, ready, gone)| r == good && *ready && !gone)
            .count();
        min_good_ready = min_good_ready.min(good_ready);
        let smd = smds.get(MODEL).await?;
        let revs = smd.status.as_ref().and_then(|s| s.revisions.clone());
        let failed = revs.as_ref().and_then(|r| r.failed.clone());
        let template_label = deployments
            .get(MODEL)
            .await?
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.labels)
            .and_then(|l| l.get(REVISION_LABEL).cloned());
        if let Some(f) = &failed
            && f.reason == reason
            && template_label.as_deref() == Some(good)
            && pods.iter().all(|(r, _, _)| r == good)
            && good_ready == 2
        {
            let stalled = moat_e2e::current_condition(&smd, conditions::STALLED)
                .context("no Stalled condition")?;
            ensure!(
                stalled.status == "True" && stalled.reason == conditions::reason::ROLLED_BACK,
                "rolled back but the status says {stalled:?}"
            );
            ensure!(
                stalled.message.contains(&f.revision.name) && stalled.message.contains(reason),
                "the message names neither the failed revision nor why: {}",
                stalled.message
            );
            ensure!(
                smd.spec == changed.spec,
                "Moat changed the spec while rolling back"
            );
            ensure!(
                min_good_ready >= 2,
                "the known-good revision had only {min_good_ready} ready pods during the rollout"
            );
            let detected = f.at.0.as_millisecond() as f64 / 1000.0;
            return Ok(now - detected);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ModelRevisions of the model, by number: (number, name, author).
async fn history(env: &TestEnv) -> Result<Vec<(i64, String, String)>> {
    let mut out: Vec<(i64, String, String)> = env
        .api::<ModelRevision>()
        .list(&ListParams::default().labels(&format!("moat.dev/model={MODEL}")))
        .await?
        .items
        .into_iter()
        .map(|r| (r.spec.revision, r.name_any(), r.spec.author.clone()))
        .collect();
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn failing_revisions_roll_back_to_the_last_known_good_on_real_pods() {
    with_namespace(
        "rollback",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let dir = tempfile::Builder::new().prefix("moat-rollback-").tempdir_in("/tmp")?;
            let class = "moat-e2e-encrypted-local";
            let pv_name = pvc_store(&env, dir.path(), class).await?;
            let (secret, recipient) = age_identity(dir.path(), "key.txt")?;
            let (_, other) = age_identity(dir.path(), "other.txt")?;
            encrypted_model(dir.path(), "v1", 1, &recipient)?;
            encrypted_model(dir.path(), "v2-wrong-key", 1, &other)?;
            publish_store(dir.path())?;
            let digest = |name: &str| sha256_of(&dir.path().join("store").join(format!("{name}.tar.age")));
            let key: Secret = serde_json::from_value(json!({
                "metadata": {"name": "model-key"}, "stringData": {"identity": secret}
            }))?;
            env.api::<Secret>().create(&Default::default(), &key).await?;
            let helper = moat_e2e::real_node_moat_image()?;
            let start = |helper: String| {
                env.operator().settings(move |s| {
                    s.encrypted_storage_classes = vec![class.into()];
                    s.image.helper_image = helper;
                })
            };
            let op = start(helper.clone()).start().await?;
            let smds = env.api::<SecureModelDeployment>();
            let v1 = digest("v1")?;
            smds.create(&Default::default(), &model("v1.tar.age", &v1, SERVE)?).await?;
            let ready = wait_ready(&smds, MODEL).await?;
            let revs = ready.status.and_then(|s| s.revisions).context("no revisions status")?;
            let good = revs.last_known_good.clone().context("no last known-good revision")?;
            ensure!(good.revision == 1 && revs.current == Some(good.clone()), "{revs:?}");
            let good_label = short(&good.template_hash).to_string();

            // 1. Weights that do not decrypt (another key).
            let took_decrypt = fails_and_rolls_back(
                &env,
                json!({"model": {"source": {"pvc": {"claimName": "store", "path": "v2-wrong-key.tar.age"}},
                                 "sha256": digest("v2-wrong-key")?}}),
                &good_label,
                conditions::reason::MODEL_DECRYPTION_FAILED,
            )
            .await?;
            // A revert of the spec goes back to Ready on the known-good revision, with no new
            // revision and the failure forgotten.
            smds.patch(MODEL, &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": {
                "source": {"pvc": {"claimName": "store", "path": "v1.tar.age"}}, "sha256": v1}}})))
                .await?;
            let back = wait_ready(&smds, MODEL).await?;
            let revs = back.status.and_then(|s| s.revisions).context("revisions")?;
            ensure!(
                revs.current == Some(good.clone()) && revs.serving == Some(good.clone()) && revs.failed.is_none(),
                "after the revert: {revs:?}"
            );
            ensure!(history(&env).await?.len() == 2, "{:?}", history(&env).await?);

            // 2. A server that exits at once (a crash loop).
            let took_crash = fails_and_rolls_back(
                &env,
                json!({"server": {"args": ["echo the model is broken; exit 3"]}}),
                &good_label,
                conditions::reason::CRASH_LOOP,
            )
            .await?;

            // 3. A server that never becomes ready (the 30 s progress deadline); it exits on
            // SIGTERM as a server does (a bare `sleep` as PID 1 would ignore it, and its pod
            // would take the whole 30 s grace period to go).
            let took_deadline = fails_and_rolls_back(
                &env,
                json!({"server": {"args": ["trap 'exit 0' TERM; while true; do sleep 1; done"]}}),
                &good_label,
                conditions::reason::PROGRESS_DEADLINE_EXCEEDED,
            )
            .await?;
            eprintln!(
                "rollback: failed pods gone and the last known-good serving at full replicas {took_decrypt:.1} s (decryption), {took_crash:.1} s (crash loop), {took_deadline:.1} s (progress deadline) after the failure was detected"
            );

            // History: four revisions seen, three kept (the oldest pruned), the known-good one
            // (revision 1) protected; each names who changed the spec (no admission policy here).
            let kept = history(&env).await?;
            let numbers: Vec<i64> = kept.iter().map(|k| k.0).collect();
            ensure!(numbers == vec![1, 3, 4], "kept {kept:?}");
            ensure!(kept.iter().all(|k| k.2 == "unknown"), "authors {kept:?}");
            let status = smds.get(MODEL).await?.status.context("status")?;
            ensure!(status.revisions.as_ref().map(|r| r.history) == Some(3), "{:?}", status.revisions);

            // An operator restart during the rollback state: nothing moves.
            drop(op);
            let before = smds.get(MODEL).await?;
            let op = start(helper).start().await?;
            // A whole reconcile of the model by the new operator (its first, once its caches
            // filled: the state is settled, so nothing requeues it soon), then the same state.
            op.wait_reconciles_after(0, 1, "the new operator reconciled the model").await?;
            let after_restart = smds.get(MODEL).await?;
            ensure!(
                after_restart.status.as_ref().and_then(|s| s.revisions.as_ref())
                    == before.status.as_ref().and_then(|s| s.revisions.as_ref()),
                "the restart changed the revisions: {:?}",
                after_restart.status.and_then(|s| s.revisions)
            );
            ensure!(
                moat_e2e::current_condition(&after_restart, conditions::STALLED)
                    .is_some_and(|c| c.reason == conditions::reason::ROLLED_BACK),
                "no longer rolled back after the restart"
            );
            ensure!(history(&env).await? == kept, "the restart changed the history");
            let after = pods(&env).await?;
            ensure!(
                after.iter().filter(|(r, ready, _)| *r == good_label && *ready).count() == 2,
                "after the restart: {after:?}"
            );

            // And a fixed spec goes out normally.
            smds.patch(MODEL, &PatchParams::default(), &Patch::Merge(json!({"spec": {"server": {"args": [SERVE]}}})))
                .await?;
            let _ = wait_condition(&env, MODEL, conditions::READY, conditions::reason::ROLLOUT_COMPLETE).await?;
            let pvs: Api<PersistentVolume> = Api::all(env.client.clone());
            pvs.delete(&pv_name, &Default::default()).await?;
            Ok(())
        },
    )
    .await;
}
