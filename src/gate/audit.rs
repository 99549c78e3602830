//! The audit log: one JSON line per request on standard output (diagnostics go to standard
//! error). Bodies are never logged: a line records sizes and, when the policy asks, the request
//! body's SHA-256. The format is documented in `docs/gate.md`.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
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
    tx: mpsc::Sender<Message>,
    /// Lines queued and not yet written.
    queued: Arc<AtomicUsize>,
    metrics: Arc<GateMetrics>,
}

enum Message {
    Line(Box<Record>),
    /// Everything queued before it is written and flushed; then the sender hears back.
    Flush(mpsc::Sender<()>),
}

/// Lines queued at most before they are dropped. The queue is a list that grows as lines come
/// (a bounded channel would allocate and touch every slot up front: a MiB or two of the gate's
/// memory, for a queue that is nearly always short).
const QUEUE: usize = 65_536;

/// How long the writer lets lines gather after a write. A request then costs the writer no
/// wake-up of its own under load (one write call carries hundreds of lines), and an audit line
/// is on standard output at most this much later than its request ended.
pub const BATCH: std::time::Duration = std::time::Duration::from_millis(10);

impl Audit {
    /// Starts the writer on `out`.
    pub fn start(out: Box<dyn Write + Send>, metrics: Arc<GateMetrics>) -> Self {
        let (tx, rx) = mpsc::channel::<Message>();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        std::thread::spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
            while let Ok(first) = rx.recv() {
                let mut flushed = Vec::new();
                let mut take = |m: Message| match m {
                    Message::Line(r) => {
                        taken.fetch_sub(1, Ordering::AcqRel);
                        let _ = serde_json::to_writer(&mut out, &*r);
                        let _ = out.write_all(b"\n");
                    }
                    Message::Flush(done) => flushed.push(done),
                };
                take(first);
                while let Ok(more) = rx.try_recv() {
                    take(more);
                }
                let _ = out.flush();
                let waiting = !flushed.is_empty();
                for done in flushed {
                    let _ = done.send(());
                }
                if !waiting {
                    std::thread::sleep(BATCH);
                }
            }
        });
        Self {
            tx,
            queued,
            metrics,
        }
    }

    /// Queues one line.
    pub fn write(&self, record: Record) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= QUEUE {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.audit_dropped.inc();
            return;
        }
        if self.tx.send(Message::Line(Box::new(record))).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.audit_dropped.inc();
        }
    }

    /// Blocks until every line queued so far is written and flushed (at exit).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that blocks on its first write until the test lets it go.
    struct Stuck {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_past_the_queue_are_dropped_and_counted_while_the_output_is_stuck() {
        let (entered, writing) = mpsc::channel();
        let (let_go, release) = mpsc::channel();
        let metrics = Arc::new(GateMetrics::default());
        let audit = Audit::start(Box::new(Stuck { entered, release }), metrics.clone());
        audit.write(Record::default());
        writing.recv().expect("the writer writes the first line");
        for _ in 0..QUEUE + 10 {
            audit.write(Record::default());
        }
        assert_eq!(metrics.audit_dropped.get(), 10);
        drop(let_go);
    }

    #[test]
    fn flush_returns_once_every_queued_line_is_written() {
        let out = Shared::default();
        let audit = Audit::start(Box::new(out.clone()), Arc::default());
        for n in 0..1000 {
            audit.write(Record {
                request_id: format!("r{n}"),
                ..Record::default()
            });
        }
        audit.flush();
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                v["request_id"].as_str().expect("request_id").to_string()
            })
            .collect();
        let expected: Vec<String> = (0..1000).map(|n| format!("r{n}")).collect();
        assert_eq!(ids, expected);
    }
}
