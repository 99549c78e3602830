#!/usr/bin/env bash
# `make demo`: Moat installed with its Helm chart on the local control plane, serving
# examples/quickstart.yaml.
#
# The chart installs the CRDs, the operator's Deployment (two replicas, leader election), its
# ServiceAccount and least-privilege RBAC. The local control plane has no container runtime: kwok
# simulates the operator's pods, so they never take the leader Lease. The process that does the
# work is the `moat` binary the image would run, started here with a token of the chart's
# ServiceAccount (TokenRequest): the identity and permissions of a real operator pod. It takes the
# Lease, reconciles the example, and reverts a change made behind its back. The cluster stays up
# afterwards; the operator stops.
set -euo pipefail
cd "$(dirname "$0")/.."
e2e/cluster.sh up >/dev/null
eval "$(e2e/cluster.sh env)"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
NS=moat-system
RELEASE=moat
SA=moat
STATE=${MOAT_CACHE:-$HOME/.cache/moat}/demo
mkdir -p "$STATE" "$HOME/.cache/moat/logs"

step "building moat"
cargo build --quiet --bin moat
MOAT=${CARGO_TARGET_DIR:-target}/debug/moat

step "installing the chart (helm upgrade --install $RELEASE charts/moat -n $NS)"
kubectl create namespace "$NS" --dry-run=client -o yaml |
  kubectl label --local -f - -o yaml \
    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest |
  kubectl apply -f - >/dev/null
# A CRD left by an earlier install or by `make install` is handed to this release, as the README
# describes (Helm refuses to adopt objects it did not create otherwise).
for crd in securemodeldeployments.moat.dev modelclients.moat.dev; do
  if kubectl get crd "$crd" >/dev/null 2>&1; then
    kubectl label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    kubectl annotate crd "$crd" --overwrite \
      meta.helm.sh/release-name=$RELEASE meta.helm.sh/release-namespace=$NS >/dev/null
  fi
done
helm upgrade --install "$RELEASE" charts/moat -n "$NS" --force-conflicts --wait --timeout 2m
kubectl get deployment,serviceaccount,networkpolicy,poddisruptionbudget,service -n "$NS" \
  -l app.kubernetes.io/instance=$RELEASE
echo "What the chart lets the operator do (kubectl auth can-i --list):"
kubectl auth can-i --list --as "system:serviceaccount:$NS:$SA" | grep -E 'moat.dev|apps|networking|policy|serviceaccounts|services|events|leases'

step "starting the operator as the chart's ServiceAccount (log: $HOME/.cache/moat/logs/operator-demo.log)"
# A kubeconfig for the ServiceAccount: the cluster's address and CA, a one-hour token. The token
# is written to a file only this user can read and never printed.
kubeconfig=$STATE/operator.kubeconfig
(umask 077 && kubectl config view --raw --minify --flatten >"$kubeconfig")
token=$(kubectl create token "$SA" -n "$NS" --duration=1h)
KUBECONFIG=$kubeconfig kubectl config set-credentials "$SA" --token="$token" >/dev/null
KUBECONFIG=$kubeconfig kubectl config set-context --current --user="$SA" >/dev/null
unset token
KUBECONFIG=$kubeconfig POD_NAME=demo-operator POD_NAMESPACE=$NS "$MOAT" operator \
  --leader-elect --lease-name "$RELEASE" --lease-namespace "$NS" \
  --metrics-addr 127.0.0.1:18080 --health-probe-addr 127.0.0.1:18081 \
  >"$HOME/.cache/moat/logs/operator-demo.log" 2>&1 &
operator=$!
trap 'kill $operator 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  holder=$(kubectl get lease "$RELEASE" -n "$NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ "$holder" = demo-operator ] && break
  kill -0 $operator 2>/dev/null || { tail -n 20 "$HOME/.cache/moat/logs/operator-demo.log"; exit 1; }
  sleep 0.2
done
echo "leader: ${holder:-none} (Lease $NS/$RELEASE)"

step "applying examples/quickstart.yaml"
kubectl apply -f examples/quickstart.yaml
kubectl wait --for=condition=Ready smd/fraud-scorer -n moat-demo --timeout=120s
kubectl get smd -n moat-demo

step "what Moat created (all labelled moat.dev/deployment=fraud-scorer)"
kubectl get serviceaccounts,secrets,networkpolicies,services,poddisruptionbudgets,deployments,pods \
  -n moat-demo -l moat.dev/deployment=fraud-scorer

step "mTLS: the serving certificate Moat issued from its CA (Secret moat-system/moat-ca)"
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.certificate: "}{.status.certificate}{"\n"}'
kubectl get secret fraud-scorer-tls -n moat-demo -o jsonpath='{.data.tls\.crt}' | base64 -d |
  openssl x509 -noout -subject -issuer -enddate -ext subjectAltName

step "drift: someone swaps the image and turns on hostNetwork behind Moat's back"
kubectl patch deployment fraud-scorer -n moat-demo --type strategic \
  -p '{"spec":{"template":{"spec":{"hostNetwork":true,"containers":[{"name":"server","image":"evil.example.com/miner:latest"}]}}}}'
start=$(date +%s%N)
want=registry.example.com/serving/vllm:v0.6.3
for _ in $(seq 1 200); do
  image=$(kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{.spec.template.spec.containers[0].image}')
  host=$(kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{.spec.template.spec.hostNetwork}')
  [ "$image" = "$want" ] && [ "$host" != "true" ] && break
  sleep 0.05
done
echo "reverted in $(( ($(date +%s%N) - start) / 1000000 )) ms: image=$image hostNetwork=${host:-unset}"
sleep 1
kubectl get events.events.k8s.io -n moat-demo --field-selector reason=DriftRepaired -o custom-columns=KIND:.related.kind,OBJECT:.related.name,NOTE:.note
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.drift: "}{.status.drift}{"\n"}'
kubectl wait --for=condition=Ready smd/fraud-scorer -n moat-demo --timeout=120s

step "metrics (http://127.0.0.1:18080/metrics)"
curl -fsS http://127.0.0.1:18080/metrics | grep -E '^moat_(leader|reconcile_total|drift_repairs_total|managed_objects)' || true

step "done"
echo "The cluster is still running: export KUBECONFIG=$KUBECONFIG  (stop it with 'make cluster-down')."
echo "Remove the chart with 'helm uninstall $RELEASE -n $NS' (the CRDs and your models stay)."
echo "Render the children offline: $MOAT render -f examples/quickstart.yaml"
