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

/// A busybox pod on the real node that answers `name` over HTTP on 8080, and on 53 (TCP): a
/// stand-in for a DNS server that is not cluster DNS.
async fn plain_pod(env: &TestEnv, ns: &str, name: &str, app: &str) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10002, "runAsGroup": 10002,
                                "seccompProfile": {"type": "RuntimeDefault"},
                                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
            "containers": [{
                "name": "main",
                "image": real_node_image()?,
                "command": ["/bin/sh", "-c",
                            format!("mkdir -p /tmp/www && echo {name} > /tmp/www/index.html && httpd -p 53 -h /tmp/www && exec httpd -f -p 8080 -h /tmp/www")],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": true},
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}]
        }
    }))?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(env.client.clone(), ns);
    pods.create(&Default::default(), &pod).await?;
    wait_for_value(
        moat_e2e::DEADLINE,
        &format!("pod {ns}/{name} ready with an IP"),
        || async {
            let p = pods.get(name).await?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok((ready && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()).then_some(p))
        },
    )
    .await
}

/// What one HTTP request from a pod got.
#[derive(Debug, PartialEq)]
enum Reach {
    /// The body.
    Answered(String),
    /// Dropped (nothing within the timeout) or rejected (refused) by a NetworkPolicy: kube-router
    /// rejects. Each use has a control showing that the same address and port answer others.
    Blocked,
    /// Anything else (refused, DNS failure, ...), with the message.
    Failed(String),
}

/// An HTTP GET of `/` from `container` of `ns/pod` to `address:port`, over busybox `nc` with a
/// 3 s timeout (its `wget -T` crashes); the last line of the answer is the body.
async fn reach(ns: &str, pod: &str, container: &str, address: &str, port: u16) -> Result<Reach> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}");
    let (ok, out, err) = exec(ns, pod, container, &["sh", "-c", &script]).await?;
    Ok(if ok && out.starts_with("HTTP/1.") {
        Reach::Answered(out.trim().lines().last().unwrap_or_default().to_string())
    } else if err.contains("timed out") || err.contains("Connection refused") {
        Reach::Blocked
    } else {
        Reach::Failed(format!("{} {}", out.trim(), err.trim()))
    })
}

/// The address cluster DNS gives `name`, asked from inside `ns/pod` (busybox's own resolver:
/// the static busybox cannot use glibc's, so its wget is given addresses).
async fn resolve(ns: &str, pod: &str, container: &str, name: &str) -> Result<String> {
    let (ok, out, err) = exec(ns, pod, container, &["nslookup", name]).await?;
    ensure!(ok, "nslookup {name} in {ns}/{pod} failed: {out} {err}");
    out.split("Name:")
        .nth(1)
        .and_then(|answer| {
            answer.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("Address:")
                    .map(|a| a.trim().to_string())
            })
        })
        .with_context(|| format!("no address for {name} in:\n{out}"))
}

/// NetworkPolicy on the wire (kube-router on the real node): only the declared clients reach the
/// model, through cluster DNS and the Service; the model reaches only its declared egress and
/// DNS, not other pods and not the API server.
#[tokio::test]
async fn network_policies_hold_on_the_wire() {
    with_namespace(
        "real-netpol",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let model_ns = env.namespace.clone();
            let opts = NamespaceOptions::restricted().on_real_node();
            let clients = env.another_namespace(&opts).await?;
            let elsewhere = env.another_namespace(&opts).await?;
            let caller = plain_pod(&env, &clients, "caller", "caller").await?;
            let stranger = plain_pod(&env, &clients, "stranger", "other").await?;
            let outsider = plain_pod(&env, &elsewhere, "outsider", "caller").await?;
            let ip = |p: &Pod| {
                p.status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default()
            };
            let (caller_ip, stranger_ip) = (ip(&caller), ip(&stranger));

            let _op = env.operator().start().await?;
            let smd: SecureModelDeployment = fixture::smd("web")
                .replicas(1)
                .image(&real_node_image()?)
                .limits("200m", "64Mi")
                .set(&["spec", "server", "command"], json!(["/bin/sh", "-c"]))
                .set(
                    &["spec", "server", "args"],
                    json!(["echo model > /tmp/index.html && exec httpd -f -p 8000 -h /tmp"]),
                )
                .clients(json!([{"namespace": clients, "podSelector": {"app": "caller"}}]))
                .egress(json!([{"cidr": format!("{caller_ip}/32"), "ports": [8080]}]))
                .build()?;
            env.api::<SecureModelDeployment>()
                .create(&Default::default(), &smd)
                .await?;
            wait_condition(&env, "web", conditions::READY, "RolloutComplete").await?;
            let model = running_pod(&env, "web").await?.name_any();

            // In: through the Service, found by cluster DNS, from the declared client only.
            let service = format!("web.{model_ns}.svc.cluster.local");
            let service_ip = resolve(&clients, "caller", "main", &service).await?;
            let got = reach(&clients, "caller", "main", &service_ip, 8000).await?;
            ensure!(
                got == Reach::Answered("model".into()),
                "the declared client got {got:?}"
            );
            for (ns, pod) in [(&clients, "stranger"), (&elsewhere, "outsider")] {
                let got = reach(ns, pod, "main", &service_ip, 8000).await?;
                ensure!(
                    got == Reach::Blocked,
                    "{ns}/{pod} (not declared) got {got:?}"
                );
            }

            // Out: the declared destination, DNS through cluster DNS, nothing else.
            let got = reach(&model_ns, &model, "server", &caller_ip, 8080).await?;
            ensure!(
                got == Reach::Answered("caller".into()),
                "declared egress got {got:?}"
            );
            let got = reach(&clients, "caller", "main", &stranger_ip, 8080).await?;
            ensure!(
                got == Reach::Answered("stranger".into()),
                "control: {got:?}"
            );
            let got = reach(&model_ns, &model, "server", &stranger_ip, 8080).await?;
            ensure!(got == Reach::Blocked, "undeclared egress got {got:?}");
            let own = resolve(&model_ns, &model, "server", &service).await?;
            ensure!(own == service_ip, "the model resolved {service} to {own}");
            let (ok, out, _) = exec(
                &model_ns,
                &model,
                "server",
                &["nslookup", &service, &stranger_ip],
            )
            .await?;
            ensure!(
                !ok,
                "DNS through another server than cluster DNS worked: {out}"
            );
            // The API server answers a pod without policies (plain HTTP to its TLS port gets
            // its 400), not the model.
            let got = reach(&clients, "caller", "main", "10.96.0.1", 443).await?;
            ensure!(
                matches!(&got, Reach::Answered(body) if body.contains("HTTPS server")),
                "the API server did not answer a pod without policies: {got:?}"
            );
            let got = reach(&model_ns, &model, "server", "10.96.0.1", 443).await?;
            ensure!(
                got == Reach::Blocked,
                "the model reached the API server: {got:?}"
            );
            let _ = outsider;
            Ok(())
        },
    )
    .await;
}
