//! Why a model could not be decrypted, encrypted or a key generated. Every message is one line,
//! says what to do where there is something to do, and never carries key material.

use std::path::Path;

/// Why `moat decrypt`, `moat encrypt` or `moat keygen` failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A flag has a value Moat cannot use.
    #[error("{flag}: {reason}")]
    Usage {
        /// The flag, such as `--sha256`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{what}: {error}")]
    Io {
        /// What Moat was doing, naming the path.
        what: String,
        /// The operating system's error (in the message, not a separate cause, so it prints
        /// once).
        error: std::io::Error,
    },
    /// The identity file holds no usable age X25519 identity.
    #[error("identity file {path}: {reason}")]
    Identity {
        /// The identity file.
        path: String,
        /// What is wrong (never the key itself).
        reason: String,
    },
    /// The artifact could not be fetched over HTTPS (connection, TLS verification, HTTP status).
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The URL without its query string (which may carry credentials).
        url: String,
        /// ureq's description of the failure.
        reason: String,
    },
    /// The artifact is ASCII-armored, which Moat does not accept.
    #[error(
        "the artifact is ASCII-armored (-----BEGIN AGE ENCRYPTED FILE-----); encrypt without --armor"
    )]
    Armored,
    /// The artifact does not start with an age header.
    #[error("the artifact is not an age-encrypted file (no age-encryption.org/v1 header)")]
    NotAge,
    /// An age format version other than v1.
    #[error("the artifact has an unsupported age format version {0:?}")]
    UnsupportedVersion(String),
    /// The age header does not follow the format.
    #[error("the age header is malformed: {0}")]
    MalformedHeader(&'static str),
    /// The artifact was encrypted to a passphrase, not to a recipient.
    #[error(
        "the artifact is encrypted with a passphrase (scrypt); encrypt it to an X25519 recipient (age1...)"
    )]
    Passphrase,
    /// No identity unwraps the file key.
    #[error(
        "no identity in {0} can decrypt the artifact (wrong key: it was encrypted to other recipients)"
    )]
    NoMatchingIdentity(String),
    /// The header MAC does not verify: the header was modified.
    #[error("the age header MAC does not verify: the header was modified")]
    HeaderMac,
    /// A payload chunk before the end does not authenticate.
    #[error(
        "payload chunk {0} does not authenticate: the ciphertext was modified or has data after its final chunk"
    )]
    ChunkAuth(u64),
    /// The final payload chunk does not authenticate.
    #[error(
        "the final payload chunk ({0}) does not authenticate: the ciphertext was truncated or modified"
    )]
    FinalChunkAuth(u64),
    /// The payload ends without a chunk marked final.
    #[error("the ciphertext is truncated: {0}")]
    Truncated(&'static str),
    /// An empty final chunk after other chunks (age forbids it).
    #[error("the payload ends with an empty final chunk after {0} chunks, which age forbids")]
    EmptyFinalChunk(u64),
    /// The artifact's SHA-256 differs from the expected one.
    #[error("sha256 mismatch: expected {expected}, the artifact has {actual}")]
    DigestMismatch {
        /// The digest given with --sha256.
        expected: String,
        /// The digest of the bytes read.
        actual: String,
    },
    /// An archive entry that Moat refuses to extract.
    #[error("archive entry {path} refused: {reason}")]
    UnsafeEntry {
        /// The entry's path as in the archive (quoted and escaped).
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The extracted model would exceed the size limit.
    #[error(
        "the extracted model exceeds the size limit of {limit} bytes (entry {path} reaches {reached} bytes)"
    )]
    SizeLimit {
        /// The limit, bytes.
        limit: u64,
        /// The entry that crosses it (quoted and escaped).
        path: String,
        /// The total size with that entry, bytes.
        reached: u64,
    },
    /// The decrypted payload is not a valid tar archive.
    #[error("the decrypted payload is not a valid tar archive: {0}")]
    Archive(String),
    /// The target directory holds files Moat did not put there.
    #[error(
        "target directory {0} is not empty; Moat extracts only into an empty directory (or one it filled before)"
    )]
    TargetNotEmpty(String),
    /// The input of `moat encrypt` holds something a model archive may not.
    #[error("{path}: {reason}")]
    EncryptInput {
        /// The offending path.
        path: String,
        /// Why it cannot be archived.
        reason: String,
    },
    /// The age crate refused to encrypt.
    #[error("encrypting: {0}")]
    Encrypt(String),
    /// A worker thread of the pipeline stopped unexpectedly.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ModelError {
    /// An I/O error with what Moat was doing and the path it was doing it to.
    pub fn io(what: impl std::fmt::Display, path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            what: format!("{what} {}", path.display()),
            error: source,
        }
    }
}

/// A path from an archive for a message: quoted, escaped, and cut to 200 characters so a
/// hostile name cannot flood the termination message.
pub(crate) fn quote(path: &Path) -> String {
    let s = format!("{:?}", path.as_os_str());
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}
