//! The chart's alerts and dashboard against a real Prometheus (the pinned build of
//! `e2e/prometheus.sh`, run as a process): it scrapes the real `moat` binary's `/metrics` every
//! second and evaluates the rules `helm template` renders from the chart's PrometheusRule. A drift
//! repair, a failed decryption and a quarantine each make their alert fire in Prometheus's own
//! alerts API, and each alert resolves once its cause is gone. Then every PromQL expression of the
//! Grafana dashboard runs against that Prometheus over the scenario's time range: each parses, and
//! each returns data except the ones this scenario cannot feed (listed in [`NO_DATA_HERE`], with
//! why).

#[path = "../../tests/support/dashboard.rs"]
mod dashboard;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    core::v1::{Pod, Secret},
    networking::v1::NetworkPolicy,
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
    DEADLINE, HELPER_IMAGE, MoatProcess, NamespaceOptions, TestEnv,
    prometheus::{self, Prometheus},
    registry::{Registry, RegistryOptions, TestImage},
    wait_condition, wait_for_value, with_namespace,
};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/moat");
const MODEL: &str = "fraud";
/// Prometheus's scrape and evaluation interval.
const INTERVAL: Duration = Duration::from_secs(1);
/// `prometheusRule.drift.window`: MoatDriftRepaired resolves this long after the last repair.
const DRIFT_WINDOW: Duration = Duration::from_secs(30);
/// The job name Prometheus gives the operator's series (`prometheusRule.operatorJob`).
const JOB: &str = "moat-e2e-operator";

/// Dashboard expressions this scenario cannot give data, and why. Every other expression must
/// return data over the scenario's time range.
const NO_DATA_HERE: &[(&str, &str)] = &[
    (
        "moat_gate_",
        "the gates' metrics come from the gate sidecar of a model pod (port 15090, scraped through \
         the PodMonitor); the model's pods here run on kwok nodes, where no container runs, so no \
         gate serves metrics (e2e/tests/real_pods.rs runs gates on the real node)",
    ),
    (
        "moat_certificate_renewal_seconds",
        "\"Certificates overdue for renewal\" shows only certificates past their renewal time and \
         not renewed; Moat renews on time here, so the panel is rightly empty",
    ),
];

/// Rate and increase panels of counters whose series Moat creates with the first event (at 1):
/// `rate()` and `increase()` see no rise in a series that appears already at 1, so these panels
/// show 0 throughout this scenario although each event happened (once per label set). The alerts
/// count such a new series with its value (the `unless ... offset` clause of the drift rules);
/// the dashboard does not yet. A known gap: the fix is for Moat to create these series at 0
/// (the kinds, outcomes, usages and reasons are known; an owner's when it is first reconciled),
/// or for the panels to count new series as the alerts do. Every other rate or increase panel
/// must show a rise.
const ZEROS_HERE: &[&str] = &[
    "moat_drift_repairs_total",
    "moat_drift_repairs_by_owner_total",
    "moat_certificates_issued_total",
    "moat_image_resolutions_total",
    "moat_reconcile_errors_total",
];

fn no_data_reason(expr: &str) -> Option<&'static str> {
    NO_DATA_HERE
        .iter()
        .find(|(needle, _)| expr.contains(needle))
        .map(|(_, why)| *why)
}

/// The rule groups of the chart's PrometheusRule, rendered by `helm template` with the drift
/// window of this test and the operator's job, as a Prometheus rule file.
fn chart_rules(helm: &str, namespace: &str) -> Result<String> {
    let window = format!("prometheusRule.drift.window={}s", DRIFT_WINDOW.as_secs());
    let job = format!("prometheusRule.operatorJob={JOB}");
    let out = std::process::Command::new(helm)
        .args(["template", "moat", CHART, "--namespace", namespace])
        .args(["--set", "prometheusRule.enabled=true"])
        .args(["--set", &window, "--set", &job])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .output()
        .with_context(|| format!("running {helm} template"))?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: serde_yaml::Value = serde_yaml::from_slice(&out.stdout)?;
    ensure!(
        rule["kind"].as_str() == Some("PrometheusRule"),
        "helm rendered {rule:?}"
    );
    Ok(serde_yaml::to_string(&rule["spec"])?)
}

/// The alerts named `alert` about the model, as Prometheus holds them now.
async fn model_alerts(prom: &Prometheus, alert: &str, namespace: &str) -> Result<Vec<Value>> {
    Ok(prom
        .alerts()
        .await?
        .into_iter()
        .filter(|a| {
            a["labels"]["alertname"] == alert
                && a["labels"]["namespace"] == namespace
                && a["labels"]["name"] == MODEL
        })
        .collect())
}

/// Waits until Moat's own `/metrics` has a sample line that contains every one of `needles`;
/// returns when it saw it (Unix seconds): the moment the cause is visible to a scrape.
async fn seen_in_moat(metrics: SocketAddr, what: &str, needles: &[&str]) -> Result<f64> {
    wait_for_value(DEADLINE, what, || async {
        let (_, text) = prometheus::http_get(metrics, "/metrics").await?;
        let seen = text
            .lines()
            .any(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)));
        Ok(seen.then(prometheus::unix_now))
    })
    .await
}

/// Waits until `alert` about the model fires; checks that it became active within `for` (0 for
/// the alerts tested here) plus one scrape and one evaluation interval, with `slack` for a busy
/// machine, of `cause_at` (when the cause was first visible in Moat's `/metrics`); returns the
/// alert and how long after the cause it became active.
async fn wait_firing(
    prom: &Prometheus,
    alert: &str,
    namespace: &str,
    cause_at: f64,
) -> Result<(Value, f64)> {
    let firing = wait_for_value(DEADLINE, &format!("{alert} firing"), || async {
        Ok(model_alerts(prom, alert, namespace)
            .await?
            .into_iter()
            .find(|a| a["state"] == "firing"))
    })
    .await?;
    let active_at = prometheus::unix_seconds(firing["activeAt"].as_str().unwrap_or_default())?;
    let after = active_at - cause_at;
    let slack = 3.0;
    let bound = 2.0 * INTERVAL.as_secs_f64() + slack;
    eprintln!(
        "{alert}: active {after:.2} s after its cause was in Moat's /metrics (firing at once: no `for`); labels {}",
        firing["labels"]
    );
    ensure!(
        after <= bound,
        "{alert} became active {after:.2} s after its cause, more than one scrape and one evaluation interval (+{slack} s): {firing}"
    );
    Ok((firing, after))
}

/// Waits until Prometheus holds no `alert` about the model any more (resolved); returns when.
async fn wait_resolved(prom: &Prometheus, alert: &str, namespace: &str) -> Result<f64> {
    wait_for_value(
        DEADLINE + DRIFT_WINDOW,
        &format!("{alert} resolved"),
        || async {
            Ok(model_alerts(prom, alert, namespace)
                .await?
                .is_empty()
                .then(prometheus::unix_now))
        },
    )
    .await
}

async fn create_key(env: &TestEnv) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "fraud-key"},
        // Never read by the operator beyond checking it is there (the init container would).
        "stringData": {"identity": "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"}
    }))?;
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_charts_alerts_fire_and_resolve_in_a_real_prometheus_and_the_dashboard_queries_it() {
    with_namespace(
        "prometheus-alerts",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            let (prometheus_bin, helm) = prometheus::tools()?;
            let rules = chart_rules(&helm, &ns)?;
            for alert in [
                "MoatDriftRepaired",
                "MoatModelDecryptionFailed",
                "MoatModelQuarantined",
            ] {
                ensure!(
                    rules.contains(&format!("alert: {alert}")),
                    "the chart has no {alert}"
                );
            }
            moat_e2e::install_crds(&env.client).await?;
            let dir = std::env::temp_dir().join(format!("moat-e2e-{ns}"));
            std::fs::create_dir_all(&dir)?;

            // Prometheus first, then the operator it scrapes: the drift rule counts a new series
            // only when it knows the series was absent before (up one window ago, or an
            // operator started within the window), which holds from the first scrape on.
            let metrics_addr: SocketAddr = ([127, 0, 0, 1], prometheus::free_port()?).into();
            let prom = Prometheus::start(
                &prometheus_bin,
                &prometheus::Config {
                    interval: INTERVAL,
                    job: JOB.into(),
                    target: metrics_addr,
                    target_labels: vec![("namespace".into(), ns.clone())],
                    rules,
                },
                &dir,
            )
            .await?;
            let groups = prom.api("rules").await?;
            let loaded = groups["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .filter(|r| r["type"] == "alerting")
                .count();
            ensure!(
                loaded >= 10,
                "Prometheus loaded {loaded} alerting rules: {groups}"
            );
            eprintln!(
                "Prometheus {} evaluates {loaded} alerting rules of the chart",
                prom.addr
            );

            // The model's image is a tag in a real registry on loopback, which Moat resolves to a
            // digest (the dashboard's image resolutions).
            let registry = Registry::start(RegistryOptions::default()).await?;
            registry
                .push("serving/model:v1", &TestImage::single("prometheus"))
                .await?;
            // The real binary, leader-elected as the chart runs it, watching the test's namespace.
            let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
            let kubeconfig = kubeconfig.split(':').next().unwrap_or_default().to_string();
            let args: Vec<String> = vec![
                "operator".into(),
                format!("--namespaces={ns}"),
                format!("--operator-namespace={ns}"),
                format!("--metrics-addr={metrics_addr}"),
                "--health-probe-addr=127.0.0.1:0".into(),
                format!("--helper-image={HELPER_IMAGE}"),
                "--leader-elect".into(),
                "--log-level=info,moat=debug".into(),
                format!("--registry-ca-file={}", registry.ca_file().display()),
            ];
            let op = MoatProcess::spawn(
                std::path::Path::new(&kubeconfig),
                &args,
                &[],
                &dir.join("operator.log"),
            )?;
            let mut scenario = scenario(&env, &prom, &op, &registry, metrics_addr).await;
            if scenario.is_err() {
                let smd = env.api::<SecureModelDeployment>().get_opt(MODEL).await;
                let status = smd.map(|s| s.and_then(|s| s.status));
                let alerts = prom.alerts().await;
                scenario = scenario.with_context(|| {
                    format!("the model's status: {status:?}; Prometheus's alerts: {alerts:?}")
                });
            }
            let alive = op.check_running();
            let log = op.log.clone();
            op.stop();
            scenario
                .and(alive)
                .with_context(|| format!("operator log: {}", log.display()))?;
            std::fs::remove_dir_all(&dir).ok();
            Ok(())
        },
    )
    .await;
}

async fn scenario(
    env: &TestEnv,
    prom: &Prometheus,
    op: &MoatProcess,
    registry: &Registry,
    metrics_addr: SocketAddr,
) -> Result<()> {
    let ns = env.namespace.as_str();
    let started = prometheus::unix_now();
    wait_for_value(DEADLINE, "Prometheus to scrape the operator", || async {
        op.check_running()?;
        let up = prom
            .query(&format!("up{{job=\"{JOB}\", namespace=\"{ns}\"}} == 1"))
            .await?;
        Ok((!up.is_empty()).then_some(()))
    })
    .await?;

    // A model (its image a tag, pinned by Moat) whose key Secret is missing at first (a failed reconcile, reason `model`, for the
    // dashboard's errors panel), then arrives; one replica on a kwok node.
    let smds: Api<SecureModelDeployment> = env.api();
    let pull: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pull"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": k8s_openapi::ByteString(registry.dockerconfigjson())}
    }))?;
    env.api::<Secret>()
        .create(&PostParams::default(), &pull)
        .await?;
    let smd = fixture::smd(MODEL)
        .replicas(1)
        .image(&registry.image_ref("serving/model:v1"))
        .image_pull_secrets(&["pull"])
        .set(
            &["spec", "server", "args"],
            json!(["--model", "/models/fraud"]),
        )
        .limits("1", "4Gi")
        .model(json!({
            "source": {"url": "https://artifacts.example.com/fraud/v3.tar.age"},
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "decryptionKeySecretRef": {"name": "fraud-key", "key": "identity"},
            "mountPath": "/models/fraud",
            "sizeLimit": "2Gi"
        }))
        .build()?;
    smds.create(&PostParams::default(), &smd).await?;
    let failing_since = Instant::now();
    wait_condition(env, MODEL, conditions::STALLED, "DecryptionKeyMissing").await?;
    create_key(env).await?;
    moat_e2e::wait_condition_within(
        moat_e2e::deadline_after_backoff(failing_since),
        env,
        MODEL,
        conditions::READY,
        "RolloutComplete",
    )
    .await?;

    // 1. Drift: someone opens the model's NetworkPolicy to all ingress; Moat reverts it.
    // Made once Prometheus has scraped the operator for a whole window. A repair within one
    // window of the operator's start is counted through the start-time clause of the rule, which
    // ends one window after the start; the scrape one window before that moment found the
    // operator not yet listening (up 0), so the alert drops for an evaluation there and fires
    // again until the window after the repair ends: a flap this test does not measure.
    let window = DRIFT_WINDOW.as_secs();
    wait_for_value(
        DEADLINE + DRIFT_WINDOW,
        "Prometheus to have scraped the operator for one drift window",
        || async {
            let up = prom
                .query(&format!(
                    "up{{job=\"{JOB}\", namespace=\"{ns}\"}} offset {window}s == 1"
                ))
                .await?;
            Ok((!up.is_empty()).then_some(()))
        },
    )
    .await?;
    let policies: Api<NetworkPolicy> = env.api();
    let policy = policies
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.kind == "SecureModelDeployment" && o.name == MODEL)
        })
        .context("the model's NetworkPolicy")?
        .name_any();
    policies
        .patch(
            &policy,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [{}]}})),
        )
        .await?;
    let repaired_at = seen_in_moat(
        metrics_addr,
        "the drift repair in Moat's metrics",
        &[
            "moat_drift_repairs_by_owner_total{",
            &format!("name=\"{MODEL}\""),
            "kind=\"NetworkPolicy\"",
        ],
    )
    .await?;
    let (drift, _) = wait_firing(prom, "MoatDriftRepaired", ns, repaired_at).await?;
    ensure!(
        drift["labels"]["kind"] == "NetworkPolicy"
            && drift["labels"]["owner"] == "SecureModelDeployment",
        "{drift}"
    );
    ensure!(
        drift["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("#moatdriftrepaired")),
        "{drift}"
    );

    // 2. A failed decryption: the init container's failure, reported in the pods' status as the
    // kubelet would (e2e/tests/model.rs checks the message of the real `moat decrypt`).
    let reason = "decrypting https://artifacts.example.com/fraud/v3.tar.age: no identity matched any of the recipients";
    let pods: Api<Pod> = env.api();
    let selector = format!("moat.dev/deployment={MODEL}");
    let reported = moat_e2e::report_decrypt_failure(env, MODEL, reason).await?;
    ensure!(reported > 0, "no pods of {MODEL}");
    let failed_at = seen_in_moat(
        metrics_addr,
        "Stalled/ModelDecryptionFailed in Moat's metrics",
        &[
            "moat_model_condition{",
            &format!("name=\"{MODEL}\""),
            "condition=\"Stalled\"",
            "reason=\"ModelDecryptionFailed\"",
            "} 1",
        ],
    )
    .await?;
    let (decryption, _) = wait_firing(prom, "MoatModelDecryptionFailed", ns, failed_at).await?;
    ensure!(
        decryption["labels"]["severity"] == "critical",
        "{decryption}"
    );

    // The drift alert resolves one window after the repair, not before.
    let drift_resolved = wait_resolved(prom, "MoatDriftRepaired", ns).await?;
    let drift_lasted = drift_resolved - repaired_at;
    eprintln!(
        "MoatDriftRepaired: resolved {drift_lasted:.2} s after the repair (window {} s)",
        DRIFT_WINDOW.as_secs()
    );
    ensure!(
        drift_lasted >= DRIFT_WINDOW.as_secs_f64() - 2.0 * INTERVAL.as_secs_f64(),
        "MoatDriftRepaired resolved {drift_lasted:.2} s after the repair, before its window passed"
    );

    // The decryption is fixed (the right key in place): new pods start, their init container
    // succeeds (kwok reports them running), the rollout completes and the model is Ready again.
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(&selector),
    )
    .await?;
    let fixed_at_start = prometheus::unix_now();
    moat_e2e::wait_ready(&smds, MODEL).await?;
    let decryption_resolved = wait_resolved(prom, "MoatModelDecryptionFailed", ns).await?;
    eprintln!(
        "MoatModelDecryptionFailed: resolved {:.2} s after the failing pods were replaced",
        decryption_resolved - fixed_at_start
    );

    // 3. Quarantine by annotation (the first response to a suspected compromise), then lifted.
    let quarantine = |value: Value| {
        let mut annotations = serde_json::Map::new();
        annotations.insert(moat::render::gate::QUARANTINE_ANNOTATION.into(), value);
        json!({"metadata": {"annotations": annotations}})
    };
    smds.patch(
        MODEL,
        &PatchParams::default(),
        &Patch::Merge(quarantine(json!("INC-17: suspected key leak"))),
    )
    .await?;
    let quarantined_at = seen_in_moat(
        metrics_addr,
        "Ready/Quarantined in Moat's metrics",
        &[
            "moat_model_condition{",
            &format!("name=\"{MODEL}\""),
            "condition=\"Ready\"",
            "reason=\"Quarantined\"",
            "} 0",
        ],
    )
    .await?;
    wait_firing(prom, "MoatModelQuarantined", ns, quarantined_at).await?;
    smds.patch(
        MODEL,
        &PatchParams::default(),
        &Patch::Merge(quarantine(Value::Null)),
    )
    .await?;
    let lifted_at = prometheus::unix_now();
    let quarantine_resolved = wait_resolved(prom, "MoatModelQuarantined", ns).await?;
    eprintln!(
        "MoatModelQuarantined: resolved {:.2} s after the annotation was removed",
        quarantine_resolved - lifted_at
    );
    moat_e2e::wait_ready(&smds, MODEL).await?;

    // No alert of the operator itself fired: it was up and led throughout.
    let all = prom.alerts().await?;
    let operator_alerts: Vec<&Value> = all
        .iter()
        .filter(|a| {
            a["labels"]["alertname"]
                .as_str()
                .is_some_and(|n| n.starts_with("MoatOperator"))
        })
        .collect();
    ensure!(operator_alerts.is_empty(), "{operator_alerts:?}");

    // Every expression of the dashboard over the scenario, as its panels ask (a range query,
    // one point a second, Grafana's variables at their "All" value).
    let (start, end) = (started, prometheus::unix_now());
    let mut with_data = Vec::new();
    let mut without = Vec::new();
    let mut missing = Vec::new();
    let mut zeros = Vec::new();
    // With MOAT_DASHBOARD_DATA set, every expression's series go to that file (JSON), which
    // e2e/dashboard-picture.py draws into docs/dashboard.png (`make dashboard-picture`).
    let mut dump = Vec::new();
    for e in dashboard::expressions() {
        let expr = dashboard::substitute(&e.expr, "5m").map_err(anyhow::Error::msg)?;
        let result = prom
            .query_range(&expr, start, end, INTERVAL.as_secs_f64())
            .await
            .with_context(|| format!("{}: {expr}", e.place))?;
        dump.push(json!({"place": e.place, "expr": expr, "result": result}));
        let points: usize = result
            .iter()
            .map(|s| s["values"].as_array().map_or(0, Vec::len))
            .sum();
        let max = result
            .iter()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v[1].as_str().and_then(|v| v.parse::<f64>().ok()))
            .fold(0.0_f64, |m, v| m.max(v.abs()));
        let counts = expr.contains("rate(") || expr.contains("increase(");
        if points > 0 {
            with_data.push(format!(
                "{:<60} {} series, {points} points, largest value {max:.3}",
                e.place,
                result.len()
            ));
            if counts && max == 0.0 {
                if ZEROS_HERE.iter().any(|n| expr.contains(n)) {
                    zeros.push(format!("{:<60} all 0", e.place));
                } else {
                    missing.push(format!("{} shows no rise: {expr}", e.place));
                }
            }
        } else if let Some(why) = no_data_reason(&expr) {
            without.push(format!("{:<60} no data: {why}", e.place));
        } else {
            missing.push(format!("{}: {expr}", e.place));
        }
    }
    eprintln!(
        "dashboard: {} expressions parse and return data:\n  {}",
        with_data.len(),
        with_data.join("\n  ")
    );
    eprintln!(
        "dashboard: {} expressions parse but cannot have data in this scenario:\n  {}",
        without.len(),
        without.join("\n  ")
    );
    eprintln!(
        "dashboard: {} rate/increase expressions show 0 throughout although their events \
         happened (a series that appears at 1 has no rise; see ZEROS_HERE):\n  {}",
        zeros.len(),
        zeros.join("\n  ")
    );
    if let Ok(path) = std::env::var("MOAT_DASHBOARD_DATA") {
        let data = json!({"start": start, "end": end, "expressions": dump});
        std::fs::write(&path, serde_json::to_vec(&data)?)
            .with_context(|| format!("writing {path}"))?;
        eprintln!("dashboard: the series of every expression written to {path}");
    }
    ensure!(
        missing.is_empty(),
        "dashboard expressions without data (or, for a rate or increase, without a rise) after the scenario: {missing:#?}"
    );
    ensure!(with_data.len() >= 15, "{with_data:#?}");
    Ok(())
}
