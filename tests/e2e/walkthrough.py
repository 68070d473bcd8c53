"""The seed's walkthrough on kind, step by step as its README does it (and as
``k8s-ext-connector lab`` does it on network namespaces), with the chart instead of
deploy.sh:

1. the project's image, built and loaded into a fresh kind cluster; the chart installed;
2. an external server (the project's echo server: it answers with the client IP it saw
   and logs it to /tmp/access.log) on kind's Docker network, and a second container there
   that is not the target ("stranger");
3. the gateway node: two free addresses of that network added to its eth0 (the seed's
   `ip addr add 192.168.122.200/32 dev eth0`), then the gateway label;
4. ns1/ns2 labelled for injection, my-service1/my-service2, the seed's ExternalService with
   targetIP = the server and sourceIPs = those two addresses; then my-pod1, my-pod2 and
   other-pod (created after the ExternalService, once the webhook injects them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    APP_CONTAINER,
    BUILD_TIMEOUT,
    CHART,
    CLUSTER_TIMEOUT,
    CONNECTOR_NAMESPACE,
    ES_NAME,
    ES_NAMESPACE,
    ES_PLURAL,
    ES_READY_TIMEOUT,
    GATEWAY_LABEL,
    HELM_TIMEOUT,
    IMAGE,
    INJECTION_LABEL,
    KIND_CONFIG,
    KIND_NETWORK,
    NAMESPACES,
    POD_READY_TIMEOUT,
    PODS,
    RELEASE,
    RELEASE_NAMESPACE,
    ROOT,
    SERVER_LOG,
    SOURCE_PODS,
    TARGET_PORT,
    Cleanup,
    CommandError,
    Diagnostics,
    Kind,
    SeedPod,
    client_argv,
    es_ready,
    es_summary,
    externalservice_manifest,
    free_addresses,
    has_sidecar,
    kind_ipv4_network,
    operator_objects,
    outcome,
    pod_manifest,
    pod_ready,
    run,
    run_logged,
    service_manifest,
    until,
)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Walkthrough:
    """The brought-up scenario, and the seed's checks as calls."""

    kind: Kind
    target_ip: str
    source_ips: tuple[str, ...]
    node_ips: dict[str, str]  # kind node name -> its address on the kind network

    def source_ip(self, pod: SeedPod) -> str:
        return self.source_ips[SOURCE_PODS.index(pod)]

    def egress(self, pod: SeedPod, count: int = 5) -> str:
        """The seed's `kubectl exec -it my-pod1 -n ns1 -- curl my-externalservice.external-
        services:8000`, ``count`` connections at once: the distinct answers (the source IP
        the external server saw), ``refused`` or ``error: ...``."""
        host = f"{ES_NAME}.{CONNECTOR_NAMESPACE}"
        result = self.kind.kubectl_result(
            "exec",
            "-n",
            pod.namespace,
            pod.name,
            "-c",
            APP_CONTAINER,
            "--",
            *client_argv(host, TARGET_PORT, count),
            timeout=90,
        )
        if result.returncode != 0:
            return f"error: kubectl exec exited {result.returncode}: {_last_line(result.stderr)}"
        return outcome(result.stdout)

    def call_in(self, container: str, address: str, port: int) -> str:
        """From a container on the kind network (the seed's `curl 192.168.122.200` on the
        external server): the name of the pod that answered, ``refused`` or ``error: ...``."""
        result = self.kind.docker(
            "exec", container, *client_argv(address, port, 1), timeout=90, check=False
        )
        if result.returncode != 0:
            return f"error: docker exec exited {result.returncode}: {_last_line(result.stderr)}"
        return outcome(result.stdout, first_word=True)

    def server_clients(self) -> set[str]:
        """Every client address in the external server's access log (the seed's `tail
        /tmp/access.log`)."""
        text = self.kind.docker("exec", self.kind.server, "cat", SERVER_LOG).stdout
        return {str(json.loads(line)["client"]) for line in text.splitlines() if line.strip()}

    def explain(self, seen: str) -> str:
        """What an unexpected address in ``seen`` means, when it is a kind node's own."""
        for node, address in self.node_ips.items():
            if re.search(rf"(?<![\d.]){re.escape(address)}(?![\d.])", seen):
                return (
                    f"{address} is kind node {node}'s own address: the connection left with the"
                    " node's address, not the source IP (masqueraded on the gateway node? see"
                    " `iptables-save -t nat` of the gateway node in the e2e diagnostics)"
                )
        return ""


@dataclass
class State:
    """The cluster that is up right now, for the failure diagnostics."""

    live: Kind | None = None
    dumped: bool = False
    artifacts: Path | None = field(
        default_factory=lambda: Path(p) if (p := os.environ.get("EXTCONN_E2E_ARTIFACTS")) else None
    )

    def diagnose(self) -> str | None:
        """Full diagnostics the first time (also written to EXTCONN_E2E_ARTIFACTS, with
        `kind export logs`), a short view after that; None when no cluster is up."""
        kind = self.live
        if kind is None:
            return None
        brief = self.dumped
        self.dumped = True
        text = Diagnostics(kind).collect(brief=brief)
        if not brief and self.artifacts is not None:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            (self.artifacts / "diagnostics.txt").write_text(text + "\n")
            try:
                run(
                    [
                        kind.tools.kind,
                        "export",
                        "logs",
                        str(self.artifacts / "kind-logs"),
                        "--name",
                        kind.name,
                    ],
                    timeout=300,
                )
            except CommandError as error:
                text += f"\n(kind export logs failed: {error})"
            text += f"\n(written to {self.artifacts}, with `kind export logs`)"
        return text if not brief else "(full diagnostics: the first failure's)\n" + text


STATE = State()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def bring_up(kind: Kind, cleanup: Cleanup) -> Walkthrough:
    say, tools = kind.say, kind.tools
    kubeconfig = str(kind.kubeconfig)
    log = kind.workdir / "bring-up.log"

    # 1. image, cluster, chart --------------------------------------------------------------
    say(f"building {IMAGE} from {ROOT} (docker build; output in {log})")
    run_logged([tools.docker, "build", "-t", IMAGE, str(ROOT)], log, timeout=BUILD_TIMEOUT)

    # Pushed first, so it runs last, after the containers are gone (EXTCONN_E2E_KEEP=1
    # cancels the whole clean-up instead).
    cleanup.push(
        f"kind cluster {kind.name}",
        lambda: run(
            [tools.kind, "delete", "cluster", "--name", kind.name, "--kubeconfig", kubeconfig],
            timeout=300,
        ),
    )
    create = [
        tools.kind, "create", "cluster", "--name", kind.name, "--config", str(KIND_CONFIG),
        "--kubeconfig", kubeconfig, "--wait", "300s",
    ]  # fmt: skip
    if node_image := os.environ.get("EXTCONN_E2E_NODE_IMAGE"):
        create += ["--image", node_image]
    say(f"creating kind cluster {kind.name} (1 control plane, 2 workers; kubeconfig {kubeconfig})")
    run_logged(create, log, timeout=CLUSTER_TIMEOUT)
    STATE.live = kind
    say(f"kind load docker-image {IMAGE}")
    run_logged([tools.kind, "load", "docker-image", IMAGE, "--name", kind.name], log, timeout=600)
    helm = [
        tools.helm, "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
        "--create-namespace", "--wait", "--timeout", f"{HELM_TIMEOUT:.0f}s",
        "--kubeconfig", kubeconfig,
        "--set", "image.repository=k8s-ext-connector",
        "--set", "image.tag=e2e",
        "--set", "image.pullPolicy=Never",
    ]  # fmt: skip
    say(f"user: $ {shlex.join(['helm', *helm[1:]]).replace(str(ROOT) + '/', '')}")
    run_logged(helm, log, timeout=HELM_TIMEOUT + 60)

    # 2. the external server and a stranger on kind's network --------------------------------
    for name in (kind.server, kind.stranger):
        cleanup.push(
            f"container {name}",
            lambda name=name: kind.docker("rm", "-f", name, check=False),  # type: ignore[misc]
        )
    say(
        f"external server {kind.server}: the echo server on :{TARGET_PORT}, logging each"
        f" client's address to {SERVER_LOG} (the seed's SimpleHTTPServer | tee access.log)"
    )
    kind.docker(
        "run", "-d", "--name", kind.server, "--network", KIND_NETWORK,
        "--label", f"extconn-e2e={kind.name}", "--entrypoint", "python", IMAGE,
        "-m", "k8s_ext_connector.lab.echo_server", "--port", str(TARGET_PORT),
        "--log", SERVER_LOG,
    )  # fmt: skip
    kind.docker(
        "run", "-d", "--name", kind.stranger, "--network", KIND_NETWORK,
        "--label", f"extconn-e2e={kind.name}", "--entrypoint", "python", IMAGE,
        "-c", "import signal; signal.pause()",
    )  # fmt: skip
    until(
        lambda: "listening" in kind.docker("logs", kind.server, check=False).stdout,
        60,
        f"the external server {kind.server} to listen",
    )
    subnet, used = kind_ipv4_network(kind.docker("network", "inspect", KIND_NETWORK).stdout)
    target_ip = _container_ip(kind, kind.server)
    source_ips = tuple(free_addresses(subnet, used, 2))
    node_ips = {node: _container_ip(kind, node) for node in _nodes(kind)}
    say(f"kind network {subnet}: targetIP {target_ip}, sourceIPs {', '.join(source_ips)}")

    # 3. the gateway node -----------------------------------------------------------------------
    node = kind.gateway_node
    for address in source_ips:
        say(f"gateway node {node}: $ ip addr add {address}/32 dev eth0")
        kind.docker("exec", node, "ip", "addr", "add", f"{address}/32", "dev", "eth0")
    kind.user("label", "node", node, GATEWAY_LABEL)

    # 4. the seed's namespaces, Services, ExternalService and pods -----------------------------
    for namespace in NAMESPACES:
        kind.user("create", "namespace", namespace)
    kind.user("label", "namespace", *NAMESPACES, INJECTION_LABEL)
    for pod in SOURCE_PODS:
        kind.apply(
            service_manifest(pod),
            show=f"kubectl expose pod {pod.name} --name={pod.service} -n {pod.namespace}"
            " --port=80  # as a Service manifest, before the pod exists",
        )
    es_manifest = externalservice_manifest(target_ip, source_ips)
    kind.apply(
        es_manifest,
        show=f"kubectl create -f my-externalservice.yaml  # targetIP {target_ip},"
        f" sourceIPs {', '.join(source_ips)}",
    )

    def es() -> Obj | None:
        return kind.get(ES_PLURAL, ES_NAME, ES_NAMESPACE)

    def gateway_assigned() -> bool:
        conditions = ((es() or {}).get("status") or {}).get("conditions") or []
        return any(
            c.get("type") == "GatewayAssigned" and c.get("status") == "True" for c in conditions
        )

    _until_es(kind, gateway_assigned, f"GatewayAssigned=True (node {node} labelled and Ready)")
    for pod in SOURCE_PODS:
        for kind_name, name in operator_objects(pod):
            until(
                lambda k=kind_name, n=name, ns=pod.namespace: kind.exists(k, n, ns),  # type: ignore[misc]
                ES_READY_TIMEOUT,
                f"the operator's {kind_name} {pod.namespace}/{name}",
            )
    for pod in PODS:
        _create_pod(kind, pod)
    for pod in PODS:
        until(
            lambda pod=pod: pod_ready(kind.get("pod", pod.name, pod.namespace)),  # type: ignore[misc]
            POD_READY_TIMEOUT,
            f"pod {pod.namespace}/{pod.name} Ready",
        )
    _until_es(kind, lambda: es_ready(es()), "READY 2/2")
    say(
        "READY; `kubectl get externalservices`:\n"
        + kind.kubectl("get", ES_PLURAL, "-n", ES_NAMESPACE)
    )
    return Walkthrough(kind, target_ip, source_ips, node_ips)


def _until_es(kind: Kind, check: Callable[[], bool], what: str) -> None:
    try:
        until(check, ES_READY_TIMEOUT, f"ExternalService {ES_NAMESPACE}/{ES_NAME} {what}")
    except AssertionError as error:
        es = kind.get(ES_PLURAL, ES_NAME, ES_NAMESPACE)
        raise AssertionError(f"{error}; its status: {es_summary(es)}") from None


def _create_pod(kind: Kind, pod: SeedPod) -> None:
    """Pods come after the ExternalService: the webhook injects those a source selects when
    they are created. A server-side dry run asks the webhook first (it has no side effects),
    until its watch cache has caught up; then the pod is created for real."""
    manifest = pod_manifest(pod, kind.pod_node)
    text = json.dumps(manifest)
    if pod.service is not None:

        def injected() -> bool:
            result = kind.kubectl_result(
                "create", "--dry-run=server", "-o", "json", "-f", "-", stdin=text
            )
            return result.returncode == 0 and has_sidecar(json.loads(result.stdout))

        until(injected, 120, f"the webhook to inject a dry-run of {pod.namespace}/{pod.name}")
    kind.user(
        "create",
        "-f",
        "-",
        stdin=text,
        show=f"kubectl run {pod.name} -n {pod.namespace} --labels=app={pod.labels['app']}"
        f" --image={IMAGE} -- python -m k8s_ext_connector.lab.echo_server --port 80"
        f"  # on {kind.pod_node}",
    )
    stored = kind.get("pod", pod.name, pod.namespace) or {}
    how = "WITH the ext-connector sidecar" if has_sidecar(stored) else "as is (not injected)"
    kind.say(f"pod {pod.namespace}/{pod.name} created {how}")


def _container_ip(kind: Kind, container: str) -> str:
    template = '{{(index .NetworkSettings.Networks "' + KIND_NETWORK + '").IPAddress}}'
    address = kind.docker("inspect", "-f", template, container).stdout.strip()
    if not address:
        raise AssertionError(f"container {container} has no address on the {KIND_NETWORK} network")
    return address


def _nodes(kind: Kind) -> list[str]:
    result = run([kind.tools.kind, "get", "nodes", "--name", kind.name], timeout=60)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]
