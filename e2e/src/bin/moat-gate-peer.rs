//! Both ends of a call through Moat's gate on the real node (`e2e/tests/real_pods.rs`), in one
//! binary shipped as the image `gate-peer` (`e2e/gate-peer-image.sh`):
//!
//! - `serve`: the model server behind the gate, on the pod's loopback, speaking HTTP/1.1 and
//!   cleartext HTTP/2 (by prior knowledge) on one port. `/v1/echo` counts the body it read;
//!   `/v1/chat/completions` streams server-sent events, one chunk every `gap_ms`, each stamped
//!   with the wall-clock time it was written; the `/grpc.Peer/*` methods answer with gRPC
//!   messages and `grpc-status` in HTTP/2 trailers. Every stream's end is a JSON line on
//!   standard output: `complete`, or `cancelled` (its response was dropped: the client went
//!   away) with the time it happened.
//! - `request`, `sse`, `concurrent`, `burst`, `load`: the client, in a pod holding its
//!   ModelClient's Secret: HTTP/2 (or HTTP/1.1) over TLS with the client certificate, the
//!   server's name checked against the Secret's CA bundle. Each prints JSON lines.
//! - `idle`: keeps a client pod running (and exits at once on SIGTERM).
//!
//! Pods on one node share the kernel's clock, so times printed in two pods (a chunk's send and
//! its receipt, a disconnect and the cancel it caused) can be subtracted.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpStream;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Parser)]
#[command(about = "The model server and the client of the gate's real-node e2e tests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The model server: HTTP/1.1 and cleartext HTTP/2 on one port.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
    },
    /// Sleeps until SIGTERM.
    Idle,
    /// One request; prints its status, headers, body and trailers.
    Request {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A body of this many bytes, its length declared (content-length).
        #[arg(long)]
        body_bytes: Option<usize>,
        /// A body of this many bytes, streamed in 512-byte frames without a declared length.
        #[arg(long)]
        stream_bytes: Option<usize>,
        /// A gRPC call: POST with this message in one gRPC frame.
        #[arg(long)]
        grpc: Option<String>,
    },
    /// Reads server-sent events, printing each with the time it arrived.
    Sse {
        #[command(flatten)]
        conn: Conn,
        /// Goes away (closes the connection) after this many events.
        #[arg(long)]
        disconnect_after: Option<usize>,
    },
    /// Opens `holds` streams of `url` on one connection, waits for the first event of each,
    /// then sends one request to `probe` on a second connection and prints its answer.
    Concurrent {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        holds: usize,
        #[arg(long)]
        probe: String,
    },
    /// `n` requests one after another on one connection, as fast as they are answered; prints
    /// how many got each status.
    Burst {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        n: usize,
    },
    /// Steady load: `workers` loops, each opening a new connection (a TLS handshake) for every
    /// request, plus one loop on a single long-lived connection; stops once the server has been
    /// seen with `until_serials` serving certificates and `linger` requests were answered under
    /// the last one, or after `max_seconds`. Prints a summary.
    Load {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2)]
        until_serials: usize,
        #[arg(long, default_value_t = 50)]
        linger: usize,
        #[arg(long, default_value_t = 300)]
        max_seconds: u64,
    },
}

/// Where to connect, and as whom.
#[derive(Args, Clone)]
struct Conn {
    /// `https://<service>.<namespace>.svc.cluster.local:<port>/<path>`
    #[arg(long)]
    url: String,
    /// The CA bundle the server's certificate must chain to.
    #[arg(long, default_value = "/var/run/client/ca.crt")]
    ca: String,
    /// The client certificate and its key (none: no client certificate).
    #[arg(long)]
    cert: Option<String>,
    #[arg(long)]
    key: Option<String>,
    /// Offer only HTTP/1.1 in ALPN (default: HTTP/2 only).
    #[arg(long)]
    http1: bool,
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn print(line: &Value) {
    println!("{line}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // PID 1 in a container has no default SIGTERM action: exit on it explicitly.
    let run = async {
        match cli.command {
            Command::Serve { listen } => serve(listen).await,
            Command::Idle => std::future::pending().await,
            Command::Request {
                conn,
                method,
                body_bytes,
                stream_bytes,
                grpc,
            } => request(&conn, &method, body_bytes, stream_bytes, grpc).await,
            Command::Sse {
                conn,
                disconnect_after,
            } => sse(&conn, disconnect_after).await,
            Command::Concurrent { conn, holds, probe } => concurrent(&conn, holds, &probe).await,
            Command::Burst { conn, n } => burst(&conn, n).await,
            Command::Load {
                conn,
                workers,
                interval_ms,
                until_serials,
                linger,
                max_seconds,
            } => {
                load(
                    &conn,
                    workers,
                    Duration::from_millis(interval_ms),
                    until_serials,
                    linger,
                    Duration::from_secs(max_seconds),
                )
                .await
            }
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: SIGTERM handler: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        result = run => match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        _ = term.recv() => std::process::ExitCode::SUCCESS,
    }
}

// ---- The model server ----

/// Says on standard output how a stream ended, when it is dropped.
struct StreamEnd {
    id: String,
    sent: usize,
    complete: bool,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        print(&json!({
            "event": "stream",
            "id": self.id,
            "outcome": if self.complete { "complete" } else { "cancelled" },
            "chunks": self.sent,
            "at_ms": now_ms(),
        }));
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `data` in one gRPC length-prefixed frame.
fn grpc_frame(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out.into()
}

/// The messages of a body of gRPC frames.
fn grpc_messages(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let end = (5 + len).min(body.len());
        out.push(String::from_utf8_lossy(&body[5..end]).into_owned());
        body = &body[end..];
    }
    out
}

fn grpc_trailers(status: u32, message: &str) -> Result<HeaderMap> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.to_string().parse()?);
    trailers.insert("grpc-message", message.parse()?);
    Ok(trailers)
}

async fn answer(req: Request<Incoming>) -> Result<Response<Body>> {
    let version = format!("{:?}", req.version());
    let identity = req
        .headers()
        .get("x-moat-client-identity")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let path = req.uri().path().to_string();
    let q = query(req.uri());
    Ok(match path.as_str() {
        "/health" => Response::new(full("ok")),
        "/v1/echo" => {
            let bytes = req.into_body().collect().await?.to_bytes().len();
            print(&json!({"event": "echo", "bytes": bytes, "version": version}));
            Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    json!({"bytes": bytes, "version": version, "client": identity}).to_string(),
                ))?
        }
        "/v1/chat/completions" => {
            let id = q.get("id").cloned().unwrap_or_default();
            // 0: endless.
            let chunks: usize = q.get("chunks").and_then(|v| v.parse().ok()).unwrap_or(5);
            let gap =
                Duration::from_millis(q.get("gap_ms").and_then(|v| v.parse().ok()).unwrap_or(200));
            print(
                &json!({"event": "stream-start", "id": id, "version": version, "client": identity, "at_ms": now_ms()}),
            );
            let end = StreamEnd {
                id,
                sent: 0,
                complete: false,
            };
            let stream = futures::stream::unfold(end, move |mut end| {
                let version = version.clone();
                async move {
                    if chunks > 0 && end.sent == chunks {
                        end.complete = true;
                        drop(end);
                        return None;
                    }
                    if end.sent > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    let event = format!(
                        "data: {}\n\n",
                        json!({"i": end.sent, "sent_ms": now_ms(), "version": version})
                    );
                    end.sent += 1;
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
                        end,
                    ))
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))?
        }
        p if p.starts_with("/grpc.Peer/") => {
            let grpc = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let received = grpc_messages(&req.into_body().collect().await?.to_bytes());
            print(&json!({"event": "grpc", "path": p, "version": version, "messages": received}));
            let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = Vec::new();
            let trailers = match p {
                _ if !grpc => grpc_trailers(3, "content-type is not application/grpc")?,
                "/grpc.Peer/Echo" => {
                    for m in &received {
                        frames.push(Ok(Frame::data(grpc_frame(m.as_bytes()))));
                    }
                    grpc_trailers(0, "served")?
                }
                "/grpc.Peer/Count" => {
                    for i in 0..3 {
                        frames.push(Ok(Frame::data(grpc_frame(format!("{i}").as_bytes()))));
                    }
                    grpc_trailers(0, "counted")?
                }
                _ => grpc_trailers(12, "no such method")?,
            };
            frames.push(Ok(Frame::trailers(trailers)));
            Response::builder()
                .header("content-type", "application/grpc")
                .header("x-upstream-version", &version)
                .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                    frames,
                ))))?
        }
        _ => Response::builder().status(404).body(full("not here"))?,
    })
}

async fn serve(listen: std::net::SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!("serving on {listen}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req| async move {
                Ok::<_, std::convert::Infallible>(answer(req).await.unwrap_or_else(|e| {
                    let mut res = Response::new(full(format!("{e:#}")));
                    *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    res
                }))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

// ---- The client ----

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    async fn send(&mut self, req: Request<Body>) -> Result<Response<Incoming>> {
        Ok(match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        })
    }
}

/// A connection to the server of `conn.url`, and the serial of the certificate it presented.
struct Connection {
    sender: Sender,
    serial: String,
    uri: Uri,
    http1: bool,
    /// The connection's I/O; aborted (the socket closed at once) when this is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    async fn open(conn: &Conn) -> Result<Self> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
        let uri: Uri = conn.url.parse().context("--url")?;
        let host = uri.host().context("no host in --url")?.to_string();
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&conn.ca).context("--ca")? {
            roots.add(ca?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let mut config = match (&conn.cert, &conn.key) {
            (Some(cert), Some(key)) => builder.with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .context("--cert")?
                    .collect::<Result<Vec<_>, _>>()?,
                PrivateKeyDer::from_pem_file(key).context("--key")?,
            )?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = if conn.http1 {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec()]
        };
        // Bounded: a NetworkPolicy that does not admit this pod yet drops the SYN.
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to {host}:{port}"))?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(host.clone())?, tcp)
            .await
            .context("TLS handshake")?;
        let serial = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| moat::pki::info(c))
            .map(|i| i.serial)
            .unwrap_or_default();
        let io = TokioIo::new(tls);
        let (sender, task) = if conn.http1 {
            let (send, io) = hyper::client::conn::http1::handshake(io).await?;
            let task = tokio::spawn(async move {
                let _ = io.await;
            });
            (Sender::H1(send), task)
        } else {
            let (send, io) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            let task = tokio::spawn(async move {
                let _ = io.await;
            });
            (Sender::H2(send), task)
        };
        Ok(Self {
            sender,
            serial,
            uri,
            http1: conn.http1,
            task,
        })
    }

    /// A request to `path_and_query` (default: the URL's) on this connection.
    fn request(&self, method: &str, path: Option<&str>) -> Result<http::request::Builder> {
        let path = path
            .or(self.uri.path_and_query().map(|p| p.as_str()))
            .unwrap_or("/");
        let authority = self.uri.authority().context("no authority")?.as_str();
        let builder = Request::builder().method(method);
        Ok(if self.http1 {
            builder.uri(path).header("host", authority)
        } else {
            builder.uri(format!("https://{authority}{path}"))
        })
    }
}

fn headers_json(headers: &HeaderMap) -> Value {
    Value::Object(
        headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect(),
    )
}

/// The answer to `req` on `conn`, read to its end, as JSON.
async fn exchange(conn: &mut Connection, req: Request<Body>) -> Result<Value> {
    let res = conn.sender.send(req).await?;
    let status = res.status().as_u16();
    let version = format!("{:?}", res.version());
    let headers = headers_json(res.headers());
    let collected = res.into_body().collect().await?;
    let trailers = collected.trailers().map(headers_json);
    let body = collected.to_bytes();
    Ok(json!({
        "status": status,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&body[..body.len().min(4096)]),
        "body_bytes": body.len(),
        "grpc_messages": grpc_messages(&body),
        "trailers": trailers,
        "serial": conn.serial,
    }))
}

async fn request(
    conn: &Conn,
    method: &str,
    body_bytes: Option<usize>,
    stream_bytes: Option<usize>,
    grpc: Option<String>,
) -> Result<()> {
    let mut c = Connection::open(conn).await?;
    let req = if let Some(message) = grpc {
        c.request("POST", None)?
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(grpc_frame(message.as_bytes())))?
    } else if let Some(n) = body_bytes {
        c.request(method, None)?.body(full(vec![b'x'; n]))?
    } else if let Some(n) = stream_bytes {
        let frames = (0..n.div_ceil(512)).map(move |i| {
            let len = 512.min(n - i * 512);
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; len])))
        });
        c.request(method, None)?
            .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                frames,
            ))))?
    } else {
        c.request(method, None)?.body(full(""))?
    };
    print(&exchange(&mut c, req).await?);
    Ok(())
}

/// Reads the events of `body` and prints each (`i` and `sent_ms` from the server, `recv_ms`,
/// and `frame`: the data frame it came in); stops after `stop_after` events, if given.
async fn read_events(body: &mut Incoming, stop_after: Option<usize>) -> Result<usize> {
    let mut pending = Vec::new();
    let mut events = 0;
    let mut frame_no = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let recv_ms = now_ms();
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Value = text
                .trim()
                .strip_prefix("data: ")
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            print(
                &json!({"i": data["i"], "sent_ms": data["sent_ms"], "recv_ms": recv_ms,
                          "frame": frame_no, "upstream": data["version"]}),
            );
            events += 1;
            if stop_after.is_some_and(|n| events >= n) {
                return Ok(events);
            }
        }
        frame_no += 1;
    }
    Ok(events)
}

async fn sse(conn: &Conn, disconnect_after: Option<usize>) -> Result<()> {
    let mut c = Connection::open(conn).await?;
    let res = c
        .sender
        .send(
            c.request("GET", None)?
                .header("accept", "text/event-stream")
                .body(full(""))?,
        )
        .await?;
    print(
        &json!({"status": res.status().as_u16(), "version": format!("{:?}", res.version()),
                  "headers": headers_json(res.headers())}),
    );
    let mut body = res.into_body();
    let read = read_events(&mut body, disconnect_after).await;
    if disconnect_after.is_some() && read.is_ok() {
        // Going away: the response and the connection are dropped, which closes the socket.
        // The time is taken first, so that what is measured from it is never too short.
        let at_ms = now_ms();
        drop(body);
        drop(c);
        print(&json!({"end": "disconnected", "at_ms": at_ms}));
        return Ok(());
    }
    match read {
        Ok(events) => print(&json!({"end": "complete", "events": events, "at_ms": now_ms()})),
        Err(e) => print(&json!({"end": "closed", "error": format!("{e:#}"), "at_ms": now_ms()})),
    }
    Ok(())
}

async fn concurrent(conn: &Conn, holds: usize, probe: &str) -> Result<()> {
    let mut c = Connection::open(conn).await?;
    let mut open = Vec::new();
    for _ in 0..holds {
        let res = c
            .sender
            .send(c.request("GET", None)?.body(full(""))?)
            .await?;
        if res.status() != 200 {
            bail!("a hold got {}", res.status());
        }
        let mut body = res.into_body();
        read_events(&mut body, Some(1)).await?;
        open.push(body);
    }
    // On a connection of its own: the gate allows an HTTP/2 connection no more concurrent
    // streams than the limit, so on the holds' connection the probe would wait, not be refused.
    let mut second = Connection::open(conn).await?;
    let req = second.request("GET", Some(probe))?.body(full(""))?;
    let mut answer = exchange(&mut second, req).await?;
    answer["holds_open"] = json!(open.len());
    print(&answer);
    Ok(())
}

async fn burst(conn: &Conn, n: usize) -> Result<()> {
    let mut c = Connection::open(conn).await?;
    let started = Instant::now();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut retry_after = None;
    for _ in 0..n {
        let req = c.request("GET", None)?.body(full(""))?;
        let answer = exchange(&mut c, req).await?;
        *statuses.entry(answer["status"].to_string()).or_default() += 1;
        if answer["status"] != 200 {
            let why: Value = serde_json::from_str(answer["body"].as_str().unwrap_or_default())
                .unwrap_or(Value::Null);
            *reasons
                .entry(why["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            if retry_after.is_none() {
                retry_after = answer["headers"].get("retry-after").cloned();
            }
        }
    }
    print(
        &json!({"statuses": statuses, "reasons": reasons, "retry_after": retry_after,
                  "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0}),
    );
    Ok(())
}

/// What the load loops saw.
#[derive(Default)]
struct Tally {
    sent: usize,
    ok: usize,
    failed: usize,
    errors: Vec<String>,
    /// Serial -> (first seen, last seen, requests answered under it), in ms since the start.
    serials: BTreeMap<String, (f64, f64, usize)>,
    latencies: Vec<f64>,
    persistent_sent: usize,
    persistent_ok: usize,
    persistent_reconnects: usize,
}

impl Tally {
    fn record(&mut self, result: Result<Value>, started: Instant, took: Duration, serial: &str) {
        self.sent += 1;
        match result {
            Ok(answer) if answer["status"] == 200 => {
                self.ok += 1;
                self.latencies.push(took.as_secs_f64() * 1000.0);
                let at = started.elapsed().as_secs_f64() * 1000.0;
                let entry = self
                    .serials
                    .entry(serial.to_string())
                    .or_insert((at, at, 0));
                entry.1 = at;
                entry.2 += 1;
            }
            Ok(answer) => self.fail(format!("status {}: {}", answer["status"], answer["body"])),
            Err(e) => self.fail(format!("{e:#}")),
        }
    }

    fn fail(&mut self, why: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(why);
        }
    }

    /// Whether the last of `until` serials has been seen and `linger` requests answered
    /// under it.
    fn done(&self, until: usize, linger: usize) -> bool {
        self.serials.len() >= until
            && self
                .serials
                .values()
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .is_some_and(|last| last.2 >= linger)
    }
}

async fn echo(c: &mut Connection) -> Result<Value> {
    let req = c
        .request("POST", None)?
        .header("content-type", "application/json")
        .body(full(r#"{"prompt": "steady"}"#))?;
    tokio::time::timeout(Duration::from_secs(20), exchange(c, req))
        .await
        .context("no answer within 20 s")?
}

async fn load(
    conn: &Conn,
    workers: usize,
    interval: Duration,
    until_serials: usize,
    linger: usize,
    max: Duration,
) -> Result<()> {
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let finished = || {
        started.elapsed() >= max
            || tally
                .lock()
                .map(|t| t.done(until_serials, linger))
                .unwrap_or(true)
    };
    let fresh = (0..workers).map(|_| {
        let tally = tally.clone();
        async move {
            while !finished() {
                let t = Instant::now();
                let (result, serial) = match Connection::open(conn).await {
                    Ok(mut c) => (echo(&mut c).await, c.serial.clone()),
                    Err(e) => (Err(e), String::new()),
                };
                if let Ok(mut tally) = tally.lock() {
                    tally.record(result, started, t.elapsed(), &serial);
                }
                tokio::time::sleep(interval).await;
            }
        }
    });
    let persistent = {
        let tally = tally.clone();
        async move {
            let mut c: Option<Connection> = None;
            while !finished() {
                if c.is_none() {
                    c = Connection::open(conn).await.ok();
                    if let Ok(mut tally) = tally.lock() {
                        tally.persistent_reconnects += 1;
                    }
                }
                let result = match c.as_mut() {
                    Some(c) => echo(c).await,
                    None => Err(anyhow::anyhow!("connecting failed")),
                };
                let ok = result.as_ref().is_ok_and(|a| a["status"] == 200);
                if let Ok(mut tally) = tally.lock() {
                    tally.persistent_sent += 1;
                    tally.persistent_ok += usize::from(ok);
                    if !ok {
                        tally.fail(format!("persistent connection: {result:?}"));
                    }
                }
                if !ok {
                    c = None;
                }
                tokio::time::sleep(interval).await;
            }
        }
    };
    futures::future::join(futures::future::join_all(fresh), persistent).await;
    let mut tally = tally
        .lock()
        .map_err(|_| anyhow::anyhow!("a load loop panicked"))?;
    tally.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let l = &tally.latencies;
        l.get(((l.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    print(&json!({
        "sent": tally.sent,
        "ok": tally.ok,
        "failed": tally.failed,
        "errors": tally.errors,
        "serials": tally.serials.iter().map(|(s, (first, last, n))| json!({"serial": s, "first_ms": first, "last_ms": last, "requests": n})).collect::<Vec<_>>(),
        "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        "persistent": {"sent": tally.persistent_sent, "ok": tally.persistent_ok, "connections": tally.persistent_reconnects},
        "elapsed_s": started.elapsed().as_secs_f64(),
        "done": tally.done(until_serials, linger),
    }));
    Ok(())
}
