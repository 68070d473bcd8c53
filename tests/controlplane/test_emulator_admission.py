"""The emulator's admission harness (``emulator.admission``), which the lab still uses to
stand in for the API server's webhook calls: selectors, rules, the review, patches,
failure policies, reinvocation. The real webhook's admission tests run on the upstream
API server (test_admission.py); these go when the emulator does.
"""

from __future__ import annotations

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
from aiohttp import web

from k8s_ext_connector.certs.tls import Issued, issue_serving_cert, write_pair
from k8s_ext_connector_testbed.emulator import ApiServer, admission
from tests.webhook.harness import LoopThread, loop_thread, new_ca

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
