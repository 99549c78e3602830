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
    NamespaceOptions, TestEnv,
    artifacts::{age_identity, encrypted_model, publish_store, pvc_store, run_here, sha256_of},
    exec, real_node_image, wait_condition, wait_for_value, wait_until, with_namespace,
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
                // The server alone (the gate's pod is the mTLS test's).
                .set(&["spec", "gate"], json!({"mode": "Disabled"}))
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

            // /tmp holds up to its size limit (256Mi, on disk): past it, the kubelet evicts the
            // pod at its next measurement (the write itself may not finish before it does), and
            // the Deployment replaces it.
            run(&[
                "dd",
                "if=/dev/zero",
                "of=/tmp/fill",
                "bs=1048576",
                "count=300",
            ])
            .await?;
            let pods = env.api::<Pod>();
            let evicted = wait_for_value(
                moat_e2e::DEADLINE,
                &format!("pod {name} evicted for its /tmp"),
                || async {
                    let status = pods.get_opt(&name).await?.and_then(|p| p.status);
                    Ok(status.filter(|s| s.reason.as_deref() == Some("Evicted")))
                },
            )
            .await?;
            let message = evicted.message.unwrap_or_default();
            ensure!(
                message.contains("tmp") && message.contains("256Mi"),
                "evicted for another reason: {message}"
            );
            let replacement = running_pod(&env, "web").await?;
            ensure!(replacement.name_any() != name, "no replacement pod");
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

/// The model `web` (busybox httpd answering "model" on 8000) in the test's namespace, allowing
/// pods labelled `app: caller` of `clients` in, and `egress` out; Ready. Returns its pod's name.
async fn web_model(env: &TestEnv, clients: &str, egress: serde_json::Value) -> Result<String> {
    let smd: SecureModelDeployment = fixture::smd("web")
        .replicas(1)
        .image(&real_node_image()?)
        .limits("200m", "64Mi")
        .set(&["spec", "server", "command"], json!(["/bin/sh", "-c"]))
        .set(
            &["spec", "server", "args"],
            json!(["echo model > /tmp/index.html && exec httpd -f -p 8000 -h /tmp"]),
        )
        // NetworkPolicies on the wire, to the server's own port (plain HTTP, no gate).
        .set(&["spec", "gate"], json!({"mode": "Disabled"}))
        .clients(json!([{"namespace": clients, "podSelector": {"app": "caller"}}]))
        .egress(egress)
        .build()?;
    env.api::<SecureModelDeployment>()
        .create(&Default::default(), &smd)
        .await?;
    wait_condition(env, "web", conditions::READY, "RolloutComplete").await?;
    Ok(running_pod(env, "web").await?.name_any())
}

/// Drift repair on real pods: deleted NetworkPolicies come back and traffic from an undeclared
/// pod is blocked again; a privileged sidecar added to the Deployment never runs (Pod Security
/// rejects its pods while Moat reverts the template), and the pods left are the hardened ones.
#[tokio::test]
async fn drift_repair_restores_isolation_and_hardening_on_real_pods() {
    with_namespace(
        "real-drift",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let clients = env
                .another_namespace(&NamespaceOptions::restricted().on_real_node())
                .await?;
            plain_pod(&env, &clients, "caller", "caller").await?;
            plain_pod(&env, &clients, "stranger", "other").await?;
            let _op = env.operator().start().await?;
            web_model(&env, &clients, json!([])).await?;
            let service_ip = resolve(
                &clients,
                "caller",
                "main",
                &format!("web.{}.svc.cluster.local", env.namespace),
            )
            .await?;
            let got = reach(&clients, "stranger", "main", &service_ip, 8000).await?;
            ensure!(got == Reach::Blocked, "before: the stranger got {got:?}");

            // Both policies deleted: Moat recreates them and the stranger is blocked again.
            let policies = env.api::<k8s_openapi::api::networking::v1::NetworkPolicy>();
            let deleted = std::time::Instant::now();
            for name in ["web-deny-all", "web-allow"] {
                policies.delete(name, &Default::default()).await?;
            }
            wait_until("both NetworkPolicies back", || async {
                Ok(policies.get_opt("web-deny-all").await?.is_some()
                    && policies.get_opt("web-allow").await?.is_some())
            })
            .await?;
            let back = deleted.elapsed();
            wait_until("the stranger blocked again", || async {
                Ok(reach(&clients, "stranger", "main", &service_ip, 8000).await? == Reach::Blocked)
            })
            .await?;
            eprintln!(
                "NetworkPolicies back {back:?} after deletion; stranger blocked again {:?} after deletion",
                deleted.elapsed()
            );
            let got = reach(&clients, "caller", "main", &service_ip, 8000).await?;
            ensure!(got == Reach::Answered("model".into()), "after: the caller got {got:?}");

            // A privileged sidecar patched into the Deployment.
            let deployments = env.api::<k8s_openapi::api::apps::v1::Deployment>();
            deployments
                .patch(
                    "web",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{
                        "name": "sidecar", "image": real_node_image()?,
                        "command": ["/bin/sleep", "3600"],
                        "securityContext": {"privileged": true}
                    }]}}}})),
                )
                .await?;
            wait_until("the sidecar reverted and the rollout complete", || async {
                let d = deployments.get("web").await?;
                let names: Vec<String> = d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .map(|p| p.containers.iter().map(|c| c.name.clone()).collect())
                    .unwrap_or_default();
                let status = d.status.unwrap_or_default();
                Ok(names == ["server"]
                    && status.observed_generation == d.metadata.generation
                    && status.updated_replicas == Some(1)
                    && status.ready_replicas == Some(1)
                    && status.replicas == Some(1))
            })
            .await?;
            let pods = env
                .api::<Pod>()
                .list(&ListParams::default().labels("moat.dev/deployment=web"))
                .await?;
            for pod in &pods.items {
                let containers: Vec<&str> = pod
                    .spec
                    .iter()
                    .flat_map(|s| s.containers.iter().map(|c| c.name.as_str()))
                    .collect();
                ensure!(containers == ["server"], "{} runs {containers:?}", pod.name_any());
            }
            let model = running_pod(&env, "web").await?.name_any();
            let (ok, status, err) =
                exec(&env.namespace, &model, "server", &["cat", "/proc/self/status"]).await?;
            ensure!(ok, "{err}");
            ensure!(status_field(&status, "CapEff")? == "0000000000000000", "{status}");
            Ok(())
        },
    )
    .await;
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
            let model = web_model(
                &env,
                &clients,
                json!([{"cidr": format!("{caller_ip}/32"), "ports": [8080]}]),
            )
            .await?;

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

/// Output of a command on this machine; fails with its standard error.
/// An encrypted model of 1 GiB is fetched from a PersistentVolume, verified and decrypted by
/// Moat's real init container into the memory-backed volume, and the server reads every byte of
/// it; the key never reaches the server container. A tampered artifact (its recorded digest
/// updated too, so only the MAC can tell) and an artifact for another key each stop the pod in
/// its init container, and the SecureModelDeployment says why with the container's own message.
#[tokio::test]
async fn a_1_gib_model_is_decrypted_in_the_pod_and_bad_artifacts_fail_closed() {
    use k8s_openapi::api::core::v1::{PersistentVolume, Secret};
    with_namespace(
        "real-model",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let ns = env.namespace.clone();
            // The store: a directory on this machine, served to the pods as a hostPath
            // PersistentVolume of a StorageClass the operator is told is encrypted.
            let dir = tempfile::Builder::new().prefix("moat-real-model-").tempdir_in("/tmp")?;
            let store = dir.path().join("store");
            let class = "moat-e2e-encrypted-local";
            let pv_name = pvc_store(&env, dir.path(), class).await?;
            let (secret, recipient) = age_identity(dir.path(), "key.txt")?;
            let (_, other_recipient) = age_identity(dir.path(), "other.txt")?;
            let weights = encrypted_model(dir.path(), "fraud", 1024, &recipient)?;
            encrypted_model(dir.path(), "tampered", 4, &recipient)?;
            encrypted_model(dir.path(), "wrongkey", 4, &other_recipient)?;
            // Flip one byte in the payload, past the header.
            let tampered = store.join("tampered.tar.age");
            let mut bytes = std::fs::read(&tampered)?;
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
            std::fs::write(&tampered, &bytes)?;
            publish_store(dir.path())?;
            let key: Secret = serde_json::from_value(json!({
                "metadata": {"name": "model-key"}, "stringData": {"identity": secret}
            }))?;
            env.api::<Secret>().create(&Default::default(), &key).await?;

            let helper = moat_e2e::real_node_moat_image()?;
            let _op = env
                .operator()
                .settings(|s| {
                    s.encrypted_storage_classes = vec![class.into()];
                    s.image.helper_image = helper.clone();
                })
                .start()
                .await?;
            let model = |name: &str, digest: &str, size: &str, memory: &str| {
                fixture::smd(name)
                    .replicas(1)
                    .image(&real_node_image().unwrap_or_default())
                    // The node has two cores; three models with a whole one each would not fit.
                    .limits("250m", memory)
                    .set(&["spec", "server", "command"], json!(["/bin/sh", "-c"]))
                    .set(
                        &["spec", "server", "args"],
                        json!(["sha256sum /models/m/weights.bin > /tmp/index.html && exec httpd -f -p 8000 -h /tmp"]),
                    )
                    // The decryption alone (the gate's pod is the mTLS test's).
                    .set(&["spec", "gate"], json!({"mode": "Disabled"}))
                    .model(json!({
                        "source": {"pvc": {"claimName": "store", "path": format!("{name}.tar.age")}},
                        "sha256": digest,
                        "decryptionKeySecretRef": {"name": "model-key", "key": "identity"},
                        "mountPath": "/models/m",
                        "sizeLimit": size
                    }))
                    .build()
            };
            let smds = env.api::<SecureModelDeployment>();
            let digest = |name: &str| sha256_of(&store.join(format!("{name}.tar.age")));
            smds.create(&Default::default(), &model("fraud", &digest("fraud")?, "1100Mi", "1536Mi")?)
                .await?;
            for bad in ["tampered", "wrongkey"] {
                smds.create(&Default::default(), &model(bad, &digest(bad)?, "64Mi", "512Mi")?)
                    .await?;
            }

            // The good one: decrypted in the pod, every byte read by the server.
            wait_condition(&env, "fraud", conditions::READY, "RolloutComplete").await?;
            let pod = running_pod(&env, "fraud").await?;
            let name = pod.name_any();
            let (ok, served, err) = exec(&ns, &name, "server", &["cat", "/tmp/index.html"]).await?;
            ensure!(ok, "{err}");
            ensure!(served.starts_with(&weights), "the server read {served:?}, the weights are {weights}");
            let (ok, out, _) = exec(&ns, &name, "server", &["ls", "/var/run/moat/model-key"]).await?;
            ensure!(!ok, "the key is visible in the server container: {out}");
            let (_, mounts, _) = exec(&ns, &name, "server", &["cat", "/proc/self/mounts"]).await?;
            ensure!(!mounts.contains("model-key"), "the key volume is mounted in the server:\n{mounts}");
            let (ok, _, err) = exec(&ns, &name, "server", &["touch", "/models/m/probe"]).await?;
            ensure!(!ok && err.contains("Read-only"), "the model volume took a write: {err}");
            // The init container's time, and the pod's peak memory (which includes the plaintext
            // the init container wrote into the memory-backed volume).
            let init = pod
                .status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref())
                .context("the init container's end")?;
            let took = match (&init.started_at, &init.finished_at) {
                (Some(a), Some(b)) => b.0.as_second() - a.0.as_second(),
                _ => -1,
            };
            let uid = pod.uid().unwrap_or_default();
            let peak = ["burstable", "guaranteed", ""]
                .iter()
                .find_map(|qos| {
                    let path = format!(
                        "/sys/fs/cgroup/memory/{}/kubepods/{qos}/pod{uid}/memory.max_usage_in_bytes",
                        moat_e2e::tool("MOAT_NODE_CGROUP").unwrap_or_else(|_| "moat-moat".into())
                    )
                    .replace("//", "/");
                    std::fs::read_to_string(path).ok()
                })
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            eprintln!(
                "1 GiB model: init container ran {took} s (exit {}), pod peak memory {} MiB",
                init.exit_code,
                peak >> 20
            );
            ensure!(init.exit_code == 0, "the init container exited {}", init.exit_code);

            // The bad ones: stopped in the init container, with its own message in the status.
            for (bad, needle) in [
                ("tampered", "does not authenticate"),
                ("wrongkey", "wrong key"),
            ] {
                let message =
                    wait_condition(&env, bad, conditions::STALLED, conditions::reason::MODEL_DECRYPTION_FAILED)
                        .await?;
                ensure!(message.contains(needle), "{bad}: {message}");
                let pods = env
                    .api::<Pod>()
                    .list(&ListParams::default().labels(&format!("moat.dev/deployment={bad}")))
                    .await?;
                for p in &pods.items {
                    let started = p
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .into_iter()
                        .flatten()
                        .any(|c| c.name == "server" && c.state.as_ref().is_some_and(|s| s.waiting.is_none()));
                    ensure!(!started, "{bad}: the server started in {}", p.name_any());
                }
            }
            let pvs: kube::Api<PersistentVolume> = kube::Api::all(env.client.clone());
            pvs.delete(&pv_name, &Default::default()).await?;
            Ok(())
        },
    )
    .await;
}

/// The packets counted by the real node's guard (`inet moat-guard leaving`): what tried to leave
/// the node for anywhere but the API relay and the registry.
fn guard_count() -> Result<u64> {
    let netns = moat_e2e::tool("MOAT_NODE_NETNS")?;
    let out = run_here(
        "nsenter",
        &[
            &format!("--net=/run/netns/{netns}"),
            "--",
            "nft",
            "list",
            "counter",
            "inet",
            "moat-guard",
            "leaving",
        ],
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in:\n{out}"))
}

/// Nothing a pod sends leaves the machine: the node's namespace has no default route (an
/// address outside is unreachable), and the guard drops and counts what a pod sends to the host
/// other than the API relay and the registry's read-only endpoint.
#[tokio::test]
async fn nothing_a_pod_sends_leaves_the_machine() {
    with_namespace(
        "real-egress",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let netns = moat_e2e::tool("MOAT_NODE_NETNS")?;
            let routes = run_here("ip", &["-n", &netns, "route", "show", "default"])?;
            ensure!(
                routes.trim().is_empty(),
                "the node has a default route: {routes}"
            );
            plain_pod(&env, &env.namespace, "prober", "prober").await?;
            let ns = &env.namespace;
            // TEST-NET-2: an address on no machine here.
            let (ok, _, err) = exec(
                ns,
                "prober",
                "main",
                &["nc", "-w", "3", "198.51.100.1", "80"],
            )
            .await?;
            ensure!(!ok, "a pod connected to an address outside the machine");
            ensure!(
                err.contains("unreachable") || err.contains("timed out"),
                "connecting outside failed for another reason: {err}"
            );
            let host = moat_e2e::tool("MOAT_NODE_HOST_IP")?;
            let before = guard_count()?;
            let got = reach(ns, "prober", "main", &host, 9).await?;
            ensure!(
                got == Reach::Blocked,
                "a pod reached the host beyond the API relay: {got:?}"
            );
            let after = guard_count()?;
            ensure!(
                after > before,
                "the guard did not count the attempt ({before} then {after})"
            );
            Ok(())
        },
    )
    .await;
}

/// A pod of the model server image (Python, `e2e/model-server/serve.py`) that runs `command`, as
/// [`hardened_pod`] says.
async fn python_pod(
    env: &TestEnv,
    ns: &str,
    name: &str,
    sa: &str,
    command: &[&str],
    volumes: &[(&str, serde_json::Value, &str)],
) -> Result<Pod> {
    let image = moat_e2e::real_node_model_server_image()?;
    hardened_pod(env, ns, name, sa, &image, command, volumes).await
}

/// A pod labelled `app: <name>` that runs `command` of `image` under ServiceAccount `sa`
/// (created if missing) without a token, hardened as Pod Security "restricted" asks, with
/// `volumes` (name, Secret or ConfigMap source, mount path) mounted read-only; returned once
/// its container runs.
async fn hardened_pod(
    env: &TestEnv,
    ns: &str,
    name: &str,
    sa: &str,
    image: &str,
    command: &[&str],
    volumes: &[(&str, serde_json::Value, &str)],
) -> Result<Pod> {
    let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(env.client.clone(), ns);
    if sas.get_opt(sa).await?.is_none() {
        sas.create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
        )
        .await?;
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10003, "runAsGroup": 10003,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main",
                "image": image,
                "command": command,
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": true},
                "resources": {"limits": {"cpu": "200m", "memory": "128Mi"},
                              "requests": {"cpu": "10m", "memory": "32Mi"}},
                "volumeMounts": volumes.iter().map(|(v, _, path)| json!({"name": v, "mountPath": path, "readOnly": true})).collect::<Vec<_>>()
            }],
            "volumes": volumes.iter().map(|(v, source, _)| {
                let mut volume = source.clone();
                volume["name"] = json!(v);
                volume
            }).collect::<Vec<_>>()
        }
    }))?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(env.client.clone(), ns);
    pods.create(&Default::default(), &pod).await?;
    wait_for_value(
        moat_e2e::DEADLINE,
        &format!("pod {ns}/{name} running"),
        || async {
            let p = pods.get(name).await?;
            let running = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                });
            Ok(running.then_some(p))
        },
    )
    .await
}

/// How often the containers of `p` (the init containers, native sidecars among them, too) were
/// restarted.
fn restarts(p: &Pod) -> i32 {
    let status = p.status.as_ref();
    status
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .map(|c| c.restart_count)
        .sum()
}

/// The model server image's interpreter and program.
const PYTHON: &str = "/usr/bin/python3";
const SERVE: &str = "/app/serve.py";

/// Moat's gate on the wire, in front of a real model server: the model's encrypted weights come
/// over HTTPS from an artifact store in the cluster (its own CA, trusted through
/// `caConfigMapRef`), are verified and decrypted by Moat's init container, and the Python server
/// reads them, listening on the pod's loopback only. A client pod holding its ModelClient Secret
/// calls the Service through the gate and gets a score under its SPIFFE identity (the gate names
/// it to the server); a certificate from Moat's CA for an identity this model never consented to
/// (what a client of another model holds) gets 403, no certificate 401, another CA's certificate
/// and an expired one 403, each with its reason in the gate's audit log. Deleting the ModelClient
/// revokes the identity, and quarantine by annotation cuts every caller off until lifted: each
/// without a pod restart, timed.
#[tokio::test]
async fn the_gate_admits_consented_clients_refuses_the_rest_and_revokes_and_quarantines_live() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
    use moat::api::ModelClient;
    use moat::pki;
    with_namespace(
        "real-mtls",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let ns = env.namespace.clone();
            let opts = NamespaceOptions::restricted().on_real_node();
            let store_ns = env.another_namespace(&opts).await?;
            let clients = env.another_namespace(&opts).await?;

            // The model: a logistic regression and its (random) weights, encrypted.
            let dir = tempfile::Builder::new().prefix("moat-real-mtls-").tempdir_in("/tmp")?;
            let model = dir.path().join("fraud");
            std::fs::create_dir_all(&model)?;
            std::fs::write(
                model.join("model.json"),
                r#"{"features": ["amount", "night"], "weights": [0.002, 1.5], "bias": -3.0}"#,
            )?;
            let weights: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            std::fs::write(model.join("weights.bin"), &weights)?;
            let weights_sha = pki::sha256_hex(&weights);
            let (identity, recipient) = age_identity(dir.path(), "key.txt")?;
            let artifact = dir.path().join("fraud.tar.age");
            let moat = moat_e2e::moat_binary()?;
            run_here(
                &moat.to_string_lossy(),
                &["encrypt", "-r", &recipient, "-o", &artifact.to_string_lossy(), &model.to_string_lossy()],
            )?;
            let artifact_bytes = std::fs::read(&artifact)?;
            let artifact_sha = pki::sha256_hex(&artifact_bytes);

            // The artifact store: HTTPS with a certificate from a CA of its own.
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let day = std::time::Duration::from_secs(86_400);
            let store_ca = pki::generate_ca("store.example", now, day)?;
            let store_cert = pki::Ca::load(&store_ca, now)?.issue(
                &pki::Identity::server(&store_ns, "store", "store", "cluster.local"),
                "store.example",
                now,
                day,
            )?;
            let secret = |name: &str, data: serde_json::Value| -> Result<Secret> {
                Ok(serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?)
            };
            kube::Api::<Secret>::namespaced(env.client.clone(), &store_ns)
                .create(&Default::default(), &secret("store-tls", json!({"tls.crt": store_cert.cert_pem, "tls.key": store_cert.key_pem}))?)
                .await?;
            let files: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": "store-files"},
                "binaryData": {"fraud.tar.age": k8s_openapi::ByteString(artifact_bytes)}
            }))?;
            kube::Api::<ConfigMap>::namespaced(env.client.clone(), &store_ns)
                .create(&Default::default(), &files)
                .await?;
            let service: Service = serde_json::from_value(json!({
                "metadata": {"name": "store"},
                "spec": {"selector": {"app": "store"}, "ports": [{"port": 8443, "targetPort": 8443}]}
            }))?;
            kube::Api::<Service>::namespaced(env.client.clone(), &store_ns)
                .create(&Default::default(), &service)
                .await?;
            python_pod(
                &env,
                &store_ns,
                "store",
                "store",
                &[PYTHON, SERVE, "files", "--dir", "/srv", "--port", "8443", "--cert", "/tls/tls.crt", "--key", "/tls/tls.key"],
                &[
                    ("files", json!({"configMap": {"name": "store-files"}}), "/srv"),
                    ("tls", json!({"secret": {"secretName": "store-tls"}}), "/tls"),
                ],
            )
            .await?;

            // The model, served by the Python server over Moat's certificate.
            env.api::<Secret>()
                .create(&Default::default(), &secret("model-key", json!({"identity": identity}))?)
                .await?;
            let ca_map: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": "store-ca"}, "data": {"ca.crt": store_ca.cert_pem}
            }))?;
            env.api::<ConfigMap>().create(&Default::default(), &ca_map).await?;
            let helper = moat_e2e::real_node_moat_image()?;
            let _op = env
                .operator()
                .watching(&[&ns, &clients])
                .settings(|s| s.image.helper_image = helper.clone())
                .start()
                .await?;
            let smd = fixture::smd("fraud")
                .replicas(1)
                .image(&moat_e2e::real_node_model_server_image()?)
                .port(8000)
                .limits("250m", "320Mi")
                // The quickstart's flags: plain HTTP on loopback, behind the gate.
                .set(&["spec", "server", "args"], json!([
                    "--model=/models/fraud", "--host=127.0.0.1", "--port=8000"
                ]))
                .set(&["spec", "server", "readinessProbe"], json!({"httpGet": {"path": "/health"}}))
                .set(&["spec", "gate"], json!({"limits": {"paths": ["/v1/score", "/v1/model", "/health"]}}))
                .clients(json!([{"namespace": clients, "podSelector": {"app": "checkout"}, "serviceAccounts": ["checkout"]}]))
                .egress(json!([{"namespace": store_ns, "podSelector": {"app": "store"}, "ports": [8443]}]))
                .model(json!({
                    "source": {"url": format!("https://store.{store_ns}.svc.cluster.local:8443/fraud.tar.age"),
                               "caConfigMapRef": {"name": "store-ca", "key": "ca.crt"}},
                    "sha256": artifact_sha,
                    "decryptionKeySecretRef": {"name": "model-key", "key": "identity"},
                    "mountPath": "/models/fraud",
                    "sizeLimit": "16Mi"
                }))
                .build()?;
            env.api::<SecureModelDeployment>().create(&Default::default(), &smd).await?;

            // The client: its ModelClient's Secret, and a forged one (another CA, the same
            // SPIFFE ID).
            kube::Api::<ModelClient>::namespaced(env.client.clone(), &clients)
                .create(&Default::default(), &fixture::model_client("checkout", &ns, "fraud").build()?)
                .await?;
            let client_secrets: kube::Api<Secret> = kube::Api::namespaced(env.client.clone(), &clients);
            wait_for_value(moat_e2e::DEADLINE, "the client certificate Secret", || async {
                Ok(client_secrets.get_opt("checkout-client").await?)
            })
            .await?;
            let other_ca = pki::generate_ca("cluster.local", now, day)?;
            let forged = pki::Ca::load(&other_ca, now)?.issue(
                &pki::Identity::client(&clients, "checkout"),
                "cluster.local",
                now,
                day,
            )?;
            // Moat's own CA (the test's operator keeps it in the test namespace): a certificate
            // for an identity this model never consented to, as a client of another model holds,
            // and an expired one for the consented identity.
            let moat_ca_secret = env.api::<Secret>().get("moat-ca").await?;
            let text = |key: &str| -> Result<String> {
                let data = moat_ca_secret.data.as_ref().and_then(|d| d.get(key)).context("CA Secret")?;
                Ok(String::from_utf8(data.0.clone())?)
            };
            let moat_ca = pki::Ca::load(
                &pki::KeyedCertificate { cert_pem: text("tls.crt")?, key_pem: text("tls.key")? },
                now,
            )?;
            let elsewhere = moat_ca.issue(&pki::Identity::client(&clients, "billing"), "cluster.local", now, day)?;
            let expired = moat_ca.issue(
                &pki::Identity::client(&clients, "checkout"),
                "cluster.local",
                now - 30,
                std::time::Duration::from_secs(1),
            )?;
            for (name, cert) in [("forged", &forged), ("elsewhere", &elsewhere), ("expired", &expired)] {
                client_secrets
                    .create(&Default::default(), &secret(name, json!({"tls.crt": cert.cert_pem, "tls.key": cert.key_pem}))?)
                    .await?;
            }
            python_pod(
                &env,
                &clients,
                "checkout",
                "checkout",
                &[PYTHON, "-c", "import time; time.sleep(86400)"],
                &[
                    ("client", json!({"secret": {"secretName": "checkout-client"}}), "/var/run/client"),
                    ("forged", json!({"secret": {"secretName": "forged"}}), "/var/run/forged"),
                    ("elsewhere", json!({"secret": {"secretName": "elsewhere"}}), "/var/run/elsewhere"),
                    ("expired", json!({"secret": {"secretName": "expired"}}), "/var/run/expired"),
                ],
            )
            .await?;

            wait_condition(&env, "fraud", conditions::READY, "RolloutComplete").await?;
            let url = |path: &str| format!("https://fraud.{ns}.svc.cluster.local:8000{path}");
            let request = |path: &str, cert: Option<&str>| {
                let mut argv = vec![PYTHON.to_string(), SERVE.into(), "request".into(), url(path),
                                    "--ca".into(), "/var/run/client/ca.crt".into()];
                if let Some(dir) = cert {
                    argv.extend([format!("--cert={dir}/tls.crt"), format!("--key={dir}/tls.key")]);
                }
                if path == "/v1/score" {
                    argv.push(r#"--data={"features": {"amount": 1200, "night": 1}}"#.into());
                }
                argv
            };
            let call = |argv: Vec<String>| {
                let clients = clients.clone();
                async move {
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    exec(&clients, "checkout", "main", &argv).await
                }
            };

            // The consented client: a handshake with the gate under the Service's DNS name, and a
            // score. Asked until answered: kube-router admits a new client pod once it has added the pod's
            // address to the model's ingress rules, and a call before that is blocked.
            let out = wait_for_value(moat_e2e::DEADLINE, "an answer for the consented client", || async {
                let (ok, out, err) = call(request("/v1/score", Some("/var/run/client"))).await?;
                if ok && out.starts_with("200") {
                    return Ok(Some(out));
                }
                // Also not yet: the gate's policy names the identity once Moat has seen the
                // ModelClient and the kubelet has delivered the policy.
                ensure!(
                    err.contains("timed out") || err.contains("Connection refused")
                        || (out.starts_with("403") && out.contains("NotConsented")),
                    "the client with Moat's certificate got: {out} {err}"
                );
                Ok(None)
            })
            .await?;
            let answer: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap_or_default())?;
            let want_id = format!("spiffe://cluster.local/ns/{clients}/sa/checkout");
            ensure!(answer["client"] == json!(want_id), "the server saw the client as {}", answer["client"]);
            let score = answer["score"].as_f64().context("no score")?;
            // sigmoid(-3 + 0.002 * 1200 + 1.5 * 1)
            ensure!((score - 1.0 / (1.0 + (-0.9f64).exp())).abs() < 1e-9, "score {score}");
            // The server read the weights that came over HTTPS and were decrypted in the pod.
            let (ok, out, err) = call(request("/v1/model", Some("/var/run/client"))).await?;
            ensure!(ok && out.starts_with("200"), "{out} {err}");
            let model: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap_or_default())?;
            ensure!(
                model["files"]["weights.bin"]["sha256"] == json!(weights_sha),
                "the server holds other weights: {model}"
            );

            // Everyone else gets an HTTP answer from the gate with the reason, and never reaches
            // the server.
            for (what, cert, status, reason) in [
                ("no certificate", None, "401", "NoCertificate"),
                ("another CA's certificate", Some("/var/run/forged"), "403", "UntrustedCertificate"),
                ("an expired certificate", Some("/var/run/expired"), "403", "UntrustedCertificate"),
                ("an identity consented elsewhere", Some("/var/run/elsewhere"), "403", "NotConsented"),
            ] {
                let (ok, out, err) = call(request("/v1/score", cert)).await?;
                ensure!(!ok && out.starts_with(status) && out.contains(reason), "a client with {what} got: {out} {err}");
                eprintln!("a client with {what}: {}", out.lines().next().unwrap_or_default());
            }
            // A path outside the limits: 404 from the gate.
            let (ok, out, _) = call(request("/admin", Some("/var/run/client"))).await?;
            ensure!(!ok && out.starts_with("404") && out.contains("PathNotAllowed"), "{out}");
            // The gate's audit log (its stdout) has a line per refusal, with the reason, and the
            // consented call with its identity.
            let server = running_pod(&env, "fraud").await?.name_any();
            let pods = env.api::<Pod>();
            let audit = || async {
                let log = pods
                    .logs(&server, &kube::api::LogParams { container: Some("gate".into()), ..Default::default() })
                    .await?;
                Ok::<_, anyhow::Error>(
                    log.lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .filter(|l| l.get("request_id").is_some())
                        .collect::<Vec<_>>(),
                )
            };
            let elsewhere_id = format!("spiffe://cluster.local/ns/{clients}/sa/billing");
            wait_until("the refusals in the gate's audit log", || async {
                let lines = audit().await?;
                let has = |reason: &str| lines.iter().any(|l| l["reason"] == reason);
                Ok(has("NoCertificate") && has("UntrustedCertificate") && has("PathNotAllowed")
                    && lines.iter().any(|l| l["reason"] == "NotConsented" && l["identity"] == json!(elsewhere_id) && l["status"] == 403)
                    && lines.iter().any(|l| l["identity"] == json!(want_id) && l["status"] == 200 && l["path"] == "/v1/score"))
            })
            .await?;
            // The status says who the gate admits.
            let status = env.api::<SecureModelDeployment>().get_status("fraud").await?.status.context("status")?;
            let gate = status.gate.context("status.gate")?;
            ensure!(gate.enforced && gate.identities == vec![want_id.clone()], "{gate:?}");

            // Revocation: the ModelClient goes, and the gate refuses its identity, without a
            // restart. Timed from the deletion to the first refusal seen.
            let before = restarts(&pods.get(&server).await?);
            let started = std::time::Instant::now();
            kube::Api::<ModelClient>::namespaced(env.client.clone(), &clients)
                .delete("checkout", &Default::default())
                .await?;
            wait_until("the revoked identity refused", || async {
                let (ok, out, _) = call(request("/v1/score", Some("/var/run/client"))).await?;
                Ok(!ok && out.starts_with("403") && out.contains("NotConsented"))
            })
            .await?;
            eprintln!("revocation: refused {:.2} s after the ModelClient was deleted", started.elapsed().as_secs_f64());
            // Consent back (a new ModelClient, a new certificate): served again.
            kube::Api::<ModelClient>::namespaced(env.client.clone(), &clients)
                .create(&Default::default(), &fixture::model_client("checkout", &ns, "fraud").build()?)
                .await?;
            wait_until("the identity admitted again", || async {
                let (ok, out, _) = call(request("/v1/score", Some("/var/run/client"))).await?;
                Ok(ok && out.starts_with("200"))
            })
            .await?;

            // Quarantine, by annotation (no change to the spec): every caller is cut off (the
            // gate refuses, and the NetworkPolicy denies ingress), Ready turns False; lifting it
            // restores service. The pods keep running throughout.
            let smds = env.api::<SecureModelDeployment>();
            let annotate = |value: serde_json::Value| {
                let smds = smds.clone();
                async move {
                    let patch = json!({"metadata": {"annotations": {"moat.dev/quarantine": value}}});
                    smds.patch("fraud", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await
                }
            };
            let started = std::time::Instant::now();
            annotate(json!("INC-42 suspected exfiltration")).await?;
            wait_until("every call refused under quarantine", || async {
                let (ok, out, _) = call(request("/v1/score", Some("/var/run/client"))).await?;
                Ok(!ok && (out.is_empty() || out.starts_with("503")))
            })
            .await?;
            eprintln!("quarantine: refused {:.2} s after the annotation", started.elapsed().as_secs_f64());
            wait_until("Ready=False, reason Quarantined", || async {
                let smd = smds.get_status("fraud").await?;
                Ok(smd.status.is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == conditions::READY && c.status == "False" && c.reason == "Quarantined"
                    }) && s.gate.is_some_and(|g| g.quarantined.is_some_and(|q| q.contains("INC-42")))
                }))
            })
            .await?;
            let started = std::time::Instant::now();
            annotate(serde_json::Value::Null).await?;
            wait_until("service after the quarantine is lifted", || async {
                let (ok, out, _) = call(request("/v1/score", Some("/var/run/client"))).await?;
                Ok(ok && out.starts_with("200"))
            })
            .await?;
            eprintln!("quarantine lifted: served {:.2} s after the annotation was removed", started.elapsed().as_secs_f64());
            let after = pods.get(&server).await?;
            ensure!(restarts(&after) == before, "a container restarted: {before} -> {}", restarts(&after));
            Ok(())
        },
    )
    .await;
}

// The gate on the wire in front of a server that streams, speaks gRPC and sees cancellations:
// the gate's peer (`e2e/src/bin/moat-gate-peer.rs`), which is also the client.

/// The peer's program in its image.
const PEER: &str = "/moat-gate-peer";

/// One model served by the peer behind the gate: its name, its `spec.gate`, and a certificate
/// lifetime other than the default.
struct PeerModel<'a> {
    name: &'a str,
    gate: serde_json::Value,
    lifetime: Option<&'a str>,
}

/// Models served by the peer behind the gate in the test's namespace (one replica each), and
/// their clients in a namespace of their own: one pod per ServiceAccount (pod name, app label and
/// ServiceAccount alike), holding the ModelClient Secret of each model at `/var/run/<model>`.
struct Gated {
    env: TestEnv,
    ns: String,
    clients: String,
    _operator: moat_e2e::Operator,
}

/// Starts an operator, declares `models` and a consented ModelClient for each model and each of
/// `sas`, starts the client pods, and returns once every client is served by every model.
async fn gated(env: &TestEnv, models: &[PeerModel<'_>], sas: &[&str]) -> Result<Gated> {
    use k8s_openapi::api::core::v1::Secret;
    use moat::api::ModelClient;
    let ns = env.namespace.clone();
    let clients = env
        .another_namespace(&NamespaceOptions::restricted().on_real_node())
        .await?;
    let helper = moat_e2e::real_node_moat_image()?;
    let image = moat_e2e::real_node_gate_peer_image(env!("CARGO_BIN_EXE_moat-gate-peer"))?;
    let operator = env
        .operator()
        .watching(&[&ns, &clients])
        .settings(|s| s.image.helper_image = helper.clone())
        .start()
        .await?;
    let consented: Vec<_> = sas
        .iter()
        .map(
            |sa| json!({"namespace": clients, "podSelector": {"app": sa}, "serviceAccounts": [sa]}),
        )
        .collect();
    for m in models {
        let mut smd = fixture::smd(m.name)
            .replicas(1)
            .image(&image)
            .port(8000)
            .limits("250m", "128Mi")
            .set(
                &["spec", "server", "resources", "requests"],
                json!({"cpu": "20m", "memory": "32Mi"}),
            )
            .set(
                &["spec", "server", "args"],
                json!(["serve", "--listen=127.0.0.1:8000"]),
            )
            .set(
                &["spec", "server", "readinessProbe"],
                json!({"httpGet": {"path": "/health"}}),
            )
            .set(&["spec", "gate"], m.gate.clone())
            .clients(json!(consented));
        if let Some(lifetime) = m.lifetime {
            smd = smd.certificate_lifetime(lifetime);
        }
        env.api::<SecureModelDeployment>()
            .create(&Default::default(), &smd.build()?)
            .await?;
    }
    let model_clients: kube::Api<ModelClient> = kube::Api::namespaced(env.client.clone(), &clients);
    let secrets: kube::Api<Secret> = kube::Api::namespaced(env.client.clone(), &clients);
    for sa in sas {
        for m in models {
            let name = format!("{sa}-{}", m.name);
            let mc = fixture::model_client(&name, &ns, m.name)
                .service_account(sa)
                .secret(&name);
            model_clients
                .create(&Default::default(), &mc.build()?)
                .await?;
        }
    }
    for sa in sas {
        let mut volumes = Vec::new();
        for m in models {
            let secret = format!("{sa}-{}", m.name);
            wait_for_value(
                moat_e2e::DEADLINE,
                &format!("the client Secret {secret}"),
                || async { Ok(secrets.get_opt(&secret).await?) },
            )
            .await?;
            volumes.push((
                m.name,
                json!({"secret": {"secretName": secret}}),
                format!("/var/run/{}", m.name),
            ));
        }
        let volumes: Vec<_> = volumes
            .iter()
            .map(|(n, v, p)| (*n, v.clone(), p.as_str()))
            .collect();
        hardened_pod(env, &clients, sa, sa, &image, &[PEER, "idle"], &volumes).await?;
    }
    for m in models {
        wait_condition(env, m.name, conditions::READY, "RolloutComplete").await?;
    }
    let gated = Gated {
        env: env.clone(),
        ns,
        clients,
        _operator: operator,
    };
    for sa in sas {
        for m in models {
            gated.admitted(sa, m.name).await?;
        }
    }
    Ok(gated)
}

/// What the gate said when it refused: the `reason` of its JSON body.
fn refusal_reason(answer: &serde_json::Value) -> String {
    serde_json::from_str::<serde_json::Value>(answer["body"].as_str().unwrap_or_default())
        .ok()
        .and_then(|b| b["reason"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn number(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

impl Gated {
    /// The peer's arguments for calling `path` of `model` as the client of the pod it runs in.
    fn conn(&self, model: &str, path: &str) -> Vec<String> {
        let dir = format!("/var/run/{model}");
        vec![
            format!(
                "--url=https://{model}.{}.svc.cluster.local:8000{path}",
                self.ns
            ),
            format!("--ca={dir}/ca.crt"),
            format!("--cert={dir}/tls.crt"),
            format!("--key={dir}/tls.key"),
        ]
    }

    /// The whole command line of the peer's `command` against `path` of `model`, with `extra`.
    fn argv(&self, command: &str, model: &str, path: &str, extra: &[&str]) -> Vec<String> {
        let mut argv = vec![PEER.to_string(), command.to_string()];
        argv.extend(self.conn(model, path));
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    /// Runs the peer's `command` in the client pod `sa` (`kubectl exec`); its JSON lines.
    async fn peer(
        &self,
        sa: &str,
        command: &str,
        model: &str,
        path: &str,
        extra: &[&str],
    ) -> Result<Vec<serde_json::Value>> {
        let argv = self.argv(command, model, path, extra);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let (ok, out, err) = exec(&self.clients, sa, "main", &argv).await?;
        ensure!(
            ok,
            "{PEER} {command} as {sa} to {model}{path} failed: {}",
            err.trim()
        );
        out.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    /// One request's answer (status, headers, body, trailers, the server's serial).
    async fn request(
        &self,
        sa: &str,
        model: &str,
        path: &str,
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        self.peer(sa, "request", model, path, extra)
            .await?
            .pop()
            .context("the peer printed nothing")
    }

    /// Returns once `sa` is served by `model`: kube-router admits a new client pod once it has
    /// added its address to the model's ingress rules (until then the connection times out),
    /// and the gate names the identity once Moat has seen the ModelClient and the kubelet has
    /// delivered the policy (until then 403 NotConsented).
    async fn admitted(&self, sa: &str, model: &str) -> Result<()> {
        wait_until(&format!("{sa} served by {model}"), || async {
            match self.request(sa, model, "/v1/echo", &[]).await {
                Ok(a) if a["status"] == 200 => Ok(true),
                Ok(a) if a["status"] == 403 && refusal_reason(&a) == "NotConsented" => Ok(false),
                Err(e) if format!("{e:#}").contains("connecting to") => Ok(false),
                Ok(a) => anyhow::bail!("{sa} got {a}"),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The JSON lines of `container` in the running pod of `model`: the peer's (`server`: stream
    /// ends, echoes, gRPC calls) or the gate's audit log (`gate`).
    async fn log(&self, model: &str, container: &str) -> Result<Vec<serde_json::Value>> {
        let pod = running_pod(&self.env, model).await?.name_any();
        let params = kube::api::LogParams {
            container: Some(container.into()),
            ..Default::default()
        };
        let log = self.env.api::<Pod>().logs(&pod, &params).await?;
        Ok(log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// How the server's stream `id` ended (`complete` or `cancelled`, when, after how many
    /// chunks), once it has.
    async fn stream_end(&self, model: &str, id: &str) -> Result<serde_json::Value> {
        wait_for_value(
            moat_e2e::DEADLINE,
            &format!("the end of stream {id} in {model}'s server"),
            || async {
                Ok(self
                    .log(model, "server")
                    .await?
                    .into_iter()
                    .find(|l| l["event"] == "stream" && l["id"] == id))
            },
        )
        .await
    }

    /// The gate's audit line of request `id`, once written.
    async fn audit_line(&self, model: &str, id: &str) -> Result<serde_json::Value> {
        wait_for_value(
            moat_e2e::DEADLINE,
            &format!("the audit line of {id}"),
            || async {
                Ok(self
                    .log(model, "gate")
                    .await?
                    .into_iter()
                    .find(|l| l["request_id"] == id))
            },
        )
        .await
    }
}

/// A peer command running in a client pod (`kubectl exec`, killed when dropped), its JSON lines
/// as they come.
struct Streaming {
    what: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    _exec: tokio::process::Child,
}

impl Streaming {
    fn start(ns: &str, pod: &str, argv: &[String]) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(moat_e2e::tool("MOAT_KUBECTL")?)
            .args(["exec", "-n", ns, pod, "-c", "main", "--"])
            .args(argv)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting kubectl exec")?;
        let stdout = child.stdout.take().context("kubectl's stdout")?;
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            what: format!("{} in {pod}", argv.join(" ")),
            lines,
            _exec: child,
        })
    }

    /// The next line.
    async fn next(&mut self) -> Result<serde_json::Value> {
        tokio::time::timeout(moat_e2e::DEADLINE, self.lines.recv())
            .await
            .with_context(|| {
                format!(
                    "nothing more within {:?} from {}",
                    moat_e2e::DEADLINE,
                    self.what
                )
            })?
            .with_context(|| format!("{} exited", self.what))
    }
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Case 4 of the gate's real-node coverage: over `spec.gate.limits`, a request is answered at
/// once by the gate with its reason, and never reaches the server. A body over
/// `maxRequestBytes` gets 413 TooLarge, whether its length is declared or it streams without
/// one, over HTTP/2 and HTTP/1.1, to an HTTP/2 (h2c) server; more requests in flight than
/// `maxConcurrentRequests` get 429 TooManyConcurrent; more than `requestsPerSecond` and `burst`
/// get 429 RateLimited; both with `Retry-After: 1`, and each in the audit log.
#[tokio::test]
async fn the_gate_answers_413_over_the_body_limit_and_429_over_the_rate_and_concurrency_limits() {
    with_namespace(
        "real-gate-limits",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let limits = json!({"maxRequestBytes": "1Ki", "requestsPerSecond": 10, "burst": 10,
                                "maxConcurrentRequests": 2});
            let g = gated(
                &env,
                &[PeerModel { name: "limited", gate: json!({"upstreamProtocol": "HTTP2", "limits": limits}), lifetime: None }],
                &["checkout", "batch"],
            )
            .await?;

            // 413: the limit itself passes; one byte more does not, declared or streamed.
            let at_limit = g.request("checkout", "limited", "/v1/echo", &["--method=POST", "--body-bytes=1024"]).await?;
            let read: serde_json::Value = serde_json::from_str(at_limit["body"].as_str().unwrap_or_default())?;
            ensure!(at_limit["status"] == 200 && read["bytes"] == 1024, "1 KiB: {at_limit}");
            for (how, body) in [("declared", "--body-bytes=1025"), ("streamed", "--stream-bytes=4096")] {
                for (protocol, alpn) in [("HTTP/2", None), ("HTTP/1.1", Some("--http1"))] {
                    let mut flags = vec!["--method=POST", body];
                    flags.extend(alpn);
                    let answer = g.request("checkout", "limited", "/v1/echo", &flags).await?;
                    ensure!(
                        answer["status"] == 413 && refusal_reason(&answer) == "TooLarge",
                        "a {how} body over the limit, over {protocol}: {answer}"
                    );
                    eprintln!("a {how} body over maxRequestBytes over {protocol}: {} {}", answer["status"], refusal_reason(&answer));
                }
            }

            // 429 TooManyConcurrent: two streams in flight (their first event read), a third
            // request on another connection is refused.
            let lines = g
                .peer("checkout", "concurrent", "limited", "/v1/chat/completions?id=hold&chunks=0&gap_ms=200",
                      &["--holds=2", "--probe=/v1/echo"])
                .await?;
            let probe = lines.last().context("no answer")?;
            ensure!(
                probe["status"] == 429 && refusal_reason(probe) == "TooManyConcurrent"
                    && probe["headers"]["retry-after"] == "1" && probe["holds_open"] == 2,
                "a third request with two in flight: {probe}"
            );
            eprintln!("a third request with two in flight: {} {}", probe["status"], refusal_reason(probe));

            // 429 RateLimited: 40 requests one after another, as fast as they are answered,
            // from an identity of their own (the bucket is per identity): at most the burst and
            // what refilled meanwhile pass.
            let burst = g.peer("batch", "burst", "limited", "/v1/echo", &["--n=40"]).await?;
            let burst = burst.last().context("no summary")?;
            let passed = burst["statuses"]["200"].as_u64().unwrap_or(0);
            let limited = burst["statuses"]["429"].as_u64().unwrap_or(0);
            let seconds = number(&burst["elapsed_ms"]) / 1000.0;
            ensure!(
                passed + limited == 40 && limited > 0 && burst["reasons"] == json!({"RateLimited": limited})
                    && burst["retry_after"] == "1"
                    && passed as f64 <= 10.0 + (10.0 * seconds).ceil(),
                "40 requests in {seconds:.2} s at 10/s with a burst of 10: {burst}"
            );
            eprintln!("40 requests in {seconds:.2} s at 10/s with a burst of 10: {passed} served, {limited} 429 RateLimited");

            // The server never read a body over the limit; the audit log has every refusal.
            let served = g.log("limited", "server").await?;
            ensure!(
                served.iter().filter(|l| l["event"] == "echo").all(|l| l["bytes"].as_u64() <= Some(1024)),
                "the server read a body over the limit: {served:?}"
            );
            let checkout = format!("spiffe://cluster.local/ns/{}/sa/checkout", g.clients);
            let batch = format!("spiffe://cluster.local/ns/{}/sa/batch", g.clients);
            wait_until("the refusals in the audit log", || async {
                let lines = g.log("limited", "gate").await?;
                let count = |reason: &str, who: &str| {
                    lines.iter().filter(|l| l["reason"] == reason && l["identity"] == who).count()
                };
                Ok(count("TooLarge", &checkout) == 4
                    && count("TooManyConcurrent", &checkout) == 1
                    && count("RateLimited", &batch) as u64 == limited
                    && lines.iter().filter(|l| l["reason"] == "TooLarge").all(|l| l["status"] == 413))
            })
            .await?;
            Ok(())
        },
    )
    .await;
}

/// The events of an SSE read by the peer's `sse`, checked to have come one at a time as the
/// server wrote them: `n` events, each in a data frame of its own and received before the server
/// wrote the next. Returns the times from each event's write to its receipt, and between
/// receipts (ms).
fn chunk_by_chunk(
    lines: &[serde_json::Value],
    n: usize,
    what: &str,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let events: Vec<_> = lines.iter().filter(|l| l.get("i").is_some()).collect();
    ensure!(
        events.len() == n,
        "{what}: {} events of {n}: {lines:?}",
        events.len()
    );
    for (k, e) in events.iter().enumerate() {
        ensure!(
            e["i"] == k && e["frame"] == k,
            "{what}: event {k} came as {e}: {lines:?}"
        );
    }
    for pair in events.windows(2) {
        ensure!(
            number(&pair[0]["recv_ms"]) < number(&pair[1]["sent_ms"]),
            "{what}: event {} arrived only after the server wrote the next (buffered): {lines:?}",
            pair[0]["i"]
        );
    }
    let latency = events
        .iter()
        .map(|e| number(&e["recv_ms"]) - number(&e["sent_ms"]))
        .collect();
    let gaps = events
        .windows(2)
        .map(|p| number(&p[1]["recv_ms"]) - number(&p[0]["recv_ms"]))
        .collect();
    Ok((latency, gaps))
}

fn ms_list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cases 5, 6 and 7 of the gate's real-node coverage, through an HTTP/1.1 server (`chat`) and
/// an HTTP/2 (h2c, `upstreamProtocol: HTTP2`) one (`grpc`):
/// - server-sent events pass chunk by chunk: each event arrives in a frame of its own before the
///   server writes the next (they are 500 ms apart), over HTTP/2 and HTTP/1.1 clients;
/// - gRPC: the messages, and `grpc-status` and `grpc-message` as HTTP/2 trailers (a status
///   other than 0 too), from a server the gate spoke HTTP/2 to;
/// - a client that goes away mid-stream cancels the server's stream (its response is dropped)
///   within a second, and the audit line says the response was not complete.
#[tokio::test]
async fn sse_chunks_grpc_trailers_and_client_disconnects_pass_the_gate_on_real_pods() {
    with_namespace(
        "real-gate-streams",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let g = gated(
                &env,
                &[
                    PeerModel { name: "chat", gate: json!({"limits": {"maxRequestBytes": "64Ki"}}), lifetime: None },
                    PeerModel { name: "grpc", gate: json!({"upstreamProtocol": "HTTP2"}), lifetime: None },
                ],
                &["checkout"],
            )
            .await?;
            let routes = [("chat", "HTTP/1.1", "HTTP/2"), ("chat", "HTTP/1.1", "HTTP/1.1"), ("grpc", "HTTP/2.0", "HTTP/2")];
            // The peer offers HTTP/2 alone unless told `--http1`.
            let alpn = |client: &str| if client == "HTTP/1.1" { vec!["--http1"] } else { Vec::new() };

            // 5. Server-sent events, chunk by chunk.
            for (k, (model, upstream, client)) in routes.iter().enumerate() {
                let id = format!("sse-{k}");
                let lines = g
                    .peer("checkout", "sse", model, &format!("/v1/chat/completions?id={id}&chunks=6&gap_ms=500"), &alpn(client))
                    .await?;
                let head = &lines[0];
                let what = format!("SSE from {model} ({upstream} server) to an {client} client");
                ensure!(
                    head["status"] == 200 && head["headers"]["content-type"] == "text/event-stream",
                    "{what}: {head}"
                );
                ensure!(lines.iter().any(|l| l["upstream"] == *upstream), "{what}: the gate spoke another protocol to the server: {lines:?}");
                let (latency, gaps) = chunk_by_chunk(&lines, 6, &what)?;
                ensure!(lines.last().is_some_and(|l| l["end"] == "complete"), "{what}: {lines:?}");
                ensure!(g.stream_end(model, &id).await?["outcome"] == "complete");
                eprintln!(
                    "{what}: 6 events 500 ms apart, each in its own frame; write to receipt {} ms; between receipts {} ms",
                    ms_list(&latency),
                    ms_list(&gaps)
                );
            }

            // 6. gRPC through an HTTP/2 server: messages and trailers.
            for (method, message, messages, status, text) in [
                ("Echo", "hello", json!(["hello"]), "0", "served"),
                ("Count", "", json!(["0", "1", "2"]), "0", "counted"),
                ("Missing", "", json!([]), "12", "no such method"),
            ] {
                let grpc = format!("--grpc={message}");
                let answer = g.request("checkout", "grpc", &format!("/grpc.Peer/{method}"), &[&grpc]).await?;
                ensure!(
                    answer["status"] == 200
                        && answer["version"] == "HTTP/2.0"
                        && answer["headers"]["content-type"] == "application/grpc"
                        && answer["headers"]["x-upstream-version"] == "HTTP/2.0"
                        && answer["headers"].get("grpc-status").is_none()
                        && answer["grpc_messages"] == messages
                        && answer["trailers"]["grpc-status"] == status
                        && answer["trailers"]["grpc-message"] == text,
                    "gRPC {method}: {answer}"
                );
                eprintln!("gRPC {method}: messages {}, trailers {}", answer["grpc_messages"], answer["trailers"]);
            }

            // 7. A client that goes away after 3 events of an endless stream.
            for (k, (model, upstream, client)) in routes.iter().enumerate() {
                let id = format!("cancel-{k}");
                let lines = g
                    .peer("checkout", "sse", model, &format!("/v1/chat/completions?id={id}&chunks=0&gap_ms=200"),
                          &[&["--disconnect-after=3"][..], &alpn(client)].concat())
                    .await?;
                let what = format!("the {client} client leaving {model} ({upstream} server)");
                let gone = lines.last().context("no line")?;
                ensure!(gone["end"] == "disconnected", "{what}: {lines:?}");
                let ended = g.stream_end(model, &id).await?;
                let took = number(&ended["at_ms"]) - number(&gone["at_ms"]);
                ensure!(ended["outcome"] == "cancelled", "{what}: the server's stream {ended}");
                ensure!(took < 1000.0, "{what}: the server's stream was cancelled only {took:.0} ms later");
                let request_id = lines[0]["headers"]["x-request-id"].as_str().context("no request id")?;
                let audit = g.audit_line(model, request_id).await?;
                ensure!(audit["complete"] == false && audit["status"] == 200, "{what}: audit {audit}");
                eprintln!("{what}: the server's stream cancelled {took:.1} ms later, after {} chunks", ended["chunks"]);
            }

            // The body limit through the HTTP/1.1 server: a streamed body over it gets 413.
            let answer = g.request("checkout", "chat", "/v1/echo", &["--method=POST", "--stream-bytes=131072"]).await?;
            ensure!(answer["status"] == 413 && refusal_reason(&answer) == "TooLarge", "128 KiB streamed to chat: {answer}");
            Ok(())
        },
    )
    .await;
}

/// Case 8 of the gate's real-node coverage: two clients each hold an endless SSE stream open;
/// deleting one's ModelClient cuts that client's stream (the server's stream is cancelled too)
/// while the other's keeps flowing, the revoked client is refused afterwards, and the pod is not
/// restarted.
#[tokio::test]
async fn revocation_closes_the_revoked_clients_open_stream_and_no_other_on_real_pods() {
    use moat::api::ModelClient;
    with_namespace(
        "real-gate-revoke",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let g = gated(&env, &[PeerModel { name: "chat", gate: json!({}), lifetime: None }], &["checkout", "billing"]).await?;
            let pods = env.api::<Pod>();
            let server = running_pod(&env, "chat").await?;
            let mut streams = Vec::new();
            for sa in ["checkout", "billing"] {
                let argv = g.argv("sse", "chat", &format!("/v1/chat/completions?id=revoke-{sa}&chunks=0&gap_ms=200"), &[]);
                let mut stream = Streaming::start(&g.clients, sa, &argv)?;
                let head = stream.next().await?;
                ensure!(head["status"] == 200, "{sa}'s stream: {head}");
                for _ in 0..2 {
                    let event = stream.next().await?;
                    ensure!(event.get("i").is_some(), "{sa}'s stream: {event}");
                }
                streams.push(stream);
            }
            let (mut checkout, mut billing) = (streams.remove(0), streams.remove(0));

            let revoked_at = wall_ms();
            kube::Api::<ModelClient>::namespaced(env.client.clone(), &g.clients)
                .delete("billing-chat", &Default::default())
                .await?;
            let end = loop {
                let line = billing.next().await?;
                if line.get("end").is_some() {
                    break line;
                }
            };
            ensure!(end["end"] == "closed", "billing's stream ended as {end}");
            eprintln!(
                "revocation: billing's open stream cut {:.2} s after its ModelClient was deleted ({})",
                (number(&end["at_ms"]) - revoked_at) / 1000.0,
                end["error"]
            );
            let cancelled = g.stream_end("chat", "revoke-billing").await?;
            ensure!(cancelled["outcome"] == "cancelled", "the server's stream for billing: {cancelled}");

            // checkout's stream flows on: five more events written after billing's was cut.
            let mut after = 0;
            while after < 5 {
                let line = checkout.next().await?;
                ensure!(line.get("end").is_none(), "checkout's stream ended: {line}");
                if number(&line["sent_ms"]) > number(&end["at_ms"]) {
                    after += 1;
                }
            }
            let refused = g.request("billing", "chat", "/v1/echo", &[]).await?;
            ensure!(refused["status"] == 403 && refusal_reason(&refused) == "NotConsented", "billing after revocation: {refused}");
            let served = g.request("checkout", "chat", "/v1/echo", &[]).await?;
            ensure!(served["status"] == 200, "checkout after billing's revocation: {served}");
            let now = pods.get(&server.name_any()).await?;
            ensure!(
                now.metadata.uid == server.metadata.uid && restarts(&now) == restarts(&server),
                "the model's pod was restarted or replaced"
            );
            Ok(())
        },
    )
    .await;
}

/// Case 10 of the gate's real-node coverage: with 30 s serving certificates (renewed at 20 s),
/// three clients opening a new connection for every request and one keeping a single connection
/// send a steady load through the gate until new connections have been served under a renewed
/// certificate for 100 requests: no request fails, the serial the clients see changes, and the
/// pod is neither restarted nor replaced (the gate reloads the certificate itself).
#[tokio::test]
async fn a_serving_certificate_renewal_under_steady_load_drops_no_request_on_real_pods() {
    use k8s_openapi::api::core::v1::Secret;
    with_namespace(
        "real-gate-renewal",
        NamespaceOptions::restricted().on_real_node(),
        |env| async move {
            let g = gated(
                &env,
                &[PeerModel {
                    name: "steady",
                    gate: json!({"limits": {"requestsPerSecond": 1000, "burst": 1000}}),
                    lifetime: Some("30s"),
                }],
                &["checkout"],
            )
            .await?;
            let pods = env.api::<Pod>();
            let server = running_pod(&env, "steady").await?;
            let secrets = env.api::<Secret>();
            let serial = |s: &Secret| {
                let pem = moat::core::ca::text(s, "tls.crt");
                moat::pki::pem_certificates(&pem).first().and_then(|der| moat::pki::info(der)).map(|i| i.serial)
            };
            // The serials the Secret held, and when they appeared (ms, wall clock).
            let issued = std::sync::Mutex::new(Vec::<(String, f64)>::new());
            let watch = async {
                loop {
                    if let Ok(Some(s)) = secrets.get_opt("steady-tls").await
                        && let Some(serial) = serial(&s)
                        && let Ok(mut issued) = issued.lock()
                        && issued.last().is_none_or(|(last, _)| *last != serial)
                    {
                        issued.push((serial, wall_ms()));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            };
            let started = wall_ms();
            let load = g.peer(
                "checkout",
                "load",
                "steady",
                "/v1/echo",
                &["--workers=3", "--interval-ms=50", "--until-serials=2", "--linger=100", "--max-seconds=300"],
            );
            let summary = tokio::select! {
                lines = load => lines?,
                () = watch => unreachable!("the watch never ends"),
            };
            let summary = summary.last().context("no summary")?;
            let issued = issued.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
            let seen: Vec<_> = summary["serials"].as_array().cloned().unwrap_or_default();
            // When each serial the Secret held came to be served on new connections (after the
            // one the load began with).
            let mut delivery = Vec::new();
            for (serial, at) in issued.iter().skip(1) {
                let served = seen.iter().find(|s| s["serial"] == *serial);
                delivery.push(match served {
                    Some(s) => format!("{serial} in the Secret at {:.1} s, served from {:.1} s", (at - started) / 1000.0, number(&s["first_ms"]) / 1000.0),
                    None => format!("{serial} in the Secret at {:.1} s, never served", (at - started) / 1000.0),
                });
            }
            eprintln!(
                "renewal under load: {} requests, {} failed, in {:.0} s; serials served {}; {}; latency ms {}; the long-lived connection {}; errors {}",
                summary["sent"], summary["failed"], number(&summary["elapsed_s"]),
                json!(seen.iter().map(|s| json!([s["serial"], s["requests"]])).collect::<Vec<_>>()),
                delivery.join("; "), summary["latency_ms"], summary["persistent"], summary["errors"]
            );
            ensure!(summary["done"] == true && seen.len() >= 2, "new connections were never served under a renewed certificate: {summary}");
            ensure!(summary["failed"] == 0 && summary["sent"] == summary["ok"], "requests failed during the renewal: {summary}");
            ensure!(
                summary["persistent"]["connections"] == 1 && summary["persistent"]["ok"] == summary["persistent"]["sent"],
                "the long-lived connection did not survive the renewal: {summary}"
            );
            let now = pods.get(&server.name_any()).await?;
            ensure!(
                now.metadata.uid == server.metadata.uid && restarts(&now) == restarts(&server),
                "the model's pod was restarted or replaced"
            );
            Ok(())
        },
    )
    .await;
}
