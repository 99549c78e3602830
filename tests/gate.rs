//! `moat gate` as a process, on real sockets: a model server written here on loopback, the gate
//! in front of it with certificates from Moat's CA, and clients with and without certificates.
//! The policy and certificate files are laid out the way the kubelet projects a ConfigMap or
//! Secret (`..data` swapped atomically), and rewritten the way it does.
//!
//! Timeouts here only detect a failure (a gate that buffers, hangs or never closes); no test
//! waits for a guessed duration.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat::pki::{self, Ca, Identity, KeyedCertificate};
use serde_json::{Value, json};
use tokio::{
    net::TcpStream,
    sync::{Notify, broadcast, mpsc},
};
use tokio_rustls::TlsConnector;

const MOAT: &str = env!("CARGO_BIN_EXE_moat");
const TRUST_DOMAIN: &str = "cluster.local";
/// Detects a failure; never a duration anything is expected to take.
const FAILURE: Duration = Duration::from_secs(60);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn spiffe(ns: &str, sa: &str) -> String {
    Identity::client(ns, sa).spiffe_id(TRUST_DOMAIN)
}

/// Moat's CA, the model's serving certificate, and client certificates.
struct Pki {
    ca: Ca,
    server: KeyedCertificate,
}

impl Pki {
    fn new() -> Self {
        let material = pki::generate_ca(
            TRUST_DOMAIN,
            now() - 3 * 86400,
            Duration::from_secs(10 * 86400),
        )
        .expect("ca");
        let ca = Ca::load(&material, now()).expect("load ca");
        let server = Self::serving(&ca);
        Self { ca, server }
    }

    fn serving(ca: &Ca) -> KeyedCertificate {
        ca.issue(
            &Identity::server("ml", "fraud", "fraud", TRUST_DOMAIN),
            TRUST_DOMAIN,
            now(),
            Duration::from_secs(3600),
        )
        .expect("serving")
    }

    fn client(&self, ns: &str, sa: &str) -> KeyedCertificate {
        self.ca
            .issue(
                &Identity::client(ns, sa),
                TRUST_DOMAIN,
                now(),
                Duration::from_secs(3600),
            )
            .expect("client")
    }
}

/// Writes `files` into `dir` as the kubelet does: a new timestamped directory, `..data` pointing
/// at it (swapped by rename), and each file a link through `..data`.
fn project(dir: &Path, files: &[(&str, &[u8])]) {
    static VERSION: AtomicUsize = AtomicUsize::new(0);
    let version = format!("..v{}", VERSION.fetch_add(1, Ordering::Relaxed));
    let target = dir.join(&version);
    std::fs::create_dir_all(&target).expect("mkdir");
    for (name, content) in files {
        std::fs::write(target.join(name), content).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("link");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running `moat gate`, its files and its audit log.
struct Gate {
    child: Child,
    port: u16,
    health: u16,
    metrics: u16,
    dir: tempfile::TempDir,
    audit: Arc<Mutex<Vec<Value>>>,
    ca_pem: String,
}

impl Gate {
    async fn start(pki: &Pki, upstream: SocketAddr, protocol: &str, policy: &Value) -> Self {
        let gate = Self::spawn(pki, upstream, protocol, policy);
        gate.wait_ready().await;
        gate
    }

    /// Started, not waited for.
    fn start_unready(pki: &Pki, upstream: SocketAddr, policy: &Value) -> Self {
        Self::spawn(pki, upstream, "http1", policy)
    }

    fn spawn(pki: &Pki, upstream: SocketAddr, protocol: &str, policy: &Value) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        let gate = dir.path().join("gate");
        std::fs::create_dir_all(&tls).expect("mkdir");
        std::fs::create_dir_all(&gate).expect("mkdir");
        project(
            &tls,
            &[
                ("tls.crt", pki.server.cert_pem.as_bytes()),
                ("tls.key", pki.server.key_pem.as_bytes()),
                ("ca.crt", pki.ca.cert_pem.as_bytes()),
            ],
        );
        project(&gate, &[("policy.json", policy.to_string().as_bytes())]);
        let (port, health, metrics) = (free_port(), free_port(), free_port());
        let mut child = Command::new(MOAT)
            .args(["gate", "--upstream", &upstream.to_string()])
            .args(["--upstream-protocol", protocol])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--health-listen", &format!("127.0.0.1:{health}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--cert")
            .arg(tls.join("tls.crt"))
            .arg("--key")
            .arg(tls.join("tls.key"))
            .arg("--ca")
            .arg(tls.join("ca.crt"))
            .arg("--policy")
            .arg(gate.join("policy.json"))
            .args(["--drain", "30s"])
            .stdout(Stdio::piped())
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .expect("moat gate");
        let stdout = child.stdout.take().expect("stdout");
        let audit = Arc::new(Mutex::new(Vec::new()));
        let lines = audit.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"));
                lines.lock().expect("lock").push(value);
            }
        });
        Self {
            child,
            port,
            health,
            metrics,
            dir,
            audit,
            ca_pem: pki.ca.cert_pem.clone(),
        }
    }

    fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("gate")
    }

    fn write_policy(&self, policy: &Value) {
        project(
            &self.policy_dir(),
            &[("policy.json", policy.to_string().as_bytes())],
        );
    }

    fn renew(&self, pki: &Pki, server: &KeyedCertificate) {
        project(
            &self.dir.path().join("tls"),
            &[
                ("tls.crt", server.cert_pem.as_bytes()),
                ("tls.key", server.key_pem.as_bytes()),
                ("ca.crt", pki.ca.cert_pem.as_bytes()),
            ],
        );
    }

    async fn wait_ready(&self) {
        tokio::time::timeout(FAILURE, async {
            loop {
                if let Ok((status, _)) = plain_get(self.health, "/readyz").await
                    && status == 200
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the gate never became ready");
    }

    async fn metrics(&self) -> String {
        plain_get(self.metrics, "/metrics")
            .await
            .expect("metrics")
            .1
    }

    /// The audit line of `request_id`, once written.
    async fn audit_line(&self, request_id: &str) -> Value {
        tokio::time::timeout(FAILURE, async {
            loop {
                if let Some(line) = self
                    .audit
                    .lock()
                    .expect("lock")
                    .iter()
                    .find(|l| l["request_id"] == request_id)
                {
                    return line.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no audit line for {request_id}"))
    }

    fn connector(&self, client: Option<&KeyedCertificate>, alpn: &[&[u8]]) -> TlsConnector {
        connector(&self.ca_pem, client, alpn)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET on a plaintext port, with a fresh connection.
async fn plain_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

fn connector(ca_pem: &str, client: Option<&KeyedCertificate>, alpn: &[&[u8]]) -> TlsConnector {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("ca")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert"),
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

type Sender = hyper::client::conn::http1::SendRequest<BoxBody<Bytes, std::io::Error>>;

/// An HTTP/1.1 connection to the gate through `tls`; also returns the server certificate.
async fn h1(port: u16, tls: &TlsConnector) -> (Sender, Vec<u8>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("fraud.ml.svc").expect("name");
    let stream = tls.connect(name, tcp).await.expect("TLS handshake");
    let server_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, server_cert, task)
}

/// An HTTP/2 connection to the gate (ALPN h2) with `client`'s certificate.
async fn h2(
    gate: &Gate,
    client: &KeyedCertificate,
) -> hyper::client::conn::http2::SendRequest<BoxBody<Bytes, std::io::Error>> {
    let tls = gate.connector(Some(client), &[b"h2"]);
    let tcp = TcpStream::connect(("127.0.0.1", gate.port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("fraud.ml.svc").expect("name");
    let stream = tls.connect(name, tcp).await.expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2");
    tokio::spawn(conn);
    send
}

fn body(bytes: impl Into<Bytes>) -> BoxBody<Bytes, std::io::Error> {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn req(
    method: &str,
    path: &str,
    content: impl Into<Bytes>,
) -> Request<BoxBody<Bytes, std::io::Error>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "fraud.ml.svc")
        .body(body(content))
        .expect("request")
}

struct Answer {
    status: u16,
    request_id: String,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn call(send: &mut Sender, request: Request<BoxBody<Bytes, std::io::Error>>) -> Answer {
    send.ready().await.expect("connection ready");
    let res = send.send_request(request).await.expect("response");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        request_id,
        headers,
        body,
    }
}

/// One request on a new connection.
async fn once(
    gate: &Gate,
    client: Option<&KeyedCertificate>,
    request: Request<BoxBody<Bytes, std::io::Error>>,
) -> Answer {
    let (mut send, _, _task) = h1(gate.port, &gate.connector(client, &[b"http/1.1"])).await;
    call(&mut send, request).await
}

/// The model server: `/echo` returns the body and what the gate told it; `/sse` sends an event
/// whenever the test acknowledged the previous one; `/hold` streams whatever is pushed and says
/// when it is dropped; `/grpc.Test/Unary` answers with gRPC trailers.
#[derive(Default)]
struct Model {
    hits: AtomicUsize,
    sse_acks: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    push: Mutex<Option<broadcast::Sender<Bytes>>>,
    dropped: Notify,
    holds_dropped: AtomicUsize,
}

type ModelBody = BoxBody<Bytes, std::io::Error>;

struct DropSignal(Arc<Model>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.holds_dropped.fetch_add(1, Ordering::AcqRel);
        self.0.dropped.notify_waiters();
    }
}

impl Model {
    fn pusher(&self) -> broadcast::Sender<Bytes> {
        self.push
            .lock()
            .expect("lock")
            .get_or_insert_with(|| broadcast::channel(64).0)
            .clone()
    }

    async fn serve(self: Arc<Self>, req: Request<Incoming>) -> Response<ModelBody> {
        self.hits.fetch_add(1, Ordering::AcqRel);
        let seen = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let identity = seen("x-moat-client-identity");
        let request_id = seen("x-request-id");
        match req.uri().path() {
            "/echo" => {
                let content = req.into_body().collect().await.map(|b| b.to_bytes());
                Response::builder()
                    .header("x-seen-identity", identity)
                    .header("x-seen-request-id", request_id)
                    .body(body(content.unwrap_or_default()))
                    .expect("response")
            }
            "/sse" => {
                let acks = self.sse_acks.lock().expect("lock").take();
                let stream = futures::stream::unfold((0, acks), |(i, mut acks)| async move {
                    if i == 3 {
                        return None;
                    }
                    if i > 0 {
                        acks.as_mut()?.recv().await?;
                    }
                    let event = Frame::data(Bytes::from(format!("data: {{\"chunk\": {i}}}\n\n")));
                    Some((Ok::<_, std::io::Error>(event), (i + 1, acks)))
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .expect("response")
            }
            "/hold" => {
                let rx = self.pusher().subscribe();
                let guard = DropSignal(self.clone());
                let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
                    let chunk = rx.recv().await.ok()?;
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk)), (rx, guard)))
                });
                Response::builder()
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .expect("response")
            }
            "/grpc.Test/Unary" => {
                let _ = req.into_body().collect().await;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().expect("value"));
                trailers.insert("grpc-message", "served".parse().expect("value"));
                let frames = vec![
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                    Ok(Frame::trailers(trailers)),
                ];
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                        frames,
                    ))))
                    .expect("response")
            }
            "/fail" => Response::builder()
                .status(500)
                .body(body("broken"))
                .expect("response"),
            _ => Response::builder()
                .status(200)
                .body(body("{\"data\": []}"))
                .expect("response"),
        }
    }
}

/// Serves `model` on loopback over HTTP/1.1 and cleartext HTTP/2.
async fn serve_model(model: Arc<Model>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let model = model.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let model = model.clone();
                    async move { Ok::<_, std::convert::Infallible>(model.serve(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

fn policy(identities: &[&str]) -> Value {
    json!({"identities": identities})
}

async fn setup(policy: &Value) -> (Pki, Arc<Model>, Gate) {
    let pki = Pki::new();
    let model = Arc::new(Model::default());
    let addr = serve_model(model.clone()).await;
    let gate = Gate::start(&pki, addr, "http1", policy).await;
    (pki, model, gate)
}

/// 1. An allowed identity gets the model's answer; the model sees the caller's identity and the
/// request id, and the audit line records the request without its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consented_identity_is_served_and_audited() {
    let alice = spiffe("payments", "checkout");
    let (pki, _model, gate) = setup(&policy(&[&alice])).await;
    let client = pki.client("payments", "checkout");
    let secret = "card=4111111111111111";
    let payload = format!(
        "{{\"input\": \"{secret}\", \"pad\": \"{}\"}}",
        "x".repeat(1000)
    );
    let answer = once(&gate, Some(&client), req("POST", "/echo", payload.clone())).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, payload.as_bytes());
    assert_eq!(answer.headers["x-seen-identity"], alice.as_str());
    assert_eq!(
        answer.headers["x-seen-request-id"],
        answer.request_id.as_str()
    );
    let line = gate.audit_line(&answer.request_id).await;
    assert_eq!(line["identity"], alice.as_str());
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/echo");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], payload.len());
    assert_eq!(line["bytes_out"], payload.len());
    assert_eq!(line["complete"], true);
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert!(
        !line.to_string().contains(secret),
        "a body reached the audit log: {line}"
    );
    // Over HTTP/2 too.
    let mut send = h2(&gate, &client).await;
    let res = send
        .send_request(
            Request::post("https://fraud.ml.svc/echo")
                .body(body("over h2"))
                .expect("request"),
        )
        .await
        .expect("h2 response");
    assert_eq!(res.status(), StatusCode::OK);
    let id = res.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    assert_eq!(
        res.into_body().collect().await.expect("body").to_bytes(),
        "over h2"
    );
    assert_eq!(gate.audit_line(&id).await["protocol"], "HTTP/2.0");
}

/// 2 and 3. A client consented only elsewhere, no certificate, another CA's certificate (naming
/// a consented identity) and an expired one are each refused with their reason; none reaches
/// the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_caller_is_refused_with_its_reason() {
    let alice = spiffe("payments", "checkout");
    let (pki, model, gate) = setup(&policy(&[&alice])).await;
    let other_model_client = pki.client("payments", "billing");
    let foreign_material =
        pki::generate_ca(TRUST_DOMAIN, now() - 60, Duration::from_secs(86400)).expect("ca");
    let foreign = Ca::load(&foreign_material, now())
        .expect("ca")
        .issue(
            &Identity::client("payments", "checkout"),
            TRUST_DOMAIN,
            now(),
            Duration::from_secs(3600),
        )
        .expect("cert");
    let expired = pki
        .ca
        .issue(
            &Identity::client("payments", "checkout"),
            TRUST_DOMAIN,
            now() - 2 * 86400,
            Duration::from_secs(3600),
        )
        .expect("cert");
    for (client, status, reason, says) in [
        (
            Some(&other_model_client),
            403,
            "NotConsented",
            "spiffe://cluster.local/ns/payments/sa/billing may not call",
        ),
        (
            None,
            401,
            "NoCertificate",
            "a client certificate is required",
        ),
        (
            Some(&foreign),
            403,
            "UntrustedCertificate",
            "not one Moat's CA vouches for",
        ),
        (Some(&expired), 403, "UntrustedCertificate", "xpired"),
    ] {
        let answer = once(&gate, client, req("POST", "/echo", "hello")).await;
        assert_eq!(answer.status, status, "{reason}: {:?}", answer.body);
        let message: Value = serde_json::from_slice(&answer.body).expect("json refusal");
        assert_eq!(message["reason"], reason);
        assert!(
            message["error"].as_str().expect("error").contains(says),
            "{message}"
        );
        let line = gate.audit_line(&answer.request_id).await;
        assert_eq!(line["reason"], reason);
        assert_eq!(line["status"], status);
    }
    assert_eq!(
        model.hits.load(Ordering::Acquire),
        0,
        "a refused request reached the model"
    );
    let metrics = gate.metrics().await;
    // Refusals are counted by the caller's label: `unconsented` for a verified identity the
    // policy does not list (its SPIFFE ID is in the audit line only), `unverified` for a caller
    // without a certificate Moat's CA issued and still valid.
    assert!(
        metrics.contains(
            "moat_gate_refusals_total{identity=\"unconsented\",reason=\"NotConsented\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&spiffe("payments", "billing")),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "moat_gate_refusals_total{identity=\"unverified\",reason=\"NoCertificate\"} 1"
        ),
        "{metrics}"
    );
}

/// The `identity` label of the gate's metrics is bounded by the policy: any number of verified
/// identities the policy does not list share the label `unconsented` (each is in its audit
/// line), and a caller consented to while its connection is open is counted under its own
/// identity from its next request on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_identities_are_the_policys_and_unconsented_callers_share_one_label() {
    let alice = spiffe("payments", "checkout");
    let (pki, _model, gate) = setup(&policy(&[&alice])).await;
    let strangers = ["probe-1", "probe-2", "probe-3"];
    for sa in strangers {
        let answer = once(
            &gate,
            Some(&pki.client("payments", sa)),
            req("GET", "/v1/models", ""),
        )
        .await;
        assert_eq!(answer.status, 403);
        let line = gate.audit_line(&answer.request_id).await;
        assert_eq!(line["identity"], spiffe("payments", sa).as_str());
    }
    // carol connects before she is consented, and keeps the connection open.
    let carol = spiffe("payments", "carol");
    let tls = gate.connector(Some(&pki.client("payments", "carol")), &[b"http/1.1"]);
    let (mut send, _, _task) = h1(gate.port, &tls).await;
    let refused = call(&mut send, req("GET", "/v1/models", "")).await;
    assert_eq!(refused.status, 403);
    gate.audit_line(&refused.request_id).await;
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            "moat_gate_refusals_total{identity=\"unconsented\",reason=\"NotConsented\"} 4"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("moat_gate_requests_total{identity=\"unconsented\",code=\"403\"} 4"),
        "{metrics}"
    );
    for sa in strangers.iter().chain(&["carol"]) {
        assert!(!metrics.contains(&spiffe("payments", sa)), "{metrics}");
    }
    // Consented: the same connection is served, and counted as carol.
    gate.write_policy(&policy(&[&alice, &carol]));
    let served = tokio::time::timeout(FAILURE, async {
        loop {
            let answer = call(&mut send, req("GET", "/v1/models", "")).await;
            if answer.status == 200 {
                return answer;
            }
        }
    })
    .await
    .expect("carol was never served on her open connection");
    gate.audit_line(&served.request_id).await;
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(&format!(
            "moat_gate_requests_total{{identity=\"{carol}\",code=\"200\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains("moat_gate_requests_total{identity=\"unconsented\",code=\"200\"}"),
        "{metrics}"
    );
}

/// A POST of 4 KiB in 8 chunks, without a declared length.
fn streamed_4_kib() -> Request<BoxBody<Bytes, std::io::Error>> {
    let chunks = futures::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'y'; 512])))),
    );
    Request::post("/echo")
        .header("host", "fraud.ml.svc")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .expect("request")
}

/// 4. Limits: a body over the limit (declared, and streamed without a length), a path and a
/// method not allowed, too many requests in flight, and over the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_404_405_and_429_never_a_hang() {
    let alice = spiffe("payments", "checkout");
    let limited = json!({
        "identities": [alice],
        "limits": {
            "maxRequestBytes": 1024,
            "paths": ["/echo", "/hold", "/v1/*"],
            "maxConcurrentRequests": 1,
            "requestsPerSecond": 1,
            "burst": 1000,
        },
    });
    let (pki, model, gate) = setup(&limited).await;
    let client = pki.client("payments", "checkout");
    assert_eq!(
        once(&gate, Some(&client), req("POST", "/echo", vec![b'x'; 1024]))
            .await
            .status,
        200
    );
    let big = once(&gate, Some(&client), req("POST", "/echo", vec![b'x'; 1025])).await;
    assert_eq!(big.status, 413, "{:?}", big.body);
    // Streamed in chunks without a length: refused when the count passes the limit.
    let answer = once(&gate, Some(&client), streamed_4_kib()).await;
    assert_eq!(answer.status, 413, "{:?}", answer.body);
    assert_eq!(
        once(&gate, Some(&client), req("GET", "/admin", ""))
            .await
            .status,
        404
    );
    assert_eq!(
        once(&gate, Some(&client), req("DELETE", "/v1/models", ""))
            .await
            .status,
        405
    );
    assert_eq!(
        once(&gate, Some(&client), req("GET", "/v1/../admin", ""))
            .await
            .status,
        400
    );
    // One request in flight holds the only slot: the next is refused at once.
    let (mut held, _, _task) = h1(gate.port, &gate.connector(Some(&client), &[b"http/1.1"])).await;
    let hold = held
        .send_request(req("GET", "/hold", ""))
        .await
        .expect("hold");
    assert_eq!(hold.status(), 200);
    let busy = once(&gate, Some(&client), req("GET", "/v1/models", "")).await;
    assert_eq!(busy.status, 429);
    assert_eq!(busy.headers["retry-after"], "1");
    let why: Value = serde_json::from_slice(&busy.body).expect("json");
    assert_eq!(why["reason"], "TooManyConcurrent");
    drop(hold);
    drop(held);
    let hits = model.hits.load(Ordering::Acquire);
    // Rate: 1 per second after a burst; tighten the burst to 2 and count what passes.
    let mut rate = limited.clone();
    rate["limits"]["burst"] = json!(2);
    rate["limits"]["maxConcurrentRequests"] = json!(64);
    gate.write_policy(&rate);
    // Wait until the gate has loaded it (its reload count).
    tokio::time::timeout(FAILURE, async {
        while !gate
            .metrics()
            .await
            .contains("moat_gate_reloads_total{what=\"policy\",result=\"loaded\"} 2")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new policy was never loaded");
    let started = std::time::Instant::now();
    let (mut send, _, _task) = h1(gate.port, &gate.connector(Some(&client), &[b"http/1.1"])).await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(call(&mut send, req("GET", "/v1/models", "")).await.status);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let passed = codes.iter().filter(|c| **c == 200).count();
    // The bucket kept from before holds at most the burst (2), and refills 1 per second.
    assert!(
        passed as f64 <= 2.0 + elapsed.ceil(),
        "{passed} passed in {elapsed:.2} s: {codes:?}"
    );
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    if elapsed < 7.0 {
        assert!(codes.contains(&429), "{codes:?}");
    }
    assert!(model.hits.load(Ordering::Acquire) >= hits);
}

/// 5. Server-sent events pass one by one: the model sends each event only after the client
/// has received the previous one, so a gate that buffered would never deliver the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_pass_chunk_by_chunk() {
    let alice = spiffe("payments", "checkout");
    let (pki, model, gate) = setup(&policy(&[&alice])).await;
    let (ack, acks) = mpsc::unbounded_channel();
    *model.sse_acks.lock().expect("lock") = Some(acks);
    let client = pki.client("payments", "checkout");
    let (mut send, _, _task) = h1(gate.port, &gate.connector(Some(&client), &[b"http/1.1"])).await;
    let res = send
        .send_request(req("GET", "/sse", ""))
        .await
        .expect("sse");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert!(res.headers().get("content-encoding").is_none());
    let mut body = res.into_body();
    for i in 0..3 {
        let frame = tokio::time::timeout(FAILURE, body.frame())
            .await
            .unwrap_or_else(|_| panic!("event {i} never arrived: the gate holds it back"))
            .expect("a frame")
            .expect("frame");
        let data = frame.into_data().expect("data");
        assert_eq!(data, format!("data: {{\"chunk\": {i}}}\n\n").as_bytes());
        let _ = ack.send(());
    }
    assert!(
        body.frame().await.is_none(),
        "the stream ends after 3 events"
    );
}

/// 6. gRPC: an HTTP/2 client through the gate to an HTTP/2 model server gets the trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_pass_intact() {
    let alice = spiffe("payments", "checkout");
    let pki = Pki::new();
    let model = Arc::new(Model::default());
    let addr = serve_model(model.clone()).await;
    let gate = Gate::start(&pki, addr, "http2", &policy(&[&alice])).await;
    let client = pki.client("payments", "checkout");
    let mut send = h2(&gate, &client).await;
    let res = send
        .send_request(
            Request::post("https://fraud.ml.svc/grpc.Test/Unary")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body(Bytes::from_static(b"\0\0\0\0\x02yo")))
                .expect("request"),
        )
        .await
        .expect("grpc response");
    assert_eq!(res.status(), StatusCode::OK);
    let collected = res.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "served");
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
}

/// A body streamed over the limit to an HTTP/2 model server (every gRPC call has no declared
/// length) is answered 413 too: HTTP/2's client reports only the reset stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_is_413_with_an_http2_upstream() {
    let alice = spiffe("payments", "checkout");
    let pki = Pki::new();
    let model = Arc::new(Model::default());
    let addr = serve_model(model.clone()).await;
    let limited = json!({"identities": [alice], "limits": {"maxRequestBytes": 1024}});
    let gate = Gate::start(&pki, addr, "http2", &limited).await;
    let client = pki.client("payments", "checkout");
    let answer = once(&gate, Some(&client), streamed_4_kib()).await;
    assert_eq!(answer.status, 413, "{:?}", answer.body);
    let line = gate.audit_line(&answer.request_id).await;
    assert_eq!(line["reason"], "TooLarge", "{line}");
}

/// 7. A client that goes away mid-stream cancels the request upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_cancels_the_upstream_request() {
    let alice = spiffe("payments", "checkout");
    let (pki, model, gate) = setup(&policy(&[&alice])).await;
    let client = pki.client("payments", "checkout");
    let (mut send, _, task) = h1(gate.port, &gate.connector(Some(&client), &[b"http/1.1"])).await;
    let res = send
        .send_request(req("GET", "/hold", ""))
        .await
        .expect("hold");
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let dropped = model.dropped.notified();
    tokio::pin!(dropped);
    dropped.as_mut().enable();
    assert_eq!(model.holds_dropped.load(Ordering::Acquire), 0);
    drop(res);
    drop(send);
    task.abort();
    tokio::time::timeout(FAILURE, dropped)
        .await
        .expect("the model's request was never cancelled");
    let line = gate.audit_line(&id).await;
    assert_eq!(line["complete"], false, "{line}");
}

/// The next data frame of a streamed body (`what` names it if none comes).
async fn chunk(body: &mut Incoming, what: &str) -> Bytes {
    tokio::time::timeout(FAILURE, body.frame())
        .await
        .unwrap_or_else(|_| panic!("{what} never arrived"))
        .expect("a frame")
        .expect("frame")
        .into_data()
        .expect("data")
}

async fn read_to_close(body: &mut Incoming) -> Result<(), String> {
    loop {
        match body.frame().await {
            None => return Err("the stream ended normally".into()),
            Some(Err(_)) => return Ok(()),
            Some(Ok(_)) => {}
        }
    }
}

/// 8 and 9. Revoking an identity closes its open stream and refuses it afterwards, while
/// another identity's stream flows on. Quarantine closes every stream and refuses everyone
/// with 503; lifting it restores service, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_quarantine_close_open_streams_and_lifting_restores_service() {
    let alice = spiffe("payments", "checkout");
    let bob = spiffe("payments", "fraud-review");
    let (pki, model, gate) = setup(&policy(&[&alice, &bob])).await;
    let pusher = model.pusher();
    let alice_cert = pki.client("payments", "checkout");
    let bob_cert = pki.client("payments", "fraud-review");
    let open = |cert: KeyedCertificate| {
        let gate_port = gate.port;
        let tls = gate.connector(Some(&cert), &[b"http/1.1"]);
        async move {
            let (mut send, _, task) = h1(gate_port, &tls).await;
            let res = send
                .send_request(req("GET", "/hold", ""))
                .await
                .expect("hold");
            assert_eq!(res.status(), 200);
            (send, res.into_body(), task)
        }
    };
    let (_a_send, mut alice_stream, _a) = open(alice_cert.clone()).await;
    let (_b_send, mut bob_stream, _b) = open(bob_cert.clone()).await;
    let _ = pusher.send(Bytes::from_static(b"first"));
    for stream in [&mut alice_stream, &mut bob_stream] {
        assert_eq!(chunk(stream, "chunk").await, "first");
    }
    // Revoke alice.
    gate.write_policy(&policy(&[&bob]));
    tokio::time::timeout(FAILURE, read_to_close(&mut alice_stream))
        .await
        .expect("alice's stream was never closed")
        .expect("closed, not ended");
    let refused = once(&gate, Some(&alice_cert), req("GET", "/v1/models", "")).await;
    assert_eq!(refused.status, 403);
    let _ = pusher.send(Bytes::from_static(b"second"));
    assert_eq!(chunk(&mut bob_stream, "bob's chunk").await, "second");
    // Quarantine: bob's stream closes too, and everyone is refused.
    let mut quarantined = policy(&[&alice, &bob]);
    quarantined["quarantine"] = json!({"reason": "incident INC-7"});
    gate.write_policy(&quarantined);
    tokio::time::timeout(FAILURE, read_to_close(&mut bob_stream))
        .await
        .expect("bob's stream was never closed")
        .expect("closed, not ended");
    for cert in [&alice_cert, &bob_cert] {
        let answer = once(&gate, Some(cert), req("GET", "/v1/models", "")).await;
        assert_eq!(answer.status, 503);
        let why: Value = serde_json::from_slice(&answer.body).expect("json");
        assert_eq!(why["reason"], "Quarantined");
        assert!(
            why["error"].as_str().expect("error").contains("INC-7"),
            "{why}"
        );
    }
    assert!(gate.metrics().await.contains("moat_gate_quarantined 1"));
    // Lifted: served again.
    gate.write_policy(&policy(&[&alice, &bob]));
    tokio::time::timeout(FAILURE, async {
        loop {
            if once(&gate, Some(&alice_cert), req("GET", "/v1/models", ""))
                .await
                .status
                == 200
            {
                return;
            }
        }
    })
    .await
    .expect("service never came back");
    assert!(gate.metrics().await.contains("moat_gate_quarantined 0"));
}

/// 10. A certificate renewal under steady load: every request succeeds, new connections get
/// the new certificate, and a connection opened before the renewal keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewal_under_load_drops_no_request() {
    let alice = spiffe("payments", "checkout");
    let (pki, _model, gate) = setup(&policy(&[&alice])).await;
    let client = pki.client("payments", "checkout");
    let tls = gate.connector(Some(&client), &[b"http/1.1"]);
    let (mut before, old_cert, _task) = h1(gate.port, &tls).await;
    assert_eq!(
        call(&mut before, req("GET", "/v1/models", "")).await.status,
        200
    );
    let renewed = Pki::serving(&pki.ca);
    let new_der = pki::pem_certificates(&renewed.cert_pem).remove(0);
    assert_ne!(old_cert, new_der);
    let mut served = 0;
    let mut renewed_at = None;
    let result = tokio::time::timeout(FAILURE, async {
        loop {
            let (mut send, cert, _task) = h1(gate.port, &tls).await;
            let answer = call(&mut send, req("POST", "/echo", "steady")).await;
            assert_eq!(answer.status, 200, "request {served} failed");
            served += 1;
            if served == 20 {
                gate.renew(&pki, &renewed);
                renewed_at = Some(served);
            }
            if cert == new_der {
                // A few more on the new certificate, then stop.
                if served > renewed_at.unwrap_or(usize::MAX) + 20 {
                    return;
                }
            } else {
                assert_eq!(cert, old_cert);
            }
        }
    })
    .await;
    result.expect("new connections never got the renewed certificate");
    assert_eq!(
        call(&mut before, req("GET", "/v1/models", "")).await.status,
        200
    );
}

/// On SIGTERM the gate turns unready, refuses new connections, lets an open stream finish, and
/// exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_requests_then_exits() {
    let alice = spiffe("payments", "checkout");
    let (pki, model, mut gate) = setup(&policy(&[&alice])).await;
    let pusher = model.pusher();
    let client = pki.client("payments", "checkout");
    let (mut send, _, _task) = h1(gate.port, &gate.connector(Some(&client), &[b"http/1.1"])).await;
    let res = send
        .send_request(req("GET", "/hold", ""))
        .await
        .expect("hold");
    let mut stream = res.into_body();
    let status = Command::new("kill")
        .args(["-TERM", &gate.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::timeout(FAILURE, async {
        while TcpStream::connect(("127.0.0.1", gate.port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gate kept accepting connections after SIGTERM");
    let _ = pusher.send(Bytes::from_static(b"still flowing"));
    assert_eq!(chunk(&mut stream, "chunk").await, "still flowing");
    // The model ends the stream: the gate has nothing left and exits 0.
    drop(pusher);
    *model.push.lock().expect("lock") = None;
    assert!(
        tokio::time::timeout(FAILURE, stream.frame())
            .await
            .expect("end")
            .is_none()
    );
    let exit = tokio::task::spawn_blocking(move || {
        let code = gate.child.wait();
        (code, gate)
    })
    .await
    .expect("wait");
    assert!(exit.0.expect("exit").success());
}

/// The kubelet probes the model server through the gate's health port (the server listens on
/// loopback): a connection, or a GET of the probe's path; and `/readyz` follows the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_probes_pass_through_the_health_port_and_readiness_follows_the_server() {
    let alice = spiffe("payments", "checkout");
    let pki = Pki::new();
    let model = Arc::new(Model::default());
    let addr = serve_model(model.clone()).await;
    let gate = Gate::start(&pki, addr, "http1", &policy(&[&alice])).await;
    assert_eq!(
        plain_get(gate.health, "/upstream").await.expect("probe").0,
        200
    );
    let ok = plain_get(gate.health, "/upstream?path=%2Fv1%2Fmodels")
        .await
        .expect("probe");
    assert_eq!(ok.0, 200, "{}", ok.1);
    let failing = plain_get(gate.health, "/upstream?path=%2Ffail")
        .await
        .expect("probe");
    assert_eq!(failing.0, 503, "{}", failing.1);
    assert!(failing.1.contains("500"), "{}", failing.1);
    assert_eq!(
        plain_get(gate.health, "/upstream?path=%2F..%2Fx")
            .await
            .expect("probe")
            .0,
        400
    );
    // A gate whose server is gone is not ready.
    let port = free_port();
    let orphan = Gate::start_unready(
        &pki,
        format!("127.0.0.1:{port}").parse().expect("addr"),
        &policy(&[&alice]),
    );
    tokio::time::timeout(FAILURE, async {
        loop {
            if let Ok((code, why)) = plain_get(orphan.health, "/readyz").await {
                assert_eq!(code, 503);
                assert!(why.contains("not accepting"), "{why}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the health endpoint never answered");
    assert_eq!(
        plain_get(orphan.health, "/upstream")
            .await
            .expect("probe")
            .0,
        503
    );
}
