"""Mutating admission webhooks for the emulator: the call the real API server makes.

The emulator has an ``admission_hook`` on Pod CREATE but no webhook dispatcher of its
own. This is the test harness supplying that missing behaviour: ``webhook_admission(api)``
returns a hook that, for each pod being created, does what kube-apiserver's mutating
admission does with the MutatingWebhookConfigurations stored in ``api``:

- configurations in name order, their webhooks in list order; a webhook is called when
  one of its ``rules`` covers Pod CREATE (v1 core ``pods``, ``*`` wildcards), its
  ``namespaceSelector`` matches the namespace's labels (with the
  ``kubernetes.io/metadata.name`` label the real server always sets) and its
  ``objectSelector`` matches the pod's labels (``matchLabels`` and ``matchExpressions``
  with In, NotIn, Exists, DoesNotExist);
- an ``admission.k8s.io/v1`` AdmissionReview POSTed over HTTPS to ``clientConfig.url``,
  or for ``clientConfig.service`` to the URL ``service_urls`` maps the
  ``(namespace, name)`` to (tests run the webhook on 127.0.0.1), plus the service's
  ``path``; the server is verified against the configuration's ``caBundle`` and, for a
  service, by the name ``<name>.<namespace>.svc`` as the real server does;
- ``timeoutSeconds`` (default 10); a response must echo the request's uid;
- ``allowed: false`` denies the create with the webhook's status (HTTP code and message);
- a ``JSONPatch`` is applied to the pod before the next webhook sees it;
- a failure to call the webhook (connection, TLS, timeout, HTTP error, bad answer) is
  skipped under ``failurePolicy: Ignore`` and fails the create (500) under ``Fail`` (the
  default, as in the real API);
- ``reinvocationPolicy: IfNeeded``: webhooks that ran before a later webhook changed the
  pod are called once more, in order.

Not emulated: ``matchConditions`` (CEL), ``matchPolicy`` conversions (pods have one
version), ``sideEffects`` checks for dryRun (the emulator refuses dryRun), and admission
of anything but Pod CREATE.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonpatch

from k8s_ext_connector_testbed.emulator.errors import ApiError
from k8s_ext_connector_testbed.emulator.server import AdmissionHook, ApiServer

Obj = dict[str, Any]
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}


@dataclass(frozen=True)
class _Webhook:
    configuration: str
    spec: Obj

    @property
    def name(self) -> str:
        return str(self.spec.get("name", ""))


def webhook_admission(
    api: ApiServer, service_urls: Mapping[tuple[str, str], str] | None = None
) -> AdmissionHook:
    """An ``AdmissionHook`` calling the webhooks configured in ``api`` (see the module)."""
    urls = dict(service_urls or {})

    async def admit(pod: Obj) -> Obj:
        namespace = str(pod["metadata"].get("namespace", ""))
        ns = api.get_object("", "v1", "namespaces", "", namespace) or {}
        ns_labels = {
            **((ns.get("metadata") or {}).get("labels") or {}),
            "kubernetes.io/metadata.name": namespace,
        }
        hooks = [
            hook
            for hook in _webhooks(api)
            if _covers_pod_create(hook.spec.get("rules") or [])
            and _selects(hook.spec.get("namespaceSelector"), ns_labels)
        ]
        called: list[tuple[int, _Webhook]] = []  # (order of the change it saw, hook)
        changes = 0
        for hook in hooks:
            if not _selects(hook.spec.get("objectSelector"), _labels(pod)):
                continue
            before = pod
            pod = await _call(hook, pod, urls)
            changes += pod != before
            called.append((changes, hook))
        for seen, hook in called:  # IfNeeded: called before a later webhook's change
            if (
                hook.spec.get("reinvocationPolicy") == "IfNeeded"
                and seen < changes
                and _selects(hook.spec.get("objectSelector"), _labels(pod))
            ):
                pod = await _call(hook, pod, urls)
        return pod

    return admit


def _webhooks(api: ApiServer) -> list[_Webhook]:
    configurations = sorted(
        api.list_objects("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations"),
        key=lambda c: str(c["metadata"]["name"]),
    )
    return [
        _Webhook(str(c["metadata"]["name"]), spec)
        for c in configurations
        for spec in c.get("webhooks") or []
    ]


def _labels(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _covers_pod_create(rules: list[Obj]) -> bool:
    def has(values: object, wanted: str) -> bool:
        return isinstance(values, list) and ("*" in values or wanted in values)

    return any(
        has(rule.get("operations"), "CREATE")
        and has(rule.get("apiGroups"), "")
        and has(rule.get("apiVersions"), "v1")
        and (has(rule.get("resources"), "pods") or has(rule.get("resources"), "*/*"))
        and rule.get("scope", "*") in ("*", "Namespaced")
        for rule in rules
    )


def _selects(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector; absent or empty selects everything."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        if not _expression(expression, labels):
            return False
    return True


def _expression(expression: Obj, labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = set(expression.get("values") or [])
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ApiError(500, "InternalError", f"unknown selector operator {operator!r}")


async def _call(hook: _Webhook, pod: Obj, urls: Mapping[tuple[str, str], str]) -> Obj:
    """Call one webhook; the pod it returns, or the failure policy's outcome."""
    uid = str(uuid.uuid4())
    try:
        response = await _post(hook, _review(pod, uid), urls)
        if response.get("uid") != uid:
            raise ValueError(f"the response's uid {response.get('uid')!r} is not {uid!r}")
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, ValueError, OSError) as error:
        if hook.spec.get("failurePolicy", "Fail") == "Ignore":
            return pod
        raise ApiError(
            500,
            "InternalError",
            f'Internal error occurred: failed calling webhook "{hook.name}": {error}',
        ) from error
    if not response.get("allowed"):
        status = response.get("status") or {}
        raise ApiError(
            int(status.get("code") or 400),
            str(status.get("reason") or "BadRequest"),
            f'admission webhook "{hook.name}" denied the request: {status.get("message", "")}',
        )
    if not response.get("patch"):
        return pod
    if response.get("patchType") != "JSONPatch":
        raise ApiError(500, "InternalError", f'webhook "{hook.name}": unknown patchType')
    patch = json.loads(base64.b64decode(response["patch"]))
    try:
        result: Obj = jsonpatch.apply_patch(pod, patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise ApiError(
            500, "InternalError", f'webhook "{hook.name}" returned a patch that fails: {error}'
        ) from error
    return result


def _review(pod: Obj, uid: str) -> Obj:
    meta = pod.get("metadata") or {}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": POD_KIND,
            "resource": POD_RESOURCE,
            "requestKind": POD_KIND,
            "requestResource": POD_RESOURCE,
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", ""),
            "operation": "CREATE",
            "userInfo": {"username": "emulator", "groups": ["system:authenticated"]},
            "object": copy.deepcopy(pod),
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def _post(hook: _Webhook, review: Obj, urls: Mapping[tuple[str, str], str]) -> Obj:
    config = hook.spec.get("clientConfig") or {}
    server_hostname: str | None = None
    if config.get("url"):
        url = str(config["url"])
    elif config.get("service"):
        service = config["service"]
        key = (str(service.get("namespace", "")), str(service.get("name", "")))
        if key not in urls:
            raise ValueError(f"no URL for service {key[0]}/{key[1]} (pass service_urls)")
        url = urls[key].rstrip("/") + str(service.get("path") or "")
        server_hostname = f"{key[1]}.{key[0]}.svc"
    else:
        raise ValueError("clientConfig has neither url nor service")
    bundle = config.get("caBundle")
    context = ssl.create_default_context(
        cadata=base64.b64decode(bundle).decode() if bundle else None
    )
    timeout = aiohttp.ClientTimeout(total=float(hook.spec.get("timeoutSeconds") or 10))
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            url,
            json=review,
            ssl=context,
            server_hostname=server_hostname,
            headers={"Accept": "application/json"},
        ) as reply,
    ):
        if reply.status != 200:
            text = (await reply.text())[:200]
            raise ValueError(f"HTTP {reply.status}: {text.strip()}")
        answer = await reply.json(content_type=None)
    if not isinstance(answer, dict) or not isinstance(answer.get("response"), dict):
        raise ValueError("the answer is not an AdmissionReview with a response")
    response: Obj = answer["response"]
    return response
