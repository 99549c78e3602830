//! Helpers for tests that run against Moat's local control plane (`make cluster-up`).
//!
//! Every test gets its own temporary namespace, labelled with [`E2E_LABEL`] and with the test's
//! name under [`TEST_LABEL`]. After the test body finishes (or panics) every namespace carrying
//! that test's label is deleted by label selector, which also sweeps what an interrupted earlier
//! run of the same test left behind.
//!
//! The cluster is found through `KUBECONFIG`; `make test` exports it from `e2e/cluster.sh env`.

pub mod artifacts;
pub mod faults;
pub mod flux;
pub mod git;
pub mod prometheus;
pub mod registry;
pub mod tls;

use std::{future::Future, panic::AssertUnwindSafe, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use futures::FutureExt;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    config::AuthInfo,
};
use serde_json::json;

/// The model image of tests that do not exercise tag resolution: it names a digest, so the
/// operator pins it without asking a registry (none answers for registry.example.com here).
pub const TEST_IMAGE: &str = moat::fixture::IMAGE;

/// Ends a helper binary (`moat-registry`, `moat-bench`): on an error, prints it and its causes on
/// one line and exits with status 1, never a backtrace (whatever `RUST_BACKTRACE` says).
pub fn exit_on_error(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let name = std::env::args()
                .next()
                .and_then(|a| a.rsplit('/').next().map(str::to_string))
                .unwrap_or_else(|| "moat-e2e".into());
            eprintln!(
                "{name}: error: {}",
                format!("{e:#}").replace(['\n', '\r'], " ")
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Label on every namespace an e2e test creates.
pub const E2E_LABEL: &str = "moat.dev/e2e";
/// Label carrying the name of the test that owns a namespace.
pub const TEST_LABEL: &str = "moat.dev/e2e-test";

/// A connection to the local control plane and the namespace a test owns.
#[derive(Clone)]
pub struct TestEnv {
    /// Client authenticated as the cluster administrator (kubeconfig from `KUBECONFIG`).
    pub client: Client,
    /// The test's own namespace.
    pub namespace: String,
    /// The value of [`TEST_LABEL`] on the test's namespaces (cleanup deletes by it).
    test_label: String,
}

impl TestEnv {
    /// Creates one more namespace for this test, with the same labels, removed with the first.
    pub async fn another_namespace(&self, opts: &NamespaceOptions) -> Result<String> {
        Ok(create_namespace(&self.client, &self.test_label, opts)
            .await?
            .namespace)
    }

    /// An operator for the test's namespace, to configure and start.
    pub fn operator(&self) -> OperatorBuilder {
        Operator::builder(&self.namespace)
    }

    /// A typed API in the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// Options for the namespace a test gets.
#[derive(Default, Clone)]
pub struct NamespaceOptions {
    /// Extra labels, for example `pod-security.kubernetes.io/enforce: restricted`.
    pub labels: Vec<(String, String)>,
    /// Annotations, for example the real node's scheduling annotations ([`Self::on_real_node`]).
    pub annotations: Vec<(String, String)>,
}

impl NamespaceOptions {
    /// A namespace that enforces the Pod Security "restricted" profile.
    pub fn restricted() -> Self {
        Self {
            labels: vec![
                (
                    "pod-security.kubernetes.io/enforce".into(),
                    "restricted".into(),
                ),
                (
                    "pod-security.kubernetes.io/enforce-version".into(),
                    "latest".into(),
                ),
            ],
            annotations: Vec::new(),
        }
    }

    /// Pods of this namespace run on the real node (kubelet, containerd, runc) instead of a kwok
    /// node: the API server's PodNodeSelector and PodTolerationRestriction plugins give every
    /// pod the node selector and the toleration of its taint (`e2e/node.sh`).
    pub fn on_real_node(mut self) -> Self {
        self.annotations.push((
            "scheduler.alpha.kubernetes.io/node-selector".into(),
            format!("{REAL_NODE_LABEL}=true"),
        ));
        self.annotations.push((
            "scheduler.alpha.kubernetes.io/defaultTolerations".into(),
            json!([{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}])
                .to_string(),
        ));
        self
    }
}

/// The label (and taint key) of the real node.
pub const REAL_NODE_LABEL: &str = "moat.dev/real-node";

/// The test workload image in the local cluster's registry (Debian's busybox-static: sh, httpd,
/// nc, wget, nslookup), pinned by digest.
pub fn real_node_image() -> Result<String> {
    tool("MOAT_NODE_BUSYBOX_IMAGE")
}

/// Moat's own image (the binary the tests build, with its libraries), pushed to the local
/// cluster's registry and pinned by digest (`e2e/moat-image.sh`); built once per test process.
pub fn real_node_moat_image() -> Result<String> {
    static BUILT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    pushed_image(&BUILT, "moat-image.sh", || {
        Ok(vec![moat_binary()?.into_os_string()])
    })
}

/// The model server image (`e2e/model-server/serve.py` on Debian's Python: a logistic-regression
/// model served over mTLS, an HTTPS artifact store, and a client), pushed to the local cluster's
/// registry and pinned by digest (`e2e/model-server-image.sh`); built once per test process.
pub fn real_node_model_server_image() -> Result<String> {
    static BUILT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    pushed_image(&BUILT, "model-server-image.sh", || Ok(Vec::new()))
}

/// The gate's real-node peer (`src/bin/moat-gate-peer.rs`: a model server of SSE, gRPC
/// trailers and cancellations behind the gate, and the client in front of it), from `binary`
/// (an integration test passes `env!("CARGO_BIN_EXE_moat-gate-peer")`), pushed to the local
/// cluster's registry and pinned by digest (`e2e/gate-peer-image.sh`); built once per test
/// process.
pub fn real_node_gate_peer_image(binary: &str) -> Result<String> {
    static BUILT: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    pushed_image(&BUILT, "gate-peer-image.sh", || Ok(vec![binary.into()]))
}

/// Runs the image script `script` of this crate once per process (the first caller builds and
/// pushes, the others wait) and returns the pinned reference it prints.
fn pushed_image(
    built: &'static std::sync::OnceLock<Result<String, String>>,
    script: &str,
    args: impl FnOnce() -> Result<Vec<std::ffi::OsString>>,
) -> Result<String> {
    built
        .get_or_init(|| {
            let build = || -> Result<String> {
                let script = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
                let out = std::process::Command::new("bash")
                    .arg(&script)
                    .args(args()?)
                    .output()
                    .with_context(|| format!("running {script}"))?;
                ensure!(
                    out.status.success(),
                    "{script} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            };
            build().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs `command` in `container` of the running pod `namespace/pod` (`kubectl exec`: the API
/// server, the kubelet's exec endpoint and runc, as a user's debugging session would); returns
/// whether it succeeded, its standard output and its standard error.
pub async fn exec(
    namespace: &str,
    pod: &str,
    container: &str,
    command: &[&str],
) -> Result<(bool, String, String)> {
    let kubectl = tool("MOAT_KUBECTL")?;
    let out = tokio::process::Command::new(&kubectl)
        .args(["exec", "-n", namespace, pod, "-c", container, "--"])
        .args(command)
        .output()
        .await
        .with_context(|| format!("running {kubectl} exec"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Connects to the cluster named by `KUBECONFIG`, failing with advice when none is running.
pub async fn client() -> Result<Client> {
    let config = Config::infer()
        .await
        .context("no cluster: run `make cluster-up` and export the KUBECONFIG it prints")?;
    Client::try_from(config).context("building a client for the local control plane")
}

/// Runs `test` in a fresh namespace whose name starts with `test_name`, then deletes every
/// namespace labelled with this test's name, whether the test passed or panicked.
pub async fn with_namespace<F, Fut>(test_name: &str, opts: NamespaceOptions, test: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let client = client().await.expect("connect to the local control plane");
    let label_value = sanitize(test_name);
    let env = create_namespace(&client, &label_value, &opts)
        .await
        .expect("create the test namespace");
    let outcome = AssertUnwindSafe(test(env.clone())).catch_unwind().await;
    cleanup(&client, &label_value).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!(
            "test {test_name} failed in namespace {}: {e:#}",
            env.namespace
        ),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.trim_matches('-').chars().take(40).collect()
}

async fn create_namespace(
    client: &Client,
    label_value: &str,
    opts: &NamespaceOptions,
) -> Result<TestEnv> {
    let mut labels = serde_json::Map::new();
    labels.insert(E2E_LABEL.into(), json!("true"));
    labels.insert(TEST_LABEL.into(), json!(label_value));
    for (k, v) in &opts.labels {
        labels.insert(k.clone(), json!(v));
    }
    let annotations: serde_json::Map<String, serde_json::Value> = opts
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "generateName": format!("{}-", label_value.chars().take(40).collect::<String>()), "labels": labels, "annotations": annotations }
    }))?;
    let created = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .context("creating the test namespace")?;
    let namespace = created.name_any();
    // The ServiceAccount admission plugin rejects pods until the namespace's default
    // ServiceAccount exists; wait for kube-controller-manager to create it.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    wait_until("the default ServiceAccount", || async {
        Ok(sas.get_opt("default").await?.is_some())
    })
    .await?;
    Ok(TestEnv {
        client: client.clone(),
        namespace,
        test_label: label_value.to_string(),
    })
}

async fn cleanup(client: &Client, label_value: &str) {
    // Namespaces do not support deletecollection: list by label selector, delete each.
    let api = Api::<Namespace>::all(client.clone());
    let selector = format!("{E2E_LABEL}=true,{TEST_LABEL}={label_value}");
    let namespaces = match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list.items,
        Err(e) => {
            eprintln!("warning: listing namespaces {selector} for cleanup: {e}");
            return;
        }
    };
    for ns in namespaces {
        if let Err(e) = api
            .delete(&ns.name_any(), &DeleteParams::background())
            .await
        {
            eprintln!("warning: deleting namespace {}: {e}", ns.name_any());
        }
    }
}

/// How long a test waits for a state that the control plane or the operator reaches within
/// seconds on an idle machine: a reconcile and the status it writes, a rollout onto kwok nodes,
/// garbage collection, an Event, a metric. A deadline only bounds a failure (a passing test stops
/// waiting as soon as the state is there), so it is sized for a heavily loaded machine (both cores
/// busy with other builds), not for an idle one. Tests use this one value rather than their own.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The deadline for a state Moat reaches with the retry that follows the end of a failure which
/// began at `failing_since` (a registry outage, a wrong pull Secret, a missing key).
///
/// Moat retries a failing reconcile with exponential backoff (1 s, 2 s, 4 s, ..., at most 5
/// minutes), so when the failure ends the pending retry comes at most about as long later as the
/// failure had lasted (and never more than 5 minutes later): [`DEADLINE`] plus that.
pub fn deadline_after_backoff(failing_since: std::time::Instant) -> Duration {
    DEADLINE + failing_since.elapsed().min(Duration::from_secs(300))
}

/// Polls `check` every 200 ms until it returns true, failing after [`DEADLINE`] with `what`.
pub async fn wait_until<F, Fut>(what: &str, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_for(DEADLINE, what, check).await
}

/// Polls `check` every 200 ms until it returns true, failing after `timeout` with `what`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_for_every(Duration::from_millis(200), timeout, what, check).await
}

/// Polls `check` every `interval` until it returns true, failing after `timeout` with `what`.
pub async fn wait_for_every<F, Fut>(
    interval: Duration,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_for_value_every(interval, timeout, what, || {
        let checked = check();
        async move { Ok(checked.await?.then_some(())) }
    })
    .await
}

/// Polls `get` every 200 ms until it returns `Some`, and returns that value: the state that was
/// waited for, so what a test asserts next is read from the very object that satisfied the wait.
/// Fails after `timeout` with `what`.
pub async fn wait_for_value<T, F, Fut>(timeout: Duration, what: &str, get: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    wait_for_value_every(Duration::from_millis(200), timeout, what, get).await
}

async fn wait_for_value_every<T, F, Fut>(
    interval: Duration,
    timeout: Duration,
    what: &str,
    mut get: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match get().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:?}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Requests a short-lived token for a ServiceAccount through the TokenRequest API.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = sas
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{service_account}"))?;
    match issued.status.and_then(|s| s.token) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => bail!("TokenRequest for {namespace}/{service_account} returned no token"),
    }
}

/// A kube `Config` for the same cluster that authenticates with a bearer token only.
pub async fn config_with_token(token: String) -> Result<Config> {
    let mut config = Config::infer().await?;
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Ok(config)
}

/// The user name `client` authenticates as (a SelfSubjectReview, `kubectl auth whoami`).
pub async fn whoami(client: &Client) -> Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("SelfSubjectReview")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the SelfSubjectReview names no user")
}

/// The chart value that exempts Kubernetes' garbage collector and namespace controller from
/// Moat's admission policy on the local cluster: the chart's defaults and `admin`, the user
/// kwokctl runs kube-controller-manager as (it is given the admin's kubeconfig, so every
/// controller acts as the admin here).
pub fn kubernetes_controllers_value(admin: &str) -> String {
    format!(
        "admissionPolicy.kubernetesControllers={{system:serviceaccount:kube-system:generic-garbage-collector,system:serviceaccount:kube-system:namespace-controller,system:kube-controller-manager,{admin}}}"
    )
}

/// A client for the same cluster that acts as the user `user` in `groups` (the admin's
/// credentials with impersonation, as `kubectl --as user --as-group group` does).
pub async fn client_as_user(user: &str, groups: &[&str]) -> Result<Client> {
    let mut config = Config::infer().await?;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups =
        (!groups.is_empty()).then(|| groups.iter().map(|g| g.to_string()).collect());
    Ok(Client::try_from(config)?)
}

/// A client for the same cluster that authenticates as a ServiceAccount (via TokenRequest).
pub async fn client_as_service_account(
    admin: &Client,
    namespace: &str,
    service_account: &str,
) -> Result<Client> {
    let token = service_account_token(admin, namespace, service_account).await?;
    Ok(Client::try_from(config_with_token(token).await?)?)
}

/// The path of a tool the cluster script exported (`MOAT_KUBECTL`, `MOAT_ETCDCTL`, ...).
pub fn tool(var: &str) -> Result<String> {
    std::env::var(var)
        .with_context(|| format!("{var} is not set: run the e2e tests through `make test-e2e`"))
}

/// Runs the cluster's `etcdctl` against its etcd with `args`; its standard output.
pub async fn etcdctl(args: &[&str]) -> Result<Vec<u8>> {
    let etcdctl = tool("MOAT_ETCDCTL")?;
    let endpoint = tool("MOAT_ETCD_ENDPOINT")?;
    let out = tokio::process::Command::new(&etcdctl)
        .args(["--endpoints", &endpoint])
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {etcdctl}"))?;
    ensure!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Names of the objects in a list, sorted, for readable assertions.
pub fn names<K: ResourceExt>(items: &[K]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|o| o.name_any()).collect();
    v.sort();
    v
}

/// Installs (server-side applies) Moat's CRDs and waits until they are established.
pub async fn install_crds(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in moat::api::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("moat-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        // kube's own condition waiter: one watch, no polling.
        tokio::time::timeout(
            DEADLINE,
            kube::runtime::wait::await_condition(
                crds.clone(),
                &name,
                kube::runtime::wait::conditions::is_crd_established(),
            ),
        )
        .await
        .with_context(|| format!("CRD {name} was not established within {DEADLINE:?}"))?
        .with_context(|| format!("watching CRD {name}"))?;
    }
    Ok(())
}

/// A Moat operator running in this test process, watching only one namespace. It runs the same
/// library code as `moat operator`; aborting it is what a crash or a pod restart does.
pub struct Operator {
    /// The operator's metrics (API writes, drift repairs, reconciles).
    pub metrics: std::sync::Arc<moat::telemetry::metrics::Metrics>,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// An operator for `namespace` (its CA there too, a 300 s resync, the admin kubeconfig):
    /// change what a test needs, then [`OperatorBuilder::start`].
    pub fn builder(namespace: &str) -> OperatorBuilder {
        OperatorBuilder {
            config: None,
            settings: settings(&[namespace]),
            lease: None,
        }
    }

    /// Starts the default operator for `namespace` (see [`Operator::builder`]).
    pub async fn start(namespace: &str) -> Result<Self> {
        Self::builder(namespace).start().await
    }

    /// Stops the operator abruptly, as a crash would.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// The drift counter of `kind` in the operator's metrics (`moat_drift_repairs_total`; 0 when
    /// the series is absent).
    pub fn drift_repairs(&self, kind: &str) -> Result<u64> {
        let prefix = format!("moat_drift_repairs_total{{kind=\"{kind}\"}} ");
        Ok(self
            .metrics
            .encode()?
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0))
    }

    /// How many reconciles of SecureModelDeployments have started (`moat_reconcile_total`): a
    /// mark for [`Operator::wait_reconciles_after`].
    pub fn reconciles_started(&self) -> Result<u64> {
        reconciles_started(&self.metrics)
    }

    /// Waits until `n` reconciles that started after `mark` (a value of
    /// [`Operator::reconciles_started`]) have completed, with their writes and status. Since no
    /// more than `mark` reconciles had started when the mark was taken, `mark + n` completed ones
    /// include at least `n` that started after it.
    pub async fn wait_reconciles_after(&self, mark: u64, n: u64, what: &str) -> Result<()> {
        wait_until(
            &format!("{n} reconcile(s) completed after mark {mark}: {what}"),
            || async { Ok(reconciles_completed(&self.metrics)? >= mark + n) },
        )
        .await
    }
}

/// How a test's [`Operator`] runs: the one place an operator is configured.
pub struct OperatorBuilder {
    config: Option<Config>,
    settings: moat::controller::Settings,
    lease: Option<moat::controller::leader::LeaseSettings>,
}

impl OperatorBuilder {
    /// Authenticates with `config` (for example a ServiceAccount token) instead of the admin
    /// kubeconfig.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Watches exactly `namespaces`, as `--namespaces=a,b` does (the CA stays in the first).
    pub fn watching(mut self, namespaces: &[&str]) -> Self {
        self.settings.namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
        self
    }

    /// The requeue interval of a converged object.
    pub fn resync(mut self, period: Duration) -> Self {
        self.settings.resync_period = period;
        self
    }

    /// Changes any other setting (a short CA validity, an allow-list, a helper image, ...).
    pub fn settings(mut self, change: impl FnOnce(&mut moat::controller::Settings)) -> Self {
        change(&mut self.settings);
        self
    }

    /// Runs the controller only while holding the Lease `lease` in the first watched namespace,
    /// as `moat operator --leader-elect` does.
    pub fn elected(mut self, lease: &str, identity: &str, lease_duration_seconds: u64) -> Self {
        self.lease = Some(moat::controller::leader::LeaseSettings {
            name: lease.to_string(),
            namespace: self
                .settings
                .namespaces
                .first()
                .cloned()
                .unwrap_or_default(),
            identity: identity.to_string(),
            duration_seconds: lease_duration_seconds,
            grace_seconds: (lease_duration_seconds / 3).max(1),
        });
        self
    }

    /// Installs Moat's CRDs (as the admin) and starts the operator in this process. With
    /// `MOAT_E2E_LOG` set (an `EnvFilter` such as `moat=debug`), the operator logs to standard
    /// error (shown for failing tests, or all with `--nocapture`).
    pub async fn start(self) -> Result<Operator> {
        static LOGGING: std::sync::Once = std::sync::Once::new();
        if let Ok(level) = std::env::var("MOAT_E2E_LOG") {
            LOGGING.call_once(|| {
                moat::telemetry::init_logging(moat::telemetry::LogFormat::Text, &level)
            });
        }
        install_crds(&client().await?).await?;
        let config = match self.config {
            Some(config) => config,
            None => Config::infer().await?,
        };
        let client = moat::controller::client_from(config)?;
        let metrics = std::sync::Arc::new(moat::telemetry::metrics::Metrics::default());
        let m = metrics.clone();
        let settings = self.settings;
        let task = match self.lease {
            None => tokio::spawn(moat::controller::run(client, settings, m)),
            Some(lease) => tokio::spawn(async move {
                let forever = std::future::pending();
                if let Err(e) =
                    moat::controller::leader::run_elected(client, settings, m, lease, forever).await
                {
                    eprintln!("leader election ended: {e}");
                }
            }),
        };
        Ok(Operator { metrics, task })
    }
}

/// Reconciles started so far, from the metrics of an operator (`moat_reconcile_total`).
pub fn reconciles_started(metrics: &moat::telemetry::metrics::Metrics) -> Result<u64> {
    metric_value(metrics, "moat_reconcile_total")
}

/// Reconciles completed so far (the count of `moat_reconcile_duration_seconds`, observed when a
/// reconcile returns).
pub fn reconciles_completed(metrics: &moat::telemetry::metrics::Metrics) -> Result<u64> {
    metric_value(metrics, "moat_reconcile_duration_seconds_count")
}

fn metric_value(metrics: &moat::telemetry::metrics::Metrics, name: &str) -> Result<u64> {
    let text = metrics.encode()?;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("no {name} in the metrics"))
}

/// The status, reason and message of condition `type_` of the SecureModelDeployment `name`.
pub async fn condition(
    env: &TestEnv,
    name: &str,
    type_: &str,
) -> Result<Option<(String, String, String)>> {
    let smd = env
        .api::<moat::api::SecureModelDeployment>()
        .get(name)
        .await?;
    Ok(smd.status.and_then(|s| {
        s.conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason, c.message))
    }))
}

/// Condition `type_` of `smd` if it describes the current spec (its `observedGeneration` is the
/// object's `metadata.generation`); a condition about an earlier generation is `None`.
pub fn current_condition<'a>(
    smd: &'a moat::api::SecureModelDeployment,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    smd.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.observed_generation == smd.metadata.generation)
}

/// Whether `smd` is Ready for its current spec: `status.observedGeneration` and the Ready
/// condition's `observedGeneration` are `metadata.generation`, and Ready is True (what kstatus,
/// Flux and Argo CD call Current/Healthy).
pub fn is_ready(smd: &moat::api::SecureModelDeployment) -> bool {
    smd.status
        .as_ref()
        .is_some_and(|s| s.observed_generation == smd.metadata.generation)
        && current_condition(smd, moat::api::conditions::READY).is_some_and(|c| c.status == "True")
}

/// Waits (for at most [`DEADLINE`]) until `done` holds for the SecureModelDeployment `name` in
/// `api`, and returns the object it held for.
pub async fn wait_smd<F>(
    api: &Api<moat::api::SecureModelDeployment>,
    name: &str,
    what: &str,
    done: F,
) -> Result<moat::api::SecureModelDeployment>
where
    F: Fn(&moat::api::SecureModelDeployment) -> bool,
{
    wait_smd_within(DEADLINE, api, name, what, done).await
}

/// [`wait_smd`] with another deadline (see [`deadline_after_backoff`]).
pub async fn wait_smd_within<F>(
    timeout: Duration,
    api: &Api<moat::api::SecureModelDeployment>,
    name: &str,
    what: &str,
    done: F,
) -> Result<moat::api::SecureModelDeployment>
where
    F: Fn(&moat::api::SecureModelDeployment) -> bool,
{
    let what = format!("{name}: {what}");
    let done = &done;
    wait_for_value(timeout, &what, || async move {
        let smd = api.get(name).await?;
        Ok(done(&smd).then_some(smd))
    })
    .await
}

/// Waits until `name` is Ready for its current spec (see [`is_ready`]); returns it.
pub async fn wait_ready(
    api: &Api<moat::api::SecureModelDeployment>,
    name: &str,
) -> Result<moat::api::SecureModelDeployment> {
    wait_smd(api, name, "Ready at its current generation", is_ready).await
}

/// Waits until condition `type_` of `name` is True with `reason` for the current spec; returns
/// its message (from the object that satisfied the wait).
pub async fn wait_condition(
    env: &TestEnv,
    name: &str,
    type_: &str,
    reason: &str,
) -> Result<String> {
    wait_condition_within(DEADLINE, env, name, type_, reason).await
}

/// [`wait_condition`] with another deadline (see [`deadline_after_backoff`]).
pub async fn wait_condition_within(
    timeout: Duration,
    env: &TestEnv,
    name: &str,
    type_: &str,
    reason: &str,
) -> Result<String> {
    let holds = |smd: &moat::api::SecureModelDeployment| {
        current_condition(smd, type_).is_some_and(|c| c.status == "True" && c.reason == reason)
    };
    let smd = wait_smd_within(
        timeout,
        &env.api(),
        name,
        &format!("{type_}=True, reason {reason}, at its current generation"),
        holds,
    )
    .await?;
    Ok(current_condition(&smd, type_)
        .map(|c| c.message.clone())
        .unwrap_or_default())
}

/// The notes of the Events (events.k8s.io/v1) in `ns` about the object `regarding` with `reason`.
pub async fn event_notes(
    env: &TestEnv,
    ns: &str,
    regarding: &str,
    reason: &str,
) -> Result<Vec<String>> {
    use k8s_openapi::api::events::v1::Event;
    Ok(Api::<Event>::namespaced(env.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
        })
        .filter_map(|e| e.note)
        .collect())
}

/// Waits until an Event in `ns` about `regarding` with `reason` has a note containing every one
/// of `needles`, and returns that note. Moat publishes some Events in the background after a
/// reconcile (the `Created`, `Updated` and `DriftRepaired` ones), so they may appear after the
/// status that reports the same reconcile.
pub async fn wait_event(
    env: &TestEnv,
    ns: &str,
    regarding: &str,
    reason: &str,
    needles: &[&str],
) -> Result<String> {
    let what = format!("a {reason} Event about {regarding} naming {needles:?}");
    let found = wait_for_value(DEADLINE, &what, || async {
        Ok(event_notes(env, ns, regarding, reason)
            .await?
            .into_iter()
            .find(|n| needles.iter().all(|s| n.contains(s))))
    })
    .await;
    match found {
        Ok(note) => Ok(note),
        Err(e) => {
            let notes = event_notes(env, ns, regarding, reason).await?;
            bail!("{e}; the {reason} Events about {regarding} say: {notes:#?}")
        }
    }
}

/// Operator settings for a test watching `namespaces`: its own CA in the first namespace, no
/// registry allow-list, and a helper image that names a digest (so no registry is asked for it).
pub fn settings(namespaces: &[&str]) -> moat::controller::Settings {
    moat::controller::Settings {
        namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
        resync_period: Duration::from_secs(300),
        facts: moat::render::Facts::default(),
        ca: ca_settings(namespaces.first().copied().unwrap_or("default")),
        image: moat::controller::ImageSettings {
            helper_image: HELPER_IMAGE.into(),
            ..Default::default()
        },
        encrypted_storage_classes: Vec::new(),
        spec_author_policy: false,
    }
}

/// Reports, as the kubelet would, that the `decrypt-model` init container of every pod of the
/// model `model` failed with `message` (its termination message) and is in CrashLoopBackOff: for
/// kwok nodes, where no container runs. Returns how many pods it reported on.
pub async fn report_decrypt_failure(env: &TestEnv, model: &str, message: &str) -> Result<usize> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = env.api();
    let listed = pods
        .list(&kube::api::ListParams::default().labels(&format!("moat.dev/deployment={model}")))
        .await?;
    for pod in &listed.items {
        let status = serde_json::json!({"status": {
            "phase": "Pending",
            "conditions": [
                {"type": "Initialized", "status": "False", "reason": "ContainersNotInitialized"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
                {"type": "PodScheduled", "status": "True"}
            ],
            "initContainerStatuses": [{
                "name": "decrypt-model", "ready": false, "restartCount": 2,
                "image": HELPER_IMAGE, "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}
            }],
            "containerStatuses": [{
                "name": "server", "ready": false, "restartCount": 0,
                "image": TEST_IMAGE, "imageID": "",
                "state": {"waiting": {"reason": "PodInitializing"}}
            }]
        }});
        pods.patch_status(
            &kube::ResourceExt::name_any(pod),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await?;
    }
    Ok(listed.items.len())
}

/// Moat's own image as tests name it: by digest.
pub const HELPER_IMAGE: &str = "registry.example.com/moat@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// CA settings for an operator started by a test: the CA Secret lives in the test's (first)
/// namespace, so every test has its own CA.
pub fn ca_settings(namespace: &str) -> moat::controller::ca::CaSettings {
    moat::controller::ca::CaSettings {
        namespace: namespace.to_string(),
        ..Default::default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The status `sigs.k8s.io/cli-utils/pkg/kstatus` (the library Flux uses) computes for `obj`:
/// `(status, message)`, for example `("Current", "Resource is Ready")`.
pub async fn kstatus(obj: &serde_json::Value) -> Result<(String, String)> {
    use tokio::io::AsyncWriteExt;
    let checker = tool("MOAT_KSTATUS")?;
    let mut child = tokio::process::Command::new(&checker)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {checker}"))?;
    let mut stdin = child.stdin.take().context("kstatus stdin")?;
    stdin.write_all(&serde_json::to_vec(obj)?).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("kstatus failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    let (status, message) = text.split_once('\t').unwrap_or((text.as_str(), ""));
    Ok((status.to_string(), message.to_string()))
}

/// What the Argo CD health check `examples/gitops/argocd/health.lua` says of `obj`, run by a real
/// Lua interpreter (`MOAT_LUA`, default Debian's `lua5.4`): `(status, message)`, for example
/// `("Healthy", "…")`.
pub fn argocd_health(obj: &serde_json::Value) -> Result<(String, String)> {
    let lua = std::env::var("MOAT_LUA").unwrap_or_else(|_| "lua5.4".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/gitops/argocd/health.lua"
    );
    let harness = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\t\", hs.message)",
        to_lua(obj),
        to_lua(&serde_json::Value::String(script.into()))
    );
    let out = std::process::Command::new(&lua)
        .args(["-e", &harness])
        .output()
        .with_context(|| {
            format!(
                "running {lua}: install it with `make deps` (Debian package lua5.4) or set MOAT_LUA"
            )
        })?;
    ensure!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, message) = text
        .split_once('\t')
        .context("the health check printed no status<TAB>message")?;
    Ok((status.to_string(), message.to_string()))
}

/// A JSON value as a Lua table constructor.
fn to_lua(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        ),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(to_lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{}] = {}", to_lua(&Value::String(k.clone())), to_lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `moat` binary of this workspace, built once per test process by the cargo running the
/// tests (`CARGO`), with the same profile and target directory, so a test runs the code it was
/// compiled with. Cargo prints the executable's path; nothing is guessed.
pub fn moat_binary() -> Result<std::path::PathBuf> {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_moat_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_moat_binary() -> Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut command = std::process::Command::new(&cargo);
    // Cargo gives the test process the variables of the package under test (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Build scripts (ring's) rerun when those change, so passing them
    // on would rebuild the dependencies here and again in the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key.as_ref(),
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            command.env_remove(key.as_ref());
        }
    }
    let out = command
        .current_dir(workspace)
        .args([
            "build",
            "--package",
            "moat",
            "--bin",
            "moat",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} build --bin moat"))?;
    ensure!(out.status.success(), "cargo build --bin moat failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "moat")
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .context("cargo build reported no executable for the moat binary")
}

/// A kubeconfig (YAML) for the cluster of `KUBECONFIG`'s current context that authenticates
/// with `token` only, for running the `moat` binary as a ServiceAccount.
pub fn kubeconfig_with_token(token: &str) -> Result<String> {
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
    let path = path.split(':').next().unwrap_or_default().to_string();
    let admin: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?,
    )?;
    let current = admin["current-context"]
        .as_str()
        .context("the kubeconfig has no current-context")?;
    let context = admin["contexts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"].as_str() == Some(current))
        .context("the current context is not defined")?;
    let cluster_name = context["context"]["cluster"]
        .as_str()
        .context("the current context names no cluster")?;
    let mut cluster = admin["clusters"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"].as_str() == Some(cluster_name))
        .context("the current context's cluster is not defined")?
        .clone();
    // A relative CA path is relative to the admin kubeconfig's directory.
    if let Some(ca) = cluster["cluster"]["certificate-authority"].as_str()
        && !ca.starts_with('/')
    {
        let dir = std::path::Path::new(&path)
            .parent()
            .unwrap_or(std::path::Path::new("."));
        cluster["cluster"]["certificate-authority"] =
            serde_yaml::Value::String(dir.join(ca).to_string_lossy().into_owned());
    }
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [serde_json::to_value(&cluster)?],
        "users": [{"name": "service-account", "user": {"token": token}}],
        "contexts": [{"name": "service-account", "context": {"cluster": cluster_name, "user": "service-account"}}],
        "current-context": "service-account",
    });
    Ok(serde_yaml::to_string(&config)?)
}

/// The `moat` binary running as a child process; killed when dropped.
pub struct MoatProcess {
    child: std::sync::Mutex<std::process::Child>,
    /// Where its standard output and error go.
    pub log: std::path::PathBuf,
}

impl MoatProcess {
    /// Starts `moat <args>` with `KUBECONFIG=kubeconfig` and the extra environment `env`; its
    /// output goes to `log`.
    pub fn spawn(
        kubeconfig: &std::path::Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Result<Self> {
        let binary = moat_binary()?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
        let child = std::process::Command::new(&binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {binary:?}"))?;
        Ok(Self {
            child: std::sync::Mutex::new(child),
            log: log.to_path_buf(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .id()
    }

    /// Fails with the end of its log if the process has exited.
    pub fn check_running(&self) -> Result<()> {
        let status = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_wait()?;
        if let Some(status) = status {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "moat exited ({status}); its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Stops the process (SIGKILL, as a crash would) and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for MoatProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The entries of the API server's audit log (`MOAT_AUDIT_LOG`) written after byte `from` whose
/// user is `username`.
pub fn audit_entries(username: &str, from: u64) -> Result<Vec<serde_json::Value>> {
    Ok(audit_entries_since(from)?
        .into_iter()
        .filter(|entry| entry["user"]["username"].as_str() == Some(username))
        .collect())
}

/// Every entry of the API server's audit log (`MOAT_AUDIT_LOG`) written after byte `from`.
pub fn audit_entries_since(from: u64) -> Result<Vec<serde_json::Value>> {
    use std::io::{Read, Seek};
    let path = tool("MOAT_AUDIT_LOG")?;
    // Only what was written after `from` is read: the log of a long run is large.
    let mut file = std::fs::File::open(&path).with_context(|| format!("reading {path}"))?;
    let from = from.min(file.metadata()?.len());
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut log = Vec::new();
    file.read_to_end(&mut log)
        .with_context(|| format!("reading {path}"))?;
    let mut out = Vec::new();
    for line in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(entry) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue; // a line being written
        };
        out.push(entry);
    }
    Ok(out)
}

/// The current size of the audit log: entries written later start after this offset.
pub fn audit_offset() -> Result<u64> {
    let path = tool("MOAT_AUDIT_LOG")?;
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("reading {path}"))?
        .len())
}

/// `kubectl auth can-i --list` output as rows of its four columns (resources, non-resource URLs,
/// resource names, verbs), cut at the offsets of the header's column titles; the bracketed lists
/// are split into their items.
pub fn can_i_rows(text: &str) -> Result<Vec<CanIRow>> {
    let mut lines = text.lines();
    let header = lines.next().context("empty can-i output")?;
    let titles = ["Resources", "Non-Resource URLs", "Resource Names", "Verbs"];
    let mut starts = Vec::new();
    for t in titles {
        starts.push(
            header
                .find(t)
                .with_context(|| format!("no column {t:?} in {header:?}"))?,
        );
    }
    ensure!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "unexpected column order in {header:?}"
    );
    let cell = |line: &str, i: usize| -> String {
        let end = starts.get(i + 1).copied().unwrap_or(usize::MAX);
        let from = starts[i].min(line.len());
        line.get(from..end.min(line.len()))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let list = |s: String| -> Vec<String> {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let mut rows = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        // Columns are padded to a common width, so a row cannot start a cell inside another.
        rows.push(CanIRow {
            resource: cell(line, 0),
            non_resource_urls: list(cell(line, 1)),
            resource_names: list(cell(line, 2)),
            verbs: list(cell(line, 3)),
        });
    }
    Ok(rows)
}

/// One row of `kubectl auth can-i --list`.
#[derive(Debug, Clone)]
pub struct CanIRow {
    /// `resource.group` (empty for a non-resource row).
    pub resource: String,
    /// Non-resource URLs such as `/healthz`.
    pub non_resource_urls: Vec<String>,
    /// Resource names the row is limited to.
    pub resource_names: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_counters_are_read_from_the_metrics() -> Result<()> {
        let metrics = moat::telemetry::metrics::Metrics::default();
        assert_eq!(reconciles_started(&metrics)?, 0);
        assert_eq!(reconciles_completed(&metrics)?, 0);
        let running = metrics.reconcile_started();
        assert_eq!(reconciles_started(&metrics)?, 1);
        assert_eq!(
            reconciles_completed(&metrics)?,
            0,
            "counted before it returned"
        );
        drop(running);
        assert_eq!(reconciles_completed(&metrics)?, 1);
        Ok(())
    }
}
