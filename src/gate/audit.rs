//! The audit log: one JSON line per request on standard output (diagnostics go to standard
//! error). Bodies are never logged: a line records sizes and, when the policy asks, the request
//! body's SHA-256. The format is documented in `docs/gate.md`.

use std::{
    io::Write,
    sync::{Arc, mpsc},
};

use serde::Serialize;

use super::metrics::GateMetrics;

/// One request, as the audit log records it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Record {
    /// When the request's headers arrived, RFC 3339 UTC.
    pub time: String,
    /// The request id, also sent upstream and to the client as `x-request-id`.
    pub request_id: String,
    /// The caller's verified SPIFFE ID; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The client's address.
    pub peer: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// The request method.
    pub method: String,
    /// The path, without the query string (queries can carry data).
    pub path: String,
    /// The status the client got; 0 when the client went away before the response began.
    pub status: u16,
    /// Why the gate refused the request ([`super::policy::Reason::as_str`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Request body bytes received.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Milliseconds from the request's headers to the end (or abandonment) of the response.
    pub duration_ms: f64,
    /// Whether the response body was sent to its end (false: the client went away, or the
    /// connection was closed by a revocation or quarantine).
    pub complete: bool,
    /// SHA-256 of the request body, when the policy asks for it and the body was read whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_sha256: Option<String>,
}

/// Writes audit lines from a thread of its own, so a slow reader of standard output never
/// stalls a request; lines it cannot take are counted in `moat_gate_audit_dropped`.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::SyncSender<Box<Record>>,
    metrics: Arc<GateMetrics>,
}

/// Lines queued at most before they are dropped. The channel allocates (and touches) a slot
/// per line up front, so a slot holds a box: 16 bytes each rather than a whole [`Record`].
const QUEUE: usize = 65_536;

impl Audit {
    /// Starts the writer on `out`.
    pub fn start(out: Box<dyn Write + Send>, metrics: Arc<GateMetrics>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Box<Record>>(QUEUE);
        std::thread::spawn(move || {
            let mut out = std::io::BufWriter::new(out);
            while let Ok(record) = rx.recv() {
                let mut write = |r: &Record| {
                    let _ = serde_json::to_writer(&mut out, r);
                    let _ = out.write_all(b"\n");
                };
                write(&record);
                while let Ok(more) = rx.try_recv() {
                    write(&more);
                }
                let _ = out.flush();
            }
        });
        Self { tx, metrics }
    }

    /// Queues one line.
    pub fn write(&self, record: Record) {
        if self.tx.try_send(Box::new(record)).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }
}
