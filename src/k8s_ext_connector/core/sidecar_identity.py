"""How the webhook and the operator recognise the injected sidecar: by more than its name.

A container named ``ext-connector`` may be anyone's. Ours is the one the webhook (or
``k8s-ext-connector inject``) wrote: the pod carries the ``injected`` annotation, and the
container runs ``sidecar`` with the connector's config volume mounted where the sidecar
reads it; as a native sidecar it is an init container with ``restartPolicy: Always``.
A pod creator can still copy all of that by hand (the pod spec is theirs); this keeps
an unrelated container of that name from counting as injected or as a ready sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SIDECAR_CONTAINER = "ext-connector"
INJECTED_ANNOTATION = "ext-connector.submariner.io/injected"
CONFIG_VOLUME = "ext-connector-config"
CONFIG_DIR = "/etc/ext-connector/config"


def is_our_sidecar(container: Any, init: bool) -> bool:
    """True for a container shaped as the injected sidecar (``init``: from initContainers)."""
    if not isinstance(container, Mapping) or container.get("name") != SIDECAR_CONTAINER:
        return False
    args = container.get("args")
    mounts = container.get("volumeMounts")
    if not isinstance(args, list) or args[:1] != ["sidecar"] or not isinstance(mounts, list):
        return False
    if init and container.get("restartPolicy") != "Always":
        return False
    return any(
        isinstance(m, Mapping)
        and m.get("name") == CONFIG_VOLUME
        and m.get("mountPath") == CONFIG_DIR
        for m in mounts
    )


def injected_sidecar(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod's injected sidecar container, or None (no annotation, or nothing of ours)."""
    meta = pod.get("metadata")
    spec = pod.get("spec")
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        return None
    annotations = meta.get("annotations")
    if not isinstance(annotations, Mapping) or INJECTED_ANNOTATION not in annotations:
        return None
    for key, init in (("initContainers", True), ("containers", False)):
        containers = spec.get(key)
        for container in containers if isinstance(containers, list) else []:
            if is_our_sidecar(container, init):
                return container  # type: ignore[no-any-return]
    return None
