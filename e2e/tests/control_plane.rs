//! The local control plane behaves like a hardened production cluster: the properties later
//! tests rely on (scheduling onto kwok nodes, garbage collection, Pod Security admission,
//! encryption at rest, TokenRequest and RBAC) are checked here against the real components.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    authentication::v1::SelfSubjectReview,
    core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use moat_e2e::{
    NamespaceOptions, TestEnv, client_as_service_account, tool, wait_until, with_namespace,
};
use serde_json::json;

fn restricted_container() -> serde_json::Value {
    json!({
        "name": "app",
        "image": "registry.k8s.io/pause:3.10",
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    })
}

async fn pods_with(env: &TestEnv, selector: &str) -> Result<Vec<Pod>> {
    Ok(env
        .api::<Pod>()
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn deployment_rolls_out_on_kwok_nodes_and_is_garbage_collected() {
    with_namespace(
        "deployment-rollout",
        NamespaceOptions::restricted(),
        |env| async move {
            let deploys = env.api::<Deployment>();
            let deploy: Deployment = serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [restricted_container()]}
                    }
                }
            }))?;
            deploys.create(&PostParams::default(), &deploy).await?;

            wait_until("2 Ready pods", || async {
                let pods = pods_with(&env, "app=web").await?;
                Ok(pods.len() == 2 && pods.iter().all(is_ready))
            })
            .await?;

            // Every pod was scheduled by the real scheduler onto a kwok node.
            let nodes: Api<Node> = Api::all(env.client.clone());
            for pod in pods_with(&env, "app=web").await? {
                let node_name = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .context("pod was not scheduled")?;
                let node = nodes.get(&node_name).await?;
                let annotations = node.metadata.annotations.unwrap_or_default();
                ensure!(
                    annotations.get("kwok.x-k8s.io/node").map(String::as_str) == Some("fake"),
                    "pod landed on {node_name}, which is not a kwok node"
                );
            }
            wait_until("the Deployment to report 2 available", || async {
                let d = deploys.get("web").await?;
                Ok(d.status.and_then(|s| s.available_replicas) == Some(2))
            })
            .await?;

            let rs = env.api::<ReplicaSet>();
            ensure!(
                !rs.list(&ListParams::default()).await?.items.is_empty(),
                "no ReplicaSet was created"
            );

            // Deleting the Deployment lets the garbage collector remove its ReplicaSet and pods.
            deploys.delete("web", &DeleteParams::background()).await?;
            wait_until("ReplicaSets and pods to be garbage-collected", || async {
                let sets = rs.list(&ListParams::default()).await?.items;
                let pods = pods_with(&env, "app=web").await?;
                Ok(sets.is_empty() && pods.is_empty())
            })
            .await
        },
    )
    .await;
}

#[tokio::test]
async fn pod_security_restricted_rejects_privileged_and_admits_compliant_pods() {
    with_namespace(
        "pod-security",
        NamespaceOptions::restricted(),
        |env| async move {
            let pods = env.api::<Pod>();
            let privileged: Pod = serde_json::from_value(json!({
                "metadata": {"name": "privileged"},
                "spec": {"containers": [{
                    "name": "app",
                    "image": "registry.k8s.io/pause:3.10",
                    "securityContext": {"privileged": true}
                }]}
            }))?;
            let err = pods
                .create(&PostParams::default(), &privileged)
                .await
                .expect_err("a privileged pod must be rejected in a restricted namespace");
            let message = err.to_string();
            ensure!(
                message.contains("violates PodSecurity \"restricted:latest\"")
                    && message.contains("privileged"),
                "unexpected rejection: {message}"
            );

            let compliant: Pod = serde_json::from_value(json!({
                "metadata": {"name": "compliant"},
                "spec": {"containers": [restricted_container()]}
            }))?;
            pods.create(&PostParams::default(), &compliant)
                .await
                .context("a compliant pod must be admitted")?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_in_etcd() {
    with_namespace(
        "encryption-at-rest",
        NamespaceOptions::default(),
        |env| async move {
            let plaintext = format!("moat-plaintext-{}", std::process::id());
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": "weights-key"},
                "stringData": {"identity": plaintext}
            }))?;
            env.api::<Secret>()
                .create(&PostParams::default(), &secret)
                .await?;

            let key = format!("/registry/secrets/{}/weights-key", env.namespace);
            let raw = moat_e2e::etcdctl(&["get", &key, "--print-value-only"]).await?;
            ensure!(!raw.is_empty(), "no value stored in etcd under {key}");
            ensure!(
                raw.starts_with(b"k8s:enc:secretbox:v1:"),
                "the stored Secret is not encrypted: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(40)])
            );
            ensure!(
                !raw.windows(plaintext.len())
                    .any(|w| w == plaintext.as_bytes()),
                "the plaintext value is visible in etcd"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn service_account_token_authenticates_and_rbac_denies_what_was_not_granted() {
    with_namespace("token-rbac", NamespaceOptions::default(), |env| async move {
        let pp = PostParams::default();
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "reader"}}))?;
        env.api::<ServiceAccount>().create(&pp, &sa).await?;
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
        }))?;
        env.api::<Role>().create(&pp, &role).await?;
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": env.namespace}]
        }))?;
        env.api::<RoleBinding>().create(&pp, &binding).await?;

        let as_sa = client_as_service_account(&env.client, &env.namespace, "reader").await?;

        // The token authenticates as the ServiceAccount.
        let review: SelfSubjectReview = serde_json::from_value(json!({}))?;
        let reviewed = Api::<SelfSubjectReview>::all(as_sa.clone())
            .create(&pp, &review)
            .await
            .context("SelfSubjectReview with the requested token")?;
        let username = reviewed
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_default();
        ensure!(
            username == format!("system:serviceaccount:{}:reader", env.namespace),
            "token authenticated as {username:?}"
        );

        // Granted: list ConfigMaps (RBAC may take a moment to see the new binding).
        let cms: Api<ConfigMap> = Api::namespaced(as_sa.clone(), &env.namespace);
        wait_until("the RoleBinding to take effect", || async {
            Ok(cms.list(&ListParams::default()).await.is_ok())
        })
        .await?;

        // Not granted: Secrets in the same namespace, and anything cluster-wide.
        let secrets: Api<Secret> = Api::namespaced(as_sa.clone(), &env.namespace);
        expect_forbidden(secrets.list(&ListParams::default()).await.map(|_| ()), "list secrets")?;
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}}))?;
        expect_forbidden(cms.create(&pp, &cm).await.map(|_| ()), "create configmaps")?;
        let nodes: Api<Node> = Api::all(as_sa);
        expect_forbidden(nodes.list(&ListParams::default()).await.map(|_| ()), "list nodes")?;
        Ok(())
    })
    .await;
}

fn expect_forbidden(result: kube::Result<()>, what: &str) -> Result<()> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
        other => anyhow::bail!("expected 403 Forbidden for {what}, got {other:?}"),
    }
}

/// The helper itself: namespaces are labelled, and cleaned up by label after the test.
#[tokio::test]
async fn test_namespaces_are_labelled_and_cleaned_up() {
    let client: Client = moat_e2e::client().await.expect("cluster");
    let mut seen = String::new();
    with_namespace("namespace-helper", NamespaceOptions::default(), |env| {
        seen = env.namespace.clone();
        async move {
            let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
                .get(&env.namespace)
                .await?;
            let labels = ns.metadata.labels.unwrap_or_default();
            ensure!(labels.get(moat_e2e::E2E_LABEL).map(String::as_str) == Some("true"));
            ensure!(
                labels.get(moat_e2e::TEST_LABEL).map(String::as_str) == Some("namespace-helper")
            );
            Ok(())
        }
    })
    .await;
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client);
    wait_until("the test namespace to be deleted", || async {
        Ok(match namespaces.get_opt(&seen).await? {
            None => true,
            // Terminating counts: deletion was requested by label selector.
            Some(ns) => ns.metadata.deletion_timestamp.is_some(),
        })
    })
    .await
    .expect("namespace cleaned up");
}

/// A listening TCP socket: its local address and the process that holds it.
#[derive(Debug)]
struct Listener {
    address: std::net::IpAddr,
    port: u16,
    process: String,
}

/// Every listening TCP socket held by a process whose executable path starts with `prefix`,
/// from `/proc` (the socket inodes of each process's descriptors, looked up in `/proc/net/tcp`
/// and `tcp6`), so the test needs no `ss` and sees every address family.
fn listeners_of(prefix: &str) -> Result<Vec<Listener>> {
    use std::collections::HashMap;
    let mut owner: HashMap<u64, String> = HashMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let dir = entry?.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let exe = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default())
            .to_string();
        if !exe.starts_with(prefix) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().to_string();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|i| i.parse().ok())
                {
                    owner.insert(inode, exe.clone());
                }
            }
        }
    }
    let mut found = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A is LISTEN), ..., inode
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let Some(process) = inode.parse::<u64>().ok().and_then(|i| owner.get(&i)) else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let (addr, port) = local.split_once(':').context("local address")?;
            let port = u16::from_str_radix(port, 16)?;
            let bytes: Vec<u8> = (0..addr.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&addr[i..i + 2], 16))
                .collect::<Result<_, _>>()?;
            // /proc prints each 32-bit word of the address in host (little-endian) order.
            let fixed: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied())
                .collect();
            let address = if v6 {
                let octets: [u8; 16] = fixed.try_into().map_err(|_| anyhow::anyhow!("ipv6"))?;
                std::net::IpAddr::from(octets)
            } else {
                let octets: [u8; 4] = fixed.try_into().map_err(|_| anyhow::anyhow!("ipv4"))?;
                std::net::IpAddr::from(octets)
            };
            found.push(Listener {
                address,
                port,
                process: process.clone(),
            });
        }
    }
    Ok(found)
}

/// The cluster is reachable from this machine only: every port a control-plane component
/// (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok) listens on is bound to
/// loopback, never to all interfaces or a public address; the real node's API relay listens on
/// the host end of the node's veth alone, and so does its registry.
#[tokio::test]
async fn every_cluster_component_listens_on_loopback_only() -> Result<()> {
    let dir = tool("MOAT_CLUSTER_DIR")?;
    let listeners = listeners_of(&format!("{dir}/bin/"))?;
    for component in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        ensure!(
            listeners.iter().any(|l| l.process.ends_with(component)),
            "no listening socket of {component} was found (the check would see nothing): {listeners:?}"
        );
    }
    let public: Vec<&Listener> = listeners
        .iter()
        .filter(|l| !l.address.is_loopback())
        .collect();
    // The real node's API relay and its registry listen on the host end of the node's veth,
    // and only there.
    if std::env::var("MOAT_REAL_NODE").as_deref() == Ok("1") {
        let veth: std::net::IpAddr = tool("MOAT_NODE_HOST_IP")?.parse()?;
        let registry_port: u16 = tool("MOAT_NODE_REGISTRY")?
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .context("MOAT_NODE_REGISTRY is host:port")?;
        let relay = listeners_of("socat")?;
        let registry: Vec<Listener> = listeners_of("docker-registry")?
            .into_iter()
            .filter(|l| l.port == registry_port)
            .collect();
        for (what, found) in [("API relay", &relay), ("registry", &registry)] {
            ensure!(!found.is_empty(), "the real node's {what} is not listening");
            let elsewhere: Vec<&Listener> = found.iter().filter(|l| l.address != veth).collect();
            ensure!(
                elsewhere.is_empty(),
                "the real node's {what} listens beyond the node's veth: {elsewhere:?}"
            );
        }
    }
    ensure!(
        public.is_empty(),
        "cluster ports reachable from other machines: {}",
        public
            .iter()
            .map(|l| format!("{} on {}:{}", l.process, l.address, l.port))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The real node's registry: what the node and its pods can reach (the host end of the veth)
/// serves pulls and refuses pushes; pushes go through the loopback endpoint only this machine
/// reaches. A blob upload (`POST /v2/<name>/blobs/uploads/`) is the first step of every push.
#[tokio::test]
async fn the_registry_the_cluster_reaches_is_read_only() -> Result<()> {
    if std::env::var("MOAT_REAL_NODE").as_deref() != Ok("1") {
        return Ok(());
    }
    let ca = tool("MOAT_NODE_REGISTRY_CA")?;
    let upload = |registry: &str| -> Result<String> {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
                "-X",
                "POST",
            ])
            .arg(format!("https://{registry}/v2/probe/blobs/uploads/"))
            .output()
            .context("running curl")?;
        ensure!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let pull = tool("MOAT_NODE_REGISTRY")?;
    let push = tool("MOAT_NODE_REGISTRY_PUSH")?;
    ensure!(
        push.starts_with("127.0.0.1:"),
        "the push endpoint is not on loopback: {push}"
    );
    let refused = upload(&pull)?;
    ensure!(
        refused != "202",
        "the registry on the veth accepted an upload ({refused})"
    );
    let accepted = upload(&push)?;
    ensure!(
        accepted == "202",
        "control: the loopback registry answered {accepted}"
    );
    Ok(())
}
