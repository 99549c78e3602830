//! Moat's pods on the real node (kubelet, containerd, runc; `e2e/node.sh`): what the running
//! containers can do, checked from inside them, not read from the pod spec.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{ResourceExt, api::ListParams};
use moat::{
    api::{SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{
    NamespaceOptions, TestEnv, exec, real_node_image, wait_condition, wait_for_value,
    with_namespace,
};
use serde_json::json;

/// The running pod of the model `name` (one replica).
async fn running_pod(env: &TestEnv, name: &str) -> Result<Pod> {
    let pods = env.api::<Pod>();
    let selector = format!("moat.dev/deployment={name}");
    wait_for_value(
        moat_e2e::DEADLINE,
        &format!("a running pod of {name}"),
        || async {
            Ok(pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .into_iter()
                .find(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                }))
        },
    )
    .await
}

/// A field of `/proc/self/status`, for example `CapEff`.
fn status_field<'a>(status: &'a str, field: &str) -> Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(str::trim)
        .with_context(|| format!("no {field} in /proc/self/status:\n{status}"))
}

/// A model server (busybox httpd standing in for one) as Moat generates it, running on the real
/// node: from inside the container, the process runs as 10001:10001 with no capabilities, no new
/// privileges and a seccomp filter; the root filesystem refuses writes and the only writable
/// directories are /tmp and the pod's IPC namespace; no ServiceAccount token is mounted.
#[tokio::test]
async fn moat_pods_run_restricted_on_the_real_node() {
    with_namespace(
        "real-restricted",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let _op = env.operator().start().await?;
            let smd: SecureModelDeployment = fixture::smd("web")
                .replicas(1)
                .image(&real_node_image()?)
                .limits("200m", "64Mi")
                .set(&["spec", "server", "command"], json!(["/bin/httpd"]))
                .set(
                    &["spec", "server", "args"],
                    json!(["-f", "-p", "8000", "-h", "/tmp"]),
                )
                .build()?;
            env.api::<SecureModelDeployment>()
                .create(&Default::default(), &smd)
                .await?;
            wait_condition(&env, "web", conditions::READY, "RolloutComplete").await?;
            let pod = running_pod(&env, "web").await?;
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            ensure!(
                node.as_deref() == Some("moat-node"),
                "the pod runs on {node:?}, not the real node"
            );
            let name = pod.name_any();
            let ns = &env.namespace;
            let run = |cmd: &'static [&'static str]| {
                let name = name.clone();
                async move { exec(ns, &name, "server", cmd).await }
            };

            let (ok, status, err) = run(&["cat", "/proc/self/status"]).await?;
            ensure!(ok, "reading /proc/self/status failed: {err}");
            for (field, want) in [
                ("Uid", "10001\t10001\t10001\t10001"),
                ("Gid", "10001\t10001\t10001\t10001"),
                ("CapInh", "0000000000000000"),
                ("CapPrm", "0000000000000000"),
                ("CapEff", "0000000000000000"),
                ("CapAmb", "0000000000000000"),
                ("NoNewPrivs", "1"),
                // 2: a seccomp filter (RuntimeDefault), not 0 (none).
                ("Seccomp", "2"),
            ] {
                let got = status_field(&status, field)?;
                ensure!(got == want, "{field} is {got:?}, not {want:?}");
            }

            // Every directory of the image and every mount point, tried as the server's user:
            // only /tmp (the emptyDir), and the pod's own IPC namespace (/dev/shm, the 64 MiB
            // tmpfs runc gives every container, counted against its memory; /dev/mqueue) take
            // a new file.
            let (ok, writable, err) = run(&[
                "sh",
                "-c",
                "for d in $(ls -d /* /*/* 2>/dev/null) $(awk '{print $2}' /proc/self/mounts); do \
                   [ -d \"$d\" ] && touch \"$d/.moat-probe\" 2>/dev/null && echo \"$d\"; \
                 done | sort -u",
            ])
            .await?;
            ensure!(ok, "probing for writable directories failed: {err}");
            let writable: Vec<&str> = writable.lines().collect();
            ensure!(
                writable == ["/dev/mqueue", "/dev/shm", "/tmp"],
                "writable directories: {writable:?}"
            );
            let (ok, _, err) = run(&["touch", "/probe"]).await?;
            ensure!(
                !ok && err.contains("Read-only file system"),
                "the root filesystem took a write: {err}"
            );
            let (ok, out, _) =
                run(&["ls", "/var/run/secrets/kubernetes.io/serviceaccount"]).await?;
            ensure!(!ok, "a ServiceAccount token is mounted: {out}");
            let (ok, mounts, err) = run(&["cat", "/proc/self/mounts"]).await?;
            ensure!(ok, "reading the mounts failed: {err}");
            ensure!(
                !mounts.contains("serviceaccount"),
                "a ServiceAccount volume is mounted:\n{mounts}"
            );
            Ok(())
        },
    )
    .await;
}
