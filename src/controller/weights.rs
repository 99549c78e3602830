//! Dereference step for encrypted model weights (`spec.model`): the key Secret holds the key, a
//! PVC source sits on a StorageClass the platform team declared encrypted, and the key Secret
//! carries this SecureModelDeployment as an owner when crypto-shredding is on. After applying,
//! why the decrypting init container failed, read from the pods.

use k8s_openapi::{
    api::core::v1::{PersistentVolumeClaim, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::Context;
use crate::{
    api::{ModelSpec, SecureModelDeployment},
    render::{
        DEPLOYMENT_LABEL,
        model::{INIT_CONTAINER, decrypt_args},
    },
};

/// Why the model cannot be served. Each names what to change.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The key Secret or its key is missing.
    #[error(
        "the decryption key Secret {name} in namespace {namespace} {problem}; create it with `moat keygen` or fix spec.model.decryptionKeySecretRef"
    )]
    KeySecretMissing {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The PVC source does not exist.
    #[error(
        "the PersistentVolumeClaim {name} in namespace {namespace} (spec.model.source.pvc) does not exist"
    )]
    PvcMissing {
        /// Namespace.
        namespace: String,
        /// Claim name.
        name: String,
    },
    /// The PVC's StorageClass is not declared encrypted.
    #[error(
        "the PersistentVolumeClaim {claim} uses StorageClass {class}, which the operator does not list as encrypted (--encrypted-storage-classes: {allowed}); store the artifact on an encrypted StorageClass"
    )]
    StorageClassNotEncrypted {
        /// Claim name.
        claim: String,
        /// Its StorageClass, or `<none>`.
        class: String,
        /// The operator's list, comma-separated, or `<none>`.
        allowed: String,
    },
    /// Reading or patching failed; retried.
    #[error("{what}: {source}")]
    Api {
        /// What Moat was doing.
        what: String,
        /// Cause.
        source: kube::Error,
    },
}

impl WeightsError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        use crate::api::conditions::reason;
        match self {
            WeightsError::KeySecretMissing { .. } => reason::DECRYPTION_KEY_MISSING,
            WeightsError::PvcMissing { .. } => reason::MODEL_SOURCE_MISSING,
            WeightsError::StorageClassNotEncrypted { .. } => reason::STORAGE_CLASS_NOT_ENCRYPTED,
            WeightsError::Api { .. } => reason::APPLY_FAILED,
        }
    }

    /// Whether a user must change something first.
    pub fn needs_user_action(&self) -> bool {
        !matches!(self, WeightsError::Api { .. })
    }
}

/// Checks what `spec.model` refers to, and sets or removes this SecureModelDeployment as an
/// owner of the key Secret (crypto-shredding). The key's value is read only to check it is
/// there; it is never logged or copied.
pub(super) async fn check(
    ctx: &Context,
    smd: &SecureModelDeployment,
    model: &ModelSpec,
) -> Result<(), WeightsError> {
    let namespace = smd.namespace().unwrap_or_default();
    let key_ref = &model.decryption_key_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let missing = |problem: &str| WeightsError::KeySecretMissing {
        namespace: namespace.clone(),
        name: key_ref.name.clone(),
        problem: problem.to_string(),
    };
    let secret = secrets
        .get_opt(&key_ref.name)
        .await
        .map_err(|source| WeightsError::Api {
            what: format!("reading Secret {}", key_ref.name),
            source,
        })?
        .ok_or_else(|| missing("does not exist"))?;
    let has_key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key_ref.key))
        .is_some_and(|v| !v.0.is_empty());
    if !has_key {
        return Err(missing(&format!("has no key {:?}", key_ref.key)));
    }
    if let Some(pvc) = &model.source.pvc {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
        let claim = claims
            .get_opt(&pvc.claim_name)
            .await
            .map_err(|source| WeightsError::Api {
                what: format!("reading PersistentVolumeClaim {}", pvc.claim_name),
                source,
            })?
            .ok_or_else(|| WeightsError::PvcMissing {
                namespace: namespace.clone(),
                name: pvc.claim_name.clone(),
            })?;
        let class = claim.spec.and_then(|s| s.storage_class_name);
        check_storage_class(
            &pvc.claim_name,
            class.as_deref(),
            &ctx.settings.encrypted_storage_classes,
        )?;
    }
    set_shred_owner(ctx, smd, &secret, model.delete_key_with_deployment).await
}

/// Pure: whether a claim's StorageClass is one of `encrypted`.
pub fn check_storage_class(
    claim: &str,
    class: Option<&str>,
    encrypted: &[String],
) -> Result<(), WeightsError> {
    match class {
        Some(c) if !c.is_empty() && encrypted.iter().any(|e| e == c) => Ok(()),
        _ => Err(WeightsError::StorageClassNotEncrypted {
            claim: claim.to_string(),
            class: class
                .filter(|c| !c.is_empty())
                .unwrap_or("<none>")
                .to_string(),
            allowed: if encrypted.is_empty() {
                "<none>".into()
            } else {
                encrypted.join(", ")
            },
        }),
    }
}

/// Adds (or removes) this SecureModelDeployment in the key Secret's ownerReferences, with a
/// strategic merge patch keyed by uid: other owners are kept, and a Secret deleted meanwhile is
/// not recreated. Writes only when the owner reference is not as wanted.
async fn set_shred_owner(
    ctx: &Context,
    smd: &SecureModelDeployment,
    secret: &Secret,
    want: bool,
) -> Result<(), WeightsError> {
    let Some(uid) = smd.uid() else {
        return Ok(());
    };
    let has = secret.owner_references().iter().any(|o| o.uid == uid);
    if has == want {
        return Ok(());
    }
    let owner = OwnerReference {
        api_version: SecureModelDeployment::api_version(&()).into_owned(),
        kind: SecureModelDeployment::kind(&()).into_owned(),
        name: smd.name_any(),
        uid: uid.clone(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    let patch = if want {
        json!({"metadata": {"ownerReferences": [owner]}})
    } else {
        json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}})
    };
    let api: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &secret.namespace().unwrap_or_default());
    ctx.metrics.api_write("Secret", "patch-owner");
    api.patch(
        &secret.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map_err(|source| WeightsError::Api {
        what: format!("setting the owner of Secret {}", secret.name_any()),
        source,
    })?;
    Ok(())
}

/// The reason the decrypting init container of a current pod of `smd` failed, if one did:
/// read fresh from the API server (pods are not cached), only while a rollout is incomplete.
pub(super) async fn decrypt_failure(
    ctx: &Context,
    smd: &SecureModelDeployment,
    model: &ModelSpec,
) -> Result<Option<String>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &smd.namespace().unwrap_or_default());
    let pods = api
        .list(&ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={}", smd.name_any())))
        .await?;
    Ok(failure_of(&pods.items, &decrypt_args(model)))
}

/// Pure: the first failed `decrypt-model` init container (now or at its last run, as in
/// CrashLoopBackOff) among the `pods` whose init container runs with `args` (pods of an earlier
/// model spec do not count), as `pod <name>: <termination message>`.
pub fn failure_of(pods: &[Pod], args: &[String]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let current = pod
            .spec
            .as_ref()?
            .init_containers
            .as_ref()?
            .iter()
            .any(|c| c.name == INIT_CONTAINER && c.args.as_deref() == Some(args));
        if !current {
            return None;
        }
        let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
        let status = statuses.iter().find(|s| s.name == INIT_CONTAINER)?;
        let terminated = [status.state.as_ref(), status.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .find(|t| t.exit_code != 0)?;
        let message = terminated
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| m.lines().last().unwrap_or(m).to_string())
            .unwrap_or_else(|| {
                format!(
                    "exit code {} ({})",
                    terminated.exit_code,
                    terminated.reason.as_deref().unwrap_or("no reason given")
                )
            });
        Some(format!(
            "pod {}: {INIT_CONTAINER} failed: {message}",
            pod.name_any()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Vec<String> {
        vec!["decrypt".into(), "--sha256=abc".into()]
    }

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "m-1"},
            "spec": {"initContainers": [{"name": INIT_CONTAINER, "args": args()}], "containers": []},
            "status": {"initContainerStatuses": statuses}
        }))
        .expect("pod")
    }

    #[test]
    fn a_failed_init_container_is_reported_with_its_termination_message() {
        let crash = pod(json!([{
            "name": INIT_CONTAINER, "ready": false, "restartCount": 3, "image": "i", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "moat: error: the artifact's sha256 is abc, not def\n"}}
        }]));
        assert_eq!(
            failure_of(std::slice::from_ref(&crash), &args()).as_deref(),
            Some(
                "pod m-1: decrypt-model failed: moat: error: the artifact's sha256 is abc, not def"
            )
        );
        let fixed = vec!["decrypt".to_string(), "--sha256=def".to_string()];
        assert_eq!(
            failure_of(&[crash], &fixed),
            None,
            "a pod of the earlier spec"
        );
        let no_message = pod(json!([{
            "name": INIT_CONTAINER, "ready": false, "restartCount": 0, "image": "i", "imageID": "",
            "state": {"terminated": {"exitCode": 2, "reason": "Error"}}
        }]));
        assert_eq!(
            failure_of(&[no_message], &args()).as_deref(),
            Some("pod m-1: decrypt-model failed: exit code 2 (Error)")
        );
    }

    #[test]
    fn success_and_other_containers_are_no_failure() {
        let ok = pod(json!([{
            "name": INIT_CONTAINER, "ready": true, "restartCount": 0, "image": "i", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}
        }]));
        let other = pod(json!([{
            "name": "something-else", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
            "state": {"terminated": {"exitCode": 1}}
        }]));
        assert_eq!(failure_of(&[ok, other], &args()), None);
        assert_eq!(failure_of(&[], &args()), None);
    }

    #[test]
    fn only_listed_storage_classes_are_accepted() {
        let enc = vec!["encrypted-ssd".to_string()];
        assert!(check_storage_class("c", Some("encrypted-ssd"), &enc).is_ok());
        let e = check_storage_class("c", Some("standard"), &enc).expect_err("not listed");
        assert_eq!(e.reason(), "StorageClassNotEncrypted");
        assert!(e.to_string().contains("uses StorageClass standard"), "{e}");
        assert!(check_storage_class("c", None, &enc).is_err());
        assert!(check_storage_class("c", Some(""), &[String::new()]).is_err());
        let e = check_storage_class("c", Some("x"), &[]).expect_err("empty list");
        assert!(
            e.to_string()
                .contains("--encrypted-storage-classes: <none>"),
            "{e}"
        );
    }
}
