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
trap 'rm -rf "$work"' EXIT
for overlay in deploy/kubernetes/*/; do
  name=$(basename "$overlay")
  [ "$name" = base ] && continue
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
