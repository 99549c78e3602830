//! Condition types and reasons, following kstatus so Argo CD, Flux and `kubectl wait` read them.
//!
//! - `Ready`: `True` when every replica runs the current spec and is ready.
//! - `Reconciling`: abnormal-true; `True` while Moat converges the children or a rollout
//!   progresses.
//! - `Stalled`: abnormal-true; `True` when Moat cannot make progress without a change by the
//!   user (an invalid spec) or the rollout failed (progress deadline exceeded).
//!
//! Detail goes into reasons, messages and status fields, never into new condition types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: the workload serves the current spec.
pub const READY: &str = "Ready";
/// Condition type: work is in progress.
pub const RECONCILING: &str = "Reconciling";
/// Condition type: no progress is possible without a change.
pub const STALLED: &str = "Stalled";

/// Reasons used in conditions and Events.
pub mod reason {
    /// Every replica runs the current spec and is ready.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// The Deployment is rolling out the current spec.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// The Deployment exceeded its progress deadline.
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// The spec cannot be turned into a workload; the message says what to change.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The model is quarantined: its gate refuses every request (Ready=False; the pods keep
    /// running for forensics).
    pub const QUARANTINED: &str = "Quarantined";
    /// The policy of a model's gate changed (identities, quarantine or limits).
    pub const GATE_POLICY_UPDATED: &str = "GatePolicyUpdated";
    /// Moat is applying the generated objects.
    pub const APPLYING: &str = "Applying";
    /// Applying the generated objects failed; Moat retries with backoff.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Nothing is wrong.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// An object with a child's name exists and is not controlled by this SecureModelDeployment.
    pub const CONFLICT: &str = "Conflict";
    /// The API server rejected a generated object as invalid.
    pub const REJECTED: &str = "Rejected";
    /// The SecureModelDeployment a ModelClient refers to does not exist or does not list the
    /// client's namespace and ServiceAccount in `spec.access.clients`.
    pub const NOT_ALLOWED: &str = "NotAllowed";
    /// The certificate is issued and current.
    pub const CERTIFICATE_ISSUED: &str = "CertificateIssued";
    /// The init container that verifies and decrypts the model failed; the message has its
    /// one-line reason.
    pub const MODEL_DECRYPTION_FAILED: &str = "ModelDecryptionFailed";
    /// A container of the pods of the current revision keeps exiting (restarted twice and not
    /// running); the message names the pod, the container and its last exit.
    pub const CRASH_LOOP: &str = "CrashLoop";
    /// The current revision failed (decryption, crash loop or progress deadline) and the pods
    /// were rolled back to the last known-good revision; the message names both. The spec is
    /// left as it is: changing or reverting it goes on.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// Event: Moat recorded a new revision (a ModelRevision) of the model.
    pub const REVISION_CREATED: &str = "RevisionCreated";
    /// The current revision waits for the approvals `spec.approval.required` asks for; the
    /// pods run the previous revision (none for a first one) until then.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// Event: an approval of a revision counts.
    pub const APPROVAL_ACCEPTED: &str = "ApprovalAccepted";
    /// Event: an approval does not count (its author's own, a second by the same user, expired,
    /// or naming other digests); the note says why.
    pub const APPROVAL_REFUSED: &str = "ApprovalRefused";
    /// Moat's certificate authority is not available yet; Moat retries.
    pub const CA_UNAVAILABLE: &str = "CAUnavailable";
    /// `spec.imagePolicy` is `RequireDigest` and the image names a tag.
    pub const DIGEST_REQUIRED: &str = "DigestRequired";
    /// The image's registry is not in the operator's allow-list.
    pub const REGISTRY_NOT_ALLOWED: &str = "RegistryNotAllowed";
    /// The registry refused the pull Secret's credentials (or the Secret is unusable).
    pub const IMAGE_PULL_SECRET_REJECTED: &str = "ImagePullSecretRejected";
    /// The registry has no such repository or tag.
    pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
    /// The registry did not answer; Moat retries, and pods keep their earlier digest.
    pub const REGISTRY_UNREACHABLE: &str = "RegistryUnreachable";
    /// The Secret named by `spec.model.decryptionKeySecretRef` (or its key) is missing.
    pub const DECRYPTION_KEY_MISSING: &str = "DecryptionKeyMissing";
    /// The PersistentVolumeClaim named by `spec.model.source.pvc` is missing.
    pub const MODEL_SOURCE_MISSING: &str = "ModelSourceMissing";
    /// The model's PersistentVolumeClaim uses a StorageClass not declared encrypted.
    pub const STORAGE_CLASS_NOT_ENCRYPTED: &str = "StorageClassNotEncrypted";
    /// Event: Moat reverted a change to a child made outside Moat.
    pub const DRIFT_REPAIRED: &str = "DriftRepaired";
    /// Event: Moat reverted a change to a child made through break-glass (the child carried the
    /// reason annotation `moat.dev/break-glass-reason`, which the note quotes).
    pub const BREAK_GLASS: &str = "BreakGlass";
    /// The stored object does not decode into Moat's types (written under another schema, or
    /// directly to etcd); the message names the field. Moat skips it until it is fixed.
    pub const MALFORMED: &str = "Malformed";
    /// Event: a tag was resolved in its registry and pinned by digest.
    pub const IMAGE_PINNED: &str = "ImagePinned";
    /// Event: a client certificate was withdrawn because consent ended.
    pub const CERTIFICATE_WITHDRAWN: &str = "CertificateWithdrawn";
    /// Event: Moat created children.
    pub const CREATED: &str = "Created";
    /// Event: Moat updated children to a new desired state.
    pub const UPDATED: &str = "Updated";
    /// Event: Moat deleted children no longer desired.
    pub const DELETED: &str = "Deleted";

    /// Every reason `Stalled=True` can carry on a SecureModelDeployment. Health checks (the Argo
    /// CD script, kstatus) must treat each one as degraded; tests enumerate this list, so a new
    /// reason is covered without editing them.
    pub const STALLED: &[&str] = &[
        INVALID_SPEC,
        CONFLICT,
        REJECTED,
        PROGRESS_DEADLINE_EXCEEDED,
        MODEL_DECRYPTION_FAILED,
        CRASH_LOOP,
        ROLLED_BACK,
        DIGEST_REQUIRED,
        REGISTRY_NOT_ALLOWED,
        IMAGE_PULL_SECRET_REJECTED,
        IMAGE_NOT_FOUND,
        DECRYPTION_KEY_MISSING,
        MODEL_SOURCE_MISSING,
        STORAGE_CLASS_NOT_ENCRYPTED,
        MALFORMED,
    ];
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status did not change.
pub fn set(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time,
                ..new
            };
        }
        None => conditions.push(new),
    }
}

/// Sets `Ready`, `Reconciling` and `Stalled` at once, each as `(status, reason, message)`,
/// keeping transition times where a status did not change.
pub fn set_kstatus(
    conditions: &mut Vec<Condition>,
    [ready, reconciling, stalled]: [(bool, &str, String); 3],
    generation: Option<i64>,
    now: &Time,
) {
    for (type_, (status, why, message)) in [
        (READY, ready),
        (RECONCILING, reconciling),
        (STALLED, stalled),
    ] {
        set(
            conditions,
            new(type_, status, why, message, generation, now.clone()),
        );
    }
}

/// The conditions of a stall: not Ready and Stalled, both with `why` and `message`; not
/// Reconciling (no progress is possible without a change).
pub fn set_stalled(
    conditions: &mut Vec<Condition>,
    why: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    set_kstatus(
        conditions,
        [
            (false, why, message.to_string()),
            (false, why, String::new()),
            (true, why, message.to_string()),
        ],
        generation,
        now,
    );
}

/// Builds a condition.
pub fn new(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}

/// Whether the condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Conditions equal apart from `lastTransitionTime` (so an unchanged status is not rewritten).
pub fn same_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter().any(|y| {
                x.type_ == y.type_
                    && x.status == y.status
                    && x.reason == y.reason
                    && x.message == y.message
                    && x.observed_generation == y.observed_generation
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid"))
    }

    #[test]
    fn transition_time_survives_unchanged_status() {
        let mut cs = vec![];
        set(&mut cs, new(READY, false, "A", "m", Some(1), at(10)));
        set(&mut cs, new(READY, false, "B", "m2", Some(2), at(20)));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, at(10));
        assert_eq!(cs[0].reason, "B");
        set(&mut cs, new(READY, true, "C", "", Some(2), at(30)));
        assert_eq!(cs[0].last_transition_time, at(30));
        assert!(is_true(&cs, READY));
    }

    #[test]
    fn comparison_ignores_only_time() {
        let a = vec![new(READY, true, "A", "m", Some(1), at(1))];
        let b = vec![new(READY, true, "A", "m", Some(1), at(2))];
        let c = vec![new(READY, true, "A", "other", Some(1), at(1))];
        assert!(same_ignoring_time(&a, &b));
        assert!(!same_ignoring_time(&a, &c));
    }
}
