"""Pure sidecar injection: ``inject(pod, context) -> pod``; the patch is the diff of the two.

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

Re-injecting an injected pod changes nothing; hostNetwork pods and pods annotated
``ext-connector.submariner.io/inject: "false"`` are skipped; ``"true"`` injects a pod that
no source service selects yet, given ``ext-connector.submariner.io/source-service`` names
the service whose config it will use (the sidecar waits until the operator writes it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.operator.desired import client_secret_name, sidecar_configmap_name
from k8s_ext_connector.operator.snapshot import SIDECAR_CONTAINER

INJECT_ANNOTATION = "ext-connector.submariner.io/inject"
SOURCE_ANNOTATION = "ext-connector.submariner.io/source-service"
INJECTED_ANNOTATION = "ext-connector.submariner.io/injected"
CONFIG_VOLUME = "ext-connector-config"
KEY_VOLUME = "ext-connector-key"
RUN_VOLUME = "ext-connector-run"
CONFIG_DIR = "/etc/ext-connector/config"
KEY_DIR = "/etc/ext-connector/key"


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
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    wanted = (meta.get("annotations") or {}).get(INJECT_ANNOTATION)
    if wanted == "false":
        return f"annotation {INJECT_ANNOTATION}=false"
    if spec.get("hostNetwork"):
        return "hostNetwork pod: it shares the node's network namespace"
    if _has_sidecar(spec):
        return "already injected"
    named = (meta.get("annotations") or {}).get(SOURCE_ANNOTATION)
    if not context.sources and wanted != "true":
        return "no source service selects it"
    if not context.sources and not named:
        return (
            f"{INJECT_ANNOTATION}=true but no source service selects it: name one with "
            f"{SOURCE_ANNOTATION}"
        )
    return None


def _has_sidecar(spec: Mapping[str, Any]) -> bool:
    containers = list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
    return any(c.get("name") == SIDECAR_CONTAINER for c in containers)


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
    settings = context.settings
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    source = chosen_source(pod, context)
    service = ServiceRef(namespace, source)
    spec = result.setdefault("spec", {})
    sidecar = _sidecar_container(settings)
    if settings.native_sidecar:
        sidecar["restartPolicy"] = "Always"
        sidecar["startupProbe"] = _probe(settings, period=1, failures=300)
        spec["initContainers"] = [sidecar, *(spec.get("initContainers") or [])]
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
        spec["containers"] = [sidecar, *(spec.get("containers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *_volumes(service)]
    annotations = result.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[INJECTED_ANNOTATION] = source
    return result


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
    """The RFC 6902 patch from ``pod`` to ``inject(pod)``, computed as their diff."""
    patch: list[dict[str, Any]] = jsonpatch.make_patch(dict(pod), inject(pod, context)).patch
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
