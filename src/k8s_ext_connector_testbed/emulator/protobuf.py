"""Just enough Kubernetes protobuf to read what ``kubectl create <ns|configmap|secret|sa>`` sends.

Those subcommands use typed clients that always send protobuf bodies (client-go has no
fallback to JSON on 415), while everything else kubectl and kopf do is JSON. Responses
are JSON: kubectl accepts them. Any other protobuf type is refused with 415.
"""

from __future__ import annotations

import base64
from typing import Any

from k8s_ext_connector_testbed.emulator.errors import ApiError

MAGIC = b"k8s\x00"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> dict[int, list[Any]]:
    """Field number -> values (ints or bytes) of one message, without a schema."""
    out: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire, values = key & 7, out.setdefault(key >> 3, [])
        if wire == 0:
            number, pos = _varint(buf, pos)
            values.append(number)
            continue
        if wire == 2:
            size, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        values.append(buf[pos : pos + size])
        pos += size
    return out


def _map(entries: list[bytes], binary: bool = False) -> dict[str, str]:
    pairs = [_fields(entry) for entry in entries]
    return {
        p.get(1, [b""])[0].decode(): base64.b64encode(p.get(2, [b""])[0]).decode()
        if binary
        else p.get(2, [b""])[0].decode()
        for p in pairs
    }


def _metadata(buf: bytes) -> dict[str, Any]:
    f = _fields(buf)
    meta: dict[str, Any] = {
        key: f[n][0].decode()
        for n, key in ((1, "name"), (2, "generateName"), (3, "namespace"))
        if f.get(n, [b""])[0]
    }
    for n, key in ((11, "labels"), (12, "annotations")):
        if n in f:
            meta[key] = _map(f[n])
    if 14 in f:
        meta["finalizers"] = [v.decode() for v in f[14]]
    return meta


def decode(body: bytes) -> dict[str, Any]:
    """A JSON-shaped object from a protobuf envelope of Namespace/ConfigMap/Secret/SA."""
    if not body.startswith(MAGIC):
        raise ApiError.bad_request("protobuf body without the k8s envelope")
    try:
        envelope = _fields(body[len(MAGIC) :])
        type_meta = _fields(envelope[1][0])
        api_version, kind = type_meta[1][0].decode(), type_meta[2][0].decode()
        f = _fields(envelope.get(2, [b""])[0])
    except (ValueError, KeyError, IndexError) as e:
        raise ApiError.bad_request(f"undecodable protobuf body: {e}") from e
    obj: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": _metadata(f.get(1, [b""])[0]),
    }
    if kind == "ConfigMap":
        obj.update(data=_map(f.get(2, [])), binaryData=_map(f.get(3, []), binary=True))
    elif kind == "Secret":
        obj.update(
            data=_map(f.get(2, []), binary=True),
            stringData=_map(f.get(4, [])),
            type=f[3][0].decode() if 3 in f else "Opaque",
        )
    elif kind not in ("Namespace", "ServiceAccount"):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"protobuf is only decoded for Namespace, ConfigMap, Secret and "
            f"ServiceAccount, not {kind}: send JSON (kubectl apply does)",
        )
    return {k: v for k, v in obj.items() if v or k == "metadata"}
