//! Safe extraction of the decrypted tar archive, and the target directory's staging.
//!
//! Every entry is checked before anything is written: only regular files and directories, with
//! relative paths that stay inside the tree (no `..`, no absolute paths). Links of either kind,
//! devices, fifos and sparse files are refused, so nothing can point outside the tree. Modes are
//! reduced to read (and execute, where the archive says so) for owner and group; never for
//! others, never setuid, setgid or sticky. The sizes of regular files count against the size
//! limit before any byte of the file is written.
//!
//! Entries go into a hidden staging directory inside the target, which is moved into place only
//! after the whole artifact has verified ([`Staging::commit`]) and removed otherwise
//! ([`Staging::abort`]): the target may be a mount point (an emptyDir volume), which cannot be
//! renamed itself.

use std::{
    fs::{self, DirBuilder, OpenOptions, Permissions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

use tar::EntryType;

use super::{ModelError, error::quote};

/// Name of the file that records a completed extraction: `sha256:<hex>`.
pub const MARKER: &str = ".moat-verified";
/// Prefix of the staging directory inside the target.
const STAGING_PREFIX: &str = ".moat-staging-";
/// Top-level names that archives may not use (they are Moat's own).
const RESERVED_PREFIX: &str = ".moat-";
/// Mode of every extracted directory.
const DIR_MODE: u32 = 0o750;

/// The relative path an entry extracts to, or `None` for the archive's root (`.` or `./`).
/// Refuses `..` and absolute paths.
pub fn safe_relative_path(raw: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err("its path contains .. and could escape the target"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("its path is absolute");
            }
        }
    }
    if out
        .components()
        .next()
        .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(RESERVED_PREFIX))
    {
        return Err("names beginning with .moat- are reserved for Moat");
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// The mode of an extracted regular file: read and write for the owner, read for the group,
/// execute for owner and group where the archive sets it; nothing for others, no special bits.
pub fn file_mode(archive_mode: u32) -> u32 {
    0o640 | (archive_mode & 0o110)
}

/// What an extraction produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Regular files written.
    pub files: u64,
    /// Bytes in them.
    pub bytes: u64,
}

fn refuse(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::UnsafeEntry {
        path: quote(path),
        reason: reason.into(),
    }
}

fn archive_error(e: io::Error) -> ModelError {
    ModelError::Archive(e.to_string())
}

/// Extracts the tar archive read from `input` into `dir`, which must be empty. Stops at the
/// archive's end-of-archive marker; what follows it is left in `input`.
pub fn extract<R: Read>(
    input: R,
    dir: &Path,
    size_limit: Option<u64>,
) -> Result<Extracted, ModelError> {
    let mut archive = tar::Archive::new(input);
    let mut done = Extracted::default();
    let mut buf = vec![0u8; 1 << 20];
    let dirs = {
        let mut b = DirBuilder::new();
        b.recursive(true).mode(DIR_MODE);
        b
    };
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let raw = entry.path().map_err(archive_error)?.into_owned();
        let rel = safe_relative_path(&raw).map_err(|reason| refuse(&raw, reason))?;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Directory => {
                if let Some(rel) = rel {
                    let path = dir.join(&rel);
                    dirs.create(&path)
                        .map_err(|e| ModelError::io("creating directory", &path, e))?;
                }
            }
            EntryType::Regular | EntryType::Continuous => {
                let Some(rel) = rel else {
                    return Err(refuse(&raw, "a regular file cannot be the archive's root"));
                };
                // The entry's size, after pax extensions (files over 8 GiB carry it there).
                let size = entry.size();
                let reached = done.bytes.saturating_add(size);
                if let Some(limit) = size_limit.filter(|&limit| reached > limit) {
                    return Err(ModelError::SizeLimit {
                        limit,
                        path: quote(&raw),
                        reached,
                    });
                }
                let path = dir.join(&rel);
                if let Some(parent) = path.parent() {
                    dirs.create(parent)
                        .map_err(|e| ModelError::io("creating directory", parent, e))?;
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            refuse(&raw, "the archive holds this path twice")
                        } else {
                            ModelError::io("creating", &path, e)
                        }
                    })?;
                let mut written = 0u64;
                loop {
                    let n = entry.read(&mut buf).map_err(archive_error)?;
                    if n == 0 {
                        break;
                    }
                    written += n as u64;
                    // The tar reader never returns more than the header's size; count anyway.
                    if let Some(limit) = size_limit.filter(|&l| done.bytes + written > l) {
                        return Err(ModelError::SizeLimit {
                            limit,
                            path: quote(&raw),
                            reached: done.bytes + written,
                        });
                    }
                    file.write_all(&buf[..n])
                        .map_err(|e| ModelError::io("writing", &path, e))?;
                }
                if written != size {
                    return Err(ModelError::Archive(format!(
                        "entry {} ends after {written} of its {size} bytes",
                        quote(&raw)
                    )));
                }
                let mode = file_mode(entry.header().mode().unwrap_or(0o644));
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(|e| ModelError::io("setting the mode of", &path, e))?;
                done.files += 1;
                done.bytes += written;
            }
            // pax global headers carry metadata only (git archive writes one).
            EntryType::XGlobalHeader => {}
            EntryType::Symlink => {
                let target = entry.link_name().ok().flatten().map(|l| quote(&l));
                return Err(refuse(
                    &raw,
                    format!(
                        "it is a symbolic link (to {}); model archives may hold only regular files and directories",
                        target.as_deref().unwrap_or("?")
                    ),
                ));
            }
            EntryType::Link => {
                return Err(refuse(
                    &raw,
                    "it is a hard link; model archives may hold only regular files and directories",
                ));
            }
            EntryType::Char | EntryType::Block => {
                return Err(refuse(&raw, "it is a device node"));
            }
            EntryType::Fifo => return Err(refuse(&raw, "it is a fifo")),
            other => {
                return Err(refuse(
                    &raw,
                    format!("its type {other:?} is not a regular file or directory"),
                ));
            }
        }
    }
    Ok(done)
}

/// The staging directory inside the target, and the target.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
}

impl Staging {
    /// Prepares `target` for an extraction: creates it if absent, removes what an earlier Moat
    /// run left there (a staging directory of a killed run; a completed extraction, recognised by
    /// its marker), refuses a directory with anything else in it, and creates the staging
    /// directory.
    pub fn prepare(target: &Path) -> Result<Self, ModelError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(target)
            .map_err(|e| ModelError::io("creating the target directory", target, e))?;
        let names = list(target)?;
        let ours = |name: &str| name == MARKER || name.starts_with(STAGING_PREFIX);
        let replaced_earlier_run = names.iter().any(|n| n == MARKER);
        if !replaced_earlier_run && names.iter().any(|n| !ours(n)) {
            return Err(ModelError::TargetNotEmpty(target.display().to_string()));
        }
        for name in &names {
            if replaced_earlier_run || ours(name) {
                remove(&target.join(name))?;
            }
        }
        let dir = target.join(format!("{STAGING_PREFIX}{}", std::process::id()));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ModelError::io("creating the staging directory", &dir, e))?;
        Ok(Staging {
            target: target.to_path_buf(),
            dir,
        })
    }

    /// Where entries are extracted to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the marker with `digest_hex` and moves the extracted entries into the target. On
    /// failure, empties the target.
    pub fn commit(self, digest_hex: &str) -> Result<(), ModelError> {
        let result = (|| {
            // The marker first: if the process dies while moving, the next run sees Moat's
            // content (the marker) and replaces it, instead of refusing a non-empty target.
            let marker = self.target.join(MARKER);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&marker)
                .map_err(|e| ModelError::io("creating", &marker, e))?;
            writeln!(file, "sha256:{digest_hex}")
                .map_err(|e| ModelError::io("writing", &marker, e))?;
            for name in list(&self.dir)? {
                let (from, to) = (self.dir.join(&name), self.target.join(&name));
                fs::rename(&from, &to).map_err(|e| ModelError::io("moving into place", &to, e))?;
            }
            fs::remove_dir(&self.dir).map_err(|e| ModelError::io("removing", &self.dir, e))
        })();
        if result.is_err() {
            // The target was empty before (prepare saw to it): empty it again.
            if let Ok(names) = list(&self.target) {
                for name in names {
                    let _ = remove(&self.target.join(name));
                }
            }
        }
        result
    }

    /// Removes the staging directory and everything in it.
    pub fn abort(self) -> Result<(), ModelError> {
        remove(&self.dir)
    }
}

fn list(dir: &Path) -> Result<Vec<String>, ModelError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| ModelError::io("listing", dir, e))? {
        let entry = entry.map_err(|e| ModelError::io("listing", dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Removes a file or a directory tree (extracted directories are 0750, so always removable).
fn remove(path: &Path) -> Result<(), ModelError> {
    let meta = fs::symlink_metadata(path).map_err(|e| ModelError::io("inspecting", path, e))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| ModelError::io("removing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        let ok = |p: &str| safe_relative_path(Path::new(p)).expect(p);
        assert_eq!(ok("a/b.bin"), Some(PathBuf::from("a/b.bin")));
        assert_eq!(ok("./a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("a//b/"), Some(PathBuf::from("a/b")));
        assert_eq!(ok("./"), None);
        assert_eq!(ok("."), None);
        assert_eq!(ok("..."), Some(PathBuf::from("...")));
        assert_eq!(ok("a..b"), Some(PathBuf::from("a..b")));
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            "/",
            ".moat-verified",
            "./.moat-staging-1/x",
        ] {
            assert!(safe_relative_path(Path::new(bad)).is_err(), "{bad}");
        }
        // Only the top level is reserved.
        assert!(ok("a/.moat-verified").is_some());
    }

    #[test]
    fn modes_never_reach_others_or_special_bits() {
        assert_eq!(file_mode(0o644), 0o640);
        assert_eq!(file_mode(0o777), 0o750);
        assert_eq!(file_mode(0o4755), 0o750);
        assert_eq!(file_mode(0o2701), 0o740);
        assert_eq!(file_mode(0), 0o640);
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(EntryType::Regular);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-extract-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("tempdir");
        dir
    }

    #[test]
    fn size_limit_counts_header_sizes_before_writing() {
        let dir = tempdir("limit");
        let tar = tar_of(&[("a", &[1u8; 600]), ("b", &[2u8; 600])]);
        let err = extract(&tar[..], &dir, Some(1000)).expect_err("over the limit");
        assert!(
            matches!(&err, ModelError::SizeLimit { limit: 1000, reached: 1200, path } if path == "\"b\""),
            "{err}"
        );
        // b was refused before it was created.
        assert!(!dir.join("b").exists());
        let done = extract(&tar[..], &tempdir("limit-ok"), Some(1200)).expect("at the limit");
        assert_eq!(
            done,
            Extracted {
                files: 2,
                bytes: 1200
            }
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn size_limit_counts_pax_sizes() {
        // Files over 8 GiB carry their size in a pax extension; the ustar field says 0 here.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"5"[..])]).expect("pax");
        let mut h = tar::Header::new_ustar();
        h.set_path("big.bin").expect("path");
        h.set_size(0);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(b"12345");
        data.resize(data.len() + 512 - 5, 0);
        let mut tar = b.into_inner().expect("tar");
        // into_inner wrote the end-of-archive blocks; the entry goes before them.
        tar.truncate(tar.len() - 1024);
        tar.extend_from_slice(&data);
        tar.extend_from_slice(&[0u8; 1024]);
        let err = extract(&tar[..], &tempdir("pax"), Some(4)).expect_err("pax size counted");
        assert!(
            matches!(err, ModelError::SizeLimit { reached: 5, .. }),
            "{err}"
        );
        let dir = tempdir("pax-ok");
        extract(&tar[..], &dir, Some(5)).expect("at the limit");
        assert_eq!(fs::read(dir.join("big.bin")).expect("read"), b"12345");
    }

    #[test]
    fn extracts_files_with_reduced_modes() {
        let dir = tempdir("modes");
        let tar = tar_of(&[("m/w.bin", b"weights"), ("c.json", b"{}")]);
        extract(&tar[..], &dir, None).expect("extracts");
        assert_eq!(fs::read(dir.join("m/w.bin")).expect("read"), b"weights");
        let mode = fs::metadata(dir.join("c.json"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
        let mode = fs::metadata(dir.join("m"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
        let dup = tar_of(&[("x", b"1"), ("./x", b"2")]);
        let err = extract(&dup[..], &tempdir("dup"), None).expect_err("duplicate");
        assert!(err.to_string().contains("twice"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn staging_refuses_foreign_content_and_replaces_its_own() {
        let target = tempdir("staging");
        fs::write(target.join("foreign"), b"x").expect("write");
        assert!(matches!(
            Staging::prepare(&target),
            Err(ModelError::TargetNotEmpty(_))
        ));
        assert!(target.join("foreign").exists());
        fs::remove_file(target.join("foreign")).expect("rm");

        // A killed run's staging directory is cleared; a commit moves entries up.
        fs::create_dir_all(target.join(".moat-staging-1/x")).expect("mkdir");
        let staging = Staging::prepare(&target).expect("prepare");
        fs::write(staging.dir().join("model.bin"), b"w").expect("write");
        staging.commit("ab").expect("commit");
        let mut names = list(&target).expect("list");
        names.sort();
        assert_eq!(names, vec![MARKER.to_string(), "model.bin".to_string()]);
        assert_eq!(
            fs::read_to_string(target.join(MARKER)).expect("marker"),
            "sha256:ab\n"
        );

        // A commit interrupted after the marker (some entries moved, staging still there) is
        // Moat's content too, and is replaced.
        fs::create_dir_all(target.join(".moat-staging-9/rest")).expect("mkdir");
        let staging = Staging::prepare(&target).expect("prepare after an interrupted commit");
        assert_eq!(list(&target).expect("list").len(), 1);
        fs::write(staging.dir().join("model.bin"), b"w").expect("write");
        staging.commit("ab").expect("commit");

        // A completed extraction is replaced; an aborted one leaves the target empty.
        let staging = Staging::prepare(&target).expect("prepare again");
        assert_eq!(list(&target).expect("list").len(), 1);
        staging.abort().expect("abort");
        assert!(list(&target).expect("list").is_empty());
        let _ = fs::remove_dir_all(&target);
    }
}
