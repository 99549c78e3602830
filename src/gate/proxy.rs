//! The gate's connections and requests: TLS accept, the decisions of [`super::policy`] on every
//! request, forwarding to the model server with bodies streamed frame by frame (server-sent
//! events and gRPC trailers pass as they come), and one audit line per request.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, response::IntoResponse, routing::get};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::{
    Shared, UpstreamProtocol,
    audit::Record,
    metrics::{BytesLabels, GateMetrics, IdentityLabels, RequestLabels},
    policy::{self, Bucket, Limits, Peer, Policy, Reason, Refusal},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the gate sends, either way.
pub(crate) type GateBody = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The request id, sent upstream and back to the client.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The caller's verified SPIFFE ID, sent upstream (a client's own value is removed).
const CLIENT_IDENTITY: HeaderName = HeaderName::from_static("x-moat-client-identity");

/// The model server, and the pooled connections to it.
pub(crate) struct Upstream {
    client: Client<HttpConnector, GateBody>,
    authority: String,
    addr: SocketAddr,
    version: Version,
}

impl Upstream {
    pub(crate) fn new(addr: SocketAddr, protocol: UpstreamProtocol) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let version = match protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => {
                builder.http2_only(true);
                Version::HTTP_2
            }
        };
        Self {
            client: builder.build(connector),
            authority: addr.to_string(),
            addr,
            version,
        }
    }
}

/// Request ids: a random prefix for this process and a counter, 32 hex digits.
pub(crate) struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        let mut bytes = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        Self {
            prefix: u64::from_be_bytes(bytes),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:016x}{:016x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Per-identity rate buckets and requests in flight.
#[derive(Default)]
pub(crate) struct Limiter {
    state: Mutex<HashMap<String, (Bucket, u32)>>,
    epoch: std::sync::OnceLock<Instant>,
}

impl Limiter {
    fn now(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(Instant::now);
        u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Admits one request of `identity`, or says which limit it is over.
    fn admit(self: &Arc<Self>, identity: &str, limits: &Limits) -> Result<InFlight, Refusal> {
        let now = self.now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (bucket, in_flight) = state
            .entry(identity.to_string())
            .or_insert_with(|| (Bucket::full(limits, now), 0));
        policy::admit_concurrent(limits, *in_flight)?;
        let (ok, next) = bucket.admit(limits, now);
        *bucket = next;
        if !ok {
            return Err(policy::rate_limited(limits));
        }
        *in_flight += 1;
        Ok(InFlight {
            limiter: self.clone(),
            identity: identity.to_string(),
        })
    }
}

/// One request of an identity in flight; counted off when dropped.
struct InFlight {
    limiter: Arc<Limiter>,
    identity: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.limiter.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = state.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One connection's requests in flight and when it was last active, for the idle timeout; and
/// its caller's metric series, looked up once per connection (and again when a new policy
/// changes the caller's label) rather than once per request.
pub(crate) struct ConnState {
    pub(crate) in_flight: AtomicU32,
    last_active: Mutex<Instant>,
    series: arc_swap::ArcSwap<Series>,
}

/// The series of one caller, labelled by [`policy::metric_identity`].
struct Series {
    identity: String,
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl Series {
    fn of(metrics: &GateMetrics, identity: &str) -> Self {
        let identity = identity.to_string();
        let bytes = |direction| {
            metrics
                .bytes
                .get_or_create(&BytesLabels {
                    identity: identity.clone(),
                    direction,
                })
                .clone()
        };
        Self {
            duration: metrics
                .duration
                .get_or_create(&IdentityLabels {
                    identity: identity.clone(),
                })
                .clone(),
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            identity,
        }
    }
}

impl ConnState {
    /// A new connection whose caller's series are labelled `identity`
    /// ([`policy::metric_identity`]).
    pub(crate) fn new(metrics: &GateMetrics, identity: &str) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            last_active: Mutex::new(Instant::now()),
            series: arc_swap::ArcSwap::from_pointee(Series::of(metrics, identity)),
        }
    }

    /// Labels the connection's next requests `identity`, when a new policy changed the caller's
    /// label (a caller consented to while connected stops counting as `unconsented`).
    pub(crate) fn relabel(&self, metrics: &GateMetrics, identity: &str) {
        if self.series.load().identity != identity {
            self.series.store(Arc::new(Series::of(metrics, identity)));
        }
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// Returns when the connection has had no request in flight for `idle`.
async fn idle(state: &ConnState, idle: Duration) {
    loop {
        let last = *state.last_active.lock().unwrap_or_else(|e| e.into_inner());
        tokio::time::sleep_until((last + idle).into()).await;
        let last = *state.last_active.lock().unwrap_or_else(|e| e.into_inner());
        if state.in_flight.load(Ordering::Acquire) == 0 && last.elapsed() >= idle {
            return;
        }
        if state.in_flight.load(Ordering::Acquire) > 0 {
            // Busy: look again after another period.
            state.touch();
        }
    }
}

/// Serves one client connection: the TLS handshake (within the header timeout), then HTTP/1.1
/// or HTTP/2 as negotiated, until the client leaves, the connection idles out, the gate drains,
/// or a new policy revokes the caller or quarantines the model (then it is closed at once).
pub(crate) async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let limits = shared
        .policy
        .borrow()
        .as_ref()
        .map(|p| p.limits.clone())
        .unwrap_or_default();
    let header_timeout = Duration::from_secs(u64::from(limits.header_timeout_seconds.max(1)));
    let tls = shared.tls.load_full();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let Ok(Ok(stream)) = tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await else {
        return;
    };
    let peer = tls.peer(
        stream.get_ref().1.peer_certificates(),
        rustls::pki_types::UnixTime::now(),
    );
    drop(tls);
    shared.metrics.connections.inc();
    let _open = scopeguard(shared.clone());
    let label = policy::metric_identity(shared.policy.borrow().as_deref(), peer.identity());
    let state = Arc::new(ConnState::new(&shared.metrics, label));
    let peer = Arc::new(peer);
    let service = {
        let shared = shared.clone();
        let state = state.clone();
        let peer = peer.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let state = state.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handle(shared, peer, addr, state, req).await) }
        })
    };
    let builder = server(&limits, header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut policy_rx = shared.policy.subscribe();
    let identity = peer.identity().map(str::to_string);
    let mut allowed = policy_rx
        .borrow_and_update()
        .as_ref()
        .is_some_and(|p| policy::still_allowed(p, identity.as_deref()));
    let idle_for = Duration::from_secs(u64::from(limits.idle_timeout_seconds.max(1)));
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = policy_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = policy_rx.borrow_and_update().clone();
                if let Some(p) = current {
                    let now_allowed = policy::still_allowed(&p, identity.as_deref());
                    if p.quarantine.is_some() || (allowed && !now_allowed) {
                        // Dropping the connection closes it, and every stream on it.
                        shared.metrics.connections_closed.inc();
                        return;
                    }
                    allowed = now_allowed;
                    state.relabel(
                        &shared.metrics,
                        policy::metric_identity(Some(&p), identity.as_deref()),
                    );
                }
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = idle(&state, idle_for), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The HTTP/1.1 and HTTP/2 server of one client connection, with the policy's limits.
pub(crate) fn server(limits: &Limits, header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_requests.max(1))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Counts a connection off when it ends.
struct OpenConnection(Arc<Shared>);

fn scopeguard(shared: Arc<Shared>) -> OpenConnection {
    OpenConnection(shared)
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.connections.dec();
    }
}

/// What one request's audit line and metrics need; written when dropped, that is when the
/// response body ends or the client goes away.
struct Finish {
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    record: Record,
    counters: Arc<Counters>,
    started: Instant,
    _in_flight: Option<InFlight>,
}

#[derive(Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    complete: AtomicBool,
    body_sha256: Mutex<Option<String>>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let mut record = std::mem::take(&mut self.record);
        let c = &self.counters;
        record.bytes_in = c.bytes_in.load(Ordering::Acquire);
        record.bytes_out = c.bytes_out.load(Ordering::Acquire);
        record.complete = c.complete.load(Ordering::Acquire);
        record.body_sha256 = c
            .body_sha256
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let elapsed = self.started.elapsed();
        record.duration_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        let m = &self.shared.metrics;
        let series = self.conn.series.load();
        m.requests
            .get_or_create(&RequestLabels {
                identity: series.identity.clone(),
                code: record.status,
            })
            .inc();
        series.duration.observe(elapsed.as_secs_f64());
        series.bytes_in.inc_by(record.bytes_in);
        series.bytes_out.inc_by(record.bytes_out);
        if let Some(reason) = record.reason {
            m.refusals
                .get_or_create(&super::metrics::RefusalLabels {
                    identity: series.identity.clone(),
                    reason,
                })
                .inc();
        }
        self.shared.audit.write(record);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.conn.touch();
    }
}

/// The request body on its way upstream: counted, capped at `max` bytes, hashed on request.
struct RequestBody {
    inner: Incoming,
    counters: Arc<Counters>,
    max: u64,
    hash: Option<ring::digest::Context>,
}

/// A request body went over the limit while it streamed.
#[derive(Debug, thiserror::Error)]
#[error("the request body is over the limit of {0} bytes")]
struct TooLarge(u64);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    let total = this.counters.bytes_in.fetch_add(len, Ordering::AcqRel) + len;
                    if total > this.max {
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.max)))));
                    }
                    if let Some(hash) = &mut this.hash {
                        hash.update(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                if let Some(hash) = this.hash.take() {
                    let digest = hash.finish();
                    *this
                        .counters
                        .body_sha256
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(hex(digest.as_ref()));
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The response body on its way to the client: passed on frame by frame (never buffered),
/// counted; its audit line is written when it ends or is dropped.
struct ResponseBody {
    inner: Incoming,
    finish: Option<Finish>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), &this.finish) {
                    f.counters
                        .bytes_out
                        .fetch_add(data.len() as u64, Ordering::AcqRel);
                }
                // A body of known length ends with its last frame: hyper polls no further.
                if this.inner.is_end_stream()
                    && let Some(f) = &this.finish
                {
                    f.counters.complete.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                if let Some(f) = this.finish.take() {
                    f.counters.complete.store(true, Ordering::Release);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The JSON answer of a refusal.
fn refusal(refusal: &Refusal, request_id: &str) -> Response<GateBody> {
    let body = serde_json::json!({
        "error": refusal.message,
        "reason": refusal.reason.as_str(),
        "requestId": request_id,
    });
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        StatusCode::from_u16(refusal.reason.status()).unwrap_or(StatusCode::FORBIDDEN);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, id);
    }
    if matches!(
        refusal.reason,
        Reason::RateLimited | Reason::TooManyConcurrent
    ) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `te` may only say `trailers` past the first hop (gRPC needs exactly that).
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// One request: decide, forward, and account for it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    addr: SocketAddr,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<GateBody> {
    conn.in_flight.fetch_add(1, Ordering::AcqRel);
    conn.touch();
    let request_id = shared.ids.next();
    let mut finish = Finish {
        shared: shared.clone(),
        conn,
        record: Record {
            time: k8s_openapi::jiff::Timestamp::now().to_string(),
            request_id: request_id.clone(),
            identity: peer.identity().map(str::to_string),
            peer: addr.to_string(),
            protocol: format!("{:?}", req.version()),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            ..Record::default()
        },
        counters: Arc::new(Counters::default()),
        started: Instant::now(),
        _in_flight: None,
    };
    let policy: Option<Arc<Policy>> = shared.policy.borrow().clone();
    let decided = decide(&shared, policy, &peer, &req);
    let (policy, in_flight) = match decided {
        Ok(ok) => ok,
        Err(refused) => return refuse(finish, &refused, &request_id),
    };
    finish._in_flight = Some(in_flight);
    let limits = &policy.limits;
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri = Uri::builder()
        .scheme("http")
        .authority(shared.upstream.authority.as_str())
        .path_and_query(path_and_query)
        .build();
    let Ok(uri) = uri else {
        let bad = Refusal {
            reason: Reason::BadPath,
            message: "the request target cannot be forwarded".into(),
        };
        return refuse(finish, &bad, &request_id);
    };
    parts.uri = uri;
    parts.version = shared.upstream.version;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(&CLIENT_IDENTITY);
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        parts.headers.insert(REQUEST_ID, id);
    }
    if let Some(identity) = peer.identity()
        && let Ok(value) = HeaderValue::from_str(identity)
    {
        parts.headers.insert(CLIENT_IDENTITY, value);
    }
    let body = RequestBody {
        inner: body,
        counters: finish.counters.clone(),
        max: limits.max_request_bytes,
        hash: policy
            .audit
            .body_hash
            .then(|| ring::digest::Context::new(&ring::digest::SHA256)),
    };
    let upstream_req = Request::from_parts(parts, body.boxed_unsync());
    match shared.upstream.client.request(upstream_req).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Ok(id) = HeaderValue::from_str(&request_id) {
                parts.headers.insert(REQUEST_ID, id);
            }
            finish.record.status = parts.status.as_u16();
            Response::from_parts(
                parts,
                ResponseBody {
                    inner: body,
                    finish: Some(finish),
                }
                .boxed_unsync(),
            )
        }
        Err(e) => {
            // The body's own count says it went over (HTTP/2's client reports only a reset
            // stream, without the body's error in its chain).
            let over = finish.counters.bytes_in.load(Ordering::Acquire) > limits.max_request_bytes;
            let refused = if over || caused_by_too_large(&e) {
                policy::too_large(limits.max_request_bytes)
            } else {
                Refusal {
                    reason: Reason::UpstreamUnavailable,
                    message: if e.is_connect() {
                        "the model server is not accepting connections".into()
                    } else {
                        format!("the model server failed to answer: {e}")
                    },
                }
            };
            refuse(finish, &refused, &request_id)
        }
    }
}

/// The decisions in order: a policy, the caller, the request's shape, then the caller's rate
/// and concurrency.
fn decide(
    shared: &Arc<Shared>,
    policy: Option<Arc<Policy>>,
    peer: &Peer,
    req: &Request<Incoming>,
) -> Result<(Arc<Policy>, InFlight), Refusal> {
    let Some(policy) = policy else {
        return Err(Refusal {
            reason: Reason::NoPolicy,
            message: "the gate has no policy yet; it refuses every request until it has one".into(),
        });
    };
    let identity = policy::authorize(&policy, peer)?;
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    policy::check_request(
        &policy.limits,
        req.method().as_str(),
        req.uri().path(),
        content_length,
    )?;
    let in_flight = shared.limiter.admit(identity, &policy.limits)?;
    Ok((policy, in_flight))
}

fn refuse(mut finish: Finish, refused: &Refusal, request_id: &str) -> Response<GateBody> {
    finish.record.status = refused.reason.status();
    finish.record.reason = Some(refused.reason.as_str());
    finish.counters.complete.store(true, Ordering::Release);
    drop(finish);
    refusal(refused, request_id)
}

fn caused_by_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<TooLarge>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// `/healthz` (the process serves) and `/readyz` (a policy and certificates are loaded, the
/// gate is not draining, and the model server accepts connections).
pub(crate) fn health_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/upstream", get(upstream_probe))
        .with_state(shared)
}

/// The model server's probes, for the kubelet: the server listens on the pod's loopback, which
/// the kubelet cannot reach. `/upstream` succeeds when the server accepts a connection;
/// `/upstream?path=/health` when a GET of that path answers 2xx or 3xx.
async fn upstream_probe(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
) -> impl IntoResponse {
    let path = uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "path")
            .map(|(_, v)| v.into_owned())
    });
    let Some(path) = path else {
        let connect = TcpStream::connect(shared.upstream.addr);
        return match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => (StatusCode::OK, "accepting connections".to_string()),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the model server is not accepting connections".to_string(),
            ),
        };
    };
    if !policy::path_is_canonical(&path) {
        return (StatusCode::BAD_REQUEST, "not a probe path".to_string());
    }
    let uri = format!("http://{}{path}", shared.upstream.authority);
    let Ok(request) = Request::get(uri).version(shared.upstream.version).body(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    ) else {
        return (StatusCode::BAD_REQUEST, "not a probe path".to_string());
    };
    match tokio::time::timeout(
        Duration::from_secs(10),
        shared.upstream.client.request(request),
    )
    .await
    {
        Ok(Ok(response)) => {
            let status = response.status();
            let ok = status.is_success() || status.is_redirection();
            (
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                format!("the model server answered {status}"),
            )
        }
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the model server failed: {e}"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the model server did not answer in 10 s".to_string(),
        ),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.draining.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    if shared.policy.borrow().is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no policy loaded");
    }
    let connect = TcpStream::connect(shared.upstream.addr);
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the model server is not accepting connections",
        ),
    }
}

/// `/metrics`.
pub(crate) fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
