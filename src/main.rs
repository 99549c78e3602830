//! The `moat` command line: parses flags and calls into the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use moat::{
    api::{self, SecureModelDeployment},
    controller::{self, ImageSettings, Settings, ca::CaSettings},
    render::{self, Facts},
    telemetry::{self, LogFormat, metrics::Metrics, server},
};

/// Moat: secure model serving on Kubernetes.
#[derive(Parser)]
#[command(name = "moat", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (out of cluster: the current KUBECONFIG; in cluster: its ServiceAccount).
    Operator(Box<OperatorArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Print the objects Moat would create for a SecureModelDeployment, without a cluster.
    Render {
        /// File with one SecureModelDeployment (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Watch only these namespaces, comma-separated or repeated (default: all namespaces).
    #[arg(
        long = "namespaces",
        alias = "namespace",
        env = "MOAT_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Address of the /metrics endpoint (also /healthz and /readyz unless
    /// --health-probe-addr is set).
    #[arg(long, env = "MOAT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of the /healthz and /readyz endpoints, when they should not share the metrics
    /// address.
    #[arg(long, env = "MOAT_HEALTH_PROBE_ADDR")]
    health_probe_addr: Option<SocketAddr>,
    /// Seconds between periodic re-reconciles of a converged object.
    #[arg(long, env = "MOAT_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Log format.
    #[arg(long, env = "MOAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter directive (for example `info` or `moat=debug,kube=info`).
    #[arg(long, env = "MOAT_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Namespace of the cluster DNS pods (the only destination allowed by default).
    #[arg(long, env = "MOAT_DNS_NAMESPACE", default_value = "kube-system")]
    dns_namespace: String,
    /// Elect a leader through a Lease so several replicas can run; only the leader reconciles.
    #[arg(long, env = "MOAT_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "MOAT_LEASE_NAME", default_value = "moat-operator")]
    lease_name: String,
    /// Namespace of the leader election Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds the Lease stays valid without renewal: the longest a failover takes.
    #[arg(long, env = "MOAT_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Namespace of the CA Secret (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "moat-system")]
    ca_namespace: String,
    /// Name of the CA Secret. Moat creates it when absent; a Secret of that name without the
    /// label app.kubernetes.io/managed-by=moat is a user-supplied CA (tls.crt, tls.key and
    /// optionally ca.crt), used as is and never rotated.
    #[arg(long, env = "MOAT_CA_SECRET", default_value = "moat-ca")]
    ca_secret: String,
    /// Validity of a CA Moat creates, such as 8760h; it is rotated at two thirds of it.
    #[arg(long, env = "MOAT_CA_VALIDITY", default_value = "8760h", value_parser = humantime::parse_duration)]
    ca_validity: Duration,
    /// Trust domain of the SPIFFE IDs in certificates (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster DNS domain, for the <service>.<ns>.svc.<domain> name in serving certificates.
    #[arg(long, env = "MOAT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Label `key=value` of the cluster DNS pods.
    #[arg(long, env = "MOAT_DNS_POD_LABEL", default_value = "k8s-app=kube-dns")]
    dns_pod_label: String,
    /// Registries (host or host:port) model images may come from, comma-separated or repeated;
    /// an image from any other registry is refused (Stalled, reason RegistryNotAllowed).
    /// Default: every registry.
    #[arg(long, env = "MOAT_ALLOWED_REGISTRIES", value_delimiter = ',')]
    allowed_registries: Vec<String>,
    /// PEM file of CA certificates trusted for registries besides the system's roots (for
    /// private registries). TLS verification is always on.
    #[arg(long, env = "MOAT_REGISTRY_CA_FILE")]
    registry_ca_file: Option<PathBuf>,
    /// Moat's own image, run as the init container that decrypts model weights; the chart sets
    /// the operator's image. Pinned to a digest like any image (resolved once per process when
    /// it is a tag).
    #[arg(long, env = "MOAT_HELPER_IMAGE", default_value = moat::render::DEFAULT_HELPER_IMAGE)]
    helper_image: String,
    /// StorageClasses that encrypt their volumes at rest, comma-separated or repeated: the only
    /// ones a PersistentVolumeClaim model source may use (default: none, so PVC sources stall
    /// with reason StorageClassNotEncrypted).
    #[arg(long, env = "MOAT_ENCRYPTED_STORAGE_CLASSES", value_delimiter = ',')]
    encrypted_storage_classes: Vec<String>,
    /// Time limit of one tag resolution in a registry, such as 10s.
    #[arg(long, env = "MOAT_REGISTRY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    registry_timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => print_crds(),
        Command::Render { file } => render_file(&file),
        Command::Operator(args) => run_operator(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds() -> Result<()> {
    print!("{}", api::crds_yaml()?);
    Ok(())
}

fn render_file(file: &PathBuf) -> Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut smd: SecureModelDeployment = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {} as a SecureModelDeployment", file.display()))?;
    if smd.metadata.namespace.is_none() {
        smd.metadata.namespace = Some("default".into());
    }
    let children = render::render(&smd, &Facts::default())?;
    if !smd.spec.server.image.contains("@sha256:") {
        eprintln!(
            "moat: note: {} is a tag; the operator resolves it in the registry and the pods get repository@sha256:<digest>",
            smd.spec.server.image
        );
    }
    print!("{}", render::to_yaml(&children)?);
    Ok(())
}

fn run_operator(args: OperatorArgs) -> Result<()> {
    telemetry::init_logging(args.log_format, &args.log_level);
    let (key, value) = args
        .dns_pod_label
        .split_once('=')
        .context("--dns-pod-label must be key=value")?;
    let namespaces: Vec<String> = args
        .namespaces
        .iter()
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
        .collect();
    if let Some(bad) = namespaces.iter().find(|ns| !render::is_dns1123_label(ns)) {
        anyhow::bail!("--namespaces: {bad:?} is not a namespace name (a DNS-1123 label)");
    }
    let allowed_registries: Vec<String> = args
        .allowed_registries
        .iter()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    let registry_ca = match &args.registry_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--registry-ca-file: reading {}", path.display()))?,
        ),
        None => None,
    };
    let registry = moat::image::Registry::new(registry_ca.as_deref(), args.registry_timeout)
        .map_err(|e| anyhow::anyhow!("--registry-ca-file: {e}"))?;
    let settings = Settings {
        namespaces,
        resync_period: Duration::from_secs(args.resync_seconds.max(1)),
        facts: Facts {
            dns_namespace: args.dns_namespace,
            dns_pod_labels: [(key.to_string(), value.to_string())].into(),
        },
        ca: CaSettings {
            namespace: args.ca_namespace,
            secret_name: args.ca_secret,
            validity: args.ca_validity,
            trust_domain: args.trust_domain,
            cluster_domain: args.cluster_domain,
        },
        image: ImageSettings {
            allowed_registries,
            registry,
            helper_image: args.helper_image,
            helper_pin: Default::default(),
        },
        encrypted_storage_classes: args
            .encrypted_storage_classes
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = controller::client()
            .await
            .context("connecting to Kubernetes (KUBECONFIG or in-cluster ServiceAccount)")?;
        let metrics = Arc::new(Metrics::default());
        let health = server::Health::new(metrics.clone());
        let endpoints = tokio::spawn(server::serve(
            args.metrics_addr,
            args.health_probe_addr,
            health.clone(),
        ));
        health.set_ready(true);
        let work = async move {
            if !args.leader_elect {
                controller::run(client, settings, metrics).await;
                return Ok(());
            }
            let identity = std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("moat-{}", std::process::id()));
            let lease = controller::leader::LeaseSettings {
                name: args.lease_name,
                namespace: args.lease_namespace,
                identity,
                duration_seconds: args.lease_duration_seconds.max(2),
                grace_seconds: (args.lease_duration_seconds / 3).max(1),
            };
            tokio::select! {
                res = controller::leader::run_elected(client, settings, metrics, lease) => {
                    res.context("leader election")
                }
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        };
        let metrics_addr = args.metrics_addr;
        tokio::select! {
            res = work => res,
            res = endpoints => match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("serving endpoints on {metrics_addr}"))),
                Err(e) => Err(anyhow::Error::new(e)),
            },
        }
    })
}
