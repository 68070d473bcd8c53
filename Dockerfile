# One image for every component: `k8s-ext-connector operator|webhook|certs|gateway|sidecar`
# (the chart passes the subcommand as args; the webhook injects the same image as the
# sidecar). Build it with `make images`.
#
# The base is pinned to a full patch version. For a release, pin it by digest too
# (--build-arg PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:<index digest>): a tag can
# be re-pushed, a digest cannot.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---- builder: a wheel of the project, binary wheels of its dependencies, one venv ----------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# pyproject.toml names README.md as the package's readme: the wheel build reads it.
COPY pyproject.toml README.md ./
COPY src ./src
# The project itself is pure Python (setuptools builds its wheel). Its dependencies come as
# published binary wheels only, so a missing wheel fails here instead of needing a compiler.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --only-binary=:all: --wheel-dir /wheels /wheels/k8s_ext_connector-*.whl
# A venv without pip holding exactly those wheels (pip installs them from outside it and
# compiles their bytecode now, so nothing is written at run time). The runtime copies it.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-index --find-links=/wheels /wheels/*.whl \
 && /opt/venv/bin/k8s-ext-connector --version

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="k8s-ext-connector" \
      org.opencontainers.image.description="Static, chosen source IPs for Kubernetes pods towards external servers, over SSH tunnels: operator, webhook, certs, gateway and sidecar in one image" \
      org.opencontainers.image.source="https://github.com/k8s-ext-connector/k8s-ext-connector" \
      org.opencontainers.image.url="https://github.com/k8s-ext-connector/k8s-ext-connector" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# Run-time tools only, no compilers, no apt lists left behind:
# - iptables: Debian's package carries both backends' binaries; core/iptables.py drives
#   iptables-{nft,legacy}-{save,restore} and ip6tables-{nft,legacy}-{save,restore} (the
#   gateway's IPv6 ingress chain), choosing the node's backend at run time;
# - iproute2: `ip`, for `gateway --manage-addresses IFACE`.
# Versions are those of the pinned Debian release (bookworm) with its security updates;
# exact apt pins would break the build whenever the archive drops an updated version.
# hadolint ignore=DL3008
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends iptables iproute2; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log; \
    for tool in ip iptables-nft-save iptables-nft-restore iptables-legacy-save \
                iptables-legacy-restore ip6tables-nft-save ip6tables-nft-restore \
                ip6tables-legacy-save ip6tables-legacy-restore; do \
      command -v "$tool" >/dev/null || { echo "image: $tool is missing" >&2; exit 1; }; \
    done

COPY --from=builder /opt/venv /opt/venv

# Nothing is written at run time (read-only root filesystem): no bytecode (it was compiled
# at build time), unbuffered logs. Only /tmp is used, and only when it is mounted (an
# out-of-cluster kubeconfig with inline certificates is materialised there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Non-root by default. The chart runs the gateway and the injected sidecar as uid 0 with
# only NET_ADMIN/NET_RAW (+ NET_BIND_SERVICE for the gateway), because iptables needs uid 0;
# the operator, webhook and certs keep this user.
# The user has a passwd entry: libraries that ask who they run as (getpass) get an answer.
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'nonroot:x:65532:' >> /etc/group
USER 65532:65532
ENTRYPOINT ["k8s-ext-connector"]
CMD ["--help"]
