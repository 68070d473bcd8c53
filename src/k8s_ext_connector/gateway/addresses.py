"""Source IPs on the gateway's interface, added and removed by the agent itself.

Addresses we add carry the label ``<iface>:xc`` so that, after a crash, a restarted agent
can tell its own leftovers from addresses someone else configured, and removes only those.

A source IP that is already an address of the node (on any interface) without being one
we added is refused, not served: with address management on, the source IPs are the
gateway's to add, so one already there is the node's own (an address of a second interface
the Node object does not list, which the operator cannot see) and serving it would take
over the node's address for the external side's traffic.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)
LABEL_SUFFIX = ":xc"


class AddressManager(Protocol):
    def owned(self) -> set[str]: ...

    def present(self) -> set[str]: ...

    def add(self, address: str) -> None: ...

    def remove(self, address: str) -> None: ...

    def foreign(self) -> dict[str, str]:
        """Addresses of this node (any interface) not added by this manager -> interface."""
        ...

    def problem(self, address: str) -> str | None:
        """Why ``address`` can never be added by this manager (None: it can be tried)."""
        ...


@dataclass(frozen=True)
class IprouteAddresses:
    """``ip addr`` on one interface of the current network namespace."""

    interface: str

    @property
    def label(self) -> str:
        return (self.interface + LABEL_SUFFIX)[:15]

    def _addresses(self) -> list[dict[str, object]]:
        out = _ip(["-j", "addr", "show", "dev", self.interface])
        infos: list[dict[str, object]] = []
        for link in json.loads(out or "[]"):
            infos.extend(link.get("addr_info", []))
        return infos

    def present(self) -> set[str]:
        return {str(a["local"]) for a in self._addresses()}

    def owned(self) -> set[str]:
        return {str(a["local"]) for a in self._addresses() if a.get("label") == self.label}

    def foreign(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for link in json.loads(_ip(["-j", "addr", "show"]) or "[]"):
            name = str(link.get("ifname", "?"))
            for info in link.get("addr_info", []):
                if name == self.interface and info.get("label") == self.label:
                    continue
                if "local" in info:
                    found.setdefault(str(info["local"]), name)
        return found

    def problem(self, address: str) -> str | None:
        if ipaddress.ip_address(address).version != 4:
            return "--manage-addresses: only IPv4 source IPs can be managed"
        return None

    def add(self, address: str) -> None:
        reason = self.problem(address)
        if reason:
            raise ValueError(f"{address}: {reason}")
        _ip(["addr", "add", f"{address}/32", "dev", self.interface, "label", self.label])

    def remove(self, address: str) -> None:
        _ip(["addr", "del", f"{address}/32", "dev", self.interface])


def _ip(args: list[str]) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def node_own_addresses(manager: AddressManager, desired: Iterable[str]) -> dict[str, str]:
    """The desired addresses that are already the node's own (see the module's doc), each
    with the reason it is refused."""
    wanted = set(desired)
    if not wanted:
        return {}
    foreign = manager.foreign()
    return {
        address: (
            f"{address} is already an address of this node (on {foreign[address]}) and not "
            "one the gateway added: refusing to take over the node's own address"
        )
        for address in sorted(wanted & set(foreign))
    }


def reconcile_addresses(manager: AddressManager, desired: Iterable[str]) -> dict[str, str]:
    """Add missing source IPs; remove ours that are no longer desired (leftovers included).

    One address that cannot be added, or that is the node's own (see the module's doc), does
    not stop the others: the result maps each such address to the reason, and the caller
    leaves that source IP unserved. A failed removal
    is logged (the next reconcile tries again).
    """
    wanted = set(desired)
    failed = node_own_addresses(manager, wanted)
    present = manager.present()
    for address in sorted(wanted - present - set(failed)):
        try:
            manager.add(address)
        except (OSError, ValueError) as error:
            failed[address] = f"cannot add the address: {error}"
            continue
        log.info("added source IP %s", address)
    for address in sorted(manager.owned() - wanted):
        try:
            manager.remove(address)
        except OSError as error:
            log.error("cannot remove source IP %s: %s", address, error)
            continue
        log.info("removed source IP %s", address)
    return failed
