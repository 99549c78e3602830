//! The GitOps examples in `examples/gitops/` against the local control plane: the Argo CD and Flux
//! objects pass the real CRD schemas of those projects (fetched from their published Go modules by
//! `e2e/cluster.sh build`), the chart values they carry pass the chart's schema, and the models
//! they sync become Ready, judged Healthy by the Argo CD health check and Current by kstatus.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use moat::api::SecureModelDeployment;
use moat_e2e::{
    DEADLINE, NamespaceOptions, Operator, reconciles_started, tool, wait_event, wait_ready,
    with_namespace,
};
use serde_json::{Value, json};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gitops");

fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<(bool, String, String)> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(bytes) = stdin {
        input.write_all(bytes)?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

fn kubectl(args: &[&str], stdin: Option<&[u8]>) -> Result<(bool, String, String)> {
    run(&tool("MOAT_KUBECTL")?, args, stdin)
}

/// Every document of a YAML file (multi-document aware), as JSON.
fn documents(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn only(path: &str) -> Result<Value> {
    let mut docs = documents(&Path::new(EXAMPLES).join(path))?;
    ensure!(docs.len() == 1, "{path}: expected one object");
    Ok(docs.remove(0))
}

/// Installs the Argo CD and Flux CRDs (idempotent) and waits until they are served.
fn install_gitops_crds() -> Result<()> {
    let dir = tool("MOAT_GITOPS_CRDS")?;
    let (ok, out, err) = kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", &dir],
        None,
    )?;
    ensure!(ok, "installing the GitOps CRDs: {out}{err}");
    for crd in [
        "applications.argoproj.io",
        "gitrepositories.source.toolkit.fluxcd.io",
        "kustomizations.kustomize.toolkit.fluxcd.io",
        "helmreleases.helm.toolkit.fluxcd.io",
    ] {
        // `kubectl wait` fails at once (instead of waiting) while the new CRD has no
        // status.conditions yet ("accessor error: <nil>"): try again until it has them.
        let deadline = std::time::Instant::now() + DEADLINE;
        let timeout = format!("--timeout={}s", DEADLINE.as_secs());
        loop {
            let (ok, out, err) = kubectl(
                &[
                    "wait",
                    "--for=condition=Established",
                    &format!("crd/{crd}"),
                    &timeout,
                ],
                None,
            )?;
            if ok {
                break;
            }
            let early = err.contains("accessor error") && std::time::Instant::now() < deadline;
            ensure!(early, "CRD {crd} not established: {out}{err}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Creates `obj` in `namespace` through the API server; `Err` carries the server's message.
fn create_in(namespace: &str, mut obj: Value) -> Result<std::result::Result<(), String>> {
    obj["metadata"]["namespace"] = json!(namespace);
    let (ok, out, err) = kubectl(
        &["create", "-n", namespace, "-f", "-"],
        Some(&serde_json::to_vec(&obj)?),
    )?;
    Ok(if ok {
        Ok(())
    } else {
        Err(format!("{out}{err}"))
    })
}

/// `helm template` of the chart at `chart` (relative to the repository root) with `values`.
fn helm_template(chart: &str, values: &Value) -> Result<String> {
    let dir = Path::new(ROOT).join(chart.trim_start_matches("./"));
    ensure!(
        dir.join("Chart.yaml").is_file(),
        "{chart} is not a chart in this repository"
    );
    let file = std::env::temp_dir().join(format!("moat-gitops-values-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_yaml::to_string(values)?)?;
    let (ok, out, err) = run(
        &tool("MOAT_HELM")?,
        &[
            "template",
            "moat",
            dir.to_str().context("path")?,
            "-f",
            file.to_str().context("path")?,
        ],
        None,
    )?;
    std::fs::remove_file(&file).ok();
    ensure!(ok, "helm template {chart} with {values}: {err}");
    Ok(out)
}

#[tokio::test]
async fn argocd_and_flux_objects_pass_their_real_schemas_and_carry_valid_chart_values() {
    install_gitops_crds().expect("install the Argo CD and Flux CRDs");
    with_namespace(
        "gitops-schemas",
        NamespaceOptions::default(),
        |env| async move {
            let ns = env.namespace.as_str();
            let files = [
                "argocd/moat.yaml",
                "argocd/models.yaml",
                "flux/source.yaml",
                "flux/moat.yaml",
                "flux/models.yaml",
            ];
            for file in files {
                for obj in documents(&Path::new(EXAMPLES).join(file))? {
                    if let Err(e) = create_in(ns, obj)? {
                        anyhow::bail!("{file} was rejected by its CRD: {e}");
                    }
                }
            }
            // The schemas are real: a wrong source kind and a missing source are refused.
            let mut bad = only("flux/moat.yaml")?;
            bad["metadata"]["name"] = json!("bad-kind");
            bad["spec"]["chart"]["spec"]["sourceRef"]["kind"] = json!("Git");
            let e = create_in(ns, bad)?
                .err()
                .context("a HelmRelease with sourceRef.kind Git was accepted")?;
            ensure!(e.contains("sourceRef.kind"), "{e}");
            let mut bad = only("flux/models.yaml")?;
            bad["metadata"]["name"] = json!("no-source");
            bad["spec"]
                .as_object_mut()
                .context("spec")?
                .remove("sourceRef");
            let e = create_in(ns, bad)?
                .err()
                .context("a Kustomization without sourceRef was accepted")?;
            ensure!(e.contains("sourceRef"), "{e}");

            // The chart they install exists here and accepts their values.
            let app = only("argocd/moat.yaml")?;
            let source = &app["spec"]["source"];
            let rendered = helm_template(
                source["path"].as_str().context("path")?,
                &source["helm"]["valuesObject"],
            )?;
            ensure!(
                rendered.contains("kind: Deployment"),
                "no operator Deployment rendered"
            );
            let release = only("flux/moat.yaml")?;
            helm_template(
                release["spec"]["chart"]["spec"]["chart"]
                    .as_str()
                    .context("chart")?,
                &release["spec"]["values"],
            )?;
            // Values the chart's schema refuses would fail the sync; the check above would see it.
            let mut wrong = release["spec"]["values"].clone();
            wrong["replicaCount"] = json!(0);
            ensure!(
                helm_template("charts/moat", &wrong).is_err(),
                "replicaCount 0 passed the schema"
            );

            // Both tools sync the same models directory from the same repository.
            let models = only("argocd/models.yaml")?;
            let path = models["spec"]["source"]["path"].as_str().context("path")?;
            ensure!(
                Path::new(ROOT)
                    .join(path)
                    .join("kustomization.yaml")
                    .is_file(),
                "{path} has no kustomization.yaml"
            );
            let flux_models = only("flux/models.yaml")?;
            ensure!(
                flux_models["spec"]["path"]
                    .as_str()
                    .map(|p| p.trim_start_matches("./"))
                    == Some(path)
            );
            let repo = only("flux/source.yaml")?;
            ensure!(
                repo["spec"]["url"] == source["repoURL"]
                    && models["spec"]["source"]["repoURL"] == source["repoURL"]
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn models_synced_from_git_become_ready_healthy_and_current() {
    with_namespace(
        "gitops-models",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.as_str();
            // What Argo CD and Flux apply: the kustomize build of the models directory.
            let (ok, built, err) = kubectl(&["kustomize", &format!("{EXAMPLES}/models")], None)?;
            ensure!(ok, "kubectl kustomize: {err}");
            let mut models = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(&built) {
                let mut v: Value = serde::Deserialize::deserialize(doc)?;
                match v["kind"].as_str() {
                    Some("Namespace") => ensure!(
                        v["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
                            == "restricted",
                        "the models namespace does not enforce restricted"
                    ),
                    Some("SecureModelDeployment") => {
                        v["metadata"]["namespace"] = json!(ns);
                        models.push(v);
                    }
                    other => anyhow::bail!("unexpected {other:?} in the models"),
                }
            }
            ensure!(!models.is_empty(), "no SecureModelDeployment in the models");

            let op = Operator::start(ns).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            // Applied server-side under the sync tool's own field manager, as Argo CD
            // (ServerSideApply=true) and Flux do.
            let pp = PatchParams::apply("argocd-controller").force();
            for m in &models {
                let name = m["metadata"]["name"].as_str().context("name")?;
                smds.patch(name, &pp, &Patch::Apply(m)).await?;
            }
            for m in &models {
                let name = m["metadata"]["name"].as_str().context("name")?;
                let live = serde_json::to_value(wait_ready(&smds, name).await?)?;
                let (health, message) = moat_e2e::argocd_health(&live)?;
                ensure!(
                    health == "Healthy",
                    "Argo CD health check says {health}: {message}"
                );
                let (status, message) = moat_e2e::kstatus(&live).await?;
                ensure!(status == "Current", "kstatus says {status}: {message}");
                eprintln!("{name}: Argo CD {health}, kstatus {status}");
            }

            // Converging ends with the Events Moat publishes in the background after its writes
            // (they can land after Ready): wait for them, so that the count below starts after.
            for m in &models {
                let name = m["metadata"]["name"].as_str().context("name")?;
                wait_event(
                    &env,
                    ns,
                    name,
                    "Created",
                    &[&format!("Created Deployment {name}")],
                )
                .await?;
            }

            // A second sync of the same manifests changes nothing: the spec is Moat's input only
            // (Moat never writes it), and the children render byte-identically, so no write follows.
            let writes = op.metrics.api_writes_total();
            let before: Vec<Value> = smds
                .list(&Default::default())
                .await?
                .items
                .iter()
                .map(|s| json!(s.metadata.resource_version))
                .collect();
            for m in &models {
                let name = m["metadata"]["name"].as_str().context("name")?;
                smds.patch(name, &pp, &Patch::Apply(m)).await?;
            }
            let after: Vec<Value> = smds
                .list(&Default::default())
                .await?
                .items
                .iter()
                .map(|s| json!(s.metadata.resource_version))
                .collect();
            ensure!(
                before == after,
                "re-applying the same manifests changed the objects"
            );
            // An annotation (as sync tools add) triggers a reconcile; it renders identical children
            // and writes nothing. Checked once that reconcile has completed, not merely started.
            let seen = reconciles_started(&op.metrics)?;
            let name = models[0]["metadata"]["name"].as_str().context("name")?;
            let note =
                json!({"metadata": {"annotations": {"example.com/synced-revision": "abc123"}}});
            smds.patch(name, &PatchParams::default(), &Patch::Merge(&note))
                .await?;
            op.wait_reconciles_after(seen, 1, "a reconcile after the annotation")
                .await?;
            ensure!(
                op.metrics.api_writes_total() == writes,
                "Moat wrote after an unchanged sync"
            );
            Ok(())
        },
    )
    .await;
}
