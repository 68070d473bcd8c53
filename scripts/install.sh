#!/usr/bin/env bash
# Installs what the project needs on Debian/Ubuntu: system tools for the data plane and
# its tests (iptables, iproute2, OpenSSH for the benchmark baseline), then the package and
# its dev tools into .venv. Idempotent; run as root (apt) or with the tools already present.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in iptables-nft-restore:iptables ip:iproute2 ssh:openssh-client sshd:openssh-server \
            ps:procps ss:iproute2; do
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

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "install: done (.venv/bin/k8s-ext-connector)"
