//! The `moat` command line: parses flags and calls into the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use moat::{
    api::{self, SecureModelDeployment},
    controller::{self, ImageSettings, Settings, ca::CaSettings},
    model,
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
    Render(RenderArgs),
    /// Fetch an encrypted model, verify its SHA-256, decrypt and extract it into a directory
    /// (the init container). On any failure the target is left empty and the exit status is 1.
    Decrypt(DecryptArgs),
    /// Encrypt a model directory (or one file) as a tar archive in an age file.
    Encrypt(EncryptArgs),
    /// Generate an age identity as a Kubernetes Secret manifest; print its recipient on stderr.
    Keygen(KeygenArgs),
    /// The model endpoint's sidecar: terminate mTLS, authorize each caller by its SPIFFE ID,
    /// enforce limits, write one audit line per request on stdout, and forward to the model
    /// server on loopback.
    Gate(GateArgs),
}

#[derive(clap::Args)]
struct GateArgs {
    /// Address to serve TLS on (the Service's target port).
    #[arg(long, env = "MOAT_GATE_LISTEN", default_value = "0.0.0.0:15443")]
    listen: SocketAddr,
    /// The model server, on the pod's loopback, such as 127.0.0.1:8000.
    #[arg(long, env = "MOAT_GATE_UPSTREAM")]
    upstream: SocketAddr,
    /// The model server's protocol: http1, or http2 (cleartext, prior knowledge; for gRPC).
    #[arg(long, env = "MOAT_GATE_UPSTREAM_PROTOCOL", value_enum, default_value_t = moat::gate::UpstreamProtocol::Http1)]
    upstream_protocol: moat::gate::UpstreamProtocol,
    /// The serving certificate chain (PEM).
    #[arg(long, env = "MOAT_TLS_CERT_FILE")]
    cert: PathBuf,
    /// The serving certificate's private key (PEM).
    #[arg(long, env = "MOAT_TLS_KEY_FILE")]
    key: PathBuf,
    /// The CA bundle client certificates must chain to (PEM).
    #[arg(long, env = "MOAT_TLS_CA_FILE")]
    ca: PathBuf,
    /// The policy written by the operator (JSON).
    #[arg(long, env = "MOAT_GATE_POLICY")]
    policy: PathBuf,
    /// Address of the plaintext /healthz and /readyz endpoints, for the kubelet.
    #[arg(long, env = "MOAT_GATE_HEALTH_LISTEN", default_value = "0.0.0.0:15081")]
    health_listen: SocketAddr,
    /// Address of the plaintext /metrics endpoint.
    #[arg(long, env = "MOAT_GATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How long open requests may finish after SIGTERM, such as 20s.
    #[arg(long, env = "MOAT_GATE_DRAIN", default_value = "20s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// How often the policy and certificate files are read again, such as 200ms.
    #[arg(long, env = "MOAT_GATE_RELOAD_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Worker threads (default: one per core, at most 4).
    #[arg(long, env = "MOAT_GATE_THREADS")]
    threads: Option<usize>,
    /// Log format (diagnostics, on stderr; the audit log is always JSON on stdout).
    #[arg(long, env = "MOAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

#[derive(clap::Args)]
struct DecryptArgs {
    /// Where the artifact is: https://... or file://<path> (plain http is refused).
    #[arg(long, env = "MOAT_MODEL_SOURCE")]
    source: String,
    /// Expected SHA-256 of the artifact file, 64 hex digits (as printed by moat encrypt or
    /// sha256sum).
    #[arg(long, env = "MOAT_MODEL_SHA256")]
    sha256: String,
    /// age identity file (AGE-SECRET-KEY-1... lines), such as the mounted key Secret.
    #[arg(long, env = "MOAT_MODEL_IDENTITY")]
    identity: PathBuf,
    /// Directory to extract into: created if absent; must be empty (or hold an earlier
    /// extraction by moat, which is replaced).
    #[arg(long, env = "MOAT_MODEL_TARGET")]
    target: PathBuf,
    /// Most bytes the extracted files may hold: bytes or a quantity such as 20Gi.
    #[arg(long, env = "MOAT_MODEL_SIZE_LIMIT")]
    size_limit: Option<String>,
    /// Extra CA certificates (PEM) to trust for an https source, besides Mozilla's roots.
    #[arg(long, env = "MOAT_MODEL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// How long an https download may wait for data (connection stalled) before it fails, such
    /// as 60s.
    #[arg(long, env = "MOAT_MODEL_READ_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    read_timeout: Duration,
    /// Also write the one-line failure reason to this file (Kubernetes shows it in the
    /// container's terminated state), such as /dev/termination-log.
    #[arg(long, env = "MOAT_TERMINATION_MESSAGE_PATH")]
    termination_message_path: Option<PathBuf>,
    /// Threads that decrypt (default: one per core).
    #[arg(long, env = "MOAT_MODEL_THREADS")]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct EncryptArgs {
    /// Recipient to encrypt to (age1...); repeat for several.
    #[arg(short = 'r', long = "recipient")]
    recipients: Vec<String>,
    /// File with recipients, one age1... per line.
    #[arg(short = 'R', long = "recipients-file")]
    recipients_file: Option<PathBuf>,
    /// The encrypted artifact to write (must not exist).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// The model directory (archived with paths relative to it) or a single file.
    input: PathBuf,
}

#[derive(clap::Args)]
struct KeygenArgs {
    /// Name of the Secret.
    #[arg(long)]
    name: String,
    /// Namespace of the Secret (omitted from the manifest when not given).
    #[arg(long)]
    namespace: Option<String>,
    /// Key in the Secret that holds the identity (spec.model.decryptionKeySecretRef.key).
    #[arg(long, default_value = "identity")]
    key: String,
    /// Write the manifest to this file (mode 0600, must not exist) instead of standard output.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Also write the recipient (age1...) to this file.
    #[arg(long)]
    recipient_file: Option<PathBuf>,
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
    /// PriorityClass of every model's pods whose spec.placement names none.
    #[arg(long, env = "MOAT_DEFAULT_PRIORITY_CLASS_NAME")]
    default_priority_class_name: Option<String>,
    /// RuntimeClass (for example gvisor or kata) of every model's pods whose spec.placement
    /// names none.
    #[arg(long, env = "MOAT_DEFAULT_RUNTIME_CLASS_NAME")]
    default_runtime_class_name: Option<String>,
    /// Namespace whose pods may scrape the gates' metrics (port 15090 of every model pod); without
    /// it, no NetworkPolicy opens that port.
    #[arg(long, env = "MOAT_MONITORING_NAMESPACE")]
    monitoring_namespace: Option<String>,
    /// Elect a leader through a Lease so several replicas can run; only the leader reconciles.
    #[arg(long, env = "MOAT_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "MOAT_LEASE_NAME", default_value = "moat-operator")]
    lease_name: String,
    /// The operator's own namespace (the chart sets POD_NAMESPACE from the pod): where the
    /// Lease and the CA Secret live unless --lease-namespace or --ca-namespace say otherwise.
    #[arg(long, env = "POD_NAMESPACE", default_value = "moat-system")]
    operator_namespace: String,
    /// Namespace of the leader election Lease; default: --operator-namespace.
    #[arg(long, env = "MOAT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds the Lease stays valid without renewal: the longest a failover takes.
    #[arg(long, env = "MOAT_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Namespace of the CA Secret; default: --operator-namespace.
    #[arg(long, env = "MOAT_CA_NAMESPACE")]
    ca_namespace: Option<String>,
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
    /// The chart's MutatingAdmissionPolicy records who changed each model's spec (annotation
    /// moat.dev/spec-author): trust the annotation as a revision's author. Without it authors are
    /// `unknown`, since anyone who may edit a model could write the annotation.
    #[arg(long, env = "MOAT_SPEC_AUTHOR_POLICY")]
    spec_author_policy: bool,
    /// Time limit of one tag resolution in a registry, such as 10s.
    #[arg(long, env = "MOAT_REGISTRY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    registry_timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => print_crds(),
        Command::Render(args) => render_file(&args),
        Command::Operator(args) => run_operator(*args),
        Command::Decrypt(args) => {
            let message_path = args.termination_message_path.clone();
            let result = decrypt(args);
            if let (Err(e), Some(path)) = (&result, message_path) {
                // Best effort: the reason is on stderr too.
                let _ = std::fs::write(path, one_line(e));
            }
            result
        }
        Command::Encrypt(args) => encrypt(args),
        Command::Keygen(args) => keygen(args),
        Command::Gate(args) => gate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line (Kubernetes keeps at most 4096 bytes of a termination
/// message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = format!("{e:#}").replace(['\n', '\r'], " ");
    if line.len() > 4000 {
        let mut end = 4000;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

fn gate(args: GateArgs) -> Result<()> {
    telemetry::init_logging(args.log_format, "info");
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let settings = moat::gate::Settings {
        listen: args.listen,
        upstream: args.upstream,
        upstream_protocol: args.upstream_protocol,
        cert: args.cert,
        key: args.key,
        ca: args.ca,
        policy: args.policy,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
        drain: args.drain,
        reload_interval: args.reload_interval,
    };
    runtime.block_on(moat::gate::run(settings))?;
    Ok(())
}

fn decrypt(args: DecryptArgs) -> Result<()> {
    let source = model::Source::parse(&args.source)?;
    let sha256 = model::parse_sha256(&args.sha256)?;
    let size_limit = args
        .size_limit
        .as_deref()
        .map(model::parse_size_limit)
        .transpose()?;
    let identities = model::read_identities(&args.identity)?;
    let mut sizing = model::Sizing::for_this_machine();
    if let Some(threads) = args.threads {
        anyhow::ensure!((1..=256).contains(&threads), "--threads: expected 1 to 256");
        sizing = model::Sizing {
            workers: threads,
            buffers: 3 * threads + 2,
            ..sizing
        };
    }
    let done = model::decrypt(&model::DecryptOptions {
        source: &source,
        sha256,
        identities: &identities,
        identity_file: &args.identity,
        target: &args.target,
        size_limit,
        ca_file: args.ca_file.as_deref(),
        read_timeout: args.read_timeout,
        sizing,
    })?;
    eprintln!(
        "moat: verified sha256 {} of {source} ({} bytes); extracted {} files ({} bytes) into {}",
        model::hex(&sha256),
        done.artifact_bytes,
        done.extracted.files,
        done.extracted.bytes,
        args.target.display()
    );
    Ok(())
}

fn encrypt(args: EncryptArgs) -> Result<()> {
    let mut recipients = args
        .recipients
        .iter()
        .map(|r| model::parse_recipient(r))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(file) = &args.recipients_file {
        recipients.extend(model::read_recipients_file(file)?);
    }
    let done = model::encrypt(&args.input, &recipients, &args.output)?;
    // sha256sum's format, so `sha256sum -c` checks it; the digest goes into spec.model.sha256.
    println!("{}  {}", done.sha256, args.output.display());
    Ok(())
}

fn keygen(args: KeygenArgs) -> Result<()> {
    let key = model::keygen_secret(&args.name, args.namespace.as_deref(), &args.key)?;
    match &args.output {
        Some(path) => {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(key.secret_yaml.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        None => print!("{}", key.secret_yaml),
    }
    if let Some(path) = &args.recipient_file {
        std::fs::write(path, format!("{}\n", key.recipient))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("Public key: {}", key.recipient);
    Ok(())
}

fn print_crds() -> Result<()> {
    print!("{}", api::crds_yaml()?);
    Ok(())
}

/// `moat render`: what the operator would apply, from a file and no cluster.
#[derive(clap::Args, Debug)]
struct RenderArgs {
    /// File with one SecureModelDeployment (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Pin the server image to this digest (`sha256:<64 hex digits>`), as the operator does
    /// after resolving the spec's tag: the pods get `repository@<digest>`. A spec that names a
    /// digest already must name this one.
    #[arg(long, value_name = "DIGEST", conflicts_with = "resolve")]
    image_digest: Option<String>,
    /// Ask the server image's registry for the tag's digest and pin it, as the operator does
    /// (HTTPS; anonymous unless --docker-config has credentials for that registry).
    #[arg(long)]
    resolve: bool,
    /// A `.dockerconfigjson` file (as in a pull Secret) with credentials for --resolve.
    #[arg(long, value_name = "FILE", requires = "resolve")]
    docker_config: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for --resolve.
    #[arg(long, value_name = "FILE", requires = "resolve")]
    ca_file: Option<PathBuf>,
    /// The helper image (the decrypting init container and the gate) pinned by digest,
    /// `repository@sha256:<digest>`, as the operator runs it. Default: Moat's image by tag.
    #[arg(long, value_name = "IMAGE")]
    helper_image: Option<String>,
}

/// The server image pinned as `args` ask: to a given digest, to the digest the registry has
/// for the tag, or as written.
fn pinned_server_image(args: &RenderArgs, image: &str) -> Result<Option<String>> {
    let reference = moat::image::parse(image)?;
    if let Some(digest) = &args.image_digest {
        if !moat::image::registry::is_sha256_digest(digest) {
            anyhow::bail!("--image-digest: {digest:?} is not sha256:<64 lower-case hex digits>");
        }
        if let Some(own) = reference.digest()
            && own != digest
        {
            anyhow::bail!(
                "--image-digest {digest} differs from the digest the spec's image names ({own})"
            );
        }
        return Ok(Some(moat::image::pinned(&reference, digest)));
    }
    if !args.resolve || reference.digest().is_some() {
        return Ok(None);
    }
    let credentials = match &args.docker_config {
        None => None,
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            moat::image::credentials(&[(path.display().to_string(), bytes)], reference.registry())?
        }
    };
    let ca = match &args.ca_file {
        None => None,
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
    };
    let registry = moat::image::registry::Registry::new(ca.as_deref(), Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let digest = runtime.block_on(registry.digest(&reference, credentials))?;
    eprintln!("moat: {image} resolves to {digest}");
    Ok(Some(moat::image::pinned(&reference, &digest)))
}

fn render_file(args: &RenderArgs) -> Result<()> {
    let file = &args.file;
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
    let valid = render::validated(&smd)?;
    let mut resolved = render::Resolved::offline(&smd);
    let pinned = pinned_server_image(args, &smd.spec.server.image)?;
    if let Some(image) = &pinned {
        resolved.image = image.clone();
    }
    if let Some(helper) = &args.helper_image {
        let reference =
            moat::image::parse(helper).map_err(|e| anyhow::anyhow!("--helper-image: {e}"))?;
        let digest = reference.digest().with_context(|| {
            format!("--helper-image: {helper} names no digest (repository@sha256:<digest>)")
        })?;
        resolved.helper_image = moat::image::pinned(&reference, digest);
    }
    let children = render::build(&valid, &Facts::default(), &resolved)?;
    if pinned.is_none() && !smd.spec.server.image.contains("@sha256:") {
        eprintln!(
            "moat: note: {} is a tag; the operator resolves it in the registry and the pods get repository@sha256:<digest> (--resolve or --image-digest renders that)",
            smd.spec.server.image
        );
    }
    print!("{}", render::to_yaml(&children)?);
    Ok(())
}

/// A default class name from `flag`: empty means none; otherwise a DNS-1123 subdomain, as
/// PriorityClass and RuntimeClass names are.
fn class_name(flag: &str, value: Option<String>) -> Result<Option<String>> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) if moat::render::is_dns1123_subdomain(&v) => Ok(Some(v)),
        Some(v) => anyhow::bail!("{flag}: {v:?} is not a class name (a DNS-1123 subdomain)"),
    }
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
            placement_defaults: moat::api::Placement {
                priority_class_name: class_name(
                    "--default-priority-class-name",
                    args.default_priority_class_name,
                )?,
                runtime_class_name: class_name(
                    "--default-runtime-class-name",
                    args.default_runtime_class_name,
                )?,
                ..Default::default()
            },
            monitoring_namespace: args.monitoring_namespace.clone(),
        },
        ca: CaSettings {
            namespace: args
                .ca_namespace
                .clone()
                .unwrap_or_else(|| args.operator_namespace.clone()),
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
        spec_author_policy: args.spec_author_policy,
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
        let work = async move {
            if !args.leader_elect {
                controller::run(client, settings, metrics).await;
                return Ok(());
            }
            let mut nonce = [0u8; 4];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
                .map_err(|_| anyhow::anyhow!("no randomness for the leader election identity"))?;
            let identity = controller::leader::identity(
                std::env::var("POD_NAME").ok().as_deref(),
                nonce,
            );
            let lease = controller::leader::LeaseSettings {
                name: args.lease_name,
                namespace: args.lease_namespace.unwrap_or(args.operator_namespace),
                identity,
                duration_seconds: args.lease_duration_seconds.max(2),
                grace_seconds: (args.lease_duration_seconds / 3).max(1),
            };
            controller::leader::run_elected(client, settings, metrics, lease, shutdown_signal())
                .await
                .context("leader election")
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

/// Completes on SIGTERM (what the kubelet sends to stop a pod) or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
