//! A real Prometheus (the pinned build of `e2e/prometheus.sh`) run as a process by a test: it
//! scrapes loopback targets and evaluates a rule file; the test reads its HTTP API (alerts,
//! queries) as Grafana and Alertmanager would.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The pinned `prometheus` and `helm`: from `MOAT_PROMETHEUS` and `MOAT_HELM` when set, otherwise
/// built (or found in the cache, `~/.cache/moat/bin`) by `e2e/prometheus.sh build` and named by
/// `e2e/prometheus.sh env`.
pub fn tools() -> Result<(String, String)> {
    if let (Ok(prometheus), Ok(helm)) =
        (std::env::var("MOAT_PROMETHEUS"), std::env::var("MOAT_HELM"))
    {
        return Ok((prometheus, helm));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/prometheus.sh");
    let built = std::process::Command::new("bash")
        .args([script, "build"])
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .with_context(|| format!("running {script} build"))?;
    ensure!(built.success(), "{script} build failed");
    let out = std::process::Command::new("bash")
        .args([script, "env"])
        .output()
        .with_context(|| format!("running {script} env"))?;
    ensure!(out.status.success(), "{script} env failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(str::to_string)
            .with_context(|| format!("{script} env printed no {name}"))
    };
    Ok((var("MOAT_PROMETHEUS")?, var("MOAT_HELM")?))
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 GET of `path` (with its query) on `addr`: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `s` percent-encoded for a URL's query (every byte but the unreserved ones).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What Prometheus scrapes and evaluates.
pub struct Config {
    /// The scrape and rule evaluation interval.
    pub interval: Duration,
    /// The job name of the scrape, its loopback target and the labels Prometheus adds to its
    /// series (the target's own labels win: `honor_labels`, as the chart's ServiceMonitor keeps
    /// the operator's `namespace` label).
    pub job: String,
    pub target: SocketAddr,
    pub target_labels: Vec<(String, String)>,
    /// A Prometheus rule file (`groups: ...`).
    pub rules: String,
}

/// A Prometheus process; killed (and its storage removed) when dropped.
pub struct Prometheus {
    child: std::sync::Mutex<std::process::Child>,
    /// Its API's address.
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `binary` with `config` in a new directory under `dir` and waits until it is ready
    /// (`/-/ready`), which includes loading the rules.
    pub async fn start(binary: &str, config: &Config, dir: &Path) -> Result<Self> {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("rules.yaml"), &config.rules)?;
        let interval = format!("{}ms", config.interval.as_millis());
        let labels: serde_json::Map<String, Value> = config
            .target_labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let file = serde_json::json!({
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [dir.join("rules.yaml")],
            "scrape_configs": [{
                "job_name": config.job,
                "honor_labels": true,
                "static_configs": [{"targets": [config.target.to_string()], "labels": labels}],
            }],
        });
        std::fs::write(
            dir.join("prometheus.yml"),
            serde_yaml::to_string(&file).context("the Prometheus configuration")?,
        )?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = std::process::Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let prometheus = Self {
            child: std::sync::Mutex::new(child),
            addr,
            dir,
        };
        let ready = crate::wait_until("Prometheus to be ready", || async {
            prometheus.check_running()?;
            Ok(http_get(prometheus.addr, "/-/ready")
                .await
                .is_ok_and(|(status, _)| status == 200))
        })
        .await;
        ready.with_context(|| format!("Prometheus log: {}", prometheus.log()))?;
        Ok(prometheus)
    }

    /// Fails with its log if the process has exited.
    pub fn check_running(&self) -> Result<()> {
        let exited = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .try_wait()?;
        if let Some(status) = exited {
            bail!("prometheus exited ({status}): {}", self.log());
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer, or an error with Prometheus's own
    /// (`bad_data` for an expression that does not parse).
    pub async fn api(&self, path: &str) -> Result<Value> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/{path}")).await?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET /api/v1/{path}: {status}: {body}"))?;
        if status != 200 || answer["status"] != "success" {
            bail!(
                "GET /api/v1/{path}: {status}: {}: {}",
                answer["errorType"].as_str().unwrap_or_default(),
                answer["error"].as_str().unwrap_or(&body)
            );
        }
        Ok(answer["data"].clone())
    }

    /// The alerts Prometheus holds now (`/api/v1/alerts`): pending and firing, each with its
    /// labels, annotations, state and `activeAt`.
    pub async fn alerts(&self) -> Result<Vec<Value>> {
        Ok(self.api("alerts").await?["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The result of `expr` evaluated now (an instant query).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self
            .api(&format!("query?query={}", url_encode(expr)))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The series of `expr` from `start` to `end` (Unix seconds) every `step` seconds, as a
    /// dashboard panel asks for them.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Value>> {
        let data = self
            .api(&format!(
                "query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
                url_encode(expr)
            ))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// An RFC 3339 time (an alert's `activeAt`) in seconds since the Unix epoch.
pub fn unix_seconds(rfc3339: &str) -> Result<f64> {
    let t: k8s_openapi::jiff::Timestamp = rfc3339
        .parse()
        .with_context(|| format!("not an RFC 3339 time: {rfc3339}"))?;
    Ok(t.as_millisecond() as f64 / 1000.0)
}
