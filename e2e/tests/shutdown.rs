//! The `moat operator` binary as a pod runs it: with leader election it takes the Lease, and on
//! SIGTERM (what the kubelet sends) it exits promptly and releases the Lease, so another
//! replica can lead without waiting for the Lease to expire.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use moat_e2e::{NamespaceOptions, install_crds, moat_binary, wait_until, with_namespace};

#[tokio::test]
async fn sigterm_stops_the_operator_and_releases_its_lease() {
    with_namespace("shutdown", NamespaceOptions::default(), |env| async move {
        install_crds(&env.client).await?;
        let ns = env.namespace.clone();
        let mut child = tokio::process::Command::new(moat_binary()?)
            .args([
                "operator",
                "--leader-elect",
                "--lease-name",
                "moat-shutdown-test",
            ])
            .args(["--lease-namespace", &ns, "--namespaces", &ns])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--lease-duration-seconds",
                "30",
            ])
            .env("POD_NAME", "shutdown-test")
            .env("POD_NAMESPACE", &ns)
            .kill_on_drop(true)
            .spawn()?;
        let leases = env.api::<Lease>();
        wait_until("the operator to take the Lease", || async {
            let holder = leases
                .get_opt("moat-shutdown-test")
                .await?
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity);
            // The pod name and a suffix of this start (controller::leader::identity).
            Ok(holder.is_some_and(|h| h.starts_with("shutdown-test_")))
        })
        .await?;
        let pid = child.id().context("pid")?;
        let start = Instant::now();
        let kill = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        ensure!(kill.success(), "kill -TERM failed");
        // Not a wait for a state but the property under test: the operator exits promptly, well
        // within the 30 s a kubelet grants (terminationGracePeriodSeconds) before SIGKILL. Kept at
        // 10 s: shutting down is one Lease update and stopping the watches.
        const PROMPT_EXIT: Duration = Duration::from_secs(10);
        let status = tokio::time::timeout(PROMPT_EXIT, child.wait())
            .await
            .with_context(|| {
                format!("the operator did not exit within {PROMPT_EXIT:?} of SIGTERM")
            })??;
        let took = start.elapsed();
        println!("exited {took:?} after SIGTERM with {status}");
        ensure!(status.success(), "exit status {status}");
        let holder = leases
            .get("moat-shutdown-test")
            .await?
            .spec
            .and_then(|s| s.holder_identity);
        ensure!(
            holder.as_deref().is_none_or(str::is_empty),
            "the Lease is still held by {holder:?} (a follower would wait 30 s)"
        );
        Ok(())
    })
    .await;
}
