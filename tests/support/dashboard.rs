//! The PromQL of the chart's Grafana dashboard (`charts/moat/dashboards/moat.json`), shared by
//! `tests/monitoring.rs` (every metric it names is one Moat exports) and
//! `e2e/tests/prometheus.rs` (every expression runs against a real Prometheus). Each includes this
//! file with `#[path]`; `charts/moat/tests/dashboard_rules.py` does the same for promtool.
#![allow(dead_code)] // each includer uses part of it

/// The dashboard's JSON, as the chart ships it.
pub const DASHBOARD: &str = include_str!("../../charts/moat/dashboards/moat.json");

/// One PromQL expression of the dashboard and where it is.
#[derive(Clone, Debug)]
pub struct Expression {
    /// `panel <id> "<title>" <refId>` or `variable <name>`.
    pub place: String,
    /// The expression as the dashboard holds it (with Grafana's variables).
    pub expr: String,
}

/// Every PromQL expression of the dashboard: panel targets (rows' panels too) and the selectors
/// of its `label_values(selector, label)` template variables.
pub fn expressions() -> Vec<Expression> {
    fn panels(items: &[serde_json::Value], out: &mut Vec<Expression>) {
        for p in items {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Expression {
                        place: format!(
                            "panel {} {:?} {}",
                            p["id"],
                            p["title"].as_str().unwrap_or_default(),
                            t["refId"].as_str().unwrap_or_default()
                        ),
                        expr: expr.to_string(),
                    });
                }
            }
            panels(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let mut out = Vec::new();
    panels(
        dashboard["panels"].as_array().expect("panels").as_slice(),
        &mut out,
    );
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
    {
        let query = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or_default();
        let selector = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector.trim().to_string())
            .unwrap_or_else(|| panic!("variable query is not label_values(...): {query}"));
        out.push(Expression {
            place: format!("variable {}", v["name"].as_str().unwrap_or_default()),
            expr: selector,
        });
    }
    out
}

/// `expr` as Prometheus receives it from Grafana: each interval variable (`$__rate_interval`,
/// `$__interval`, `$__range`) replaced by `interval`, and the dashboard's own variables (`$job`,
/// `$namespace`, only ever in regex matchers) by their "All" value `.+`. `Err` names a variable
/// left over.
pub fn substitute(expr: &str, interval: &str) -> Result<String, String> {
    let mut out = expr.to_string();
    for d in ["$__rate_interval", "$__interval", "$__range"] {
        out = out.replace(d, interval);
    }
    for v in ["${namespace}", "${job}", "$namespace", "$job"] {
        out = out.replace(v, ".+");
    }
    if out.contains('$') {
        return Err(format!("unknown Grafana variable left in: {out}"));
    }
    Ok(out)
}
