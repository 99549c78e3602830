//! The chart's alerts (`charts/moat/templates/prometheusrule.yaml`) and Grafana dashboard
//! (`charts/moat/dashboards/moat.json`) name only metrics Moat exports, every alert has a runbook
//! section and a unit test that makes it fire, and the dashboard shows what it must.
//!
//! The metric names come from the registries themselves (`Metrics` of the operator,
//! `GateMetrics` of the gate), encoded as Prometheus scrapes them; `promtool` (which parses every
//! expression and runs the alert tests) is `charts/moat/tests/rules.sh`, `make test-rules`.

use std::{collections::BTreeSet, path::Path};

#[path = "support/dashboard.rs"]
mod dashboard;

use moat::{
    api::conditions::{self, reason},
    gate::{metrics::GateMetrics, policy::Reason},
    telemetry::metrics::Metrics,
};

/// Series Prometheus adds itself when it scrapes a target, which the rules may use.
const SCRAPE_SERIES: &[&str] = &["up"];

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// The sample names of an OpenMetrics exposition, from its `# TYPE` lines: a counter `x` is
/// scraped as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("malformed TYPE line: {line}");
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["bucket", "sum", "count"] {
                    names.insert(format!("{name}_{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Every sample name the operator and the gate export. A family without a series is not
/// encoded at all, so each gets one, through the calls the operator and the gate make.
fn exported() -> BTreeSet<String> {
    use moat::{
        gate::metrics::{BytesLabels, IdentityLabels, RefusalLabels, RequestLabels},
        telemetry::metrics::{CertificateTimes, ConditionLabels},
    };
    let m = Metrics::default();
    drop(m.reconcile_started());
    m.reconcile_failed("Apply");
    m.drift_repaired("SecureModelDeployment", "ml", "a", "Deployment");
    m.break_glass_used("ml", "a", "Deployment");
    m.image_resolution("pinned");
    m.api_write("Deployment", "apply");
    m.set_managed("*", std::collections::BTreeMap::from([("Deployment", 1)]));
    m.certificate_issued("serving");
    m.set_certificate_expiries(
        "*",
        &[CertificateTimes {
            namespace: "ml".into(),
            secret: "a-tls".into(),
            expiry: 60,
            renewal: 20,
        }],
    );
    m.set_ca("moat-system", "moat-ca", Some(true), Some(3600));
    m.set_model_conditions(
        "*",
        vec![(
            ConditionLabels {
                namespace: "ml".into(),
                name: "a".into(),
                condition: "Ready".into(),
                reason: "RolloutComplete".into(),
            },
            true,
        )],
    );
    let g = GateMetrics::default();
    let identity = || "spiffe://cluster.local/ns/a/sa/b".to_string();
    g.requests
        .get_or_create(&RequestLabels {
            identity: identity(),
            code: 200,
        })
        .inc();
    g.refusals
        .get_or_create(&RefusalLabels {
            identity: identity(),
            reason: "NotConsented",
        })
        .inc();
    g.duration
        .get_or_create(&IdentityLabels {
            identity: identity(),
        })
        .observe(0.1);
    g.bytes
        .get_or_create(&BytesLabels {
            identity: identity(),
            direction: "in",
        })
        .inc();
    g.reloaded("policy", true);
    let operator = m.encode().expect("encode the operator's metrics");
    let gate = g.encode().expect("encode the gate's metrics");
    let mut names = sample_names(&operator);
    names.extend(sample_names(&gate));
    names
}

/// PromQL keywords that look like identifiers.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
];

/// The metric names an expression selects: identifiers outside strings, label matchers, ranges and
/// label lists, that are neither a keyword nor a function or aggregation (followed by `(`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Whether the last identifier opened a label list: `by (`, `without (`, `on (`, ...
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                // Label matchers (whose values may hold braces) or a range.
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                label_list_next = false;
            }
            '0'..='9' | '.' => {
                // A number or a duration (10m, 1e3, 0x1f): never a name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                // A function or aggregation is followed by `(`, or an aggregation by its
                // `by`/`without` clause (`sum by (le) (...)`).
                let next: String = chars[j..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                let called = chars.get(j) == Some(&'(') || next == "by" || next == "without";
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list_next = chars.get(j) == Some(&'(');
                } else if !called && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every PromQL expression of the dashboard (`tests/support/dashboard.rs`), with Grafana's
/// variables as Prometheus receives them.
fn dashboard_expressions() -> Vec<String> {
    dashboard::expressions()
        .into_iter()
        .map(|e| {
            dashboard::substitute(&e.expr, "5m").unwrap_or_else(|err| panic!("{}: {err}", e.place))
        })
        .collect()
}

/// The PromQL of the PrometheusRule template: each `expr:` line, with the template's PromQL
/// variables (`{{- $drift := "..." | replace "WINDOW" $window }}`, `{{- $breakGlass := ... }}`)
/// put in (their `WINDOW` as the default window, 10m) and the other Helm actions left out.
fn rule_expressions() -> Vec<String> {
    let template = read("charts/moat/templates/prometheusrule.yaml");
    let variables: Vec<(String, String)> = template
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("{{- $")?.split_once(" := \"")?;
            let (value, pipeline) = rest.split_once('"')?;
            let value = match pipeline.trim() {
                "}}" => value.to_string(),
                "| replace \"WINDOW\" $window }}" => value.replace("WINDOW", "10m"),
                other => panic!("unexpected pipeline of ${name}: {other}"),
            };
            Some((format!("{{{{ ${name} }}}}"), value))
        })
        .collect();
    assert!(
        variables.iter().any(|(name, _)| name == "{{ $drift }}"),
        "the $drift variable of the template"
    );
    let without_actions = |s: &str| {
        let s = variables.iter().fold(s.to_string(), |s, (name, value)| {
            s.replace(name.as_str(), value.as_str())
        });
        let mut out = String::new();
        let mut rest = s.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            rest = rest[start..]
                .find("}}")
                .map_or("", |end| &rest[start + end + 2..]);
        }
        out.push_str(rest);
        out
    };
    template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(without_actions))
        .collect()
}

/// The alert names of the PrometheusRule template.
fn alerts() -> Vec<String> {
    read("charts/moat/templates/prometheusrule.yaml")
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- alert:")
                .map(|a| a.trim().to_string())
        })
        .collect()
}

#[test]
fn the_extractor_finds_metric_names_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, identity) (rate(moat_gate_request_duration_seconds_bucket{namespace=~"a|b", x="y{z}"}[5m]))) > on (pod) group_left (name) moat_leader offset 10m or absent(up == 1) * 1e3"#,
    );
    let want: BTreeSet<String> = [
        "moat_gate_request_duration_seconds_bucket",
        "moat_leader",
        "up",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

#[test]
fn the_exported_names_come_from_the_registries() {
    let names = exported();
    // A counter, a histogram and a gauge of each registry, as Prometheus stores them.
    for name in [
        "moat_reconcile_total",
        "moat_reconcile_duration_seconds_bucket",
        "moat_model_condition",
        "moat_gate_refusals_total",
        "moat_gate_request_duration_seconds_count",
        "moat_gate_quarantined",
    ] {
        assert!(names.contains(name), "{name} not in {names:?}");
    }
    assert!(!names.contains("moat_reconcile"), "{names:?}");
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_name_is_one_moat_exports() {
    let mut known = exported();
    known.extend(SCRAPE_SERIES.iter().map(|s| s.to_string()));
    let rules = rule_expressions();
    let dashboard = dashboard_expressions();
    assert!(rules.len() >= alerts().len(), "{rules:?}");
    assert!(dashboard.len() >= 10, "{dashboard:?}");
    let mut used = BTreeSet::new();
    for expr in rules.iter().chain(&dashboard) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                known.contains(&name),
                "{name} (in {expr}) is not a metric Moat exports: {known:?}"
            );
            used.insert(name);
        }
    }
    // The dashboard shows what the chart promises: models by condition, drift by kind,
    // certificate expiry, the gates' requests, latency and refusals by identity, reconciles and
    // their errors, the leader.
    let on_dashboard: BTreeSet<String> = dashboard.iter().flat_map(|e| metric_names(e)).collect();
    for name in [
        "moat_model_condition",
        "moat_drift_repairs_total",
        "moat_certificate_expiry_seconds",
        "moat_ca_expiry_seconds",
        "moat_gate_requests_total",
        "moat_gate_request_duration_seconds_bucket",
        "moat_gate_refusals_total",
        "moat_reconcile_total",
        "moat_reconcile_errors_total",
        "moat_leader",
    ] {
        assert!(on_dashboard.contains(name), "the dashboard lacks {name}");
    }
    assert!(
        dashboard
            .iter()
            .any(|e| e.contains("moat_gate_refusals_total") && e.contains("identity")),
        "no refusals by identity on the dashboard"
    );
}

#[test]
fn every_alert_has_a_runbook_section_and_a_unit_test_that_fires_it() {
    let names = alerts();
    assert!(names.len() >= 10, "{names:?}");
    let template = read("charts/moat/templates/prometheusrule.yaml");
    let runbook = read("docs/runbook.md");
    let tests = read("charts/moat/tests/alerts.test.yaml");
    for alert in &names {
        let anchor = alert.to_ascii_lowercase();
        assert!(
            template.contains(&format!("runbook_url: {{{{ $r.runbookURL }}}}#{anchor}\n")),
            "{alert}: its runbook_url does not point at #{anchor}"
        );
        assert!(
            runbook.lines().any(|l| l == format!("## {alert}")),
            "{alert}: docs/runbook.md has no section '## {alert}'"
        );
        // A test case where it fires: `alertname: X` followed by an expected alert.
        let fires = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("- exp_labels:")
        });
        assert!(fires, "{alert}: no case in alerts.test.yaml where it fires");
        let silent = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_alerts: []")
        });
        assert!(
            silent,
            "{alert}: no case in alerts.test.yaml where it stays silent"
        );
    }
}

#[test]
fn the_conditions_and_reasons_the_alerts_match_are_the_ones_moat_sets() {
    let rules = rule_expressions().join("\n");
    // MoatModelDecryptionFailed matches the Stalled condition and the RevisionFailed series
    // (src/controller/census.rs), which stays while a failed revision is rolled back.
    for (condition, why) in [
        (
            format!("=~\"{}|RevisionFailed\"", conditions::STALLED),
            reason::MODEL_DECRYPTION_FAILED,
        ),
        (format!("=\"{}\"", conditions::READY), reason::QUARANTINED),
        (
            format!("=\"{}\"", conditions::RECONCILING),
            reason::REGISTRY_UNREACHABLE,
        ),
    ] {
        let matcher = format!("moat_model_condition{{condition{condition}, reason=\"{why}\"}}");
        assert!(rules.contains(&matcher), "no {matcher} in {rules}");
    }
    assert!(reason::STALLED.contains(&reason::MODEL_DECRYPTION_FAILED));
    // The gate's 429 reasons, and the refusals the spike alert leaves to other alerts.
    let limited = format!(
        "reason=~\"{}|{}\"",
        Reason::RateLimited.as_str(),
        Reason::TooManyConcurrent.as_str()
    );
    assert!(rules.contains(&limited), "no {limited} in {rules}");
    let not_refusals = format!(
        "reason!~\"{}|{}|{}|{}|{}\"",
        Reason::RateLimited.as_str(),
        Reason::TooManyConcurrent.as_str(),
        Reason::Quarantined.as_str(),
        Reason::NoPolicy.as_str(),
        Reason::UpstreamUnavailable.as_str()
    );
    assert!(
        rules.contains(&not_refusals),
        "no {not_refusals} in {rules}"
    );
}
