//! The Helm chart against the local control plane: lint, values schema, install/upgrade/uninstall,
//! and least-privilege RBAC derived from what the real `moat` binary does with the chart's
//! ServiceAccount (read back from the API server's audit log).

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Pod, Secret},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use moat::{
    api::{ModelClient, SecureModelDeployment, conditions},
    fixture,
};
use moat_e2e::{
    MoatProcess, NamespaceOptions, audit_entries, audit_offset, can_i_rows,
    client_as_service_account, config_with_token, install_crds, is_ready, kubeconfig_with_token,
    service_account_token, tool, wait_ready, wait_until, with_namespace,
};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/moat");

/// Tests that run an operator over every namespace, or install the CRDs with a release, take
/// turns: two cluster-wide operators (each with its own CA) would fight over the same models.
static CLUSTER_WIDE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// `helm template` of release `release` in `namespace` with `extra` arguments, as documents.
fn render(release: &str, namespace: &str, extra: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    args.extend_from_slice(extra);
    let text = ok(helm(&args)?, "helm template")?;
    Ok(text
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|v| v.get("kind").is_some())
        .collect())
}

fn rendered(extra: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    render("t", "moat-system", extra)
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// One permission: API group, resource (with `/subresource`) and verb.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    group: String,
    resource: String,
    verb: String,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{group}/{} {}", self.resource, self.verb)
    }
}

/// A permission the chart gives the operator's ServiceAccount, and where.
#[derive(Clone, Debug)]
struct Grant {
    /// `ClusterRole/name` or `Role/namespace/name`.
    role: String,
    /// The namespace a RoleBinding grants it in; `None`: cluster-wide (ClusterRoleBinding).
    scope: Option<String>,
    access: Access,
    resource_names: Vec<String>,
}

/// A permission one audited request needed.
#[derive(Clone, Debug)]
struct Need {
    access: Access,
    /// `None` for a request across all namespaces (or of a cluster-scoped object).
    namespace: Option<String>,
    name: Option<String>,
}

impl Grant {
    fn allows(&self, need: &Need) -> bool {
        self.access == need.access
            && (self.scope.is_none() || self.scope == need.namespace)
            && (self.resource_names.is_empty()
                || need
                    .name
                    .as_ref()
                    .is_some_and(|n| self.resource_names.contains(n)))
    }
}

/// Every rule of every Role and ClusterRole the rendered chart binds to the ServiceAccount
/// `namespace/service_account`, expanded into single permissions.
fn grants_to(
    docs: &[serde_yaml::Value],
    namespace: &str,
    service_account: &str,
) -> Result<Vec<Grant>> {
    let mut grants = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let to_sa = binding["subjects"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"].as_str() == Some(service_account)
                    && s["namespace"].as_str() == Some(namespace)
            });
        if !to_sa {
            continue;
        }
        let scope = (binding["kind"] == "RoleBinding").then(|| {
            binding["metadata"]["namespace"]
                .as_str()
                .unwrap_or(namespace)
                .to_string()
        });
        let (role_kind, role_name) = (
            binding["roleRef"]["kind"].as_str().unwrap_or_default(),
            binding["roleRef"]["name"].as_str().unwrap_or_default(),
        );
        let role = docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some(role_kind)
                    && d["metadata"]["name"].as_str() == Some(role_name)
                    && (role_kind == "ClusterRole"
                        || d["metadata"]["namespace"].as_str() == scope.as_deref())
            })
            .with_context(|| format!("the chart binds {role_kind} {role_name}, which it lacks"))?;
        let label = match role_kind {
            "ClusterRole" => format!("ClusterRole/{role_name}"),
            _ => format!("Role/{}/{role_name}", scope.clone().unwrap_or_default()),
        };
        for rule in role["rules"].as_sequence().context("rules")? {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push(Grant {
                            role: label.clone(),
                            scope: scope.clone(),
                            access: Access {
                                group: group.clone(),
                                resource: resource.clone(),
                                verb,
                            },
                            resource_names: strings(&rule["resourceNames"]),
                        });
                    }
                }
            }
        }
    }
    Ok(grants)
}

/// The permissions audited requests needed: each request's verb on its resource (and
/// subresource); and `create` as well for a server-side apply that created its object (answered
/// 201: the API server then also authorizes `create`).
fn needs_of(entries: &[Value]) -> (Vec<Need>, Vec<String>) {
    let mut needs = Vec::new();
    let mut non_resource = Vec::new();
    for e in entries {
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        let Some(obj) = e.get("objectRef").filter(|o| o.is_object()) else {
            non_resource.push(format!(
                "{verb} {}",
                e["requestURI"].as_str().unwrap_or_default()
            ));
            continue;
        };
        let mut resource = obj["resource"].as_str().unwrap_or_default().to_string();
        if let Some(sub) = obj["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let need = |verb: &str| Need {
            access: Access {
                group: obj["apiGroup"].as_str().unwrap_or_default().to_string(),
                resource: resource.clone(),
                verb: verb.to_string(),
            },
            namespace: obj["namespace"].as_str().map(str::to_string),
            name: obj["name"].as_str().map(str::to_string),
        };
        needs.push(need(&verb));
        if verb == "patch" && e["responseStatus"]["code"] == 201 {
            needs.push(need("create"));
        }
    }
    (needs, non_resource)
}

#[test]
fn chart_lints_strictly_and_grants_no_wildcard_or_escalating_permission() -> Result<()> {
    ok(helm(&["lint", "--strict", CHART])?, "helm lint --strict")?;
    // What the operator needs is not listed here: the_charts_rbac_is_exactly_what_the_moat_binary_uses
    // derives it from the audit log. This checks what no operator may ever get.
    for values in [&[][..], &["--set", "watchNamespaces={team-a,team-b}"][..]] {
        let docs = rendered(values)?;
        let grants = grants_to(&docs, "moat-system", "t-moat")?;
        ensure!(!grants.is_empty(), "nothing is granted to t-moat");
        for g in &grants {
            let a = &g.access;
            ensure!(
                !a.group.contains('*')
                    && !a.resource.contains('*')
                    && !a.verb.contains('*')
                    && g.resource_names.iter().all(|n| !n.contains('*')),
                "wildcard in {}: {a}",
                g.role
            );
            ensure!(
                !matches!(a.verb.as_str(), "escalate" | "bind" | "impersonate"),
                "{} grants {a}",
                g.role
            );
            ensure!(
                !matches!(
                    a.resource.as_str(),
                    "pods/exec" | "pods/attach" | "nodes/proxy" | "serviceaccounts/token"
                ),
                "{} grants {a}",
                g.role
            );
            ensure!(
                !(a.group == "rbac.authorization.k8s.io" && a.verb != "get"),
                "{} grants {a}",
                g.role
            );
        }
    }

    // Watching all namespaces binds the rules cluster-wide; watching some binds them in those
    // namespaces only.
    let docs = rendered(&[])?;
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

    // The CA and identity values become the operator's flags.
    let docs = rendered(&[
        "--set",
        "ca.secretName=corp-ca",
        "--set",
        "ca.validity=720h",
        "--set",
        "trustDomain=prod.example.com",
        "--set",
        "clusterDomain=k8s.internal",
    ])?;
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("the operator Deployment")?;
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    for flag in [
        "--ca-secret=corp-ca",
        "--ca-validity=720h",
        "--trust-domain=prod.example.com",
        "--cluster-domain=k8s.internal",
    ] {
        ensure!(args.iter().any(|a| a == flag), "{flag} not in {args:?}");
    }

    // Availability: the replicas spread over nodes, a PriorityClass when asked for, and a
    // disruption budget that never keeps an unready replica.
    let docs = rendered(&["--set", "priorityClassName=operators"])?;
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned();
    let pod =
        find("Deployment").context("the operator Deployment")?["spec"]["template"]["spec"].clone();
    ensure!(
        pod["priorityClassName"] == "operators",
        "priorityClassName: {:?}",
        pod["priorityClassName"]
    );
    let spread = &pod["topologySpreadConstraints"][0];
    ensure!(
        spread["topologyKey"] == "kubernetes.io/hostname"
            && spread["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == "moat",
        "topology spread: {spread:?}"
    );
    let pdb = find("PodDisruptionBudget").context("the operator's PDB")?;
    ensure!(
        pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow",
        "PDB: {:?}",
        pdb["spec"]
    );
    let defaults = rendered(&[])?;
    let pod = &defaults
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("Deployment")?["spec"]["template"]["spec"];
    ensure!(
        pod.get("priorityClassName").is_none(),
        "a PriorityClass by default"
    );
    ensure!(
        !strings(&pod["containers"][0]["args"])
            .iter()
            .any(|a| a.starts_with("--default-")),
        "model placement defaults without values"
    );
    // The models' placement defaults become the operator's flags.
    let docs = rendered(&[
        "--set",
        "model.priorityClassName=models",
        "--set",
        "model.runtimeClassName=gvisor",
    ])?;
    let args = strings(
        &docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .context("Deployment")?["spec"]["template"]["spec"]["containers"][0]["args"],
    );
    for flag in [
        "--default-priority-class-name=models",
        "--default-runtime-class-name=gvisor",
    ] {
        ensure!(args.iter().any(|a| a == flag), "{flag} not in {args:?}");
    }
    Ok(())
}

/// The ingress rule of the operator's NetworkPolicy (the metrics port).
fn metrics_ingress(extra: &[&str]) -> Result<serde_yaml::Value> {
    let docs = rendered(extra)?;
    let policy = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("NetworkPolicy"))
        .context("no NetworkPolicy rendered")?;
    let ingress = policy["spec"]["ingress"]
        .as_sequence()
        .context("no ingress rules")?;
    ensure!(ingress.len() == 1, "one ingress rule: {ingress:?}");
    Ok(ingress[0].clone())
}

#[test]
fn metrics_are_scraped_only_from_the_namespaces_named() -> Result<()> {
    // By default the port is open to any pod, as without the policy (only the port).
    let open = metrics_ingress(&[])?;
    ensure!(open.get("from").is_none(), "a default source: {open:?}");
    ensure!(open["ports"][0]["port"].as_i64() == Some(8080), "{open:?}");
    let named = metrics_ingress(&[
        "--set",
        "networkPolicy.metricsFromNamespaces={monitoring,obs}",
    ])?;
    let from = named["from"].as_sequence().context("no from")?;
    ensure!(from.len() == 1, "{from:?}");
    let expr = &from[0]["namespaceSelector"]["matchExpressions"][0];
    ensure!(
        expr["key"].as_str() == Some("kubernetes.io/metadata.name")
            && expr["operator"].as_str() == Some("In")
            && strings(&expr["values"]) == ["monitoring", "obs"],
        "{expr:?}"
    );
    ensure!(
        from[0].get("podSelector").is_none() && from[0].get("ipBlock").is_none(),
        "{from:?}"
    );
    Ok(())
}

/// The admission policy renders by default, bound everywhere Moat works (all namespaces, or the
/// watched ones and the release's), naming the chart's ServiceAccount and the break-glass group
/// in its CEL; `admissionPolicy.enabled=false` renders neither the policy nor its binding.
#[test]
fn the_admission_policy_renders_on_by_default_and_not_when_opted_out() -> Result<()> {
    let of_kind = |docs: &[serde_yaml::Value], kind: &str| -> Vec<serde_yaml::Value> {
        docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    let named = |docs: &[serde_yaml::Value], kind: &str, name: &str| -> Result<serde_yaml::Value> {
        of_kind(docs, kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .with_context(|| format!("no {kind} {name}"))
    };
    // The author's mutating policy needs the API (GA in Kubernetes 1.36): without it (an older
    // cluster, or `helm template` without --api-versions) neither the policy nor the operator's
    // --spec-author-policy is rendered.
    let map_api = [
        "--api-versions",
        "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy",
    ];
    let older = rendered(&[])?;
    ensure!(
        of_kind(&older, "MutatingAdmissionPolicy").is_empty()
            && !serde_yaml::to_string(&older)?.contains("--spec-author-policy"),
        "the author policy renders without its API"
    );
    let docs = rendered(&map_api)?;
    ensure!(
        serde_yaml::to_string(&docs)?.contains("--spec-author-policy"),
        "the operator is not told that the author policy is installed"
    );
    let policies = of_kind(&docs, "ValidatingAdmissionPolicy");
    let bindings = of_kind(&docs, "ValidatingAdmissionPolicyBinding");
    let mutating = of_kind(&docs, "MutatingAdmissionPolicy");
    ensure!(
        policies.len() == 2
            && bindings.len() == 2
            && mutating.len() == 1
            && of_kind(&docs, "MutatingAdmissionPolicyBinding").len() == 1,
        "by default: the children's and the approvals' policies with their bindings, and the author's mutating policy with its binding"
    );
    // Approvals only in one's own name; the author of every spec change from the request.
    let approvals = serde_yaml::to_string(
        &named(
            &docs,
            "ValidatingAdmissionPolicy",
            "t-moat-approvals.moat.dev",
        )?["spec"],
    )?;
    ensure!(
        approvals.contains("object.spec.approver == request.userInfo.username")
            && approvals.contains("modelapprovals"),
        "{approvals}"
    );
    let author = serde_yaml::to_string(&mutating[0]["spec"])?;
    ensure!(
        author.contains("request.userInfo.username") && author.contains("moat.dev~1spec-author"),
        "{author}"
    );
    let policy = &named(
        &docs,
        "ValidatingAdmissionPolicy",
        "t-moat-children.moat.dev",
    )?;
    ensure!(
        policy["metadata"]["name"] == "t-moat-children.moat.dev",
        "{:?}",
        policy["metadata"]
    );
    ensure!(policy["spec"]["failurePolicy"] == "Fail");
    let text = serde_yaml::to_string(&policy["spec"])?;
    for needle in [
        "system:serviceaccount:moat-system:t-moat",
        "system:serviceaccount:kube-system:generic-garbage-collector",
        "system:serviceaccount:kube-system:namespace-controller",
        "\"moat:break-glass\"",
        "moat.dev/break-glass-reason",
        "deployments/scale",
        "securemodeldeployments/status",
    ] {
        ensure!(text.contains(needle), "the policy lacks {needle}:\n{text}");
    }
    // Every kind Moat writes as a child is matched, for create, update and delete.
    let rules = policy["spec"]["matchConstraints"]["resourceRules"]
        .as_sequence()
        .context("resourceRules")?;
    for (group, resource) in [
        ("", "serviceaccounts"),
        ("", "secrets"),
        ("", "services"),
        ("", "configmaps"),
        ("networking.k8s.io", "networkpolicies"),
        ("policy", "poddisruptionbudgets"),
        ("apps", "deployments"),
        ("moat.dev", "modelrevisions"),
    ] {
        ensure!(
            rules.iter().any(|r| strings(&r["apiGroups"]) == [group]
                && strings(&r["resources"]).iter().any(|x| x == resource)
                && strings(&r["operations"]) == ["CREATE", "UPDATE", "DELETE"]),
            "{group}/{resource} is not matched: {rules:?}"
        );
    }
    let binding = &named(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "t-moat-children.moat.dev",
    )?;
    ensure!(binding["spec"]["policyName"] == "t-moat-children.moat.dev");
    ensure!(strings(&binding["spec"]["validationActions"]) == ["Deny"]);
    ensure!(
        binding["spec"].get("matchResources").is_none(),
        "bound to a subset: {binding:?}"
    );
    // Watching some namespaces: bound there and in the release namespace (the CA) only.
    let scoped = rendered(&["--set", "watchNamespaces={team-a,team-b}"])?;
    let binding = &named(
        &scoped,
        "ValidatingAdmissionPolicyBinding",
        "t-moat-children.moat.dev",
    )?;
    let expr = &binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0];
    ensure!(
        expr["key"] == "kubernetes.io/metadata.name"
            && expr["operator"] == "In"
            && strings(&expr["values"]) == ["team-a", "team-b", "moat-system"],
        "{expr:?}"
    );
    // Another group reaches the CEL.
    let other = rendered(&["--set", "admissionPolicy.breakGlass.group=oncall"])?;
    let text = serde_yaml::to_string(
        &named(
            &other,
            "ValidatingAdmissionPolicy",
            "t-moat-children.moat.dev",
        )?["spec"],
    )?;
    ensure!(
        text.contains("\"oncall\"") && !text.contains("moat:break-glass"),
        "{text}"
    );
    // Opted out: neither.
    let off = rendered(&["--set", "admissionPolicy.enabled=false"])?;
    ensure!(
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "MutatingAdmissionPolicy",
            "MutatingAdmissionPolicyBinding"
        ]
        .iter()
        .all(|k| of_kind(&off, k).is_empty()),
        "admissionPolicy.enabled=false still renders a policy"
    );
    ok(
        helm(&[
            "lint",
            "--strict",
            CHART,
            "--set",
            "admissionPolicy.enabled=false",
        ])?,
        "helm lint --strict without the policy",
    )?;
    Ok(())
}

#[test]
fn values_that_violate_the_schema_are_rejected_with_a_readable_message() -> Result<()> {
    let cases: [(&[&str], &str); 14] = [
        (&["--set", "replicaCount=0"], "/replicaCount"),
        (&["--set", "logging.format=xml"], "/logging/format"),
        (&["--set", "image.digest=latest"], "/image/digest"),
        (&["--set", "metrics.port=80"], "/metrics/port"),
        (&["--set", "unknownKey=1"], "unknownKey"),
        (&["--set", "installCRDs=maybe"], "/installCRDs"),
        (&["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (&["--set", "ca.validity=1 year"], "/ca/validity"),
        (&["--set", "ca.secretName=My_CA"], "/ca/secretName"),
        (&["--set", "trustDomain=spiffe://x"], "/trustDomain"),
        (&["--set", "clusterDomain=.local"], "/clusterDomain"),
        (
            &["--set", "networkPolicy.metricsFromNamespaces={Bad_NS}"],
            "/networkPolicy/metricsFromNamespaces/0",
        ),
        (
            &["--set", "admissionPolicy.enabled=yes"],
            "/admissionPolicy/enabled",
        ),
        // The group is written into the policy's CEL: no quote may end its string.
        (
            &["--set", "admissionPolicy.breakGlass.group=x' || true || '"],
            "/admissionPolicy/breakGlass/group",
        ),
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
    let _turn = CLUSTER_WIDE.lock().await;
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
        // Every CRD Moat defines, so a new one is covered without editing this test.
        let crd_names: Vec<String> = moat::api::crds().iter().map(kube::ResourceExt::name_any).collect();
        for crd in &crd_names {
            crds.patch(crd, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&release_free)).await.ok();
        }
        // Without the admission policy while the release watches every namespace: bound
        // cluster-wide, it would refuse the writes of the other tests' operators (which run as
        // the admin), and a binding left by a failed run would go on refusing them. The upgrade
        // below turns it on (the default), bound to the two watched namespaces.
        ok(helm(&["install", &release, CHART, "-n", ns, "--force-conflicts", "--set", "admissionPolicy.enabled=false"])?, "helm install")?;
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
        wait_until("2 operator pods", || pods_ready(2)).await?;
        let d = deploys.get(&name).await?;
        let c = &d.spec.as_ref().and_then(|s| s.template.spec.clone()).context("pod spec")?.containers[0];
        ensure!(c.security_context.as_ref().and_then(|s| s.read_only_root_filesystem) == Some(true));
        ensure!(c.args.clone().unwrap_or_default().iter().any(|a| a == "--leader-elect"), "two replicas must elect a leader");

        // Upgrade: a third replica, and watch only two namespaces, so the rules are granted
        // there alone (RoleBindings instead of the ClusterRoleBinding).
        let other = env.another_namespace(&NamespaceOptions::restricted()).await?;
        let watch = format!("watchNamespaces={{{ns},{other}}}");
        // Here the garbage collector and namespace controller act as the admin (kwokctl).
        let controllers = moat_e2e::kubernetes_controllers_value(&moat_e2e::whoami(&env.client).await?);
        ok(helm(&["upgrade", &release, CHART, "-n", ns, "--set", "replicaCount=3", "--set", &watch, "--set", &controllers, "--force-conflicts"])?, "helm upgrade")?;
        wait_until("3 operator pods", || pods_ready(3)).await?;
        let d = deploys.get(&name).await?;
        let args = d.spec.and_then(|s| s.template.spec).map(|s| s.containers[0].args.clone().unwrap_or_default()).unwrap_or_default();
        ensure!(args.contains(&format!("--namespaces={ns},{other}")), "upgrade did not pass the namespaces: {args:?}");
        let vap = kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", "ValidatingAdmissionPolicyBinding"),
            "validatingadmissionpolicybindings",
        );
        let bindings: Api<DynamicObject> = Api::all_with(env.client.clone(), &vap);
        let binding = bindings.get(&format!("{name}-children.moat.dev")).await.context("the upgrade installs the policy's binding")?;
        ensure!(
            binding.data["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == json!([ns, other]),
            "the binding is not scoped to the watched namespaces: {:?}", binding.data["spec"]
        );

        // RBAC: the chart's ServiceAccount sees no wildcard and suffices to reconcile fully.
        let kubectl = tool("MOAT_KUBECTL")?;
        let user = format!("system:serviceaccount:{ns}:{name}");
        let can = Command::new(&kubectl).args(["auth", "can-i", "--list", "--as", &user]).output()?;
        let can = ok(can, "kubectl auth can-i --list")?;
        assert_no_wildcards(&can)?;
        for (namespace, allowed) in [(ns, "yes"), (other.as_str(), "yes"), ("default", "no")] {
            let out = Command::new(&kubectl).args(["auth", "can-i", "patch", "deployments.apps", "-n", namespace, "--as", &user]).output()?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ensure!(answer == allowed, "can-i patch deployments in {namespace}: {answer}, want {allowed}");
        }
        // The operator binary's code, with the chart ServiceAccount's token, watching the two
        // namespaces as `--namespaces` makes it, reconciles a model in each.
        let token = service_account_token(&env.client, ns, &name).await?;
        let op = env.operator().config(config_with_token(token).await?).watching(&[ns, &other]).start().await?;
        let smd = fixture::smd("model").build()?;
        let smds = env.api::<SecureModelDeployment>();
        let other_smds = kube::Api::<SecureModelDeployment>::namespaced(env.client.clone(), &other);
        smds.create(&PostParams::default(), &smd).await?;
        other_smds.create(&PostParams::default(), &smd).await?;
        for api in [&smds, &other_smds] {
            wait_ready(api, "model").await.context("Ready with the chart's RBAC")?;
        }
        // The aggregated roles: a user bound to the built-in `edit` role may create models and
        // ModelClients; one bound to `view` may read them but not create them.
        aggregated_roles_allow_edit_and_view(&env).await?;

        let errors = op.metrics.encode()?;
        ensure!(!errors.contains("moat_reconcile_errors_total{"), "errors with the chart's RBAC:\n{errors}");
        drop(op);

        // Uninstall removes the operator but never the CRDs, so models survive.
        ok(helm(&["uninstall", &release, "-n", ns])?, "helm uninstall")?;
        wait_until("the operator Deployment to go", || async { Ok(deploys.get_opt(&name).await?.is_none()) }).await?;
        ensure!(bindings.get_opt(&format!("{name}-children.moat.dev")).await?.is_none(), "helm uninstall left the policy's binding");
        for crd in &crd_names {
            if crds.get_opt(crd).await?.is_none() {
                bail!("helm uninstall deleted the CRD {crd}");
            }
        }
        ensure!(smds.get_opt("model").await?.is_some(), "the model did not survive helm uninstall");
        Ok(())
    })
    .await;
}

/// Fails when a row of `kubectl auth can-i --list` has a `*` in its resource or verbs column.
fn assert_no_wildcards(can_i: &str) -> Result<()> {
    let rows = can_i_rows(can_i)?;
    ensure!(!rows.is_empty(), "no rows in:\n{can_i}");
    for row in &rows {
        ensure!(
            !row.resource.contains('*') && row.verbs.iter().all(|v| !v.contains('*')),
            "wildcard in {row:?} of:\n{can_i}"
        );
    }
    Ok(())
}

async fn aggregated_roles_allow_edit_and_view(env: &moat_e2e::TestEnv) -> Result<()> {
    use k8s_openapi::api::{core::v1::ServiceAccount, rbac::v1::RoleBinding};
    let ns = env.namespace.as_str();
    for (user, role) in [("editor", "edit"), ("viewer", "view")] {
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": user}}))?;
        env.api::<ServiceAccount>()
            .create(&PostParams::default(), &sa)
            .await?;
        let rb: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}]
        }))?;
        env.api::<RoleBinding>()
            .create(&PostParams::default(), &rb)
            .await?;
    }
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let smd = fixture::smd("by-a-user").build()?;
    let mc = fixture::model_client("by-a-user", ns, "model")
        .service_account("checkout")
        .secret("model-client")
        .build()?;
    let editor = client_as_service_account(&env.client, ns, "editor").await?;
    let viewer = client_as_service_account(&env.client, ns, "viewer").await?;
    let (editor_smds, editor_mcs) = (
        Api::<SecureModelDeployment>::namespaced(editor.clone(), ns),
        Api::<ModelClient>::namespaced(editor, ns),
    );
    let (viewer_smds, viewer_mcs) = (
        Api::<SecureModelDeployment>::namespaced(viewer.clone(), ns),
        Api::<ModelClient>::namespaced(viewer, ns),
    );
    // The clusterrole-aggregation controller copies the chart's rules into edit and view.
    wait_until("edit to create models and ModelClients", || async {
        editor_smds.create(&dry_run, &smd).await?;
        editor_mcs.create(&dry_run, &mc).await?;
        Ok(true)
    })
    .await?;
    wait_until("view to read models and ModelClients", || async {
        viewer_smds.get("model").await?;
        viewer_mcs.list(&ListParams::default()).await?;
        Ok(true)
    })
    .await?;
    for (what, result) in [
        (
            "a SecureModelDeployment",
            viewer_smds.create(&dry_run, &smd).await.map(|_| ()),
        ),
        (
            "a ModelClient",
            viewer_mcs.create(&dry_run, &mc).await.map(|_| ()),
        ),
    ] {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => bail!("view created {what}: {other:?}"),
        }
    }
    Ok(())
}

/// The model `fraud`: `replicas` replicas serving on port 8443, allowing `clients`.
fn model(replicas: i32, clients: Value) -> Result<SecureModelDeployment> {
    Ok(fixture::smd("fraud")
        .replicas(replicas)
        .port(8443)
        .clients(clients)
        .build()?)
}

fn pem(secret: &Secret, key: &str) -> Result<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .with_context(|| format!("no {key}"))
}

fn first_certificate(secret: &Secret) -> Result<Vec<u8>> {
    moat::pki::pem_certificates(&pem(secret, "tls.crt")?)
        .into_iter()
        .next()
        .context("no certificate in tls.crt")
}

/// The DNS names and URIs in a certificate's subjectAltName.
fn sans(der: &[u8]) -> Result<Vec<String>> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ext = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .context("no subjectAltName")?;
    Ok(ext
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_string()),
            GeneralName::URI(u) => Some((*u).to_string()),
            _ => None,
        })
        .collect())
}

/// A stale child of `fraud` (labelled as Moat's and controlled by the model, as one left by an
/// earlier Moat version that rendered other names): the prune step must delete it.
fn stale_child(kind: &str, owner_uid: &str) -> Result<(ApiResourceOf, Value)> {
    let meta = json!({
        "name": "fraud-stale",
        "labels": {"app.kubernetes.io/managed-by": "moat", "moat.dev/deployment": "fraud"},
        "ownerReferences": [{"apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment",
                             "name": "fraud", "uid": owner_uid, "controller": true}]
    });
    let labels = json!({"app": "stale"});
    Ok(match kind {
        "ServiceAccount" => (
            ("", "v1", "ServiceAccount", "serviceaccounts"),
            json!({"metadata": meta}),
        ),
        "Secret" => (
            ("", "v1", "Secret", "secrets"),
            json!({"metadata": meta, "type": "Opaque"}),
        ),
        "ConfigMap" => (
            ("", "v1", "ConfigMap", "configmaps"),
            json!({"metadata": meta, "data": {"policy.json": "{}"}}),
        ),
        "Service" => (
            ("", "v1", "Service", "services"),
            json!({"metadata": meta, "spec": {"ports": [{"port": 8443}], "selector": labels}}),
        ),
        "NetworkPolicy" => (
            (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
            json!({"metadata": meta, "spec": {"podSelector": {"matchLabels": labels}}}),
        ),
        "Deployment" => (
            ("apps", "v1", "Deployment", "deployments"),
            json!({"metadata": meta, "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels},
                             "spec": {"containers": [{"name": "c", "image": "registry.example.com/m:v1"}]}}}}),
        ),
        other => bail!("no stale {other}"),
    })
}

/// (group, version, kind, plural)
type ApiResourceOf = (&'static str, &'static str, &'static str, &'static str);

fn dynamic_api(client: &kube::Client, ns: &str, r: ApiResourceOf) -> Api<DynamicObject> {
    let (group, version, kind, plural) = r;
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let ar = kube::core::ApiResource::from_gvk_with_plural(&gvk, plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Least privilege, derived rather than listed: the chart is installed, the real `moat` binary
/// runs out of cluster exactly as the chart's Deployment would run it (its arguments and
/// environment, rendered by `helm template` with the same values) with a TokenRequest token of
/// the chart's ServiceAccount, and is driven through every code path that needs a permission.
/// Every request it made is then read back from the API server's audit log and compared with the
/// rules the chart binds to that ServiceAccount, both ways: each request must be allowed (else
/// the chart is insufficient), and each granted permission must have been used (else the chart
/// grants more than the code needs).
///
/// The binary is built by `cargo build --bin moat` from the test (`moat_e2e::moat_binary`), with
/// the cargo, profile and target directory running the tests.
#[tokio::test]
async fn the_charts_rbac_is_exactly_what_the_moat_binary_uses() {
    let _turn = CLUSTER_WIDE.lock().await;
    with_namespace("chart-rbac", NamespaceOptions::restricted(), |env| async move {
        let admin = env.client.clone();
        install_crds(&admin).await?;
        let ns = env.namespace.clone();
        let models = env.another_namespace(&NamespaceOptions::restricted()).await?;
        let clients = env.another_namespace(&NamespaceOptions::restricted()).await?;
        let release = format!("r{}", &ns[ns.len() - 5..]);
        let sa = format!("{release}-moat");
        // Default values (all namespaces, two replicas, leader election), except: the CRDs are
        // already installed, and a CA valid for 60 s, so that its rotation (at 40 s) happens
        // during the test; custom CA Secret name, trust and cluster domains, checked below in
        // the certificates the binary issues.
        // The operator's image by digest, as the helper image of the encrypted model below
        // (a tag would be resolved in a registry, and none answers here).
        let digest = format!("image.digest={}", moat_e2e::HELPER_IMAGE.split_once('@').map(|p| p.1).unwrap_or_default());
        // Without the admission policy: this test changes Moat's children as the admin (stale
        // children to prune, a drift to repair) to drive the binary's code paths, and a binding
        // for all namespaces would refuse other tests' operators too (tests/admission.rs tests
        // the policy, scoped to its namespace).
        let values = [
            "--set", "installCRDs=false",
            "--set", "admissionPolicy.enabled=false",
            "--set", digest.as_str(),
            "--set", "model.encryptedStorageClasses={encrypted-ssd}",
            "--set", "ca.secretName=rbac-ca",
            "--set", "ca.validity=60s",
            "--set", "trustDomain=rbac.example",
            "--set", "clusterDomain=cluster.example",
        ];
        let mut install = vec!["install", release.as_str(), CHART, "-n", ns.as_str()];
        install.extend_from_slice(&values);
        ok(helm(&install)?, "helm install")?;
        let docs = render(&release, &ns, &values)?;
        let grants = grants_to(&docs, &ns, &sa)?;

        // The operator container's arguments and environment, as the chart renders them; only
        // the listen addresses move to loopback.
        let container = &docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .context("the operator Deployment")?["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = strings(&container["args"])
            .into_iter()
            .map(|a| match a.split_once('=') {
                Some(("--metrics-addr" | "--health-probe-addr", _)) => {
                    format!("{}=127.0.0.1:0", a.split_once('=').map(|p| p.0).unwrap_or_default())
                }
                _ => a,
            })
            .collect();
        ensure!(args.iter().any(|a| a == "--leader-elect"), "the chart does not elect a leader: {args:?}");
        let identity = "rbac-test-operator";
        let mut envs: Vec<(String, String)> = Vec::new();
        for e in container["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().context("env name")?.to_string();
            let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Some(v), _) => v.to_string(),
                (None, Some("metadata.name")) => identity.to_string(),
                (None, Some("metadata.namespace")) => ns.clone(),
                _ => bail!("cannot reproduce the operator's env {e:?} out of cluster"),
            };
            envs.push((name, value));
        }
        let dir = std::env::temp_dir().join(format!("moat-e2e-{ns}"));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let token = service_account_token(&admin, &ns, &sa).await?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&kubeconfig)?
                .write_all(kubeconfig_with_token(&token)?.as_bytes())?;
        }
        let user = format!("system:serviceaccount:{ns}:{sa}");
        let from = audit_offset()?;
        let env_refs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        eprintln!("running {} {}", moat_e2e::moat_binary()?.display(), args.join(" "));
        let op = MoatProcess::spawn(&kubeconfig, &args, &env_refs, &dir.join("operator.log"))?;
        let driven = drive(&admin, &op, &ns, &models, &clients, &sa, identity, &user, from)
            .await
            .and(op.check_running().context("the operator died during the test"))
            .with_context(|| format!("operator log: {}", op.log.display()));
        op.stop();
        // The process is gone; the API server logs the end of each of its requests when it
        // notices the closed connection. Wait until every watch it had open is logged as
        // complete (the last requests to end), rather than for a fixed time.
        wait_until("the killed binary's requests to be logged as complete", || async {
            let entries = audit_entries(&user, from)?;
            let completed: BTreeSet<&str> = entries
                .iter()
                .filter(|e| e["stage"] == "ResponseComplete")
                .filter_map(|e| e["auditID"].as_str())
                .collect();
            Ok(entries
                .iter()
                .filter(|e| e["stage"] == "ResponseStarted")
                .filter_map(|e| e["auditID"].as_str())
                .all(|id| completed.contains(id)))
        })
        .await?;

        // What it did, from the audit log.
        let entries = audit_entries(&user, from)?;
        let forbidden: Vec<String> = entries
            .iter()
            .filter(|e| e["annotations"]["authorization.k8s.io/decision"] == "forbid")
            .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
            .collect();
        let (needs, non_resource) = needs_of(&entries);
        let mut observed: BTreeMap<Access, BTreeSet<String>> = BTreeMap::new();
        for n in &needs {
            observed
                .entry(n.access.clone())
                .or_default()
                .insert(n.namespace.clone().unwrap_or_else(|| "<all namespaces>".into()));
        }
        eprintln!("{} requests by {user}; permissions they needed:", entries.len());
        for (access, where_) in &observed {
            eprintln!("  {access:<55} in {}", where_.iter().cloned().collect::<Vec<_>>().join(", "));
        }
        if !non_resource.is_empty() {
            eprintln!("non-resource requests (the built-in discovery roles allow them): {non_resource:?}");
        }
        let mut missing: BTreeSet<String> = BTreeSet::new();
        for n in &needs {
            if !grants.iter().any(|g| g.allows(n)) {
                missing.insert(format!(
                    "{} in {}",
                    n.access,
                    n.namespace.as_deref().unwrap_or("<all namespaces>")
                ));
            }
        }
        let mut unused: BTreeSet<String> = BTreeSet::new();
        for g in &grants {
            if !needs.iter().any(|n| g.allows(n)) {
                unused.insert(format!("{}: {}", g.role, g.access));
            }
        }
        eprintln!("requests the chart does not allow: {missing:#?}");
        eprintln!("permissions the chart grants that were not used: {unused:#?}");
        eprintln!("requests the API server refused: {forbidden:#?}");
        // A code path that failed (for want of a permission, say) fails the test first; the
        // comparison above says which permission.
        driven?;
        ensure!(entries.len() > 50, "only {} audit entries for {user}", entries.len());
        ensure!(forbidden.is_empty(), "the API server refused: {forbidden:#?}");
        ensure!(missing.is_empty(), "the chart does not allow what the operator does: {missing:#?}");
        ensure!(unused.is_empty(), "the chart grants more than the operator uses: {unused:#?}");

        // No wildcard anywhere the ServiceAccount is allowed something, and none in the Lease Role.
        let kubectl = tool("MOAT_KUBECTL")?;
        for namespace in [&ns, &models, &clients] {
            let out = Command::new(&kubectl)
                .args(["auth", "can-i", "--list", "-n", namespace, "--as", &user])
                .output()?;
            assert_no_wildcards(&ok(out, "kubectl auth can-i --list")?)?;
        }
        let lease_role = format!("Role/{ns}/{sa}-leader-election");
        let lease: Vec<&Grant> = grants.iter().filter(|g| g.role == lease_role).collect();
        ensure!(!lease.is_empty(), "no {lease_role}");
        for g in lease {
            ensure!(
                g.access.group == "coordination.k8s.io"
                    && g.access.resource == "leases"
                    && !g.access.verb.contains('*')
                    && g.resource_names.iter().all(|n| !n.contains('*')),
                "{lease_role} grants {}",
                g.access
            );
        }
        ok(helm(&["uninstall", &release, "-n", &ns])?, "helm uninstall")?;
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    })
    .await;
}

/// Every code path of the operator that needs a permission, against the running binary.
/// `user` and `from`: the binary's user name and where its entries start in the audit log.
#[allow(clippy::too_many_arguments)]
async fn drive(
    admin: &kube::Client,
    op: &MoatProcess,
    ns: &str,
    models: &str,
    clients: &str,
    sa: &str,
    identity: &str,
    user: &str,
    from: u64,
) -> Result<()> {
    // Leader election: the binary takes the chart's Lease (get, create, patch).
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    wait_until("the binary to take the Lease", || async {
        op_alive(op)?;
        Ok(leases
            .get_opt(sa)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| h.starts_with(&format!("{identity}_"))))
    })
    .await?;

    // The CA: created in the release namespace under the chart's name for it.
    let ca_secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    wait_until("the CA Secret rbac-ca", || async {
        Ok(ca_secrets.get_opt("rbac-ca").await?.is_some())
    })
    .await?;
    let first_ca = first_certificate(&ca_secrets.get("rbac-ca").await?)?;

    // A model with two replicas: every child, the PDB and the serving Secret; Events.
    let smds: Api<SecureModelDeployment> = Api::namespaced(admin.clone(), models);
    let clients_allowed = json!([{"namespace": clients, "serviceAccounts": ["checkout"]}]);
    smds.create(&PostParams::default(), &model(2, clients_allowed)?)
        .await?;
    let ready = || async {
        op_alive(op)?;
        Ok(is_ready(&smds.get("fraud").await?))
    };
    wait_until("fraud Ready", ready).await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), models);
    ensure!(
        pdbs.get_opt("fraud").await?.is_some(),
        "no PodDisruptionBudget at 2 replicas"
    );
    let serving: Api<Secret> = Api::namespaced(admin.clone(), models);
    let names = sans(&first_certificate(&serving.get("fraud-tls").await?)?)?;
    let want = format!("fraud.{models}.svc.cluster.example");
    ensure!(
        names.contains(&want),
        "clusterDomain did not reach the serving certificate: {names:?}"
    );

    // One replica: the PDB is pruned.
    smds.patch(
        "fraud",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await?;
    wait_until("the PDB pruned", || async {
        op_alive(op)?;
        Ok(pdbs.get_opt("fraud").await?.is_none())
    })
    .await?;

    // New revisions (ModelRevisions created, listed), two kept: the oldest is deleted.
    let revisions: Api<moat::api::ModelRevision> = Api::namespaced(admin.clone(), models);
    for n in 2..=3 {
        smds.patch(
            "fraud",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rollout": {"revisionHistoryLimit": 2},
                                          "server": {"args": ["--revision", n.to_string()]}}})),
        )
        .await?;
        wait_until(&format!("revision {n} Ready"), ready).await?;
    }
    wait_until("the oldest revision pruned", || async {
        op_alive(op)?;
        let kept = revisions
            .list(&ListParams::default().labels("moat.dev/model=fraud"))
            .await?;
        Ok(kept.items.len() == 2 && kept.items.iter().all(|r| r.spec.revision >= 2))
    })
    .await?;

    // Two-person approval (one here): a new revision waits, Moat lists the ModelApprovals and
    // records the one that counts in the revision's status, then it goes live.
    smds.patch(
        "fraud",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"approval": {"required": 1}, "server": {"args": ["--revision", "4"]}}}),
        ),
    )
    .await?;
    let awaiting = moat_e2e::wait_for_value(
        moat_e2e::DEADLINE,
        "revision 4 awaiting approval",
        || async {
            op_alive(op)?;
            Ok(smds
                .get("fraud")
                .await?
                .status
                .and_then(|s| s.revisions)
                .and_then(|r| r.awaiting))
        },
    )
    .await?;
    let fourth = revisions.get(&awaiting.revision.name).await?;
    let approver = moat_e2e::whoami(admin).await?;
    let approval: moat::api::ModelApproval = serde_json::from_value(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "ModelApproval", "metadata": {"name": "fraud-4"},
        "spec": {"model": "fraud", "revision": kube::ResourceExt::name_any(&fourth), "image": fourth.spec.image, "approver": approver}
    }))?;
    Api::<moat::api::ModelApproval>::namespaced(admin.clone(), models)
        .create(&PostParams::default(), &approval)
        .await?;
    wait_until("revision 4 approved and Ready", ready).await?;

    // Stale children of every other kind are pruned too, one after the other (their `Deleted`
    // Events about the same model then form a series: an Event patch).
    let uid = smds.get("fraud").await?.metadata.uid.context("uid")?;
    for kind in [
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "Service",
        "NetworkPolicy",
        "Deployment",
    ] {
        let (resource, body) = stale_child(kind, &uid)?;
        let api = dynamic_api(admin, models, resource);
        api.create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;
        wait_until(&format!("the stale {kind} pruned"), || async {
            op_alive(op)?;
            Ok(api.get_opt("fraud-stale").await?.is_none())
        })
        .await?;
    }

    // A ModelClient in another namespace the model allows: its Secret there, its status.
    let mcs: Api<ModelClient> = Api::namespaced(admin.clone(), clients);
    let mc = fixture::model_client("checkout", models, "fraud")
        .secret("fraud-client")
        .build()?;
    mcs.create(&PostParams::default(), &mc).await?;
    wait_until("the ModelClient Ready", || async {
        op_alive(op)?;
        Ok(mcs.get("checkout").await?.status.is_some_and(|s| {
            conditions::is_true(&s.conditions, conditions::READY) && s.certificate.is_some()
        }))
    })
    .await?;
    let client_secrets: Api<Secret> = Api::namespaced(admin.clone(), clients);
    let names = sans(&first_certificate(
        &client_secrets.get("fraud-client").await?,
    )?)?;
    let want = format!("spiffe://rbac.example/ns/{clients}/sa/checkout");
    ensure!(
        names.contains(&want),
        "trustDomain did not reach the client certificate: {names:?}"
    );
    // The consented identity reaches the gate's policy, and the new policy is announced to the
    // model's pods (an annotation: the kubelet then refreshes their ConfigMap volume).
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), models);
    wait_until("the gate policy announced to the pods", || async {
        op_alive(op)?;
        let status = smds.get_status("fraud").await?.status;
        let admitted = status
            .and_then(|s| s.gate)
            .is_some_and(|g| g.identities.contains(&want));
        let pods = pods
            .list(&ListParams::default().labels("moat.dev/deployment=fraud"))
            .await?;
        Ok(admitted
            && !pods.items.is_empty()
            && pods
                .items
                .iter()
                .any(|p| kube::ResourceExt::annotations(p).contains_key("moat.dev/gate-policy")))
    })
    .await?;

    // Drift: a rule added by another field manager is taken over (merge patch of managedFields)
    // and removed; the repair is counted in the status (read fresh through /status).
    let nps: Api<NetworkPolicy> = Api::namespaced(admin.clone(), models);
    let rules = |np: NetworkPolicy| {
        np.spec
            .and_then(|s| s.ingress)
            .map(|i| i.len())
            .unwrap_or(0)
    };
    let before = rules(nps.get("fraud-allow").await?);
    let add = json!([{"op": "add", "path": "/spec/ingress/-", "value": {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}}]);
    nps.patch(
        "fraud-allow",
        &PatchParams::default(),
        &Patch::<Value>::Json(serde_json::from_value(add)?),
    )
    .await?;
    wait_until("the added rule removed", || async {
        op_alive(op)?;
        Ok(rules(nps.get("fraud-allow").await?) == before)
    })
    .await?;
    wait_until("the repair in status.drift", || async {
        Ok(smds
            .get("fraud")
            .await?
            .status
            .and_then(|s| s.drift)
            .is_some_and(|d| d.repairs >= 1))
    })
    .await?;

    // An encrypted model from a PVC on an encrypted StorageClass, with crypto-shredding: the key
    // Secret is read and gets the model as owner, the claim is read, and the pods are listed
    // while they roll out (the init container's state).
    let key: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "weights-key"},
        "stringData": {"identity": "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"}
    }))?;
    Api::<Secret>::namespaced(admin.clone(), models)
        .create(&PostParams::default(), &key)
        .await?;
    let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "weights-store"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "encrypted-ssd",
                 "resources": {"requests": {"storage": "1Gi"}}}
    }))?;
    Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(admin.clone(), models)
        .create(&PostParams::default(), &claim)
        .await?;
    let mut weights = serde_json::to_value(model(1, json!([]))?)?;
    weights["metadata"]["name"] = json!("weights");
    // Room for the 1Gi of plaintext and the server beside it.
    weights["spec"]["server"]["resources"]["limits"]["memory"] = json!("2Gi");
    weights["spec"]["model"] = json!({
        "source": {"pvc": {"claimName": "weights-store", "path": "fraud.tar.age"}},
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "decryptionKeySecretRef": {"name": "weights-key", "key": "identity"},
        "mountPath": "/models/fraud", "sizeLimit": "1Gi", "deleteKeyWithDeployment": true
    });
    smds.create(&PostParams::default(), &serde_json::from_value(weights)?)
        .await?;
    let keys: Api<Secret> = Api::namespaced(admin.clone(), models);
    wait_until("the key Secret owned by its model", || async {
        op_alive(op)?;
        Ok(!kube::ResourceExt::owner_references(&keys.get("weights-key").await?).is_empty())
    })
    .await?;
    wait_until("the model's Deployment", || async {
        op_alive(op)?;
        Ok(
            Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), models)
                .get_opt("weights")
                .await?
                .is_some(),
        )
    })
    .await?;
    // Its pods wait for the claim to bind (no provisioner here): the operator keeps looking at
    // their init containers. Wait until the audit log shows it listing them.
    wait_until("the binary to list the model's pods", || async {
        op_alive(op)?;
        Ok(audit_entries(user, from)?.iter().any(|e| {
            e["verb"] == "list"
                && e["objectRef"]["resource"] == "pods"
                && e["objectRef"]["namespace"].as_str() == Some(models)
        }))
    })
    .await?;

    // Consent withdrawn: the client Secret is deleted, the ModelClient says why.
    smds.patch(
        "fraud",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"access": {"clients": []}}})),
    )
    .await?;
    wait_until("the client Secret deleted", || async {
        op_alive(op)?;
        Ok(client_secrets.get_opt("fraud-client").await?.is_none())
    })
    .await?;

    // CA rotation at two thirds of its 60 s: the CA Secret is replaced (update).
    wait_until("the CA rotated", || async {
        op_alive(op)?;
        Ok(first_certificate(&ca_secrets.get("rbac-ca").await?)? != first_ca)
    })
    .await?;
    // The rotation re-issues the serving certificate from the new CA (Ready alone held before
    // it). The CA in use is read each time: it rotates again every 40 s.
    wait_until(
        "the serving certificate re-issued by the new CA",
        || async {
            op_alive(op)?;
            let ca = ca_secrets.get("rbac-ca").await?;
            Ok(first_certificate(&ca)? != first_ca
                && moat::pki::issued_by(
                    &pem(&serving.get("fraud-tls").await?, "tls.crt")?,
                    &pem(&ca, "tls.crt")?,
                ))
        },
    )
    .await?;
    wait_until("fraud Ready after the rotation", ready).await?;
    Ok(())
}

fn op_alive(op: &MoatProcess) -> Result<()> {
    op.check_running()
}

/// The host processes of the container `container` of pod `uid` on the real node, found by the
/// kubelet's cgroups (`/sys/fs/cgroup/pids/<cgroup root>/kubepods/.../pod<uid>/<container id>`)
/// and named by their command line: (pid, command line with spaces).
fn container_processes(uid: &str, program: &str) -> Result<Vec<(u32, String)>> {
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/pids/{}/kubepods",
        tool("MOAT_NODE_CGROUP")?
    ));
    let mut pending = vec![root];
    let mut found = Vec::new();
    while let Some(dir) = pending.pop() {
        // Pods come and go while this walks: a directory gone is skipped.
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == format!("pod{uid}"))
            {
                for container in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let procs = container.path().join("cgroup.procs");
                    for pid in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
                        let Ok(pid) = pid.trim().parse::<u32>() else {
                            continue;
                        };
                        let cmdline =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                        if cmdline.starts_with(program) {
                            found.push((pid, cmdline.trim().to_string()));
                        }
                    }
                }
            } else {
                pending.push(path);
            }
        }
    }
    Ok(found)
}

/// High availability on real pods: Helm installs the chart with Moat's image (from the local
/// cluster's registry, by digest) and the operator runs as two leader-elected pods on the real
/// node, under the chart's ServiceAccount, RBAC and NetworkPolicy. It reconciles a model. Then
/// the leader's process is killed (SIGKILL, from this machine: no Lease release, no goodbye), and
/// in that moment a NetworkPolicy of the model is deleted. A new process takes the Lease once it
/// expires and repairs the drift; the killed container is restarted by the kubelet.
#[tokio::test]
async fn the_operator_runs_as_pods_and_a_killed_leader_hands_over() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::ResourceExt;
    let _turn = CLUSTER_WIDE.lock().await;
    with_namespace("chart-ha", NamespaceOptions::restricted().on_real_node(), |env| async move {
        install_crds(&env.client).await?;
        let ns = env.namespace.clone();
        let models = env.another_namespace(&NamespaceOptions::restricted()).await?;
        let release = format!("r{}", &ns[ns.len() - 5..]);
        let name = format!("{release}-moat");
        let image = moat_e2e::real_node_moat_image()?;
        let (repository, digest) = image.split_once('@').context("a pinned image")?;
        // The port the API server's endpoint listens on: policies see it after the Service's
        // translation.
        let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), "default");
        let slice = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
            .await?
            .items
            .into_iter()
            .next()
            .context("the kubernetes Service's EndpointSlice")?;
        let api_port = slice.ports.into_iter().flatten().find_map(|p| p.port).context("its port")?;
        let values = [
            "--set".to_string(), "installCRDs=false".into(),
            "--set".into(), format!("image.repository={repository}"),
            "--set".into(), format!("image.digest={digest}"),
            "--set".into(), format!("watchNamespaces={{{ns},{models}}}"),
            "--set".into(), format!("networkPolicy.apiServerPorts={{{api_port}}}"),
            "--set".into(), "leaderElection.leaseDurationSeconds=8".into(),
            "--set".into(), "logging.format=text".into(),
            // The test deletes the model's NetworkPolicies as the admin while no leader runs.
            "--set".into(), "admissionPolicy.enabled=false".into(),
        ];
        let mut install = vec!["install", release.as_str(), CHART, "-n", ns.as_str()];
        install.extend(values.iter().map(String::as_str));
        ok(helm(&install)?, "helm install")?;

        let pods = env.api::<Pod>();
        let selector = format!("app.kubernetes.io/instance={release}");
        let ready_pods = || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                Ok::<_, anyhow::Error>(pods
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .into_iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                    })
                    .collect::<Vec<_>>())
            }
        };
        wait_until("2 operator pods running and ready on the real node", || async {
            Ok(ready_pods().await?.len() == 2)
        })
        .await?;
        for p in ready_pods().await? {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            ensure!(node == tool("MOAT_NODE_NAME")?, "operator pod {} runs on {node}", p.name_any());
        }
        let leases: Api<Lease> = env.api();
        let holder = || {
            let leases = leases.clone();
            let name = name.clone();
            async move {
                Ok::<_, anyhow::Error>(leases
                    .get_opt(&name)
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .filter(|h| !h.is_empty()))
            }
        };
        let leader = moat_e2e::wait_for_value(moat_e2e::DEADLINE, "a leader", holder).await?;
        let leader_pod = leader.rsplit_once('_').map(|p| p.0).unwrap_or(&leader).to_string();

        let smds: Api<SecureModelDeployment> = Api::namespaced(env.client.clone(), &models);
        smds.create(&PostParams::default(), &fixture::smd("model").build()?).await?;
        wait_ready(&smds, "model").await.context("Ready, reconciled by the in-cluster operator")?;
        let policies: Api<NetworkPolicy> = Api::namespaced(env.client.clone(), &models);
        let model_policies = ListParams::default().labels("moat.dev/deployment=model");
        let want = policies.list(&model_policies).await?.items.len();
        ensure!(want > 0, "the model has no NetworkPolicy");

        // Kill the leader's process, and change the model's children while nobody leads.
        let pod = pods.get(&leader_pod).await?;
        let uid = pod.uid().context("pod uid")?;
        let restarts_before = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count);
        let procs = container_processes(&uid, "/moat operator")?;
        ensure!(procs.len() == 1, "the leader's operator process: {procs:?}");
        ensure!(
            holder().await?.as_deref() == Some(leader.as_str()),
            "the Lease moved before the kill"
        );
        let killed = std::time::Instant::now();
        let kill = Command::new("kill").args(["-KILL", &procs[0].0.to_string()]).status()?;
        ensure!(kill.success(), "kill -KILL {}", procs[0].0);
        for p in policies.list(&model_policies).await?.items {
            policies.delete(&p.name_any(), &Default::default()).await?;
        }

        let new_leader = moat_e2e::wait_for_value(moat_e2e::DEADLINE, "a new leader", || async {
            Ok(holder().await?.filter(|h| *h != leader))
        })
        .await?;
        let took_over = killed.elapsed();
        wait_until("the deleted NetworkPolicies back", || async {
            Ok(policies.list(&model_policies).await?.items.len() == want)
        })
        .await?;
        let repaired = killed.elapsed();
        wait_ready(&smds, "model").await?;
        wait_until("the killed container restarted", || async {
            let p = pods.get(&leader_pod).await?;
            Ok(p.status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.first().map(|c| c.restart_count))
                .is_some_and(|n| n > restarts_before))
        })
        .await?;
        // Either new process may win: the standby replica, or the killed pod's restarted
        // container (a new identity, with none of the old one's state).
        let winner = if new_leader.starts_with(&format!("{leader_pod}_")) {
            "the killed pod's restarted container"
        } else {
            "the standby replica"
        };
        eprintln!(
            "leader {leader} killed; {new_leader} ({winner}) took the Lease after {took_over:?}, the drift was repaired after {repaired:?}"
        );
        ok(helm(&["uninstall", &release, "-n", &ns])?, "helm uninstall")?;
        Ok(())
    })
    .await;
}
