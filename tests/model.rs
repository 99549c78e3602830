//! `moat decrypt`, `moat encrypt` and `moat keygen` as users and the init container run them,
//! with the standard `age` and `age-keygen` tools (Debian package `age`, installed by
//! e2e/deps.sh) as the interoperability oracle. Malicious archives are built byte by byte.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Arc,
};

const MOAT: &str = env!("CARGO_BIN_EXE_moat");
const CHUNK: usize = 64 * 1024;
const SEALED: usize = CHUNK + 16;

/// A fresh directory for one test.
fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-model-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "running {:?}: {e} (is the age package installed? bash e2e/deps.sh)",
            cmd.get_program()
        )
    })
}

fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An identity file made by `age-keygen`, and its recipient.
fn age_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    ok(Command::new("age-keygen").arg("-o").arg(&path));
    let out = ok(Command::new("age-keygen").arg("-y").arg(&path));
    let recipient = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    assert!(recipient.starts_with("age1"), "{recipient}");
    (path, recipient)
}

/// `age -r recipient` of `plaintext`.
fn age_encrypt(dir: &Path, recipient: &str, plaintext: &[u8]) -> Vec<u8> {
    let input = dir.join("plaintext.tmp");
    let output = dir.join("ciphertext.tmp");
    fs::write(&input, plaintext).expect("write plaintext");
    let _ = fs::remove_file(&output);
    ok(Command::new("age")
        .args(["-r", recipient, "-o"])
        .arg(&output)
        .arg(&input));
    let sealed = fs::read(&output).expect("read ciphertext");
    let _ = fs::remove_file(&input);
    let _ = fs::remove_file(&output);
    sealed
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `moat decrypt` of `artifact` (written to a file) into `target`.
fn decrypt(
    artifact: &Path,
    sha256: &str,
    identity: &Path,
    target: &Path,
    extra: &[&str],
) -> Output {
    let mut source = std::ffi::OsString::from("file://");
    source.push(artifact.as_os_str());
    run(Command::new(MOAT)
        .arg("decrypt")
        .arg("--source")
        .arg(source)
        .args(["--sha256", sha256])
        .arg("--identity")
        .arg(identity)
        .arg("--target")
        .arg(target)
        .args(extra))
}

/// Asserts exit status 1 with exactly one stderr line, `moat: error: ...` containing `needle`.
fn assert_fails(out: &Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("moat: error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    stderr
}

fn assert_empty(dir: &Path) {
    let names: Vec<_> = fs::read_dir(dir)
        .expect("target exists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(names.is_empty(), "target not empty: {names:?}");
}

/// Every file under `dir` with its content, relative paths sorted; the marker skipped.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            if rel == ".moat-verified" {
                continue;
            }
            let meta = fs::symlink_metadata(&path).expect("meta");
            if meta.is_dir() {
                out.push((format!("{rel}/"), Vec::new()));
                walk(root, &path, out);
            } else {
                assert!(meta.is_file(), "{rel} is not a regular file");
                out.push((rel, fs::read(&path).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// A model directory: a file that is not a multiple of 64 KiB and spans several batches, a small
/// one in a subdirectory, and an empty one.
fn model_dir(root: &Path) -> PathBuf {
    let dir = root.join("model");
    fs::create_dir_all(dir.join("weights")).expect("mkdir");
    fs::write(dir.join("config.json"), b"{\"layers\": 2}\n").expect("write");
    fs::write(
        dir.join("weights/model.safetensors"),
        pattern(5 * (1 << 20) + 123, 1),
    )
    .expect("write");
    fs::write(dir.join("empty.txt"), b"").expect("write");
    dir
}

/// A tar (tar crate) of regular files.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A raw ustar header for `name` (written as is, unlike `tar::Header::set_path`, which refuses
/// `..` and absolute paths), of `kind`, `size` and link target.
fn raw_header(name: &str, kind: tar::EntryType, size: u64, link: &str) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_ustar_mut().expect("ustar").name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_ustar_mut().expect("ustar").linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

/// A tar whose first entry is a good file and whose second is `bad`.
fn tar_with_bad_entry(bad: tar::Header, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut good = tar::Header::new_gnu();
    good.set_size(3);
    good.set_mode(0o644);
    good.set_cksum();
    b.append_data(&mut good, "good.txt", &b"abc"[..])
        .expect("append");
    b.append(&bad, data).expect("append bad");
    b.into_inner().expect("tar")
}

struct Fixture {
    dir: PathBuf,
    identity: PathBuf,
    recipient: String,
    target: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = tmp(name);
        let (identity, recipient) = age_keygen(&dir, "key.txt");
        let target = dir.join("target");
        fs::create_dir(&target).expect("mkdir target");
        Fixture {
            dir,
            identity,
            recipient,
            target,
        }
    }

    /// `age -r` of `plaintext`, written to a file; returns its path and digest.
    fn artifact(&self, plaintext: &[u8]) -> (PathBuf, String) {
        let sealed = age_encrypt(&self.dir, &self.recipient, plaintext);
        self.write("artifact.tar.age", &sealed)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> (PathBuf, String) {
        let path = self.dir.join(name);
        fs::write(&path, bytes).expect("write artifact");
        (path, sha256_hex(bytes))
    }

    fn decrypt(&self, artifact: &Path, sha256: &str, extra: &[&str]) -> Output {
        decrypt(artifact, sha256, &self.identity, &self.target, extra)
    }

    /// Decrypting `plaintext` (as a tar inside age) fails with `needle`; the target stays empty.
    fn refuses(&self, plaintext: &[u8], needle: &str, extra: &[&str]) -> String {
        let (artifact, digest) = self.artifact(plaintext);
        let out = self.decrypt(&artifact, &digest, extra);
        let stderr = assert_fails(&out, needle);
        assert_empty(&self.target);
        stderr
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn age_encrypted_tar_decrypts_with_moat() {
    let f = Fixture::new("interop-age");
    let model = model_dir(&f.dir);
    // GNU tar, as a user would run it.
    let plain = f.dir.join("model.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&model)
        .arg("-cf")
        .arg(&plain)
        .arg("."));
    let plaintext = fs::read(&plain).expect("read tar");
    assert_ne!(plaintext.len() % CHUNK, 0);
    let (artifact, digest) = f.artifact(&plaintext);
    let out = f.decrypt(&artifact, &digest, &["--size-limit", "10Mi"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&f.target), tree(&model));
    let marker = fs::read_to_string(f.target.join(".moat-verified")).expect("marker");
    assert_eq!(marker, format!("sha256:{digest}\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("extracted 3 files"), "{stderr}");
    // Files are not readable by others and not setuid.
    let mode = fs::metadata(f.target.join("weights/model.safetensors"))
        .expect("meta")
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7007, 0);
}

#[test]
fn payloads_of_exact_chunk_multiples_and_empty_payloads_decrypt() {
    let f = Fixture::new("interop-sizes");
    // One 512-byte header, the data, two 512-byte end blocks: exactly 3 chunks.
    let data = pattern(3 * CHUNK - 1536, 7);
    let plaintext = tar_of(&[("w.bin", &data)]);
    assert_eq!(plaintext.len(), 3 * CHUNK);
    let (artifact, digest) = f.artifact(&plaintext);
    let out = f.decrypt(&artifact, &digest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(f.target.join("w.bin")).expect("read"), data);

    // An empty payload (age of an empty file) is an empty model; so is an empty archive.
    for plaintext in [Vec::new(), tar_of(&[])] {
        fs::remove_dir_all(&f.target).expect("clean");
        let (artifact, digest) = f.artifact(&plaintext);
        let out = f.decrypt(&artifact, &digest, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(tree(&f.target).is_empty());
    }
}

#[test]
fn moat_encrypt_output_decrypts_with_age_and_moat() {
    let f = Fixture::new("interop-moat");
    let model = model_dir(&f.dir);
    let artifact = f.dir.join("model.tar.age");
    let out = ok(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(&artifact)
        .arg(&model));
    let bytes = fs::read(&artifact).expect("artifact");
    let digest = sha256_hex(&bytes);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{digest}  {}\n", artifact.display())
    );
    // age -d | tar -x gives the same tree.
    let untarred = f.dir.join("untarred");
    fs::create_dir(&untarred).expect("mkdir");
    let tarball = f.dir.join("out.tar");
    ok(Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&f.identity)
        .arg("-o")
        .arg(&tarball)
        .arg(&artifact));
    ok(Command::new("tar")
        .arg("-C")
        .arg(&untarred)
        .arg("-xf")
        .arg(&tarball));
    assert_eq!(tree(&untarred), tree(&model));
    // And moat decrypt too.
    let out = f.decrypt(&artifact, &digest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&f.target), tree(&model));

    // A single file becomes a tar holding that file under its name.
    let single = f.dir.join("single.tar.age");
    ok(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(&single)
        .arg(model.join("config.json")));
    let single_tar = f.dir.join("single.tar");
    ok(Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&f.identity)
        .arg("-o")
        .arg(&single_tar)
        .arg(&single));
    let listing = ok(Command::new("tar").arg("-tf").arg(&single_tar));
    assert_eq!(String::from_utf8_lossy(&listing.stdout), "config.json\n");

    // An existing artifact is never overwritten.
    let out = run(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(&single)
        .arg(&model));
    assert_fails(&out, "exists; Moat does not overwrite artifacts");

    // Symbolic links are refused when encrypting, since decrypting would refuse them.
    std::os::unix::fs::symlink("config.json", model.join("link")).expect("symlink");
    let out = run(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(f.dir.join("linked.tar.age"))
        .arg(&model));
    assert_fails(&out, "is a symbolic link");
    assert!(!f.dir.join("linked.tar.age").exists());
}

#[test]
fn wrong_key_fails_and_leaves_the_target_empty() {
    let f = Fixture::new("wrong-key");
    let (other, _) = age_keygen(&f.dir, "other.txt");
    let (artifact, digest) = f.artifact(&tar_of(&[("a", b"weights")]));
    let out = decrypt(&artifact, &digest, &other, &f.target, &[]);
    assert_fails(&out, "can decrypt the artifact (wrong key");
    assert_empty(&f.target);
    // The key never appears in messages.
    let key = fs::read_to_string(&other).expect("key");
    let secret = key
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY"))
        .expect("key line");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));
}

#[test]
fn modified_payload_fails_and_leaves_the_target_empty() {
    let f = Fixture::new("flip-payload");
    // Several batches of chunks, so files are extracted before the damage is reached.
    let plaintext = tar_of(&[
        ("a.bin", &pattern(3 << 20, 1)),
        ("b.bin", &pattern(3 << 20, 2)),
    ]);
    let mut sealed = age_encrypt(&f.dir, &f.recipient, &plaintext);
    let at = sealed.len() - 2 * SEALED;
    sealed[at] ^= 0x01;
    let (artifact, digest) = f.write("flipped.age", &sealed);
    // The digest is the modified file's own: authentication, not the digest, catches it.
    let out = f.decrypt(&artifact, &digest, &[]);
    assert_fails(&out, "does not authenticate: the ciphertext was modified");
    assert_empty(&f.target);
}

#[test]
fn modified_header_fails() {
    let f = Fixture::new("flip-header");
    let sealed = age_encrypt(&f.dir, &f.recipient, &tar_of(&[("a", b"weights")]));
    let text_end = sealed
        .windows(4)
        .position(|w| w == b"\n---")
        .expect("mac line")
        + 1;
    // One character of the MAC itself, replaced by another valid base64 character (a flipped
    // bit could make it no base64 at all, a different error), in the middle of the MAC, where
    // every character carries six bits of it (so the encoding stays canonical).
    let mut bad = sealed.clone();
    let at = text_end + "--- ".len() + 6;
    bad[at] = if bad[at] == b'A' { b'B' } else { b'A' };
    let (artifact, digest) = f.write("mac.age", &bad);
    assert_fails(
        &f.decrypt(&artifact, &digest, &[]),
        "header MAC does not verify",
    );
    assert_empty(&f.target);
    // A bit of the wrapped file key (the stanza body line before ---): the key no longer
    // unwraps with this identity.
    let mut bad = sealed.clone();
    bad[text_end - 5] ^= 0x01;
    let (artifact, digest) = f.write("stanza.age", &bad);
    let out = f.decrypt(&artifact, &digest, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrong key")
            || stderr.contains("header is malformed")
            || stderr.contains("header MAC"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1));
    assert_empty(&f.target);
    // The version line.
    let mut bad = sealed.clone();
    bad[20] = b'2';
    let (artifact, digest) = f.write("version.age", &bad);
    assert_fails(
        &f.decrypt(&artifact, &digest, &[]),
        "unsupported age format version",
    );
}

#[test]
fn truncated_ciphertext_fails() {
    let f = Fixture::new("truncated");
    let plaintext = tar_of(&[("a.bin", &pattern(5 * CHUNK, 3))]);
    let sealed = age_encrypt(&f.dir, &f.recipient, &plaintext);
    let header_and_nonce = (sealed.len() - plaintext.len()) - plaintext.len().div_ceil(CHUNK) * 16;
    // Cut at a chunk boundary: the remaining chunks all authenticate, but none is final.
    let cut = &sealed[..header_and_nonce + 3 * SEALED];
    let (artifact, digest) = f.write("cut.age", cut);
    assert_fails(
        &f.decrypt(&artifact, &digest, &[]),
        "truncated: it ends without the chunk marked final",
    );
    assert_empty(&f.target);
    // Cut inside a chunk.
    let (artifact, digest) = f.write("cut2.age", &sealed[..sealed.len() - 1000]);
    assert_fails(&f.decrypt(&artifact, &digest, &[]), "truncated or modified");
    assert_empty(&f.target);
    // Cut inside the header, and right after it (no nonce).
    let (artifact, digest) = f.write("cut3.age", &sealed[..30]);
    assert_fails(&f.decrypt(&artifact, &digest, &[]), "truncated");
    let (artifact, digest) = f.write("cut4.age", &sealed[..header_and_nonce - 16]);
    assert_fails(
        &f.decrypt(&artifact, &digest, &[]),
        "payload nonce is missing",
    );
    assert_empty(&f.target);
}

#[test]
fn sha256_mismatch_fails_after_everything_else_verified() {
    let f = Fixture::new("sha");
    let (artifact, digest) = f.artifact(&tar_of(&[("a.bin", &pattern(2 << 20, 4))]));
    let mut wrong = digest.into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).expect("hex");
    let message = f.dir.join("termination-log");
    let out = f.decrypt(
        &artifact,
        &wrong,
        &[
            "--termination-message-path",
            message.to_str().expect("utf8"),
        ],
    );
    let stderr = assert_fails(&out, &format!("sha256 mismatch: expected {wrong}"));
    assert_empty(&f.target);
    // The termination message is the same single line, without the prefix.
    let reason = fs::read_to_string(&message).expect("termination message");
    assert_eq!(format!("moat: error: {reason}\n"), stderr);
}

#[test]
fn dotdot_entries_are_refused() {
    let f = Fixture::new("dotdot");
    for name in ["../escape.txt", "a/../../escape.txt"] {
        let tar = tar_with_bad_entry(raw_header(name, tar::EntryType::Regular, 4, ""), b"evil");
        f.refuses(
            &tar,
            "its path contains .. and could escape the target",
            &[],
        );
        assert!(!f.dir.join("escape.txt").exists());
    }
}

#[test]
fn absolute_paths_are_refused() {
    let f = Fixture::new("absolute");
    let victim = f.dir.join("victim.txt");
    let name = victim.to_str().expect("utf8");
    let tar = tar_with_bad_entry(raw_header(name, tar::EntryType::Regular, 4, ""), b"evil");
    f.refuses(&tar, "its path is absolute", &[]);
    assert!(!victim.exists());
}

#[test]
fn symlinks_are_refused() {
    let f = Fixture::new("symlink");
    let tar = tar_with_bad_entry(
        raw_header("etc", tar::EntryType::Symlink, 0, "../../../etc"),
        b"",
    );
    f.refuses(&tar, "it is a symbolic link (to \"../../../etc\")", &[]);
}

#[test]
fn hardlinks_are_refused() {
    let f = Fixture::new("hardlink");
    let tar = tar_with_bad_entry(
        raw_header("passwd", tar::EntryType::Link, 0, "/etc/passwd"),
        b"",
    );
    f.refuses(&tar, "it is a hard link", &[]);
}

#[test]
fn devices_and_fifos_are_refused() {
    let f = Fixture::new("devices");
    for (kind, needle) in [
        (tar::EntryType::Char, "it is a device node"),
        (tar::EntryType::Block, "it is a device node"),
        (tar::EntryType::Fifo, "it is a fifo"),
    ] {
        let tar = tar_with_bad_entry(raw_header("dev", kind, 0, ""), b"");
        f.refuses(&tar, needle, &[]);
    }
}

#[test]
fn archives_over_the_size_limit_are_refused() {
    let f = Fixture::new("size-limit");
    let tar = tar_of(&[
        ("a.bin", &pattern(600_000, 5)),
        ("b.bin", &pattern(600_000, 6)),
    ]);
    f.refuses(
        &tar,
        "exceeds the size limit of 1048576 bytes (entry \"b.bin\" reaches 1200000 bytes)",
        &["--size-limit", "1Mi"],
    );
    // A header that lies about the size is caught before anything is written.
    let mut huge = raw_header("huge.bin", tar::EntryType::Regular, 1 << 40, "");
    huge.set_cksum();
    let mut lying = Vec::new();
    lying.extend_from_slice(huge.as_bytes());
    lying.extend_from_slice(&[0u8; 4096]);
    f.refuses(&lying, "exceeds the size limit", &["--size-limit", "20Gi"]);
}

#[test]
fn foreign_content_in_the_target_is_refused_and_kept() {
    let f = Fixture::new("not-empty");
    fs::write(f.target.join("mine.txt"), b"keep me").expect("write");
    let (artifact, digest) = f.artifact(&tar_of(&[("a", b"x")]));
    assert_fails(&f.decrypt(&artifact, &digest, &[]), "is not empty");
    assert_eq!(
        fs::read(f.target.join("mine.txt")).expect("kept"),
        b"keep me"
    );
}

#[test]
fn an_earlier_extraction_is_replaced_and_emptied_on_failure() {
    let f = Fixture::new("rerun");
    let sealed = age_encrypt(&f.dir, &f.recipient, &tar_of(&[("old.bin", b"old")]));
    let (first, first_digest) = f.write("first.age", &sealed);
    assert!(f.decrypt(&first, &first_digest, &[]).status.success());
    let sealed = age_encrypt(&f.dir, &f.recipient, &tar_of(&[("new.bin", b"new")]));
    let (second, second_digest) = f.write("second.age", &sealed);
    let out = f.decrypt(&second, &second_digest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tree(&f.target),
        vec![("new.bin".to_string(), b"new".to_vec())]
    );
    // A failed run over an earlier extraction leaves nothing: never a stale model.
    assert_fails(&f.decrypt(&first, &second_digest, &[]), "sha256 mismatch");
    assert_empty(&f.target);
}

#[test]
fn armored_and_non_age_input_is_refused_clearly() {
    let f = Fixture::new("armor");
    let input = f.dir.join("in.tar");
    fs::write(&input, tar_of(&[("a", b"x")])).expect("write");
    let armored = f.dir.join("armored.age");
    ok(Command::new("age")
        .args(["-a", "-r", &f.recipient, "-o"])
        .arg(&armored)
        .arg(&input));
    let digest = sha256_hex(&fs::read(&armored).expect("read"));
    assert_fails(&f.decrypt(&armored, &digest, &[]), "ASCII-armored");
    let digest = sha256_hex(&fs::read(&input).expect("read"));
    assert_fails(
        &f.decrypt(&input, &digest, &[]),
        "not an age-encrypted file",
    );
    assert_empty(&f.target);
}

/// A one-connection-at-a-time HTTPS server for `body`, with a certificate for 127.0.0.1 from a
/// fresh CA. Returns the port and the CA's PEM.
fn https_server(body: Vec<u8>, connections: usize) -> (u16, String) {
    https_server_stalling(body, connections, None)
}

/// [`https_server`] that, with `stall_after: Some(n)`, sends only the first `n` bytes of the
/// body and then holds the connection open, silent, for 30 s.
fn https_server_stalling(
    body: Vec<u8>,
    connections: usize,
    stall_after: Option<usize>,
) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "moat test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("leaf");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(tcp) = stream else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut request = BufReader::new(&mut tls);
            let mut line = String::new();
            let mut ok = true;
            loop {
                line.clear();
                match request.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            if !ok {
                continue;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(head.as_bytes());
            if let Some(n) = stall_after {
                let _ = tls.write_all(&body[..n.min(body.len())]);
                let _ = tls.flush();
                std::thread::sleep(std::time::Duration::from_secs(30));
                continue;
            }
            let _ = tls.write_all(&body);
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, ca_cert.pem())
}

#[test]
fn https_sources_verify_tls_with_the_given_ca() {
    let f = Fixture::new("https");
    let model = model_dir(&f.dir);
    let artifact = f.dir.join("m.tar.age");
    ok(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(&artifact)
        .arg(&model));
    let bytes = fs::read(&artifact).expect("read");
    let digest = sha256_hex(&bytes);
    let (port, ca_pem) = https_server(bytes, 2);
    let ca_file = f.dir.join("ca.pem");
    fs::write(&ca_file, ca_pem).expect("write ca");
    let url = format!("https://127.0.0.1:{port}/m.tar.age?X-Signature=secret");
    let fetch = |extra: &[&str]| {
        run(Command::new(MOAT)
            .args([
                "decrypt",
                "--source",
                &url,
                "--sha256",
                &digest,
                "--identity",
            ])
            .arg(&f.identity)
            .arg("--target")
            .arg(&f.target)
            .args(extra))
    };
    // Without the CA the server's certificate does not verify.
    let stderr = assert_fails(&fetch(&[]), "UnknownIssuer");
    assert!(
        !stderr.contains("secret"),
        "the query string leaked: {stderr}"
    );
    assert_empty(&f.target);
    // With it, the model arrives.
    let out = fetch(&["--ca-file", ca_file.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(&f.target), tree(&model));
}

#[test]
fn a_stalled_download_fails_after_the_read_timeout() {
    let f = Fixture::new("stall");
    let model = model_dir(&f.dir);
    let artifact = f.dir.join("m.tar.age");
    ok(Command::new(MOAT)
        .args(["encrypt", "-r", &f.recipient, "-o"])
        .arg(&artifact)
        .arg(&model));
    let bytes = fs::read(&artifact).expect("read");
    let digest = sha256_hex(&bytes);
    let half = bytes.len() / 2;
    let (port, ca_pem) = https_server_stalling(bytes, 1, Some(half));
    let ca_file = f.dir.join("ca.pem");
    fs::write(&ca_file, ca_pem).expect("write ca");
    let out = run(Command::new(MOAT)
        .args([
            "decrypt",
            "--source",
            &format!("https://127.0.0.1:{port}/m.tar.age"),
        ])
        .args(["--sha256", &digest, "--read-timeout", "1s", "--identity"])
        .arg(&f.identity)
        .arg("--ca-file")
        .arg(&ca_file)
        .arg("--target")
        .arg(&f.target));
    // The server would close the connection after 30 s (then: truncated); the read timeout is
    // what must end the download, and it says so.
    let stderr = assert_fails(&out, "imeout");
    assert!(!stderr.contains("truncated"), "{stderr}");
    assert_empty(&f.target);
}

#[test]
fn plain_http_and_unknown_schemes_are_refused() {
    let f = Fixture::new("http");
    let zeros = "0".repeat(64);
    for (source, needle) in [
        ("http://127.0.0.1:1/m.age", "plain http:// is refused"),
        ("ftp://host/m.age", "unsupported scheme \"ftp\""),
    ] {
        let out = run(Command::new(MOAT)
            .args([
                "decrypt",
                "--source",
                source,
                "--sha256",
                &zeros,
                "--identity",
            ])
            .arg(&f.identity)
            .arg("--target")
            .arg(&f.target));
        assert_fails(&out, needle);
    }
    assert_empty(&f.target);
}

#[test]
fn keygen_writes_a_secret_whose_identity_decrypts_for_the_printed_recipient() {
    let f = Fixture::new("keygen");
    let out = ok(Command::new(MOAT).args([
        "keygen",
        "--name",
        "fraud-model-key",
        "--namespace",
        "ml-prod",
        "--key",
        "identity",
    ]));
    let stderr = String::from_utf8(out.stderr).expect("utf8");
    let recipient = stderr
        .trim()
        .strip_prefix("Public key: ")
        .expect("recipient on stderr")
        .to_string();
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_yaml::from_slice(&out.stdout).expect("a Secret manifest");
    assert_eq!(secret.metadata.name.as_deref(), Some("fraud-model-key"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("ml-prod"));
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("apiVersion: v1") && yaml.contains("kind: Secret"),
        "{yaml}"
    );
    let data = secret.data.expect("data");
    let identity = &data.get("identity").expect("identity key").0;
    let identity_file = f.dir.join("from-secret.txt");
    fs::write(&identity_file, identity).expect("write identity");
    assert_eq!(
        secret
            .metadata
            .annotations
            .expect("annotations")
            .get("moat.dev/recipient"),
        Some(&recipient)
    );
    // age agrees the identity belongs to the recipient, and decrypts what is encrypted to it.
    let derived = ok(Command::new("age-keygen").arg("-y").arg(&identity_file));
    assert_eq!(String::from_utf8_lossy(&derived.stdout).trim(), recipient);
    let plaintext = tar_of(&[("a.txt", b"hello")]);
    let sealed = age_encrypt(&f.dir, &recipient, &plaintext);
    let (artifact, digest) = f.write("k.age", &sealed);
    let out = ok(Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&identity_file)
        .arg(&artifact));
    assert_eq!(out.stdout, plaintext);
    let out = decrypt(&artifact, &digest, &identity_file, &f.target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(f.target.join("a.txt")).expect("read"), b"hello");

    // -o writes the manifest with mode 0600 and refuses to overwrite it.
    let path = f.dir.join("secret.yaml");
    let recipient_file = f.dir.join("recipient.txt");
    ok(Command::new(MOAT)
        .args(["keygen", "--name", "k", "-o"])
        .arg(&path)
        .arg("--recipient-file")
        .arg(&recipient_file));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).expect("meta").permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        fs::read_to_string(&recipient_file)
            .expect("recipient")
            .starts_with("age1")
    );
    let again = run(Command::new(MOAT)
        .args(["keygen", "--name", "k", "-o"])
        .arg(&path));
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn decrypt_streams_from_a_pipe() {
    // The artifact is read once, front to back: a pipe (no size, no seeking) works too.
    let f = Fixture::new("fifo-source");
    let plaintext = tar_of(&[("a.bin", &pattern(3 << 20, 9))]);
    let sealed = age_encrypt(&f.dir, &f.recipient, &plaintext);
    let digest = sha256_hex(&sealed);
    let fifo = f.dir.join("pipe");
    ok(Command::new("mkfifo").arg(&fifo));
    let mut child = Command::new(MOAT)
        .arg("decrypt")
        .arg("--source")
        .arg(format!("file://{}", fifo.display()))
        .args(["--sha256", &digest])
        .arg("--identity")
        .arg(&f.identity)
        .arg("--target")
        .arg(&f.target)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut w| w.write_all(&sealed))
        .expect("write to fifo");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(child.wait().expect("wait").success(), "{stderr}");
    assert_eq!(
        fs::read(f.target.join("a.bin")).expect("read"),
        pattern(3 << 20, 9)
    );
}
