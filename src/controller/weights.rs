//! Dereference step for encrypted model weights (`spec.model`): the key Secret holds the key, a
//! PVC source sits on a StorageClass the platform team declared encrypted, and the key Secret
//! carries this SecureModelDeployment as an owner when crypto-shredding is on. After applying,
//! why the decrypting init container failed, read from the pods.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};

use super::Context;
use crate::api::{ModelSpec, SecureModelDeployment};

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
    #[error(transparent)]
    StorageClassNotEncrypted(#[from] crate::core::model::StorageClassNotEncrypted),
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
            WeightsError::StorageClassNotEncrypted(_) => reason::STORAGE_CLASS_NOT_ENCRYPTED,
            WeightsError::Api { .. } => reason::APPLY_FAILED,
        }
    }

    /// Whether a user must change something first.
    pub fn needs_user_action(&self) -> bool {
        !matches!(self, WeightsError::Api { .. })
    }
}

/// Reads and checks what `spec.model` refers to (reads only): the key Secret, which it returns
/// (the apply step sets its owner for crypto-shredding), and a PVC source's StorageClass. The
/// key's value is read only to check it is there; it is never logged or copied.
pub(super) async fn read(
    ctx: &Context,
    smd: &SecureModelDeployment,
    model: &ModelSpec,
) -> Result<Secret, WeightsError> {
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
    Ok(secret)
}

/// Writes the key Secret's ownerReferences patch that [`shred_owner_patch`] decided: a strategic
/// merge patch keyed by uid, so other owners are kept and a Secret deleted meanwhile is not
/// recreated.
pub(super) async fn set_owner(
    ctx: &Context,
    secret: &Secret,
    patch: serde_json::Value,
) -> Result<(), WeightsError> {
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

pub use crate::core::model::{check_storage_class, shred_owner_patch};
