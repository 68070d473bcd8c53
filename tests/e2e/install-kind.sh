#!/usr/bin/env bash
# Installs the pinned kind release binary into .tools/bin (first on PATH under `make`),
# refusing any download whose sha256 differs from the pin below. A no-op when that version
# is already there. Used by `make e2e` and by the e2e workflow.
#
# To move to another release: change KIND_VERSION and both digests, taken from the
# release's kind-linux-<arch>.sha256sum files (and check a second source).
set -euo pipefail
cd "$(dirname "$0")/../.."

KIND_VERSION=v0.32.0
KIND_SHA256_amd64=50030de23cf40a18505f20426f6a8506bedf13c6e509244bd1fa9463721b0f54
KIND_SHA256_arm64=b92cd615e97585de8ddade28ed5cd7feb4248d717c233eea5b03c37298900f5d

dest=.tools/bin/kind
if [ -x "$dest" ] && "$dest" version 2>/dev/null | grep -q "^kind ${KIND_VERSION} "; then
  exit 0
fi

if [ "$(uname -s)" != Linux ]; then
  echo "install-kind: only Linux is pinned here; install kind ${KIND_VERSION} yourself" >&2
  exit 1
fi
case "$(uname -m)" in
  x86_64 | amd64) arch=amd64; want=$KIND_SHA256_amd64 ;;
  aarch64 | arm64) arch=arm64; want=$KIND_SHA256_arm64 ;;
  *) echo "install-kind: no pinned kind binary for $(uname -m)" >&2; exit 1 ;;
esac

url="https://github.com/kubernetes-sigs/kind/releases/download/${KIND_VERSION}/kind-linux-${arch}"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
echo "install-kind: fetching kind ${KIND_VERSION} (linux/${arch})"
if ! curl -fsSL --retry 3 --retry-delay 2 -o "$tmp" "$url"; then
  echo "install-kind: FAILED to download $url" >&2
  exit 1
fi
got="$(sha256sum "$tmp" | cut -d' ' -f1)"
if [ "$got" != "$want" ]; then
  echo "install-kind: FAILED: sha256 of $url is $got, pinned $want; not installed" >&2
  exit 1
fi
mkdir -p "$(dirname "$dest")"
install -m 0755 "$tmp" "$dest"
echo "install-kind: $("$dest" version) -> $dest"
