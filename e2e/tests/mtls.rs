//! Mutual TLS against the local control plane: Moat's CA, the serving certificate of a model,
//! client certificates with two-sided consent (ModelClient), withdrawal, tampering, renewal of
//! short-lived certificates and CA rotation, each checked with a real TLS handshake (rustls).

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
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
    fixture,
    pki::{self, KeyedCertificate},
};
use moat_e2e::{
    NamespaceOptions, Operator, TestEnv, reconciles_started,
    tls::{client_config, handshake, server_config},
    wait_event, wait_ready, wait_smd, wait_until, with_namespace,
};
use serde_json::{Value, json};

/// The model `name`: one replica serving on port 8443, allowing `clients`, with certificates of
/// `lifetime`.
fn smd(name: &str, clients: Value, lifetime: &str) -> fixture::SmdFixture {
    fixture::smd(name)
        .replicas(1)
        .port(8443)
        .clients(clients)
        .certificate_lifetime(lifetime)
}

/// The ModelClient `name` of the model `fraud` in `model_ns`, as ServiceAccount `sa`, stored in
/// the Secret `secret`, with certificates of `lifetime`.
fn model_client(
    name: &str,
    model_ns: &str,
    sa: &str,
    secret: &str,
    lifetime: &str,
) -> Result<ModelClient> {
    Ok(fixture::model_client(name, model_ns, "fraud")
        .service_account(sa)
        .secret(secret)
        .certificate_lifetime(lifetime)
        .build()?)
}

/// The model `fraud` in the test's namespace, allowing ServiceAccount `checkout` of
/// `client_ns`, and that namespace's ModelClient `checkout` asking for `fraud-client`; both with
/// certificates of `lifetime`. Returns the ModelClients' API in `client_ns`.
async fn consenting_pair(
    env: &TestEnv,
    client_ns: &str,
    lifetime: &str,
) -> Result<Api<ModelClient>> {
    let smds: Api<SecureModelDeployment> = env.api();
    smds.create(
        &PostParams::default(),
        &smd(
            "fraud",
            json!([{"namespace": client_ns, "serviceAccounts": ["checkout"]}]),
            lifetime,
        )
        .build()?,
    )
    .await?;
    let mcs: Api<ModelClient> = Api::namespaced(env.client.clone(), client_ns);
    mcs.create(
        &PostParams::default(),
        &model_client(
            "checkout",
            &env.namespace,
            "checkout",
            "fraud-client",
            lifetime,
        )?,
    )
    .await?;
    Ok(mcs)
}

fn text(secret: &Secret, key: &str) -> String {
    moat::core::ca::text(secret, key)
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
    moat_e2e::wait_for_value(
        moat_e2e::DEADLINE,
        &format!("Secret {ns}/{name}"),
        || async { Ok(secret(env, ns, name).await?.filter(|s| serial(s).is_some())) },
    )
    .await
}

async fn wait_mc(
    api: &Api<ModelClient>,
    name: &str,
    ready: bool,
    reason: &str,
) -> Result<ModelClient> {
    // The status must describe the current spec (observedGeneration), so a condition left from
    // before a spec change does not count.
    moat_e2e::wait_for_value(
        moat_e2e::DEADLINE,
        &format!("ModelClient {name} {reason} at its current generation"),
        || async {
            let mc = api.get(name).await?;
            let holds = mc.status.as_ref().is_some_and(|s| {
                s.observed_generation == mc.metadata.generation
                    && s.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && (c.status == "True") == ready
                            && c.reason == reason
                            && c.observed_generation == mc.metadata.generation
                    })
            });
            Ok(holds.then_some(mc))
        },
    )
    .await
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
            let ns = env.namespace.clone();
            let client_ns = env
                .another_namespace(&NamespaceOptions::restricted())
                .await?;
            let stranger_ns = env
                .another_namespace(&NamespaceOptions::restricted())
                .await?;
            let op = env
                .operator()
                .watching(&[&ns, &client_ns, &stranger_ns])
                .start()
                .await?;

            let smds: Api<SecureModelDeployment> = env.api();
            smds.create(
                &PostParams::default(),
                &smd(
                    "fraud",
                    json!([{"namespace": client_ns, "serviceAccounts": ["checkout"]}]),
                    "24h",
                )
                .build()?,
            )
            .await?;
            let ready = wait_ready(&smds, "fraud").await?;

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
            // Ready is written with status.certificate, after the Secret was applied.
            let status = ready
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
            wait_until("the serving certificate repaired", || async {
                Ok(secret(&env, &ns, "fraud-tls")
                    .await?
                    .is_some_and(|s| serial(&s).is_some()))
            })
            .await?;
            secrets
                .delete("fraud-client", &DeleteParams::default())
                .await?;
            let old_serial = serial(&client);
            wait_until("the client Secret recreated", || async {
                Ok(secret(&env, &client_ns, "fraud-client")
                    .await?
                    .is_some_and(|s| serial(&s).is_some() && serial(&s) != old_serial))
            })
            .await?;
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            let client = wait_secret(&env, &client_ns, "fraud-client").await?;
            mtls(&serving, &client, &format!("fraud.{ns}.svc"), &allowed)
                .map_err(anyhow::Error::msg)?;
            // Moat counts the repair in status.drift after it has applied every child: wait for
            // the count rather than read it as soon as the Secret is back.
            let repaired = wait_smd(&smds, "fraud", "status.drift to count a repair", |s| {
                s.status
                    .as_ref()
                    .and_then(|s| s.drift.as_ref())
                    .is_some_and(|d| d.repairs >= 1)
            })
            .await?;
            let drift = repaired
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
            wait_until("the expiry gauge of fraud-tls", || async {
                Ok(op
                    .metrics
                    .certificate_expiry(&ns, "fraud-tls")
                    .is_some_and(|s| s > 23 * 3600))
            })
            .await?;

            // Withdrawn consent: the model drops the client; its Secret is deleted, the status says why.
            smds.patch(
                "fraud",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"access": {"clients": []}}})),
            )
            .await?;
            wait_mc(&mcs, "checkout", false, "NotAllowed").await?;
            wait_until("the withdrawn client Secret deleted", || async {
                Ok(secret(&env, &client_ns, "fraud-client").await?.is_none())
            })
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
            let ns = env.namespace.clone();
            // A CA valid for 60 s rotates at 40 s; certificates of 30 s renew at 20 s.
            let _op = env
                .operator()
                .settings(|s| s.ca.validity = Duration::from_secs(60))
                .start()
                .await?;
            consenting_pair(&env, &ns, "30s").await?;
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
            // The deadline only bounds a failure; that the renewal came before expiry is checked
            // right after.
            wait_until("the serving certificate renewed", || async {
                Ok(secret(&env, &ns, "fraud-tls")
                    .await?
                    .is_some_and(|s| serial(&s).is_some() && serial(&s) != serial(&first_serving)))
            })
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
            wait_until("the CA rotated", || async {
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
            wait_until(
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

fn cert_info(secret: &Secret) -> Result<pki::CertInfo> {
    pki::pem_certificates(&text(secret, "tls.crt"))
        .first()
        .and_then(|d| pki::info(d))
        .context("no readable certificate in tls.crt")
}

/// How often the Events with `reason` about `regarding` record it happened (events.k8s.io/v1:
/// a repeat of the same reason about the same object is recorded as a series on the first
/// Event, which keeps the first note), and when it was last seen (unix seconds).
async fn occurrences(env: &TestEnv, ns: &str, regarding: &str, reason: &str) -> Result<(i32, i64)> {
    use k8s_openapi::api::events::v1::Event;
    let mut count = 0;
    let mut last = 0;
    for e in Api::<Event>::namespaced(env.client.clone(), ns)
        .list(&kube::api::ListParams::default())
        .await?
        .items
    {
        if e.reason.as_deref() != Some(reason)
            || e.regarding.as_ref().and_then(|r| r.name.as_deref()) != Some(regarding)
        {
            continue;
        }
        let (n, seen) = match &e.series {
            Some(s) => (s.count, s.last_observed_time.0.as_second()),
            None => (
                1,
                e.event_time.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
            ),
        };
        count += n;
        last = last.max(seen);
    }
    Ok((count, last))
}

/// Waits until the Events record `reason` about `regarding` once more than `before` times,
/// observed at or after `since` (unix seconds).
async fn wait_recorded_again(
    env: &TestEnv,
    ns: &str,
    regarding: &str,
    reason: &str,
    before: i32,
    since: i64,
) -> Result<()> {
    let what = format!("{reason} recorded again about {regarding}");
    let found = wait_until(&what, || async {
        let (count, last) = occurrences(env, ns, regarding, reason).await?;
        Ok(count > before && last >= since)
    })
    .await;
    if let Err(e) = found {
        let now = occurrences(env, ns, regarding, reason).await?;
        bail!("{e}: (occurrences, last seen) {now:?}, before {before}, since {since}");
    }
    Ok(())
}

#[tokio::test]
async fn model_client_side_withdrawal_status_certificate_and_repair_of_both_secrets() {
    with_namespace(
        "mtls-client-side",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            let client_ns = env
                .another_namespace(&NamespaceOptions::restricted())
                .await?;
            let _op = env.operator().watching(&[&ns, &client_ns]).start().await?;
            let mcs = consenting_pair(&env, &client_ns, "24h").await?;
            wait_mc(&mcs, "checkout", true, "CertificateIssued").await?;
            let client = wait_secret(&env, &client_ns, "fraud-client").await?;
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            let allowed = format!("spiffe://cluster.local/ns/{client_ns}/sa/checkout");
            let server_name = format!("fraud.{ns}.svc");

            // status.certificate describes the certificate in the Secret.
            let check_status = |mc: &ModelClient, secret: &Secret| -> Result<()> {
                let info = cert_info(secret)?;
                let st = mc
                    .status
                    .as_ref()
                    .and_then(|s| s.certificate.clone())
                    .context("no status.certificate")?;
                ensure!(st.secret_name == "fraud-client", "{st:?}");
                ensure!(
                    st.serial == info.serial,
                    "status serial {} != Secret serial {}",
                    st.serial,
                    info.serial
                );
                ensure!(
                    st.not_after.0.as_second() == info.not_after,
                    "{st:?} vs {info:?}"
                );
                ensure!(
                    st.renew_at.0.as_second() == info.renew_at(),
                    "{st:?} vs {info:?}"
                );
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                ensure!(
                    now < info.renew_at() && info.renew_at() < info.not_after,
                    "{info:?}"
                );
                Ok(())
            };
            check_status(&mcs.get("checkout").await?, &client)?;
            wait_event(
                &env,
                &client_ns,
                "checkout",
                "CertificateIssued",
                &[&cert_info(&client)?.serial],
            )
            .await?;

            // The serving Secret deleted: recreated with a new certificate that handshakes.
            let serving_api: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
            serving_api
                .delete("fraud-tls", &DeleteParams::default())
                .await?;
            let old = serial(&serving);
            wait_until("the serving Secret recreated", || async {
                Ok(secret(&env, &ns, "fraud-tls")
                    .await?
                    .is_some_and(|s| serial(&s).is_some() && serial(&s) != old))
            })
            .await?;
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            mtls(&serving, &client, &server_name, &allowed).map_err(anyhow::Error::msg)?;

            // The client Secret's data edited: restored with a valid certificate, the status
            // follows it, and the pair handshakes.
            let client_api: Api<Secret> = Api::namespaced(env.client.clone(), &client_ns);
            client_api
                .patch(
                    "fraud-client",
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"data": {"tls.key": "Z2FyYmFnZQ=="}})),
                )
                .await?;
            wait_until("the client Secret repaired", || async {
                Ok(secret(&env, &client_ns, "fraud-client")
                    .await?
                    .is_some_and(|s| text(&s, "tls.key") != "garbage" && serial(&s).is_some()))
            })
            .await?;
            let client = wait_secret(&env, &client_ns, "fraud-client").await?;
            mtls(&serving, &client, &server_name, &allowed)
                .map_err(|e| anyhow::anyhow!("after the client Secret was repaired: {e}"))?;
            wait_until("status.certificate to follow the repair", || async {
                Ok(check_status(&mcs.get("checkout").await?, &client).is_ok())
            })
            .await?;

            // Withdrawal from the client's side: a ServiceAccount the model does not allow.
            mcs.patch(
                "checkout",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"serviceAccountName": "intruder"}})),
            )
            .await?;
            let mc = wait_mc(&mcs, "checkout", false, "NotAllowed").await?;
            ensure!(
                conditions::is_true(&mc.status.clone().context("status")?.conditions, "Stalled"),
                "{:?}",
                mc.status
            );
            wait_until("the client Secret deleted", || async {
                Ok(secret(&env, &client_ns, "fraud-client").await?.is_none())
            })
            .await?;
            ensure!(
                mcs.get("checkout")
                    .await?
                    .status
                    .and_then(|s| s.certificate)
                    .is_none()
            );
            wait_event(
                &env,
                &client_ns,
                "checkout",
                "CertificateWithdrawn",
                &["fraud-client"],
            )
            .await?;

            // Back to the allowed ServiceAccount: a new certificate; then the ModelClient deleted:
            // its Secret goes with it (owner reference, garbage collection).
            mcs.patch(
                "checkout",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"serviceAccountName": "checkout"}})),
            )
            .await?;
            wait_mc(&mcs, "checkout", true, "CertificateIssued").await?;
            wait_secret(&env, &client_ns, "fraud-client").await?;
            mcs.delete("checkout", &DeleteParams::default()).await?;
            wait_until("the client Secret deleted with its ModelClient", || async {
                Ok(secret(&env, &client_ns, "fraud-client").await?.is_none())
            })
            .await?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_renewal_rolls_the_pods_unless_the_server_reloads_its_certificate() {
    use k8s_openapi::api::apps::v1::ReplicaSet;
    with_namespace(
        "mtls-roll",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            let _op = Operator::start(&ns).await?;
            let smds: Api<SecureModelDeployment> = env.api();
            // 30 s certificates, renewed at 20 s. Without the gate (which reloads the
            // certificate itself, so its pods never roll): the server reads it.
            smds.create(
                &PostParams::default(),
                &smd("rolling", json!([]), "30s")
                    .set(&["spec", "gate"], json!({"mode": "Disabled"}))
                    .build()?,
            )
            .await?;
            smds.create(
                &PostParams::default(),
                &smd("reloading", json!([]), "30s")
                    .set(&["spec", "gate"], json!({"mode": "Disabled"}))
                    .set(&["spec", "tls", "reloadsCertificates"], json!(true))
                    .build()?,
            )
            .await?;
            let deploys: Api<Deployment> = env.api();
            let replica_sets = |name: &'static str| {
                let api: Api<ReplicaSet> = env.api();
                async move {
                    let lp = kube::api::ListParams::default()
                        .labels(&format!("moat.dev/deployment={name}"));
                    anyhow::Ok(api.list(&lp).await?.items)
                }
            };
            let annotations = |d: &Deployment| {
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.clone())
                    .unwrap_or_default()
            };
            let hash_of = |s: &Secret| {
                moat::render::ServingTls {
                    cert_pem: text(s, "tls.crt"),
                    key_pem: text(s, "tls.key"),
                    ca_bundle_pem: text(s, "ca.crt"),
                }
                .hash()
            };
            for name in ["rolling", "reloading"] {
                wait_until(&format!("{name} Ready with one ReplicaSet"), || async {
                    let ready = moat_e2e::is_ready(&smds.get(name).await?);
                    Ok(ready && replica_sets(name).await?.len() == 1)
                })
                .await?;
            }
            let first_rolling = wait_secret(&env, &ns, "rolling-tls").await?;
            let first_reloading = wait_secret(&env, &ns, "reloading-tls").await?;
            let first_serial = cert_info(&first_rolling)?.serial;

            // Default: the pod template carries the certificate's hash.
            let rolling = deploys.get("rolling").await?;
            ensure!(
                annotations(&rolling).get(moat::render::TLS_HASH_ANNOTATION)
                    == Some(&hash_of(&first_rolling)),
                "{:?}",
                annotations(&rolling)
            );
            // A server that reloads its files: no hash, so a renewal leaves the template alone.
            let reloading = deploys.get("reloading").await?;
            ensure!(
                !annotations(&reloading).contains_key(moat::render::TLS_HASH_ANNOTATION),
                "{:?}",
                annotations(&reloading)
            );
            let reloading_template =
                serde_json::to_value(reloading.spec.as_ref().map(|s| &s.template))?;
            let reloading_generation = reloading.metadata.generation;

            // The issue is recorded as an Event (events.k8s.io/v1) on the model.
            wait_event(
                &env,
                &ns,
                "rolling",
                "CertificateIssued",
                &[&first_serial, "no certificate yet"],
            )
            .await?;

            let (rolling_issued, _) =
                occurrences(&env, &ns, "rolling", "CertificateIssued").await?;
            let (reloading_issued, _) =
                occurrences(&env, &ns, "reloading", "CertificateIssued").await?;
            ensure!(rolling_issued >= 1 && reloading_issued >= 1);
            let before_renewal = k8s_openapi::jiff::Timestamp::now().as_second();

            // Renewal: the hash changes to the new certificate's, and the Deployment rolls out a
            // new ReplicaSet.
            wait_until("both serving certificates renewed", || async {
                let a = secret(&env, &ns, "rolling-tls").await?;
                let b = secret(&env, &ns, "reloading-tls").await?;
                Ok(
                    a.is_some_and(|s| serial(&s).is_some() && serial(&s) != serial(&first_rolling))
                        && b.is_some_and(|s| {
                            serial(&s).is_some() && serial(&s) != serial(&first_reloading)
                        }),
                )
            })
            .await?;
            let renewed = wait_secret(&env, &ns, "rolling-tls").await?;
            let renewed_serial = cert_info(&renewed)?.serial;
            wait_until("the new hash in the pod template", || async {
                Ok(annotations(&deploys.get("rolling").await?)
                    .get(moat::render::TLS_HASH_ANNOTATION)
                    == Some(&hash_of(&renewed)))
            })
            .await?;
            wait_until("a new ReplicaSet for the renewed certificate", || async {
                let sets = replica_sets("rolling").await?;
                Ok(sets.len() >= 2
                    && sets.iter().any(|rs| {
                        rs.spec
                            .as_ref()
                            .and_then(|s| s.template.as_ref())
                            .and_then(|t| t.metadata.as_ref())
                            .and_then(|m| m.annotations.as_ref())
                            .and_then(|a| a.get(moat::render::TLS_HASH_ANNOTATION))
                            == Some(&hash_of(&renewed))
                    }))
            })
            .await?;
            wait_until("rolling's status on the renewed certificate", || async {
                Ok(smds
                    .get("rolling")
                    .await?
                    .status
                    .and_then(|s| s.certificate)
                    .is_some_and(|c| c.serial == renewed_serial))
            })
            .await?;
            // The renewal is recorded too (as a repeat of the Event: within the Event recorder's
            // six minutes, the same reason about the same object adds to its series).
            wait_recorded_again(
                &env,
                &ns,
                "rolling",
                "CertificateIssued",
                rolling_issued,
                before_renewal,
            )
            .await?;

            // The reloading model converged on its renewed certificate without a template change.
            let renewed_reloading = wait_secret(&env, &ns, "reloading-tls").await?;
            let renewed_reloading_serial = cert_info(&renewed_reloading)?.serial;
            wait_until("reloading's status on the renewed certificate", || async {
                Ok(smds
                    .get("reloading")
                    .await?
                    .status
                    .and_then(|s| s.certificate)
                    .is_some_and(|c| c.serial == renewed_reloading_serial))
            })
            .await?;
            let reloading = deploys.get("reloading").await?;
            ensure!(
                serde_json::to_value(reloading.spec.as_ref().map(|s| &s.template))?
                    == reloading_template,
                "the renewal changed the pod template of a server that reloads its certificate"
            );
            ensure!(
                reloading.metadata.generation == reloading_generation,
                "the reloading Deployment changed"
            );
            ensure!(
                replica_sets("reloading").await?.len() == 1,
                "the reloading model rolled its pods"
            );
            wait_recorded_again(
                &env,
                &ns,
                "reloading",
                "CertificateIssued",
                reloading_issued,
                before_renewal,
            )
            .await?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_imported_ca_is_used_as_is_and_never_written() {
    with_namespace(
        "mtls-import-ca",
        NamespaceOptions::restricted(),
        |env| async move {
            let ns = env.namespace.clone();
            // The user's CA, in a Secret Moat did not create (no managed-by label).
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let user_ca = pki::generate_ca("corp.example", now, Duration::from_secs(7 * 86_400))?;
            let secrets: Api<Secret> = env.api();
            let created = secrets
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": "corp-ca", "labels": {"owner": "security-team"}},
                        "type": "kubernetes.io/tls",
                        "stringData": {"tls.crt": user_ca.cert_pem, "tls.key": user_ca.key_pem}
                    }))?,
                )
                .await?;
            let version = created.metadata.resource_version.clone();
            let audit_from = moat_e2e::audit_offset()?;
            let op = env
                .operator()
                .resync(Duration::from_secs(2))
                .settings(|s| s.ca.secret_name = "corp-ca".into())
                .start()
                .await?;
            let mcs = consenting_pair(&env, &ns, "24h").await?;
            wait_mc(&mcs, "checkout", true, "CertificateIssued").await?;
            let serving = wait_secret(&env, &ns, "fraud-tls").await?;
            let client = wait_secret(&env, &ns, "fraud-client").await?;

            // Both certificates chain to the user's CA, which is the whole trust bundle.
            for s in [&serving, &client] {
                ensure!(
                    pki::issued_by(&text(s, "tls.crt"), &user_ca.cert_pem),
                    "not issued by the imported CA"
                );
                ensure!(
                    pki::pem_certificates(&text(s, "ca.crt"))
                        == pki::pem_certificates(&user_ca.cert_pem),
                    "the bundle is not the imported CA"
                );
            }
            let dir = std::env::temp_dir().join(format!("moat-e2e-{ns}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("ca.pem"), &user_ca.cert_pem)?;
            std::fs::write(dir.join("serving.pem"), text(&serving, "tls.crt"))?;
            let verify = std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.join("ca.pem"))
                .arg(dir.join("serving.pem"))
                .output()
                .context("running openssl (make deps installs it)")?;
            std::fs::remove_dir_all(&dir).ok();
            ensure!(
                verify.status.success(),
                "openssl verify: {}{}",
                String::from_utf8_lossy(&verify.stdout),
                String::from_utf8_lossy(&verify.stderr)
            );
            mtls(
                &serving,
                &client,
                &format!("fraud.{ns}.svc"),
                &format!("spiffe://cluster.local/ns/{ns}/sa/checkout"),
            )
            .map_err(anyhow::Error::msg)?;

            // Reconciles go on (resync every 2 s, a repaired serving Secret), and the CA Secret
            // is never written: same resourceVersion, labels and data.
            Api::<Secret>::namespaced(env.client.clone(), &ns)
                .patch(
                    "fraud-tls",
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"data": {"tls.crt": "Z2FyYmFnZQ=="}})),
                )
                .await?;
            wait_until("the serving certificate repaired", || async {
                Ok(secret(&env, &ns, "fraud-tls")
                    .await?
                    .is_some_and(|s| pki::issued_by(&text(&s, "tls.crt"), &user_ca.cert_pem)))
            })
            .await?;
            // "Never written" is observed over a bounded window, counted in reconciles rather
            // than seconds: three complete resyncs (every 2 s) after the repair, about the 5 s
            // this window used to be when idle, and longer when the machine is busy.
            let mark = reconciles_started(&op.metrics)?;
            op.wait_reconciles_after(mark, 3, "three resyncs after the repair")
                .await?;
            let after = secrets.get("corp-ca").await?;
            ensure!(
                after.metadata.resource_version == version,
                "Moat wrote the imported CA Secret"
            );
            ensure!(
                after.metadata.labels == created.metadata.labels,
                "{:?}",
                after.metadata.labels
            );
            ensure!(
                text(&after, "tls.crt") == user_ca.cert_pem && text(&after, "ca.crt").is_empty()
            );
            // The audit log agrees: no write to it by Moat.
            let writes: Vec<String> = std::fs::read_to_string(moat_e2e::tool("MOAT_AUDIT_LOG")?)?
                .get(usize::try_from(audit_from)?..)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| {
                    e["objectRef"]["resource"] == "secrets"
                        && e["objectRef"]["namespace"] == json!(ns)
                        && e["objectRef"]["name"] == "corp-ca"
                        && !matches!(e["verb"].as_str(), Some("get" | "list" | "watch"))
                })
                .map(|e| format!("{} by {}", e["verb"], e["userAgent"]))
                .collect();
            ensure!(writes.is_empty(), "writes to the imported CA: {writes:?}");
            Ok(())
        },
    )
    .await;
}
