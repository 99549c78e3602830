//! `moat gate`: the model endpoint's sidecar. A TLS reverse proxy in front of the model server
//! that enforces, whatever the server does:
//!
//! - **identity**: a client certificate from Moat's CA whose SPIFFE ID the model consented to
//!   (the policy's `identities`); every other caller gets 401 or 403 with the reason;
//! - **limits**: methods, paths, body size, per-identity rate and concurrency (404, 405, 413,
//!   429, never a hang);
//! - **audit**: one JSON line per request on standard output ([`audit`]);
//! - **revocation and quarantine**: a new policy closes the connections it no longer allows at
//!   once, streams included.
//!
//! The decisions are pure ([`policy`]); this module and [`proxy`] are the shell: files in,
//! sockets in and out. The policy and the certificates are files (a ConfigMap and the serving
//! certificate's Secret, mounted), read again every [`Settings::reload_interval`]; a change is
//! applied to new requests at once and to open connections as said, without a restart.

pub mod audit;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod policy;
mod proxy;
pub mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use metrics::GateMetrics;
use policy::Policy;

/// Why the gate cannot start or serve.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The serving certificate, its key or the CA bundle is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A listening address is taken or not allowed.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// How the gate talks to the model server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (every request of an HTTP/2 client too).
    Http1,
    /// HTTP/2 without TLS, by prior knowledge (gRPC servers).
    Http2,
}

/// Where the gate listens, what it forwards to, and the files it reads.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The TLS port (the Service's target).
    pub listen: SocketAddr,
    /// The model server, on the pod's loopback.
    pub upstream: SocketAddr,
    /// The model server's protocol.
    pub upstream_protocol: UpstreamProtocol,
    /// The serving certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA bundle client certificates must chain to (PEM).
    pub ca: PathBuf,
    /// The policy (JSON, [`Policy`]).
    pub policy: PathBuf,
    /// Plaintext `/healthz` and `/readyz`, for the kubelet.
    pub health_listen: SocketAddr,
    /// Plaintext `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// How long open requests may finish after SIGTERM.
    pub drain: Duration,
    /// How often the files are read again.
    pub reload_interval: Duration,
}

/// What every connection and request shares.
pub(crate) struct Shared {
    settings: Settings,
    tls: ArcSwap<tls::Tls>,
    /// `None` until a policy was read: every request is then refused (fail closed).
    policy: watch::Sender<Option<Arc<Policy>>>,
    metrics: Arc<GateMetrics>,
    audit: audit::Audit,
    limiter: Arc<proxy::Limiter>,
    upstream: proxy::Upstream,
    ids: proxy::RequestIds,
    draining: AtomicBool,
}

/// Reads the certificate files once.
fn read_tls(settings: &Settings) -> Result<(Vec<u8>, tls::Tls), GateError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| GateError::Read {
            path: path.clone(),
            source,
        })
    };
    let (cert, key, ca) = (
        read(&settings.cert)?,
        read(&settings.key)?,
        read(&settings.ca)?,
    );
    let loaded = tls::load(&cert, &key, &ca)?;
    let mut all = cert;
    all.extend_from_slice(&key);
    all.extend_from_slice(&ca);
    Ok((all, loaded))
}

/// Reads and parses the policy file.
fn read_policy(path: &PathBuf) -> Result<(Vec<u8>, Result<Policy, String>), GateError> {
    let bytes = std::fs::read(path).map_err(|source| GateError::Read {
        path: path.clone(),
        source,
    })?;
    let parsed = serde_json::from_slice::<Policy>(&bytes).map_err(|e| e.to_string());
    Ok((bytes, parsed))
}

/// Runs the gate until SIGTERM (or Ctrl-C), then drains: no new connections, open requests get
/// [`Settings::drain`] to finish.
pub async fn run(settings: Settings) -> Result<(), GateError> {
    let metrics = Arc::new(GateMetrics::default());
    let audit = audit::Audit::start(Box::new(std::io::stdout()), metrics.clone());
    let (tls_bytes, tls) = read_tls(&settings)?;
    metrics.reloaded("certificate", true);
    let (policy_tx, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        upstream: proxy::Upstream::new(settings.upstream, settings.upstream_protocol),
        settings: settings.clone(),
        tls: ArcSwap::from_pointee(tls),
        policy: policy_tx,
        metrics: metrics.clone(),
        audit,
        limiter: Arc::default(),
        ids: proxy::RequestIds::new(),
        draining: AtomicBool::new(false),
    });
    let listener = bind(settings.listen).await?;
    serve_plain(
        bind(settings.health_listen).await?,
        proxy::health_router(shared.clone()),
        "health",
    );
    if let Some(addr) = settings.metrics_listen {
        serve_plain(
            bind(addr).await?,
            proxy::metrics_router(shared.clone()),
            "metrics",
        );
    }
    let reload = tokio::spawn(reload(shared.clone(), tls_bytes));
    info!(listen = %settings.listen, upstream = %settings.upstream, "the gate is listening");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    tracker.spawn(proxy::connection(shared.clone(), tcp, addr, shutdown.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off a little, keep serving.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    info!(drain = ?settings.drain, "SIGTERM: draining open requests");
    shared.draining.store(true, Ordering::Release);
    drop(listener);
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(settings.drain, tracker.wait())
        .await
        .is_err()
    {
        warn!("requests still open at the end of the drain period were cut");
    }
    reload.abort();
    let audit = shared.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, GateError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| GateError::Bind { addr, source })
}

/// Serves a plaintext endpoint (`what`: health or metrics) in the background.
fn serve_plain(listener: tokio::net::TcpListener, router: axum::Router, what: &'static str) {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!(error = %e, endpoint = what, "a plaintext endpoint stopped");
        }
    });
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reads the policy and the certificates every [`Settings::reload_interval`] and applies what
/// changed. An unreadable or invalid policy keeps the last good one (and is counted); before the
/// first good one every request is refused.
async fn reload(shared: Arc<Shared>, mut tls_bytes: Vec<u8>) {
    let mut policy_bytes: Option<Vec<u8>> = None;
    let mut interval = tokio::time::interval(shared.settings.reload_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match read_policy(&shared.settings.policy) {
            Ok((bytes, parsed)) if policy_bytes.as_ref() != Some(&bytes) => {
                policy_bytes = Some(bytes);
                match parsed {
                    Ok(policy) => {
                        let m = &shared.metrics;
                        m.quarantined.set(i64::from(policy.quarantine.is_some()));
                        m.identities
                            .set(i64::try_from(policy.identities.len()).unwrap_or(i64::MAX));
                        m.reloaded("policy", true);
                        info!(
                            identities = policy.identities.len(),
                            quarantined = policy.quarantine.is_some(),
                            "policy loaded"
                        );
                        shared.policy.send_replace(Some(Arc::new(policy)));
                    }
                    Err(e) => {
                        shared.metrics.reloaded("policy", false);
                        warn!(error = %e, "the policy is invalid; keeping the last good one");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if policy_bytes.take().is_some() || shared.policy.borrow().is_none() {
                    warn!(error = %e, "the policy cannot be read; keeping the last good one");
                }
            }
        }
        match read_tls(&shared.settings) {
            Ok((bytes, loaded)) if bytes != tls_bytes => {
                tls_bytes = bytes;
                shared.tls.store(Arc::new(loaded));
                shared.metrics.reloaded("certificate", true);
                info!("serving certificate reloaded");
            }
            Ok(_) => {}
            Err(e) => {
                // A renewal is written file by file; the next read sees all of it.
                shared.metrics.reloaded("certificate", false);
                warn!(error = %e, "the certificate files cannot be used yet; keeping the loaded ones");
            }
        }
    }
}
