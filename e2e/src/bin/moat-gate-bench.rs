//! `make bench`'s gate section (`bench/gate.sh` runs it): `moat gate` (release) against the same
//! upstream reached directly, and against Debian's nginx doing the same mTLS termination and
//! proxying, in one run on this machine. Prints a Markdown section.
//!
//! The load generator is written here (hyper and rustls, the gate's own stack): it keeps `C`
//! connections alive, each sending 1 KiB POSTs back to back and timing each request. The upstream
//! runs in this process on its own runtime thread and answers 1 KiB.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat::pki::{self, Identity, KeyedCertificate};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::TlsConnector;

const TD: &str = "cluster.local";
const KIB: usize = 1024;

type Body = BoxBody<Bytes, std::io::Error>;

fn body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the in-process upstream reports to the benchmark.
#[derive(Default)]
struct Upstream {
    /// `/sse`: chunks are sent when the benchmark asks, stamped.
    sse: Mutex<Option<mpsc::UnboundedReceiver<Instant>>>,
    /// When a `/hold` response was dropped (the request was cancelled).
    cancelled: Mutex<Option<mpsc::UnboundedSender<Instant>>>,
}

struct DropStamp(Option<mpsc::UnboundedSender<Instant>>);

impl Drop for DropStamp {
    fn drop(&mut self) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Instant::now());
        }
    }
}

async fn serve(up: Arc<Upstream>, req: Request<Incoming>) -> http::Response<Body> {
    match req.uri().path() {
        "/sse" => {
            let rx = up.sse.lock().ok().and_then(|mut s| s.take());
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                let _sent = rx.as_mut()?.recv().await?;
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"data: {}\n\n"))),
                    rx,
                ))
            });
            http::Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/hold" => {
            let stamp = DropStamp(up.cancelled.lock().ok().and_then(|c| c.clone()));
            let stream = futures::stream::unfold(stamp, |stamp| async move {
                std::future::pending::<()>().await;
                Some((Ok::<_, std::io::Error>(Frame::data(Bytes::new())), stamp))
            });
            http::Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => {
            let _ = req.into_body().collect().await;
            http::Response::new(body(vec![b'r'; KIB]))
        }
    }
}

/// Starts the upstream on a runtime thread of its own; returns its address.
fn start_upstream(up: Arc<Upstream>) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let up = up.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let up = up.clone();
                        async move { Ok::<_, std::convert::Infallible>(serve(up, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
    });
    Ok(addr)
}

fn connector(ca_pem: &str, client: &KeyedCertificate) -> Result<TlsConnector> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())?,
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// An HTTP/1.1 connection to `port`, over TLS when `tls` is given.
async fn connect(port: u16, tls: Option<&TlsConnector>) -> Result<Sender> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let send = match tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("fraud.ml.svc")?;
            let stream = tls.connect(name, tcp).await?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            send
        }
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            send
        }
    };
    Ok(send)
}

fn post(path: &str) -> Result<Request<Body>> {
    Ok(Request::post(path)
        .header("host", "fraud.ml.svc")
        .body(body(vec![b'q'; KIB]))?)
}

/// `concurrency` keep-alive connections, `per_conn` requests each; every latency, and the wall
/// time.
async fn load(
    port: u16,
    tls: Option<TlsConnector>,
    concurrency: usize,
    per_conn: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        senders.push(connect(port, tls.as_ref()).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per_conn);
                for _ in 0..per_conn {
                    let t = Instant::now();
                    send.ready().await?;
                    let res = send.send_request(post("/echo")?).await?;
                    if !res.status().is_success() {
                        bail!("status {}", res.status());
                    }
                    res.into_body().collect().await?;
                    times.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// User + system CPU seconds of `pids` so far (from /proc).
fn cpu_seconds(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / tick
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// One `... kB` line of /proc/PID/status (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM: nginx's master then stops its workers too (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Writes the gate's files, kubelet-style (`..data` swapped by rename).
fn project(dir: &Path, name: &str, content: &[u8], version: usize) -> Result<()> {
    let v = format!("..v{version}");
    std::fs::create_dir_all(dir.join(&v))?;
    std::fs::write(dir.join(&v).join(name), content)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&v, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    let link = dir.join(name);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
    }
    Ok(())
}

async fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn policy(identities: &[&str], quarantine: bool) -> Vec<u8> {
    let mut p = serde_json::json!({
        "identities": identities,
        "limits": {"requestsPerSecond": 1000000, "burst": 1000000, "maxConcurrentRequests": 100000},
    });
    if quarantine {
        p["quarantine"] = serde_json::json!({"reason": "bench"});
    }
    p.to_string().into_bytes()
}

/// Opens `/hold` through the gate and returns the body, once the response has begun.
async fn hold(port: u16, tls: &TlsConnector) -> Result<(Sender, Incoming)> {
    let mut send = connect(port, Some(tls)).await?;
    send.ready().await?;
    let res = send
        .send_request(
            Request::get("/hold")
                .header("host", "fraud.ml.svc")
                .body(body(""))?,
        )
        .await?;
    Ok((send, res.into_body()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let moat = std::env::var("MOAT_BIN").unwrap_or_else(|_| "target/release/moat".into());
    let nginx = std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    let concurrency: usize = std::env::var("GATE_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let per_conn: usize = std::env::var("GATE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2500);
    let dir = tempfile::tempdir()?;
    let material = pki::generate_ca(TD, now() - 60, Duration::from_secs(86400))?;
    let ca = pki::Ca::load(&material, now())?;
    let server = ca.issue(
        &Identity::server("ml", "fraud", "fraud", TD),
        TD,
        now(),
        Duration::from_secs(86400),
    )?;
    let client = ca.issue(
        &Identity::client("payments", "checkout"),
        TD,
        now(),
        Duration::from_secs(86400),
    )?;
    let alice = Identity::client("payments", "checkout").spiffe_id(TD);
    let tls_dir = dir.path().join("tls");
    let gate_dir = dir.path().join("gate");
    std::fs::create_dir_all(&tls_dir)?;
    std::fs::create_dir_all(&gate_dir)?;
    for (name, content) in [
        ("tls.crt", &server.cert_pem),
        ("tls.key", &server.key_pem),
        ("ca.crt", &ca.cert_pem),
    ] {
        std::fs::write(tls_dir.join(name), content)?;
    }
    let mut version = 0;
    project(&gate_dir, "policy.json", &policy(&[&alice], false), version)?;

    let up = Arc::new(Upstream::default());
    let upstream = start_upstream(up.clone())?;
    let gate_port = free_port()?;
    let gate = Proc(
        Command::new(&moat)
            .args(["gate", "--upstream", &upstream.to_string()])
            .args(["--listen", &format!("127.0.0.1:{gate_port}")])
            .args(["--health-listen", &format!("127.0.0.1:{}", free_port()?)])
            .arg("--cert")
            .arg(tls_dir.join("tls.crt"))
            .arg("--key")
            .arg(tls_dir.join("tls.key"))
            .arg("--ca")
            .arg(tls_dir.join("ca.crt"))
            .arg("--policy")
            .arg(gate_dir.join("policy.json"))
            .args(["--threads", "1"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {moat}"))?,
    );
    let gate_pid = gate.0.id();
    wait_port(gate_port).await?;
    let tls = connector(&ca.cert_pem, &client)?;
    // Warm up both paths.
    load(upstream.port(), None, concurrency, 200).await?;
    load(gate_port, Some(tls.clone()), concurrency, 200).await?;

    // 1. Latency and throughput: direct, then through the gate.
    let (mut direct, _) = load(upstream.port(), None, concurrency, per_conn).await?;
    direct.sort();
    let cpu0 = cpu_seconds(&[gate_pid]);
    let (mut gated, gate_wall) = load(gate_port, Some(tls.clone()), concurrency, per_conn).await?;
    let gate_cpu = cpu_seconds(&[gate_pid]) - cpu0;
    gated.sort();
    let n = gated.len();

    // 2. nginx: the same mTLS termination and proxying, one worker (like the gate's one thread).
    let nginx_result = if Path::new(&nginx).exists() {
        let nginx_port = free_port()?;
        let prefix = dir.path().join("nginx");
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = format!(
            "worker_processes 1; pid {p}/nginx.pid; error_log {p}/logs/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/f; uwsgi_temp_path {p}/u; scgi_temp_path {p}/s;\n\
               upstream model {{ server {upstream}; keepalive 64; }}\n\
               server {{ listen 127.0.0.1:{nginx_port} ssl; ssl_certificate {t}/tls.crt; ssl_certificate_key {t}/tls.key;\n\
                 ssl_client_certificate {t}/ca.crt; ssl_verify_client on; ssl_protocols TLSv1.3;\n\
                 keepalive_requests 1000000;\n\
                 location / {{ proxy_pass http://model; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
            p = prefix.display(),
            t = tls_dir.display(),
        );
        std::fs::write(prefix.join("nginx.conf"), conf)?;
        let proc = Proc(
            Command::new(&nginx)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(prefix.join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_port(nginx_port).await?;
        load(nginx_port, Some(tls.clone()), concurrency, 200).await?;
        let pids = children_of(proc.0.id());
        let c0 = cpu_seconds(&pids);
        let (mut times, wall) = load(nginx_port, Some(tls.clone()), concurrency, per_conn).await?;
        let cpu = cpu_seconds(&pids) - c0;
        times.sort();
        Some((times, wall, cpu))
    } else {
        None
    };

    // 3. RSS at 100 open connections, each with one request done (and before them, after the
    // load runs above).
    let rss_before = rss_kib(gate_pid).unwrap_or(0);
    let mut open = Vec::new();
    for _ in 0..100 {
        let mut send = connect(gate_port, Some(&tls)).await?;
        send.ready().await?;
        send.send_request(post("/echo")?)
            .await?
            .into_body()
            .collect()
            .await?;
        open.push(send);
    }
    let rss = rss_kib(gate_pid).unwrap_or(0);
    let rss_anon = status_kib(gate_pid, "RssAnon:").unwrap_or(0);
    let rss_file = status_kib(gate_pid, "RssFile:").unwrap_or(0);
    drop(open);

    // 4. SSE: the time for each chunk from the upstream's send to the client's receipt.
    let (tx, rx) = mpsc::unbounded_channel();
    *up.sse.lock().map_err(|_| anyhow::anyhow!("lock"))? = Some(rx);
    let mut send = connect(gate_port, Some(&tls)).await?;
    send.ready().await?;
    let mut sse = send
        .send_request(Request::get("/sse").header("host", "x").body(body(""))?)
        .await?
        .into_body();
    let mut chunk_times = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        tx.send(t)?;
        let frame = sse.frame().await.context("stream ended")??;
        if frame.is_data() {
            chunk_times.push(t.elapsed());
        }
    }
    chunk_times.sort();

    // 5. Client disconnect to upstream cancel.
    let (ctx, mut crx) = mpsc::unbounded_channel();
    *up.cancelled.lock().map_err(|_| anyhow::anyhow!("lock"))? = Some(ctx);
    let mut cancel_times = Vec::new();
    for _ in 0..50 {
        let (send, body) = hold(gate_port, &tls).await?;
        let t = Instant::now();
        drop(body);
        drop(send);
        let at = tokio::time::timeout(Duration::from_secs(10), crx.recv())
            .await?
            .context("no cancel")?;
        cancel_times.push(at.saturating_duration_since(t));
    }
    cancel_times.sort();

    // 6. Revocation and quarantine: from the policy file's swap to the open stream's close.
    let mut revoke_times = Vec::new();
    let mut quarantine_times = Vec::new();
    for i in 0..40 {
        let quarantine = i % 2 == 1;
        let (_send, mut body) = hold(gate_port, &tls).await?;
        version += 1;
        let t = Instant::now();
        let ids: Vec<&str> = if quarantine {
            vec![alice.as_str()]
        } else {
            Vec::new()
        };
        project(&gate_dir, "policy.json", &policy(&ids, quarantine), version)?;
        while let Some(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), body.frame()).await? {
        }
        if quarantine {
            &mut quarantine_times
        } else {
            &mut revoke_times
        }
        .push(t.elapsed());
        version += 1;
        project(&gate_dir, "policy.json", &policy(&[&alice], false), version)?;
        // Served again before the next round.
        loop {
            let mut send = connect(gate_port, Some(&tls)).await?;
            send.ready().await?;
            if send
                .send_request(post("/echo")?)
                .await?
                .status()
                .is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    revoke_times.sort();
    quarantine_times.sort();

    let rps = n as f64 / gate_wall.as_secs_f64();
    let per_cpu = n as f64 / gate_cpu.max(1e-9);
    let mut out = String::new();
    out.push_str("<!-- gate:begin (written by bench/gate.sh) -->\n### The gate\n\n");
    out.push_str(&format!(
        "`bash bench/gate.sh`: `moat gate` (release, `--threads 1`) in front of an HTTP/1.1 upstream on loopback that answers 1 KiB to a 1 KiB POST; the load generator (`e2e/src/bin/moat-gate-bench.rs`, hyper and rustls) keeps {concurrency} connections alive and sends {per_conn} requests on each, back to back, timing every request. Direct is plain HTTP to the upstream; the gate terminates mTLS (TLS 1.3, a P-256 client certificate from Moat's CA, the identity checked against the policy, limits, an audit line) and forwards. nginx (Debian {nginx_version}, one worker) does the same mTLS termination (`ssl_verify_client on`) and proxying with upstream keep-alive. CPU is user + system time of the proxy's processes during the run, from /proc. On 2 CPUs, shared with the load generator and the upstream.\n\n",
        nginx_version = nginx_version(&nginx)
    ));
    out.push_str("| measure | direct | through the gate | added by the gate | target |\n|---|---|---|---|---|\n");
    let (d50, d99, g50, g99) = (
        pct(&direct, 0.5),
        pct(&direct, 0.99),
        pct(&gated, 0.5),
        pct(&gated, 0.99),
    );
    out.push_str(&format!(
        "| latency p50 (ms) | {} | {} | {} | added ≤ 0.3 ms |\n",
        ms(d50),
        ms(g50),
        ms(g50.saturating_sub(d50))
    ));
    out.push_str(&format!(
        "| latency p99 (ms) | {} | {} | {} | added ≤ 1 ms |\n\n",
        ms(d99),
        ms(g99),
        ms(g99.saturating_sub(d99))
    ));
    out.push_str("| proxy | requests/s | CPU-seconds | requests per CPU-second | p50 (ms) | p99 (ms) |\n|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| **moat gate** | {rps:.0} | {gate_cpu:.2} | **{per_cpu:.0}** | {} | {} |\n",
        ms(g50),
        ms(g99)
    ));
    if let Some((times, wall, cpu)) = &nginx_result {
        out.push_str(&format!(
            "| nginx | {:.0} | {cpu:.2} | {:.0} | {} | {} |\n",
            times.len() as f64 / wall.as_secs_f64(),
            times.len() as f64 / cpu.max(1e-9),
            ms(pct(times, 0.5)),
            ms(pct(times, 0.99))
        ));
    }
    out.push_str(&format!(
        "\n| measure | p50 | p99 | max | target |\n|---|---|---|---|---|\n\
         | SSE chunk, upstream send to client receipt ({} chunks, ms) | {} | {} | {} | ≤ 1 ms |\n\
         | client disconnect to upstream cancel ({} times, ms) | {} | {} | {} | ≤ 100 ms |\n\
         | revocation: policy swapped to the revoked stream closed ({} times, ms) | {} | {} | {} | ≤ 2 s |\n\
         | quarantine: policy swapped to the open stream closed ({} times, ms) | {} | {} | {} | ≤ 2 s |\n\n",
        chunk_times.len(), ms(pct(&chunk_times, 0.5)), ms(pct(&chunk_times, 0.99)), ms(pct(&chunk_times, 1.0)),
        cancel_times.len(), ms(pct(&cancel_times, 0.5)), ms(pct(&cancel_times, 0.99)), ms(pct(&cancel_times, 1.0)),
        revoke_times.len(), ms(pct(&revoke_times, 0.5)), ms(pct(&revoke_times, 0.99)), ms(pct(&revoke_times, 1.0)),
        quarantine_times.len(), ms(pct(&quarantine_times, 0.5)), ms(pct(&quarantine_times, 0.99)), ms(pct(&quarantine_times, 1.0)),
    ));
    out.push_str(&format!(
        "Gate RSS with 100 open connections: **{:.1} MiB** (VmRSS; target ≤ 16 MiB): {:.1} MiB anonymous (heap, stacks), {:.1} MiB file-backed (the pages of the binary in use, shared with every process that maps it); {:.1} MiB before they were opened (after the load runs).\n\n\
         Revocation and quarantine here are the gate's part: it reads its policy file every 200 ms. In a cluster the kubelet delivers the ConfigMap first; Moat annotates the pods so that happens at once (the real-node e2e prints the whole time, from the API change to the refusal).\n<!-- gate:end -->\n",
        rss as f64 / 1024.0,
        rss_anon as f64 / 1024.0,
        rss_file as f64 / 1024.0,
        rss_before as f64 / 1024.0
    ));
    print!("{out}");
    drop(gate);
    Ok(())
}

fn nginx_version(nginx: &str) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_string()
        })
        .unwrap_or_else(|| "absent".into())
}
