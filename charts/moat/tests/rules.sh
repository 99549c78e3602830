#!/usr/bin/env bash
# `make test-rules`: the chart's alerts and dashboard against the pinned promtool, no cluster.
#
# 1. `helm template` renders the PrometheusRule (prometheusRule.enabled=true) and its rule groups
#    pass `promtool check rules`;
# 2. `promtool test rules` runs charts/moat/tests/alerts.test.yaml against those rendered rules:
#    each alert fires on the series that should trigger it and stays silent on normal ones;
# 3. the rules rendered with values (alertLabels, labels, operatorJob) pass too and carry them,
#    and `helm lint --strict` passes with every monitoring value on;
# 4. every PromQL expression of the dashboard (charts/moat/dashboards/moat.json, panels and
#    template variables) is written as a recording rule and must pass `promtool check rules`
#    (it parses), and the rendered ConfigMap carries the dashboard unchanged.
# That every metric they name is one Moat exports is tests/monitoring.rs (cargo test).
#
# Needs MOAT_PROMTOOL and MOAT_HELM (`e2e/prometheus.sh env` prints them) and python3.
set -euo pipefail

CHART=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TESTS=$CHART/tests
: "${MOAT_PROMTOOL:?set MOAT_PROMTOOL (eval \"\$(e2e/prometheus.sh env)\")}"
: "${MOAT_HELM:?set MOAT_HELM (eval \"\$(e2e/prometheus.sh env)\")}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf 'test-rules: %s\n' "$*" >&2; }
fail() { printf 'test-rules: FAILED: %s\n' "$*" >&2; exit 1; }

# The rule groups of the rendered PrometheusRule: its `spec`, which is a Prometheus rule file.
say "rendering the PrometheusRule with helm template"
"$MOAT_HELM" template moat "$CHART" --namespace moat-system \
  --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml >"$work/prometheusrule.yaml"
python3 "$TESTS/spec_of.py" "$work/prometheusrule.yaml" >"$work/rules.yaml"
alerts=$(grep -c '^ *- alert: ' "$work/rules.yaml" || true)
[ "$alerts" -gt 0 ] || fail "the rendered PrometheusRule has no alert"

say "promtool check rules on the rendered rules ($alerts alerts)"
"$MOAT_PROMTOOL" check rules "$work/rules.yaml" || fail "promtool check rules refused the chart's rules"

say "promtool test rules (charts/moat/tests/alerts.test.yaml)"
cp "$TESTS/alerts.test.yaml" "$work/"
(cd "$work" && "$MOAT_PROMTOOL" test rules alerts.test.yaml) || fail "an alert unit test failed"

say "the rule values: alertLabels on every alert, the PrometheusRule's labels, operatorJob"
"$MOAT_HELM" template moat "$CHART" --namespace moat-system --set prometheusRule.enabled=true \
  --set prometheusRule.alertLabels.team=platform --set prometheusRule.labels.release=kps \
  --set prometheusRule.operatorJob=custom-job --show-only templates/prometheusrule.yaml >"$work/valued.yaml"
python3 "$TESTS/spec_of.py" "$work/valued.yaml" >"$work/valued-rules.yaml"
"$MOAT_PROMTOOL" check rules "$work/valued-rules.yaml" >/dev/null || fail "promtool check rules refused the rules rendered with values"
labelled=$(grep -c '^ *team: platform$' "$work/valued-rules.yaml" || true)
[ "$labelled" -eq "$alerts" ] || fail "alertLabels reached $labelled of $alerts alerts"
grep -q '^    release: kps$' "$work/valued.yaml" || fail "prometheusRule.labels is not on the PrometheusRule"
grep -q 'job="custom-job"' "$work/valued-rules.yaml" || fail "prometheusRule.operatorJob is not in the operator's alerts"

say "helm lint --strict with every monitoring value on"
"$MOAT_HELM" lint --strict "$CHART" --set prometheusRule.enabled=true --set dashboard.enabled=true \
  --set metrics.serviceMonitor.enabled=true --set metrics.podMonitor.enabled=true \
  --set 'watchNamespaces={team-a,team-b}' >"$work/lint.log" 2>&1 || { cat "$work/lint.log" >&2; fail "helm lint"; }

say "the dashboard's PromQL expressions as recording rules"
python3 "$TESTS/dashboard_rules.py" "$CHART/dashboards/moat.json" >"$work/dashboard-rules.yaml"
exprs=$(grep -c '^ *- record: ' "$work/dashboard-rules.yaml" || true)
[ "$exprs" -gt 0 ] || fail "no expression found in the dashboard"
"$MOAT_PROMTOOL" check rules "$work/dashboard-rules.yaml" || fail "a dashboard expression does not parse"

say "the dashboard ConfigMap carries charts/moat/dashboards/moat.json"
"$MOAT_HELM" template moat "$CHART" --namespace moat-system \
  --set dashboard.enabled=true --show-only templates/dashboard.yaml >"$work/dashboard.yaml"
python3 "$TESTS/dashboard_rules.py" --configmap "$work/dashboard.yaml" "$CHART/dashboards/moat.json" \
  || fail "the rendered ConfigMap does not hold the dashboard"

say "ok: $alerts alerts checked and unit-tested, $exprs dashboard expressions parse"
