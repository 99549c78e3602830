//! Revisions and automatic rollback, as pure decisions.
//!
//! Every distinct pod template Moat renders for a model is a revision, named by the SHA-256 of
//! the template ([`template_hash`]). The pods carry the first digits as the label
//! [`REVISION_LABEL`], so the pods of one revision can be told from the others. After each apply
//! the reconciler judges the revision the pods run ([`pod_failure`], and the Deployment's own
//! progress deadline) and records the outcome ([`after_apply`]): a revision whose every replica
//! became ready is the last known-good; one that failed is recorded as failed, and while the spec
//! still asks for it, the pods run the last known-good instead ([`serve`]). The spec is never
//! written: a changed spec is a new revision and goes out normally.

use k8s_openapi::{
    api::core::v1::{ContainerStatus, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::ResourceExt;
use serde_json::Value;

use super::status::Rollout;
use crate::{
    api::{FailedRevision, RevisionRef, RevisionsStatus, conditions::reason},
    render::model::INIT_CONTAINER,
};

/// The pod label naming the revision a pod runs: the first [`SHORT_HASH`] digits of its
/// template's hash.
pub const REVISION_LABEL: &str = "moat.dev/revision";

/// How many hex digits of the template hash name a revision (in the label and the
/// ModelRevision's name).
pub const SHORT_HASH: usize = 10;

/// Restarts of one container after which its revision counts as crash-looping (the kubelet's
/// back-off puts the second restart about 30 s after the first start).
pub const CRASH_LOOP_RESTARTS: i32 = 2;

/// Revisions Moat keeps per model unless `spec.rollout.revisionHistoryLimit` says otherwise.
pub const DEFAULT_HISTORY_LIMIT: usize = 10;

/// SHA-256 of a pod template, hex, without its [`REVISION_LABEL`] (which is derived from it).
/// Object keys serialize sorted, so equal templates hash equally.
pub fn template_hash(template: &Value) -> String {
    let mut t = template.clone();
    strip_label(&mut t);
    crate::pki::sha256_hex(t.to_string().as_bytes())
}

/// The template without its [`REVISION_LABEL`].
pub fn strip_label(template: &mut Value) {
    if let Some(labels) = template
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(REVISION_LABEL);
    }
}

/// `template` with the [`REVISION_LABEL`] of `hash`.
pub fn with_label(mut template: Value, hash: &str) -> Value {
    if !template.get("metadata").is_some_and(Value::is_object) {
        template["metadata"] = Value::Object(Default::default());
    }
    if !template["metadata"]
        .get("labels")
        .is_some_and(Value::is_object)
    {
        template["metadata"]["labels"] = Value::Object(Default::default());
    }
    template["metadata"]["labels"][REVISION_LABEL] = Value::String(short(hash).to_string());
    template
}

/// The first [`SHORT_HASH`] digits of `hash`.
pub fn short(hash: &str) -> &str {
    hash.get(..SHORT_HASH).unwrap_or(hash)
}

/// The ModelRevision's name for the revision `hash` of `model`.
pub fn name(model: &str, hash: &str) -> String {
    format!("{model}-{}", short(hash))
}

/// Why the pods of one revision failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFailure {
    /// `ModelDecryptionFailed` or `CrashLoop`.
    pub reason: &'static str,
    /// The pod, the container and what it said, in one line.
    pub message: String,
}

/// Whether a pod of the revision `hash` failed: its model-decrypting init container exited
/// with an error (at once: the same artifact, key and digest fail the same way again), or one of
/// its containers restarted [`CRASH_LOOP_RESTARTS`] times and is not running now.
pub fn pod_failure(pods: &[Pod], hash: &str) -> Option<PodFailure> {
    let label = short(hash);
    pods.iter()
        .filter(|p| p.labels().get(REVISION_LABEL).map(String::as_str) == Some(label))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find_map(|pod| {
            let status = pod.status.as_ref()?;
            let inits = status
                .init_container_statuses
                .as_deref()
                .unwrap_or_default();
            let mains = status.container_statuses.as_deref().unwrap_or_default();
            if let Some(decrypt) = inits.iter().find(|c| c.name == INIT_CONTAINER)
                && let Some((code, message)) = failed_exit(decrypt)
            {
                return Some(PodFailure {
                    reason: reason::MODEL_DECRYPTION_FAILED,
                    message: format!(
                        "pod {}: {INIT_CONTAINER} failed: {}",
                        pod.name_any(),
                        message.unwrap_or_else(|| format!("exit code {code}"))
                    ),
                });
            }
            inits.iter().chain(mains).find_map(|c| {
                let running = c.state.as_ref().is_some_and(|s| s.running.is_some());
                if c.restart_count < CRASH_LOOP_RESTARTS || running {
                    return None;
                }
                let last = failed_exit(c)
                    .map(|(code, message)| match message {
                        Some(m) => format!(", last exit code {code}: {m}"),
                        None => format!(", last exit code {code}"),
                    })
                    .unwrap_or_default();
                Some(PodFailure {
                    reason: reason::CRASH_LOOP,
                    message: format!(
                        "pod {}: container {} restarted {} times{last}",
                        pod.name_any(),
                        c.name,
                        c.restart_count
                    ),
                })
            })
        })
}

/// The exit code and the last line of the termination message of a container that exited with
/// an error, now or last time.
fn failed_exit(c: &ContainerStatus) -> Option<(i32, Option<String>)> {
    let t = [c.state.as_ref(), c.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref())
        .find(|t| t.exit_code != 0)?;
    let message = t
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| m.lines().last().unwrap_or(m).trim().to_string())
        .or_else(|| t.reason.clone());
    Some((t.exit_code, message))
}

/// Which template the Deployment gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serve {
    /// The revision the spec renders to.
    Current,
    /// The last known-good revision: the current one failed.
    KnownGood(RevisionRef),
}

/// What the pods run: the last known-good revision while the spec still asks for a revision that
/// failed (the same template, or the same generation of the spec), otherwise the current one. A failed revision without a known-good one before it is
/// kept (there is nothing to go back to).
pub fn serve(status: Option<&RevisionsStatus>, current: &RevisionRef, generation: i64) -> Serve {
    let Some(st) = status else {
        return Serve::Current;
    };
    match (&st.failed, &st.last_known_good) {
        (Some(failed), Some(good))
            if still_failed(failed, current, generation)
                && good.template_hash != current.template_hash =>
        {
            Serve::KnownGood(good.clone())
        }
        _ => Serve::Current,
    }
}

/// Whether the spec still asks for what failed: the same template, or the same spec generation
/// (only Moat's own inputs changed the template since).
fn still_failed(failed: &FailedRevision, current: &RevisionRef, generation: i64) -> bool {
    failed.revision.template_hash == current.template_hash || failed.generation == Some(generation)
}

/// What went wrong with the revision the pods run, if anything: a pod failure, or the
/// Deployment's progress deadline.
pub fn failure(rollout: &Rollout, pods: Option<PodFailure>) -> Option<PodFailure> {
    pods.or_else(|| match rollout {
        Rollout::Failed(message) => Some(PodFailure {
            reason: reason::PROGRESS_DEADLINE_EXCEEDED,
            message: message.clone(),
        }),
        _ => None,
    })
}

/// The revisions status after an apply that put `serving` into the Deployment, whose rollout is
/// `rollout` (`None`: no pods, a first revision awaiting approval); `found` is what went wrong with `serving`, if anything. The current revision becomes
/// the last known-good once every replica runs it ready; a failure of the current revision is
/// recorded (the next reconcile rolls back, see [`serve`]); a failure recorded for a revision the
/// spec no longer asks for is dropped.
pub fn after_apply(
    previous: Option<&RevisionsStatus>,
    current: &RevisionRef,
    serving: Option<&RevisionRef>,
    rollout: &Rollout,
    found: Option<PodFailure>,
    generation: i64,
    now: &Time,
) -> RevisionsStatus {
    let mut st = previous.cloned().unwrap_or_default();
    st.current = Some(current.clone());
    st.serving = serving.cloned();
    st.failed = st.failed.filter(|f| still_failed(f, current, generation));
    if serving.is_some_and(|s| s.template_hash == current.template_hash) {
        if *rollout == Rollout::Complete {
            st.last_known_good = Some(current.clone());
            st.failed = None;
        } else if let Some(f) = found
            && st.failed.is_none()
        {
            st.failed = Some(FailedRevision {
                revision: current.clone(),
                reason: f.reason.to_string(),
                message: f.message,
                at: now.clone(),
                generation: Some(generation),
            });
        }
    }
    st
}

/// Whether the pods must go back to the last known-good revision now: the current revision the
/// pods run has just been recorded as failed, and a different known-good one exists.
pub fn must_roll_back(st: &RevisionsStatus) -> bool {
    matches!(
        (&st.serving, &st.failed, &st.last_known_good),
        (Some(serving), Some(failed), Some(good))
            if serving.template_hash == failed.revision.template_hash
                && good.template_hash != failed.revision.template_hash
    )
}

/// One line for the status of a rolled-back model.
pub fn rolled_back_message(failed: &FailedRevision, good: &RevisionRef) -> String {
    format!(
        "runs revision {} ({}), the last known-good, instead of revision {} ({}) that the spec asks for: {}: {}; change the spec (or revert it) to go on",
        good.revision,
        good.name,
        failed.revision.revision,
        failed.revision.name,
        failed.reason,
        failed.message
    )
}

/// A kept revision, as [`prune`] weighs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The ModelRevision's name.
    pub name: String,
    /// Its revision number.
    pub revision: i64,
}

/// The revision number of a new revision: one more than the highest kept.
pub fn next_number(kept: &[Kept]) -> i64 {
    kept.iter().map(|k| k.revision).max().unwrap_or(0) + 1
}

/// The ModelRevisions to delete so that `limit` are kept: the oldest (lowest number) first,
/// never one named in `protect` (the current, serving and last known-good).
pub fn prune(kept: &[Kept], limit: usize, protect: &[&str]) -> Vec<String> {
    let mut by_age: Vec<&Kept> = kept.iter().collect();
    by_age.sort_by_key(|k| k.revision);
    let excess = kept.len().saturating_sub(limit);
    by_age
        .into_iter()
        .filter(|k| !protect.contains(&k.name.as_str()))
        .take(excess)
        .map(|k| k.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rev(n: i64, hash: &str) -> RevisionRef {
        RevisionRef {
            name: name("m", hash),
            revision: n,
            template_hash: hash.to_string(),
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time"))
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn pod(hash: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("m-{}", short(hash)), "labels": {REVISION_LABEL: short(hash)}},
            "status": status,
        }))
        .expect("pod")
    }

    /// The hash ignores the label derived from it and the order keys were written in, and sees
    /// every other change.
    #[test]
    fn the_template_hash_ignores_its_own_label_and_key_order() {
        let t = json!({"metadata": {"labels": {"app": "m"}}, "spec": {"containers": [{"name": "s", "image": "i"}]}});
        let h = template_hash(&t);
        assert_eq!(h.len(), 64);
        let labelled = with_label(t.clone(), &h);
        assert_eq!(labelled["metadata"]["labels"][REVISION_LABEL], short(&h));
        assert_eq!(template_hash(&labelled), h);
        let reordered: Value =
            serde_json::from_str(r#"{"spec": {"containers": [{"image": "i", "name": "s"}]}, "metadata": {"labels": {"app": "m"}}}"#)
                .expect("json");
        assert_eq!(template_hash(&reordered), h);
        let mut changed = t.clone();
        changed["spec"]["containers"][0]["image"] = json!("j");
        assert_ne!(template_hash(&changed), h);
        assert_eq!(name("fraud", &h), format!("fraud-{}", &h[..10]));
    }

    /// A failed decrypting init container fails its revision at once, with its message; a
    /// container that restarted twice and is not running is a crash loop; a single restart, a
    /// running container, another revision's pod and a pod being deleted are not failures.
    #[test]
    fn pod_failures_are_decrypt_errors_and_crash_loops_of_the_revisions_own_pods() {
        let decrypt = pod(
            A,
            json!({"initContainerStatuses": [{"name": INIT_CONTAINER, "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"terminated": {"exitCode": 1, "message": "moat decrypt: error\nthe artifact does not authenticate"}}}]}),
        );
        let f = pod_failure(std::slice::from_ref(&decrypt), A).expect("failure");
        assert_eq!(f.reason, reason::MODEL_DECRYPTION_FAILED);
        assert!(
            f.message.contains("does not authenticate") && f.message.contains("m-aaaaaaaaaa"),
            "{}",
            f.message
        );
        assert_eq!(pod_failure(std::slice::from_ref(&decrypt), B), None);

        let crash = |restarts: i32, state: Value| {
            pod(
                A,
                json!({"containerStatuses": [{"name": "server", "ready": false, "restartCount": restarts, "image": "i", "imageID": "",
                    "state": state, "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}),
            )
        };
        let waiting = json!({"waiting": {"reason": "CrashLoopBackOff"}});
        let f = pod_failure(&[crash(2, waiting.clone())], A).expect("crash loop");
        assert_eq!(f.reason, reason::CRASH_LOOP);
        assert!(
            f.message
                .contains("server restarted 2 times, last exit code 3: Error"),
            "{}",
            f.message
        );
        assert_eq!(pod_failure(&[crash(1, waiting.clone())], A), None);
        assert_eq!(
            pod_failure(&[crash(5, json!({"running": {}}))], A),
            None,
            "a container running again is not failing now"
        );
        let mut leaving = crash(3, waiting);
        leaving.metadata.deletion_timestamp = Some(now());
        assert_eq!(pod_failure(&[leaving], A), None);
    }

    /// The pods go back to the last known-good revision only while the spec asks for the failed
    /// one; without a known-good one, or once the spec changed, the current revision is served.
    #[test]
    fn the_known_good_revision_is_served_only_while_the_spec_asks_for_the_failed_one() {
        let failed = |r: RevisionRef| FailedRevision {
            revision: r,
            reason: reason::CRASH_LOOP.into(),
            message: "m".into(),
            at: now(),
            generation: Some(7),
        };
        let st = RevisionsStatus {
            current: Some(rev(2, B)),
            serving: Some(rev(2, B)),
            last_known_good: Some(rev(1, A)),
            failed: Some(failed(rev(2, B))),
            history: 2,
            ..RevisionsStatus::default()
        };
        assert_eq!(serve(Some(&st), &rev(2, B), 7), Serve::KnownGood(rev(1, A)));
        assert_eq!(
            serve(Some(&st), &rev(3, C), 8),
            Serve::Current,
            "a new spec"
        );
        assert_eq!(
            serve(Some(&st), &rev(1, A), 8),
            Serve::Current,
            "a reverted spec"
        );
        // Only Moat's own inputs changed the template (a renewed certificate, a new helper
        // image): the spec still asks for what failed, and the known-good revision stays.
        assert_eq!(
            serve(Some(&st), &rev(3, C), 7),
            Serve::KnownGood(rev(1, A)),
            "the same generation"
        );
        assert_eq!(serve(None, &rev(1, A), 7), Serve::Current);
        let first = RevisionsStatus {
            last_known_good: None,
            ..st.clone()
        };
        assert_eq!(serve(Some(&first), &rev(2, B), 7), Serve::Current);
        assert!(must_roll_back(&st));
        assert!(!must_roll_back(&first));
        let back = RevisionsStatus {
            serving: Some(rev(1, A)),
            ..st.clone()
        };
        assert!(!must_roll_back(&back), "already rolled back");
        let msg = rolled_back_message(st.failed.as_ref().expect("failed"), &rev(1, A));
        assert!(
            msg.contains("revision 1 (m-aaaaaaaaaa)") && msg.contains("revision 2 (m-bbbbbbbbbb)"),
            "{msg}"
        );
    }

    /// A complete rollout makes the current revision the last known-good and clears its failure;
    /// a failure found while it rolls out is recorded once (with its first time); a failure of a
    /// revision the spec no longer asks for is dropped; while the known-good one is served, the
    /// failure stays and the known-good one stays.
    #[test]
    fn after_apply_records_known_good_and_failed_revisions() {
        let crash = PodFailure {
            reason: reason::CRASH_LOOP,
            message: "pod p: container server restarted 2 times".into(),
        };
        let rolling = Rollout::Progressing("0 of 1".into());
        let st = after_apply(
            None,
            &rev(1, A),
            Some(&rev(1, A)),
            &Rollout::Complete,
            None,
            7,
            &now(),
        );
        assert_eq!(st.last_known_good, Some(rev(1, A)));
        assert_eq!(st.failed, None);
        let st2 = after_apply(
            Some(&st),
            &rev(2, B),
            Some(&rev(2, B)),
            &rolling,
            None,
            7,
            &now(),
        );
        assert_eq!(st2.last_known_good, Some(rev(1, A)));
        assert_eq!(st2.current, Some(rev(2, B)));
        assert_eq!(st2.failed, None);
        let st3 = after_apply(
            Some(&st2),
            &rev(2, B),
            Some(&rev(2, B)),
            &rolling,
            Some(crash.clone()),
            7,
            &now(),
        );
        let failed = st3.failed.clone().expect("recorded");
        assert_eq!(failed.revision, rev(2, B));
        assert_eq!(failed.reason, reason::CRASH_LOOP);
        assert!(must_roll_back(&st3));
        // Rolled back: the known-good one serves and completes; the failure stays.
        let st4 = after_apply(
            Some(&st3),
            &rev(2, B),
            Some(&rev(1, A)),
            &Rollout::Complete,
            None,
            7,
            &now(),
        );
        assert_eq!(st4.failed, st3.failed);
        assert_eq!(st4.last_known_good, Some(rev(1, A)));
        assert_eq!(
            serve(Some(&st4), &rev(2, B), 7),
            Serve::KnownGood(rev(1, A))
        );
        // A later failure does not overwrite the first record.
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_100).expect("t"));
        let st5 = after_apply(
            Some(&st3),
            &rev(2, B),
            Some(&rev(2, B)),
            &rolling,
            Some(crash),
            7,
            &later,
        );
        assert_eq!(st5.failed.map(|f| f.at), Some(now()));
        // A fixed spec: the failure is dropped, the new one rolls out.
        let st6 = after_apply(
            Some(&st4),
            &rev(3, C),
            Some(&rev(3, C)),
            &rolling,
            None,
            8,
            &now(),
        );
        assert_eq!(st6.failed, None);
        let kept = after_apply(
            Some(&st4),
            &rev(3, C),
            Some(&rev(1, A)),
            &Rollout::Complete,
            None,
            7,
            &now(),
        );
        assert_eq!(
            kept.failed, st4.failed,
            "a new template at the same generation keeps the failure"
        );
        // No pods (a first revision awaiting approval): complete, but not known-good.
        let none = after_apply(None, &rev(1, A), None, &Rollout::Complete, None, 7, &now());
        assert_eq!(none.last_known_good, None);
        assert_eq!(none.serving, None);
        assert_eq!(st6.serving, Some(rev(3, C)));
        // The progress deadline counts as a failure of the revision rolling out.
        let deadline = failure(
            &Rollout::Failed("ReplicaSet m-1 has timed out".into()),
            None,
        )
        .expect("failure");
        assert_eq!(deadline.reason, reason::PROGRESS_DEADLINE_EXCEEDED);
        assert_eq!(failure(&rolling, None), None);
    }

    /// Pruning keeps `limit` revisions, deleting the lowest numbers first but never a protected
    /// one; numbering continues from the highest kept.
    #[test]
    fn pruning_keeps_the_limit_and_the_protected_revisions() {
        let kept: Vec<Kept> = (1..=5)
            .map(|n| Kept {
                name: format!("m-{n}"),
                revision: n,
            })
            .collect();
        assert_eq!(next_number(&kept), 6);
        assert_eq!(next_number(&[]), 1);
        assert_eq!(prune(&kept, 3, &["m-5"]), vec!["m-1", "m-2"]);
        assert_eq!(prune(&kept, 3, &["m-1", "m-5"]), vec!["m-2", "m-3"]);
        assert_eq!(prune(&kept, 10, &[]), Vec::<String>::new());
        assert_eq!(
            prune(&kept, 2, &["m-1", "m-2", "m-3", "m-4", "m-5"]),
            Vec::<String>::new()
        );
    }
}
