"""The real webhook behind the upstream API server, as a cluster runs it.

One control plane per module, inside a test network namespace (realcluster.py): the chart
is installed with ``helm install`` (OpenAPI validation on), the chart's ``certs sync``
issues the serving pair and writes the caBundle with the certs ServiceAccount's token, and
``k8s-ext-connector webhook``'s ``serve`` runs on a thread in that namespace with the
webhook ServiceAccount's token, reached through the chart's Service and an EndpointSlice.
The API server itself calls it (TLS verified with that caBundle for the Service's DNS
name), applies the patch, then runs its own validation and Pod Security on the result.
Each test has its own namespaces.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from k8s_ext_connector.lab.netns import call_in_netns
from k8s_ext_connector.operator import rbac
from k8s_ext_connector.operator.snapshot import SIDECAR_CONTAINER
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.main import WebhookCommand, serve
from k8s_ext_connector.webhook.server import WebhookServer
from tests.chart.helm import RELEASE_NAMESPACE
from tests.controlplane.realcluster import (
    FULLNAME,
    WEBHOOK_IP,
    WEBHOOK_SERVICE,
    NetnsCluster,
    netns_cluster,
)
from tests.polling import wait_for
from tests.unit.samples import SEED_MANIFEST
from tests.webhook.harness import LoopThread

pytestmark = [pytest.mark.kube, pytest.mark.root, pytest.mark.timeout(300)]
IMAGE = "registry.example/k8s-ext-connector:test"
INJECTION = {"external-service-injection": "enabled"}
INJECTED = "ext-connector.submariner.io/injected"
REQUESTS_METRIC = "k8s_ext_connector_webhook_admission_requests_total"
Obj = dict[str, Any]
_tenants = itertools.count()


@dataclass
class Cluster:
    net: NetnsCluster
    ca: bytes  # the caBundle `certs sync` wrote
    loop: LoopThread
    server: WebhookServer | None = None
    stop: asyncio.Event | None = None
    serving: Any = None
    own_namespace_sources: bool = False

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.net.ok(*args, stdin=stdin)

    def apply(self, obj: Obj) -> None:
        self.net.apply(obj)

    def pod(self, namespace: str, name: str) -> Obj:
        pod = self.net.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        assert pod is not None, f"pod {namespace}/{name} was not stored"
        return pod

    def run_pod(self, namespace: str, name: str, labels: str = "app=my-app") -> Obj:
        self.kubectl("run", name, "-n", namespace, "--image=busybox", f"--labels={labels}")
        return self.pod(namespace, name)

    def sees(self, namespace: str, labels: dict[str, str]) -> bool:
        """Whether the webhook's own cache has a source selecting such a pod yet."""
        assert self.server is not None
        index = self.server.index
        pod = {"metadata": {"namespace": namespace, "labels": labels}}
        return bool(self.loop.call(lambda: index.sources_for(pod)))

    def https_get(self, path: str) -> bytes:
        """GET over TLS at the webhook's endpoint, verified as the API server verifies it:
        the caBundle and the Service's DNS name."""
        assert self.server is not None
        port = self.server.port
        context = ssl.create_default_context(cadata=self.ca.decode())

        def call() -> bytes:
            with (
                socket.create_connection((WEBHOOK_IP, port), timeout=5) as raw,
                context.wrap_socket(
                    raw, server_hostname=f"{WEBHOOK_SERVICE}.{RELEASE_NAMESPACE}.svc"
                ) as tls,
            ):
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                chunks = []
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

        return call_in_netns(self.net.netns, call)

    def reviews(self) -> int:
        """AdmissionReviews the webhook has answered (its own metric)."""
        body = self.https_get("/metrics").decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in body.splitlines()
            if line.startswith(REQUESTS_METRIC + "{")
        )

    def start_webhook(self, own_namespace_sources: bool = False) -> None:
        command = WebhookCommand(
            tls_dir=self.net.workdir / "tls",
            host=WEBHOOK_IP,
            port=0,  # any free port (the flag itself insists on 1-65535)
            kubeconfig=str(self.net.service_account("webhook")),
            injection=InjectionSettings(image=IMAGE),
            drain_seconds=0,
            log_level="info",
            own_namespace_sources=own_namespace_sources,
        )
        started: list[WebhookServer] = []
        self.stop = self.loop.call(asyncio.Event)
        self.serving = asyncio.run_coroutine_threadsafe(
            serve(command, self.stop, started.append), self.loop.loop
        )
        wait_for(lambda: started, what="the webhook to listen")
        self.server = started[0]
        self.own_namespace_sources = own_namespace_sources
        self.net.point_webhook_service_at(self.server.port)
        wait_for(
            lambda: self.https_get("/readyz").startswith(b"HTTP/1.1 200"),
            timeout=30,
            what="the webhook to be ready (cache synced under its own token)",
        )
        # The API server learns the endpoint (and the caBundle) through its informers:
        # a server-side dry run in an opted-in namespace reaches the webhook once it has.
        before = self.reviews()

        def called() -> bool:
            self.net.kubectl(
                "run", "probe", "-n", "webhook-probe", "--image=busybox", "--dry-run=server"
            )
            return self.reviews() > before

        wait_for(called, timeout=30, interval=0.2, what="the API server calling the webhook")

    def stop_webhook(self) -> None:
        if self.stop is not None and self.serving is not None:
            self.loop.loop.call_soon_threadsafe(self.stop.set)
            self.serving.result(10)
        self.stop = self.serving = self.server = None


@pytest.fixture(scope="module")
def installed() -> Iterator[Cluster]:
    with netns_cluster("adm") as net:
        net.install()
        ca = net.certs_sync_once()
        net.write_serving_pair(net.workdir / "tls")
        net.namespace("webhook-probe", INJECTION)
        # A loop thread started from a thread in the namespace is in it too (and so is
        # every socket the webhook opens: its listener and its watches).
        loop = call_in_netns(net.netns, LoopThread)
        cluster = Cluster(net, ca, loop)
        try:
            yield cluster
        finally:
            cluster.stop_webhook()
            loop.close()


@pytest.fixture
def cluster(installed: Cluster) -> Cluster:
    """The module's cluster with the webhook serving as the chart configures it."""
    if installed.server is None or installed.own_namespace_sources:
        installed.stop_webhook()
        installed.start_webhook()
    return installed


@dataclass
class Tenant:
    """An opted-in namespace and a plain one, each with a source Service selecting
    app=my-app, and a third for the ExternalService: the seed's ns1, ns2 and default."""

    labelled: str
    plain: str
    home: str

    def seed(self) -> str:
        return SEED_MANIFEST.replace("namespace: ns1", f"namespace: {self.labelled}").replace(
            "namespace: ns2", f"namespace: {self.plain}"
        )


@pytest.fixture
def tenant(cluster: Cluster) -> Iterator[Tenant]:
    n = next(_tenants)
    t = Tenant(f"t{n}-ns1", f"t{n}-ns2", f"t{n}-home")
    cluster.net.namespace(t.labelled, INJECTION)
    cluster.net.namespace(t.plain)
    cluster.net.namespace(t.home)
    for ns, name in ((t.labelled, "my-service1"), (t.plain, "my-service2")):
        cluster.apply(service(ns, name, {"app": "my-app"}))
    yield t
    for ns in (t.labelled, t.plain, t.home):
        cluster.net.kubectl("delete", "namespace", ns, "--wait=false")


def service(namespace: str, name: str, selector: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector, "ports": [{"port": 80}]},
    }


def sidecars(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    return [
        c
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]
        if c["name"] == SIDECAR_CONTAINER
    ]


def apply_seed(cluster: Cluster, tenant: Tenant) -> None:
    cluster.kubectl("apply", "-n", tenant.home, "-f", "-", stdin=tenant.seed())
    wait_for(lambda: cluster.sees(tenant.labelled, {"app": "my-app"}), what="the ExternalService")


def test_pod_in_labelled_namespace_gets_the_sidecar(cluster: Cluster, tenant: Tenant) -> None:
    apply_seed(cluster, tenant)
    pod = cluster.run_pod(tenant.labelled, "my-pod")
    (sidecar,) = sidecars(pod)
    assert pod["spec"]["initContainers"][0]["name"] == SIDECAR_CONTAINER
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    assert pod["metadata"]["annotations"][INJECTED] == "my-service1"
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {
        "ext-connector-config",
        "ext-connector-key",
    }
    assert pod["spec"]["containers"][0]["name"] == "my-pod"  # the app, untouched


def test_unlabelled_namespace_is_not_injected(cluster: Cluster, tenant: Tenant) -> None:
    apply_seed(cluster, tenant)
    wait_for(lambda: cluster.sees(tenant.plain, {"app": "my-app"}), what="the ExternalService")
    assert sidecars(cluster.run_pod(tenant.plain, "my-pod")) == []


def test_pods_no_source_selects_are_not_injected(cluster: Cluster, tenant: Tenant) -> None:
    assert sidecars(cluster.run_pod(tenant.labelled, "before-any-externalservice")) == []
    apply_seed(cluster, tenant)
    assert sidecars(cluster.run_pod(tenant.labelled, "other-app", labels="app=other")) == []
    assert len(sidecars(cluster.run_pod(tenant.labelled, "now-selected"))) == 1


def deployment(namespace: str, name: str, labels: dict[str, str]) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        },
    }


def deployment_pod(cluster: Cluster, namespace: str) -> Obj:
    """The one Pod the controllers made for the namespace's Deployment."""

    def made() -> Obj | None:
        items = (cluster.net.get(f"/api/v1/namespaces/{namespace}/pods") or {}).get("items")
        return items[0] if items else None

    pod = wait_for(made, timeout=60, interval=0.2, what=f"the Deployment's pod in {namespace}")
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    return pod


def test_a_deployments_pods_come_out_injected_in_a_labelled_namespace_only(
    cluster: Cluster, tenant: Tenant
) -> None:
    """Deployment -> ReplicaSet -> Pod by the real controllers; the API server calls the
    webhook over TLS with the caBundle certs sync wrote and stores the patched pod only
    after its own validation passed."""
    apply_seed(cluster, tenant)
    for namespace in (tenant.labelled, tenant.plain):
        cluster.apply(deployment(namespace, "web", {"app": "my-app"}))
    injected = deployment_pod(cluster, tenant.labelled)
    (sidecar,) = sidecars(injected)
    assert injected["metadata"]["annotations"][INJECTED] == "my-service1"
    assert sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    # Defaulted by the server after the patch, as for any container it validates, and
    # given the pod's ServiceAccount token by the ServiceAccount plugin (reinvoked).
    assert sidecar["terminationMessagePolicy"] == "File"
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in {
        m["mountPath"] for m in sidecar["volumeMounts"]
    }
    untouched = deployment_pod(cluster, tenant.plain)
    assert sidecars(untouched) == []
    assert INJECTED not in (untouched["metadata"].get("annotations") or {})
    # The caBundle the API server verified the webhook with is still the one certs sync wrote.
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULLNAME}"
    configuration = cluster.net.get(path)
    assert configuration is not None
    bundle = configuration["webhooks"][0]["clientConfig"]["caBundle"]
    assert bundle == base64.b64encode(cluster.ca).decode()


def one_source_es(
    name: str, namespace: str, target: str, source: tuple[str, str], source_ip: str
) -> Obj:
    """An ExternalService with one source Service and port 5432."""
    return {
        "apiVersion": "submariner.io/v1alpha1",
        "kind": "ExternalService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "targetIP": target,
            "sources": [
                {"service": {"namespace": source[0], "name": source[1]}, "sourceIP": source_ip}
            ],
            "ports": [{"protocol": "TCP", "port": 5432}],
        },
    }


def test_a_refused_externalservice_never_injects_another_tenants_pods(
    cluster: Cluster, tenant: Tenant
) -> None:
    """Issue 18 item 1: another tenant's ExternalService names the victim's Service, in a
    cluster whose operator and webhook run with --own-namespace-sources. The victim's pod
    starts without a patch; the refusal the operator records (here NodeAddress, which only
    it can judge) stops injection too; a valid ExternalService next to them still injects.

    On the real server the CRD already refuses the emulator-era attack (targetIP
    127.0.0.1) at apply; the attacker's ExternalService here is valid to the schema and
    refused only by the own-namespace rule."""
    cluster.stop_webhook()
    cluster.start_webhook(own_namespace_sources=True)
    victim_ns, attacker_ns = tenant.labelled, tenant.home
    victim_service = (victim_ns, "my-service1")
    loopback = cluster.net.kubectl(
        "apply", "-f", "-",
        stdin=yaml.safe_dump(
            one_source_es("loopback", attacker_ns, "127.0.0.1", victim_service, "203.0.113.9")
        ),
    )  # fmt: skip
    assert loopback.returncode != 0
    assert "spec.targetIP: Invalid value" in loopback.stderr
    assert "targetIP 127.0.0.1 is a reserved address" in loopback.stderr
    cluster.apply(
        one_source_es("attack", attacker_ns, "203.0.113.10", victim_service, "203.0.113.9")
    )
    # Refused by the operator for NodeAddress (recorded for this generation).
    cluster.apply(
        one_source_es("node-address", victim_ns, "203.0.113.10", victim_service, "203.0.113.1")
    )
    stored = cluster.net.get(
        f"/apis/submariner.io/v1alpha1/namespaces/{victim_ns}/externalservices/node-address"
    )
    assert stored is not None
    generation = stored["metadata"]["generation"]
    refusal = {
        "status": {
            "observedGeneration": generation,
            "conditions": [
                {
                    "type": "Accepted",
                    "status": "False",
                    "reason": "NodeAddress",
                    "message": "spec.sources[0].sourceIP: 203.0.113.1 is an address of node n1",
                    "observedGeneration": generation,
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                }
            ],
        }
    }
    cluster.kubectl(
        "patch", "externalservice", "node-address", "-n", victim_ns, "--subresource=status",
        "--type=merge", "-p", json.dumps(refusal),
    )  # fmt: skip
    # A valid one for another Service, applied last: once the webhook sees it, it has seen
    # (and refused) the two before it, as watch events arrive in order.
    cluster.apply(service(victim_ns, "fine", {"app": "fine"}))
    cluster.apply(
        one_source_es("valid", victim_ns, "203.0.113.10", (victim_ns, "fine"), "203.0.113.7")
    )
    wait_for(lambda: cluster.sees(victim_ns, {"app": "fine"}), what="the valid ExternalService")
    assert not cluster.sees(victim_ns, {"app": "my-app"})
    victim = cluster.run_pod(victim_ns, "victim")
    assert sidecars(victim) == []
    assert INJECTED not in (victim["metadata"].get("annotations") or {})
    assert not any("ext-connector" in v["name"] for v in victim["spec"].get("volumes") or [])
    assert len(sidecars(cluster.run_pod(victim_ns, "fine-pod", labels="app=fine"))) == 1


def test_deleted_externalservice_stops_injection(cluster: Cluster, tenant: Tenant) -> None:
    apply_seed(cluster, tenant)
    cluster.kubectl("delete", "externalservice", "my-externalservice", "-n", tenant.home)
    wait_for(lambda: not cluster.sees(tenant.labelled, {"app": "my-app"}), what="the deletion")
    assert sidecars(cluster.run_pod(tenant.labelled, "after-delete")) == []


def test_webhook_down_pods_start_without_sidecar(cluster: Cluster, tenant: Tenant) -> None:
    """failurePolicy: Ignore: the API server cannot reach the webhook and admits the pod."""
    apply_seed(cluster, tenant)
    cluster.stop_webhook()
    assert sidecars(cluster.run_pod(tenant.labelled, "during-outage")) == []


def test_the_connectors_own_pods_are_never_sent(cluster: Cluster, tenant: Tenant) -> None:
    """The configuration's objectSelector, evaluated by the API server: no review at all."""
    apply_seed(cluster, tenant)
    before = cluster.reviews()
    labels = "app=my-app,app.kubernetes.io/name=k8s-ext-connector"
    assert sidecars(cluster.run_pod(tenant.labelled, "connector", labels=labels)) == []
    assert cluster.reviews() == before
    # An injected pod is reviewed twice: the ServiceAccount plugin mounts the token into
    # the new container, and reinvocationPolicy IfNeeded calls the webhook again.
    assert len(sidecars(cluster.run_pod(tenant.labelled, "not-ours"))) == 1
    assert cluster.reviews() == before + 2


# Granted to every authenticated user by the default ClusterRoles (system:basic-user ...).
DEFAULT_GRANTS = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
    ("authentication.k8s.io", "selfsubjectreviews", "create"),
}


def test_the_webhook_runs_under_its_own_token_with_exactly_the_charts_rules(
    cluster: Cluster, tenant: Tenant
) -> None:
    """Its cache synced under the webhook ServiceAccount (the fixture waited for /readyz):
    the rules suffice. The server's own view of what that token may do is the rendered
    rules and nothing more, and a call outside them is a real 403."""
    kubeconfig = cluster.net.service_account("webhook")
    whoami = json.loads(cluster.net.ok("auth", "whoami", "-o", "json", kubeconfig=kubeconfig))
    assert whoami["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}-webhook"
    )
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": tenant.labelled},
    }
    answer = json.loads(
        cluster.net.ok(
            "create",
            "--validate=false",
            "-o",
            "json",
            "-f",
            "-",
            stdin=json.dumps(review),
            kubeconfig=kubeconfig,
        )
    )
    allowed = {
        (group, resource, verb)
        for rule in answer["status"]["resourceRules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }
    granted = {
        (rule.group, rule.resource, verb)
        for rule in rbac.WEBHOOK_CLUSTER_RULES
        for verb in rule.verbs
    }
    assert allowed - DEFAULT_GRANTS == granted
    denied = cluster.net.kubectl("get", "secrets", "-n", tenant.labelled, kubeconfig=kubeconfig)
    assert denied.returncode == 1
    assert (
        f'User "system:serviceaccount:{RELEASE_NAMESPACE}:{FULLNAME}-webhook" cannot list'
        ' resource "secrets"' in denied.stderr
    )


def test_the_write_guard_refuses_the_operators_writes_to_objects_it_does_not_own(
    cluster: Cluster, tenant: Tenant
) -> None:
    """The chart's ValidatingAdmissionPolicy, enforced by the server for the operator's
    ServiceAccount (which RBAC lets write Services, ConfigMaps and Secrets anywhere)."""
    operator = cluster.net.service_account("operator")
    ns = tenant.labelled
    users = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "users", "namespace": ns},
        "data": {"k": "v"},
    }
    cluster.apply(users)  # the administrator's, without the operator's label

    def as_operator(method: str, path: str, body: Obj | None = None) -> tuple[int, str]:
        status, answer = cluster.net.call_as(
            operator, method, f"/api/v1/namespaces/{ns}/{path}", body,
            "application/merge-patch+json" if method == "PATCH" else "application/json",
        )  # fmt: skip
        return status, str(answer.get("message", ""))

    ours = {"app.kubernetes.io/managed-by": "k8s-ext-connector"}
    take_over = {"metadata": {"labels": ours}}

    def take_over_refused() -> str | None:
        status, message = as_operator("PATCH", "configmaps/users", take_over)
        assert status != 200, "the operator took over the user's ConfigMap"
        return message if "ValidatingAdmissionPolicy" in message else None

    # The policy takes effect once the server's policy informer has it (at install).
    refused = wait_for(take_over_refused, timeout=30, interval=0.5, what="the write guard")
    assert "ValidatingAdmissionPolicy 'k8s-ext-connector-operator-writes'" in refused
    assert "the operator may only change or delete objects it created" in refused
    status, message = as_operator("DELETE", "configmaps/users")
    assert status == 403
    assert "the operator may only change or delete objects it created" in message
    status, message = as_operator(
        "POST", "configmaps", {**users, "metadata": {"name": "mine", "namespace": ns}}
    )
    assert status == 403
    assert "carry app.kubernetes.io/managed-by=k8s-ext-connector" in message
    exposed = service(ns, "exposed", {"app": "x"})
    exposed["metadata"]["labels"] = ours
    exposed["spec"]["type"] = "NodePort"
    status, message = as_operator("POST", "services", exposed)
    assert status == 403
    assert "Services are type ClusterIP without externalIPs" in message
    status, message = as_operator(
        "POST", "secrets",
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": "opaque", "namespace": ns, "labels": ours}},
    )  # fmt: skip
    assert status == 403
    assert "Secrets are of type kubernetes.io/ssh-auth" in message
    # Its own kind of object is allowed, and RBAC still refuses what it never needs.
    status, message = as_operator(
        "POST",
        "configmaps",
        {**users, "metadata": {"name": "mine", "namespace": ns, "labels": ours}},
    )
    assert status == 201, message
    status, message = as_operator("GET", "secrets")
    assert status == 403
    assert 'cannot list resource "secrets"' in message
    assert cluster.net.get(f"/api/v1/namespaces/{ns}/configmaps/users") is not None


def test_pod_security_baseline_and_restricted_refuse_injected_pods_naming_the_sidecar(
    cluster: Cluster, tenant: Tenant
) -> None:
    """Pod Security runs after the webhooks, on the injected pod: at baseline or restricted
    a selected pod is refused, and the message names the injected container and the two
    capabilities (docs/injection.md "Pod Security" has the fix: privileged for that
    namespace). A pod no ExternalService selects is not injected and still admitted."""
    apply_seed(cluster, tenant)
    ns = tenant.labelled
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=baseline")
    assert sidecars(cluster.run_pod(ns, "unselected", labels="app=other")) == []
    refused = cluster.net.kubectl(
        "run", "selected", "-n", ns, "--image=busybox", "--labels=app=my-app"
    )
    assert refused.returncode == 1
    assert (
        'pods "selected" is forbidden: violates PodSecurity "baseline:latest": non-default'
        ' capabilities (container "ext-connector" must not include "NET_ADMIN", "NET_RAW" in'
        " securityContext.capabilities.add)"
    ) in refused.stderr
    # At restricted, a Deployment's pods are refused to the ReplicaSet controller: the
    # reason is on the ReplicaSet (condition ReplicaFailure) and in its events.
    cluster.kubectl(
        "label", "namespace", ns, "--overwrite", "pod-security.kubernetes.io/enforce=restricted"
    )
    restricted_app = deployment(ns, "web", {"app": "my-app"})
    restricted_app["spec"]["template"]["spec"]["securityContext"] = {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    restricted_app["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    cluster.apply(restricted_app)

    def failure() -> str | None:
        items = (cluster.net.get(f"/apis/apps/v1/namespaces/{ns}/replicasets") or {}).get(
            "items"
        ) or []
        for replicaset in items:
            for condition in replicaset.get("status", {}).get("conditions") or []:
                if condition["type"] == "ReplicaFailure":
                    return str(condition["message"])
        return None

    message = wait_for(failure, timeout=60, interval=0.2, what="the ReplicaSet's failure")
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'container "ext-connector" must not include "NET_ADMIN", "NET_RAW"' in message
    assert 'container "ext-connector" must not set securityContext.runAsNonRoot=false' in message
    assert 'container "ext-connector" must not set runAsUser=0' in message
    pods = cluster.net.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=app%3Dmy-app")
    assert pods is not None
    assert pods["items"] == []
