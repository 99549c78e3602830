//! The decryption pipeline, with bounded memory for any artifact size:
//!
//! ```text
//! reader thread                 workers (one per core)            caller's thread
//! read + SHA-256 of the   --->  open a batch of chunks   --->    PlainReader: batches back in
//! ciphertext, batches of        in place (ring)                   order, as an io::Read for the
//! sealed chunks                                                   tar extractor
//!        ^                                                               |
//!        +------------------ emptied batch buffers ----------------------+
//! ```
//!
//! A fixed pool of batch buffers circulates; the reader waits for an emptied one, so at most
//! `buffers x batch` bytes are in flight however large the artifact. The digest of the whole
//! artifact (header included) is known only when the reader reaches the end; [`PlainReader`]
//! reports end of stream only after the final chunk opened, and hands the digest over with
//! [`PlainReader::finish`].

use std::{
    collections::BTreeMap,
    io::{self, BufRead, Read},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, Sender, SyncSender, channel, sync_channel},
    },
    thread,
};

use ring::digest;

use super::{
    ModelError,
    stream::{CHUNK, PayloadKey, SEALED_CHUNK},
};

/// Sealed chunks per batch: 4 MiB of ciphertext. Each batch costs a few thread wake-ups, which
/// are expensive on virtual machines (inter-processor interrupts); 4 MiB batches were about 5%
/// faster than 1 MiB ones on a 2-CPU VM, and still give every core work early.
pub const BATCH_CHUNKS: usize = 64;

/// Hashes every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hash: digest::Context,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: digest::Context::new(&digest::SHA256),
            bytes: 0,
        }
    }

    /// The SHA-256 of all bytes read so far, and their count.
    pub fn finish(self) -> ([u8; 32], u64) {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.hash.finish().as_ref());
        (out, self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A batch of sealed chunks, opened in place by a worker.
struct Batch {
    seq: u64,
    /// Index of the batch's first chunk in the stream.
    first_chunk: u64,
    buf: Vec<u8>,
    /// Bytes of ciphertext in `buf`.
    len: usize,
    /// The stream ends after this batch.
    at_end: bool,
    /// After opening: the chunks that opened, the plaintext length of the last of them, and
    /// the failure after them (the consumer releases those chunks, then fails).
    opened: usize,
    last_plain: usize,
    failure: Option<ModelError>,
}

enum Msg {
    /// A batch, opened up to its first failure.
    Opened(u64, Batch),
    /// The reader reached the end after `batches` batches; the artifact's digest and size.
    Done {
        batches: u64,
        digest: [u8; 32],
        bytes: u64,
    },
    ReadFailed(ModelError),
}

/// Fills `buf` from `input`; returns fewer bytes only at the end of the input.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// How the pipeline is sized.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    /// Threads that open chunks.
    pub workers: usize,
    /// Batch buffers in circulation.
    pub buffers: usize,
    /// Sealed chunks per batch.
    pub batch_chunks: usize,
}

impl Sizing {
    /// One worker per core, three buffers per worker (one being read, one being opened, one
    /// being extracted), plus two: 32 MiB in flight on two cores, whatever the artifact's size.
    pub fn for_this_machine() -> Self {
        let workers = thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 64);
        Sizing {
            workers,
            buffers: 3 * workers + 2,
            batch_chunks: BATCH_CHUNKS,
        }
    }
}

/// Starts the reader and the workers on `input`, which is positioned at the first sealed chunk
/// (after the header and the payload nonce) and whose bytes have all gone through `hashing`.
/// Returns the plaintext as an [`io::Read`].
pub fn start<R>(
    input: io::BufReader<HashingReader<R>>,
    key: PayloadKey,
    sizing: Sizing,
) -> Result<PlainReader, ModelError>
where
    R: Read + Send + 'static,
{
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(sizing.buffers);
    for _ in 0..sizing.buffers {
        // Cannot fail: the channel has room for every buffer and its receiver is alive.
        let _ = free_tx.send(vec![0u8; sizing.batch_chunks * SEALED_CHUNK]);
    }
    let (job_tx, job_rx) = sync_channel::<Batch>(sizing.buffers);
    let (out_tx, out_rx) = channel::<Msg>();
    let key = Arc::new(key);
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..sizing.workers {
        let (key, job_rx, out_tx) = (key.clone(), job_rx.clone(), out_tx.clone());
        thread::Builder::new()
            .name("moat-open".into())
            .spawn(move || work(&key, &job_rx, &out_tx))
            .map_err(|_| ModelError::Internal("cannot start a decryption thread"))?;
    }
    thread::Builder::new()
        .name("moat-read".into())
        .spawn(move || read(input, &free_rx, &job_tx, &out_tx))
        .map_err(|_| ModelError::Internal("cannot start the reading thread"))?;
    Ok(PlainReader {
        rx: out_rx,
        free_tx,
        pending: BTreeMap::new(),
        next_seq: 0,
        total: None,
        digest: None,
        current: None,
        after: None,
        failure: None,
    })
}

/// The reader thread: batches of sealed chunks, hashed on the way in.
fn read<R: Read>(
    mut input: io::BufReader<HashingReader<R>>,
    free: &Receiver<Vec<u8>>,
    jobs: &SyncSender<Batch>,
    out: &Sender<Msg>,
) {
    let mut seq = 0u64;
    let mut first_chunk = 0u64;
    loop {
        // Fails only when the consumer is gone: stop.
        let Ok(mut buf) = free.recv() else { return };
        let len = match read_full(&mut input, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = out.send(Msg::ReadFailed(ModelError::Io {
                    what: "reading the artifact".into(),
                    error: e,
                }));
                return;
            }
        };
        // A full buffer may be the end too: peek.
        let at_end = len < buf.len()
            || match input.fill_buf() {
                Ok(rest) => rest.is_empty(),
                Err(e) => {
                    let _ = out.send(Msg::ReadFailed(ModelError::Io {
                        what: "reading the artifact".into(),
                        error: e,
                    }));
                    return;
                }
            };
        let chunks = len.div_ceil(SEALED_CHUNK) as u64;
        let batch = Batch {
            seq,
            first_chunk,
            buf,
            len,
            at_end,
            opened: 0,
            last_plain: 0,
            failure: None,
        };
        if jobs.send(batch).is_err() {
            return;
        }
        seq += 1;
        first_chunk += chunks;
        if at_end {
            let (digest, bytes) = input.into_inner().finish();
            let _ = out.send(Msg::Done {
                batches: seq,
                digest,
                bytes,
            });
            return;
        }
    }
}

/// A worker: opens batches until the reader stops.
fn work(key: &PayloadKey, jobs: &Mutex<Receiver<Batch>>, out: &Sender<Msg>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut batch) = job else { return };
        let seq = batch.seq;
        let opened = key.open_batch(batch.first_chunk, &mut batch.buf[..batch.len], batch.at_end);
        batch.opened = opened.chunks;
        batch.last_plain = opened.last_plain;
        batch.failure = opened.failure;
        if out.send(Msg::Opened(seq, batch)).is_err() {
            return;
        }
    }
}

/// Where the consumer is in the current batch.
struct Cursor {
    batch: Batch,
    chunks: usize,
    chunk: usize,
    offset: usize,
}

impl Cursor {
    fn new(batch: Batch) -> Self {
        let chunks = batch.opened;
        Cursor {
            batch,
            chunks,
            chunk: 0,
            offset: 0,
        }
    }

    /// The unread plaintext of the current chunk (empty when the batch is used up).
    fn available(&mut self) -> &[u8] {
        while self.chunk < self.chunks {
            let len = if self.chunk + 1 == self.chunks {
                self.batch.last_plain
            } else {
                CHUNK
            };
            if self.offset < len {
                let start = self.chunk * SEALED_CHUNK;
                return &self.batch.buf[start + self.offset..start + len];
            }
            self.chunk += 1;
            self.offset = 0;
        }
        &[]
    }
}

/// The plaintext, in order, once it has authenticated. Read errors carry a [`ModelError`],
/// which [`PlainReader::take_failure`] returns.
pub struct PlainReader {
    rx: Receiver<Msg>,
    free_tx: SyncSender<Vec<u8>>,
    pending: BTreeMap<u64, Batch>,
    next_seq: u64,
    total: Option<u64>,
    digest: Option<([u8; 32], u64)>,
    current: Option<Cursor>,
    /// The failure after the chunks released so far, reported at the next read.
    after: Option<ModelError>,
    failure: Option<ModelError>,
}

impl PlainReader {
    fn fail(&mut self, e: ModelError) -> io::Error {
        let message = e.to_string();
        self.failure.get_or_insert(e);
        io::Error::other(message)
    }

    /// The next batch in order, or `None` at the end of the stream.
    fn next_batch(&mut self) -> io::Result<Option<Batch>> {
        if let Some(e) = self.after.take() {
            return Err(self.fail(e));
        }
        if self.failure.is_some() {
            return Err(io::Error::other("the payload failed before"));
        }
        loop {
            if self.total == Some(self.next_seq) {
                return Ok(None);
            }
            if let Some(batch) = self.pending.remove(&self.next_seq) {
                self.next_seq += 1;
                return Ok(Some(batch));
            }
            match self.rx.recv() {
                Ok(Msg::Opened(seq, batch)) => {
                    self.pending.insert(seq, batch);
                }
                Ok(Msg::ReadFailed(e)) => return Err(self.fail(e)),
                Ok(Msg::Done {
                    batches,
                    digest,
                    bytes,
                }) => {
                    self.total = Some(batches);
                    self.digest = Some((digest, bytes));
                }
                Err(_) => {
                    return Err(self.fail(ModelError::Internal("the decryption threads stopped")));
                }
            }
        }
    }

    /// Hands a used-up batch's buffer back; its failure, if any, comes next.
    fn release(&mut self, batch: Batch) {
        if let Some(e) = batch.failure {
            self.after.get_or_insert(e);
        }
        let _ = self.free_tx.send(batch.buf);
    }

    /// Discards the rest of the plaintext (checking that it authenticates).
    pub fn drain(&mut self) -> io::Result<()> {
        if let Some(cursor) = self.current.take() {
            self.release(cursor.batch);
        }
        while let Some(batch) = self.next_batch()? {
            self.release(batch);
        }
        Ok(())
    }

    /// The first failure of the stream (decryption or reading), if any.
    pub fn take_failure(&mut self) -> Option<ModelError> {
        self.failure.take().or_else(|| self.after.take())
    }

    /// After the end of the stream: the SHA-256 of the whole artifact and its size in bytes.
    pub fn finish(mut self) -> Result<([u8; 32], u64), ModelError> {
        self.drain().map_err(|e| {
            self.failure.take().unwrap_or(ModelError::Io {
                what: "reading the artifact".into(),
                error: e,
            })
        })?;
        self.digest
            .ok_or(ModelError::Internal("the digest is missing"))
    }
}

impl Read for PlainReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut written = 0;
        while written < out.len() {
            if self.current.is_none() {
                // Block for the next batch only when nothing is copied yet, and report a
                // failure only then (what was copied before it is authentic).
                if written > 0
                    && (self.after.is_some() || !self.pending.contains_key(&self.next_seq))
                {
                    break;
                }
                match self.next_batch()? {
                    Some(batch) => self.current = Some(Cursor::new(batch)),
                    None => break,
                }
            }
            let Some(cursor) = self.current.as_mut() else {
                break;
            };
            let available = cursor.available();
            if available.is_empty() {
                if let Some(cursor) = self.current.take() {
                    self.release(cursor.batch);
                }
                continue;
            }
            let n = available.len().min(out.len() - written);
            out[written..written + n].copy_from_slice(&available[..n]);
            cursor.offset += n;
            written += n;
        }
        Ok(written)
    }
}
