#!/usr/bin/env bash
# Builds the upstream Kubernetes control-plane binaries the tests and the lab run
# (docs/kubernetes.md): kube-apiserver, kube-controller-manager, kube-scheduler and kubectl of
# one pinned release, plus the etcd that release's kubeadm deploys, from the Go module proxy.
#
# Output: envtest's layout, $KUBE_ASSETS_ROOT/k8s/<version>-linux-<arch>/ (default root:
# .tools/kubebuilder-envtest, gitignored), with a stamp naming what was built; a rerun with
# the stamp in place does nothing. If KUBEBUILDER_ASSETS is set (the envtest convention,
# e.g. from setup-envtest), that directory is used as it is and nothing is built: it must
# hold all five binaries.
#
# Usage: scripts/kube-binaries.sh          build if needed; print the directory on stdout
#        scripts/kube-binaries.sh --dir    print the directory only (no build, no checks)
set -euo pipefail
cd "$(dirname "$0")/.."

# One release for every component. v1.34 is the newest line whose kubelet starts on a
# cgroup v1 host by default (failCgroupV1 defaults to true from v1.35): docs/kubernetes.md.
KUBE_VERSION=v1.34.4
# The etcd that kubeadm v1.34.4 deploys (cmd/kubeadm/app/constants: DefaultEtcdVersion).
ETCD_VERSION=v3.6.5
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

arch="$(go env GOARCH 2>/dev/null || echo amd64)"
root="${KUBE_ASSETS_ROOT:-$PWD/.tools/kubebuilder-envtest}"
dir="$root/k8s/${KUBE_VERSION#v}-linux-$arch"
stamp="$dir/.stamp"
want_stamp="kubernetes $KUBE_VERSION etcd $ETCD_VERSION binaries ${BINARIES[*]}"

if [ "${1:-}" = "--dir" ]; then
  echo "${KUBEBUILDER_ASSETS:-$dir}"
  exit 0
fi

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  missing=()
  for b in "${BINARIES[@]}"; do [ -x "$KUBEBUILDER_ASSETS/$b" ] || missing+=("$b"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "kube-binaries: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks ${missing[*]}" \
         "(setup-envtest gives only etcd, kube-apiserver, kubectl); unset it to build $KUBE_VERSION" >&2
    exit 1
  fi
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
  echo "$dir"
  exit 0
fi

command -v go >/dev/null 2>&1 || {
  echo "kube-binaries: need Go >= 1.24 (go.dev/dl) to build Kubernetes $KUBE_VERSION, or set" \
       "KUBEBUILDER_ASSETS to a directory holding ${BINARIES[*]}" >&2
  exit 1
}

build="$(mktemp -d "${TMPDIR:-/tmp}/kube-binaries.XXXXXX")"
trap 'rm -rf "$build"' EXIT
start=$SECONDS
export GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-auto}" CGO_ENABLED=0

# Kubernetes' go.mod points every k8s.io/* staging module at ./staging; a module that
# depends on it pins each of them to the published v0.<minor>.<patch> instead.
kmod="$(cd "$build" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
        | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
staging_version="v0.${KUBE_VERSION#v1.}"
mkdir -p "$build/kube" "$build/etcd"
{
  echo "module extconn.local/kube-binaries"
  echo
  echo "go 1.24.0"
  echo
  echo "require k8s.io/kubernetes $KUBE_VERSION"
  echo
  echo "replace ("
  sed -n "s#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 $staging_version#p" "$kmod"
  echo ")"
  echo
  echo "tool ("
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    echo "	k8s.io/kubernetes/cmd/$b"
  done
  echo ")"
} >"$build/kube/go.mod"

# etcd in its own module, so its version does not move kube-apiserver's etcd client.
cat >"$build/etcd/go.mod" <<EOF
module extconn.local/etcd

go 1.24.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
cat >"$build/etcd/main.go" <<'EOF'
// etcd's own main (go.etcd.io/etcd/v3) is exactly this call.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF

# What `make release` stamps (hack/lib/version.sh): the version `kubectl version` and the
# servers' /version report. The build date is the release tag's, from the proxy.
build_date="$(cd "$build" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
              | sed -n 's/^\s*"Info": "\(.*\)",$/\1/p' | xargs cat | sed -n 's/.*"Time":"\([^"]*\)".*/\1/p')"
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${build_date:-1970-01-01T00:00:00Z}"
done

echo "kube-binaries: building Kubernetes $KUBE_VERSION and etcd $ETCD_VERSION into $dir" \
     "(cold: ~10-20 min on 2 cores, docs/kubernetes.md)" >&2
out="$build/out"
mkdir -p "$out"
(cd "$build/kube" && go mod tidy && go build -trimpath -ldflags "$ldflags" -o "$out/" \
   k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
   k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
(cd "$build/etcd" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$out/etcd" .)

# Output captured first: `cmd | grep -q` under pipefail fails at random when grep exits
# before the command has written everything (SIGPIPE).
kubectl_says="$("$out/kubectl" version --client 2>&1)"
[[ "$kubectl_says" == *"$KUBE_VERSION"* ]] \
  || { echo "kube-binaries: built kubectl does not report $KUBE_VERSION: $kubectl_says" >&2; exit 1; }
etcd_says="$("$out/etcd" --version 2>&1)"
[[ "$etcd_says" == *"${ETCD_VERSION#v}"* ]] \
  || { echo "kube-binaries: built etcd does not report $ETCD_VERSION: $etcd_says" >&2; exit 1; }

mkdir -p "$dir"
for b in "${BINARIES[@]}"; do install -m 0755 "$out/$b" "$dir/$b"; done
echo "$want_stamp" >"$stamp"
echo "kube-binaries: built in $((SECONDS - start)) s: $(du -sh "$dir" | cut -f1) in $dir" >&2
echo "$dir"
