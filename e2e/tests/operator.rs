//! The operator core against the real control plane: SecureModelDeployments become hardened
//! workloads in namespaces that enforce Pod Security "restricted", invalid specs are rejected by
//! the API server, drift of every kind is repaired, deletion cleans up, restarts lose nothing and
//! a converged object costs no writes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{Pod, Secret, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use moat::{api::SecureModelDeployment, fixture};
use moat_e2e::{
    DEADLINE, NamespaceOptions, Operator, TestEnv, install_crds, reconciles_completed,
    reconciles_started, wait_event, wait_for_every, wait_smd, wait_until, with_namespace,
};
use serde_json::{Value, json};

const NAME: &str = "scorer";

/// The model `name` as JSON (the invalid-spec cases edit it): `replicas` replicas with args, an
/// environment variable, a CPU request and a readiness probe, reachable from `payments` pods
/// labelled `app: checkout`, with egress to 10.20.0.0/16 on 443.
fn smd(name: &str, replicas: i32) -> Value {
    fixture::smd(name)
        .replicas(replicas)
        .set(&["spec", "server", "args"], json!(["--port", "8000"]))
        .set(
            &["spec", "server", "env"],
            json!([{"name": "LOG_LEVEL", "value": "info"}]),
        )
        .set(
            &["spec", "server", "resources", "requests"],
            json!({"cpu": "250m"}),
        )
        .set(
            &["spec", "server", "readinessProbe"],
            json!({"httpGet": {"path": "/health"}}),
        )
        .clients(json!([{"namespace": "payments", "podSelector": {"app": "checkout"}}]))
        .egress(json!([{"cidr": "10.20.0.0/16", "ports": [443]}]))
        .json()
}

async fn create_smd(env: &TestEnv, body: Value) -> Result<SecureModelDeployment> {
    let smd: SecureModelDeployment = serde_json::from_value(body)?;
    Ok(env
        .api::<SecureModelDeployment>()
        .create(&PostParams::default(), &smd)
        .await?)
}

/// Waits until `name` is Ready for its current generation; returns the object that was.
async fn wait_ready(env: &TestEnv, name: &str) -> Result<SecureModelDeployment> {
    moat_e2e::wait_ready(&env.api(), name).await
}

fn selector(name: &str) -> ListParams {
    ListParams::default().labels(&format!("moat.dev/deployment={name}"))
}

async fn count<K>(env: &TestEnv, name: &str) -> Result<usize>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Ok(env.api::<K>().list(&selector(name)).await?.items.len())
}

#[tokio::test]
async fn smd_becomes_a_ready_hardened_workload_in_a_restricted_namespace() {
    with_namespace(
        "operator-ready",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = Operator::start(&env.namespace).await?;
            create_smd(&env, smd(NAME, 2)).await?;
            let ready = wait_ready(&env, NAME).await?;
            // The real kstatus library (what Flux uses) judges it Current.
            let (judged, _) = moat_e2e::kstatus(&serde_json::to_value(&ready)?).await?;
            ensure!(judged == "Current", "kstatus says {judged}");
            let st = ready.status.context("status")?;
            ensure!(
                st.ready_replicas == Some(2),
                "readyReplicas {:?}",
                st.ready_replicas
            );
            ensure!(st.observed_generation == ready.metadata.generation);

            // Every child exists, labelled and controlled by the SecureModelDeployment.
            let uid = ready.metadata.uid.clone().context("uid")?;
            let sa = env.api::<ServiceAccount>().get(NAME).await?;
            ensure!(sa.automount_service_account_token == Some(false));
            for (kind, owners) in [
                ("ServiceAccount", sa.owner_references().to_vec()),
                (
                    "Deployment",
                    env.api::<Deployment>()
                        .get(NAME)
                        .await?
                        .owner_references()
                        .to_vec(),
                ),
                (
                    "Service",
                    env.api::<Service>()
                        .get(NAME)
                        .await?
                        .owner_references()
                        .to_vec(),
                ),
                (
                    "ConfigMap",
                    env.api::<k8s_openapi::api::core::v1::ConfigMap>()
                        .get(&format!("{NAME}-gate"))
                        .await?
                        .owner_references()
                        .to_vec(),
                ),
                (
                    "PodDisruptionBudget",
                    env.api::<PodDisruptionBudget>()
                        .get(NAME)
                        .await?
                        .owner_references()
                        .to_vec(),
                ),
            ] {
                ensure!(
                    owners
                        .iter()
                        .any(|o| o.uid == uid && o.controller == Some(true)),
                    "{kind} is not controlled by the SecureModelDeployment"
                );
            }
            ensure!(
                count::<NetworkPolicy>(&env, NAME).await? == 2,
                "expected 2 NetworkPolicies"
            );

            // The pods were admitted under "restricted" and run on kwok nodes.
            let pods = env.api::<Pod>().list(&selector(NAME)).await?.items;
            ensure!(pods.len() == 2, "expected 2 pods, found {}", pods.len());
            for pod in &pods {
                let spec = pod.spec.as_ref().context("pod spec")?;
                ensure!(
                    spec.node_name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("node-")),
                    "pod not scheduled on a kwok node"
                );
                ensure!(spec.automount_service_account_token == Some(false));
                ensure!(spec.service_account_name.as_deref() == Some(NAME));
            }

            // What Moat did is recorded as an Event on the SecureModelDeployment, naming every
            // child. Moat publishes it in the background after the reconcile, so wait for it.
            let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
            let children = [
                "ServiceAccount scorer",
                "NetworkPolicy scorer-deny-all",
                "NetworkPolicy scorer-allow",
                "Service scorer",
                "PodDisruptionBudget scorer",
                "Deployment scorer",
            ];
            let all = std::sync::Mutex::new(String::new());
            let found = wait_until("Created Events naming every child", || async {
                let notes: Vec<String> = events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|e| e.reason.as_deref() == Some("Created"))
                    .filter_map(|e| e.note)
                    .collect();
                let joined = notes.join("; ");
                let every = children
                    .iter()
                    .all(|child| joined.contains(&format!("Created {child}")));
                *all.lock().map_err(|_| anyhow::anyhow!("lock"))? = joined;
                Ok(every)
            })
            .await;
            let all = all.into_inner().map_err(|_| anyhow::anyhow!("lock"))?;
            for child in children {
                ensure!(
                    all.contains(&format!("Created {child}")),
                    "no Created event names {child}: {all:?} ({found:?})"
                );
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server_with_clear_messages() {
    with_namespace("operator-invalid", NamespaceOptions::default(), |env| async move {
        install_crds(&env.client).await?;
        let ar = ApiResource::erase::<SecureModelDeployment>(&());
        let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.namespace, &ar);
        type Mutate = fn(&mut Value);
        let cases: Vec<(&str, Mutate, &str)> = vec![
            ("replicas 0", |v| v["spec"]["replicas"] = json!(0), "spec.replicas"),
            ("replicas 101", |v| v["spec"]["replicas"] = json!(101), "spec.replicas"),
            ("privileged port", |v| v["spec"]["server"]["port"] = json!(80), "spec.server.port"),
            ("port out of range", |v| v["spec"]["server"]["port"] = json!(70000), "spec.server.port"),
            ("bad image", |v| v["spec"]["server"]["image"] = json!("Registry/UPPER case!"), "image must be a valid image reference"),
            ("bad env name", |v| v["spec"]["server"]["env"] = json!([{"name": "1BAD", "value": "x"}]), "env name must be a C identifier"),
            ("reserved env name", |v| v["spec"]["server"]["env"] = json!([{"name": "MOAT_TLS", "value": "x"}]), "reserved for variables Moat injects"),
            ("env value and valueFrom", |v| v["spec"]["server"]["env"] = json!([{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]), "set exactly one of value and valueFrom"),
            ("duplicate env", |v| v["spec"]["server"]["env"] = json!([{"name": "A", "value": "x"}, {"name": "A", "value": "y"}]), "Duplicate value"),
            ("bad cpu quantity", |v| v["spec"]["server"]["resources"]["limits"]["cpu"] = json!("lots"), "cpu must be a positive quantity"),
            ("request above limit", |v| v["spec"]["server"]["resources"]["requests"] = json!({"memory": "2Gi"}), "requests.memory must not exceed"),
            ("missing limits", |v| v["spec"]["server"]["resources"] = json!({}), "spec.server.resources.limits: Required value"),
            ("bad cidr", |v| v["spec"]["access"]["egress"] = json!([{"cidr": "300.1.1.1/8", "ports": [443]}]), "cidr must be an IPv4 or IPv6 CIDR"),
            ("cidr and namespace", |v| v["spec"]["access"]["egress"] = json!([{"cidr": "10.0.0.0/8", "namespace": "x", "ports": [443]}]), "set exactly one of cidr and namespace"),
            ("egress without ports", |v| v["spec"]["access"]["egress"] = json!([{"cidr": "10.0.0.0/8", "ports": []}]), "spec.access.egress[0].ports"),
            ("bad client namespace", |v| v["spec"]["access"]["clients"] = json!([{"namespace": "Not_A_Namespace"}]), "namespace must be a DNS-1123 label"),
            ("name too long", |v| v["metadata"]["name"] = json!("a".repeat(51)), "metadata.name must be a DNS-1035 label"),
        ];
        for (case, mutate, expected) in cases {
            let mut body = smd("invalid", 2);
            mutate(&mut body);
            let obj: DynamicObject = serde_json::from_value(body)?;
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => bail!("case {case:?}: the API server accepted an invalid spec"),
                Err(kube::Error::Api(s)) => {
                    ensure!(s.code == 422, "case {case:?}: expected 422, got {}: {}", s.code, s.message);
                    ensure!(s.message.contains(expected), "case {case:?}: message {:?} lacks {expected:?}", s.message);
                    eprintln!("rejected {case}: {}", s.message);
                }
                Err(e) => bail!("case {case:?}: unexpected error {e}"),
            }
        }
        Ok(())
    })
    .await;
}

/// One kind of drift: a change someone else makes, and how to tell it was reverted.
struct Scenario {
    name: &'static str,
    change: fn(TestEnv) -> futures::future::BoxFuture<'static, Result<()>>,
    repaired: fn(TestEnv) -> futures::future::BoxFuture<'static, Result<bool>>,
}

fn pp() -> PatchParams {
    PatchParams::default()
}

async fn deployment(env: &TestEnv) -> Result<Deployment> {
    Ok(env.api::<Deployment>().get(NAME).await?)
}

fn pod_spec(d: &Deployment) -> k8s_openapi::api::core::v1::PodSpec {
    d.spec
        .clone()
        .and_then(|s| s.template.spec)
        .unwrap_or_default()
}

fn scenarios() -> Vec<Scenario> {
    use futures::FutureExt;
    vec![
        Scenario {
            name: "image changed",
            change: |env| {
                async move {
                let p = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil.example.com/miner:latest"}]}}}});
                env.api::<Deployment>().patch(NAME, &pp(), &Patch::Strategic(p)).await?;
                Ok(())
            }.boxed()
            },
            repaired: |env| {
                async move {
                    Ok(pod_spec(&deployment(&env).await?).containers[0]
                        .image
                        .as_deref()
                        == Some(moat_e2e::TEST_IMAGE))
                }
                .boxed()
            },
        },
        Scenario {
            name: "securityContext removed",
            change: |env| {
                async move {
                let p = json!([{"op": "remove", "path": "/spec/template/spec/containers/0/securityContext"}]);
                env.api::<Deployment>().patch(NAME, &pp(), &Patch::<Value>::Json(serde_json::from_value(p)?)).await?;
                Ok(())
            }.boxed()
            },
            repaired: |env| {
                async move {
                    let sc = pod_spec(&deployment(&env).await?).containers[0]
                        .security_context
                        .clone()
                        .unwrap_or_default();
                    Ok(sc.read_only_root_filesystem == Some(true)
                        && sc.allow_privilege_escalation == Some(false))
                }
                .boxed()
            },
        },
        Scenario {
            name: "privileged container added",
            change: |env| {
                async move {
                let p = json!({"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "evil.example.com/miner:latest", "securityContext": {"privileged": true}}]}}}});
                env.api::<Deployment>().patch(NAME, &pp(), &Patch::Strategic(p)).await?;
                Ok(())
            }.boxed()
            },
            repaired: |env| {
                async move { Ok(pod_spec(&deployment(&env).await?).containers.len() == 1) }.boxed()
            },
        },
        Scenario {
            name: "hostPath volume added",
            change: |env| {
                async move {
                let p = json!({"spec": {"template": {"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}}});
                env.api::<Deployment>().patch(NAME, &pp(), &Patch::Strategic(p)).await?;
                Ok(())
            }.boxed()
            },
            repaired: |env| {
                async move {
                    Ok(pod_spec(&deployment(&env).await?)
                        .volumes
                        .unwrap_or_default()
                        .iter()
                        .all(|v| v.host_path.is_none()))
                }
                .boxed()
            },
        },
        Scenario {
            name: "hostNetwork turned on",
            change: |env| {
                async move {
                    let p = json!({"spec": {"template": {"spec": {"hostNetwork": true}}}});
                    env.api::<Deployment>()
                        .patch(NAME, &pp(), &Patch::Merge(p))
                        .await?;
                    Ok(())
                }
                .boxed()
            },
            repaired: |env| {
                async move { Ok(pod_spec(&deployment(&env).await?).host_network != Some(true)) }
                    .boxed()
            },
        },
        Scenario {
            name: "replicas scaled",
            change: |env| {
                async move {
                    env.api::<Deployment>()
                        .patch(NAME, &pp(), &Patch::Merge(json!({"spec": {"replicas": 5}})))
                        .await?;
                    Ok(())
                }
                .boxed()
            },
            repaired: |env| {
                async move { Ok(deployment(&env).await?.spec.and_then(|s| s.replicas) == Some(2)) }
                    .boxed()
            },
        },
        Scenario {
            name: "NetworkPolicy deleted",
            change: |env| {
                async move {
                    env.api::<NetworkPolicy>()
                        .delete(&format!("{NAME}-deny-all"), &DeleteParams::default())
                        .await?;
                    Ok(())
                }
                .boxed()
            },
            repaired: |env| {
                async move {
                    Ok(env
                        .api::<NetworkPolicy>()
                        .get_opt(&format!("{NAME}-deny-all"))
                        .await?
                        .is_some_and(|n| n.metadata.deletion_timestamp.is_none()))
                }
                .boxed()
            },
        },
        Scenario {
            name: "NetworkPolicy rule added",
            change: |env| {
                async move {
                let p = json!([{"op": "add", "path": "/spec/ingress/-", "value": {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}]);
                env.api::<NetworkPolicy>().patch(&format!("{NAME}-allow"), &pp(), &Patch::<Value>::Json(serde_json::from_value(p)?)).await?;
                Ok(())
            }.boxed()
            },
            repaired: |env| {
                async move {
                    let np = env
                        .api::<NetworkPolicy>()
                        .get(&format!("{NAME}-allow"))
                        .await?;
                    Ok(np.spec.and_then(|s| s.ingress).map(|i| i.len()) == Some(1))
                }
                .boxed()
            },
        },
        Scenario {
            name: "policy selector label added",
            change: |env| {
                async move {
                    let p =
                        json!({"spec": {"podSelector": {"matchLabels": {"nothing": "matches"}}}});
                    env.api::<NetworkPolicy>()
                        .patch(&format!("{NAME}-deny-all"), &pp(), &Patch::Merge(p))
                        .await?;
                    Ok(())
                }
                .boxed()
            },
            repaired: |env| {
                async move {
                    let np = env
                        .api::<NetworkPolicy>()
                        .get(&format!("{NAME}-deny-all"))
                        .await?;
                    let labels = np
                        .spec
                        .and_then(|s| s.pod_selector)
                        .and_then(|s| s.match_labels)
                        .unwrap_or_default();
                    Ok(labels.len() == 1
                        && labels.get("moat.dev/deployment").map(String::as_str) == Some(NAME))
                }
                .boxed()
            },
        },
        Scenario {
            name: "ServiceAccount token automount turned on",
            change: |env| {
                async move {
                    env.api::<ServiceAccount>()
                        .patch(
                            NAME,
                            &pp(),
                            &Patch::Merge(json!({"automountServiceAccountToken": true})),
                        )
                        .await?;
                    Ok(())
                }
                .boxed()
            },
            repaired: |env| {
                async move {
                    Ok(env
                        .api::<ServiceAccount>()
                        .get(NAME)
                        .await?
                        .automount_service_account_token
                        == Some(false))
                }
                .boxed()
            },
        },
    ]
}

#[tokio::test]
async fn every_kind_of_drift_is_repaired() {
    with_namespace(
        "operator-drift",
        NamespaceOptions::restricted(),
        |env| async move {
            let op = Operator::start(&env.namespace).await?;
            create_smd(&env, smd(NAME, 2)).await?;
            wait_ready(&env, NAME).await?;
            let all = scenarios();
            for (done, s) in all.iter().enumerate() {
                if std::env::var("MOAT_DRIFT_SETTLE").is_ok() {
                    // Settled: every repair so far is recorded in status.drift, so the next
                    // change meets an operator that has finished with the previous one.
                    let done = done as i64;
                    wait_smd(
                        &env.api(),
                        NAME,
                        "status.drift to count the repairs so far",
                        |m| {
                            m.status
                                .as_ref()
                                .and_then(|s| s.drift.as_ref())
                                .map_or(done == 0, |d| d.repairs >= done)
                        },
                    )
                    .await?;
                }
                let start = Instant::now();
                (s.change)(env.clone())
                    .await
                    .with_context(|| format!("making the change {:?}", s.name))?;
                let repaired = s.repaired;
                let e = env.clone();
                wait_for_every(Duration::from_millis(10), DEADLINE, s.name, move || {
                    repaired(e.clone())
                })
                .await
                .with_context(|| format!("drift {:?} was not repaired", s.name))?;
                eprintln!(
                    "drift repair latency: {:<42} {:>6.0} ms",
                    s.name,
                    start.elapsed().as_secs_f64() * 1000.0
                );
            }
            eprintln!(
                "{}",
                op.metrics
                    .encode()?
                    .lines()
                    .filter(|l| l.contains("duration"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            // Recorded: status, metric and Events.
            let n = all.len() as i64;
            wait_smd(
                &env.api(),
                NAME,
                "status.drift to count every repair",
                |s| {
                    s.status
                        .as_ref()
                        .and_then(|s| s.drift.as_ref())
                        .is_some_and(|d| d.repairs >= n)
                },
            )
            .await?;
            let metrics = op.metrics.encode()?;
            for kind in ["Deployment", "NetworkPolicy", "ServiceAccount"] {
                ensure!(
                    metrics.contains(&format!("moat_drift_repairs_total{{kind=\"{kind}\"}}")),
                    "no drift metric for {kind}"
                );
            }
            // The DriftRepaired Events are published in the background after each repair.
            wait_event(
                &env,
                &env.namespace,
                NAME,
                "DriftRepaired",
                &["NetworkPolicy scorer-deny-all"],
            )
            .await
            .context("no DriftRepaired Event names the NetworkPolicy")?;
            // Repairs end in a Ready workload again.
            wait_ready(&env, NAME).await?;
            Ok(())
        },
    )
    .await;
}

/// Deleting a model's serving-certificate Secret is one drift repair of a Secret, named as such in
/// the metric, the Event and `status.drift`. The new certificate Moat then issues changes the pod
/// template's `moat.dev/tls-hash` too, but that follows from Moat's own new fact: it is an update
/// of the Deployment, not a second repair.
#[tokio::test]
async fn a_deleted_serving_secret_is_one_secret_repair_and_the_deployment_follows_without_drift() {
    with_namespace(
        "operator-secret-drift",
        NamespaceOptions::restricted(),
        |env| async move {
            let op = Operator::start(&env.namespace).await?;
            // Ready only once every watch has filled its cache.
            wait_until("the operator to be ready (caches synced)", || async {
                Ok(op.metrics.readiness().is_ok())
            })
            .await?;
            // Without the gate, whose pods reload the certificate without a roll: the pod
            // template then follows the certificate's hash.
            let mut model = smd(NAME, 2);
            model["spec"]["gate"] = json!({"mode": "Disabled"});
            create_smd(&env, model).await?;
            let ready = wait_ready(&env, NAME).await?;
            let serial = ready
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .map(|c| c.serial.clone())
                .context("status.certificate")?;
            let secret_name = format!("{NAME}-tls");
            let before = deployment(&env).await?;
            let hash = |d: &Deployment| {
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(moat::render::TLS_HASH_ANNOTATION).cloned())
            };
            let old_hash = hash(&before).context("tls-hash annotation")?;
            env.api::<Secret>()
                .delete(&secret_name, &DeleteParams::default())
                .await?;
            let repaired = wait_smd(
                &env.api(),
                NAME,
                "status to record the new certificate and the repair",
                |m| {
                    m.status.as_ref().is_some_and(|s| {
                        s.certificate.as_ref().is_some_and(|c| c.serial != serial)
                            && s.drift.as_ref().is_some_and(|d| d.repairs >= 1)
                    })
                },
            )
            .await?;
            let drift = repaired
                .status
                .as_ref()
                .and_then(|s| s.drift.clone())
                .context("status.drift")?;
            let last = drift.last_repair.context("status.drift.lastRepair")?;
            ensure!(
                (last.kind.as_str(), last.name.as_str(), last.change.as_str())
                    == ("Secret", secret_name.as_str(), "deleted"),
                "lastRepair: {last:?}"
            );
            // The pods follow the new certificate.
            wait_until(
                "the pod template to carry the new certificate's hash",
                || {
                    let env = env.clone();
                    let old_hash = old_hash.clone();
                    async move { Ok(hash(&deployment(&env).await?).is_some_and(|h| h != old_hash)) }
                },
            )
            .await?;
            wait_ready(&env, NAME).await?;
            wait_event(
                &env,
                &env.namespace,
                NAME,
                "DriftRepaired",
                &[&format!("Secret {secret_name}")],
            )
            .await?;
            // One repair in all: the Secret. The reconciles of the rollout that followed (each
            // Deployment status change triggers one) counted none for the Deployment.
            let final_status = wait_ready(&env, NAME).await?;
            ensure!(
                final_status
                    .status
                    .as_ref()
                    .and_then(|s| s.drift.as_ref())
                    .map(|d| d.repairs)
                    == Some(1),
                "status.drift: {:?}",
                final_status.status.and_then(|s| s.drift)
            );
            ensure!(op.drift_repairs("Secret")? == 1, "Secret repairs");
            ensure!(op.drift_repairs("Deployment")? == 0, "Deployment repairs");
            ensure!(op.drift_repairs("Object")? == 0, "an unnamed kind");
            let notes = moat_e2e::event_notes(&env, &env.namespace, NAME, "DriftRepaired").await?;
            ensure!(notes.len() == 1, "DriftRepaired Events: {notes:?}");

            // A damaged key keeps the recorded serial in tls.crt, but the certificate Moat then
            // issues anew is no scheduled renewal: the Secret counts as repaired again, the
            // Deployment that follows still does not.
            env.api::<Secret>()
                .patch(
                    &secret_name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"data": {"tls.key": "Z2FyYmFnZQ=="}})),
                )
                .await?;
            wait_smd(&env.api(), NAME, "the damaged key to be counted", |m| {
                m.status
                    .as_ref()
                    .and_then(|s| s.drift.as_ref())
                    .is_some_and(|d| d.repairs >= 2)
            })
            .await?;
            let final_status = wait_ready(&env, NAME).await?;
            let drift = final_status
                .status
                .and_then(|s| s.drift)
                .context("status.drift")?;
            ensure!(drift.repairs == 2, "status.drift: {drift:?}");
            ensure!(
                drift.last_repair.as_ref().map(|r| r.kind.as_str()) == Some("Secret"),
                "{drift:?}"
            );
            ensure!(op.drift_repairs("Secret")? == 2, "Secret repairs");
            ensure!(op.drift_repairs("Deployment")? == 0, "Deployment repairs");
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn deleting_the_smd_removes_every_child() {
    with_namespace(
        "operator-delete",
        NamespaceOptions::restricted(),
        |env| async move {
            let op = Operator::start(&env.namespace).await?;
            create_smd(&env, smd(NAME, 2)).await?;
            wait_ready(&env, NAME).await?;
            // moat_managed_objects counts the model and its children (recounted every 5 s).
            wait_until("managed objects counted", || async {
                Ok(op.metrics.managed("SecureModelDeployment") == 1
                    && op.metrics.managed("Deployment") == 1
                    && op.metrics.managed("NetworkPolicy") >= 2)
            })
            .await?;
            env.api::<SecureModelDeployment>()
                .delete(NAME, &DeleteParams::background())
                .await?;
            wait_until("every child to be garbage-collected", || async {
                Ok(count::<ServiceAccount>(&env, NAME).await?
                    + count::<NetworkPolicy>(&env, NAME).await?
                    + count::<Service>(&env, NAME).await?
                    + count::<k8s_openapi::api::core::v1::ConfigMap>(&env, NAME).await?
                    + count::<PodDisruptionBudget>(&env, NAME).await?
                    + count::<Deployment>(&env, NAME).await?
                    + count::<ReplicaSet>(&env, NAME).await?
                    + count::<Pod>(&env, NAME).await?
                    == 0)
            })
            .await?;
            wait_until("managed objects to drop to zero", || async {
                Ok(op.metrics.managed("SecureModelDeployment") == 0
                    && op.metrics.managed("Deployment") == 0)
            })
            .await
        },
    )
    .await;
}

#[tokio::test]
async fn restarting_the_operator_midway_loses_and_duplicates_nothing() {
    with_namespace(
        "operator-restart",
        NamespaceOptions::restricted(),
        |env| async move {
            install_crds(&env.client).await?;
            create_smd(&env, smd(NAME, 3)).await?;
            // First operator: killed as soon as it has created part of the children.
            let first = Operator::start(&env.namespace).await?;
            wait_until("the first children", || async {
                Ok(count::<ServiceAccount>(&env, NAME).await? > 0)
            })
            .await?;
            first.kill().await;
            let second = Operator::start(&env.namespace).await?;
            let ready = wait_ready(&env, NAME).await?;
            ensure!(
                count::<ServiceAccount>(&env, NAME).await? == 1,
                "ServiceAccounts duplicated"
            );
            ensure!(
                count::<NetworkPolicy>(&env, NAME).await? == 2,
                "NetworkPolicies duplicated or lost"
            );
            ensure!(
                count::<Service>(&env, NAME).await? == 1,
                "Services duplicated"
            );
            ensure!(
                count::<PodDisruptionBudget>(&env, NAME).await? == 1,
                "PDB duplicated"
            );
            ensure!(
                count::<Deployment>(&env, NAME).await? == 1,
                "Deployments duplicated"
            );
            ensure!(
                count::<ReplicaSet>(&env, NAME).await? == 1,
                "more than one ReplicaSet: the restart rolled the pods"
            );
            ensure!(count::<Pod>(&env, NAME).await? == 3, "expected 3 pods");
            ensure!(
                ready.status.and_then(|s| s.drift).is_none(),
                "a restart must not be counted as drift"
            );
            drop(second);
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_converged_smd_costs_no_writes_over_several_resyncs() {
    with_namespace(
        "operator-quiet",
        NamespaceOptions::restricted(),
        |env| async move {
            let op = env.operator().resync(Duration::from_secs(1)).start().await?;
            let audit = moat_e2e::tool("MOAT_AUDIT_LOG")?;
            let start_offset = std::fs::metadata(&audit)?.len() as usize;
            create_smd(&env, smd(NAME, 2)).await?;
            wait_ready(&env, NAME).await?;
            // Converging ends with the Events Moat publishes after its writes (in the background:
            // they can land after Ready). Wait for them rather than for a fixed time.
            wait_event(&env, &env.namespace, NAME, "Created", &["Created Deployment scorer"])
                .await?;
            wait_event(&env, &env.namespace, NAME, "CertificateIssued", &[]).await?;

            // The quiet window is counted in resyncs, not seconds: at least 4 complete reconciles
            // (one per second when idle, as the 6 s window this replaces allowed), none of which
            // may write.
            let writes_before = op.metrics.api_writes_total();
            // A request belongs to the quiet window if the API server received it after this
            // instant (the same clock): an audit line is written when the response completes,
            // so a write Moat finished before the window can still be appended after it began.
            let quiet_since = k8s_openapi::jiff::Timestamp::now();
            let reconciles_before = reconciles_started(&op.metrics)?;
            let window = Instant::now();
            op.wait_reconciles_after(reconciles_before, 4, "4 resyncs of the converged model")
                .await?;
            let window = window.elapsed();
            let reconciles_after = reconciles_completed(&op.metrics)?;
            let writes_after = op.metrics.api_writes_total();
            ensure!(
                writes_after == writes_before,
                "{} writes while converged",
                writes_after - writes_before
            );

            // The API server's own audit log agrees: Moat wrote while converging (so the filter
            // finds its requests), and not once while converged.
            let log = std::fs::read(&audit)?;
            // The start offset was taken while the API server was writing, so it may fall inside
            // a line: a request belongs to the range its line starts in, and only complete lines
            // (ending in a newline) are read.
            let lines: Vec<(usize, &[u8])> = {
                let mut start = 0;
                let mut lines = Vec::new();
                while let Some(len) = log[start..].iter().position(|b| *b == b'\n') {
                    lines.push((start, &log[start..start + len]));
                    start += len + 1;
                }
                lines
            };
            // Moat's requests in this test's namespace since `start_offset`, each with whether the
            // API server received it in the quiet window.
            let mut requests: Vec<(bool, String, String)> = Vec::new();
            for (_, line) in lines
                .iter()
                .filter(|(at, l)| *at >= start_offset && !l.is_empty())
            {
                let e: Value = serde_json::from_slice(line)?;
                let ua = e["userAgent"].as_str().unwrap_or("");
                if e["objectRef"]["namespace"] == json!(env.namespace)
                    && ua.starts_with("moat-operator/")
                {
                    let received: k8s_openapi::jiff::Timestamp = e["requestReceivedTimestamp"]
                        .as_str()
                        .context("an audit event without requestReceivedTimestamp")?
                        .parse()?;
                    let verb = e["verb"].as_str().unwrap_or("").to_string();
                    requests.push((received >= quiet_since, verb, e["requestURI"].to_string()));
                }
            }
            let moat_requests = |in_window: bool| -> Vec<(String, String)> {
                requests
                    .iter()
                    .filter(|(w, _, _)| *w == in_window)
                    .map(|(_, v, u)| (v.clone(), u.clone()))
                    .collect()
            };
            let is_write = |verb: &str| !matches!(verb, "get" | "list" | "watch");
            let converging = moat_requests(false);
            ensure!(
                converging.iter().any(|(v, _)| is_write(v)),
                "the audit log shows no write by Moat while converging: is the User-Agent set?"
            );
            let quiet = moat_requests(true);
            if let Some((verb, uri)) = quiet.iter().find(|(v, _)| is_write(v)) {
                bail!("Moat wrote while converged: {verb} {uri}");
            }
            eprintln!(
                "converged: {} reconciles, 0 writes and {} reads (children come from the watch cache) in {:.1} s",
                reconciles_after.saturating_sub(reconciles_before),
                quiet.len(),
                window.as_secs_f64()
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn specs_the_schema_accepts_but_moat_refuses_stall_with_a_reason() {
    with_namespace(
        "operator-stalled",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = Operator::start(&env.namespace).await?;
            // 0.0.0.0/0 is a valid CIDR for the schema, but it would open all egress.
            let mut body = smd(NAME, 2);
            body["spec"]["access"]["egress"] = json!([{"cidr": "0.0.0.0/0", "ports": [443]}]);
            create_smd(&env, body).await?;
            let api = env.api::<SecureModelDeployment>();
            let stalled_smd = wait_smd(&api, NAME, "Stalled=True at its current generation", |s| {
                moat_e2e::current_condition(s, "Stalled").is_some_and(|c| c.status == "True")
            })
            .await?;
            let st = stalled_smd.status.context("status")?;
            let stalled = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Stalled")
                .context("Stalled")?;
            ensure!(stalled.reason == "InvalidSpec", "reason {}", stalled.reason);
            let stalled_obj = serde_json::to_value(api.get(NAME).await?)?;
            let (judged, _) = moat_e2e::kstatus(&stalled_obj).await?;
            ensure!(
                judged == "Failed",
                "kstatus says {judged} for a stalled object"
            );
            ensure!(
                stalled
                    .message
                    .contains("spec.access.egress[0].cidr: 0.0.0.0/0 allows every address"),
                "message {:?}",
                stalled.message
            );
            ensure!(!moat::api::conditions::is_true(&st.conditions, "Ready"));
            ensure!(
                count::<Deployment>(&env, NAME).await? == 0,
                "nothing may be deployed from an invalid spec"
            );

            // Fixing the spec recovers without any other action.
            let fix =
                json!({"spec": {"access": {"egress": [{"cidr": "10.20.0.0/16", "ports": [443]}]}}});
            api.patch(NAME, &PatchParams::default(), &Patch::Merge(fix))
                .await?;
            wait_ready(&env, NAME).await?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn children_no_longer_desired_are_pruned_and_foreign_objects_are_not_taken_over() {
    with_namespace(
        "operator-prune",
        NamespaceOptions::restricted(),
        |env| async move {
            let _op = Operator::start(&env.namespace).await?;
            create_smd(&env, smd(NAME, 2)).await?;
            wait_ready(&env, NAME).await?;
            ensure!(count::<PodDisruptionBudget>(&env, NAME).await? == 1);
            // One replica needs no PodDisruptionBudget: it is deleted.
            env.api::<SecureModelDeployment>()
                .patch(
                    NAME,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": 1}})),
                )
                .await?;
            wait_until("the PodDisruptionBudget to be pruned", || async {
                Ok(count::<PodDisruptionBudget>(&env, NAME).await? == 0)
            })
            .await?;
            wait_ready(&env, "scorer").await?;

            // A ServiceAccount that someone else owns is never overwritten: the second model stalls.
            let sa: ServiceAccount =
                serde_json::from_value(json!({"metadata": {"name": "taken"}}))?;
            env.api::<ServiceAccount>()
                .create(&PostParams::default(), &sa)
                .await?;
            create_smd(&env, smd("taken", 1)).await?;
            moat_e2e::wait_condition(&env, "taken", "Stalled", "Conflict").await?;
            let untouched = env.api::<ServiceAccount>().get("taken").await?;
            ensure!(
                untouched.owner_references().is_empty(),
                "the foreign ServiceAccount was taken over"
            );
            ensure!(
                untouched.automount_service_account_token.is_none(),
                "the foreign ServiceAccount was modified"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn with_leader_election_only_the_leader_writes_and_a_follower_takes_over() {
    with_namespace(
        "operator-leader",
        NamespaceOptions::restricted(),
        |env| async move {
            const LEASE_SECONDS: u64 = 6;
            let a = env
                .operator()
                .elected("moat-operator", "replica-a", LEASE_SECONDS)
                .start()
                .await?;
            let b = env
                .operator()
                .elected("moat-operator", "replica-b", LEASE_SECONDS)
                .start()
                .await?;
            wait_until("one leader", || async {
                Ok(a.metrics.is_leader() != b.metrics.is_leader())
            })
            .await?;
            create_smd(&env, smd(NAME, 2)).await?;
            wait_ready(&env, NAME).await?;
            let (leader, follower) = if a.metrics.is_leader() {
                (a, b)
            } else {
                (b, a)
            };
            ensure!(
                leader.metrics.api_writes_total() > 0,
                "the leader did not write"
            );
            ensure!(
                follower.metrics.api_writes_total() == 0,
                "the follower wrote"
            );
            ensure!(
                reconciles_started(&follower.metrics)? == 0,
                "the follower reconciled"
            );

            // The leader dies without releasing the Lease; the follower takes over when it
            // expires, and repairs drift from then on. The dead leader writes nothing more.
            let leader_metrics = leader.metrics.clone();
            leader.kill().await;
            let writes_at_death = leader_metrics.api_writes_total();
            let killed = Instant::now();
            // The deadline only bounds a failure; how fast the follower took over is checked
            // below against the lease duration.
            wait_until("the follower to lead", || async {
                Ok(follower.metrics.is_leader())
            })
            .await?;
            let failover = killed.elapsed();
            env.api::<NetworkPolicy>()
                .delete(&format!("{NAME}-deny-all"), &DeleteParams::default())
                .await?;
            wait_until("the new leader to repair drift", || async {
                Ok(env
                    .api::<NetworkPolicy>()
                    .get_opt(&format!("{NAME}-deny-all"))
                    .await?
                    .is_some_and(|n| n.metadata.deletion_timestamp.is_none()))
            })
            .await?;
            eprintln!(
                "leader failover: {:.1} s (lease duration {LEASE_SECONDS} s)",
                failover.as_secs_f64()
            );
            // Within the lease duration, plus the follower's retry interval as margin.
            ensure!(
                failover <= Duration::from_secs(LEASE_SECONDS + 3),
                "failover took {failover:?}, longer than the lease duration"
            );
            ensure!(
                leader_metrics.api_writes_total() == writes_at_death,
                "the killed leader kept writing"
            );
            // Nothing was lost or duplicated across the handover.
            ensure!(count::<Deployment>(&env, NAME).await? == 1);
            ensure!(count::<NetworkPolicy>(&env, NAME).await? == 2);
            ensure!(
                count::<ReplicaSet>(&env, NAME).await? == 1,
                "the handover rolled the pods"
            );
            wait_ready(&env, NAME).await?;
            Ok(())
        },
    )
    .await;
}
