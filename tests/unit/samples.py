"""Fixed sample data shared by the unit tests (dummy keys, the seed's ExternalService).

The keys are throwaway ``ssh-ed25519`` public keys generated once for these tests; no
private half exists anywhere. Fixed keys keep every expected value and golden file stable.
"""

from __future__ import annotations

from typing import Any

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA7SIZ+64V4Q3vhjqZavL3IK48O5y1Ma5zYVqFae5UxZ"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII4JclgafNnNj5CM7IlsKsksDvsqmuwpzr5V/hzkt3NB"
KEY_C = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPELFgjqvxCcyM972CWFiT25STPb6lRRXOt0oCsREwNt"
KEY_D = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINykGf/ajzoiiBpJyzDjWe0LCuij6M4ASu4pFK5gaVCR"

# The example of DESIGN.md "What a user does", step 4 (the seed's manifest, unchanged).
SEED_MANIFEST = """\
apiVersion: submariner.io/v1alpha1
kind: ExternalService
metadata: {name: my-externalservice}
spec:
  targetIP: 192.168.122.139
  sources:
  - service: {namespace: ns1, name: my-service1}
    sourceIP: 192.168.122.200
  - service: {namespace: ns2, name: my-service2}
    sourceIP: 192.168.122.201
  ports:
  - {protocol: TCP, port: 8000, targetPort: 8000}
"""


def seed_spec() -> dict[str, Any]:
    """The seed's spec as plain data (a fresh copy each call, safe to mutate)."""
    return {
        "targetIP": "192.168.122.139",
        "sources": [
            {"service": {"namespace": "ns1", "name": "my-service1"},
             "sourceIP": "192.168.122.200"},
            {"service": {"namespace": "ns2", "name": "my-service2"},
             "sourceIP": "192.168.122.201"},
        ],
        "ports": [{"protocol": "TCP", "port": 8000, "targetPort": 8000}],
    }


def sidecar_doc() -> dict[str, Any]:
    """A valid sidecar config document: the seed's rule for my-service1."""
    return {
        "version": 1,
        "listenPort": 15001,
        "rules": [
            {
                "name": "default/my-externalservice:8000",
                "intercept": [
                    {"address": "10.96.0.10", "port": 8000},
                    {"address": "192.168.122.139", "port": 8000},
                ],
                "gateway": {"address": "192.168.122.200", "port": 2022, "hostKey": KEY_A},
                "target": {"address": "192.168.122.139", "port": 8000},
            }
        ],
    }


def gateway_doc() -> dict[str, Any]:
    """A valid gateway config document: the seed's two source IPs, ingress on the first."""
    return {
        "version": 1,
        "sshPort": 2022,
        "sources": [
            {
                "sourceIP": "192.168.122.200",
                "clients": [
                    {"name": "ns1/my-service1", "publicKey": KEY_C,
                     "allow": [{"address": "192.168.122.139", "port": 8000}]},
                ],
                "ingress": [
                    {"allowFrom": "192.168.122.139", "port": 80,
                     "backend": {"address": "10.96.1.1", "port": 80}},
                ],
            },
            {
                "sourceIP": "192.168.122.201",
                "clients": [
                    {"name": "ns2/my-service2", "publicKey": KEY_D,
                     "allow": [{"address": "192.168.122.139", "port": 8000}]},
                ],
            },
        ],
    }


_DELETE = object()
DELETE: Any = _DELETE


def patched(doc: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """``doc`` with the item at ``path`` set to ``value`` (or removed with ``DELETE``)."""
    *parents, last = path
    node = doc
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value
    return doc
