"""Pure sidecar injection: ``inject(pod, context) -> pod``, and ``admission_patch`` from one to
the other.

What a pod gets, and why:

- the forwarder as a *native sidecar* (an init container with ``restartPolicy: Always``)
  whose startup probe passes only when its rules are applied and its SSH sessions are up:
  the kubelet starts the app only after that, so the app's first connection cannot leak
  out with the node's IP. Without native sidecars (Kubernetes < 1.29, ``native_sidecar``
  off) it becomes the first regular container with a ``postStart`` hook that waits for
  readiness, which holds the next containers back the same way;
- NET_ADMIN and NET_RAW (iptables) and nothing else: all other capabilities dropped, no
  privilege escalation, read-only root filesystem;
- its ConfigMap (``sidecar.yaml``) and key Secret, both ``optional`` so the pod starts
  even before the operator has written them (the sidecar waits for its config);
- requests and limits, and the downward API for its own name and namespace;
- the annotation ``ext-connector.submariner.io/injected`` naming what was injected.

Re-injecting an injected pod changes nothing (ours is recognised by shape and annotation,
``core/sidecar_identity.py``, not by name alone); a malformed pod (no spec, no containers,
a name of ours taken, a source-service annotation that is not a Service name) is skipped
with a warning (``malformed``); hostNetwork pods and pods annotated
``ext-connector.submariner.io/inject: "false"`` are skipped; ``"true"`` injects a pod that
no source service selects yet, given ``ext-connector.submariner.io/source-service`` names
the service whose config it will use (the sidecar waits until the operator writes it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.fields import DNS_1035_LABEL, DNS_LABEL
from k8s_ext_connector.core.sidecar_identity import (
    CONFIG_DIR,
    CONFIG_VOLUME,
    INJECTED_ANNOTATION,
    SIDECAR_CONTAINER,
    injected_sidecar,
)
from k8s_ext_connector.operator.desired import client_secret_name, sidecar_configmap_name

INJECT_ANNOTATION = "ext-connector.submariner.io/inject"
SOURCE_ANNOTATION = "ext-connector.submariner.io/source-service"
KEY_VOLUME = "ext-connector-key"
RUN_VOLUME = "ext-connector-run"
KEY_DIR = "/etc/ext-connector/key"
OUR_VOLUMES = (CONFIG_VOLUME, KEY_VOLUME, RUN_VOLUME)
# Reasons that start with this are warned about whenever the pod was to get the sidecar.
MALFORMED = "malformed pod"
# More containers, init containers or volumes than any real pod has: skipped unexamined,
# so that nothing the webhook does per pod grows with an attacker's list.
MAX_ITEMS = 1000


@dataclass(frozen=True)
class InjectionSettings:
    image: str = "ghcr.io/k8s-ext-connector/k8s-ext-connector:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    native_sidecar: bool = True
    health_port: int = 15021
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"


@dataclass(frozen=True)
class InjectionContext:
    """What the webhook knows about this pod: the source services that select it."""

    sources: tuple[ServiceRef, ...]
    settings: InjectionSettings = InjectionSettings()


def skip_reason(pod: Mapping[str, Any], context: InjectionContext) -> str | None:
    """Why ``pod`` is left alone, or None if it gets the sidecar."""
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    annotations = _mapping(meta.get("annotations"))
    wanted = annotations.get(INJECT_ANNOTATION)
    if wanted == "false":
        return f"annotation {INJECT_ANNOTATION}=false"
    if spec.get("hostNetwork"):
        return "hostNetwork pod: it shares the node's network namespace"
    if _within_limits(spec) and injected_sidecar(pod) is not None:
        return "already injected"
    named = annotations.get(SOURCE_ANNOTATION)
    if not context.sources and wanted != "true":
        return "no source service selects it"
    problem = malformed(pod)
    if problem is not None:
        return f"{MALFORMED}: {problem}"
    if not context.sources and not named:
        return (
            f"{INJECT_ANNOTATION}=true but no source service selects it: name one with "
            f"{SOURCE_ANNOTATION}"
        )
    return None


def malformed(pod: Mapping[str, Any]) -> str | None:
    """What makes ``pod`` unsafe to patch (the field and its value), or None.

    The API server validates the pod only after the mutating webhooks, so the webhook may
    see anything: a patch onto a missing or null list fails or builds an invalid pod, a
    name of ours already taken gives duplicate names, and an annotation value becomes part
    of a Secret's name.
    """
    meta, spec = pod.get("metadata"), pod.get("spec")
    if meta is not None and not isinstance(meta, Mapping):
        return f"metadata: {_short(meta)}: must be an object"
    annotations = (meta or {}).get("annotations")
    if annotations is not None and not isinstance(annotations, Mapping):
        return f"metadata.annotations: {_short(annotations)}: must be an object"
    namespace = (meta or {}).get("namespace", "")
    if not isinstance(namespace, str) or not DNS_LABEL.fullmatch(namespace):
        return f"metadata.namespace: {_short(namespace)}: must be a DNS label"
    named = (annotations or {}).get(SOURCE_ANNOTATION)
    if named is not None and (not isinstance(named, str) or not DNS_1035_LABEL.fullmatch(named)):
        return f"annotation {SOURCE_ANNOTATION}: {_short(named)}: must be a Service name"
    if not isinstance(spec, Mapping):
        return f"spec: {_short(spec)}: a pod needs one"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return f"spec.containers: {_short(containers)}: must be a non-empty list"
    for key in ("initContainers", "containers", "volumes"):
        items = spec.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"spec.{key}: {_short(items)}: must be a list"
        if len(items) > MAX_ITEMS:
            return f"spec.{key}: {len(items)} items: more than {MAX_ITEMS}"
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                return f"spec.{key}[{i}]: {_short(item)}: must be an object"
            ours = OUR_VOLUMES if key == "volumes" else (SIDECAR_CONTAINER,)
            if item.get("name") in ours:
                return f"spec.{key}[{i}].name: {item.get('name')}: taken (the sidecar's name)"
    return None


def _within_limits(spec: Mapping[str, Any]) -> bool:
    return all(
        len(spec.get(key) or ()) <= MAX_ITEMS
        for key in ("initContainers", "containers", "volumes")
        if isinstance(spec.get(key) or (), list)
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chosen_source(pod: Mapping[str, Any], context: InjectionContext) -> str:
    """The source service whose config the sidecar mounts (first by name if several)."""
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    named = ((pod.get("metadata") or {}).get("annotations") or {}).get(SOURCE_ANNOTATION)
    if named:
        return str(named)
    local = sorted(s.name for s in context.sources if s.namespace == namespace)
    return local[0] if local else ""


def inject(pod: Mapping[str, Any], context: InjectionContext) -> dict[str, Any]:
    """A copy of ``pod`` with the forwarder sidecar; ``pod`` itself when skipped."""
    result: dict[str, Any] = copy.deepcopy(dict(pod))
    if skip_reason(pod, context) is not None:
        return result
    key, sidecar, volumes, source = _additions(pod, context)
    spec = result.setdefault("spec", {})
    spec[key] = [sidecar, *(spec.get(key) or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes]
    annotations = result.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[INJECTED_ANNOTATION] = source
    return result


def _additions(
    pod: Mapping[str, Any], context: InjectionContext
) -> tuple[str, dict[str, Any], list[dict[str, Any]], str]:
    """(list the sidecar goes first in, the sidecar, its volumes, the source's name)."""
    settings = context.settings
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    source = chosen_source(pod, context)
    sidecar = _sidecar_container(settings)
    if settings.native_sidecar:
        sidecar["restartPolicy"] = "Always"
        sidecar["startupProbe"] = _probe(settings, period=1, failures=300)
        key = "initContainers"
    else:
        sidecar["lifecycle"] = {
            "postStart": {
                "exec": {
                    "command": [
                        "k8s-ext-connector",
                        "wait-ready",
                        "--port",
                        str(settings.health_port),
                        "--timeout",
                        "300",
                    ]
                }
            }
        }
        key = "containers"
    return key, sidecar, _volumes(ServiceRef(namespace, source)), source


def _sidecar_container(settings: InjectionSettings) -> dict[str, Any]:
    return {
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "sidecar",
            "--config",
            f"{CONFIG_DIR}/sidecar.yaml",
            "--ssh-key",
            f"{KEY_DIR}/ssh-privatekey",
            "--wait-for-config",
            "--health-port",
            str(settings.health_port),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "readinessProbe": _probe(settings, period=5, failures=3),
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsUser": 0,  # iptables needs uid 0 with NET_ADMIN; nothing else is granted
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": KEY_VOLUME, "mountPath": KEY_DIR, "readOnly": True},
            # The root filesystem is read-only; iptables wants /run for its lock file.
            {"name": RUN_VOLUME, "mountPath": "/run"},
        ],
    }


def _probe(settings: InjectionSettings, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/ready", "port": settings.health_port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    }


def _volumes(service: ServiceRef) -> list[dict[str, Any]]:
    return [
        {
            "name": CONFIG_VOLUME,
            "configMap": {"name": sidecar_configmap_name(service), "optional": True},
        },
        {
            "name": KEY_VOLUME,
            "secret": {
                "secretName": client_secret_name(service),
                "optional": True,
                "defaultMode": 0o400,
            },
        },
        {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]


def admission_patch(pod: Mapping[str, Any], context: InjectionContext) -> list[dict[str, Any]]:
    """The RFC 6902 patch from ``pod`` to ``inject(pod)``.

    Written op by op rather than diffed: its cost does not grow with the pod (a diff
    deep-copies and walks all of it: seconds for a pod of 100,000 containers). The
    malformed-pod checks guarantee every path it adds to exists or may be created.
    """
    if skip_reason(pod, context) is not None:
        return []
    key, sidecar, volumes, source = _additions(pod, context)
    spec, meta = pod["spec"], pod.get("metadata")
    patch: list[dict[str, Any]] = []
    if spec.get(key):
        patch.append({"op": "add", "path": f"/spec/{key}/0", "value": sidecar})
    else:
        patch.append({"op": "add", "path": f"/spec/{key}", "value": [sidecar]})
    if spec.get("volumes"):
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    if meta is None:
        patch.append(
            {
                "op": "add",
                "path": "/metadata",
                "value": {"annotations": {INJECTED_ANNOTATION: source}},
            }
        )
    elif isinstance(meta.get("annotations"), Mapping):
        pointer = INJECTED_ANNOTATION.replace("~", "~0").replace("/", "~1")
        patch.append({"op": "add", "path": f"/metadata/annotations/{pointer}", "value": source})
    else:
        patch.append(
            {"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: source}}
        )
    return patch


def sources_selecting(
    pod_labels: Mapping[str, str],
    namespace: str,
    services: Sequence[tuple[ServiceRef, Mapping[str, str]]],
) -> tuple[ServiceRef, ...]:
    """Source services in the pod's namespace whose selector matches its labels."""
    return tuple(
        sorted(
            ref
            for ref, selector in services
            if ref.namespace == namespace
            and selector
            and all(pod_labels.get(k) == v for k, v in selector.items())
        )
    )
