//! Two-person approval of new revisions, as pure decisions: which ModelApprovals count for a
//! revision ([`judge`]) and whether a revision may go live ([`may_go_live`]).
//!
//! Who approved is the API server's word: the chart's admission policy lets a user create a
//! ModelApproval only with `spec.approver` set to their own name. What the admission policy
//! cannot see, Moat checks here: the approver did not author the revision, approved it only once,
//! named its exact digests, and did so recently enough.

use crate::api::RevisionRef;

/// A ModelApproval, as [`judge`] weighs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The ModelApproval's name.
    pub name: String,
    /// `spec.revision`.
    pub revision: String,
    /// `spec.image`.
    pub image: String,
    /// `spec.modelSha256`.
    pub model_sha256: Option<String>,
    /// `spec.approver`.
    pub approver: String,
    /// `metadata.creationTimestamp`, seconds since the epoch (set by the API server).
    pub created: i64,
}

/// The revision being approved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    /// The ModelRevision's name.
    pub name: &'a str,
    /// Who may not approve it: its author (`spec.author`), and whoever changed the spec last.
    pub authors: Vec<&'a str>,
    /// Its image.
    pub image: &'a str,
    /// Its weights digest.
    pub model_sha256: Option<&'a str>,
}

/// How the approvals of one revision were judged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judged {
    /// The approvals that count: (approval name, approver, created), one per approver, oldest
    /// first.
    pub counted: Vec<(String, String, i64)>,
    /// The approvals of this revision that do not count: (approval name, why).
    pub refused: Vec<(String, String)>,
}

/// Judges the `approvals` of the revision `subject` at `now` (seconds), each valid for
/// `valid_for` seconds. Approvals of other revisions are left out.
pub fn judge(approvals: &[Candidate], subject: &Subject<'_>, now: i64, valid_for: i64) -> Judged {
    let mut mine: Vec<&Candidate> = approvals
        .iter()
        .filter(|a| a.revision == subject.name)
        .collect();
    mine.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut out = Judged::default();
    for a in mine {
        let why = if a.image != subject.image || a.model_sha256.as_deref() != subject.model_sha256 {
            Some(format!(
                "it names image {} and weights {}, but revision {} runs image {} and weights {}",
                a.image,
                a.model_sha256.as_deref().unwrap_or("none"),
                subject.name,
                subject.image,
                subject.model_sha256.unwrap_or("none")
            ))
        } else if subject.authors.contains(&a.approver.as_str()) {
            Some(format!(
                "{} changed the spec that made revision {} and cannot approve it; another user must",
                a.approver, subject.name
            ))
        } else if let Some((first, _, _)) =
            out.counted.iter().find(|(_, who, _)| *who == a.approver)
        {
            Some(format!(
                "{} approved revision {} already (ModelApproval {first}); approvals must come from different users",
                a.approver, subject.name
            ))
        } else if now - a.created > valid_for {
            let at = k8s_openapi::jiff::Timestamp::from_second(a.created.saturating_add(valid_for))
                .map(|t| t.to_string())
                .unwrap_or_default();
            Some(format!(
                "it expired at {at} (valid for {valid_for} s after it was given); approve again"
            ))
        } else {
            None
        };
        match why {
            Some(why) => out.refused.push((a.name.clone(), why)),
            None => out
                .counted
                .push((a.name.clone(), a.approver.clone(), a.created)),
        }
    }
    out
}

/// Whether the revision `current` may go live: approval is off (`required` 0), it is the last
/// known-good or the last approved revision already, or it has `counted` approvals enough.
pub fn may_go_live(
    required: i32,
    current: &RevisionRef,
    last_known_good: Option<&RevisionRef>,
    approved: Option<&RevisionRef>,
    counted: usize,
) -> bool {
    let is = |r: Option<&RevisionRef>| r.is_some_and(|r| r.template_hash == current.template_hash);
    required <= 0
        || is(last_known_good)
        || is(approved)
        || counted >= usize::try_from(required).unwrap_or(usize::MAX)
}

/// One line for the status of a revision that waits: what it awaits and how to approve it.
pub fn awaiting_message(
    current: &RevisionRef,
    required: i32,
    approvers: &[String],
    serving: Option<&RevisionRef>,
) -> String {
    let have = if approvers.is_empty() {
        "none yet".to_string()
    } else {
        approvers.join(", ")
    };
    let runs = match serving {
        Some(s) => format!(
            "the pods run revision {} ({}) until then",
            s.revision, s.name
        ),
        None => "no pods run until then".to_string(),
    };
    format!(
        "revision {} ({}) waits for {required} approvals by users other than its author (counted: {have}); {runs}. Approve with a ModelApproval naming it and its digests (kubectl get modelrevision {} -o yaml)",
        current.revision, current.name, current.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn approval(name: &str, approver: &str, created: i64) -> Candidate {
        Candidate {
            name: name.into(),
            revision: "m-2".into(),
            image: "r/i@sha256:aa".into(),
            model_sha256: Some("bb".into()),
            approver: approver.into(),
            created,
        }
    }

    fn subject() -> Subject<'static> {
        Subject {
            name: "m-2",
            authors: vec!["alice", "frank"],
            image: "r/i@sha256:aa",
            model_sha256: Some("bb"),
        }
    }

    /// Two different users other than the author count; the author's own approval, a second by
    /// the same user, an expired one and one naming other digests are refused with why; another
    /// revision's approvals are left out.
    #[test]
    fn only_approvals_by_different_non_authors_naming_the_digests_count() {
        let mut other_digest = approval("x-digest", "dave", 30);
        other_digest.model_sha256 = Some("cc".into());
        let mut other_revision = approval("x-rev", "erin", 40);
        other_revision.revision = "m-1".into();
        let all = [
            approval("a-self", "alice", 10),
            approval("b-1", "bob", 20),
            approval("b-2", "bob", 25),
            other_digest,
            other_revision,
            approval("c-old", "carol", -2 * DAY),
            approval("f-last", "frank", 50),
        ];
        let j = judge(&all, &subject(), 100, DAY);
        assert_eq!(j.counted, vec![("b-1".to_string(), "bob".to_string(), 20)]);
        let why = |name: &str| {
            j.refused
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, w)| w.clone())
                .unwrap_or_default()
        };
        assert!(why("a-self").contains("alice changed the spec"), "{j:?}");
        assert!(
            why("b-2").contains("bob approved revision m-2 already (ModelApproval b-1)"),
            "{j:?}"
        );
        assert!(
            why("x-digest").contains("names image r/i@sha256:aa and weights cc"),
            "{j:?}"
        );
        assert!(
            why("c-old").contains("expired at 1969-12-31T00:00:00Z"),
            "{j:?}"
        );
        assert!(why("f-last").contains("frank changed the spec"), "{j:?}");
        assert!(!j.refused.iter().any(|(n, _)| n == "x-rev"));
        assert_eq!(j.refused.len(), 5);

        let two = judge(
            &[approval("b", "bob", 20), approval("c", "carol", 30)],
            &subject(),
            100,
            DAY,
        );
        assert_eq!(two.counted.len(), 2);
        assert!(two.refused.is_empty());
    }

    fn rev(hash: &str) -> RevisionRef {
        RevisionRef {
            name: format!("m-{hash}"),
            revision: 2,
            template_hash: hash.into(),
        }
    }

    /// A revision goes live with approval off, with enough approvals, or when it was the last
    /// known-good or approved one already; not with fewer.
    #[test]
    fn a_revision_goes_live_with_enough_approvals_or_when_it_was_approved_before() {
        let cur = rev("b");
        assert!(may_go_live(0, &cur, None, None, 0));
        assert!(!may_go_live(2, &cur, Some(&rev("a")), None, 0));
        assert!(!may_go_live(2, &cur, Some(&rev("a")), Some(&rev("a")), 1));
        assert!(may_go_live(2, &cur, Some(&rev("a")), None, 2));
        assert!(may_go_live(2, &cur, Some(&cur), None, 0));
        assert!(may_go_live(2, &cur, None, Some(&cur), 0));
        let msg = awaiting_message(&cur, 2, &["bob".into()], Some(&rev("a")));
        assert!(
            msg.contains("waits for 2 approvals")
                && msg.contains("counted: bob")
                && msg.contains("revision 2 (m-a)"),
            "{msg}"
        );
        assert!(awaiting_message(&cur, 2, &[], None).contains("no pods run"));
    }
}
