//! Encrypted model weights against the local control plane: the decrypting init container and
//! its volumes are admitted under Pod Security "restricted", the key reaches the init container
//! only, crypto-shredding deletes the key with the SecureModelDeployment (through the real
//! garbage collector), PVC sources must sit on an encrypted StorageClass, and a failed
//! decryption (the real `moat decrypt` message, reported in the pod's status as the kubelet
//! would) makes the SecureModelDeployment Stalled with that reason.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{PersistentVolumeClaim, Pod, Secret},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{
    HELPER_IMAGE, NamespaceOptions, Operator, TestEnv, condition, current_condition,
    deadline_after_backoff, moat_binary, wait_condition, wait_condition_within, wait_smd,
    wait_until, with_namespace,
};
use serde_json::{Value, json};

const SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// The model `name`: one replica serving the weights from `source`, decrypted with the key in the
/// Secret `key_secret`, which is deleted with the model when `shred`.
fn smd(name: &str, key_secret: &str, source: Value, shred: bool) -> Result<SecureModelDeployment> {
    Ok(fixture::smd(name)
        .replicas(1)
        .set(
            &["spec", "server", "args"],
            json!(["--model", "/models/fraud"]),
        )
        .limits("1", "4Gi")
        .egress(json!([{"cidr": "10.20.0.0/16", "ports": [443]}]))
        .model(json!({
            "source": source,
            "sha256": SHA256,
            "decryptionKeySecretRef": {"name": key_secret, "key": "identity"},
            "mountPath": "/models/fraud",
            "sizeLimit": "2Gi",
            "deleteKeyWithDeployment": shred
        }))
        .build()?)
}

fn url_source() -> Value {
    json!({"url": "https://artifacts.example.com/fraud/v3.tar.age"})
}

async fn key_secret(env: &TestEnv, name: &str) -> Result<Secret> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        // The value is never read by the operator beyond checking it is there.
        "stringData": {"identity": "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"}
    }))?;
    Ok(env
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?)
}

fn mounts_of(pod: &k8s_openapi::api::core::v1::PodSpec, container: &str) -> Vec<(String, bool)> {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .filter(|c| c.name == container)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| (m.name.clone(), m.read_only == Some(true)))
        .collect()
}

#[tokio::test]
async fn encrypted_model_pods_run_under_restricted_and_shredding_deletes_the_key() {
    with_namespace(
        "model-pods",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = Operator::start(&env.namespace).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            key_secret(&env, "shredded-key").await?;
            key_secret(&env, "kept-key").await?;
            let shredded = smds
                .create(
                    &PostParams::default(),
                    &smd("shredded", "shredded-key", url_source(), true)?,
                )
                .await?;
            smds.create(
                &PostParams::default(),
                &smd("kept", "kept-key", url_source(), false)?,
            )
            .await?;
            for name in ["shredded", "kept"] {
                wait_condition(&env, name, conditions::READY, "RolloutComplete").await?;
            }

            // The pod template: init container with Moat's pinned image and the artifact's digest.
            let deploy = env.api::<Deployment>().get("shredded").await?;
            let pod = deploy
                .spec
                .and_then(|s| s.template.spec)
                .context("pod template")?;
            let init = pod.init_containers.clone().unwrap_or_default();
            // The decrypting init container first; then the gate, a sidecar from the same
            // pinned image.
            let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
            ensure!(
                names == ["decrypt-model", "gate"],
                "init containers: {names:?}"
            );
            ensure!(
                init[1].image.as_deref() == Some(HELPER_IMAGE)
                    && init[1].restart_policy.as_deref() == Some("Always"),
                "the gate: {:?}",
                init[1]
            );
            ensure!(
                init[0].image.as_deref() == Some(HELPER_IMAGE),
                "helper image {:?}",
                init[0].image
            );
            let args = init[0].args.clone().unwrap_or_default();
            ensure!(
                args.contains(&format!("--sha256={SHA256}")),
                "args {args:?}"
            );
            ensure!(
                args.contains(
                    &"--source=https://artifacts.example.com/fraud/v3.tar.age".to_string()
                ),
                "args {args:?}"
            );
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "model")
                .and_then(|v| v.empty_dir.clone())
                .context("model emptyDir")?;
            ensure!(
                volume.medium.as_deref() == Some("Memory"),
                "medium {:?}",
                volume.medium
            );
            ensure!(volume.size_limit.map(|q| q.0).as_deref() == Some("2Gi"));
            let server = mounts_of(&pod, "server");
            ensure!(
                server.contains(&("model".into(), true)),
                "server mounts {server:?}"
            );
            ensure!(
                !server.iter().any(|(n, _)| n == "model-key"),
                "key mounted into the server"
            );
            ensure!(mounts_of(&pod, "decrypt-model").contains(&("model-key".into(), true)));

            // The pods were admitted by the real PodSecurity admission (namespace enforces
            // restricted) and run on kwok nodes.
            let pods = env
                .api::<Pod>()
                .list(&ListParams::default().labels("moat.dev/deployment=shredded"))
                .await?;
            ensure!(!pods.items.is_empty(), "no pods admitted");

            // Crypto-shredding: only the opted-in key carries the SecureModelDeployment as owner.
            let secrets: Api<Secret> = env.api();
            let owner_uid = shredded.uid().context("uid")?;
            let owned = secrets.get("shredded-key").await?;
            ensure!(
                owned
                    .owner_references()
                    .iter()
                    .any(|o| o.uid == owner_uid && o.controller == Some(false)),
                "owner references {:?}",
                owned.owner_references()
            );
            ensure!(secrets.get("kept-key").await?.owner_references().is_empty());

            smds.delete("shredded", &DeleteParams::default()).await?;
            smds.delete("kept", &DeleteParams::default()).await?;
            wait_until(
                "the garbage collector to delete the shredded key",
                || async { Ok(secrets.get_opt("shredded-key").await?.is_none()) },
            )
            .await?;
            ensure!(
                secrets.get_opt("kept-key").await?.is_some(),
                "a key without shredding was deleted"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn model_sources_and_keys_must_exist_and_pvcs_be_encrypted() {
    with_namespace(
        "model-pvc",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = env
                .operator()
                .settings(|s| s.encrypted_storage_classes = vec!["encrypted-ssd".into()])
                .start()
                .await?;
            let smds: Api<SecureModelDeployment> = env.api();
            let claims: Api<PersistentVolumeClaim> = env.api();
            for (name, class) in [
                ("plain-store", "standard"),
                ("secure-store", "encrypted-ssd"),
            ] {
                let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": class,
                             "resources": {"requests": {"storage": "1Gi"}}}
                }))?;
                claims.create(&PostParams::default(), &pvc).await?;
            }

            // No key Secret yet: stalled with what to do; nothing is deployed.
            let pvc =
                |claim: &str| json!({"pvc": {"claimName": claim, "path": "fraud/v3.tar.age"}});
            smds.create(
                &PostParams::default(),
                &smd("fraud", "fraud-key", pvc("plain-store"), false)?,
            )
            .await?;
            let failing_since = Instant::now();
            let message =
                wait_condition(&env, "fraud", conditions::STALLED, "DecryptionKeyMissing").await?;
            ensure!(
                message.contains("fraud-key") && message.contains("moat keygen"),
                "{message}"
            );
            ensure!(
                env.api::<Deployment>().get_opt("fraud").await?.is_none(),
                "deployed without a key"
            );

            // The key arrives (Moat retries with backoff): now the StorageClass is the problem.
            key_secret(&env, "fraud-key").await?;
            let message = wait_condition_within(
                deadline_after_backoff(failing_since),
                &env,
                "fraud",
                conditions::STALLED,
                "StorageClassNotEncrypted",
            )
            .await?;
            ensure!(
                message.contains("uses StorageClass standard") && message.contains("encrypted-ssd"),
                "{message}"
            );
            ensure!(
                env.api::<Deployment>().get_opt("fraud").await?.is_none(),
                "deployed from an unencrypted volume"
            );

            // On an encrypted StorageClass the claim is mounted read-only into the init container.
            let patch = json!({"spec": {"model": {"source": pvc("secure-store")}}});
            smds.patch("fraud", &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            wait_until("the Deployment with the PVC source", || async {
                Ok(env.api::<Deployment>().get_opt("fraud").await?.is_some())
            })
            .await?;
            // Moat writes the status after it has applied the Deployment: wait for the status of
            // the patched spec before reading it.
            let fixed = wait_smd(&smds, "fraud", "a status for the PVC source", |s| {
                current_condition(s, conditions::STALLED).is_some()
            })
            .await?;
            let stalled = current_condition(&fixed, conditions::STALLED);
            ensure!(
                stalled.is_some_and(|c| c.status == "False"),
                "still stalled: {stalled:?}"
            );
            let pod = env
                .api::<Deployment>()
                .get("fraud")
                .await?
                .spec
                .and_then(|s| s.template.spec)
                .context("pod")?;
            let claim = pod
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.persistent_volume_claim.clone())
                .context("pvc volume")?;
            ensure!(claim.claim_name == "secure-store" && claim.read_only == Some(true));
            ensure!(mounts_of(&pod, "decrypt-model").contains(&("model-source".into(), true)));
            ensure!(
                !mounts_of(&pod, "server")
                    .iter()
                    .any(|(n, _)| n == "model-source")
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_failed_decryption_stalls_with_the_init_containers_reason() {
    with_namespace(
        "model-failure",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = Operator::start(&env.namespace).await?;
            key_secret(&env, "fraud-key").await?;
            env.api::<SecureModelDeployment>()
                .create(
                    &PostParams::default(),
                    &smd("fraud", "fraud-key", url_source(), false)?,
                )
                .await?;
            wait_condition(&env, "fraud", conditions::READY, "RolloutComplete").await?;

            // What the init container would say: the real `moat decrypt`, given an artifact
            // encrypted to another key than the one it holds, writes its one-line reason to the
            // termination message file (the kubelet copies that file into the pod status).
            let dir = std::env::temp_dir().join(format!("moat-e2e-decrypt-{}", std::process::id()));
            std::fs::create_dir_all(dir.join("model"))?;
            std::fs::write(dir.join("model/weights.bin"), b"weights")?;
            let keygen = |file: &str| -> Result<(String, String)> {
                let out = std::process::Command::new("age-keygen")
                    .arg("-o")
                    .arg(dir.join(file))
                    .output()?;
                ensure!(
                    out.status.success(),
                    "age-keygen: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = std::fs::read_to_string(dir.join(file))?;
                let secret = text
                    .lines()
                    .find(|l| l.starts_with("AGE-SECRET-KEY-"))
                    .context("identity")?;
                let recipient = String::from_utf8(out.stderr)?
                    .trim()
                    .trim_start_matches("Public key: ")
                    .to_string();
                Ok((secret.to_string(), recipient))
            };
            let (owner_secret, owner_recipient) = keygen("owner")?;
            let (other_secret, _) = keygen("other")?;
            let moat = moat_binary()?;
            let out = std::process::Command::new(&moat)
                .arg("encrypt")
                .arg("--recipient")
                .arg(&owner_recipient)
                .arg(dir.join("model"))
                .arg("-o")
                .arg(dir.join("model.tar.age"))
                .output()?;
            ensure!(
                out.status.success(),
                "moat encrypt: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let digest =
                moat_e2e::registry::sha256_digest(&std::fs::read(dir.join("model.tar.age"))?);
            let termination = dir.join("termination-log");
            let out = std::process::Command::new(&moat)
                .arg("decrypt")
                .arg(format!(
                    "--source=file://{}",
                    dir.join("model.tar.age").display()
                ))
                .arg(format!("--sha256={}", digest.trim_start_matches("sha256:")))
                .arg(format!("--identity={}", dir.join("other").display()))
                .arg(format!("--target={}", dir.join("target").display()))
                .arg("--size-limit=2Gi")
                .arg(format!(
                    "--termination-message-path={}",
                    termination.display()
                ))
                .output()?;
            ensure!(!out.status.success(), "moat decrypt accepted the wrong key");
            let reason = std::fs::read_to_string(&termination)?.trim().to_string();
            std::fs::remove_dir_all(&dir)?;
            ensure!(
                !reason.is_empty() && !reason.contains('\n'),
                "termination message {reason:?}"
            );
            println!("moat decrypt with the wrong key: {reason}");

            // The kubelet's report of that failure, on every pod of the model.
            moat_e2e::report_decrypt_failure(&env, "fraud", &reason).await?;
            let message =
                wait_condition(&env, "fraud", conditions::STALLED, "ModelDecryptionFailed").await?;
            ensure!(
                message.contains(&reason),
                "status message {message:?} lacks {reason:?}"
            );
            ensure!(message.contains("decrypt-model failed"), "{message}");
            let ready = condition(&env, "fraud", conditions::READY).await?;
            ensure!(ready.is_some_and(|(s, _, _)| s == "False"), "still Ready");
            let smd = env.api::<SecureModelDeployment>().get("fraud").await?;
            let obj = serde_json::to_value(&smd)?;
            let (kstatus, _) = moat_e2e::kstatus(&obj).await?;
            ensure!(kstatus == "Failed", "kstatus says {kstatus}");
            // No key material in the status.
            let text = obj.to_string();
            ensure!(
                !text.contains(&owner_secret) && !text.contains(&other_secret),
                "key material in the status"
            );
            Ok(())
        },
    )
    .await;
}

/// An operator upgrade brings a new helper image: the `decrypt-model` init container follows it
/// as Moat's own update (an `Updated` Event, `status.image.helper`), never as drift of the
/// Deployment, which would be a false alarm on every upgrade.
#[tokio::test]
async fn an_operator_upgrade_that_changes_the_helper_image_is_an_update_not_drift() {
    const UPGRADED: &str = "registry.example.com/moat@sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";
    with_namespace(
        "helper-upgrade",
        NamespaceOptions::restricted(),
        |env| async move {
            let old = Operator::start(&env.namespace).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            key_secret(&env, "fraud-key").await?;
            env.api::<SecureModelDeployment>()
                .create(
                    &PostParams::default(),
                    &smd("fraud", "fraud-key", url_source(), false)?,
                )
                .await?;
            wait_condition(&env, "fraud", conditions::READY, "RolloutComplete").await?;
            wait_smd(
                &smds,
                "fraud",
                "status.image.helper is the old helper",
                |s| {
                    s.status
                        .as_ref()
                        .and_then(|s| s.image.as_ref()?.helper.as_deref())
                        == Some(HELPER_IMAGE)
                },
            )
            .await?;
            old.kill().await;

            let new = env
                .operator()
                .settings(|s| s.image.helper_image = UPGRADED.into())
                .start()
                .await?;
            let init_image = || async {
                let deploy = env.api::<Deployment>().get("fraud").await?;
                Ok::<_, anyhow::Error>(
                    deploy
                        .spec
                        .and_then(|s| s.template.spec)
                        .and_then(|p| p.init_containers)
                        .and_then(|c| c.into_iter().next())
                        .and_then(|c| c.image),
                )
            };
            wait_until("the init container runs the upgraded helper", || async {
                Ok(init_image().await?.as_deref() == Some(UPGRADED))
            })
            .await?;
            let upgraded = wait_smd(
                &smds,
                "fraud",
                "status.image.helper is the upgraded helper",
                |s| {
                    s.status
                        .as_ref()
                        .and_then(|s| s.image.as_ref()?.helper.as_deref())
                        == Some(UPGRADED)
                },
            )
            .await?;
            moat_e2e::wait_event(
                &env,
                &env.namespace,
                "fraud",
                "Updated",
                &["Deployment fraud"],
            )
            .await?;
            ensure!(
                new.drift_repairs("Deployment")? == 0,
                "the upgrade was counted as drift of the Deployment"
            );
            ensure!(
                upgraded
                    .status
                    .as_ref()
                    .and_then(|s| s.drift.as_ref())
                    .is_none(),
                "status.drift: {:?}",
                upgraded.status.and_then(|s| s.drift)
            );
            let repaired =
                moat_e2e::event_notes(&env, &env.namespace, "fraud", "DriftRepaired").await?;
            ensure!(repaired.is_empty(), "DriftRepaired Events: {repaired:?}");
            Ok(())
        },
    )
    .await;
}
