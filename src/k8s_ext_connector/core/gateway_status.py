"""What a gateway tells the operator: one ``coordination.k8s.io/v1`` Lease per gateway node.

The gateway writes it (``gateway/statuslease.py``), the operator reads it
(``operator/leases.py``, ``operator/desired.py``); both import the names and the format
from here, so the gateway never imports the operator.

The Lease ``gateway_lease_name(node)`` in the connector namespace:

- ``spec.holderIdentity``: the node's name while a gateway runs there; removed when the
  gateway stops cleanly (released: it serves nothing any more, so it reports nothing).
- ``spec.renewTime``: the last write, at least every ``--lease-renew-interval`` seconds
  (default RENEW_SECONDS) and at once when the report changes.
- ``spec.leaseDurationSeconds``: DURATION_RENEWALS renewal intervals. Nothing reads it yet;
  a liveness check (fast failover) will treat a gateway whose ``renewTime`` is older than
  this as gone.
- ``spec.acquireTime``: when the running gateway process took the Lease;
  ``spec.leaseTransitions``: how many times a gateway process (re)took it (restarts).
- annotation UNSERVED_ANNOTATION: a JSON object ``{sourceIP: reason}`` of the source IPs of
  the node's config that the gateway does not serve as given right now (``{}``: all served;
  the reasons are ``GatewayAgent.failed``'s).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

LEASE_PREFIX = "ext-connector-gateway-"
UNSERVED_ANNOTATION = "ext-connector.submariner.io/unserved-source-ips"
RENEW_SECONDS = 10.0
DURATION_RENEWALS = 3  # a report is current for this many renewal intervals
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the API's MicroTime
MAX_REASON = 512  # characters of one reason kept in the annotation
LABELS = {"app.kubernetes.io/name": "k8s-ext-connector", "app.kubernetes.io/component": "gateway"}


def host_key_secret_name(node: str) -> str:
    """The Secret holding ``node``'s SSH host key (written by the operator, read by the
    gateway on that node)."""
    return f"ext-connector-gateway-{node}-host-key"


def gateway_lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"


def node_of_lease(name: str) -> str | None:
    """The node a gateway Lease name stands for (None: not a gateway Lease name)."""
    node = name.removeprefix(LEASE_PREFIX)
    return node if node != name and node else None


def lease_duration(renew_interval: float) -> int:
    return max(1, math.ceil(renew_interval * DURATION_RENEWALS))


def lease_body(
    namespace: str,
    node: str,
    unserved: Mapping[str, str],
    now: datetime,
    renew_interval: float,
    previous: Mapping[str, Any] | None,
    acquired: datetime | None,
) -> dict[str, Any]:
    """The Lease the gateway on ``node`` writes now. ``previous``: the Lease as read (None:
    there is none yet); ``acquired``: when this process first wrote it (None: this write
    takes it, counting one more transition if a Lease was there)."""
    spec = dict((previous or {}).get("spec") or {})
    transitions = int(spec.get("leaseTransitions") or 0)
    if acquired is None and previous is not None:
        transitions += 1
    stamp = now.strftime(MICRO_TIME)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": gateway_lease_name(node),
            "namespace": namespace,
            "labels": dict(LABELS),
            "annotations": {UNSERVED_ANNOTATION: encode_unserved(unserved)},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": lease_duration(renew_interval),
            "acquireTime": (acquired or now).strftime(MICRO_TIME),
            "renewTime": stamp,
            "leaseTransitions": transitions,
        },
    }


def released_body(lease: Mapping[str, Any]) -> dict[str, Any]:
    """``lease`` released at a clean stop: no holder, nothing reported (renewTime kept)."""
    metadata = dict(lease.get("metadata") or {})
    metadata["annotations"] = {
        **dict(metadata.get("annotations") or {}),
        UNSERVED_ANNOTATION: encode_unserved({}),
    }
    spec = {k: v for k, v in dict(lease.get("spec") or {}).items() if k != "holderIdentity"}
    return {**lease, "metadata": metadata, "spec": spec}


def encode_unserved(unserved: Mapping[str, str]) -> str:
    return json.dumps(
        {ip: reason[:MAX_REASON] for ip, reason in sorted(unserved.items())}, sort_keys=True
    )


def decode_unserved(text: object) -> tuple[dict[str, str], str]:
    """The unserved map of an annotation value, and what is wrong with it ("" if nothing).
    A missing annotation is an empty report; a malformed one reports nothing and says so."""
    if text is None:
        return {}, ""
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}, f"annotation {UNSERVED_ANNOTATION} is not JSON"
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return {}, f"annotation {UNSERVED_ANNOTATION} is not an object of strings"
    return dict(value), ""
