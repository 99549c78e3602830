//! Known-answer tests: the C2SP age test vectors (`c2sp.org/CCTV/age`, copied into
//! `tests/testdata/cctv-age/`, see its README.md) through `moat decrypt`'s parser and decryptor:
//! `header::read_header`, `header::unwrap_file_key`, `header::verify_mac`, the payload nonce,
//! `stream::PayloadKey` and the parallel STREAM pipeline (`pipeline::start`).
//!
//! Every vector's expected result must match: `success` decrypts to EOF with the payload's
//! SHA-256; `header failure`, `no match`, `HMAC failure` and `payload failure` fail at that
//! stage, and for a payload failure the plaintext released before the error has the vector's
//! SHA-256. Vectors of features Moat refuses by design (ASCII armor, scrypt passphrases, the
//! post-quantum hybrid recipient) must be refused with the error that names the feature, never
//! decrypted.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;
use std::str::FromStr;

use moat::model::{ModelError, Sizing, header, pipeline, stream};
use ring::digest::{SHA256, digest};

/// What a vector expects, or what Moat did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Success {
        payload: String,
    },
    HeaderFailure,
    NoMatch,
    HmacFailure,
    PayloadFailure {
        payload: String,
    },
    ArmorFailure,
    /// Refused with the error that names a feature Moat does not accept.
    Refused(&'static str),
}

struct Vector {
    name: String,
    fields: BTreeMap<String, Vec<String>>,
    file: Vec<u8>,
}

impl Vector {
    fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn expected(&self) -> Outcome {
        let payload = || self.field("payload").expect("a payload hash").to_string();
        match self.field("expect").expect("an expect line") {
            "success" => Outcome::Success { payload: payload() },
            "header failure" => Outcome::HeaderFailure,
            "no match" => Outcome::NoMatch,
            "HMAC failure" => Outcome::HmacFailure,
            "payload failure" => Outcome::PayloadFailure { payload: payload() },
            "armor failure" => Outcome::ArmorFailure,
            other => panic!("{}: unknown expectation {other:?}", self.name),
        }
    }
}

fn vectors() -> Vec<Vector> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/cctv-age");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the vectors directory") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        let bytes = std::fs::read(&path).expect("a vector");
        let split = bytes
            .windows(2)
            .position(|w| w == b"\n\n")
            .unwrap_or_else(|| panic!("{name}: no blank line after the header"));
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in std::str::from_utf8(&bytes[..split]).unwrap().lines() {
            let (key, value) = line.split_once(": ").expect("key: value");
            fields
                .entry(key.to_string())
                .or_default()
                .push(value.to_string());
        }
        let mut file = bytes[split + 2..].to_vec();
        if fields.get("compressed").is_some_and(|v| v[0] == "zlib") {
            let mut plain = Vec::new();
            flate2::read::ZlibDecoder::new(&file[..])
                .read_to_end(&mut plain)
                .unwrap_or_else(|e| panic!("{name}: zlib: {e}"));
            file = plain;
        }
        out.push(Vector { name, fields, file });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What Moat did with a vector.
struct Run {
    outcome: Outcome,
    /// On success, the SHA-256 of the artifact as the pipeline computed it.
    sha256: Option<[u8; 32]>,
    /// The plaintext released, up to the end or the failure.
    released: Vec<u8>,
}

impl From<Outcome> for Run {
    fn from(outcome: Outcome) -> Self {
        Run {
            outcome,
            sha256: None,
            released: Vec::new(),
        }
    }
}

/// Runs the vector's file through Moat's decryption path with `sizing`, as `moat decrypt` does
/// (`src/model/mod.rs`, `decrypt_into`), reading the plaintext as the extractor would.
fn decrypt(v: &Vector, sizing: Sizing) -> Run {
    let identities: Vec<age::x25519::Identity> = v
        .fields
        .get("identity")
        .into_iter()
        .flatten()
        .filter_map(|s| age::x25519::Identity::from_str(s).ok())
        .collect();
    let mut input = BufReader::with_capacity(
        64 * 1024,
        pipeline::HashingReader::new(std::io::Cursor::new(v.file.clone())),
    );
    let parsed = match header::read_header(&mut input) {
        Ok(h) => h,
        Err(ModelError::Armored) => return Run::from(Outcome::Refused("armor")),
        Err(_) => return Run::from(Outcome::HeaderFailure),
    };
    let file_key = match header::unwrap_file_key(&parsed, &identities, "vector") {
        Ok(k) => k,
        Err(ModelError::Passphrase) => return Run::from(Outcome::Refused("scrypt")),
        Err(ModelError::NoMatchingIdentity(_)) => return Run::from(Outcome::NoMatch),
        Err(ModelError::MalformedHeader(_)) => return Run::from(Outcome::HeaderFailure),
        Err(e) => panic!("{}: unwrapping the file key: unexpected {e}", v.name),
    };
    match header::verify_mac(&parsed, &file_key) {
        Ok(()) => {}
        Err(ModelError::HeaderMac) => return Run::from(Outcome::HmacFailure),
        Err(e) => panic!("{}: verifying the MAC: unexpected {e}", v.name),
    }
    let mut nonce = [0u8; stream::PAYLOAD_NONCE];
    if input.read_exact(&mut nonce).is_err() {
        // The nonce is part of the header in the age format's terms.
        return Run::from(Outcome::HeaderFailure);
    }
    let key = stream::PayloadKey::new(&file_key, &nonce).expect("a payload key");
    let mut plain = pipeline::start(input, key, sizing).expect("the pipeline starts");
    let mut released = Vec::new();
    let mut buf = vec![0u8; 7919];
    loop {
        match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => released.extend_from_slice(&buf[..n]),
            Err(_) => {
                let failure = plain.take_failure();
                assert!(
                    failure.is_some(),
                    "{}: a read error without a decryption failure",
                    v.name
                );
                return Run {
                    outcome: Outcome::PayloadFailure {
                        payload: hex(digest(&SHA256, &released).as_ref()),
                    },
                    sha256: None,
                    released,
                };
            }
        }
    }
    match plain.finish() {
        Ok((sha256, bytes)) => {
            assert_eq!(bytes, v.file.len() as u64, "{}: artifact bytes", v.name);
            Run {
                outcome: Outcome::Success {
                    payload: hex(digest(&SHA256, &released).as_ref()),
                },
                sha256: Some(sha256),
                released,
            }
        }
        Err(_) => Run {
            outcome: Outcome::PayloadFailure {
                payload: hex(digest(&SHA256, &released).as_ref()),
            },
            sha256: None,
            released,
        },
    }
}

/// Vectors where Moat releases less plaintext before failing than the reference does, by
/// design: a full chunk sealed as *final* but followed by more data. The reference opens a full
/// chunk as non-final, then as final, releases it, and fails at the data after it; Moat knows from
/// the position (data follows) that the chunk must be non-final and refuses the chunk itself,
/// because trying the other flag would need a copy of every chunk before opening it (ring
/// zeroes a chunk that fails). Both fail; Moat's released plaintext must be a prefix of the
/// reference's (checked against the age crate, which releases what the vector says).
const RELEASES_LESS: &[&str] = &[
    "stream_trailing_garbage_long",
    "stream_trailing_garbage_short",
    "stream_two_final_chunks",
    "stream_two_final_chunks_full",
    "stream_two_final_chunks_second",
];

/// Whether the file has a recipient stanza of type `tag`.
fn has_stanza(v: &Vector, tag: &str) -> bool {
    let line = format!("\n-> {tag} ");
    v.file.windows(line.len()).any(|w| w == line.as_bytes())
}

/// What Moat must do with a vector: the vector's own expectation, unless it uses a feature Moat
/// refuses by design.
fn moat_expects(v: &Vector) -> Outcome {
    let expected = v.expected();
    if v.field("armored") == Some("yes") {
        // Moat refuses armor before looking further; an armor failure whose text does not even
        // begin with the armor line is not age at all (a header failure).
        return if v.file.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----") {
            Outcome::Refused("armor")
        } else {
            Outcome::HeaderFailure
        };
    }
    match expected {
        // A header that does not parse fails the same way whatever its stanzas.
        Outcome::HeaderFailure if !has_stanza(v, "scrypt") && !has_stanza(v, "mlkem768x25519") => {
            Outcome::HeaderFailure
        }
        // Moat has no passphrase identity: any file with an scrypt stanza that parses as age is
        // refused by name, before the stanza's own arguments are looked at (a malformed one
        // included).
        _ if has_stanza(v, "scrypt") && !matches!(decrypt_header_only(v), Err(())) => {
            Outcome::Refused("scrypt")
        }
        // Moat knows only X25519 recipients and identities: a hybrid (ML-KEM) stanza is a
        // recipient type it does not know, which the age spec says to skip, and a hybrid
        // identity is none Moat can use; so a hybrid vector without an X25519 identity is
        // "no match", whatever is wrong inside its hybrid stanzas.
        _ if has_stanza(v, "mlkem768x25519")
            && !v.fields["identity"]
                .iter()
                .any(|i| i.starts_with("AGE-SECRET-KEY-1")) =>
        {
            if matches!(decrypt_header_only(v), Err(())) {
                Outcome::HeaderFailure
            } else {
                Outcome::NoMatch
            }
        }
        e => e,
    }
}

/// Whether Moat's parser reads the header at all (`Err(())` when it does not).
fn decrypt_header_only(v: &Vector) -> Result<(), ()> {
    header::read_header(&mut &v.file[..])
        .map(|_| ())
        .map_err(|_| ())
}

/// The plaintext the age crate releases before it fails (or all of it), with the vector's
/// identities: the reference for [`RELEASES_LESS`].
fn age_released(v: &Vector) -> Vec<u8> {
    let identities: Vec<age::x25519::Identity> = v.fields["identity"]
        .iter()
        .filter_map(|s| age::x25519::Identity::from_str(s).ok())
        .collect();
    let decryptor = age::Decryptor::new_buffered(&v.file[..]).expect("the age crate parses it");
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .expect("the age crate opens it");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn every_c2sp_age_vector_gives_its_expected_result() {
    let vectors = vectors();
    assert!(vectors.len() >= 140, "only {} vectors", vectors.len());
    let exact = Sizing {
        workers: 1,
        buffers: 2,
        batch_chunks: 1,
    };
    let mut mismatches = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for v in &vectors {
        let want = moat_expects(v);
        // One chunk per batch, one worker: the simplest schedule.
        let run = decrypt(v, exact);
        let got = &run.outcome;
        if RELEASES_LESS.contains(&v.name.as_str()) {
            let reference = age_released(v);
            assert_eq!(
                Outcome::PayloadFailure {
                    payload: hex(digest(&SHA256, &reference).as_ref())
                },
                want,
                "{}: the age crate releases what the vector says",
                v.name
            );
            let ok = matches!(got, Outcome::PayloadFailure { .. })
                && run.released.len() < reference.len()
                && reference.starts_with(&run.released);
            if !ok {
                mismatches.push(format!(
                    "{}: expected a payload failure releasing a proper prefix of the reference's {} bytes, Moat gave {got:?} ({} bytes)",
                    v.name,
                    reference.len(),
                    run.released.len()
                ));
            }
            *counts
                .entry("payload failure (releases less)".into())
                .or_default() += 1;
            continue;
        }
        if *got != want {
            mismatches.push(format!(
                "{}: expected {want:?} ({:?} in the vector), Moat gave {got:?}",
                v.name,
                v.field("expect")
            ));
        }
        if let Some(sha256) = run.sha256 {
            assert_eq!(
                sha256,
                <[u8; 32]>::try_from(digest(&SHA256, &v.file).as_ref()).unwrap(),
                "{}: the artifact digest",
                v.name
            );
        }
        // As `moat decrypt` runs it (batches of many chunks, several workers): the same
        // outcome and the same plaintext released.
        let machine = decrypt(v, Sizing::for_this_machine());
        if machine.outcome != *got || machine.released != run.released {
            mismatches.push(format!(
                "{}: with this machine's sizing Moat gave {:?} ({} bytes released), with one chunk per batch {got:?} ({} bytes)",
                v.name,
                machine.outcome,
                machine.released.len(),
                run.released.len()
            ));
        }
        let class = match &want {
            Outcome::Refused(what) => format!("refused ({what})"),
            _ => v.field("expect").unwrap_or("?").to_string(),
        };
        *counts.entry(class).or_default() += 1;
    }
    eprintln!("C2SP age vectors by what Moat must do: {counts:?}");
    assert!(
        mismatches.is_empty(),
        "{} of {} vectors differ:\n{}",
        mismatches.len(),
        vectors.len(),
        mismatches.join("\n")
    );
    // Every expectation the suite has is exercised by a vector Moat fully runs.
    for class in [
        "success",
        "header failure",
        "no match",
        "HMAC failure",
        "payload failure",
    ] {
        assert!(
            counts.get(class).is_some_and(|&n| n > 0),
            "no {class} vector"
        );
    }
}
