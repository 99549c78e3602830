//! The harness of the fault-injection suite (`e2e/tests/faults.rs`, `make test-faults`).
//!
//! - [`Fleet`]: N SecureModelDeployments (and a ModelClient for every tenth) in a test's
//!   namespaces, the census of what Moat must have made of them (exactly the children Moat's own
//!   pure render names, the client certificate Secrets, nothing else), the drift a fault hides
//!   from the operator and the check that every piece of it was repaired.
//! - [`OperatorProcess`]: `moat operator` as a process of its own (as a pod runs it), running as
//!   a ServiceAccount (so API Priority and Fairness treats it as any workload), with its log
//!   scanned for panics and its resident memory sampled from `/proc/<pid>/status`.
//! - The faults: [`ApiServer`] (the cluster's kube-apiserver killed and restarted), [`Etcd`]
//!   (compaction and defragmentation), [`Throttle`] (a FlowSchema with a tiny
//!   PriorityLevelConfiguration), [`Toxiproxy`] (a fault proxy between the operator and the API
//!   server).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
    rbac::v1::RoleBinding,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use moat::{
    api::{ModelClient, SecureModelDeployment, conditions},
    fixture,
};
use serde_json::json;

use crate::{
    DEADLINE, HELPER_IMAGE, MoatProcess, NamespaceOptions, TestEnv, is_ready,
    kubeconfig_with_token, service_account_token, tool, wait_for, wait_for_every,
};

/// How many SecureModelDeployments each scenario runs with: `MOAT_FAULTS_SMDS`, 100 by default
/// (the short form in `make test`); `make test-faults` sets 1000.
pub fn fleet_size() -> Result<usize> {
    match std::env::var("MOAT_FAULTS_SMDS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("MOAT_FAULTS_SMDS={v:?} is not a number")),
        Err(_) => Ok(100),
    }
}

/// Every `CLIENT_EVERY`-th model has a consenting ModelClient (and so a client certificate).
pub const CLIENT_EVERY: usize = 10;
/// Every `DRIFT_EVERY`-th model gets drift during a fault.
pub const DRIFT_EVERY: usize = 5;

/// The name of model `i`.
pub fn model(i: usize) -> String {
    format!("m-{i:04}")
}

/// The name of model `i`'s ModelClient (and of the ServiceAccount it names).
pub fn client(i: usize) -> String {
    format!("c-{i:04}")
}

/// How long to wait for a fleet of `n` to converge: [`DEADLINE`] plus half a second per model
/// (1000 converge in about 100 s on an idle 2-core machine), plus the backoff a failure that
/// began at `failing_since` can have built up (Moat's retries wait as long as the failure has
/// lasted, at most 5 minutes).
pub fn convergence_deadline(n: usize, failing_since: Instant) -> Duration {
    DEADLINE
        + Duration::from_millis(500 * n as u64)
        + failing_since.elapsed().min(Duration::from_secs(300))
}

/// One piece of drift: what was done to which child, and how to tell it was undone.
#[derive(Debug, Clone)]
pub struct Drift {
    /// `Kind/name` of the child.
    pub target: String,
    /// What was done.
    pub what: &'static str,
    check: Check,
}

#[derive(Debug, Clone)]
enum Check {
    /// The child was deleted: repaired when one of that name with another uid exists.
    Recreated {
        ar: ApiResource,
        namespace: String,
        name: String,
        old_uid: String,
    },
    /// The Deployment was scaled and its server image changed: repaired when both are back.
    Deployment {
        namespace: String,
        name: String,
        replicas: i32,
        image: String,
    },
    /// A value of the gate ConfigMap was changed: repaired when it is back.
    GateConfig {
        namespace: String,
        name: String,
        data: BTreeMap<String, String>,
    },
}

/// N SecureModelDeployments in the test's namespace, every tenth with a ModelClient in a
/// namespace of clients, all watched by the operator under test.
pub struct Fleet {
    /// The test's environment (its namespace holds the models and the CA).
    pub env: TestEnv,
    /// The namespace of the ModelClients.
    pub clients_ns: String,
    /// How many models.
    pub n: usize,
    /// The revision of the models' spec (`spec.server.args: [--revision, <n>]`): [`Fleet::roll`]
    /// moves every model to the next one.
    revision: std::sync::atomic::AtomicUsize,
    drifts: Mutex<Vec<Drift>>,
}

impl Fleet {
    /// Creates the clients' namespace, then `n` models and their ModelClients, 16 at a time.
    pub async fn create(env: TestEnv, n: usize) -> Result<Self> {
        let clients_ns = env.another_namespace(&NamespaceOptions::default()).await?;
        ensure_kwok_nodes(&env.client, n).await?;
        let fleet = Self {
            env,
            clients_ns,
            n,
            revision: std::sync::atomic::AtomicUsize::new(0),
            drifts: Mutex::new(Vec::new()),
        };
        let smds = fleet.env.api::<SecureModelDeployment>();
        let clients: Api<ModelClient> =
            Api::namespaced(fleet.env.client.clone(), &fleet.clients_ns);
        let fleet_ref = &fleet;
        stream::iter(0..n)
            .map(|i| {
                let smds = smds.clone();
                let clients = clients.clone();
                async move {
                    smds.create(&PostParams::default(), &fleet_ref.smd(i)?)
                        .await
                        .with_context(|| format!("creating {}", model(i)))?;
                    if i.is_multiple_of(CLIENT_EVERY) {
                        let mc =
                            fixture::model_client(&client(i), &fleet_ref.env.namespace, &model(i))
                                .build()?;
                        clients
                            .create(&PostParams::default(), &mc)
                            .await
                            .with_context(|| format!("creating ModelClient {}", client(i)))?;
                    }
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(fleet)
    }

    /// Model `i` at the current revision: one small replica (on a kwok node); every tenth
    /// consents to its ModelClient.
    fn smd(&self, i: usize) -> Result<SecureModelDeployment> {
        let revision = self.revision.load(Ordering::Relaxed).to_string();
        let mut smd = fixture::smd(&model(i))
            .namespace(&self.env.namespace)
            .replicas(1)
            .limits("100m", "512Mi")
            .set(&["spec", "server", "args"], json!(["--revision", revision]));
        if i.is_multiple_of(CLIENT_EVERY) {
            smd = smd
                .clients(json!([{"namespace": self.clients_ns, "serviceAccounts": [client(i)]}]));
        }
        Ok(smd.build()?)
    }

    /// Changes every model's spec (the next revision of its server's arguments), 16 at a time, so
    /// that each must converge again: a new pod template, a rollout, status at a new generation.
    pub async fn roll(&self) -> Result<()> {
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        let smds = self.env.api::<SecureModelDeployment>();
        let patch = json!({"spec": {"server": {"args": ["--revision", revision.to_string()]}}});
        let (smds, patch) = (&smds, &patch);
        stream::iter(0..self.n)
            .map(|i| async move {
                smds.patch(&model(i), &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .with_context(|| format!("rolling {}", model(i)))
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// How many models are Ready at their current generation.
    pub async fn ready(&self) -> Result<usize> {
        Ok(list_all(&self.env.api::<SecureModelDeployment>())
            .await?
            .iter()
            .filter(|s| is_ready(s))
            .count())
    }

    /// Records that the Deployment of model `name` must end as the operator renders it now (its
    /// replicas and server image), whatever another writer does to it meanwhile.
    pub async fn record_deployment(&self, name: &str) -> Result<()> {
        let live = self.env.api::<Deployment>().get(name).await?;
        let spec = live.spec.context("no spec")?;
        let image = spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .context("no image")?;
        self.drifts
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(Drift {
                target: format!("Deployment {}/{name}", self.env.namespace),
                what: "written by a competing writer",
                check: Check::Deployment {
                    namespace: self.env.namespace.clone(),
                    name: name.to_string(),
                    replicas: spec.replicas.unwrap_or(1),
                    image,
                },
            });
        Ok(())
    }

    /// The objects Moat must keep, as `Kind namespace/name`: for each model the children its pure
    /// render names, the CA Secret, and each ModelClient's certificate Secret.
    pub fn expected(&self) -> Result<BTreeSet<String>> {
        let facts = moat::render::Facts::default();
        let mut want = BTreeSet::new();
        for i in 0..self.n {
            let smd = self.smd(i)?;
            for obj in moat::render::render(&smd, &facts)?.objects()? {
                want.insert(format!("{} {}/{}", obj.kind, self.env.namespace, obj.name));
            }
            if i.is_multiple_of(CLIENT_EVERY) {
                want.insert(format!("Secret {}/{}-client", self.clients_ns, client(i)));
            }
        }
        want.insert(format!("Secret {}/moat-ca", self.env.namespace));
        Ok(want)
    }

    /// Every object of a kind Moat writes that lives in the fleet's namespaces, as
    /// `Kind namespace/name`, leaving out only what the control plane itself puts in every
    /// namespace (the `default` ServiceAccount, the `kube-root-ca.crt` ConfigMap) and the
    /// operator's own ServiceAccount ([`operator_identity`]).
    pub async fn census(&self) -> Result<BTreeSet<String>> {
        let kinds: [(&str, &str, &str); 7] = [
            ("", "v1", "ServiceAccount"),
            ("", "v1", "Secret"),
            ("networking.k8s.io", "v1", "NetworkPolicy"),
            ("", "v1", "Service"),
            ("", "v1", "ConfigMap"),
            ("policy", "v1", "PodDisruptionBudget"),
            ("apps", "v1", "Deployment"),
        ];
        let mut have = BTreeSet::new();
        for ns in [&self.env.namespace, &self.clients_ns] {
            for (group, version, kind) in kinds {
                let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
                let ar = ApiResource::from_gvk(&gvk);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.env.client.clone(), ns, &ar);
                let mut params = ListParams::default().limit(500);
                loop {
                    let page = api.list_metadata(&params).await?;
                    for obj in &page.items {
                        let name = obj.name_any();
                        if (kind == "ServiceAccount" && (name == "default" || name == OPERATOR_SA))
                            || (kind == "ConfigMap" && name == "kube-root-ca.crt")
                        {
                            continue;
                        }
                        have.insert(format!("{kind} {ns}/{name}"));
                    }
                    match page.metadata.continue_.filter(|c| !c.is_empty()) {
                        Some(token) => params = params.continue_token(&token),
                        None => break,
                    }
                }
            }
        }
        Ok(have)
    }

    /// What is wrong with the fleet now, one line per problem (empty when converged): models not
    /// Ready, ModelClients not Ready, children missing or extra (orphans, duplicates), pods not
    /// one Ready per model, drift not repaired.
    pub async fn problems(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let smds = list_all(&self.env.api::<SecureModelDeployment>()).await?;
        let not_ready: Vec<String> = smds
            .iter()
            .filter(|s| !is_ready(s))
            .map(|s| s.name_any())
            .collect();
        if smds.len() != self.n {
            out.push(format!("{} models, expected {}", smds.len(), self.n));
        }
        if !not_ready.is_empty() {
            out.push(format!(
                "{} models not Ready: {}",
                not_ready.len(),
                abbreviate(&not_ready)
            ));
        }
        let mcs = list_all(&Api::<ModelClient>::namespaced(
            self.env.client.clone(),
            &self.clients_ns,
        ))
        .await?;
        let mc_not_ready: Vec<String> = mcs
            .iter()
            .filter(|m| {
                !m.status.as_ref().is_some_and(|s| {
                    s.observed_generation == m.metadata.generation
                        && conditions::is_true(&s.conditions, conditions::READY)
                })
            })
            .map(|m| m.name_any())
            .collect();
        if !mc_not_ready.is_empty() {
            out.push(format!(
                "{} ModelClients not Ready: {}",
                mc_not_ready.len(),
                abbreviate(&mc_not_ready)
            ));
        }
        let want = self.expected()?;
        let have = self.census().await?;
        let missing: Vec<String> = want.difference(&have).cloned().collect();
        let extra: Vec<String> = have.difference(&want).cloned().collect();
        if !missing.is_empty() {
            out.push(format!(
                "{} missing: {}",
                missing.len(),
                abbreviate(&missing)
            ));
        }
        if !extra.is_empty() {
            out.push(format!(
                "{} not expected (orphaned or duplicated): {}",
                extra.len(),
                abbreviate(&extra)
            ));
        }
        let pods = list_all(&self.env.api::<Pod>()).await?;
        let mut per_model: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for pod in &pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(owner) = pod.labels().get(moat::render::DEPLOYMENT_LABEL) else {
                continue;
            };
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let entry = per_model.entry(owner.clone()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(ready);
        }
        let wrong_pods: Vec<String> = (0..self.n)
            .map(model)
            .filter(|m| per_model.get(m).copied().unwrap_or_default() != (1, 1))
            .collect();
        if !wrong_pods.is_empty() {
            out.push(format!(
                "{} models without exactly one Ready pod: {}",
                wrong_pods.len(),
                abbreviate(&wrong_pods)
            ));
        }
        let lost = self.unrepaired().await?;
        if !lost.is_empty() {
            let lines: Vec<String> = lost
                .iter()
                .map(|d| format!("{} ({})", d.target, d.what))
                .collect();
            out.push(format!(
                "{} drifts not repaired: {}",
                lost.len(),
                abbreviate(&lines)
            ));
        }
        Ok(out)
    }

    /// Waits until [`Fleet::problems`] is empty, polling every second (every 3 s past 300
    /// models), for at most `timeout`; returns how long it took. On a timeout, the error lists
    /// what was still wrong.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let interval = if self.n > 300 {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(1)
        };
        let last = Mutex::new(Vec::new());
        let waited = wait_for_every(interval, timeout, "the fleet to converge", || async {
            let problems = self.problems().await?;
            let done = problems.is_empty();
            *last.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = problems;
            Ok(done)
        })
        .await;
        if let Err(e) = waited {
            let last = last
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone();
            bail!("{e}; still wrong: {}", last.join("; "));
        }
        Ok(start.elapsed())
    }

    /// Introduces drift into every [`DRIFT_EVERY`]-th model (shifted by `round`, so rounds touch
    /// different models), the kind of drift rotating through: the deny-all NetworkPolicy deleted,
    /// the Deployment scaled to 3 and its server image changed, a value of the gate ConfigMap
    /// changed, the serving Secret deleted, the Service deleted, the client certificate Secret
    /// deleted. Each is recorded for [`Fleet::unrepaired`]. An object already gone (a drift of an
    /// earlier round not repaired yet) is skipped. Returns how many drifts were made.
    pub async fn drift(&self, round: usize) -> Result<usize> {
        let ns = &self.env.namespace;
        let mut made = Vec::new();
        for i in (round % DRIFT_EVERY..self.n).step_by(DRIFT_EVERY) {
            let name = model(i);
            let drift = match (i / DRIFT_EVERY + round) % 6 {
                0 => {
                    self.delete::<k8s_openapi::api::networking::v1::NetworkPolicy>(
                        ns,
                        &format!("{name}-deny-all"),
                    )
                    .await?
                }
                1 => self.edit_deployment(&name).await?,
                2 => self.edit_gate_config(&format!("{name}-gate")).await?,
                3 => self.delete::<Secret>(ns, &format!("{name}-tls")).await?,
                4 => {
                    self.delete::<k8s_openapi::api::core::v1::Service>(ns, &name)
                        .await?
                }
                _ if i.is_multiple_of(CLIENT_EVERY) => {
                    self.delete::<Secret>(&self.clients_ns, &format!("{}-client", client(i)))
                        .await?
                }
                _ => self.edit_deployment(&name).await?,
            };
            made.extend(drift);
        }
        let count = made.len();
        self.drifts
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .extend(made);
        Ok(count)
    }

    /// Every drift recorded so far.
    pub fn drifts(&self) -> Result<Vec<Drift>> {
        Ok(self
            .drifts
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone())
    }

    async fn delete<K>(&self, ns: &str, name: &str) -> Result<Option<Drift>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.env.client.clone(), ns);
        let Some(live) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let uid = live.uid().context("no uid")?;
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(Drift {
            target: format!("{} {ns}/{name}", K::kind(&())),
            what: "deleted",
            check: Check::Recreated {
                ar: ApiResource::erase::<K>(&()),
                namespace: ns.to_string(),
                name: name.to_string(),
                old_uid: uid,
            },
        }))
    }

    async fn edit_deployment(&self, name: &str) -> Result<Option<Drift>> {
        let api = self.env.api::<Deployment>();
        let Some(live) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let spec = live.spec.context("no spec")?;
        let server = spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .context("no container")?;
        let image = server.image.clone().context("no image")?;
        if image.contains("tampered") {
            return Ok(None);
        }
        let patch = json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [
            {"name": server.name, "image": "registry.example.com/tampered:latest"}]}}}});
        api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await?;
        Ok(Some(Drift {
            target: format!("Deployment {}/{name}", self.env.namespace),
            what: "scaled to 3, server image changed",
            check: Check::Deployment {
                namespace: self.env.namespace.clone(),
                name: name.to_string(),
                replicas: spec.replicas.unwrap_or(1),
                image,
            },
        }))
    }

    async fn edit_gate_config(&self, name: &str) -> Result<Option<Drift>> {
        let api = self.env.api::<ConfigMap>();
        let Some(live) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let data = live.data.unwrap_or_default();
        let Some(key) = data.keys().next().cloned() else {
            bail!("the gate ConfigMap {name} has no data");
        };
        if data.get(&key).is_some_and(|v| v == "tampered") {
            return Ok(None);
        }
        let patch = json!({"data": {key: "tampered"}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(Some(Drift {
            target: format!("ConfigMap {}/{name}", self.env.namespace),
            what: "a policy value changed",
            check: Check::GateConfig {
                namespace: self.env.namespace.clone(),
                name: name.to_string(),
                data,
            },
        }))
    }

    /// The recorded drifts that are not repaired (yet).
    pub async fn unrepaired(&self) -> Result<Vec<Drift>> {
        let drifts = self.drifts()?;
        let client = &self.env.client;
        let checked = stream::iter(drifts)
            .map(|d| async move {
                let repaired = match &d.check {
                    Check::Recreated {
                        ar,
                        namespace,
                        name,
                        old_uid,
                    } => Api::<DynamicObject>::namespaced_with(client.clone(), namespace, ar)
                        .get_metadata_opt(name)
                        .await?
                        .is_some_and(|o| o.uid().as_ref() != Some(old_uid)),
                    Check::Deployment {
                        namespace,
                        name,
                        replicas,
                        image,
                    } => Api::<Deployment>::namespaced(client.clone(), namespace)
                        .get_opt(name)
                        .await?
                        .and_then(|d| d.spec)
                        .is_some_and(|s| {
                            s.replicas == Some(*replicas)
                                && s.template
                                    .spec
                                    .as_ref()
                                    .and_then(|p| p.containers.first())
                                    .and_then(|c| c.image.as_ref())
                                    == Some(image)
                        }),
                    Check::GateConfig {
                        namespace,
                        name,
                        data,
                    } => Api::<ConfigMap>::namespaced(client.clone(), namespace)
                        .get_opt(name)
                        .await?
                        .is_some_and(|c| c.data.as_ref() == Some(data)),
                };
                Ok::<_, anyhow::Error>((!repaired).then_some(d))
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(checked.into_iter().flatten().collect())
    }
}

/// Every object of `api`, listed in pages of 500.
pub async fn list_all<K>(api: &Api<K>) -> Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// The first few of `items` and how many more.
fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(", and {} more", items.len() - SHOWN));
    }
    s
}

/// Scales the kwok nodes so that `pods` pods fit (110 a node), with two to spare.
pub async fn ensure_kwok_nodes(client: &Client, pods: usize) -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let want = pods.div_ceil(100) + 2;
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len()
        >= want
    {
        return Ok(());
    }
    let kwokctl = tool("MOAT_KWOKCTL")?;
    let mut parts = kwokctl.split_whitespace();
    let bin = parts.next().context("MOAT_KWOKCTL is empty")?;
    let status = tokio::process::Command::new(bin)
        .args(parts)
        .args(["scale", "node", "--replicas", &want.to_string()])
        // As e2e/cluster.sh creates them: with local disk for pods that request it.
        .args(["--param", r#".allocatable["ephemeral-storage"]="1Ti""#])
        .status()
        .await?;
    ensure!(status.success(), "kwokctl scale node failed");
    wait_for(DEADLINE, "the kwok nodes", || async {
        Ok(nodes
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len()
            >= want)
    })
    .await
}

/// The name of the ServiceAccount the operator under test runs as ([`operator_identity`]).
pub const OPERATOR_SA: &str = "moat-operator";

/// The ServiceAccount the operator under test runs as: `moat-operator` in the models' namespace,
/// bound to `cluster-admin` in the fleet's two namespaces only (RoleBindings), which is all the
/// operator touches. Unlike the admin's `system:masters`, API Priority and Fairness does not
/// exempt it. Returns its user name.
pub async fn operator_identity(fleet: &Fleet) -> Result<String> {
    let ns = &fleet.env.namespace;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "moat-operator"}}))?;
    fleet
        .env
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    for target in [ns, &fleet.clients_ns] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "moat-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "moat-operator", "namespace": ns}],
        }))?;
        Api::<RoleBinding>::namespaced(fleet.env.client.clone(), target)
            .create(&PostParams::default(), &binding)
            .await?;
    }
    Ok(format!("system:serviceaccount:{ns}:moat-operator"))
}

/// A kubeconfig file for the operator's ServiceAccount (see [`operator_identity`]) in `dir`, with
/// the API server at `server` instead of the cluster's own address when given (a fault proxy).
pub async fn operator_kubeconfig(
    fleet: &Fleet,
    dir: &Path,
    server: Option<&str>,
) -> Result<PathBuf> {
    let token =
        service_account_token(&fleet.env.client, &fleet.env.namespace, "moat-operator").await?;
    let mut config: serde_yaml::Value = serde_yaml::from_str(&kubeconfig_with_token(&token)?)?;
    if let Some(server) = server {
        config["clusters"][0]["cluster"]["server"] = serde_yaml::Value::String(server.into());
    }
    let path = dir.join(match server {
        Some(_) => "operator-proxied.kubeconfig",
        None => "operator.kubeconfig",
    });
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

/// The address of the cluster's API server (`https://127.0.0.1:<port>`), from `KUBECONFIG`.
pub fn api_server_url() -> Result<String> {
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
    let config: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    config["clusters"][0]["cluster"]["server"]
        .as_str()
        .map(str::to_string)
        .context("the kubeconfig names no server")
}

/// The resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`), or `None`
/// when the process is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `moat operator` as a process, restarted on demand, with the log of every run kept and its
/// memory sampled every 100 ms.
pub struct OperatorProcess {
    kubeconfig: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    runs: usize,
    process: Option<MoatProcess>,
    current_pid: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl OperatorProcess {
    /// Starts `moat operator` for the fleet's two namespaces (its CA in the models' one) with
    /// `kubeconfig`, logging to files in `dir`. The resync period is an hour, so that no repair
    /// this suite checks can come from a resync instead of the watch that saw the change; the
    /// watchers log at debug level, so their 410 Gone errors show in the log.
    pub fn start(fleet: &Fleet, kubeconfig: &Path, dir: &Path) -> Result<Self> {
        let args = vec![
            "operator".to_string(),
            "--namespaces".into(),
            format!("{},{}", fleet.env.namespace, fleet.clients_ns),
            "--ca-namespace".into(),
            fleet.env.namespace.clone(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--resync-seconds".into(),
            "3600".into(),
            "--helper-image".into(),
            HELPER_IMAGE.into(),
            "--log-level".into(),
            std::env::var("MOAT_FAULTS_LOG")
                .unwrap_or_else(|_| "info,kube_runtime::watcher=debug".into()),
        ];
        let current_pid = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (pid, peak, stop) = (current_pid.clone(), peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let p = pid.load(Ordering::Relaxed);
                    if let Some(rss) = u32::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .and_then(rss_bytes)
                    {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        let mut op = Self {
            kubeconfig: kubeconfig.to_path_buf(),
            args,
            dir: dir.to_path_buf(),
            runs: 0,
            process: None,
            current_pid,
            peak,
            stop,
        };
        op.spawn()?;
        Ok(op)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.join(format!("operator-{}.log", self.runs));
        self.runs += 1;
        let process = MoatProcess::spawn(&self.kubeconfig, &self.args, &[], &log)?;
        self.current_pid
            .store(u64::from(process.pid()), Ordering::Relaxed);
        self.process = Some(process);
        Ok(())
    }

    /// The pid of the running process.
    pub fn pid(&self) -> Result<u32> {
        Ok(self.process.as_ref().context("not running")?.pid())
    }

    /// How many times it was started.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// SIGKILLs the process (as the kernel's OOM killer or a node failure would) and starts it
    /// again.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        if let Some(p) = self.process.take() {
            self.current_pid.store(0, Ordering::Relaxed);
            p.stop();
        }
        self.spawn()
    }

    /// Fails if the process exited (it must survive every fault but a SIGKILL) or any of its runs
    /// logged a panic.
    pub fn check_healthy(&self) -> Result<()> {
        self.process
            .as_ref()
            .context("not running")?
            .check_running()?;
        for run in 0..self.runs {
            let path = self.dir.join(format!("operator-{run}.log"));
            let log =
                std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
            if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
                bail!("the operator panicked (run {run}, {path:?}): {line}");
            }
        }
        Ok(())
    }

    /// How many lines of every run's log contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Result<usize> {
        let mut n = 0;
        for run in 0..self.runs {
            let path = self.dir.join(format!("operator-{run}.log"));
            n += std::fs::read_to_string(&path)?
                .lines()
                .filter(|l| l.contains(needle))
                .count();
        }
        Ok(n)
    }

    /// The resident memory of the running process now, in bytes.
    pub fn rss(&self) -> Result<u64> {
        rss_bytes(self.pid()?).context("the operator's /proc status is gone")
    }

    /// The highest resident memory sampled since the last [`OperatorProcess::reset_peak`].
    pub fn peak_rss(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    /// Waits until the resident memory is at most `limit` bytes again (allocators give memory
    /// back lazily, so this is a wait, bounded by [`DEADLINE`]); returns what it was.
    pub async fn wait_rss_at_most(&self, limit: u64) -> Result<u64> {
        crate::wait_for_value(
            DEADLINE,
            &format!("the operator's RSS to fall to {} MiB", mib(limit)),
            || async {
                let rss = self.rss()?;
                Ok((rss <= limit).then_some(rss))
            },
        )
        .await
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Bytes in MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The memory level the operator must return to after a fault: its steady RSS plus a quarter
/// (allocator slack: freed memory is not always handed back at once) and 8 MiB.
pub fn steady_limit(steady: u64) -> u64 {
    steady + steady / 4 + 8 * 1024 * 1024
}

/// A line of the suite's report (printed, and appended to `MOAT_FAULTS_REPORT` when set, which
/// `docs/reliability.md` is written from).
pub fn report(line: &str) -> Result<()> {
    println!("fault report: {line}");
    if let Ok(path) = std::env::var("MOAT_FAULTS_REPORT") {
        use std::io::Write;
        if let Some(dir) = std::path::Path::new(&path).parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {path}"))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// One component of the local control plane (a process kwokctl started from
/// `$MOAT_CLUSTER_DIR/bin`), which the suite kills and starts again with the same command line,
/// environment, working directory and log. `e2e/cluster.sh down` stops a restarted one like any
/// other component (it stops every process run from that directory).
pub struct Component {
    binary: PathBuf,
    started: Option<std::process::Child>,
}

/// The API server: see [`Component`].
pub type ApiServer = Component;

impl Component {
    /// Finds the API server of the cluster in `MOAT_CLUSTER_DIR`.
    pub fn find() -> Result<Self> {
        Self::named("kube-apiserver")
    }

    /// Finds the running component `name` (`kube-controller-manager`, ...).
    pub fn named(name: &str) -> Result<Self> {
        let binary = PathBuf::from(tool("MOAT_CLUSTER_DIR")?)
            .join("bin")
            .join(name);
        let found = Self {
            binary,
            started: None,
        };
        found.pid()?;
        Ok(found)
    }

    /// The pid of the running component: the process whose first argument is its binary.
    fn pid(&self) -> Result<u32> {
        self.running()?.with_context(|| {
            format!(
                "no process runs {:?}: is the cluster up (e2e/cluster.sh up)?",
                self.binary
            )
        })
    }

    fn running(&self) -> Result<Option<u32>> {
        let want = self.binary.as_os_str().as_encoded_bytes();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).next() == Some(want) {
                return Ok(Some(pid));
            }
        }
        Ok(None)
    }

    /// What it takes to start the running component again (its command line, environment,
    /// working directory and log).
    pub fn record(&self) -> Result<Stopped> {
        let pid = self.pid()?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let cmdline = std::fs::read(proc_dir.join("cmdline"))
            .with_context(|| format!("{:?} (pid {pid}) is not running", self.binary))?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let environ: Vec<(String, String)> = std::fs::read(proc_dir.join("environ"))?
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Ok(Stopped {
            argv,
            environ,
            cwd: std::fs::read_link(proc_dir.join("cwd"))?,
            log: std::fs::read_link(proc_dir.join("fd/2"))?,
            at: Instant::now(),
        })
    }

    /// SIGKILLs the component, waits until it is gone, and returns how to start it again.
    pub async fn kill(&mut self) -> Result<Stopped> {
        let pid = self.pid()?;
        let mut stopped = self.record()?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill -KILL {pid} failed");
        if let Some(mut child) = self.started.take() {
            child.wait()?;
        }
        wait_for(DEADLINE, "the killed component to be gone", || async {
            Ok(match std::fs::read_to_string(proc_dir.join("stat")) {
                Err(_) => true,
                // A zombie waiting for its parent (kwokctl's start left it to init) is gone too.
                Ok(stat) => stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z')),
            })
        })
        .await?;
        stopped.at = Instant::now();
        Ok(stopped)
    }

    /// Starts the component as `stopped` recorded it.
    pub fn start(&mut self, stopped: &Stopped) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&stopped.log)
            .with_context(|| format!("opening {:?}", stopped.log))?;
        let child = std::process::Command::new(&stopped.argv[0])
            .args(&stopped.argv[1..])
            .env_clear()
            .envs(stopped.environ.iter().map(|(k, v)| (k, v)))
            .current_dir(&stopped.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C of the test run does not reach it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {:?} again", self.binary))?;
        self.started = Some(child);
        Ok(())
    }

    /// Starts the API server again as `stopped` recorded it and waits until `/readyz` answers
    /// ok; returns how long it was down.
    pub async fn restart(&mut self, stopped: Stopped, admin: &Client) -> Result<Duration> {
        self.start(&stopped)?;
        wait_for(DEADLINE, "the restarted API server to be ready", || async {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            Ok(admin
                .request_text(req)
                .await
                .is_ok_and(|t| t.trim() == "ok"))
        })
        .await?;
        Ok(stopped.at.elapsed())
    }
}

/// Does for the controller manager and the scheduler what a kubelet does for a control plane's
/// static pods: starts them again when they exit. They exit by design when they cannot renew
/// their leader Lease, which an API server outage of more than a few seconds causes; kwokctl does
/// not restart them. Checks every 500 ms until dropped.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicU64>,
}

impl Supervisor {
    /// Records how the running controller manager and scheduler were started, and watches them.
    pub fn start() -> Result<Self> {
        let mut supervised = Vec::new();
        for name in ["kube-controller-manager", "kube-scheduler"] {
            let component = Component::named(name)?;
            let record = component.record()?;
            supervised.push((component, record));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU64::new(0));
        let (stopping, counting) = (stop.clone(), restarts.clone());
        tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                for (component, record) in &mut supervised {
                    if let Some(child) = component.started.as_mut() {
                        // Reaps one that exited.
                        let _ = child.try_wait();
                    }
                    if matches!(component.running(), Ok(None)) {
                        match component.start(record) {
                            Ok(()) => {
                                counting.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => eprintln!("warning: {e:#}"),
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(Self { stop, restarts })
    }

    /// How many times it started a component again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What [`ApiServer::kill`] recorded to start the API server again.
#[derive(Clone)]
pub struct Stopped {
    argv: Vec<String>,
    environ: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
    /// When it was killed.
    pub at: Instant,
}

impl Stopped {
    /// The same command line with `arg` added (a later flag wins over an earlier one).
    pub fn with_arg(mut self, arg: &str) -> Self {
        self.argv.push(arg.to_string());
        self
    }
}

/// The cluster's etcd, through `etcdctl`.
pub struct Etcd;

impl Etcd {
    /// The current revision of the key space.
    pub async fn revision() -> Result<i64> {
        let out = crate::etcdctl(&["endpoint", "status", "-w", "json"]).await?;
        let status: serde_json::Value = serde_json::from_slice(&out)?;
        status[0]["Status"]["header"]["revision"]
            .as_i64()
            .context("etcdctl endpoint status reported no revision")
    }

    /// Compacts away every revision before the current one (as the API server's own periodic
    /// compaction does, but at once) and defragments; returns the revision compacted to.
    pub async fn compact_and_defrag() -> Result<i64> {
        let revision = Self::revision().await?;
        crate::etcdctl(&["compact", &revision.to_string(), "--physical"]).await?;
        crate::etcdctl(&["defrag"]).await?;
        Ok(revision)
    }
}

/// A FlowSchema that sends every request of one user to a PriorityLevelConfiguration with one
/// nominal concurrency share, no borrowing and no queue: the user's requests beyond a seat or
/// two are refused with 429 at once. Deleted by [`Throttle::lift`] (or when dropped).
pub struct Throttle {
    client: Client,
    name: String,
    lifted: bool,
}

impl Throttle {
    /// Throttles `user` (a ServiceAccount's `system:serviceaccount:<ns>:<name>`) under `name`.
    pub async fn impose(client: &Client, name: &str, namespace: &str, sa: &str) -> Result<Self> {
        let plc = json!({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
            "metadata": {"name": name},
            "spec": {"type": "Limited", "limited": {
                "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
                "limitResponse": {"type": "Reject"}}},
        });
        let fs = json!({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": name},
                "matchingPrecedence": 100,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{
                    "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": sa, "namespace": namespace}}],
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": true, "namespaces": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }],
            },
        });
        for (kind, plural, body) in [
            (
                "PriorityLevelConfiguration",
                "prioritylevelconfigurations",
                plc,
            ),
            ("FlowSchema", "flowschemas", fs),
        ] {
            let ar = flowcontrol(kind, plural);
            let obj: DynamicObject = serde_json::from_value(body)?;
            Api::<DynamicObject>::all_with(client.clone(), &ar)
                .create(&PostParams::default(), &obj)
                .await
                .with_context(|| format!("creating {kind} {name}"))?;
        }
        Ok(Self {
            client: client.clone(),
            name: name.to_string(),
            lifted: false,
        })
    }

    /// Deletes the FlowSchema and the PriorityLevelConfiguration.
    pub async fn lift(mut self) -> Result<()> {
        self.lifted = true;
        delete_flowcontrol(&self.client, &self.name).await
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if !self.lifted {
            let (client, name) = (self.client.clone(), self.name.clone());
            tokio::spawn(async move {
                if let Err(e) = delete_flowcontrol(&client, &name).await {
                    eprintln!("warning: deleting the throttle {name}: {e:#}");
                }
            });
        }
    }
}

fn flowcontrol(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "flowcontrol.apiserver.k8s.io".into(),
        version: "v1".into(),
        api_version: "flowcontrol.apiserver.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

async fn delete_flowcontrol(client: &Client, name: &str) -> Result<()> {
    for (kind, plural) in [
        ("FlowSchema", "flowschemas"),
        ("PriorityLevelConfiguration", "prioritylevelconfigurations"),
    ] {
        let api = Api::<DynamicObject>::all_with(client.clone(), &flowcontrol(kind, plural));
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {kind} {name}")),
        }
    }
    Ok(())
}

/// How many audit log entries written after byte `from` are requests of `user` answered with
/// HTTP status `code`.
pub fn audited_responses(user: &str, from: u64, code: i64) -> Result<usize> {
    Ok(crate::audit_entries(user, from)?
        .iter()
        .filter(|e| e["responseStatus"]["code"].as_i64() == Some(code))
        .count())
}

/// A small deterministic random number generator (xorshift64*), seeded from `MOAT_FAULTS_SEED`
/// or the clock; the seed is reported so a run can be replayed.
pub struct Random(u64);

impl Random {
    /// A generator from `MOAT_FAULTS_SEED`, or from the clock; returns it and its seed.
    pub fn from_env() -> Result<(Self, u64)> {
        let seed = match std::env::var("MOAT_FAULTS_SEED") {
            Ok(v) => v.parse().context("MOAT_FAULTS_SEED is not a number")?,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64,
        };
        Ok((Self(seed.max(1)), seed))
    }

    /// A number in `range` (its end excluded).
    pub fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        range.start + x % (range.end - range.start).max(1)
    }
}

/// A toxiproxy server (`toxiproxy-server` of `MOAT_TOXIPROXY`, built by `e2e/cluster.sh`) on
/// loopback with one proxy, `apiserver`, in front of the cluster's API server; faults are
/// toxiproxy's toxics, added and removed through its HTTP API. Stopped when dropped.
pub struct Toxiproxy {
    _server: tokio::process::Child,
    api: std::net::SocketAddr,
    /// The proxy's address, for the operator's kubeconfig: `https://127.0.0.1:<port>` (the API
    /// server's certificate names 127.0.0.1).
    pub url: String,
}

impl Toxiproxy {
    /// Starts the server (its log in `dir`) and the proxy to the API server of `KUBECONFIG`.
    pub async fn start(dir: &Path) -> Result<Self> {
        let bin = PathBuf::from(tool("MOAT_TOXIPROXY")?).join("toxiproxy-server");
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("toxiproxy.log"))?;
        let server = tokio::process::Command::new(&bin)
            .args(["-host", "127.0.0.1", "-port", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin:?}"))?;
        let api = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut proxy = Self {
            _server: server,
            api,
            url: String::new(),
        };
        wait_for(DEADLINE, "toxiproxy to answer", || async {
            Ok(proxy.call("GET", "/version", None).await.is_ok())
        })
        .await?;
        let upstream = api_server_url()?;
        let upstream = upstream
            .strip_prefix("https://")
            .context("the API server is not https")?
            .trim_end_matches('/')
            .to_string();
        let listen = format!("127.0.0.1:{}", free_port()?);
        proxy
            .call(
                "POST",
                "/proxies",
                Some(json!({"name": "apiserver", "listen": listen, "upstream": upstream, "enabled": true})),
            )
            .await?;
        proxy.url = format!("https://{listen}");
        Ok(proxy)
    }

    /// Adds the toxic `name` of `type_` with `attributes` on `stream` (`upstream`: towards the
    /// API server, `downstream`: back to the operator).
    pub async fn add(
        &self,
        name: &str,
        type_: &str,
        stream: &str,
        attributes: serde_json::Value,
    ) -> Result<()> {
        self.call(
            "POST",
            "/proxies/apiserver/toxics",
            Some(json!({"name": name, "type": type_, "stream": stream, "toxicity": 1.0, "attributes": attributes})),
        )
        .await
        .map(|_| ())
    }

    /// Removes the toxic `name`.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.call("DELETE", &format!("/proxies/apiserver/toxics/{name}"), None)
            .await
            .map(|_| ())
    }

    /// Disables the proxy (every connection through it is closed, new ones are refused) or
    /// enables it again.
    pub async fn set_enabled(&self, enabled: bool) -> Result<()> {
        self.call(
            "POST",
            "/proxies/apiserver",
            Some(json!({"enabled": enabled})),
        )
        .await
        .map(|_| ())
    }

    /// One HTTP/1.1 request to toxiproxy's API; the response body, or an error for a status
    /// other than 2xx.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String> {
        use http_body_util::{BodyExt, Full};
        let stream = tokio::net::TcpStream::connect(self.api).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let bytes = match &body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.api.to_string())
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(bytes)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let text =
            String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
        ensure!(
            status.is_success(),
            "toxiproxy {method} {path}: {status}: {text}"
        );
        Ok(text)
    }
}

/// A TCP port on loopback that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
