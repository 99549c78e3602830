//! Placement on the local cluster's scheduler: a model that asks for a GPU
//! (`spec.server.resources.extended`) runs only on a node that advertises `nvidia.com/gpu`, and
//! only if it tolerates that node's taint and matches its labels (`spec.placement`). The GPU node
//! is a kwok node this test creates (capacity, label and taint of its own), so no other test's
//! pods land on it.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, api::ListParams};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{NamespaceOptions, wait_condition, wait_for_value, with_namespace};
use serde_json::json;

/// The model `name` asking for one `nvidia.com/gpu`, with `placement`.
fn gpu_model(name: &str, placement: serde_json::Value) -> Result<SecureModelDeployment> {
    fixture::smd(name)
        .replicas(1)
        .set(
            &["spec", "server", "resources", "extended"],
            json!({"nvidia.com/gpu": 1}),
        )
        .set(&["spec", "placement"], placement)
        .build()
        .map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn gpu_models_run_only_on_a_gpu_node_they_tolerate_and_select() {
    with_namespace("placement-gpu", NamespaceOptions::restricted(), |env| async move {
        let ns = env.namespace.clone();
        let nodes: Api<Node> = Api::all(env.client.clone());
        let gpu_node = format!("gpu-{ns}");
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": gpu_node,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {"type": "kwok", "moat.dev/e2e-gpu": ns, "kubernetes.io/hostname": gpu_node}
            },
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "2"},
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "2"}
            }
        }))?;
        nodes.create(&Default::default(), &node).await?;
        let result = async {
            // kwok marks it Ready, keeping its GPU capacity.
            wait_for_value(moat_e2e::DEADLINE, "the GPU node Ready with its GPUs", || async {
                let n = nodes.get(&gpu_node).await?;
                let status = n.status.unwrap_or_default();
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let gpus = status
                    .allocatable
                    .and_then(|a| a.get("nvidia.com/gpu").map(|q| q.0.clone()));
                Ok((ready && gpus.as_deref() == Some("2")).then_some(()))
            })
            .await?;

            let _op = env.operator().start().await?;
            let smds = env.api::<SecureModelDeployment>();
            let selects = json!({
                "nodeSelector": {"moat.dev/e2e-gpu": ns},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            });
            smds.create(&Default::default(), &gpu_model("scorer", selects)?).await?;
            // Without the toleration the taint keeps it off the GPU node, and no other node has
            // a GPU: it stays unschedulable.
            let untolerated = json!({"nodeSelector": {"moat.dev/e2e-gpu": ns}});
            smds.create(&Default::default(), &gpu_model("untolerated", untolerated)?).await?;

            wait_condition(&env, "scorer", conditions::READY, "RolloutComplete").await?;
            let pods = env.api::<Pod>();
            let on = |name: &str| {
                let pods = pods.clone();
                let selector = format!("moat.dev/deployment={name}");
                async move {
                    let list = pods.list(&ListParams::default().labels(&selector)).await?;
                    Ok::<_, anyhow::Error>(list.items)
                }
            };
            let scorer = on("scorer").await?;
            ensure!(scorer.len() == 1, "scorer pods: {}", scorer.len());
            let placed = scorer[0].spec.as_ref().and_then(|s| s.node_name.clone());
            ensure!(placed.as_deref() == Some(gpu_node.as_str()), "scorer runs on {placed:?}");
            let limits = scorer[0].spec.as_ref().and_then(|s| s.containers[0].resources.clone()).context("resources")?;
            for q in [limits.limits, limits.requests] {
                ensure!(
                    q.and_then(|q| q.get("nvidia.com/gpu").map(|v| v.0.clone())).as_deref() == Some("1"),
                    "the GPU is not both requested and limited"
                );
            }

            let reason = wait_for_value(moat_e2e::DEADLINE, "untolerated unschedulable", || async {
                Ok(on("untolerated").await?.into_iter().find_map(|p| {
                    p.status?.conditions?.into_iter().find(|c| {
                        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
                    })
                }))
            })
            .await?;
            let message = reason.message.unwrap_or_default();
            ensure!(
                message.contains("untolerated taint") || message.contains("Insufficient nvidia.com/gpu"),
                "unschedulable for another reason: {message}"
            );
            eprintln!("untolerated: {message}");
            Ok::<_, anyhow::Error>(())
        }
        .await;
        nodes.delete(&gpu_node, &Default::default()).await?;
        result
    })
    .await;
}
