//! The STREAM decryptor (`moat::model::stream` and the parallel pipeline of
//! `moat::model::pipeline` that `moat decrypt` runs it in), under a fixed payload key.
//!
//! The input is a small program:
//!
//! ```text
//! byte 0     bit 0: 0 = sealed mode, 1 = raw mode; bits 1-2: workers - 1; bits 3-4: chunks per
//!            batch - 1
//! raw mode   the rest is the payload (after the nonce) as it is
//! sealed     bytes 1-3: plaintext length (mod 4 chunks + 100), byte 4: its fill pattern; the
//!            plaintext is sealed as age seals it (an independent implementation with ring,
//!            from the spec), then each following 5-byte group edits the ciphertext:
//!            op (byte) and position (u32 little endian)
//! ```
//!
//! Asserts: no panic and no hang; whatever plaintext comes out is a prefix of the sealed
//! plaintext; the unedited ciphertext decrypts to exactly the plaintext with the right SHA-256
//! and length; and any edit that changes the bytes makes decryption fail.

#![no_main]

use std::io::{BufReader, Cursor, Read};

use age_core::format::FileKey;
use libfuzzer_sys::fuzz_target;
use moat::model::{
    Sizing,
    pipeline::{self, HashingReader},
    stream::{CHUNK, PAYLOAD_NONCE, PayloadKey, SEALED_CHUNK},
};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const FILE_KEY: [u8; 16] = [7; 16];
const NONCE: [u8; PAYLOAD_NONCE] = [9; PAYLOAD_NONCE];

/// The age spec's payload key: HKDF-SHA256(file key, salt = nonce, info = "payload").
fn sealing_key() -> LessSafeKey {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &NONCE).extract(&FILE_KEY);
    let okm = prk.expand(&[b"payload"], &CHACHA20_POLY1305).expect("HKDF");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Seals `plain` in 64 KiB chunks; the nonce is an 11-byte big-endian counter and the last flag.
fn seal(plain: &[u8]) -> Vec<u8> {
    let key = sealing_key();
    let chunks: Vec<&[u8]> = if plain.is_empty() {
        vec![&[][..]]
    } else {
        plain.chunks(CHUNK).collect()
    };
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        nonce[11] = u8::from(i + 1 == chunks.len());
        let mut buf = chunk.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .expect("seal");
        out.extend_from_slice(&buf);
    }
    out
}

/// Applies one edit to the ciphertext.
fn edit(sealed: &mut Vec<u8>, op: u8, at: u32) {
    let len = sealed.len();
    let pos = at as usize % (len + 1);
    match op % 6 {
        0 if pos < len => sealed[pos] ^= 1 << (op >> 5),
        1 => sealed.truncate(pos),
        2 => sealed.insert(pos, op),
        3 if pos < len => {
            sealed.remove(pos);
        }
        4 => {
            // Copy one chunk over another (reordering, replay).
            let chunks = len.div_ceil(SEALED_CHUNK).max(1);
            let (from, to) = (pos % chunks, (at as usize >> 16) % chunks);
            let from = sealed[from * SEALED_CHUNK..len.min((from + 1) * SEALED_CHUNK)].to_vec();
            let start = to * SEALED_CHUNK;
            let end = len.min(start + from.len());
            sealed.splice(start..end, from);
        }
        5 => sealed.extend_from_slice(&at.to_le_bytes()),
        _ => {}
    }
}

/// How a stream ended: its SHA-256 and length, or the error.
type End = Result<([u8; 32], u64), String>;

/// Decrypts `ciphertext` as `moat decrypt` does: the plaintext read (up to the first error),
/// and how the stream ended.
fn decrypt(ciphertext: &[u8], sizing: Sizing) -> (Vec<u8>, End) {
    let key = PayloadKey::new(&FileKey::new(Box::new(FILE_KEY)), &NONCE).expect("key");
    let input = BufReader::new(HashingReader::new(Cursor::new(ciphertext.to_vec())));
    let mut plain = pipeline::start(input, key, sizing).expect("the pipeline starts");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 10_000];
    loop {
        match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                let e = plain
                    .take_failure()
                    .map_or(e.to_string(), |f| f.to_string());
                return (out, Err(e));
            }
        }
    }
    (out, plain.finish().map_err(|e| e.to_string()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let workers = usize::from((mode >> 1) & 3) + 1;
    let sizing = Sizing {
        workers,
        buffers: 3 * workers + 2,
        batch_chunks: usize::from((mode >> 3) & 3) + 1,
    };
    if mode & 1 == 1 {
        let (_, end) = decrypt(rest, sizing);
        if let Ok((digest, bytes)) = end {
            assert_eq!(bytes, rest.len() as u64);
            assert_eq!(
                digest.as_slice(),
                ring::digest::digest(&ring::digest::SHA256, rest).as_ref()
            );
        }
        return;
    }
    let Some((head, ops)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize % (4 * CHUNK + 100);
    let plain: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(head[3]))
        .collect();
    let sealed = seal(&plain);
    let mut edited = sealed.clone();
    for op in ops.chunks_exact(5) {
        edit(
            &mut edited,
            op[0],
            u32::from_le_bytes([op[1], op[2], op[3], op[4]]),
        );
    }
    let (out, end) = decrypt(&edited, sizing);
    assert!(
        plain.starts_with(&out),
        "{} bytes of plaintext came out that were not sealed",
        out.len()
    );
    if edited == sealed {
        let (digest, bytes) = end.expect("the unedited ciphertext decrypts");
        assert_eq!(out, plain, "the plaintext differs");
        assert_eq!(bytes, sealed.len() as u64);
        assert_eq!(
            digest.as_slice(),
            ring::digest::digest(&ring::digest::SHA256, &sealed).as_ref()
        );
    } else {
        assert!(
            end.is_err(),
            "an edited ciphertext decrypted ({} bytes)",
            out.len()
        );
    }
});
