//! The age v1 header (<https://age-encryption.org/v1>, C2SP `age.md`), read and verified by hand
//! because the age crate keeps its parser private:
//!
//! ```text
//! age-encryption.org/v1
//! -> X25519 <ephemeral share, base64>
//! <wrapped file key, base64 without padding, lines of 64 columns, the last one shorter>
//! --- <HMAC-SHA256 of everything up to and including "---", base64>
//! ```
//!
//! The stanzas are handed to the age crate's X25519 identity to unwrap the 16-byte file key; the
//! MAC is HMAC-SHA256 with the key HKDF-SHA256(ikm = file key, salt = empty, info = "header").

use std::io::{BufRead, Read};

use age::secrecy::ExposeSecret as _;
use age_core::format::{FileKey, Stanza};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use ring::{hkdf, hmac};

use super::ModelError;

const V1_LINE: &[u8] = b"age-encryption.org/v1";
const AGE_PREFIX: &[u8] = b"age-encryption.org/";
const ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
/// Longest header line accepted (stanza arguments of known recipients are far shorter).
const MAX_LINE: u64 = 4096;
/// Largest header accepted: a bound on memory for hostile input.
const MAX_HEADER: usize = 1 << 20;
/// Columns of a full body line.
const BODY_COLUMNS: usize = 64;

/// A parsed age v1 header: the recipient stanzas and what the MAC covers.
pub struct Header {
    /// The recipient stanzas, in order.
    pub stanzas: Vec<Stanza>,
    mac: [u8; 32],
    /// The header bytes up to and including `---`, which the MAC covers.
    mac_input: Vec<u8>,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tags: Vec<&str> = self.stanzas.iter().map(|s| s.tag.as_str()).collect();
        f.debug_struct("Header").field("stanzas", &tags).finish()
    }
}

/// Reads one `\n`-terminated line into `raw` (which keeps every header byte) and returns its
/// content without the newline.
fn read_line<R: BufRead>(input: &mut R, raw: &mut Vec<u8>) -> Result<Vec<u8>, ModelError> {
    let mut line = Vec::new();
    input
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .map_err(|e| ModelError::Io {
            what: "reading the age header".into(),
            error: e,
        })?;
    raw.extend_from_slice(&line);
    if raw.len() > MAX_HEADER {
        return Err(ModelError::MalformedHeader("longer than 1 MiB"));
    }
    match line.pop() {
        Some(b'\n') => Ok(line),
        _ if line.len() as u64 + 1 >= MAX_LINE => {
            Err(ModelError::MalformedHeader("a line is too long"))
        }
        _ => Err(ModelError::Truncated("the age header ends early")),
    }
}

/// Reads and parses the header; `input` is left at the first byte of the payload.
pub fn read_header<R: BufRead>(input: &mut R) -> Result<Header, ModelError> {
    let mut raw = Vec::new();
    let first = read_line(input, &mut raw).map_err(|e| match e {
        ModelError::Truncated(_) if raw.is_empty() => {
            ModelError::Truncated("the artifact is empty")
        }
        ModelError::Truncated(_) | ModelError::MalformedHeader(_) => ModelError::NotAge,
        e => e,
    })?;
    if first != V1_LINE {
        return Err(if first.starts_with(ARMOR_BEGIN) {
            ModelError::Armored
        } else if let Some(version) = first.strip_prefix(AGE_PREFIX) {
            ModelError::UnsupportedVersion(
                String::from_utf8_lossy(version).chars().take(40).collect(),
            )
        } else {
            ModelError::NotAge
        });
    }
    let mut stanzas = Vec::new();
    loop {
        let line = read_line(input, &mut raw)?;
        if let Some(args) = line.strip_prefix(b"-> ") {
            stanzas.push(read_stanza(args, input, &mut raw)?);
        } else if let Some(mac) = line.strip_prefix(b"---") {
            // The MAC covers the header up to and including "---", not the space after it.
            let mac_input = raw[..raw.len() - line.len() - 1 + 3].to_vec();
            let encoded = mac.strip_prefix(b" ").filter(|m| m.len() == 43).ok_or(
                ModelError::MalformedHeader("the MAC line is not \"--- <43 characters>\""),
            )?;
            let mac: [u8; 32] = STANDARD_NO_PAD
                .decode(encoded)
                .ok()
                .and_then(|m| m.try_into().ok())
                .ok_or(ModelError::MalformedHeader(
                    "the MAC is not canonical base64",
                ))?;
            if stanzas.is_empty() {
                return Err(ModelError::MalformedHeader("no recipient stanza"));
            }
            return Ok(Header {
                stanzas,
                mac,
                mac_input,
            });
        } else {
            return Err(ModelError::MalformedHeader(
                "expected a recipient stanza (-> ...) or the MAC line (--- ...)",
            ));
        }
    }
}

/// A stanza: its argument line (after `-> `) and its base64 body lines.
fn read_stanza<R: BufRead>(
    args: &[u8],
    input: &mut R,
    raw: &mut Vec<u8>,
) -> Result<Stanza, ModelError> {
    let args: Vec<String> = args
        .split(|&b| b == b' ')
        .map(|arg| {
            if !arg.is_empty() && arg.iter().all(|b| (0x21..=0x7e).contains(b)) {
                Ok(String::from_utf8_lossy(arg).into_owned())
            } else {
                Err(ModelError::MalformedHeader(
                    "a stanza argument is empty or not printable ASCII",
                ))
            }
        })
        .collect::<Result<_, _>>()?;
    let mut encoded = Vec::new();
    loop {
        let line = read_line(input, raw)?;
        if line.len() > BODY_COLUMNS {
            return Err(ModelError::MalformedHeader(
                "a stanza body line is longer than 64 columns",
            ));
        }
        let last = line.len() < BODY_COLUMNS;
        encoded.extend_from_slice(&line);
        if last {
            break;
        }
    }
    let body = STANDARD_NO_PAD
        .decode(&encoded)
        .map_err(|_| ModelError::MalformedHeader("a stanza body is not canonical base64"))?;
    let mut args = args.into_iter();
    let tag = args
        .next()
        .ok_or(ModelError::MalformedHeader("a stanza has no type"))?;
    Ok(Stanza {
        tag,
        args: args.collect(),
        body,
    })
}

/// Unwraps the file key with the first identity that matches a stanza.
pub fn unwrap_file_key(
    header: &Header,
    identities: &[age::x25519::Identity],
    identity_file: &str,
) -> Result<FileKey, ModelError> {
    if header.stanzas.iter().any(|s| s.tag == "scrypt") {
        return Err(ModelError::Passphrase);
    }
    for identity in identities {
        match age::Identity::unwrap_stanzas(identity, &header.stanzas) {
            Some(Ok(file_key)) => return Ok(file_key),
            Some(Err(_)) => {
                return Err(ModelError::MalformedHeader(
                    "an X25519 recipient stanza is not canonical",
                ));
            }
            None => {}
        }
    }
    Err(ModelError::NoMatchingIdentity(identity_file.to_string()))
}

/// HKDF-SHA256 of the file key with `salt` and `info`, into a key of type `K`.
pub(crate) fn hkdf<K: hkdf::KeyType, T: for<'a> From<hkdf::Okm<'a, K>>>(
    file_key: &FileKey,
    salt: &[u8],
    info: &'static [&'static [u8]],
    key_type: K,
) -> Result<T, ModelError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(file_key.expose_secret());
    prk.expand(info, key_type)
        .map(T::from)
        .map_err(|_| ModelError::Internal("HKDF output length"))
}

/// Verifies the header MAC with the file key.
pub fn verify_mac(header: &Header, file_key: &FileKey) -> Result<(), ModelError> {
    let key: hmac::Key = hkdf(file_key, &[], &[b"header"], hmac::HMAC_SHA256)?;
    hmac::verify(&key, &header.mac_input, &header.mac).map_err(|_| ModelError::HeaderMac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Result<Header, ModelError> {
        read_header(&mut &text[..])
    }

    #[test]
    fn parses_stanzas_and_leaves_the_payload() {
        let text = b"age-encryption.org/v1\n-> X25519 abc\nAAAA\n-> grease x y\n\n--- AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\npayload";
        let mut input = &text[..];
        let header = read_header(&mut input).expect("parses");
        assert_eq!(input, b"payload");
        assert_eq!(header.stanzas.len(), 2);
        assert_eq!(header.stanzas[0].tag, "X25519");
        assert_eq!(header.stanzas[0].args, vec!["abc".to_string()]);
        assert_eq!(header.stanzas[0].body, vec![0, 0, 0]);
        assert_eq!(header.stanzas[1].args.len(), 2);
        assert!(header.stanzas[1].body.is_empty());
        assert!(header.mac_input.ends_with(b"\n---"));
    }

    #[test]
    fn refuses_what_is_not_a_v1_header() {
        assert!(matches!(
            parse(b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n"),
            Err(ModelError::Armored)
        ));
        assert!(matches!(
            parse(b"age-encryption.org/v2\n"),
            Err(ModelError::UnsupportedVersion(v)) if v == "v2"
        ));
        assert!(matches!(
            parse(b"PK\x03\x04 zip\n"),
            Err(ModelError::NotAge)
        ));
        assert!(matches!(parse(b""), Err(ModelError::Truncated(_))));
        // No stanza, a bad MAC length, a body line longer than 64 columns, padding, truncation.
        for bad in [
            &b"age-encryption.org/v1\n--- AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"[..],
            b"age-encryption.org/v1\n-> X25519 a\n\n--- AAAA\n",
            b"age-encryption.org/v1\n-> X25519  a\n\n--- AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
            b"age-encryption.org/v1\n-> X25519 a\nAA==\n--- AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
            b"age-encryption.org/v1\n-> X25519 a\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
            b"age-encryption.org/v1\n-> X25519 a\nAA",
            b"age-encryption.org/v1\nhello\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
