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
#
# The example's image comes from a real registry on loopback (Debian's docker-registry, TLS and
# basic auth), so Moat resolves its tag to a digest; its model is encrypted here with
# `moat encrypt`, and `moat decrypt` then does what the init container does in a pod.
set -euo pipefail
cd "$(dirname "$0")/.."
e2e/cluster.sh up >/dev/null
eval "$(e2e/cluster.sh env)"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# How long the demo waits for a state (the registry up, the Lease taken, the model Ready, a drift
# repaired) before it gives up. A deadline only bounds a failure: on an idle machine each of these
# takes seconds, but a machine whose cores are busy with other builds can take minutes.
DEADLINE=${MOAT_DEMO_DEADLINE:-300}
NS=moat-system
RELEASE=moat
SA=moat
STATE=${MOAT_CACHE:-$HOME/.cache/moat}/demo
mkdir -p "$STATE" "$HOME/.cache/moat/logs"

step "building moat"
cargo build --quiet --bin moat && cargo build --quiet -p moat-e2e --bin moat-registry
MOAT=${CARGO_TARGET_DIR:-target}/debug/moat
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

step "a private registry on loopback (TLS from its own CA, basic auth) with serving/vllm:v0.6.3"
rm -f "$STATE/registry.env"
"${CARGO_TARGET_DIR:-target}/debug/moat-registry" "$STATE/registry.env" serving/vllm:v0.6.3 moat:0.1.0 \
  >"$HOME/.cache/moat/logs/registry-demo.log" 2>&1 &
registry_pid=$!
pids+=($registry_pid)
deadline=$((SECONDS + DEADLINE))
until [ -s "$STATE/registry.env" ]; do
  if ! kill -0 "$registry_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "the registry did not come up (within ${DEADLINE}s):" >&2
    cat "$HOME/.cache/moat/logs/registry-demo.log" >&2
    exit 1
  fi
  sleep 0.2
done
# shellcheck disable=SC1091
. "$STATE/registry.env"
REGISTRY=$MOAT_REGISTRY_HOST
echo "registry $REGISTRY: serving/vllm:v0.6.3 is $MOAT_REGISTRY_DIGEST_0"

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
helm upgrade --install "$RELEASE" charts/moat -n "$NS" --force-conflicts --wait --timeout "${DEADLINE}s"
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
# Only the loopback registry is allowed; its CA is trusted; Moat's own image (the decrypting init
# container) is given by digest, as the chart does with image.digest.
KUBECONFIG=$kubeconfig POD_NAME=demo-operator-$$ POD_NAMESPACE=$NS "$MOAT" operator \
  --leader-elect --lease-name "$RELEASE" --lease-namespace "$NS" \
  --metrics-addr 127.0.0.1:18080 --health-probe-addr 127.0.0.1:18081 \
  --allowed-registries "$REGISTRY" --registry-ca-file "$MOAT_REGISTRY_CA_FILE" \
  --helper-image "$REGISTRY/moat@$MOAT_REGISTRY_DIGEST_1" \
  >"$HOME/.cache/moat/logs/operator-demo.log" 2>&1 &
operator=$!
pids+=($operator)
operator_alive() {
  kill -0 "$operator" 2>/dev/null && return 0
  echo "the operator exited; its log ends:" >&2
  tail -n 20 "$HOME/.cache/moat/logs/operator-demo.log" >&2
  return 1
}
deadline=$((SECONDS + DEADLINE))
until holder=$(kubectl get lease "$RELEASE" -n "$NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null) &&
  [ "${holder%_*}" = "demo-operator-$$" ]; do
  operator_alive || exit 1
  [ $SECONDS -lt $deadline ] || { echo "the operator did not take the Lease within ${DEADLINE}s (holder: ${holder:-none})" >&2; exit 1; }
  sleep 0.2
done
echo "leader: $holder (Lease $NS/$RELEASE)"

# Waits until SecureModelDeployment $1 in namespace $2 is Ready for its current spec: Ready=True,
# and status.observedGeneration and the condition's observedGeneration equal metadata.generation
# (`kubectl wait --for=condition=Ready` would also accept a Ready left from an earlier spec).
wait_ready() {
  local deadline=$((SECONDS + DEADLINE)) state generation observed ready ready_generation
  while :; do
    state=$(kubectl get smd "$1" -n "$2" -o jsonpath='{.metadata.generation} {.status.observedGeneration} {.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].observedGeneration}' 2>/dev/null || true)
    read -r generation observed ready ready_generation <<<"$state" || true
    if [ -n "${generation:-}" ] && [ "$generation" = "${observed:-}" ] &&
      [ "${ready:-}" = "True" ] && [ "$generation" = "${ready_generation:-}" ]; then
      echo "securemodeldeployment.moat.dev/$1 condition met (Ready at generation $generation)"
      return 0
    fi
    operator_alive || return 1
    if [ $SECONDS -ge $deadline ]; then
      echo "smd/$1 was not Ready at its current generation within ${DEADLINE}s (generation, observed, Ready, its generation: $state)" >&2
      kubectl get smd "$1" -n "$2" -o jsonpath='{.status.conditions}' >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

step "the model's team: a pull Secret, a key (moat keygen) and an encrypted model (moat encrypt)"
kubectl create namespace moat-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create secret generic registry-credentials -n moat-demo --dry-run=client -o yaml \
  --type=kubernetes.io/dockerconfigjson --from-file=.dockerconfigjson="$MOAT_REGISTRY_DOCKERCONFIGJSON" |
  kubectl apply -f - >/dev/null
# The identity goes straight into the cluster; only the recipient (public) is kept here.
"$MOAT" keygen --name fraud-scorer-key --namespace moat-demo --recipient-file "$STATE/recipient.txt" |
  kubectl apply -f -
rm -rf "$STATE/fraud-model" "$STATE/v3.tar.age"
mkdir -p "$STATE/fraud-model"
echo '{"architecture": "demo", "layers": 4}' >"$STATE/fraud-model/config.json"
head -c 64M /dev/urandom >"$STATE/fraud-model/weights.bin"
"$MOAT" encrypt -R "$STATE/recipient.txt" "$STATE/fraud-model" -o "$STATE/v3.tar.age"
sha=$(sha256sum "$STATE/v3.tar.age" | cut -d' ' -f1)
echo "encrypted model: $(du -h "$STATE/v3.tar.age" | cut -f1), sha256 $sha"

step "applying examples/quickstart.yaml (its registry is this loopback one, its sha256 this model's)"
sed -e "s#registry.example.com/serving/#$REGISTRY/serving/#" \
  -e "s#^    sha256: .*#    sha256: $sha#" examples/quickstart.yaml | kubectl apply -f -
wait_ready fraud-scorer moat-demo
kubectl get smd -n moat-demo

step "the tag was resolved once and pinned; the pods run the digest"
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.image: "}{.status.image}{"\n"}'
kubectl get deployment fraud-scorer -n moat-demo \
  -o jsonpath='{"server:        "}{.spec.template.spec.containers[0].image}{"\ndecrypt-model: "}{.spec.template.spec.initContainers[0].image}{"\n"}'
kubectl get events.events.k8s.io -n moat-demo --field-selector reason=ImagePinned -o custom-columns=NOTE:.note

step "the encrypted model: init container, memory-backed volume, key in the init container only"
kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{range .spec.template.spec.initContainers[*]}{.name}{": "}{.args}{"\n"}{end}'
kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{range .spec.template.spec.volumes[*]}{.name}{": "}{.emptyDir}{.secret.secretName}{.configMap.name}{"\n"}{end}'
kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{range .spec.template.spec.containers[*]}{.name}{" mounts: "}{range .volumeMounts[*]}{.name}{"("}{.readOnly}{") "}{end}{"\n"}{end}'

step "what the init container does (no container runtime here: the same moat decrypt, run directly)"
keyfile=$(mktemp)
kubectl get secret fraud-scorer-key -n moat-demo -o jsonpath='{.data.identity}' | base64 -d >"$keyfile"
rm -rf "$STATE/decrypted"
start=$(date +%s%N)
"$MOAT" decrypt --source "file://$STATE/v3.tar.age" --sha256 "$sha" --identity "$keyfile" \
  --target "$STATE/decrypted" --size-limit 2Gi
echo "verified and decrypted in $(( ($(date +%s%N) - start) / 1000000 )) ms:"
ls -l "$STATE/decrypted"
cp "$STATE/v3.tar.age" "$STATE/tampered.tar.age"
printf 'X' | dd of="$STATE/tampered.tar.age" bs=1 seek=100000 conv=notrunc status=none
rm -rf "$STATE/decrypted-tampered"
echo "one byte changed in transit:"
"$MOAT" decrypt --source "file://$STATE/tampered.tar.age" --sha256 "$sha" --identity "$keyfile" \
  --target "$STATE/decrypted-tampered" --size-limit 2Gi || echo "exit status $?; files left: $(find "$STATE/decrypted-tampered" -type f 2>/dev/null | wc -l)"
rm -f "$keyfile"

step "what Moat created (all labelled moat.dev/deployment=fraud-scorer)"
kubectl get serviceaccounts,secrets,networkpolicies,services,poddisruptionbudgets,deployments,pods \
  -n moat-demo -l moat.dev/deployment=fraud-scorer

step "mTLS: the serving certificate Moat issued from its CA (Secret moat-system/moat-ca)"
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.certificate: "}{.status.certificate}{"\n"}'
kubectl get secret fraud-scorer-tls -n moat-demo -o jsonpath='{.data.tls\.crt}' | base64 -d |
  openssl x509 -noout -subject -issuer -enddate -ext subjectAltName

step "drift: someone swaps the image and turns on hostNetwork behind Moat's back"
want=$(kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{.status.image.pinned}')
# What records a repair, before this one (the namespace, and its Events, outlive earlier demos).
repairs() { kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{.status.drift.repairs}'; }
drift_events() {
  kubectl get events.events.k8s.io -n moat-demo --field-selector reason=DriftRepaired \
    -o jsonpath='{range .items[*]}{.metadata.name}:{.series.count} {end}'
}
repairs_before=$(repairs)
events_before=$(drift_events)
kubectl patch deployment fraud-scorer -n moat-demo --type strategic \
  -p '{"spec":{"template":{"spec":{"hostNetwork":true,"containers":[{"name":"server","image":"evil.example.com/miner:latest"}]}}}}'
start=$(date +%s%N)
deadline=$((SECONDS + DEADLINE))
while :; do
  image=$(kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{.spec.template.spec.containers[0].image}')
  host=$(kubectl get deployment fraud-scorer -n moat-demo -o jsonpath='{.spec.template.spec.hostNetwork}')
  [ "$image" = "$want" ] && [ "$host" != "true" ] && break
  operator_alive || exit 1
  [ $SECONDS -lt $deadline ] || { echo "the drift was not reverted within ${DEADLINE}s: image=$image hostNetwork=$host" >&2; exit 1; }
  sleep 0.05
done
echo "reverted in $(( ($(date +%s%N) - start) / 1000000 )) ms: image=$image hostNetwork=${host:-unset}"
# Moat counts the repair in status.drift after it has applied every child, and records the Event
# in the background: wait for both rather than for a fixed time.
until [ "$(repairs)" -gt "${repairs_before:-0}" ] 2>/dev/null && [ "$(drift_events)" != "$events_before" ]; do
  operator_alive || exit 1
  [ $SECONDS -lt $deadline ] || { echo "the repair was not recorded within ${DEADLINE}s (status.drift.repairs $(repairs), before ${repairs_before:-none})" >&2; exit 1; }
  sleep 0.2
done
kubectl get events.events.k8s.io -n moat-demo --field-selector reason=DriftRepaired -o custom-columns=KIND:.related.kind,OBJECT:.related.name,NOTE:.note
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.drift: "}{.status.drift}{"\n"}'
wait_ready fraud-scorer moat-demo

step "metrics (http://127.0.0.1:18080/metrics)"
curl -fsS http://127.0.0.1:18080/metrics | grep -E '^moat_(leader|reconcile_total|drift_repairs_total|managed_objects|image_resolutions_total)' || true

step "done"
echo "The cluster is still running: export KUBECONFIG=$KUBECONFIG  (stop it with 'make cluster-down')."
echo "Remove the chart with 'helm uninstall $RELEASE -n $NS' (the CRDs and your models stay)."
echo "Render the children offline: $MOAT render -f examples/quickstart.yaml"
