//! Pure status computation: from the SecureModelDeployment, its live Deployment and what the
//! reconcile did, to the kstatus conditions Argo CD, Flux and `kubectl wait` read.

use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Time};

use super::drift::Repair;
use crate::api::{
    DriftRepair, DriftStatus, RevisionsStatus, SecureModelDeployment, SecureModelDeploymentStatus,
    conditions::{self, READY, RECONCILING, STALLED, reason},
};

/// Where a Deployment's rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the current template and is available.
    Complete,
    /// Still rolling out; the message says how far.
    Progressing(String),
    /// The Deployment controller gave up (progress deadline exceeded).
    Failed(String),
}

/// The rollout state of `deploy`, with the rules of `kubectl rollout status`.
pub fn rollout(deploy: &Deployment) -> Rollout {
    let generation = deploy.metadata.generation.unwrap_or(0);
    let want = deploy.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = deploy.status.as_ref() else {
        return Rollout::Progressing("waiting for the Deployment controller".into());
    };
    // Like `kubectl rollout status`: a failure reported for an older template does not count.
    if st.observed_generation.unwrap_or(0) < generation {
        return Rollout::Progressing(
            "waiting for the Deployment controller to observe the new spec".into(),
        );
    }
    if let Some(failed) = st.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some(reason::PROGRESS_DEADLINE_EXCEEDED)
    }) {
        return Rollout::Failed(
            failed
                .message
                .clone()
                .unwrap_or_else(|| "progress deadline exceeded".into()),
        );
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let replicas = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    if updated < want {
        Rollout::Progressing(format!("{updated} of {want} replicas run the current spec"))
    } else if replicas > updated {
        Rollout::Progressing(format!(
            "{} old replicas are pending termination",
            replicas - updated
        ))
    } else if available < updated || ready < want {
        Rollout::Progressing(format!("{ready} of {want} replicas are ready"))
    } else {
        Rollout::Complete
    }
}

/// Drift status after `repairs`, counted on top of `previous` (read fresh from the API server,
/// because the cached object may not show the previous reconcile's count yet).
pub fn drift(previous: Option<&DriftStatus>, repairs: &[Repair]) -> Option<DriftStatus> {
    let last = repairs.last()?;
    Some(DriftStatus {
        repairs: previous.map(|d| d.repairs).unwrap_or(0) + repairs.len() as i64,
        last_repair: Some(DriftRepair {
            kind: last.kind.clone(),
            name: last.name.clone(),
            change: last.change.clone(),
            at: last.at.clone(),
        }),
    })
}

/// Status after a successful reconcile. `drift` and `image` are left as they are; see
/// [`drift`], and the reconciler sets the image it pinned.
pub fn converged(
    smd: &SecureModelDeployment,
    deploy: Option<&Deployment>,
    now: Time,
) -> SecureModelDeploymentStatus {
    let generation = smd.metadata.generation;
    let mut st = smd.status.clone().unwrap_or_default();
    st.observed_generation = generation;
    let ds = deploy.and_then(|d| d.status.as_ref());
    st.replicas = Some(ds.and_then(|s| s.replicas).unwrap_or(0));
    st.ready_replicas = Some(ds.and_then(|s| s.ready_replicas).unwrap_or(0));
    st.updated_replicas = Some(ds.and_then(|s| s.updated_replicas).unwrap_or(0));
    let state = deploy
        .map(rollout)
        .unwrap_or(Rollout::Progressing("creating the Deployment".into()));
    let (ready, reconciling, stalled) = match &state {
        Rollout::Complete => (
            (
                true,
                reason::ROLLOUT_COMPLETE,
                format!(
                    "{} of {} replicas ready",
                    st.ready_replicas.unwrap_or(0),
                    smd.spec.replicas
                ),
            ),
            (false, reason::AS_EXPECTED, String::new()),
            (false, reason::AS_EXPECTED, String::new()),
        ),
        Rollout::Progressing(msg) => (
            (false, reason::ROLLING_OUT, msg.clone()),
            (true, reason::ROLLING_OUT, msg.clone()),
            (false, reason::AS_EXPECTED, String::new()),
        ),
        Rollout::Failed(msg) => (
            (false, reason::PROGRESS_DEADLINE_EXCEEDED, msg.clone()),
            (false, reason::PROGRESS_DEADLINE_EXCEEDED, String::new()),
            (true, reason::PROGRESS_DEADLINE_EXCEEDED, msg.clone()),
        ),
    };
    conditions::set_kstatus(
        &mut st.conditions,
        [ready, reconciling, stalled],
        generation,
        &now,
    );
    st
}

/// Sets the revisions status `revs` in `st`, and what it means for the conditions: a revision
/// awaiting approval is not Ready and Reconciling, reason `AwaitingApproval`; a model rolled
/// back to its last known-good revision is Stalled, reason `RolledBack`, naming both revisions;
/// a failed revision with nothing to go back to is Stalled with the failure's own reason
/// (`ModelDecryptionFailed`, `CrashLoop` or `ProgressDeadlineExceeded`).
pub fn revisions(
    st: &mut SecureModelDeploymentStatus,
    smd: &SecureModelDeployment,
    revs: RevisionsStatus,
    now: Time,
) {
    if let Some(awaiting) = &revs.awaiting {
        let message = super::approval::awaiting_message(
            &awaiting.revision,
            awaiting.required,
            &awaiting.approvers,
            revs.serving.as_ref(),
        );
        conditions::set_kstatus(
            &mut st.conditions,
            [
                (false, reason::AWAITING_APPROVAL, message.clone()),
                (true, reason::AWAITING_APPROVAL, message),
                (false, reason::AS_EXPECTED, String::new()),
            ],
            smd.metadata.generation,
            &now,
        );
    } else if let Some(failed) = &revs.failed {
        let rolled_back = revs
            .serving
            .as_ref()
            .filter(|s| s.template_hash != failed.revision.template_hash);
        let (why, message) = match rolled_back {
            Some(good) => (
                reason::ROLLED_BACK,
                super::revision::rolled_back_message(failed, good),
            ),
            None => (
                reason::STALLED
                    .iter()
                    .copied()
                    .find(|r| *r == failed.reason)
                    .unwrap_or(reason::CRASH_LOOP),
                failed.message.clone(),
            ),
        };
        conditions::set_stalled(
            &mut st.conditions,
            why,
            &message,
            smd.metadata.generation,
            &now,
        );
    }
    st.revisions = Some(revs);
}

/// Why a reconcile did not converge, as the status says it: a condition reason (a constant of
/// [`conditions::reason`]) and a one-line message naming what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The condition reason.
    pub reason: &'static str,
    /// What failed and what to do.
    pub message: String,
}

/// Status when the spec cannot be turned into a workload: Stalled, not Ready, with the reason.
pub fn stalled(
    smd: &SecureModelDeployment,
    failure: &Failure,
    now: Time,
) -> SecureModelDeploymentStatus {
    let generation = smd.metadata.generation;
    let mut st = smd.status.clone().unwrap_or_default();
    st.observed_generation = generation;
    conditions::set_stalled(
        &mut st.conditions,
        failure.reason,
        &failure.message,
        generation,
        &now,
    );
    st
}

/// Status while a transient failure is retried: Reconciling with the error; Ready unchanged.
pub fn retrying(
    smd: &SecureModelDeployment,
    failure: &Failure,
    now: Time,
) -> SecureModelDeploymentStatus {
    let generation = smd.metadata.generation;
    let mut st = smd.status.clone().unwrap_or_default();
    conditions::set(
        &mut st.conditions,
        conditions::new(
            RECONCILING,
            true,
            failure.reason,
            format!("{}; retrying", failure.message),
            generation,
            now.clone(),
        ),
    );
    // Retrying is progress, not a stall; an earlier Stalled=True no longer holds.
    conditions::set(
        &mut st.conditions,
        conditions::new(
            STALLED,
            false,
            reason::AS_EXPECTED,
            "",
            generation,
            now.clone(),
        ),
    );
    if !st.conditions.iter().any(|c| c.type_ == READY) {
        conditions::set(
            &mut st.conditions,
            conditions::new(
                READY,
                false,
                reason::APPLYING,
                "applying the generated objects",
                generation,
                now,
            ),
        );
    }
    st
}

/// Whether two statuses say the same (condition transition times and repair times aside).
pub fn same(a: &SecureModelDeploymentStatus, b: &SecureModelDeploymentStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.gate == b.gate
        && a.revisions == b.revisions
        && a.replicas == b.replicas
        && a.ready_replicas == b.ready_replicas
        && a.updated_replicas == b.updated_replicas
        && a.image == b.image
        && a.drift == b.drift
        && a.certificate == b.certificate
        && conditions::same_ignoring_time(&a.conditions, &b.conditions)
}

/// The JSON merge patch (RFC 7396) that turns `old` into `new`: what changed, and `null` for
/// every field `new` no longer has (a merge patch leaves a field it does not mention as it was,
/// so a cleared field must be named).
pub fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov @ Value::Object(_)) if nv.is_object() => {
                        out.insert(k.clone(), merge_patch(ov, nv));
                    }
                    _ => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

/// What guards the endpoint of `smd`, for `status.gate`: Moat's gate with the identities it
/// lets through, its quarantine and the hash of its policy; or, with the gate disabled, a plain
/// statement that Moat does not enforce the endpoint.
pub fn gate(
    enforced: bool,
    identities: &std::collections::BTreeSet<String>,
    quarantine: Option<String>,
    policy_hash: Option<String>,
) -> crate::api::GateStatus {
    if !enforced {
        return crate::api::GateStatus {
            enforced: false,
            message: "the endpoint is not enforced by Moat: spec.gate.mode is Disabled, so the \
                      model server alone checks callers, limits and audit"
                .into(),
            ..Default::default()
        };
    }
    let message = match &quarantine {
        Some(why) => format!("quarantined ({why}): every request is refused"),
        None => format!(
            "Moat's gate admits {} client identit{}",
            identities.len(),
            if identities.len() == 1 { "y" } else { "ies" }
        ),
    };
    crate::api::GateStatus {
        enforced: true,
        message,
        identities: identities.iter().cloned().collect(),
        quarantined: quarantine,
        policy_hash,
    }
}

/// Marks a converged status as quarantined: Ready=False with the reason, the rest untouched.
pub fn quarantined(st: &mut SecureModelDeploymentStatus, why: &str, now: Time) {
    let generation = st.observed_generation;
    conditions::set(
        &mut st.conditions,
        conditions::new(
            READY,
            false,
            reason::QUARANTINED,
            format!("quarantined ({why}): the gate refuses every request; the pods keep running"),
            generation,
            now,
        ),
    );
}

#[cfg(test)]
mod merge_patch_tests {
    use serde_json::json;

    use super::merge_patch;

    /// A merge patch names what changed and nulls what is gone, at any depth, and applied to
    /// the old value gives the new one.
    #[test]
    fn a_merge_patch_nulls_cleared_fields() {
        let old = json!({"a": 1, "gate": {"quarantined": "x", "enforced": true}, "revisions": {"failed": {"reason": "r"}, "history": 2}, "list": [1, 2]});
        let new =
            json!({"a": 1, "gate": {"enforced": true}, "revisions": {"history": 3}, "list": [1]});
        let patch = merge_patch(&old, &new);
        assert_eq!(
            patch,
            json!({"gate": {"quarantined": null}, "revisions": {"failed": null, "history": 3}, "list": [1]})
        );
        assert_eq!(merge_patch(&new, &new), json!({}));
        let mut applied = old.clone();
        apply(&mut applied, &patch);
        assert_eq!(applied, new);
    }

    /// RFC 7396's algorithm, for the test.
    fn apply(target: &mut serde_json::Value, patch: &serde_json::Value) {
        let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) else {
            *target = patch.clone();
            return;
        };
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else if v.is_object() && t.get(k).is_some_and(serde_json::Value::is_object) {
                apply(t.get_mut(k).expect("present"), v);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn deploy(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "m", "generation": generation},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status
        }))
        .expect("deployment")
    }

    fn smd(generation: i64) -> SecureModelDeployment {
        fixture::smd("m")
            .namespace("n")
            .generation(generation)
            .build()
            .expect("smd")
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).expect("time"))
    }

    /// A revision awaiting approval is Reconciling, not Ready, and not Stalled; a rolled-back
    /// model is Stalled/RolledBack naming both revisions; a failed first revision is Stalled with
    /// its own reason.
    #[test]
    fn revisions_set_the_conditions_of_approval_and_rollback() {
        use crate::api::{AwaitingApproval, FailedRevision, RevisionRef, RevisionsStatus};
        let r = |n: i64, h: &str| RevisionRef {
            name: format!("m-{h}"),
            revision: n,
            template_hash: h.repeat(64),
        };
        let reason_of = |st: &SecureModelDeploymentStatus, t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let smd = smd(2);
        let mut st = SecureModelDeploymentStatus::default();
        let waiting = RevisionsStatus {
            current: Some(r(2, "b")),
            serving: Some(r(1, "a")),
            awaiting: Some(AwaitingApproval {
                revision: r(2, "b"),
                required: 2,
                approvers: vec!["bob".into()],
            }),
            ..RevisionsStatus::default()
        };
        revisions(&mut st, &smd, waiting, now());
        assert_eq!(
            reason_of(&st, READY),
            Some(("False".into(), reason::AWAITING_APPROVAL.into()))
        );
        assert_eq!(
            reason_of(&st, RECONCILING),
            Some(("True".into(), reason::AWAITING_APPROVAL.into()))
        );
        assert_eq!(reason_of(&st, STALLED).map(|s| s.0), Some("False".into()));

        let failed = FailedRevision {
            revision: r(2, "b"),
            reason: reason::CRASH_LOOP.into(),
            message: "pod p: container server restarted 2 times".into(),
            at: now(),
            generation: None,
        };
        let mut st = SecureModelDeploymentStatus::default();
        let rolled = RevisionsStatus {
            current: Some(r(2, "b")),
            serving: Some(r(1, "a")),
            last_known_good: Some(r(1, "a")),
            failed: Some(failed.clone()),
            ..RevisionsStatus::default()
        };
        revisions(&mut st, &smd, rolled, now());
        assert_eq!(
            reason_of(&st, STALLED),
            Some(("True".into(), reason::ROLLED_BACK.into()))
        );
        let mut st = SecureModelDeploymentStatus::default();
        let first = RevisionsStatus {
            current: Some(r(2, "b")),
            serving: Some(r(2, "b")),
            failed: Some(failed),
            ..RevisionsStatus::default()
        };
        revisions(&mut st, &smd, first, now());
        assert_eq!(
            reason_of(&st, STALLED),
            Some(("True".into(), reason::CRASH_LOOP.into()))
        );
        assert!(st.revisions.is_some());
    }

    #[test]
    fn rollout_states() {
        let complete = deploy(
            3,
            json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
        );
        assert_eq!(rollout(&complete), Rollout::Complete);
        let stale = deploy(
            4,
            json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
        );
        assert!(matches!(rollout(&stale), Rollout::Progressing(_)));
        let surging = deploy(
            3,
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 3, "availableReplicas": 3}),
        );
        assert!(matches!(rollout(&surging), Rollout::Progressing(m) if m.contains("old replicas")));
        let failed = deploy(
            3,
            json!({"observedGeneration": 3, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "took too long"}]}),
        );
        assert_eq!(rollout(&failed), Rollout::Failed("took too long".into()));
    }

    #[test]
    fn kstatus_conditions_follow_the_rollout() {
        let s = smd(7);
        let ready = converged(
            &s,
            Some(&deploy(
                1,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
            )),
            now(),
        );
        assert_eq!(ready.observed_generation, Some(7));
        assert!(conditions::is_true(&ready.conditions, READY));
        assert!(!conditions::is_true(&ready.conditions, RECONCILING));
        assert!(!conditions::is_true(&ready.conditions, STALLED));
        let progressing = converged(
            &s,
            Some(&deploy(
                1,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1, "availableReplicas": 1}),
            )),
            now(),
        );
        assert!(!conditions::is_true(&progressing.conditions, READY));
        assert!(conditions::is_true(&progressing.conditions, RECONCILING));
        let failed = converged(
            &s,
            Some(&deploy(
                1,
                json!({"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
            )),
            now(),
        );
        assert!(conditions::is_true(&failed.conditions, STALLED));
        assert!(!conditions::is_true(&failed.conditions, RECONCILING));
    }

    #[test]
    fn invalid_specs_are_stalled_and_drift_accumulates() {
        let s = smd(2);
        let e = Failure {
            reason: reason::CONFLICT,
            message: "Service m already exists".into(),
        };
        let st = stalled(&s, &e, now());
        assert_eq!(
            st.conditions
                .iter()
                .find(|c| c.type_ == STALLED)
                .map(|c| (c.reason.as_str(), c.message.as_str())),
            Some((reason::CONFLICT, "Service m already exists"))
        );
        assert!(conditions::is_true(&st.conditions, STALLED));
        assert!(!conditions::is_true(&st.conditions, READY));
        assert_eq!(st.observed_generation, Some(2));
        let r = |n: &str| Repair {
            kind: "Deployment".into(),
            name: n.into(),
            change: "deleted".into(),
            at: now(),
        };
        let first = drift(None, &[r("a")]).expect("drift");
        let second = drift(Some(&first), &[r("b"), r("c")]).expect("drift");
        assert_eq!(second.repairs, 3);
        assert_eq!(second.last_repair.as_ref().expect("last").name, "c");
        assert!(drift(Some(&second), &[]).is_none());
    }
}
