"""Strict reading of untyped YAML/JSON mappings into typed values.

Every accessor names the full field path in its error, and ``done()`` rejects unknown
fields, so a typo in a config file fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from k8s_ext_connector.core.errors import ConfigError

T = TypeVar("T")
_MISSING = object()

# Kubernetes object names (use with fullmatch): most names and namespaces are DNS labels
# (RFC 1123), Secrets and other objects DNS subdomains, Services RFC 1035 labels.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def canonical_ip(text: str) -> str:
    """The canonical text of an IP literal; raises ValueError for anything else."""
    return str(ipaddress.ip_address(text))


class Fields:
    """A cursor over one mapping at a known field path."""

    def __init__(self, data: object, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "(top level)", data, "must be a mapping")
        self._data: Mapping[str, Any] = data
        self._path = path
        self._seen: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _get(self, name: str, default: object) -> object:
        self._seen.add(name)
        if name in self._data and self._data[name] is not None:
            return self._data[name]
        if default is _MISSING:
            raise ConfigError(self.path(name), None, "is required")
        return default

    def string(self, name: str, default: object = _MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str) or (not value and default is _MISSING):
            raise ConfigError(self.path(name), value, "must be a non-empty string")
        return value

    def integer(self, name: str, default: object = _MISSING, lo: int = 0, hi: int = 2**31) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(self.path(name), value, f"must be an integer {lo}-{hi}")
        return value

    def port(self, name: str, default: object = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ConfigError(self.path(name), value, "must be a TCP port number 1-65535")
        return value

    def boolean(self, name: str, default: object = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.path(name), value, "must be true or false")
        return value

    def ip(self, name: str, default: object = _MISSING) -> str:
        value = self._get(name, default)
        try:
            return canonical_ip(value) if isinstance(value, str) else _raise(ValueError())
        except ValueError:
            raise ConfigError(self.path(name), value, "must be an IPv4 or IPv6 address") from None

    def items(
        self, name: str, read: Callable[[object, str], T], default: object = _MISSING
    ) -> tuple[T, ...]:
        """Read a list, each element with ``read(element, path_of_element)``."""
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            raise ConfigError(self.path(name), value, "must be a list")
        return tuple(read(item, f"{self.path(name)}[{i}]") for i, item in enumerate(value))

    def nested(self, name: str) -> Fields:
        return Fields(self._get(name, _MISSING), self.path(name))

    def raw(self, name: str, default: object = _MISSING) -> object:
        return self._get(name, default)

    def done(self) -> None:
        """Fail on any field that no accessor asked for."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(self.path(unknown[0]), self._data[unknown[0]], "unknown field")


def _raise(error: Exception) -> str:
    raise error
