//! Decisions about encrypted model weights, pure: whether a PVC source's StorageClass is one the
//! platform team declared encrypted, and why the decrypting init container of a pod failed.

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::SecureModelDeployment;

/// The patch that makes the key Secret's ownerReferences say what crypto-shredding wants: with
/// `want`, `smd` is an owner (not the controller), so the garbage collector deletes the key with
/// the SecureModelDeployment; without, it is not. `None` when the Secret is already as wanted.
pub fn shred_owner_patch(
    smd: &SecureModelDeployment,
    secret: &Secret,
    want: bool,
) -> Option<serde_json::Value> {
    let uid = smd.uid()?;
    let has = secret.owner_references().iter().any(|o| o.uid == uid);
    if has == want {
        return None;
    }
    Some(if want {
        let owner = OwnerReference {
            api_version: SecureModelDeployment::api_version(&()).into_owned(),
            kind: SecureModelDeployment::kind(&()).into_owned(),
            name: smd.name_any(),
            uid,
            controller: Some(false),
            block_owner_deletion: Some(false),
        };
        json!({"metadata": {"ownerReferences": [owner]}})
    } else {
        json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}})
    })
}

/// A PVC model source on a StorageClass the operator does not list as encrypted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the PersistentVolumeClaim {claim} uses StorageClass {class}, which the operator does not list as encrypted (--encrypted-storage-classes: {allowed}); store the artifact on an encrypted StorageClass"
)]
pub struct StorageClassNotEncrypted {
    /// Claim name.
    pub claim: String,
    /// Its StorageClass, or `<none>`.
    pub class: String,
    /// The operator's list, comma-separated, or `<none>`.
    pub allowed: String,
}

/// Whether a claim's StorageClass is one of `encrypted`.
pub fn check_storage_class(
    claim: &str,
    class: Option<&str>,
    encrypted: &[String],
) -> Result<(), StorageClassNotEncrypted> {
    match class {
        Some(c) if !c.is_empty() && encrypted.iter().any(|e| e == c) => Ok(()),
        _ => Err(StorageClassNotEncrypted {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn the_key_secret_gets_this_model_as_owner_only_when_shredding_is_on() {
        let mut smd = fixture::smd("m")
            .namespace("n")
            .uid("u-1")
            .build()
            .expect("smd");
        let bare: Secret =
            serde_json::from_value(json!({"metadata": {"name": "k"}})).expect("secret");
        let owned: Secret = serde_json::from_value(json!({"metadata": {"name": "k", "ownerReferences": [
            {"apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment", "name": "m", "uid": "u-1"},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "u-2"}
        ]}}))
        .expect("secret");
        let add = shred_owner_patch(&smd, &bare, true).expect("a patch");
        assert_eq!(
            add.pointer("/metadata/ownerReferences/0/uid"),
            Some(&json!("u-1"))
        );
        assert_eq!(
            add.pointer("/metadata/ownerReferences/0/controller"),
            Some(&json!(false))
        );
        assert_eq!(shred_owner_patch(&smd, &owned, true), None);
        assert_eq!(shred_owner_patch(&smd, &bare, false), None);
        let remove = shred_owner_patch(&smd, &owned, false).expect("a patch");
        assert_eq!(
            remove,
            json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": "u-1"}]}})
        );
        smd.metadata.uid = None;
        assert_eq!(
            shred_owner_patch(&smd, &bare, true),
            None,
            "no uid yet: nothing to own"
        );
    }

    #[test]
    fn only_listed_storage_classes_are_accepted() {
        let enc = vec!["encrypted-ssd".to_string()];
        assert!(check_storage_class("c", Some("encrypted-ssd"), &enc).is_ok());
        let e = check_storage_class("c", Some("standard"), &enc).expect_err("not listed");
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
