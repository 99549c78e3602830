//! The age payload: ChaCha20-Poly1305 in the STREAM construction, opened chunk by chunk with
//! ring, so that chunks can be opened on several cores at once (the age crate opens them one
//! after another).
//!
//! From the age spec (<https://age-encryption.org/v1>, "Payload"):
//!
//! - the payload starts with a 16-byte nonce; the payload key is
//!   HKDF-SHA256(ikm = file key, salt = nonce, info = "payload");
//! - the plaintext is cut into 64 KiB chunks, each sealed with ChaCha20-Poly1305 (16-byte tag,
//!   no associated data) under the nonce `11-byte big-endian chunk counter || last flag`, where
//!   the flag is 0x01 for the final chunk and 0x00 for every other;
//! - every chunk but the final one is full; the final one may be short, and is empty only when
//!   it is the only chunk.
//!
//! So a stream cut at a chunk boundary fails (its last chunk was sealed as non-final), a final
//! chunk followed by more data fails (what follows it, or the chunk itself, was sealed with the
//! other flag), and chunks cannot be reordered (the counter is in the nonce).

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use super::{ModelError, header::hkdf};
use age_core::format::FileKey;

/// Plaintext bytes in a full chunk.
pub const CHUNK: usize = 64 * 1024;
/// Poly1305 tag bytes after each chunk.
pub const TAG: usize = 16;
/// Ciphertext bytes of a full chunk.
pub const SEALED_CHUNK: usize = CHUNK + TAG;
/// Bytes of the nonce at the start of the payload.
pub const PAYLOAD_NONCE: usize = 16;

/// The payload key: opens chunks, from any thread.
pub struct PayloadKey(LessSafeKey);

impl std::fmt::Debug for PayloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadKey(<redacted>)")
    }
}

/// The ChaCha20-Poly1305 nonce of chunk `index`.
fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    // 11-byte big-endian counter: the u64 fills the low 8 bytes, the top 3 stay zero (a file
    // would need 2^64 chunks to reach them).
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

impl PayloadKey {
    /// Derives the payload key from the file key and the payload nonce.
    pub fn new(
        file_key: &FileKey,
        payload_nonce: &[u8; PAYLOAD_NONCE],
    ) -> Result<Self, ModelError> {
        let key: UnboundKey = hkdf(file_key, payload_nonce, &[b"payload"], &CHACHA20_POLY1305)?;
        Ok(PayloadKey(LessSafeKey::new(key)))
    }

    /// Opens one sealed chunk in place; returns the length of its plaintext, which then sits at
    /// the start of `sealed`. On failure ring zeroes the buffer.
    fn open(&self, index: u64, last: bool, sealed: &mut [u8]) -> Result<usize, ()> {
        self.0
            .open_in_place(nonce(index, last), Aad::empty(), sealed)
            .map(|plain| plain.len())
            .map_err(|_| ())
    }

    /// Opens the sealed chunks of a batch in place. `buf` holds consecutive sealed chunks, the
    /// first of which is chunk `first`; all are full except perhaps the last. `at_end` says the
    /// stream ends after `buf`, so its last chunk must be the final one.
    ///
    /// The chunks open in order, up to the first failure: those before it are authenticated
    /// plaintext, released as the age reference implementation releases them (so what a broken
    /// stream gives before its error does not depend on how chunks are batched).
    pub fn open_batch(&self, first: u64, buf: &mut [u8], at_end: bool) -> Opened {
        let mut opened = Opened {
            chunks: 0,
            last_plain: 0,
            failure: None,
        };
        if buf.is_empty() {
            opened.failure = Some(ModelError::Truncated("the payload has no chunk"));
            return opened;
        }
        let count = buf.len().div_ceil(SEALED_CHUNK);
        for (i, sealed) in buf.chunks_mut(SEALED_CHUNK).enumerate() {
            let index = first + i as u64;
            let final_chunk = at_end && i + 1 == count;
            let result = if final_chunk {
                self.open_final(index, sealed)
            } else if sealed.len() == SEALED_CHUNK {
                self.open(index, false, sealed)
                    .map(|len| (len, None))
                    .map_err(|()| ModelError::ChunkAuth(index))
            } else {
                // Only the reader's last batch can hold a short chunk, and it is `at_end`.
                Err(ModelError::Internal("short chunk inside the stream"))
            };
            match result {
                Ok((len, after)) => {
                    opened.chunks += 1;
                    opened.last_plain = len;
                    if after.is_some() {
                        opened.failure = after;
                        return opened;
                    }
                }
                Err(e) => {
                    opened.failure = Some(e);
                    return opened;
                }
            }
        }
        opened
    }

    /// Opens the chunk the stream ends with, which must be marked final. A full chunk sealed as
    /// non-final opens (its plaintext is authentic) with the failure that the stream was cut
    /// after it.
    fn open_final(
        &self,
        index: u64,
        sealed: &mut [u8],
    ) -> Result<(usize, Option<ModelError>), ModelError> {
        if sealed.len() < TAG {
            return Err(ModelError::FinalChunkAuth(index));
        }
        // Keep the ciphertext: if it is not a final chunk, try it as a non-final one to tell a
        // stream cut at a chunk boundary from a modified one. One chunk per file: cheap.
        let copy = (sealed.len() == SEALED_CHUNK).then(|| sealed.to_vec());
        match self.open(index, true, sealed) {
            Ok(0) if index > 0 => Err(ModelError::EmptyFinalChunk(index)),
            Ok(len) => Ok((len, None)),
            Err(()) => {
                let Some(mut copy) = copy else {
                    return Err(ModelError::FinalChunkAuth(index));
                };
                if self.open(index, false, &mut copy).is_err() {
                    return Err(ModelError::FinalChunkAuth(index));
                }
                sealed.copy_from_slice(&copy);
                Ok((
                    CHUNK,
                    Some(ModelError::Truncated(
                        "it ends without the chunk marked final",
                    )),
                ))
            }
        }
    }
}

/// What [`PayloadKey::open_batch`] did with a batch.
#[derive(Debug)]
pub struct Opened {
    /// The batch's first chunks that opened: their plaintext sits at multiples of
    /// [`SEALED_CHUNK`], [`CHUNK`] bytes each but the last.
    pub chunks: usize,
    /// Plaintext bytes of the last chunk that opened.
    pub last_plain: usize,
    /// Why the chunk after those did not open, or why the stream may not end after them.
    pub failure: Option<ModelError>,
}

/// Seals a plaintext into age STREAM chunks (for tests of the decryptor; `moat encrypt` uses
/// the age crate).
#[cfg(test)]
pub(crate) fn seal_for_test(key: &PayloadKey, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if plaintext.is_empty() {
        vec![&[][..]]
    } else {
        plaintext.chunks(CHUNK).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let mut buf = chunk.to_vec();
        let last = i + 1 == chunks.len();
        #[allow(clippy::expect_used)]
        key.0
            .seal_in_place_append_tag(nonce(i as u64, last), Aad::empty(), &mut buf)
            .expect("seal");
        out.extend_from_slice(&buf);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PayloadKey {
        let file_key = FileKey::new(Box::new([7u8; 16]));
        PayloadKey::new(&file_key, &[9u8; 16]).expect("key")
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Opens a whole sealed stream as one batch and returns the plaintext, or the failure and
    /// the plaintext released before it.
    fn open_released(key: &PayloadKey, mut sealed: Vec<u8>) -> (Vec<u8>, Option<ModelError>) {
        let opened = key.open_batch(0, &mut sealed, true);
        let mut out = Vec::new();
        for (i, chunk) in sealed.chunks(SEALED_CHUNK).take(opened.chunks).enumerate() {
            let len = if i + 1 == opened.chunks {
                opened.last_plain
            } else {
                CHUNK
            };
            out.extend_from_slice(&chunk[..len]);
        }
        (out, opened.failure)
    }

    fn open_all(key: &PayloadKey, sealed: Vec<u8>) -> Result<Vec<u8>, ModelError> {
        match open_released(key, sealed) {
            (out, None) => Ok(out),
            (_, Some(e)) => Err(e),
        }
    }

    #[test]
    fn round_trips_sizes_around_chunk_boundaries() {
        let key = key();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let pt = plaintext(len);
            let sealed = seal_for_test(&key, &pt);
            assert_eq!(open_all(&key, sealed).expect("opens"), pt, "length {len}");
        }
    }

    #[test]
    fn batches_opened_separately_give_the_same_plaintext() {
        let key = key();
        let pt = plaintext(5 * CHUNK + 100);
        let sealed = seal_for_test(&key, &pt);
        let (a, b) = sealed.split_at(2 * SEALED_CHUNK);
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        // The second batch is opened first, as a parallel worker may.
        let second = key.open_batch(2, &mut b, true);
        let first = key.open_batch(0, &mut a, false);
        assert!(first.failure.is_none() && second.failure.is_none());
        assert_eq!((first.chunks, first.last_plain), (2, CHUNK));
        assert_eq!((second.chunks, second.last_plain), (4, 100));
        assert_eq!(&a[..CHUNK], &pt[..CHUNK]);
        assert_eq!(
            &b[SEALED_CHUNK..SEALED_CHUNK + CHUNK],
            &pt[3 * CHUNK..4 * CHUNK]
        );
    }

    #[test]
    fn truncation_at_a_chunk_boundary_is_detected() {
        let key = key();
        let sealed = seal_for_test(&key, &plaintext(3 * CHUNK + 5));
        let cut = sealed[..2 * SEALED_CHUNK].to_vec();
        assert!(matches!(
            open_all(&key, cut.clone()),
            Err(ModelError::Truncated(_))
        ));
        // Both chunks are authentic, and released before the failure.
        let (released, _) = open_released(&key, cut);
        assert_eq!(released, plaintext(3 * CHUNK + 5)[..2 * CHUNK]);
        // Cut inside a chunk: it does not authenticate.
        let cut = sealed[..2 * SEALED_CHUNK + 100].to_vec();
        assert!(matches!(
            open_all(&key, cut),
            Err(ModelError::FinalChunkAuth(2))
        ));
        // Cut inside the tag of the only chunk.
        let sealed = seal_for_test(&key, b"x");
        assert!(matches!(
            open_all(&key, sealed[..10].to_vec()),
            Err(ModelError::FinalChunkAuth(0))
        ));
        let mut none = Vec::new();
        let opened = key.open_batch(0, &mut none, true);
        assert_eq!(opened.chunks, 0);
        assert!(matches!(opened.failure, Some(ModelError::Truncated(_))));
    }

    #[test]
    fn chunks_before_a_failure_are_released_and_none_after() {
        let key = key();
        let pt = plaintext(4 * CHUNK + 9);
        let mut sealed = seal_for_test(&key, &pt);
        sealed[2 * SEALED_CHUNK + 3] ^= 1;
        let (released, failure) = open_released(&key, sealed);
        assert!(matches!(failure, Some(ModelError::ChunkAuth(2))));
        assert_eq!(released, pt[..2 * CHUNK]);
    }

    #[test]
    fn reordered_chunks_do_not_authenticate() {
        let key = key();
        let sealed = seal_for_test(&key, &plaintext(3 * CHUNK + 5));
        let mut swapped = sealed.clone();
        swapped[..SEALED_CHUNK].copy_from_slice(&sealed[SEALED_CHUNK..2 * SEALED_CHUNK]);
        swapped[SEALED_CHUNK..2 * SEALED_CHUNK].copy_from_slice(&sealed[..SEALED_CHUNK]);
        assert!(matches!(
            open_all(&key, swapped),
            Err(ModelError::ChunkAuth(0))
        ));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let key = key();
        let sealed = seal_for_test(&key, &plaintext(2 * CHUNK + 3));
        for pos in [0, CHUNK, CHUNK + 5, SEALED_CHUNK + 7, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x10;
            let err = open_all(&key, bad).expect_err("flipped bit");
            assert!(
                matches!(
                    err,
                    ModelError::ChunkAuth(_) | ModelError::FinalChunkAuth(_)
                ),
                "{pos}: {err}"
            );
        }
    }

    #[test]
    fn last_flag_misuse_is_detected() {
        let key = key();
        // A full final chunk followed by more data: the stream of exactly one full chunk, with
        // a second stream's chunk appended.
        let one = seal_for_test(&key, &plaintext(CHUNK));
        let mut extended = one.clone();
        extended.extend_from_slice(&seal_for_test(&key, b"more"));
        assert!(matches!(
            open_all(&key, extended),
            Err(ModelError::ChunkAuth(0))
        ));
        // Data after a short final chunk: the stream is no longer a sequence of full chunks.
        let mut trailing = seal_for_test(&key, b"short");
        trailing.extend_from_slice(&[0u8; 40]);
        assert!(open_all(&key, trailing).is_err());
        // An empty final chunk after a full one (age forbids it).
        let mut as_non_final = plaintext(CHUNK);
        key.0
            .seal_in_place_append_tag(nonce(0, false), Aad::empty(), &mut as_non_final)
            .expect("seal");
        let mut empty_final = Vec::new();
        key.0
            .seal_in_place_append_tag(nonce(1, true), Aad::empty(), &mut empty_final)
            .expect("seal");
        let sealed = [as_non_final, empty_final].concat();
        assert!(matches!(
            open_all(&key, sealed),
            Err(ModelError::EmptyFinalChunk(1))
        ));
    }

    #[test]
    fn a_wrong_key_does_not_open() {
        let sealed = seal_for_test(&key(), b"secret weights");
        let other = PayloadKey::new(&FileKey::new(Box::new([8u8; 16])), &[9u8; 16]).expect("key");
        assert!(open_all(&other, sealed).is_err());
    }
}
