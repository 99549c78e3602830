//! Encrypted model artifacts for tests on the real node: age identities from `age-keygen`,
//! models encrypted with the real `moat encrypt`, their digests from `sha256sum`, and a store on
//! this machine served to the pods as a PersistentVolume of a StorageClass the operator is told
//! is encrypted.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use serde_json::json;

use crate::TestEnv;

/// Runs `program` here and returns its standard output; fails with its standard error.
pub fn run_here(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sha256_of(path: &std::path::Path) -> Result<String> {
    let out = run_here("sha256sum", &[&path.to_string_lossy()])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// An age identity from `age-keygen`: (the AGE-SECRET-KEY line, the recipient).
pub fn age_identity(dir: &std::path::Path, name: &str) -> Result<(String, String)> {
    let path = dir.join(name);
    run_here("age-keygen", &["-o", &path.to_string_lossy()])?;
    let text = std::fs::read_to_string(&path)?;
    let secret = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .context("no identity in age-keygen's output")?
        .to_string();
    let recipient = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .context("no public key in age-keygen's output")?
        .to_string();
    Ok((secret, recipient))
}

/// A model directory holding `weights.bin` of `mib` MiB (not compressible), encrypted with
/// `moat encrypt` to `recipient` into `store/<name>.tar.age`; returns the weights' sha256.
pub fn encrypted_model(
    dir: &std::path::Path,
    name: &str,
    mib: usize,
    recipient: &str,
) -> Result<String> {
    use std::io::Write;
    let model = dir.join(format!("{name}-model"));
    std::fs::create_dir_all(&model)?;
    let weights = model.join("weights.bin");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&weights)?);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ (mib as u64);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in chunk.chunks_mut(8) {
            // xorshift64: fast, and never repeats within a model.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        file.write_all(&chunk)?;
    }
    file.flush()?;
    drop(file);
    let digest = sha256_of(&weights)?;
    let artifact = dir.join("store").join(format!("{name}.tar.age"));
    let moat = crate::moat_binary()?;
    run_here(
        &moat.to_string_lossy(),
        &[
            "encrypt",
            "-r",
            recipient,
            "-o",
            &artifact.to_string_lossy(),
            &model.to_string_lossy(),
        ],
    )?;
    std::fs::remove_dir_all(&model)?;
    Ok(digest)
}

/// A directory `store` under `dir` served to the pods of `env`'s namespace as the
/// PersistentVolumeClaim `store` (a hostPath PersistentVolume of StorageClass `class`, bound to
/// it); the directories are made readable for the pods. Returns the PersistentVolume's name
/// (cluster-wide: the caller deletes it).
pub async fn pvc_store(env: &TestEnv, dir: &std::path::Path, class: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let ns = &env.namespace;
    let store = dir.join("store");
    std::fs::create_dir_all(&store)?;
    for d in [dir, store.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let pv_name = format!("{ns}-store");
    let pvs: kube::Api<PersistentVolume> = kube::Api::all(env.client.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name, "labels": {"moat.dev/e2e": "true"}},
        "spec": {
            "capacity": {"storage": "5Gi"}, "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": class,
            "hostPath": {"path": store.to_string_lossy(), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": "store"}
        }
    }))?;
    pvs.create(&Default::default(), &pv).await?;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "store"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": class,
                 "volumeName": pv_name, "resources": {"requests": {"storage": "5Gi"}}}
    }))?;
    env.api::<PersistentVolumeClaim>()
        .create(&Default::default(), &claim)
        .await?;
    Ok(pv_name)
}

/// Makes every file in `dir/store` readable for the pods.
pub fn publish_store(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for f in std::fs::read_dir(dir.join("store"))? {
        std::fs::set_permissions(f?.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}
