//! Tamper prevention at admission, against the local control plane: the chart's
//! ValidatingAdmissionPolicy (`charts/moat/templates/admissionpolicy.yaml`) installed by Helm,
//! and the operator's code running with the chart's ServiceAccount token (the identity the
//! policy lets through).
//!
//! The release watches only the test's namespace, so the policy binds there alone: a binding
//! left behind by a failed run names a namespace that is gone, and never touches another test.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Secret},
    networking::v1::NetworkPolicy,
    rbac::v1::RoleBinding,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use moat::{api::SecureModelDeployment, fixture};
use moat_e2e::{
    NamespaceOptions, audit_entries_since, audit_offset, client_as_user, config_with_token,
    install_crds, kubernetes_controllers_value, service_account_token, tool, wait_event,
    wait_ready, wait_smd, wait_until, whoami, with_namespace,
};
use serde_json::json;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/moat");
const REASON_KEY: &str = "moat.dev/break-glass-reason";
const BREAK_GLASS_GROUP: &str = "moat:break-glass";

fn helm(args: &[&str]) -> Result<String> {
    let helm = tool("MOAT_HELM")?;
    let out = Command::new(&helm)
        .args(args)
        .output()
        .with_context(|| format!("running {helm}"))?;
    ensure!(
        out.status.success(),
        "helm {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chart installed as release `r<namespace suffix>` in the test's namespace, watching it, with
/// the extra `--set` value `extra`, and Moat run with the chart's ServiceAccount token (so the
/// API server sees the identity the policy lets through). Returns the release, the
/// ServiceAccount's name and the running operator.
async fn install_chart_and_run_moat(
    env: &moat_e2e::TestEnv,
    extra: &str,
) -> Result<(String, String, moat_e2e::Operator)> {
    let ns = &env.namespace;
    let release = format!("r{}", &ns[ns.len() - 5..]);
    let sa = format!("{release}-moat");
    helm(&[
        "install",
        &release,
        CHART,
        "-n",
        ns,
        "--set",
        "installCRDs=false",
        "--set",
        &format!("watchNamespaces={{{ns}}}"),
        "--set",
        "replicaCount=1",
        "--set",
        extra,
    ])?;
    let token = service_account_token(&env.client, ns, &sa).await?;
    // As the chart's Deployment runs it: told that the author policy is installed with it.
    let author_policy = extra != "admissionPolicy.enabled=false";
    let op = env
        .operator()
        .config(config_with_token(token).await?)
        .settings(|s| s.spec_author_policy = author_policy)
        .start()
        .await?;
    Ok((release, sa, op))
}

/// The API server's refusal of `result`: a 403 whose message names the model to edit instead.
fn refused<T: std::fmt::Debug>(what: &str, result: kube::Result<T>) -> Result<String> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {
            ensure!(
                s.message.contains("ValidatingAdmissionPolicy")
                    && s.message.contains("edit SecureModelDeployment fraud"),
                "{what}: refused, but not by Moat's policy with its message: {}",
                s.message
            );
            Ok(s.message)
        }
        other => bail!("{what} was not refused: {other:?}"),
    }
}

/// `kubectl` as the user `user`, with `extra` environment; (succeeded, stdout + stderr).
fn kubectl_as(user: &str, args: &[&str], extra: &[(&str, &str)]) -> Result<(bool, String)> {
    let kubectl = tool("MOAT_KUBECTL")?;
    let out = Command::new(&kubectl)
        .args(args)
        .args(["--as", user])
        .envs(extra.iter().copied())
        .output()
        .with_context(|| format!("running {kubectl}"))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Binds the built-in `edit` ClusterRole to the user `user` in `ns`.
async fn bind_edit(env: &moat_e2e::TestEnv, user: &str) -> Result<()> {
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-edit")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))?;
    env.api::<RoleBinding>()
        .create(&PostParams::default(), &rb)
        .await?;
    // The binding reaches the API server's authorizer a moment later: wait until the user may
    // read the namespace's Deployments, so a refusal after this is the policy's, not RBAC's.
    let deployments: Api<Deployment> =
        Api::namespaced(client_as_user(user, &[]).await?, &env.namespace);
    moat_e2e::wait_for_value(
        moat_e2e::DEADLINE,
        "the edit role to take effect",
        || async { Ok(deployments.list(&ListParams::default().limit(1)).await.ok()) },
    )
    .await?;
    Ok(())
}

/// Binds the chart's approve role `role` to `user` in the test namespace, and waits until it
/// takes effect.
async fn bind_approver(env: &moat_e2e::TestEnv, user: &str, role: &str) -> Result<()> {
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-approve")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))?;
    env.api::<RoleBinding>()
        .create(&PostParams::default(), &rb)
        .await?;
    let approvals: Api<moat::api::ModelApproval> =
        Api::namespaced(client_as_user(user, &[]).await?, &env.namespace);
    moat_e2e::wait_for_value(
        moat_e2e::DEADLINE,
        "the approve role to take effect",
        || async { Ok(approvals.list(&ListParams::default().limit(1)).await.ok()) },
    )
    .await?;
    Ok(())
}

/// The value of `moat_break_glass_total` for `kind` of the model `fraud` in `ns` (0: absent).
fn break_glass_count(op: &moat_e2e::Operator, ns: &str, kind: &str) -> Result<u64> {
    let prefix =
        format!("moat_break_glass_total{{namespace=\"{ns}\",name=\"fraud\",kind=\"{kind}\"}} ");
    Ok(op
        .metrics
        .encode()?
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0))
}

/// A user bound to `edit` is refused each way of changing a model's children (a replace, a
/// patch, `kubectl edit`, a delete, `kubectl scale`, creating an object labelled as Moat's), and
/// so is a user whom RBAC allows to write a model's status; nothing changes. The same changes through
/// break-glass go through, are recorded (a `BreakGlass` Event quoting the reason,
/// `moat_break_glass_total`) and repaired; without a reason, or through the scale subresource,
/// break-glass is refused too. Moat itself works with the policy: it creates, updates, prunes
/// and repairs its children, writes the status, and the garbage collector deletes the children
/// with their model. The audit log shows no successful write to a child by anyone else.
#[tokio::test]
async fn only_moat_changes_its_children_and_break_glass_is_recorded_then_repaired() {
    with_namespace(
        "admission",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            install_crds(&env.client).await?;
            let from = audit_offset()?;
            // Here the controller manager (so the garbage collector and the namespace
            // controller) acts as the admin: exempt it as the chart says to.
            let admin = whoami(&env.client).await?;
            let (release, sa, op) =
                install_chart_and_run_moat(&env, &kubernetes_controllers_value(&admin)).await?;
            let moat_user = format!("system:serviceaccount:{ns}:{sa}");
            let smds = env.api::<SecureModelDeployment>();
            smds.create(&PostParams::default(), &fixture::smd("fraud").replicas(2).build()?)
                .await?;
            wait_ready(&smds, "fraud")
                .await
                .context("Ready with the policy installed")?;

            bind_edit(&env, "alice").await?;
            bind_edit(&env, "bob").await?;
            let alice = client_as_user("alice", &[]).await?;
            let bob = client_as_user("bob", &[BREAK_GLASS_GROUP]).await?;

            // The author of a spec change comes from the admission request (the chart's
            // MutatingAdmissionPolicy): the name alice writes into the annotation is replaced by
            // hers, a later change of the annotation alone keeps hers, and the revision Moat
            // records names her.
            let a_smds: Api<SecureModelDeployment> = Api::namespaced(alice.clone(), &ns);
            a_smds
                .patch(
                    "fraud",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"moat.dev/spec-author": "mallory"}},
                                         "spec": {"server": {"args": ["--revision", "2"]}}})),
                )
                .await?;
            let author = |smd: &SecureModelDeployment| smd.annotations().get("moat.dev/spec-author").cloned();
            ensure!(author(&smds.get("fraud").await?).as_deref() == Some("alice"), "author after alice's change");
            Api::<SecureModelDeployment>::namespaced(bob.clone(), &ns)
                .patch("fraud", &PatchParams::default(),
                       &Patch::Merge(json!({"metadata": {"annotations": {"moat.dev/spec-author": "mallory"}}})))
                .await?;
            ensure!(author(&smds.get("fraud").await?).as_deref() == Some("alice"), "author after bob's annotation");
            let ready = wait_ready(&smds, "fraud").await?;
            let current = ready.status.and_then(|s| s.revisions).and_then(|r| r.current).context("current revision")?;
            let recorded = env.api::<moat::api::ModelRevision>().get(&current.name).await?;
            ensure!(
                recorded.spec.author == "alice" && current.revision == 2,
                "revision {} records author {}", current.revision, recorded.spec.author
            );

            // Two-person approval: with two approvals required, alice's next change waits; her own
            // approval and a second one by the same user do not count, an approval in someone
            // else's name is refused at admission, and two approvals by other users let it go live.
            smds.patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"approval": {"required": 2}}})))
                .await?;
            wait_ready(&smds, "fraud").await.context("Ready with approval required (its revision is the known-good one)")?;
            let approve_role = format!("{sa}-approve");
            for user in ["alice", "bob", "carol"] {
                bind_approver(&env, user, &approve_role).await?;
            }
            let deploys = env.api::<Deployment>();
            let label = |d: &Deployment| {
                d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.labels.as_ref())
                    .and_then(|l| l.get("moat.dev/revision").cloned()).unwrap_or_default()
            };
            let live_label = label(&deploys.get("fraud").await?);
            a_smds
                .patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"server": {"args": ["--revision", "3"]}}})))
                .await?;
            let waiting = wait_smd(&smds, "fraud", "awaiting approval", |s| {
                moat_e2e::current_condition(s, moat::api::conditions::READY)
                    .is_some_and(|c| c.reason == moat::api::conditions::reason::AWAITING_APPROVAL)
            })
            .await?;
            let third = waiting.status.and_then(|s| s.revisions).and_then(|r| r.awaiting).context("awaiting")?.revision;
            ensure!(third.revision == 3, "awaiting {third:?}");
            let third_rev = env.api::<moat::api::ModelRevision>().get(&third.name).await?;
            ensure!(third_rev.spec.author == "alice", "revision 3's author: {}", third_rev.spec.author);
            let approval = |name: &str, approver: &str| -> Result<moat::api::ModelApproval> {
                Ok(serde_json::from_value(json!({
                    "apiVersion": "moat.dev/v1alpha1", "kind": "ModelApproval",
                    "metadata": {"name": name},
                    "spec": {"model": "fraud", "revision": third.name, "image": third_rev.spec.image, "approver": approver}
                }))?)
            };
            let as_user = |c: &kube::Client| Api::<moat::api::ModelApproval>::namespaced(c.clone(), &ns);
            let carol = client_as_user("carol", &[]).await?;
            as_user(&alice).create(&PostParams::default(), &approval("by-alice", "alice")?).await?;
            match as_user(&bob).create(&PostParams::default(), &approval("bob-as-carol", "carol")?).await {
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("set spec.approver to bob") => {
                    eprintln!("an approval in another's name: {}", e.message);
                }
                other => bail!("an approval by bob in carol's name was not refused: {other:?}"),
            }
            as_user(&bob).create(&PostParams::default(), &approval("by-bob", "bob")?).await?;
            match as_user(&bob).delete("by-alice", &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("only its approver withdraws") => {}
                other => bail!("bob withdrew alice's approval: {other:?}"),
            }
            as_user(&bob).create(&PostParams::default(), &approval("by-bob-again", "bob")?).await?;
            let revisions = env.api::<moat::api::ModelRevision>();
            let judged = moat_e2e::wait_for_value(moat_e2e::DEADLINE, "the approvals judged", || async {
                let st = revisions.get(&third.name).await?.status.unwrap_or_default();
                Ok((st.approvals.len() == 1 && st.refused.len() == 2).then_some(st))
            })
            .await?;
            ensure!(judged.approvals[0].approver == "bob", "{judged:?}");
            let why = |name: &str| judged.refused.iter().find(|r| r.approval == name).map(|r| r.reason.clone()).unwrap_or_default();
            ensure!(why("by-alice").contains("alice changed the spec"), "{judged:?}");
            ensure!(why("by-bob-again").contains("bob approved revision"), "{judged:?}");
            ensure!(label(&deploys.get("fraud").await?) == live_label, "revision 3 went live with one approval");
            let still = smds.get("fraud").await?;
            ensure!(
                moat_e2e::current_condition(&still, moat::api::conditions::READY)
                    .is_some_and(|c| c.reason == moat::api::conditions::reason::AWAITING_APPROVAL && c.message.contains("counted: bob")),
                "{:?}", still.status.map(|s| s.conditions)
            );
            as_user(&carol).create(&PostParams::default(), &approval("by-carol", "carol")?).await?;
            let live = wait_ready(&smds, "fraud").await.context("Ready after two approvals")?;
            let revs = live.status.and_then(|s| s.revisions).context("revisions")?;
            ensure!(revs.approved.as_ref() == Some(&third) && revs.serving.as_ref() == Some(&third), "{revs:?}");
            ensure!(label(&deploys.get("fraud").await?) == moat::core::revision::short(&third.template_hash), "revision 3 is not in the Deployment");
            let accepted = moat_e2e::event_notes(&env, &ns, "fraud", moat::api::conditions::reason::APPROVAL_ACCEPTED).await?;
            let refused_notes = moat_e2e::event_notes(&env, &ns, "fraud", moat::api::conditions::reason::APPROVAL_REFUSED).await?;
            ensure!(
                accepted.iter().any(|n| n.contains("carol approved revision 3"))
                    && refused_notes.iter().any(|n| n.contains("ModelApproval by-alice does not count")),
                "approval Events: {accepted:?} {refused_notes:?}"
            );
            // The number cannot be lowered: that change would switch off the control meant to
            // check it (a CEL transition rule of the CRD).
            match a_smds
                .patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"approval": {"required": 0}}})))
                .await
            {
                Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("cannot be lowered") => {}
                other => bail!("lowering spec.approval.required was not refused: {other:?}"),
            }
            wait_ready(&smds, "fraud").await?;
            let deploys = env.api::<Deployment>();
            let nps = env.api::<NetworkPolicy>();
            let before = deploys.get("fraud").await?;
            let np_before = nps.get("fraud-allow").await?;
            let tls_before = env.api::<Secret>().get("fraud-tls").await?;

            // A user bound to `edit`, each way.
            let a_deploys: Api<Deployment> = Api::namespaced(alice.clone(), &ns);
            let a_nps: Api<NetworkPolicy> = Api::namespaced(alice.clone(), &ns);
            let a_secrets: Api<Secret> = Api::namespaced(alice.clone(), &ns);
            let mut widened = np_before.clone();
            if let Some(spec) = widened.spec.as_mut() {
                spec.ingress = Some(serde_json::from_value(
                    json!([{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]),
                )?);
            }
            let message = refused(
                "a replace (PUT) of a NetworkPolicy",
                a_nps.replace("fraud-allow", &PostParams::default(), &widened).await,
            )?;
            eprintln!("refused with: {message}");
            refused(
                "a merge patch of the Deployment's image",
                a_deploys
                    .patch(
                        "fraud",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                            {"name": "server", "image": "registry.example.com/evil:latest"}]}}}})),
                    )
                    .await,
            )?;
            refused(
                "a delete of the serving Secret",
                a_secrets.delete("fraud-tls", &DeleteParams::default()).await,
            )?;
            refused(
                "a patch of deployments/scale",
                a_deploys
                    .patch_scale("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}})))
                    .await,
            )?;
            let fake: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "fraud-fake",
                "labels": {"app.kubernetes.io/managed-by": "moat", "moat.dev/deployment": "fraud"}}}))?;
            refused(
                "a create of an object labelled as Moat's",
                Api::<ConfigMap>::namespaced(alice.clone(), &ns).create(&PostParams::default(), &fake).await,
            )?;
            // kubectl itself: `edit` (a patch computed from the edited file) and `scale`.
            let (ok, out) = kubectl_as(
                "alice",
                &["edit", "-n", &ns, "deployment", "fraud"],
                &[("KUBE_EDITOR", "sed -i s/replicas:\\ 2/replicas:\\ 7/")],
            )?;
            ensure!(!ok && out.contains("edit SecureModelDeployment fraud"), "kubectl edit: {out}");
            let (ok, out) = kubectl_as("alice", &["scale", "-n", &ns, "deployment", "fraud", "--replicas=5"], &[])?;
            ensure!(
                !ok && out.contains("replicas of Deployment") && out.contains("edit SecureModelDeployment fraud"),
                "kubectl scale: {out}"
            );
            // Whoever RBAC lets write a model's status is refused by the policy.
            let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
                "metadata": {"name": "smd-status"},
                "rules": [{"apiGroups": ["moat.dev"], "resources": ["securemodeldeployments/status"], "verbs": ["get", "patch", "update"]}]
            }))?;
            env.api::<k8s_openapi::api::rbac::v1::Role>().create(&PostParams::default(), &role).await?;
            let rb: RoleBinding = serde_json::from_value(json!({
                "metadata": {"name": "alice-smd-status"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "smd-status"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]
            }))?;
            env.api::<RoleBinding>().create(&PostParams::default(), &rb).await?;
            // A new RoleBinding reaches the API server's authorizer a moment later: until then
            // RBAC refuses, which proves nothing about the policy, so wait for the policy's word.
            let statuses = Api::<SecureModelDeployment>::namespaced(alice.clone(), &ns);
            let message = moat_e2e::wait_for_value(moat_e2e::DEADLINE, "the policy to refuse alice's status write", || async {
                match statuses
                    .patch_status("fraud", &PatchParams::default(), &Patch::Merge(json!({"status": {"readyReplicas": 9}})))
                    .await
                {
                    Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("ValidatingAdmissionPolicy") => Ok(Some(s.message)),
                    Err(kube::Error::Api(s)) if s.code == 403 => Ok(None),
                    other => bail!("alice wrote the status: {other:?}"),
                }
            })
            .await?;
            ensure!(message.contains("status is written by Moat alone"), "{message}");
            // Refused means unchanged.
            ensure!(
                deploys.get("fraud").await?.resource_version() == before.resource_version()
                    && nps.get("fraud-allow").await?.resource_version() == np_before.resource_version()
                    && env.api::<Secret>().get("fraud-tls").await?.uid() == tls_before.uid(),
                "a refused request changed a child"
            );
            ensure!(op.drift_repairs("Deployment")? == 0, "a repair after refused requests");

            // Break-glass, without a reason: refused; through the scale subresource: refused.
            let b_deploys: Api<Deployment> = Api::namespaced(bob.clone(), &ns);
            refused(
                "a break-glass patch without a reason",
                b_deploys
                    .patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}})))
                    .await,
            )?;
            refused(
                "a break-glass scale",
                b_deploys
                    .patch_scale("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}})))
                    .await,
            )?;
            // With a reason: goes through, is recorded, and repaired.
            let patched = b_deploys
                .patch(
                    "fraud",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {REASON_KEY: "INC-16: scale out by hand"}},
                                         "spec": {"replicas": 5}})),
                )
                .await
                .context("a break-glass patch with a reason")?;
            ensure!(patched.spec.as_ref().and_then(|s| s.replicas) == Some(5));
            let note = wait_event(&env, &ns, "fraud", "BreakGlass", &["Deployment fraud", "INC-16: scale out by hand"]).await?;
            eprintln!("recorded: {note}");
            wait_until("the break-glass change reverted and its reason removed", || async {
                let d = deploys.get("fraud").await?;
                Ok(d.spec.as_ref().and_then(|s| s.replicas) == Some(2) && !d.annotations().contains_key(REASON_KEY))
            })
            .await?;
            ensure!(break_glass_count(&op, &ns, "Deployment")? == 1, "moat_break_glass_total for the Deployment");

            // A break-glass delete: the reason on the object first, then the delete.
            let b_nps: Api<NetworkPolicy> = Api::namespaced(bob.clone(), &ns);
            b_nps
                .patch(
                    "fraud-allow",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {REASON_KEY: "INC-17: reset the policy"}}})),
                )
                .await
                .context("annotating with a reason")?;
            b_nps
                .delete("fraud-allow", &DeleteParams::default())
                .await
                .context("a break-glass delete")?;
            wait_event(&env, &ns, "fraud", "BreakGlass", &["NetworkPolicy fraud-allow", "INC-17: reset the policy", "deleted"]).await?;
            wait_until("the deleted NetworkPolicy recreated", || async {
                Ok(nps.get_opt("fraud-allow").await?.is_some_and(|np| np.uid() != np_before.uid()))
            })
            .await?;
            ensure!(break_glass_count(&op, &ns, "NetworkPolicy")? == 1, "moat_break_glass_total for the NetworkPolicy");

            // Moat keeps working: a spec change (one replica: the PDB is pruned) and Ready.
            smds.patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 1}})))
                .await?;
            let pdbs = env.api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>();
            wait_until("the PDB pruned by Moat", || async { Ok(pdbs.get_opt("fraud").await?.is_none()) }).await?;
            wait_ready(&smds, "fraud").await?;
            // The children, for the audit below; then the model goes and the garbage collector
            // deletes them.
            let selector = ListParams::default().labels("moat.dev/deployment=fraud");
            let mut children: Vec<(String, String)> = Vec::new();
            for d in deploys.list(&selector).await? { children.push(("deployments".into(), d.name_any())); }
            for n in nps.list(&selector).await? { children.push(("networkpolicies".into(), n.name_any())); }
            for s in env.api::<Secret>().list(&selector).await? { children.push(("secrets".into(), s.name_any())); }
            for c in env.api::<ConfigMap>().list(&selector).await? { children.push(("configmaps".into(), c.name_any())); }
            for s in env.api::<k8s_openapi::api::core::v1::Service>().list(&selector).await? { children.push(("services".into(), s.name_any())); }
            for s in env.api::<k8s_openapi::api::core::v1::ServiceAccount>().list(&selector).await? { children.push(("serviceaccounts".into(), s.name_any())); }
            ensure!(children.len() >= 6, "children: {children:?}");
            smds.delete("fraud", &DeleteParams::background()).await?;
            wait_until("the garbage collector to delete the model's children", || async {
                Ok(deploys.list(&selector).await?.items.is_empty() && nps.list(&selector).await?.items.is_empty()
                    && env.api::<Secret>().list(&selector).await?.items.is_empty())
            })
            .await?;
            drop(op);

            // The audit log: the policy never refused Moat (it kept working with the policy in
            // place), every write to a child that succeeded is by Moat, the garbage
            // collector (a delete by kube-controller-manager, as whichever user it runs), or the
            // break-glass user; every write by the `edit` user was refused.
            let entries = audit_entries_since(from)?;
            let gc = [
                "system:serviceaccount:kube-system:generic-garbage-collector",
                "system:kube-controller-manager",
                admin.as_str(),
            ];
            let mut by_user: std::collections::BTreeMap<String, (u32, u32)> = Default::default();
            for e in entries.iter().filter(|e| e["stage"] == "ResponseComplete") {
                let r = &e["objectRef"];
                let verb = e["verb"].as_str().unwrap_or_default();
                if r["namespace"].as_str() != Some(ns.as_str())
                    || !matches!(verb, "create" | "update" | "patch" | "delete")
                    // Status is not guarded: the Deployment controller writes it.
                    || r["subresource"] == "status"
                    || !children.iter().any(|(res, name)| r["resource"].as_str() == Some(res) && r["name"].as_str() == Some(name))
                {
                    continue;
                }
                let user = e["impersonatedUser"]["username"].as_str().or(e["user"]["username"].as_str()).unwrap_or_default().to_string();
                let controller = verb == "delete"
                    && e["userAgent"].as_str().is_some_and(|a| a.starts_with("kube-controller-manager"));
                // The admin is the controller manager's user here: only its deletes count.
                let user = if user == admin && !controller { format!("{admin} (not a controller)") } else { user };
                let code = e["responseStatus"]["code"].as_i64();
                let ok = code.is_some_and(|c| c < 300);
                // Refused by the policy (403). A conflict (409: Moat's take-over of fields a
                // break-glass change added, made against a cached resourceVersion) is retried by
                // design and says nothing about the policy.
                let refused = code == Some(403);
                let counts = by_user.entry(user.clone()).or_default();
                if ok { counts.0 += 1 } else if refused { counts.1 += 1 }
                ensure!(
                    !ok || user == moat_user || gc.contains(&user.as_str()) || (user == "bob" && r["subresource"].is_null()),
                    "a write to a child by {user} succeeded: {verb} {} {}", r["resource"], r["name"]
                );
            }
            eprintln!("writes to the model's children (succeeded, refused) by user: {by_user:#?}");
            ensure!(by_user.get(&moat_user).is_some_and(|c| c.0 > 0 && c.1 == 0), "Moat's writes: {by_user:?}");
            ensure!(by_user.get("alice").is_some_and(|c| c.0 == 0 && c.1 >= 5), "alice's writes: {by_user:?}");
            ensure!(gc.iter().any(|u| by_user.get(*u).is_some_and(|c| c.0 > 0)), "no garbage collector delete: {by_user:?}");
            helm(&["uninstall", &release, "-n", &ns])?;
            Ok(())
        },
    )
    .await;
}

/// The opt-out: with `admissionPolicy.enabled=false` the chart installs no policy, a user bound
/// to `edit` can change a child, and drift repair (the second line) reverts it.
#[tokio::test]
async fn without_the_policy_drift_repair_is_the_second_line() {
    with_namespace(
        "admission-off",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            install_crds(&env.client).await?;
            let (release, sa, op) =
                install_chart_and_run_moat(&env, "admissionPolicy.enabled=false").await?;
            let policies: Api<kube::api::DynamicObject> = Api::all_with(
                env.client.clone(),
                &kube::core::ApiResource::from_gvk_with_plural(
                    &kube::core::GroupVersionKind::gvk(
                        "admissionregistration.k8s.io",
                        "v1",
                        "ValidatingAdmissionPolicy",
                    ),
                    "validatingadmissionpolicies",
                ),
            );
            ensure!(
                policies
                    .get_opt(&format!("{sa}-children.moat.dev"))
                    .await?
                    .is_none(),
                "a policy was installed with admissionPolicy.enabled=false"
            );
            let smds = env.api::<SecureModelDeployment>();
            smds.create(&PostParams::default(), &fixture::smd("fraud").build()?)
                .await?;
            wait_ready(&smds, "fraud").await?;
            bind_edit(&env, "alice").await?;
            let alice = client_as_user("alice", &[]).await?;
            Api::<NetworkPolicy>::namespaced(alice, &ns)
                .delete("fraud-allow", &DeleteParams::default())
                .await
                .context("without the policy, the edit role deletes a child")?;
            wait_event(
                &env,
                &ns,
                "fraud",
                "DriftRepaired",
                &["NetworkPolicy fraud-allow", "deleted"],
            )
            .await?;
            ensure!(op.drift_repairs("NetworkPolicy")? >= 1);
            helm(&["uninstall", &release, "-n", &ns])?;
            Ok(())
        },
    )
    .await;
}
