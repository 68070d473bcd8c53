"""The real webhook behind the emulated API server, as a cluster would run it.

The emulator stores MutatingWebhookConfigurations but does not call webhooks; the harness
``emulator.admission.webhook_admission`` makes the admission call the real API server
would make (AdmissionReview over HTTPS, server verified with the configuration's
caBundle and the Service's DNS name, JSON patch applied). Everything else is real: the
chart's MutatingWebhookConfiguration, ``k8s-ext-connector webhook``'s ``serve`` (its watch
cache lists and watches the emulator through KubeClient), and kubectl as the user.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from k8s_ext_connector.certs.tls import Issued, issue_serving_cert, write_pair
from k8s_ext_connector.emulator import ApiServer, admission
from k8s_ext_connector.emulator.admission import webhook_admission
from k8s_ext_connector.emulator.clients import run_kubectl
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.operator.snapshot import SIDECAR_CONTAINER
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.main import WebhookCommand, serve
from k8s_ext_connector.webhook.server import WebhookServer
from tests.polling import wait_for
from tests.unit.samples import SEED_MANIFEST
from tests.webhook.harness import (
    NAMESPACE,
    SERVICE,
    LoopThread,
    https,
    loop_thread,
    new_ca,
    write_serving_pair,
)

CHART = Path(__file__).parents[2] / "charts" / "k8s-ext-connector"
CRD = CHART / "crds" / "externalservices.submariner.io.yaml"
CONFIGURATION = CHART / "files" / "mutatingwebhookconfiguration.yaml"
IMAGE = "registry.example/k8s-ext-connector:test"


@dataclass
class Cluster:
    api: ApiServer
    kubeconfig: Path
    ca: Issued
    loop: LoopThread
    server: WebhookServer | None = None
    stop: asyncio.Event | None = None
    serving: Any = None

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = run_kubectl(self.kubeconfig, args, stdin)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(obj))

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        pod = self.api.get_object("", "v1", "pods", namespace, name)
        assert pod is not None, f"pod {namespace}/{name} was not stored"
        return pod

    def run_pod(self, namespace: str, name: str, labels: str = "app=my-app") -> dict[str, Any]:
        self.kubectl("run", name, "-n", namespace, "--image=busybox", f"--labels={labels}")
        return self.pod(namespace, name)

    def sees(self, namespace: str, labels: dict[str, str]) -> bool:
        """Whether the webhook's own cache has a source selecting such a pod yet."""
        assert self.server is not None
        index = self.server.index
        pod = {"metadata": {"namespace": namespace, "labels": labels}}
        return bool(self.loop.call(lambda: index.sources_for(pod)))


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [
        c
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]
        if c["name"] == SIDECAR_CONTAINER
    ]


def start_webhook(cluster: Cluster, tls_dir: Path, own_namespace_sources: bool = False) -> None:
    command = WebhookCommand(
        tls_dir=tls_dir,
        host="127.0.0.1",
        port=0,  # any free port (the flag itself insists on 1-65535)
        kubeconfig=str(cluster.kubeconfig),
        injection=InjectionSettings(image=IMAGE),
        drain_seconds=0,
        log_level="info",
        own_namespace_sources=own_namespace_sources,
    )
    started: list[WebhookServer] = []
    cluster.stop = cluster.loop.call(asyncio.Event)
    cluster.serving = asyncio.run_coroutine_threadsafe(
        serve(command, cluster.stop, started.append), cluster.loop.loop
    )
    wait_for(lambda: started, what="the webhook to listen")
    cluster.server = started[0]
    port = started[0].port
    url = f"https://127.0.0.1:{port}"
    cluster.api.admission_hook = webhook_admission(cluster.api, {(NAMESPACE, SERVICE): url})
    wait_for(
        lambda: https(port, cluster.ca, "GET", "/readyz").status == 200,
        what="the webhook to be ready (cache synced)",
    )


def stop_webhook(cluster: Cluster) -> None:
    if cluster.stop is not None and cluster.serving is not None:
        cluster.loop.loop.call_soon_threadsafe(cluster.stop.set)
        cluster.serving.result(10)
        cluster.stop = cluster.serving = None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The emulator with the CRD, an opted-in namespace ns1 and a plain one ns2 (each with a
    source Service selecting app=my-app), the chart's webhook configuration with its
    caBundle, and the webhook serving."""
    api = ApiServer()
    ca = new_ca("webhook-ca")
    tls_dir = tmp_path / "tls"
    write_serving_pair(tls_dir, ca)
    with api.run_in_thread(), loop_thread() as loop:
        c = Cluster(api, api.write_kubeconfig(tmp_path / "kubeconfig"), ca, loop)
        c.kubectl("apply", "-f", str(CRD))
        for ns in ("external-services", "ns1", "ns2"):
            c.kubectl("create", "ns", ns)
        c.kubectl("label", "ns", "ns1", "external-service-injection=enabled")
        for ns, name in (("ns1", "my-service1"), ("ns2", "my-service2")):
            c.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"selector": {"app": "my-app"}, "ports": [{"port": 80}]},
                }
            )
        configuration = yaml.safe_load(CONFIGURATION.read_text())
        configuration["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(
            ca.cert_pem
        ).decode()
        c.apply(configuration)
        start_webhook(c, tls_dir)
        try:
            yield c
        finally:
            stop_webhook(c)


def test_pod_in_labelled_namespace_gets_the_sidecar(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    pod = cluster.run_pod("ns1", "my-pod")
    (sidecar,) = sidecars(pod)
    assert pod["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    assert pod["metadata"]["annotations"]["ext-connector.submariner.io/injected"] == "my-service1"
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {
        "ext-connector-config",
        "ext-connector-key",
    }
    assert pod["spec"]["containers"][0]["name"] == "my-pod"  # the app, untouched


def test_unlabelled_namespace_is_not_injected(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns2", {"app": "my-app"}), what="the ExternalService")
    assert sidecars(cluster.run_pod("ns2", "my-pod")) == []


def test_pods_no_source_selects_are_not_injected(cluster: Cluster) -> None:
    assert sidecars(cluster.run_pod("ns1", "before-any-externalservice")) == []
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    assert sidecars(cluster.run_pod("ns1", "other-app", labels="app=other")) == []
    assert len(sidecars(cluster.run_pod("ns1", "now-selected"))) == 1


def one_source_es(
    name: str, namespace: str, target: str, service: str, source_ip: str
) -> dict[str, Any]:
    """An ExternalService with one source (a Service of ns1) and port 5432."""
    return {
        "apiVersion": "submariner.io/v1alpha1",
        "kind": "ExternalService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "targetIP": target,
            "sources": [{"service": {"namespace": "ns1", "name": service}, "sourceIP": source_ip}],
            "ports": [{"protocol": "TCP", "port": 5432}],
        },
    }


def test_a_refused_externalservice_never_injects_another_tenants_pods(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Issue 18 item 1: ns3 names ns1's Service with targetIP 127.0.0.1, in a cluster whose
    operator and webhook run with --own-namespace-sources. The victim's pod starts without
    a patch; the refusal the operator records (here NodeAddress, which only it can judge)
    stops injection too; a valid ExternalService next to them still injects."""
    stop_webhook(cluster)
    start_webhook(cluster, tmp_path / "tls", own_namespace_sources=True)
    cluster.kubectl("create", "ns", "ns3")
    cluster.apply(one_source_es("attack", "ns3", "127.0.0.1", "my-service1", "203.0.113.9"))
    # Refused by the operator for NodeAddress (recorded for this generation).
    cluster.apply(
        one_source_es("node-address", "ns1", "203.0.113.10", "my-service1", "203.0.113.1")
    )
    stored = cluster.api.get_object(
        "submariner.io", "v1alpha1", "externalservices", "ns1", "node-address"
    )
    assert stored is not None
    refusal = {
        "status": {
            "observedGeneration": stored["metadata"]["generation"],
            "conditions": [
                {
                    "type": "Accepted",
                    "status": "False",
                    "reason": "NodeAddress",
                    "message": "spec.sources[0].sourceIP: 203.0.113.1 is an address of node n1",
                    "observedGeneration": stored["metadata"]["generation"],
                }
            ],
        }
    }
    cluster.kubectl(
        "patch", "externalservice", "node-address", "-n", "ns1", "--subresource=status",
        "--type=merge", "-p", json.dumps(refusal),
    )  # fmt: skip
    # A valid one for another Service, applied last: once the webhook sees it, it has seen
    # (and refused) the two before it, as watch events arrive in order.
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "fine", "namespace": "ns1"},
            "spec": {"selector": {"app": "fine"}, "ports": [{"port": 80}]},
        }
    )
    cluster.apply(one_source_es("valid", "ns1", "203.0.113.10", "fine", "203.0.113.7"))
    wait_for(lambda: cluster.sees("ns1", {"app": "fine"}), what="the valid ExternalService")
    assert not cluster.sees("ns1", {"app": "my-app"})
    victim = cluster.run_pod("ns1", "victim")
    assert sidecars(victim) == []
    assert "ext-connector.submariner.io/injected" not in (
        victim["metadata"].get("annotations") or {}
    )
    assert not any(
        "ext-connector" in v["name"] for v in victim["spec"].get("volumes") or []
    )
    assert len(sidecars(cluster.run_pod("ns1", "fine-pod", labels="app=fine"))) == 1


def test_deleted_externalservice_stops_injection(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    cluster.kubectl("delete", "externalservice", "my-externalservice")
    wait_for(lambda: not cluster.sees("ns1", {"app": "my-app"}), what="the deletion")
    assert sidecars(cluster.run_pod("ns1", "after-delete")) == []


def test_webhook_down_pods_start_without_sidecar(cluster: Cluster) -> None:
    """failurePolicy: Ignore: an outage never blocks pod creation."""
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    stop_webhook(cluster)
    assert sidecars(cluster.run_pod("ns1", "during-outage")) == []


def test_the_connectors_own_pods_are_never_sent(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    labels = "app=my-app,app.kubernetes.io/name=k8s-ext-connector"
    assert sidecars(cluster.run_pod("ns1", "connector", labels=labels)) == []


# -- the harness itself: what the real API server does around a webhook ------------------

Obj = dict[str, Any]


def test_harness_selectors_and_rules() -> None:
    assert admission._selects(None, {})
    assert admission._selects({}, {"a": "b"})
    assert admission._selects({"matchLabels": {"a": "b"}}, {"a": "b", "c": "d"})
    assert not admission._selects({"matchLabels": {"a": "b"}}, {"a": "c"})
    for operator, values, labels, expected in [
        ("In", ["x", "y"], {"k": "y"}, True),
        ("In", ["x"], {}, False),
        ("NotIn", ["x"], {}, True),
        ("NotIn", ["x"], {"k": "x"}, False),
        ("Exists", [], {"k": ""}, True),
        ("DoesNotExist", [], {"k": ""}, False),
    ]:
        selector = {"matchExpressions": [{"key": "k", "operator": operator, "values": values}]}
        assert admission._selects(selector, labels) is expected, (operator, labels)
    pods = {
        "operations": ["CREATE"],
        "apiGroups": [""],
        "apiVersions": ["v1"],
        "resources": ["pods"],
    }
    assert admission._covers_pod_create([pods])
    assert admission._covers_pod_create([{**pods, "operations": ["*"], "resources": ["*/*"]}])
    assert not admission._covers_pod_create([{**pods, "operations": ["UPDATE"]}])
    assert not admission._covers_pod_create([{**pods, "resources": ["pods/status"]}])
    assert not admission._covers_pod_create([{**pods, "scope": "Cluster"}])


@dataclass
class Scripted:
    """A webhook on HTTPS answering ``answer(request)``; records what it was sent."""

    port: int
    seen: list[Obj]
    runner: web.AppRunner


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[tuple[ApiServer, LoopThread, Issued, Any]]:
    ca = new_ca()
    names = [f"{service}.hooks.svc" for service in ("hook", "deny", "first", "second")]
    write_pair(tmp_path / "tls", issue_serving_cert(ca, names, datetime.timedelta(hours=1)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key")
    runners: list[web.AppRunner] = []

    async def start(answer: Any) -> Scripted:
        seen: list[Obj] = []

        async def mutate(request: web.Request) -> web.Response:
            body = await request.json()
            seen.append(body["request"])
            response = {"uid": body["request"]["uid"], "allowed": True, **answer(body["request"])}
            return web.json_response(
                {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": response,
                }
            )

        app = web.Application()
        app.router.add_post("/{tail:.*}", mutate)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        runners.append(runner)
        return Scripted(int(runner.addresses[0][1]), seen, runner)

    api = ApiServer()
    with api.run_in_thread(), loop_thread() as loop:
        yield api, loop, ca, start
        for runner in runners:
            loop.run(runner.cleanup())


def configuration(name: str, ca: Issued | None, service: str = "hook", **webhook: Any) -> Obj:
    client: Obj = {"service": {"namespace": "hooks", "name": service, "path": "/mutate"}}
    if ca is not None:
        client["caBundle"] = base64.b64encode(ca.cert_pem).decode()
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": f"{name}.example.com",
                "clientConfig": client,
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                    }
                ],
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                **webhook,
            }
        ],
    }


def create_pod(api: ApiServer, name: str = "p", labels: Obj | None = None) -> tuple[int, Obj]:
    request = urllib.request.Request(
        f"{api.url}/api/v1/namespaces/default/pods",
        data=json.dumps(
            {
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            }
        ).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def delete_configuration(api: ApiServer, name: str) -> None:
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
    request = urllib.request.Request(api.url + path, method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def json_patch(*ops: Obj) -> Obj:
    return {"patchType": "JSONPatch", "patch": base64.b64encode(json.dumps(ops).encode()).decode()}


def test_harness_sends_a_review_and_applies_the_patch(scripted: Any) -> None:
    api, loop, ca, start = scripted
    hook = loop.run(
        start(lambda r: json_patch({"op": "add", "path": "/metadata/labels/x", "value": "1"}))
    )
    api.create_object(configuration("one", ca))
    api.admission_hook = admission.webhook_admission(
        api, {("hooks", "hook"): f"https://127.0.0.1:{hook.port}"}
    )
    status, pod = create_pod(api)
    assert status == 201
    assert pod["metadata"]["labels"] == {"x": "1"}
    (request,) = hook.seen
    assert request["operation"] == "CREATE"
    assert request["namespace"] == "default"
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["object"]["metadata"]["name"] == "p"


def test_harness_denial_and_failure_policies(scripted: Any) -> None:
    api, loop, ca, start = scripted
    deny = loop.run(
        start(lambda r: {"allowed": False, "status": {"code": 403, "message": "not today"}})
    )
    urls = {("hooks", "deny"): f"https://127.0.0.1:{deny.port}"}
    api.admission_hook = admission.webhook_admission(api, urls)
    api.create_object(configuration("deny", ca, service="deny"))
    status, body = create_pod(api, "denied")
    assert status == 403
    assert 'admission webhook "deny.example.com" denied' in body["message"]
    delete_configuration(api, "deny")
    # a CA that did not sign the server's certificate: TLS fails like an outage
    api.create_object(
        configuration("wrong-ca", new_ca("other"), service="deny", failurePolicy="Fail")
    )
    status, body = create_pod(api, "untrusted")
    assert status == 500
    assert 'failed calling webhook "wrong-ca.example.com"' in body["message"]
    delete_configuration(api, "wrong-ca")
    api.create_object(
        {
            **configuration("gone", None, failurePolicy="Ignore"),
            "webhooks": [
                {
                    **configuration("gone", None)["webhooks"][0],
                    "clientConfig": {"url": "https://127.0.0.1:9/mutate"},
                    "failurePolicy": "Ignore",
                }
            ],
        }
    )
    assert create_pod(api, "ignored")[0] == 201


def test_harness_reinvokes_if_needed(scripted: Any) -> None:
    api, loop, ca, start = scripted
    first = loop.run(start(lambda r: {}))
    second = loop.run(
        start(
            lambda r: (
                json_patch({"op": "add", "path": "/metadata/labels/late", "value": "y"})
                if "late" not in r["object"]["metadata"]["labels"]
                else {}
            )
        )
    )
    api.create_object(configuration("a-first", ca, service="first", reinvocationPolicy="IfNeeded"))
    api.create_object(configuration("b-second", ca, service="second"))
    api.admission_hook = admission.webhook_admission(
        api,
        {
            ("hooks", "first"): f"https://127.0.0.1:{first.port}",
            ("hooks", "second"): f"https://127.0.0.1:{second.port}",
        },
    )
    status, pod = create_pod(api)
    assert status == 201
    assert pod["metadata"]["labels"] == {"late": "y"}
    assert len(first.seen) == 2
    assert len(second.seen) == 1
    assert first.seen[1]["object"]["metadata"]["labels"] == {"late": "y"}


def test_webhook_requests_match_its_rbac(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=SEED_MANIFEST)
    wait_for(lambda: cluster.sees("ns1", {"app": "my-app"}), what="the ExternalService")
    cluster.run_pod("ns1", "my-pod")
    used = {
        (r.api_group, r.resource, r.verb)
        for r in cluster.api.requests
        if r.resource and r.user_agent.startswith("k8s-ext-connector")
    }
    granted = {
        (rule.group, rule.resource, verb)
        for rule in rbac.WEBHOOK_CLUSTER_RULES
        for verb in rule.verbs
    }
    assert used == granted
