//! A hook for the fuzz target `gate_request` (`fuzz/fuzz_targets/gate_request.rs`, see
//! `docs/fuzzing.md`); not part of Moat's interface.
//!
//! [`Harness::serve`] runs the gate's real request path on any byte stream: hyper's server,
//! configured as [`proxy::connection`] configures it (HTTP/1.1 or HTTP/2 by the first bytes,
//! the header timeout), with [`proxy::handle`] behind it (the decisions of [`super::policy`],
//! the request ids, the header rewriting, the body limit, forwarding to the upstream and the
//! audit record). What it leaves out is TLS: the peer is fixed, as a finished handshake would
//! have established it, and the connection is plaintext.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use super::{
    GateError, Settings, Shared, UpstreamProtocol, audit, metrics::GateMetrics, policy::Peer,
    policy::Policy, proxy, tls,
};

/// A gate with a fixed policy and a fixed peer, forwarding to an upstream of the caller's.
pub struct Harness {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    /// Shared by the connections [`Harness::serve`] serves (one at a time).
    state: Arc<proxy::ConnState>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A gate that applies `policy` to every request of `peer` and forwards what it admits to
    /// `upstream` (HTTP/1.1). Audit lines are discarded. Must be called inside a Tokio runtime.
    pub fn new(policy: Policy, peer: Peer, upstream: SocketAddr) -> Result<Self, GateError> {
        // The serving certificate is never used (no handshake), but `Shared` holds one.
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .map_err(|e| GateError::Tls(e.to_string()))?;
        let cert = certified.cert.pem();
        let tls = tls::load(
            cert.as_bytes(),
            certified.signing_key.serialize_pem().as_bytes(),
            cert.as_bytes(),
        )?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let settings = Settings {
            listen: loopback,
            upstream,
            upstream_protocol: UpstreamProtocol::Http1,
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: PathBuf::new(),
            policy: PathBuf::new(),
            health_listen: loopback,
            metrics_listen: None,
            drain: Duration::from_secs(1),
            reload_interval: Duration::from_secs(3600),
        };
        let metrics = Arc::new(GateMetrics::default());
        let label =
            crate::gate::policy::metric_identity(Some(&policy), peer.identity()).to_string();
        let (policy_tx, _) = watch::channel(Some(Arc::new(policy)));
        let shared = Arc::new(Shared {
            upstream: proxy::Upstream::new(upstream, UpstreamProtocol::Http1),
            settings,
            tls: ArcSwap::from_pointee(tls),
            policy: policy_tx,
            metrics: metrics.clone(),
            audit: audit::Audit::start(Box::new(std::io::sink()), metrics.clone()),
            limiter: Arc::default(),
            ids: proxy::RequestIds::new(),
            draining: AtomicBool::new(false),
        });
        Ok(Self {
            shared,
            state: Arc::new(proxy::ConnState::new(&metrics, &label)),
            peer: Arc::new(peer),
        })
    }

    /// Requests whose response has not ended yet (an HTTP/2 client that closes the connection
    /// cancels them, so the fuzz target waits for none to be left before it closes).
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// Serves one client connection on `io` until it ends (the client closed it, or sent
    /// something hyper refuses). A client that shuts its writing side is still answered.
    pub async fn serve<I>(&self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self
            .shared
            .policy
            .borrow()
            .as_ref()
            .map(|p| p.limits.clone())
            .unwrap_or_default();
        let header_timeout = Duration::from_secs(u64::from(limits.header_timeout_seconds.max(1)));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));
        let state = self.state.clone();
        let service = {
            let shared = self.shared.clone();
            let peer = self.peer.clone();
            hyper::service::service_fn(move |req| {
                let (shared, peer, state) = (shared.clone(), peer.clone(), state.clone());
                async move { Ok::<_, Infallible>(proxy::handle(shared, peer, addr, state, req).await) }
            })
        };
        // As in `proxy::connection`, and half-closed connections answered.
        let mut builder = proxy::server(&limits, header_timeout);
        builder.http1().half_close(true);
        let _ = builder.serve_connection(TokioIo::new(io), service).await;
    }
}
