//! The fault-injection suite (issue 18): each scenario runs `moat operator` (a process of its own,
//! as a ServiceAccount) over a fleet of N SecureModelDeployments (`MOAT_FAULTS_SMDS`, 100 by
//! default; `make test-faults` runs 1000), converges it, changes every model's spec so that all of
//! them converge again, injects a fault in the middle of that and drift besides, ends the fault,
//! and then requires that every model is Ready at its generation with exactly the children Moat's
//! render names (none missing, none extra: no duplicate, no orphaned Secret or client
//! certificate), one Ready pod each, every drift repaired, no panic and no exit of the operator,
//! and its memory back near its steady level. Each reports what it injected and measured
//! (`MOAT_FAULTS_REPORT` collects the lines for `docs/reliability.md`).
//!
//! These tests kill the cluster's API server and throttle or disturb what other tests need, so
//! they are `#[ignore]`d in the ordinary e2e run and run alone, one at a time:
//! `make test-faults-short` (in `make test`, after the e2e tests) and `make test-faults`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::PostParams;
use moat::api::SecureModelDeployment;
use moat_e2e::{
    DEADLINE, NamespaceOptions, TestEnv,
    faults::{
        ApiServer, DRIFT_EVERY, Etcd, Fleet, OperatorProcess, Random, Supervisor, Throttle,
        Toxiproxy, audited_responses, convergence_deadline, fleet_size, mib, model,
        operator_identity, operator_kubeconfig, report, steady_limit,
    },
    install_crds, wait_for, with_namespace,
};
use serde_json::json;

/// One scenario's fleet, operator and measurements.
struct Run {
    name: &'static str,
    fleet: Fleet,
    op: OperatorProcess,
    user: String,
    dir: PathBuf,
    steady: u64,
    initial: Duration,
}

impl Run {
    /// Creates the fleet and the operator's identity, starts the operator and waits until the
    /// fleet has converged, then changes every spec and waits again; measures the steady memory
    /// there.
    async fn converged(name: &'static str, env: TestEnv) -> Result<Self> {
        Self::converged_through(name, env, None).await
    }

    /// [`Run::converged`] with the operator reaching the API server at `server` (a fault proxy).
    async fn converged_through(
        name: &'static str,
        env: TestEnv,
        server: Option<&str>,
    ) -> Result<Self> {
        install_crds(&env.client).await?;
        let n = fleet_size()?;
        let dir = log_dir(name)?;
        let fleet = Fleet::create(env, n).await?;
        let user = operator_identity(&fleet).await?;
        let kubeconfig = operator_kubeconfig(&fleet, &dir, server).await?;
        let start = Instant::now();
        let op = OperatorProcess::start(&fleet, &kubeconfig, &dir)?;
        let initial = fleet
            .wait_converged(convergence_deadline(n, start))
            .await
            .context("the initial convergence")?;
        op.check_healthy()?;
        // The steady level is that of an operator at work: after a whole fleet converged again
        // once (every spec changed), which is also what it does after a fault.
        let start = Instant::now();
        fleet.roll().await?;
        let again = fleet
            .wait_converged(convergence_deadline(n, start))
            .await
            .context("converging again after a spec change")?;
        let steady = op.rss()?;
        println!(
            "{name}: {n} models converged in {:.1} s, again after a spec change in {:.1} s; operator RSS {} MiB",
            initial.as_secs_f64(),
            again.as_secs_f64(),
            mib(steady)
        );
        op.reset_peak();
        Ok(Self {
            name,
            fleet,
            op,
            user,
            dir,
            steady,
            initial,
        })
    }

    /// After the fault ended at `ended` (having begun at `began`): waits for the fleet to
    /// converge, checks the operator, waits for its memory to return near the steady level, and
    /// reports. `fault` says what was injected, `evidence` what shows it took effect.
    async fn after_fault(
        &self,
        began: Instant,
        ended: Instant,
        fault: &str,
        evidence: &str,
    ) -> Result<()> {
        let fleet = &self.fleet;
        fleet
            .wait_converged(convergence_deadline(fleet.n, began))
            .await
            .with_context(|| format!("converging after the fault ({fault})"))?;
        let since_end = ended.elapsed();
        self.op.check_healthy()?;
        let peak = self.op.peak_rss();
        let settled = self.op.wait_rss_at_most(steady_limit(self.steady)).await?;
        self.op.check_healthy()?;
        let drifts = fleet.drifts()?.len();
        report(&format!(
            "| {} | {} | {fault} | {:.1} s | {} | {:.1} s | 0 | 0 | {drifts}, 0 lost | {} / {} / {} | {evidence} |",
            self.name,
            fleet.n,
            (ended - began).as_secs_f64(),
            self.op.runs(),
            since_end.as_secs_f64(),
            mib(self.steady),
            mib(peak),
            mib(settled),
        ))?;
        println!(
            "{}: initial convergence {:.1} s; converged {:.1} s after the fault ended; logs in {:?}",
            self.name,
            self.initial.as_secs_f64(),
            since_end.as_secs_f64(),
            self.dir
        );
        Ok(())
    }
}

/// Where a scenario keeps its logs (the operator's runs, toxiproxy's).
fn log_dir(name: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("faults")
        .join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// How many times the repeated faults strike: 3 in the short form, 6 in the long one.
fn rounds() -> Result<usize> {
    Ok(if fleet_size()? >= 500 { 6 } else { 3 })
}

/// How long one API server outage lasts.
const OUTAGE: Duration = Duration::from_secs(8);

#[tokio::test]
#[ignore = "kills the API server: run alone by `make test-faults-short` / `make test-faults`"]
async fn api_server_killed_once_and_repeatedly_mid_convergence() {
    with_namespace(
        "faults-apiserver",
        NamespaceOptions::restricted(),
        |env| async move {
            let run = Run::converged("api-server-killed", env.clone()).await?;
            let mut api = ApiServer::find()?;
            let supervisor = Supervisor::start()?;
            let began = Instant::now();
            // Once: right after every model's spec changed, before they converge again.
            run.fleet.roll().await?;
            let drifted = run.fleet.drift(0).await?;
            let stopped = api.kill().await?;
            // The outage itself (the fault), not a wait for a state.
            tokio::time::sleep(OUTAGE).await;
            let mut down = api.restart(stopped, &env.client).await?;
            // Repeatedly: each time the operator is busy again after the previous restart (it has
            // written since), with fresh drift and another spec change to work on.
            let mut drifted_total = drifted;
            for round in 1..rounds()? {
                let offset = moat_e2e::audit_offset()?;
                run.fleet.roll().await?;
                drifted_total += run.fleet.drift(round).await?;
                wait_for(DEADLINE, "the operator to write again", || async {
                    Ok(moat_e2e::audit_entries(&run.user, offset)?
                        .iter()
                        .any(|e| e["verb"] == "patch"))
                })
                .await?;
                let stopped = api.kill().await?;
                tokio::time::sleep(OUTAGE).await;
                down += api.restart(stopped, &env.client).await?;
            }
            let ended = Instant::now();
            ensure!(drifted_total > 0, "no drift was introduced");
            run.after_fault(
                began,
                ended,
                &format!(
                    "kube-apiserver SIGKILLed {} times mid-convergence, {:.0} s down each",
                    rounds()?,
                    OUTAGE.as_secs_f64()
                ),
                &format!(
                    "down {:.1} s in all; {drifted_total} drifts made while it was up; controller manager or scheduler restarted {} times",
                    down.as_secs_f64(),
                    supervisor.restarts()
                ),
            )
            .await
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "disturbs the control plane: run alone by `make test-faults-short` / `make test-faults`"]
async fn a_competing_writer_updating_children_and_status_in_a_tight_loop() {
    with_namespace(
        "faults-conflicts",
        NamespaceOptions::restricted(),
        |env| async move {
            let run = Run::converged("conflicts", env.clone()).await?;
            let fleet = &run.fleet;
            let targets: Vec<String> = (0..fleet.n).step_by(DRIFT_EVERY).map(model).collect();
            for name in &targets {
                fleet.record_deployment(name).await?;
            }
            let offset = moat_e2e::audit_offset()?;
            let stop = Arc::new(AtomicBool::new(false));
            let writes = Arc::new(AtomicUsize::new(0));
            let conflicts = Arc::new(AtomicUsize::new(0));
            let began = Instant::now();
            fleet.roll().await?;
            // Four writers, each over its share of the targets: read, change, write back with
            // the resourceVersion read (an update, so a stale read is a 409), over and over.
            let mut writers = Vec::new();
            for w in 0..4 {
                let mine: Vec<String> = targets.iter().skip(w).step_by(4).cloned().collect();
                let (stop, writes, conflicts) = (stop.clone(), writes.clone(), conflicts.clone());
                let client = env.client.clone();
                let ns = env.namespace.clone();
                writers.push(tokio::spawn(async move {
                    let deploys: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), &ns);
                    let smds: kube::Api<SecureModelDeployment> = kube::Api::namespaced(client, &ns);
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let name = &mine[i % mine.len()];
                        i += 1;
                        let outcome = compete(&deploys, &smds, name, i).await;
                        match outcome {
                            Ok(n) => writes.fetch_add(n, Ordering::Relaxed),
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                conflicts.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(kube::Error::Api(s)) if s.code == 404 => 0,
                            Err(e) => return Err(anyhow::Error::from(e)),
                        };
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            // The fault lasts until the writers have written each target several times.
            let wanted = targets.len() * 6;
            let waited = wait_for(DEADLINE, "the competing writers to write", || async {
                Ok(writes.load(Ordering::Relaxed) >= wanted)
            })
            .await;
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.await??;
            }
            waited?;
            let ended = Instant::now();
            let moat_conflicts = audited_responses(&run.user, offset, 409)?;
            let theirs = conflicts.load(Ordering::Relaxed);
            ensure!(
                theirs + moat_conflicts > 0,
                "no conflict happened: the writers did not compete"
            );
            run.after_fault(
                began,
                ended,
                &format!(
                    "4 writers updating {} Deployments (replicas, image) and SMD statuses (Ready=False) in a tight loop",
                    targets.len()
                ),
                &format!(
                    "{} writes by them, {theirs} of theirs and {moat_conflicts} of Moat's answered 409",
                    writes.load(Ordering::Relaxed)
                ),
            )
            .await
        },
    )
    .await;
}

/// One round (the `i`-th) of the competing writer on model `name`: the Deployment scaled to 2
/// with another image, and the SMD's Ready condition set False, each by an update of what was
/// just read.
async fn compete(
    deploys: &kube::Api<Deployment>,
    smds: &kube::Api<SecureModelDeployment>,
    name: &str,
    i: usize,
) -> Result<usize, kube::Error> {
    let mut d = deploys.get(name).await?;
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas = Some(2);
        if let Some(c) = spec
            .template
            .spec
            .as_mut()
            .and_then(|p| p.containers.first_mut())
        {
            c.image = Some("registry.example.com/competitor:latest".into());
        }
    }
    deploys.replace(name, &PostParams::default(), &d).await?;
    let mut smd = smds.get_status(name).await?;
    if let Some(status) = smd.status.as_mut() {
        for c in &mut status.conditions {
            if c.type_ == moat::api::conditions::READY {
                c.status = "False".into();
                c.reason = "Competitor".into();
                c.message = format!("written by a competing writer ({i})");
            }
        }
    }
    smds.replace_status(name, &PostParams::default(), &smd)
        .await?;
    Ok(2)
}

#[tokio::test]
#[ignore = "compacts etcd and restarts the API server: run alone by `make test-faults-short` / `make test-faults`"]
async fn etcd_compaction_expires_the_operators_watches() {
    with_namespace(
        "faults-compaction",
        NamespaceOptions::restricted(),
        |env| async move {
            let run = Run::converged("etcd-compaction", env.clone()).await?;
            let fleet = &run.fleet;
            let mut api = ApiServer::find()?;
            let _supervisor = Supervisor::start()?;
            let gone_before = run.op.log_lines_with("code: 410")?;
            let began = Instant::now();
            // Without the API server's watch cache every watch is served by etcd itself, so a
            // watch that resumes from a compacted revision is expired (410 Gone) by etcd.
            let stopped = api.kill().await?;
            let original = stopped.clone();
            api.restart(stopped.with_arg("--watch-cache=false"), &env.client)
                .await?;
            let mut compacted = Vec::new();
            let mut drifted = 0;
            for round in 0..rounds()? {
                // Children change (drift and a new spec) while etcd compacts and defragments.
                fleet.roll().await?;
                drifted += fleet.drift(round).await?;
                compacted.push(Etcd::compact_and_defrag().await?);
                // The operator's watches must resume: their connections end with the API server.
                let stopped = api.kill().await?;
                api.restart(stopped.with_arg("--watch-cache=false"), &env.client)
                    .await?;
            }
            // The watch cache back, as the cluster runs it.
            api.kill().await?;
            api.restart(original, &env.client).await?;
            let ended = Instant::now();
            let gone = wait_for_gone(&run, gone_before).await?;
            run.after_fault(
                began,
                ended,
                &format!(
                    "etcd compacted to the current revision and defragmented {} times while children changed; the API server without its watch cache, restarted after each",
                    compacted.len()
                ),
                &format!(
                    "{gone} watch errors 410 Gone in the operator's log; {drifted} drifts made; compacted to revisions {compacted:?}"
                ),
            )
            .await
        },
    )
    .await;
}

/// Waits until the operator's log shows watches expired with 410 Gone (more than `before`);
/// returns how many.
async fn wait_for_gone(run: &Run, before: usize) -> Result<usize> {
    moat_e2e::wait_for_value(
        DEADLINE,
        "watch errors 410 Gone in the operator's log",
        || async {
            let n = run.op.log_lines_with("code: 410")?;
            Ok((n > before).then_some(n - before))
        },
    )
    .await
}

#[tokio::test]
#[ignore = "throttles the operator with API Priority and Fairness: run alone by `make test-faults-short` / `make test-faults`"]
async fn throttled_by_priority_and_fairness_the_operator_gets_429s_and_converges() {
    with_namespace(
        "faults-throttle",
        NamespaceOptions::restricted(),
        |env| async move {
            let run = Run::converged("throttling", env.clone()).await?;
            let fleet = &run.fleet;
            let offset = moat_e2e::audit_offset()?;
            let name = format!("moat-faults-{}", env.namespace);
            let throttle =
                Throttle::impose(&env.client, &name, &env.namespace, "moat-operator").await?;
            let began = Instant::now();
            fleet.roll().await?;
            let drifted = fleet.drift(0).await? + fleet.drift(1).await?;
            // The throttle holds until the operator has been refused a good number of times.
            let wanted = (fleet.n / 2).max(20);
            let refused = moat_e2e::wait_for_value(
                convergence_deadline(fleet.n, began),
                "the operator to be refused with 429",
                || async {
                    let n = audited_responses(&run.user, offset, 429)?;
                    Ok((n >= wanted).then_some(n))
                },
            )
            .await?;
            throttle.lift().await?;
            let ended = Instant::now();
            run.after_fault(
                began,
                ended,
                "a FlowSchema sending the operator's ServiceAccount to a PriorityLevelConfiguration of 1 nominal share, no borrowing, Reject",
                &format!("{refused} requests refused with 429 while it held; {drifted} drifts made"),
            )
            .await
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "load: run alone by `make test-faults-short` / `make test-faults`"]
async fn the_operator_sigkilled_at_random_points_many_times() {
    with_namespace(
        "faults-sigkill",
        NamespaceOptions::restricted(),
        |env| async move {
            let mut run = Run::converged("operator-sigkilled", env.clone()).await?;
            let (mut random, seed) = Random::from_env()?;
            let kills = if run.fleet.n >= 500 { 30 } else { 10 };
            let began = Instant::now();
            let mut drifted = 0;
            let mut delays = Vec::new();
            for k in 0..kills {
                if k % 3 == 0 {
                    run.fleet.roll().await?;
                    drifted += run.fleet.drift(k / 3).await?;
                }
                // A random point: 0.1 to 3 s into this run of the operator.
                let delay = Duration::from_millis(random.below(100..3000));
                delays.push(delay);
                tokio::time::sleep(delay).await;
                run.op.check_healthy()?;
                run.op.kill_and_restart()?;
            }
            let ended = Instant::now();
            let total: Duration = delays.iter().sum();
            run.after_fault(
                began,
                ended,
                &format!("the operator SIGKILLed {kills} times at random points (seed {seed}), restarted at once"),
                &format!(
                    "{} runs, {:.1} s apart on average; {drifted} drifts made",
                    run.op.runs(),
                    total.as_secs_f64() / kills as f64
                ),
            )
            .await
        },
    )
    .await;
}

/// How long each network fault holds.
const NETWORK_FAULT: Duration = Duration::from_secs(15);

#[tokio::test]
#[ignore = "load: run alone by `make test-faults-short` / `make test-faults`"]
async fn network_faults_between_the_operator_and_the_api_server() {
    with_namespace(
        "faults-network",
        NamespaceOptions::restricted(),
        |env| async move {
            let dir = log_dir("network")?;
            let proxy = Toxiproxy::start(&dir).await?;
            let run = Run::converged_through("network", env.clone(), Some(&proxy.url)).await?;
            let probe_config = operator_kubeconfig(&run.fleet, &dir, Some(&proxy.url)).await?;
            let probe = kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(
                    kube::config::Kubeconfig::read_from(&probe_config)?,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await?,
            )?;
            let ns = env.namespace.clone();
            let faults: Vec<NetworkFault> = vec![
                (
                    "latency",
                    "300 ms ± 100 ms added each way",
                    vec![
                        (
                            "latency-up",
                            "latency",
                            "upstream",
                            json!({"latency": 300, "jitter": 100}),
                        ),
                        (
                            "latency-down",
                            "latency",
                            "downstream",
                            json!({"latency": 300, "jitter": 100}),
                        ),
                    ],
                    Probe::SlowerThan(Duration::from_millis(400)),
                ),
                (
                    "dropped connections",
                    "every connection reset by the proxy (reset_peer)",
                    vec![("reset", "reset_peer", "upstream", json!({"timeout": 0}))],
                    Probe::Fails,
                ),
                (
                    "stalled connections",
                    "nothing passes and nothing closes (timeout toxic, 0)",
                    vec![("stall", "timeout", "upstream", json!({"timeout": 0}))],
                    Probe::Fails,
                ),
                (
                    "limited bandwidth",
                    "8 KB/s each way",
                    vec![
                        ("bandwidth-up", "bandwidth", "upstream", json!({"rate": 8})),
                        (
                            "bandwidth-down",
                            "bandwidth",
                            "downstream",
                            json!({"rate": 8}),
                        ),
                    ],
                    Probe::SlowerThan(Duration::from_millis(1000)),
                ),
            ];
            for (round, (label, what, toxics, expect)) in faults.into_iter().enumerate() {
                let began = Instant::now();
                for (name, type_, stream, attributes) in &toxics {
                    proxy.add(name, type_, stream, attributes.clone()).await?;
                }
                let probed = probe_once(&probe, &ns).await;
                let evidence = expect
                    .check(&probed)
                    .with_context(|| format!("the {label} fault did not take effect"))?;
                run.fleet.roll().await?;
                let drifted = run.fleet.drift(round).await?;
                // The fault's duration, not a wait for a state.
                tokio::time::sleep(NETWORK_FAULT).await;
                for (name, ..) in &toxics {
                    proxy.remove(name).await?;
                }
                let ended = Instant::now();
                run.after_fault(
                    began,
                    ended,
                    &format!("{label}: {what}"),
                    &format!("{evidence}; {drifted} drifts made"),
                )
                .await?;
                run.op.reset_peak();
            }
            Ok(())
        },
    )
    .await;
}

/// One network fault: its label, what it does, its toxics (name, type, stream, attributes) and
/// what a request through the proxy must show while it holds.
type NetworkFault = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str, &'static str, serde_json::Value)>,
    Probe,
);

/// What a request through the fault proxy must show while a fault holds.
enum Probe {
    /// It takes longer than this.
    SlowerThan(Duration),
    /// It fails (or gets no answer within [`PROBE_TIMEOUT`]).
    Fails,
}

/// How long a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Probe {
    fn check(&self, probed: &Result<Duration>) -> Result<String> {
        match (self, probed) {
            (Probe::SlowerThan(min), Ok(took)) => {
                ensure!(took >= min, "a list through the proxy took only {took:?}");
                Ok(format!(
                    "a list of ConfigMaps through the proxy took {:.2} s",
                    took.as_secs_f64()
                ))
            }
            (Probe::SlowerThan(_), Err(e)) => {
                Err(anyhow::anyhow!("a list through the proxy failed: {e:#}"))
            }
            (Probe::Fails, Ok(took)) => Err(anyhow::anyhow!(
                "a list through the proxy succeeded in {took:?}"
            )),
            (Probe::Fails, Err(e)) => Ok(format!(
                "a list through the proxy failed: {}",
                format!("{e:#}").chars().take(80).collect::<String>()
            )),
        }
    }
}

/// Lists the ConfigMaps of `ns` through `client` (a new connection through the proxy); how long
/// it took, or why it failed, within [`PROBE_TIMEOUT`].
async fn probe_once(client: &kube::Client, ns: &str) -> Result<Duration> {
    let start = Instant::now();
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), ns);
    tokio::time::timeout(PROBE_TIMEOUT, api.list(&Default::default()))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}"))??;
    Ok(start.elapsed())
}
