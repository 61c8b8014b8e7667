#!/usr/bin/env bash
# Renders every Kustomize overlay under deploy/kubernetes, validates the result against the
# Kubernetes 1.31 schemas (kubernetes-validate, strict: unknown fields are errors), and checks
# the Larder config inside each ConfigMap with `larder validate`.
# Usage: scripts/k8s-check.sh [path/to/larder]   (default target/debug/larder)
set -euo pipefail
cd "$(dirname "$0")/.."
LARDER=${1:-target/debug/larder}

if ! command -v kubectl >/dev/null; then
  APT="apt-get"; [ "$(id -u)" = 0 ] || APT="sudo env DEBIAN_FRONTEND=noninteractive apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $APT install -y -qq kubectl >/dev/null 2>&1 || $APT install -y -qq kubernetes-client >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate==1.31.0
fi

work=$(mktemp -d)
# Kustomize refuses absolute roots, so the with-components overlays are written in the tree.
mixed=deploy/kubernetes/.check-$$
trap 'rm -rf "$work" "$mixed"' EXIT
for overlay in deploy/kubernetes/*/; do
  name=$(basename "$overlay")
  { [ "$name" = base ] || [ "$name" = components ]; } && continue
  echo "== $name: kubectl kustomize, kubernetes-validate, larder validate"
  kubectl kustomize "$overlay" >"$work/$name.yaml"
  kubernetes-validate --quiet -k 1.31.0 --strict "$work/$name.yaml"
  python3 - "$work/$name.yaml" "$work/$name-larder.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
configs = [d for d in docs if d["kind"] == "ConfigMap" and "larder.yaml" in d.get("data", {})]
assert len(configs) == 1, f"expected one ConfigMap with larder.yaml, found {len(configs)}"
open(sys.argv[2], "w").write(configs[0]["data"]["larder.yaml"])
PY
  "$LARDER" validate --config "$work/$name-larder.yaml"
done

# The optional components (ServiceMonitor, EndpointSlice RBAC) on the modes they are for. The
# ServiceMonitor is a CRD the schemas do not know: it is checked against the Service it
# selects instead (labels match, the port exists).
for mode in deployment daemonset; do
  echo "== $mode + components: kubectl kustomize, kubernetes-validate, ServiceMonitor selects the admin port"
  mkdir -p "$mixed"
  cat >"$mixed/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../$mode]
components: [../components/servicemonitor, ../components/kubernetes-discovery]
EOF
  kubectl kustomize "$mixed" >"$work/$mode-components.yaml"
  python3 - "$work/$mode-components.yaml" "$work/$mode-core.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
assert len(monitors) == 1, f"expected one ServiceMonitor, found {len(monitors)}"
spec = monitors[0]["spec"]
assert monitors[0]["apiVersion"] == "monitoring.coreos.com/v1"
assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, spec
want = spec["selector"]["matchLabels"]
services = [d for d in docs if d["kind"] == "Service"
            and want.items() <= d["metadata"].get("labels", {}).items()]
assert len(services) == 1, f"the ServiceMonitor selects {len(services)} Services, expected 1"
ports = {p["name"] for p in services[0]["spec"]["ports"]}
for e in spec["endpoints"]:
    assert set(e) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, e
    assert e["port"] in ports, f"port {e['port']!r} not in {sorted(ports)}"
    assert e["path"] in ("/stats/prometheus", "/metrics"), e["path"]
pods = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
assert pods and all(p["spec"]["template"]["spec"].get("serviceAccountName") == "larder"
                    and p["spec"]["template"]["spec"]["automountServiceAccountToken"]
                    for p in pods), "the discovery component mounts the larder service account"
yaml.safe_dump_all([d for d in docs if d["kind"] != "ServiceMonitor"], open(sys.argv[2], "w"))
PY
  kubernetes-validate --quiet -k 1.31.0 --strict "$work/$mode-core.yaml"
  rm -rf "$mixed"
done
