//! The Helm chart against the local control plane: lint, least-privilege RBAC, values schema,
//! install/upgrade/uninstall, and the operator reconciling with nothing but the chart's RBAC.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::api::{ListParams, PostParams};
use moat::api::SecureModelDeployment;
use moat_e2e::{
    NamespaceOptions, Operator, config_with_token, service_account_token, tool, wait_for,
    with_namespace,
};
use serde_json::json;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/moat");

fn helm(args: &[&str]) -> Result<std::process::Output> {
    let helm = tool("MOAT_HELM")?;
    Command::new(&helm)
        .args(args)
        .output()
        .with_context(|| format!("running {helm}"))
}

fn ok(out: std::process::Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn rendered(extra: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    let mut args = vec!["template", "t", CHART, "--namespace", "moat-system"];
    args.extend_from_slice(extra);
    let text = ok(helm(&args)?, "helm template")?;
    Ok(text
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|v| v.get("kind").is_some())
        .collect())
}

#[test]
fn chart_lints_strictly_and_its_rbac_is_least_privilege() -> Result<()> {
    ok(helm(&["lint", "--strict", CHART])?, "helm lint --strict")?;
    let docs = rendered(&[])?;
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "t-moat")
        .context("the operator's ClusterRole")?;
    let mut granted = Vec::new();
    for rule in role["rules"].as_sequence().context("rules")? {
        for group in rule["apiGroups"].as_sequence().context("apiGroups")? {
            for resource in rule["resources"].as_sequence().context("resources")? {
                for verb in rule["verbs"].as_sequence().context("verbs")? {
                    let (g, r, v) = (
                        group.as_str().unwrap_or(""),
                        resource.as_str().unwrap_or(""),
                        verb.as_str().unwrap_or(""),
                    );
                    ensure!(
                        g != "*" && r != "*" && v != "*",
                        "wildcard in the ClusterRole"
                    );
                    ensure!(
                        !matches!(v, "escalate" | "bind" | "impersonate"),
                        "forbidden verb {v}"
                    );
                    ensure!(r != "pods/exec", "forbidden resource {r}");
                    granted.push(format!("{g}/{r}:{v}"));
                }
            }
        }
    }
    granted.sort();
    // What the code calls: the reconciler (watch caches, fresh reads, apply, prune, status) and the
    // event recorder. Leases are in the namespaced Role.
    let mut needed: Vec<String> = Vec::new();
    for r in ["securemodeldeployments"] {
        for v in ["get", "list", "watch"] {
            needed.push(format!("moat.dev/{r}:{v}"));
        }
    }
    needed.push("moat.dev/securemodeldeployments/status:get".into());
    needed.push("moat.dev/securemodeldeployments/status:patch".into());
    // The ModelClient controller: watch cache, status.
    for v in ["get", "list", "watch"] {
        needed.push(format!("moat.dev/modelclients:{v}"));
    }
    needed.push("moat.dev/modelclients/status:get".into());
    needed.push("moat.dev/modelclients/status:patch".into());
    for (g, r) in [
        ("", "serviceaccounts"),
        ("", "services"),
        // Serving certificate Secrets (children) and client certificate Secrets.
        ("", "secrets"),
        ("networking.k8s.io", "networkpolicies"),
        ("policy", "poddisruptionbudgets"),
        ("apps", "deployments"),
    ] {
        // Server-side apply of an object that does not exist yet needs `create` as well as `patch`.
        for v in ["get", "list", "watch", "create", "patch", "delete"] {
            needed.push(format!("{g}/{r}:{v}"));
        }
    }
    needed.push("events.k8s.io/events:create".into());
    needed.push("events.k8s.io/events:patch".into());
    // Encrypted models: a PVC source's StorageClass, init container failures.
    needed.push("/persistentvolumeclaims:get".into());
    needed.push("/pods:list".into());
    needed.sort();
    ensure!(
        granted == needed,
        "ClusterRole differs from what the code needs:\n granted {granted:?}\n needed  {needed:?}"
    );

    // The CA Secret in the operator's namespace: read, created once, replaced on rotation.
    let ca_role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "t-moat-ca")
        .context("the CA Role")?;
    ensure!(
        serde_yaml::to_string(&ca_role["rules"])?.trim()
            == "- apiGroups:\n  - ''\n  resources:\n  - secrets\n  verbs:\n  - get\n  - list\n  - watch\n  - create\n  - update",
        "CA Role: {:?}",
        ca_role["rules"]
    );

    // Watching all namespaces binds the rules cluster-wide; watching some binds them in those
    // namespaces only.
    let bindings = |docs: &[serde_yaml::Value], kind: &str| -> Vec<String> {
        docs.iter()
            .filter(|d| d["kind"] == kind && d["roleRef"]["name"] == "t-moat")
            .map(|d| {
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    };
    ensure!(bindings(&docs, "ClusterRoleBinding") == [""]);
    ensure!(bindings(&docs, "RoleBinding").is_empty());
    let scoped = rendered(&["--set", "watchNamespaces={team-a,team-b}"])?;
    ensure!(bindings(&scoped, "ClusterRoleBinding").is_empty());
    ensure!(bindings(&scoped, "RoleBinding") == ["team-a", "team-b"]);
    Ok(())
}

#[test]
fn values_that_violate_the_schema_are_rejected_with_a_readable_message() -> Result<()> {
    let cases: [(&[&str], &str); 7] = [
        (&["--set", "replicaCount=0"], "/replicaCount"),
        (&["--set", "logging.format=xml"], "/logging/format"),
        (&["--set", "image.digest=latest"], "/image/digest"),
        (&["--set", "metrics.port=80"], "/metrics/port"),
        (&["--set", "unknownKey=1"], "unknownKey"),
        (&["--set", "installCRDs=maybe"], "/installCRDs"),
        (&["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
    ];
    for (args, field) in cases {
        let mut all = vec!["template", "t", CHART];
        all.extend_from_slice(args);
        let out = helm(&all)?;
        ensure!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("values don't meet the specifications of the schema")
                || err.contains("schema"),
            "{args:?}: {err}"
        );
        ensure!(
            err.contains(field),
            "{args:?}: the message does not name {field}: {err}"
        );
        eprintln!(
            "rejected {args:?}: {}",
            err.lines()
                .find(|l| l.contains("- at "))
                .unwrap_or_default()
                .trim()
        );
    }
    Ok(())
}

#[tokio::test]
async fn install_upgrade_uninstall_and_reconcile_with_the_charts_rbac() {
    with_namespace("chart-install", NamespaceOptions::restricted(), |env| async move {
        let release = format!("r{}", &env.namespace[env.namespace.len() - 5..]);
        let ns = env.namespace.as_str();
        // The CRD may exist already (other tests apply it; an earlier release's uninstall keeps
        // it). Hand it to this release the way Helm documents adoption (see the README).
        let crds = kube::Api::<CustomResourceDefinition>::all(env.client.clone());
        let release_free = json!({"metadata": {
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": ns}
        }});
        for crd in ["securemodeldeployments.moat.dev", "modelclients.moat.dev"] {
            crds.patch(crd, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&release_free)).await.ok();
        }
        ok(helm(&["install", &release, CHART, "-n", ns, "--force-conflicts"])?, "helm install")?;
        let name = format!("{release}-moat");
        let deploys = env.api::<Deployment>();
        // The operator's own pods pass Pod Security "restricted" (the namespace enforces it).
        let selector = format!("app.kubernetes.io/instance={release}");
        let pods = env.api::<Pod>();
        let pods_ready = |n: usize| {
            let pods = pods.clone();
            let selector = selector.clone();
            async move { Ok(pods.list(&ListParams::default().labels(&selector)).await?.items.len() == n) }
        };
        wait_for(Duration::from_secs(60), "2 operator pods", || pods_ready(2)).await?;
        let d = deploys.get(&name).await?;
        let c = &d.spec.as_ref().and_then(|s| s.template.spec.clone()).context("pod spec")?.containers[0];
        ensure!(c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem) == Some(true));
        ensure!(c.args.clone().unwrap_or_default().iter().any(|a| a == "--leader-elect"), "two replicas must elect a leader");

        // Upgrade: a third replica, and watch only two namespaces, so the rules are granted
        // there alone (RoleBindings instead of the ClusterRoleBinding).
        let other = env.another_namespace(&NamespaceOptions::restricted()).await?;
        let watch = format!("watchNamespaces={{{ns},{other}}}");
        ok(helm(&["upgrade", &release, CHART, "-n", ns, "--set", "replicaCount=3", "--set", &watch, "--force-conflicts"])?, "helm upgrade")?;
        wait_for(Duration::from_secs(60), "3 operator pods", || pods_ready(3)).await?;
        let d = deploys.get(&name).await?;
        let args = d.spec.and_then(|s| s.template.spec).map(|s| s.containers[0].args.clone().unwrap_or_default()).unwrap_or_default();
        ensure!(args.contains(&format!("--namespaces={ns},{other}")), "upgrade did not pass the namespaces: {args:?}");

        // RBAC: the chart's ServiceAccount sees no wildcard and suffices to reconcile fully.
        let kubectl = tool("MOAT_KUBECTL")?;
        let user = format!("system:serviceaccount:{ns}:{name}");
        let can = Command::new(&kubectl).args(["auth", "can-i", "--list", "--as", &user]).output()?;
        let can = ok(can, "kubectl auth can-i --list")?;
        ensure!(!can.lines().any(|l| l.split_whitespace().any(|w| w == "*" || w == "[*]" || w == "*.*")), "wildcard in:\n{can}");
        for (namespace, allowed) in [(ns, "yes"), (other.as_str(), "yes"), ("default", "no")] {
            let out = Command::new(&kubectl).args(["auth", "can-i", "patch", "deployments.apps", "-n", namespace, "--as", &user]).output()?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ensure!(answer == allowed, "can-i patch deployments in {namespace}: {answer}, want {allowed}");
        }
        // The operator binary's code, with the chart ServiceAccount's token, watching the two
        // namespaces as `--namespaces` makes it, reconciles a model in each.
        let token = service_account_token(&env.client, ns, &name).await?;
        let op = Operator::start_watching(config_with_token(token).await?, &[ns, &other], Duration::from_secs(300)).await?;
        let smd: SecureModelDeployment = serde_json::from_value(json!({
            "apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment",
            "metadata": {"name": "model"},
            "spec": {"server": {"image": moat_e2e::TEST_IMAGE, "port": 8000, "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}}
        }))?;
        let smds = env.api::<SecureModelDeployment>();
        let other_smds = kube::Api::<SecureModelDeployment>::namespaced(env.client.clone(), &other);
        smds.create(&PostParams::default(), &smd).await?;
        other_smds.create(&PostParams::default(), &smd).await?;
        for api in [&smds, &other_smds] {
            wait_for(Duration::from_secs(60), "Ready with the chart's RBAC", || async {
                let s = api.get("model").await?;
                Ok(s.status.is_some_and(|st| moat::api::conditions::is_true(&st.conditions, "Ready")))
            })
            .await?;
        }
        let errors = op.metrics.encode()?;
        ensure!(!errors.contains("moat_reconcile_errors_total{"), "errors with the chart's RBAC:\n{errors}");
        drop(op);

        // Uninstall removes the operator but never the CRD, so models survive.
        ok(helm(&["uninstall", &release, "-n", ns])?, "helm uninstall")?;
        wait_for(Duration::from_secs(30), "the operator Deployment to go", || async { Ok(deploys.get_opt(&name).await?.is_none()) }).await?;
        for crd in ["securemodeldeployments.moat.dev", "modelclients.moat.dev"] {
            if crds.get_opt(crd).await?.is_none() {
                bail!("helm uninstall deleted the CRD {crd}");
            }
        }
        ensure!(smds.get_opt("model").await?.is_some(), "the model did not survive helm uninstall");
        Ok(())
    })
    .await;
}
