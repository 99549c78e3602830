//! Tar extraction into the staging directory (`moat::model::extract`), as `moat decrypt` does
//! it: the input is the decrypted archive. Each run prepares a fresh target inside a scratch
//! directory (`Staging::prepare`), extracts with a size limit, then commits or aborts.
//!
//! Asserts: no panic; nothing is written outside the target (the scratch directory holds the
//! target and an empty sibling, nothing else); an archive with an absolute path or a `..`
//! component is refused; after a failure the target is empty; after a success it holds the
//! marker, only regular files and directories, files with no permission for others and no
//! special bits, directories 0750, and exactly the files and bytes reported, within the limit.

#![no_main]

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use libfuzzer_sys::fuzz_target;
use moat::model::{MARKER, extract};

/// File bytes allowed: small, so that the limit is within the fuzzer's reach.
const LIMIT: u64 = 4096;

/// A fresh scratch directory; memory-backed where `/dev/shm` exists (many runs a second).
fn scratch() -> PathBuf {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "moat-fuzz-tar-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).expect("scratch directory");
    dir
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Files, bytes, and every problem of the extracted tree under `dir`.
fn inspect(dir: &Path, files: &mut u64, bytes: &mut u64, problems: &mut Vec<String>) {
    for entry in fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        let meta = fs::symlink_metadata(&path).expect("metadata");
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if mode != 0o750 {
                problems.push(format!(
                    "{} is a directory of mode {mode:o}",
                    path.display()
                ));
            }
            inspect(&path, files, bytes, problems);
        } else if meta.is_file() {
            if mode & !0o750 != 0 || mode & 0o600 != 0o600 {
                problems.push(format!("{} is a file of mode {mode:o}", path.display()));
            }
            *files += 1;
            *bytes += meta.len();
        } else {
            problems.push(format!(
                "{} is neither a file nor a directory",
                path.display()
            ));
        }
    }
}

/// Whether some entry of the archive names an absolute path or has a `..` component (read
/// with the tar crate directly, up to its first error).
fn escapes(data: &[u8]) -> bool {
    let mut archive = tar::Archive::new(data);
    let Ok(entries) = archive.entries() else {
        return false;
    };
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let Ok(path) = entry.path() else { return false };
        if path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            return true;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let scratch = scratch();
    let target = scratch.join("target");
    let outside = scratch.join("outside");
    fs::create_dir(&outside).expect("sibling");
    let staging = extract::Staging::prepare(&target).expect("prepare the target");
    let result = extract::extract(data, staging.dir(), Some(LIMIT));
    match &result {
        Ok(done) => {
            staging.commit("00").expect("commit");
            let mut files = 0;
            let mut bytes = 0;
            let mut problems = Vec::new();
            fs::remove_file(target.join(MARKER)).expect("the marker");
            inspect(&target, &mut files, &mut bytes, &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(
                (files, bytes),
                (done.files, done.bytes),
                "what was reported"
            );
            assert!(bytes <= LIMIT, "{bytes} bytes extracted, over the limit");
            assert!(
                !escapes(data),
                "an archive with an absolute or .. path was extracted"
            );
        }
        Err(e) => {
            let _ = e.to_string();
            staging.abort().expect("abort");
            assert!(
                names(&target).is_empty(),
                "the target is not empty after a failure"
            );
        }
    }
    assert_eq!(
        names(&scratch),
        ["outside", "target"],
        "something was written outside the target"
    );
    assert!(
        names(&outside).is_empty(),
        "something was written next to the target"
    );
    fs::remove_dir_all(&scratch).expect("clean up");
});
