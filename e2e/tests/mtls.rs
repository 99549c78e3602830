//! Mutual TLS against the local control plane: Moat's CA, the serving certificate of a model,
//! client certificates with two-sided consent (ModelClient), withdrawal, tampering, renewal of
//! short-lived certificates and CA rotation, each checked with a real TLS handshake (rustls).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::{
    ByteString,
    api::{apps::v1::Deployment, core::v1::Secret},
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use moat::{
    api::{ModelClient, SecureModelDeployment, conditions},
    pki::{self, KeyedCertificate},
};
use moat_e2e::{
    NamespaceOptions, Operator, TestEnv, ca_settings, install_crds,
    tls::{client_config, handshake, server_config},
    wait_for, with_namespace,
};
use serde_json::{Value, json};

fn smd(clients: Value, lifetime: &str) -> Result<SecureModelDeployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "SecureModelDeployment",
        "metadata": {"name": "fraud"},
        "spec": {
            "replicas": 1,
            "server": {"image": moat_e2e::TEST_IMAGE, "port": 8443,
                       "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
            "access": {"clients": clients},
            "tls": {"certificateLifetime": lifetime}
        }
    }))?)
}

fn model_client(
    name: &str,
    model_ns: &str,
    sa: &str,
    secret: &str,
    lifetime: &str,
) -> Result<ModelClient> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "moat.dev/v1alpha1", "kind": "ModelClient",
        "metadata": {"name": name},
        "spec": {"deploymentRef": {"namespace": model_ns, "name": "fraud"},
                 "serviceAccountName": sa, "secretName": secret, "certificateLifetime": lifetime}
    }))?)
}

fn text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

/// Certificate, key and bundle of a Secret.
fn material(secret: &Secret) -> (KeyedCertificate, String) {
    (
        KeyedCertificate {
            cert_pem: text(secret, "tls.crt"),
            key_pem: text(secret, "tls.key"),
        },
        text(secret, "ca.crt"),
    )
}

fn server_cert_pem(secret: &Secret) -> String {
    text(secret, "tls.crt")
}

fn serial(secret: &Secret) -> Option<String> {
    pki::pem_certificates(&text(secret, "tls.crt"))
        .first()
        .and_then(|d| pki::info(d))
        .map(|i| i.serial)
}

async fn secret(env: &TestEnv, ns: &str, name: &str) -> Result<Option<Secret>> {
    Ok(Api::<Secret>::namespaced(env.client.clone(), ns)
        .get_opt(name)
        .await?)
}

async fn wait_secret(env: &TestEnv, ns: &str, name: &str) -> Result<Secret> {
    wait_for(
        Duration::from_secs(60),
        &format!("Secret {ns}/{name}"),
        || async {
            Ok(secret(env, ns, name)
                .await?
                .is_some_and(|s| serial(&s).is_some()))
        },
    )
    .await?;
    secret(env, ns, name).await?.context("secret")
}

async fn wait_mc(
    api: &Api<ModelClient>,
    name: &str,
    ready: bool,
    reason: &str,
) -> Result<ModelClient> {
    wait_for(
        Duration::from_secs(60),
        &format!("ModelClient {name} {reason}"),
        || async {
            let mc = api.get(name).await?;
            Ok(mc.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Ready" && (c.status == "True") == ready && c.reason == reason
                })
            }))
        },
    )
    .await?;
    Ok(api.get(name).await?)
}

/// A handshake between the model (serving Secret) and a client (client Secret), the server
/// accepting the client's SPIFFE ID.
fn mtls(serving: &Secret, client: &Secret, server_name: &str, allowed: &str) -> Result<(), String> {
    let (server_cert, server_bundle) = material(serving);
    let (client_cert, client_bundle) = material(client);
    handshake(
        server_config(&server_cert, &server_bundle, &[allowed.to_string()]),
        client_config(&client_bundle, Some(&client_cert)),
        server_name,
    )
}

#[tokio::test]
async fn certificates_with_two_sided_consent_withdrawal_and_tamper_repair() {
    with_namespace(
        "mtls-consent",
        NamespaceOptions::restricted(),
        |env| async move {
            install_crds(&env.client).await?;
            let ns = env.namespace.clone();
            let client_ns = env
                .another_namespace(&NamespaceOptions::restricted())
                .await?;
            let stranger_ns = env
                .another_namespace(&NamespaceOptions::restricted())
                .await?;
            let config = kube::Config::infer().await?;
            let op = Operator::start_watching(
                config,
                &[&ns, &client_ns, &stranger_ns],
                Duration::from_secs(300),
            )
            .await?;

            let smds: Api<SecureModelDeployment> = env.api();
            smds.create(
                &PostParams::default(),
                &smd(
                    json!([{"namespace": client_ns, "serviceAccounts": ["checkout"]}]),
                    "24h",
                )?,
            )
            .await?;
            wait_for(Duration::from_secs(60), "fraud Ready", || async {
                Ok(smds
                    .get("fraud")
                    .await?
                    .status
                    .is_some_and(|s| conditions::is_true(&s.conditions, "Ready")))
            })
            .await?;

            // The CA: created on first start, in the operator's namespace, labelled as Moat's.
            let ca = secret(&env, &ns, "moat-ca")
                .await?
                .context("the CA Secret")?;
            ensure!(
                ca.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                    .map(String::as_str)
                    == Some("moat")
            );
            ensure!(ca.type_.as_deref() == Some("kubernetes.io/tls"));

            // The serving certificate: a TLS Secret, described in the status, mounted into the pods.
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            ensure!(serving.type_.as_deref() == Some("kubernetes.io/tls"));
            let status = smds
                .get("fraud")
                .await?
                .status
                .and_then(|s| s.certificate)
                .context("status.certificate")?;
            ensure!(
                status.secret_name == "fraud-tls"
                    && Some(status.serial.clone()) == serial(&serving),
                "{status:?}"
            );
            ensure!(status.renew_at.0 < status.not_after.0);
            let d: Deployment = env.api().get("fraud").await?;
            let pod = d.spec.and_then(|s| s.template.spec).context("pod spec")?;
            ensure!(
                pod.volumes.iter().flatten().any(|v| v
                    .secret
                    .as_ref()
                    .and_then(|s| s.secret_name.as_deref())
                    == Some("fraud-tls"))
            );
            let env_names: Vec<String> = pod.containers[0]
                .env
                .iter()
                .flatten()
                .map(|e| e.name.clone())
                .collect();
            ensure!(
                env_names.iter().any(|n| n == "MOAT_TLS_CERT_FILE"),
                "{env_names:?}"
            );

            // An allowed client gets a certificate in its own namespace, owned by its ModelClient;
            // the pair completes a mutual-TLS handshake for the Service's name.
            let mcs: Api<ModelClient> = Api::namespaced(env.client.clone(), &client_ns);
            mcs.create(
                &PostParams::default(),
                &model_client("checkout", &ns, "checkout", "fraud-client", "24h")?,
            )
            .await?;
            let mc = wait_mc(&mcs, "checkout", true, "CertificateIssued").await?;
            let client = wait_secret(&env, &client_ns, "fraud-client").await?;
            ensure!(
                client
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| Some(&o.uid) == mc.metadata.uid.as_ref())
            );
            let allowed = format!("spiffe://cluster.local/ns/{client_ns}/sa/checkout");
            mtls(&serving, &client, &format!("fraud.{ns}.svc"), &allowed)
                .map_err(anyhow::Error::msg)?;

            // A namespace or ServiceAccount the model does not list gets nothing, and says why.
            let strangers: Api<ModelClient> = Api::namespaced(env.client.clone(), &stranger_ns);
            strangers
                .create(
                    &PostParams::default(),
                    &model_client("stranger", &ns, "checkout", "fraud-client", "24h")?,
                )
                .await?;
            let st = wait_mc(&strangers, "stranger", false, "NotAllowed").await?;
            let message = &st
                .status
                .context("status")?
                .conditions
                .iter()
                .find(|c| c.type_ == "Stalled")
                .context("Stalled")?
                .message
                .clone();
            ensure!(
                message.contains("does not allow ServiceAccount checkout of namespace"),
                "{message}"
            );
            ensure!(
                secret(&env, &stranger_ns, "fraud-client").await?.is_none(),
                "a stranger got a certificate"
            );
            mcs.create(
                &PostParams::default(),
                &model_client("intruder", &ns, "intruder", "intruder-tls", "24h")?,
            )
            .await?;
            wait_mc(&mcs, "intruder", false, "NotAllowed").await?;
            ensure!(secret(&env, &client_ns, "intruder-tls").await?.is_none());

            // A Secret Moat did not create is never overwritten.
            let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &client_ns);
            let foreign = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("taken".into()),
                    ..Default::default()
                },
                data: Some([("tls.crt".to_string(), ByteString(b"mine".to_vec()))].into()),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &foreign).await?;
            mcs.create(
                &PostParams::default(),
                &model_client("squatter", &ns, "checkout", "taken", "24h")?,
            )
            .await?;
            wait_mc(&mcs, "squatter", false, "Conflict").await?;
            ensure!(
                text(&secrets.get("taken").await?, "tls.crt") == "mine",
                "Moat overwrote a foreign Secret"
            );

            // Tampering is repaired: an edited serving certificate is replaced, a deleted client
            // Secret comes back, and both handshake again.
            let garbage = json!({"data": {"tls.crt": "Z2FyYmFnZQ=="}});
            Api::<Secret>::namespaced(env.client.clone(), &ns)
                .patch(
                    "fraud-tls",
                    &PatchParams::default(),
                    &Patch::Merge(&garbage),
                )
                .await?;
            wait_for(
                Duration::from_secs(30),
                "the serving certificate repaired",
                || async {
                    Ok(secret(&env, &ns, "fraud-tls")
                        .await?
                        .is_some_and(|s| serial(&s).is_some()))
                },
            )
            .await?;
            secrets
                .delete("fraud-client", &DeleteParams::default())
                .await?;
            let old_serial = serial(&client);
            wait_for(
                Duration::from_secs(30),
                "the client Secret recreated",
                || async {
                    Ok(secret(&env, &client_ns, "fraud-client")
                        .await?
                        .is_some_and(|s| serial(&s).is_some() && serial(&s) != old_serial))
                },
            )
            .await?;
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            let client = wait_secret(&env, &client_ns, "fraud-client").await?;
            mtls(&serving, &client, &format!("fraud.{ns}.svc"), &allowed)
                .map_err(anyhow::Error::msg)?;
            let drift = smds
                .get("fraud")
                .await?
                .status
                .and_then(|s| s.drift)
                .context("status.drift")?;
            ensure!(drift.repairs >= 1, "{drift:?}");

            // Metrics: certificates issued by usage, and seconds to expiry per Secret.
            let metrics = op.metrics.encode()?;
            ensure!(
                metrics.contains("moat_certificates_issued_total{usage=\"serving\"}"),
                "{metrics}"
            );
            ensure!(
                metrics.contains("moat_certificates_issued_total{usage=\"client\"}"),
                "{metrics}"
            );
            wait_for(
                Duration::from_secs(15),
                "the expiry gauge of fraud-tls",
                || async {
                    Ok(op
                        .metrics
                        .certificate_expiry(&ns, "fraud-tls")
                        .is_some_and(|s| s > 23 * 3600))
                },
            )
            .await?;

            // Withdrawn consent: the model drops the client; its Secret is deleted, the status says why.
            smds.patch(
                "fraud",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"access": {"clients": []}}})),
            )
            .await?;
            wait_mc(&mcs, "checkout", false, "NotAllowed").await?;
            wait_for(
                Duration::from_secs(30),
                "the withdrawn client Secret deleted",
                || async { Ok(secret(&env, &client_ns, "fraud-client").await?.is_none()) },
            )
            .await?;
            ensure!(
                mcs.get("checkout")
                    .await?
                    .status
                    .and_then(|s| s.certificate)
                    .is_none()
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn short_lifetimes_renew_before_expiry_and_ca_rotation_keeps_handshakes_working() {
    with_namespace(
        "mtls-rotation",
        NamespaceOptions::restricted(),
        |env| async move {
            install_crds(&env.client).await?;
            let ns = env.namespace.clone();
            // A CA valid for 60 s rotates at 40 s; certificates of 30 s renew at 20 s.
            let mut ca = ca_settings(&ns);
            ca.validity = Duration::from_secs(60);
            let settings = moat::controller::Settings {
                ca,
                ..moat_e2e::settings(&[&ns])
            };
            let _op = Operator::start_with_settings(kube::Config::infer().await?, settings).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            smds.create(
                &PostParams::default(),
                &smd(
                    json!([{"namespace": ns, "serviceAccounts": ["checkout"]}]),
                    "30s",
                )?,
            )
            .await?;
            let mcs: Api<ModelClient> = env.api();
            mcs.create(
                &PostParams::default(),
                &model_client("checkout", &ns, "checkout", "fraud-client", "30s")?,
            )
            .await?;
            let first_serving = wait_secret(&env, &ns, "fraud-tls").await?;
            let first_client = wait_secret(&env, &ns, "fraud-client").await?;
            let first_ca = secret(&env, &ns, "moat-ca").await?.context("CA")?;
            let allowed = format!("spiffe://cluster.local/ns/{ns}/sa/checkout");
            let name = format!("fraud.{ns}.svc");
            mtls(&first_serving, &first_client, &name, &allowed).map_err(anyhow::Error::msg)?;

            // Renewal: a new serving certificate appears while the old one is still valid, and
            // both work with the client.
            let first_info = pki::info(&pki::pem_certificates(&text(&first_serving, "tls.crt"))[0])
                .context("info")?;
            wait_for(
                Duration::from_secs(40),
                "the serving certificate renewed",
                || async {
                    Ok(secret(&env, &ns, "fraud-tls").await?.is_some_and(|s| {
                        serial(&s).is_some() && serial(&s) != serial(&first_serving)
                    }))
                },
            )
            .await?;
            let renewed_at = k8s_openapi::jiff::Timestamp::now().as_second();
            ensure!(
                renewed_at < first_info.not_after,
                "renewed only after expiry"
            );
            eprintln!(
                "renewed {} s before expiry (renewAt {} s into a 30 s life)",
                first_info.not_after - renewed_at,
                first_info.renew_at() - first_info.not_before - 60
            );
            let renewed = wait_secret(&env, &ns, "fraud-tls").await?;
            mtls(&first_serving, &first_client, &name, &allowed)
                .map_err(|e| anyhow::anyhow!("old certificate after renewal: {e}"))?;
            mtls(&renewed, &first_client, &name, &allowed)
                .map_err(|e| anyhow::anyhow!("new certificate: {e}"))?;

            // CA rotation: the bundle carries old and new CA; new leaves from the new CA handshake
            // with leaves of the old one.
            // Meanwhile keep the newest client certificate the old CA signed (still valid: renewed
            // every 20 s for 30 s).
            let old_ca_pem = text(&first_ca, "tls.crt");
            let last_old_client = std::sync::Mutex::new(first_client.clone());
            wait_for(Duration::from_secs(60), "the CA rotated", || async {
                if let Some(c) = secret(&env, &ns, "fraud-client").await?
                    && pki::issued_by(&text(&c, "tls.crt"), &old_ca_pem)
                {
                    *last_old_client
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))? = c;
                }
                Ok(secret(&env, &ns, "moat-ca")
                    .await?
                    .is_some_and(|s| text(&s, "tls.crt") != old_ca_pem))
            })
            .await?;
            let old_client = last_old_client
                .into_inner()
                .map_err(|_| anyhow::anyhow!("lock"))?;
            let new_ca = secret(&env, &ns, "moat-ca").await?.context("CA")?;
            ensure!(
                pki::pem_certificates(&text(&new_ca, "ca.crt")).len() == 2,
                "the bundle lacks the old CA"
            );
            wait_for(
                Duration::from_secs(30),
                "leaves re-issued by the new CA with the two-CA bundle",
                || async {
                    let s = secret(&env, &ns, "fraud-tls").await?;
                    Ok(s.is_some_and(|s| {
                        pki::pem_certificates(&text(&s, "ca.crt")).len() == 2
                            && serial(&s) != serial(&renewed)
                    }))
                },
            )
            .await?;
            let after = wait_secret(&env, &ns, "fraud-tls").await?;
            let client_after = wait_secret(&env, &ns, "fraud-client").await?;
            let (server_cert, bundle) = material(&after);
            let (old_client_cert, _) = material(&old_client);
            ensure!(pki::issued_by(&old_client_cert.cert_pem, &old_ca_pem));
            ensure!(
                !pki::issued_by(&server_cert_pem(&after), &old_ca_pem),
                "the serving certificate was not re-issued by the new CA"
            );
            // New server (new CA) with a client certificate from the old CA, trusted via the bundle.
            handshake(
                server_config(&server_cert, &bundle, std::slice::from_ref(&allowed)),
                client_config(&bundle, Some(&old_client_cert)),
                &name,
            )
            .map_err(|e| anyhow::anyhow!("old client across the rotation: {e}"))?;
            mtls(&after, &client_after, &name, &allowed)
                .map_err(|e| anyhow::anyhow!("after rotation: {e}"))?;
            Ok(())
        },
    )
    .await;
}
