//! The gate's request handling, whole: the input is what a client sends on one connection
//! (HTTP/1.1, or HTTP/2 when it starts with the preface), fed in plaintext over an in-memory
//! duplex into hyper's server with the gate's handler behind it (`moat::gate::fuzzing`), for a
//! fixed, consented peer and a fixed policy. Requests the gate admits go to a small HTTP/1.1
//! server on 127.0.0.1, which checks what the gate promises the model server.
//!
//! Asserts: no panic anywhere (the gate's tasks included: libfuzzer-sys aborts on any panic);
//! every connection ends once the client has sent its bytes and closed its side; and every
//! request that reaches the upstream has a canonical path the limits allow, an allowed method,
//! exactly the gate's `x-moat-client-identity` and one `x-request-id`, the gate's `host`, no
//! proxy hop-by-hop headers, and a body within `maxRequestBytes`.

#![no_main]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use moat::gate::{
    fuzzing::Harness,
    policy::{AuditPolicy, Limits, Peer, Policy, path_is_canonical, path_matches},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const IDENTITY: &str = "spiffe://cluster.local/ns/payments/sa/checkout";
/// Small, so that bodies over the limit are within the fuzzer's reach.
const MAX_BODY: u64 = 512;

struct Fixture {
    rt: tokio::runtime::Runtime,
    gate: Harness,
    upstream: SocketAddr,
}

/// What the upstream saw that the gate should never have let through.
static VIOLATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn limits() -> Limits {
    Limits {
        max_request_bytes: MAX_BODY,
        methods: vec!["GET".into(), "HEAD".into(), "POST".into(), "PUT".into()],
        paths: vec!["/v1/*".into(), "/health".into(), "/".into()],
        // High enough that the rate limit never hides the request path from the fuzzer.
        requests_per_second: 1_000_000,
        burst: 1_000_000,
        max_concurrent_requests: 16,
        header_timeout_seconds: 2,
        idle_timeout_seconds: 5,
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (gate, upstream) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the upstream");
            let upstream = listener.local_addr().expect("upstream address");
            tokio::spawn(serve_upstream(listener, upstream));
            let policy = Policy {
                identities: [IDENTITY.to_string()].into(),
                quarantine: None,
                limits: limits(),
                audit: AuditPolicy { body_hash: true },
            };
            let peer = Peer::Verified {
                identity: Some(IDENTITY.into()),
            };
            let gate = Harness::new(policy, peer, upstream).expect("the gate");
            (gate, upstream)
        });
        Fixture { rt, gate, upstream }
    })
}

async fn serve_upstream(listener: tokio::net::TcpListener, addr: SocketAddr) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, addr));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn violation(what: String) {
    VIOLATIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(what);
}

/// The model server: checks the request, reads its body, answers 200.
async fn answer(
    req: Request<Incoming>,
    addr: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let limits = limits();
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    if !path_is_canonical(&path) {
        violation(format!("non-canonical path {path:?} reached the upstream"));
    }
    if !limits.paths.iter().any(|p| path_matches(p, &path)) {
        violation(format!(
            "path {path:?} outside the limits reached the upstream"
        ));
    }
    if !limits.methods.contains(&method) {
        violation(format!("method {method:?} reached the upstream"));
    }
    let headers = req.headers();
    let identities: Vec<_> = headers.get_all("x-moat-client-identity").iter().collect();
    if identities.len() != 1 || identities[0] != IDENTITY {
        violation(format!("x-moat-client-identity upstream: {identities:?}"));
    }
    let ids: Vec<_> = headers.get_all("x-request-id").iter().collect();
    if ids.len() != 1 || ids[0].len() != 32 {
        violation(format!("x-request-id upstream: {ids:?}"));
    }
    let hosts: Vec<_> = headers.get_all("host").iter().collect();
    if hosts.len() != 1 || hosts[0].as_bytes() != addr.to_string().as_bytes() {
        violation(format!("host upstream: {hosts:?}"));
    }
    for hop in [
        "proxy-authorization",
        "proxy-connection",
        "keep-alive",
        "upgrade",
    ] {
        if headers.contains_key(hop) {
            violation(format!("hop-by-hop header {hop} reached the upstream"));
        }
    }
    if let Some(length) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > MAX_BODY
    {
        violation(format!(
            "content-length {length} over the limit reached the upstream"
        ));
    }
    if std::env::var_os("MOAT_FUZZ_TRACE").is_some() {
        eprintln!("upstream: {method} {path} {:?}", req.headers());
    }
    let mut body = req.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
        }
    }
    if received > MAX_BODY {
        violation(format!(
            "{received} body bytes over the limit reached the upstream"
        ));
    }
    let mut response = Response::new(Full::new(Bytes::from(format!("{received}\n"))));
    // Hop-by-hop headers from the model server, which the gate removes on the way back.
    let h = response.headers_mut();
    h.insert("connection", "x-upstream-secret".parse().expect("header"));
    h.insert("x-upstream-secret", "1".parse().expect("header"));
    h.insert("keep-alive", "timeout=5".parse().expect("header"));
    Ok(response)
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let data = data.to_vec();
    let exchange = async move {
        let serve = f.gate.serve(server);
        let talk = async move {
            let (mut rd, mut wr) = tokio::io::split(client);
            let write = async move {
                let _ = wr.write_all(&data).await;
                if data.starts_with(H2_PREFACE) {
                    // HTTP/2 has no half-close: closing cancels the streams. Wait until the
                    // gate has answered every request (quiet for 3 ms, at most 2 s).
                    let mut quiet = 0;
                    for _ in 0..2000 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        quiet = if f.gate.in_flight() == 0 {
                            quiet + 1
                        } else {
                            0
                        };
                        if quiet == 3 {
                            break;
                        }
                    }
                }
                let _ = wr.shutdown().await;
                wr
            };
            let read = async move {
                let mut answer = Vec::new();
                let _ = rd.read_to_end(&mut answer).await;
            };
            tokio::join!(write, read)
        };
        tokio::join!(serve, talk)
    };
    let done =
        f.rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), exchange).await });
    assert!(
        done.is_ok(),
        "the gate still held the connection 30 s after the client sent everything and closed its side"
    );
    let violations = std::mem::take(&mut *VIOLATIONS.lock().unwrap_or_else(|e| e.into_inner()));
    assert!(
        violations.is_empty(),
        "upstream {}: {violations:?}",
        f.upstream
    );
});
