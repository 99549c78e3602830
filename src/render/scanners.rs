//! The checks of Kubernetes manifest scanners (checkov, kube-score) that a rendered object does
//! not follow on purpose, each with its reason, as annotations on the object in each scanner's
//! own skip syntax: a scan of what Moat applies then reports nothing but these decisions, and
//! anyone reading the object sees them. `make test-scan` (e2e/scan.sh) runs both scanners over
//! every example and fixture; docs/scanners.md lists the exceptions.

use std::collections::BTreeMap;

/// Annotation prefix of checkov's skips: `checkov.io/skip<N>: <check>=<reason>`.
pub const CHECKOV_SKIP_PREFIX: &str = "checkov.io/skip";
/// kube-score's skips: the check IDs, comma-separated (its syntax has no room for a reason).
pub const KUBE_SCORE_IGNORE: &str = "kube-score/ignore";
/// The reason of each check in [`KUBE_SCORE_IGNORE`], as `<check>: <reason>;` one after another.
pub const KUBE_SCORE_REASONS: &str = "moat.dev/kube-score-ignore-reasons";

/// One check an object does not follow, in the scanners that have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exception {
    /// checkov's check ID (`CKV_K8S_15`), if checkov has the check.
    pub checkov: Option<&'static str>,
    /// kube-score's check ID (`container-image-pull-policy`), if kube-score has it.
    pub kube_score: Option<&'static str>,
    /// Why the object does not follow it. Never contains `=` (checkov splits its value there).
    pub reason: &'static str,
}

/// Every image Moat runs is pinned by digest.
pub const IMAGE_PULL_POLICY: Exception = Exception {
    checkov: Some("CKV_K8S_15"),
    kube_score: Some("container-image-pull-policy"),
    reason: "every image is pinned by digest (repository@sha256), so IfNotPresent runs exactly \
             that image, while Always would make every pod start depend on the registry",
};

/// The pods spread over nodes with a topology spread constraint, not pod anti-affinity.
pub const HOST_ANTI_AFFINITY: Exception = Exception {
    checkov: None,
    kube_score: Some("deployment-has-host-podantiaffinity"),
    reason: "the replicas are spread over nodes by a topologySpreadConstraint on \
             kubernetes.io/hostname, which kube-score does not read",
};

/// `spec.replicas` below two.
pub const FEW_REPLICAS: Exception = Exception {
    checkov: None,
    kube_score: Some("deployment-replicas"),
    reason: "spec.replicas is the model owner's choice (one replica of a large model may be all \
             the accelerators allow), and from two on Moat adds a PodDisruptionBudget",
};

/// The server's readiness and liveness probes check the same thing.
pub const IDENTICAL_PROBES: Exception = Exception {
    checkov: None,
    kube_score: Some("pod-probes-identical"),
    reason: "the spec gives no distinct check, so both ask whether the server answers, but \
             liveness counts only after the startup probe passed and fails after 3 misses 20s \
             apart, so a busy server leaves the Service long before it is restarted (set \
             spec.server.livenessProbe to tell them apart)",
};

/// The spec puts a Secret's key into an environment variable.
pub const SECRET_ENV: Exception = Exception {
    checkov: Some("CKV_K8S_35"),
    kube_score: None,
    reason: "spec.server.env takes a Secret's key as a variable because its author wrote it so, and \
             spec.server.secretFiles mounts it as a file instead",
};

/// The annotations that record `exceptions`: checkov's numbered in order, kube-score's in one
/// list with the reasons beside it. Empty for none.
pub fn annotations(exceptions: &[Exception]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let checkov = exceptions.iter().filter_map(|e| e.checkov.map(|c| (c, e)));
    for (i, (check, e)) in checkov.enumerate() {
        out.insert(
            format!("{CHECKOV_SKIP_PREFIX}{}", i + 1),
            format!("{check}={}", e.reason),
        );
    }
    let kube_score: Vec<(&str, &Exception)> = exceptions
        .iter()
        .filter_map(|e| e.kube_score.map(|c| (c, e)))
        .collect();
    if !kube_score.is_empty() {
        let ids: Vec<&str> = kube_score.iter().map(|(c, _)| *c).collect();
        out.insert(KUBE_SCORE_IGNORE.into(), ids.join(","));
        let reasons: Vec<String> = kube_score
            .iter()
            .map(|(c, e)| format!("{c}: {};", e.reason))
            .collect();
        out.insert(KUBE_SCORE_REASONS.into(), reasons.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Exception; 5] = [
        IMAGE_PULL_POLICY,
        HOST_ANTI_AFFINITY,
        FEW_REPLICAS,
        IDENTICAL_PROBES,
        SECRET_ENV,
    ];

    /// checkov splits `ID=reason` at every `=`: a reason with one would break its parser.
    #[test]
    fn every_exception_names_a_check_and_a_reason_checkov_can_parse() {
        for e in ALL {
            assert!(e.checkov.is_some() || e.kube_score.is_some(), "{e:?}");
            assert!(!e.reason.contains('='), "{e:?}");
            assert!(!e.reason.contains(';'), "{e:?}");
            assert!(e.reason.len() > 20, "{e:?}");
        }
    }

    #[test]
    fn annotations_in_each_scanners_syntax() {
        let a = annotations(&[IMAGE_PULL_POLICY, HOST_ANTI_AFFINITY, SECRET_ENV]);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            [
                "checkov.io/skip1",
                "checkov.io/skip2",
                "kube-score/ignore",
                "moat.dev/kube-score-ignore-reasons"
            ]
        );
        assert_eq!(
            a["checkov.io/skip1"],
            format!("CKV_K8S_15={}", IMAGE_PULL_POLICY.reason)
        );
        assert!(a["checkov.io/skip2"].starts_with("CKV_K8S_35="));
        assert_eq!(
            a["kube-score/ignore"],
            "container-image-pull-policy,deployment-has-host-podantiaffinity"
        );
        let reasons = &a["moat.dev/kube-score-ignore-reasons"];
        assert!(reasons.starts_with("container-image-pull-policy: every image"));
        assert!(reasons.contains("; deployment-has-host-podantiaffinity: the replicas"));
        assert!(annotations(&[]).is_empty());
    }
}
