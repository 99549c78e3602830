//! The age header parser (`moat::model::header`): the input is an artifact as `moat decrypt`
//! reads it. The header is parsed, the file key unwrapped with a fixed identity (the one the
//! seed corpus is encrypted to) and the header MAC verified.
//!
//! Asserts: no panic; a parsed header has a recipient stanza and leaves the input right after
//! its MAC line; and Moat and the age crate agree on every artifact whose header either of them
//! authenticates with the identity (both accept it, or neither does).

#![no_main]

use std::str::FromStr;

use age::secrecy::ExposeSecret;
use libfuzzer_sys::fuzz_target;
use moat::model::{header, stream};

/// The identity of the seed corpus (`fuzz/corpus/age_header`, `fuzz/corpus/stream_decrypt`).
/// A key for fuzzing only: it protects nothing.
const IDENTITY: &str = "AGE-SECRET-KEY-12G82UV7ETY5RU85EMVPYNM9K2JXLVDM6CSX7FMNVCVKSUVTW8FGS05CT4H";

/// Whether the age crate opens the artifact with the identity: header parsed, file key
/// unwrapped, header MAC verified (the payload is not read).
fn age_opens(data: &[u8], identity: &age::x25519::Identity) -> bool {
    age::Decryptor::new_buffered(data)
        .and_then(|d| d.decrypt(std::iter::once(identity as &dyn age::Identity)))
        .is_ok()
}

fuzz_target!(|data: &[u8]| {
    let identity = age::x25519::Identity::from_str(IDENTITY).expect("the fuzz identity");
    let mut input = data;
    let parsed = header::read_header(&mut input);
    let consumed = data.len() - input.len();
    let moat_opens = match parsed {
        Err(e) => {
            let _ = e.to_string();
            false
        }
        Ok(header) => {
            let _ = format!("{header:?}");
            assert!(
                !header.stanzas.is_empty(),
                "a header without a stanza parsed"
            );
            assert!(
                data[..consumed].starts_with(b"age-encryption.org/v1\n"),
                "a header parsed without the version line"
            );
            let mac_line = data[..consumed]
                .strip_suffix(b"\n")
                .and_then(|h| h.rsplit(|&b| b == b'\n').next())
                .expect("the header ends with a line");
            assert!(
                mac_line.starts_with(b"--- ") && mac_line.len() == 47,
                "the input was not left after the MAC line: {:?}",
                String::from_utf8_lossy(mac_line)
            );
            match header::unwrap_file_key(&header, std::slice::from_ref(&identity), "fuzz") {
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
                Ok(file_key) => {
                    assert_eq!(file_key.expose_secret().len(), 16);
                    let verified = header::verify_mac(&header, &file_key).is_ok();
                    if verified
                        && let Some(nonce) = input.first_chunk::<{ stream::PAYLOAD_NONCE }>()
                    {
                        stream::PayloadKey::new(&file_key, nonce).expect("a payload key");
                    }
                    // The age crate reads the payload nonce with the header.
                    verified && input.len() >= stream::PAYLOAD_NONCE
                }
            }
        }
    };
    let age = age_opens(data, &identity);
    assert_eq!(
        moat_opens,
        age,
        "Moat {} the header, the age crate {} it",
        if moat_opens {
            "authenticates"
        } else {
            "refuses"
        },
        if age { "authenticates" } else { "refuses" },
    );
});
