"""iptables in our own chains, applied atomically with iptables-restore, in the node's backend.

- ``ChainSet`` is the desired state: our own chains with their rules, plus the comment-tagged
  jump rules that hook them into built-in chains. Components render it with pure functions.
- ``restore_text(desired, observed)`` is the pure diff: ``None`` when the table already
  matches (a rerun is a no-op), otherwise one iptables-restore ``--noflush`` transaction that
  rewrites our chains and fixes the jumps (missing ones added, duplicates and stale ones
  removed, ``first`` ones moved back to the top of their chain when something was inserted
  above them), touching nothing else in the table.
- ``Iptables`` is the side-effect interface (save/restore); ``SubprocessIptables`` runs
  the real binaries of one backend.

Backend: Debian 12 and most current nodes use the nft backend; older ones the legacy one.
Rules written with the wrong one land in tables the kernel path in use does not consult
consistently with kube-proxy's. Like Kubernetes' iptables-wrapper we detect it: the backend
that already holds more rules wins, nft on a tie (an empty pod namespace), and a setting
overrides detection. python-iptables is not used: it only drives the legacy backend.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Backend = Literal["nft", "legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "legacy")
Family = Literal["ipv4", "ipv6"]


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of our chains."""

    chain: str  # built-in chain, e.g. OUTPUT
    spec: str  # rule text without "-A CHAIN", in iptables-save's canonical form
    # Must lead its chain (the ``first`` jumps of a chain, in their order, are its top
    # rules): when another rule ends up above it, the diff moves it back to the top.
    # Otherwise a jump only has to be present; a missing one is inserted at the top.
    first: bool = False


@dataclass(frozen=True)
class ChainSet:
    """Desired content of our chains in one table, and the jumps into them."""

    table: str
    chains: Mapping[str, tuple[str, ...]]  # our chain -> rule specs, in order
    jumps: tuple[Jump, ...] = ()
    # Prefix shared by all our chains in this table: chains with it that are no longer
    # desired are leftovers of an earlier run or config, and are deleted.
    owned_prefix: str = "EXTCONN-"


@dataclass
class ObservedTable:
    """What ``iptables-save -t TABLE`` shows, reduced to chains and their rules."""

    chains: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def parse(save_output: str) -> ObservedTable:
        observed = ObservedTable()
        for line in save_output.splitlines():
            if line.startswith(":"):
                observed.chains.setdefault(line[1:].split()[0], [])
            elif line.startswith("-A "):
                chain, _, spec = line[3:].partition(" ")
                observed.chains.setdefault(chain, []).append(spec)
        return observed


def restore_text(desired: ChainSet, observed: ObservedTable) -> str | None:
    """The iptables-restore --noflush transaction that turns ``observed`` into ``desired``."""
    lines: list[str] = []
    stale_chains = sorted(
        chain
        for chain in observed.chains
        if chain.startswith(desired.owned_prefix) and chain not in desired.chains
    )
    # Jumps into our chains: keep exactly one of each desired jump, drop everything else.
    desired_jumps = {(j.chain, j.spec) for j in desired.jumps}
    leading: dict[str, list[str]] = {}
    for jump in desired.jumps:
        if jump.first:
            leading.setdefault(jump.chain, []).append(jump.spec)
    # Chains whose top rules are not our leading jumps in order, or that hold one of them
    # twice (``-D`` by rule text deletes the first match, the one on top): those jumps are
    # deleted wherever they are and inserted again at the top. Already on top: no change.
    misplaced = {
        chain
        for chain, specs in leading.items()
        if observed.chains.get(chain, [])[: len(specs)] != specs
        or any(observed.chains[chain].count(spec) > 1 for spec in specs)
    }
    ours = set(desired.chains) | set(stale_chains)
    for chain, specs in sorted(observed.chains.items()):
        if chain in ours:
            continue
        kept: set[str] = set()
        for spec in specs:
            target = _jump_target(spec)
            if target not in ours:
                continue
            moving = chain in misplaced and spec in leading[chain]
            if (chain, spec) in desired_jumps and spec not in kept and not moving:
                kept.add(spec)
            else:
                lines.append(f"-D {chain} {spec}")
    chains_differ = any(
        observed.chains.get(chain) != list(specs) for chain, specs in desired.chains.items()
    )
    if chains_differ or stale_chains:
        for chain in sorted(set(desired.chains) | set(stale_chains)):
            lines.insert(0, f":{chain} - [0:0]")  # declare and flush
        for chain, chain_specs in desired.chains.items():
            lines.extend(f"-A {chain} {spec}" for spec in chain_specs)
        lines.extend(f"-X {chain}" for chain in stale_chains)
    for jump in desired.jumps:
        if jump.first or jump.spec in observed.chains.get(jump.chain, []):
            continue
        # Below the leading jumps when they stay where they are; they go on top otherwise.
        position = 1 if jump.chain in misplaced else len(leading.get(jump.chain, [])) + 1
        lines.append(f"-I {jump.chain} {position} {jump.spec}")
    for chain in sorted(misplaced):
        lines.extend(f"-I {chain} 1 {spec}" for spec in reversed(leading[chain]))
    if not lines:
        return None
    return "\n".join([f"*{desired.table}", *lines, "COMMIT", ""])


def _jump_target(spec: str) -> str | None:
    match = re.search(r"(?:^| )-j (\S+)", spec)
    return match.group(1) if match else None


def comment(text: str) -> str:
    """A ``-m comment`` match quoted the way iptables-save prints it."""
    return f"-m comment --comment {_save_quote(text)}"


def _save_quote(text: str) -> str:
    """iptables-save (1.8, nft and legacy) leaves only [A-Za-z0-9_-] bare, escapes \\ " '."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


class Iptables(Protocol):
    """The two operations every applier needs, for one address family and backend."""

    def save(self, table: str) -> str: ...

    def restore(self, text: str) -> None: ...


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class SubprocessIptables:
    """The real binaries, e.g. ``iptables-nft-save`` / ``iptables-nft-restore``."""

    backend: Backend
    family: Family = "ipv4"

    def _binary(self, verb: str) -> str:
        base = "iptables" if self.family == "ipv4" else "ip6tables"
        return f"{base}-{self.backend}-{verb}"

    def save(self, table: str) -> str:
        return _run([self._binary("save"), "-t", table]).stdout

    def restore(self, text: str) -> None:
        _run([self._binary("restore"), "--noflush", "--wait"], stdin=text)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} is not installed (apt install iptables)") from None
    if result.returncode != 0:
        raise IptablesError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")
    return result


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def choose_backend(rule_counts: Mapping[Backend, int | None]) -> Backend:
    """Pure part of detection: the backend holding more rules; nft on a tie.

    ``None`` means that backend's binaries are missing, so it cannot be chosen.
    """
    available = {b: n for b, n in rule_counts.items() if n is not None}
    if not available:
        raise IptablesError("neither iptables-nft nor iptables-legacy is installed")
    return max(available, key=lambda b: (available[b], b == "nft"))


def detect_backend() -> Backend:
    """Count rules in every table of each backend in the current network namespace."""
    counts: dict[Backend, int | None] = {}
    for backend in BACKENDS:
        binary = f"iptables-{backend}-save"
        if shutil.which(binary) is None:
            counts[backend] = None
            continue
        try:
            counts[backend] = count_rules(_run([binary]).stdout)
        except IptablesError:
            counts[backend] = None
    return choose_backend(counts)


def apply(iptables: Iptables, desired: ChainSet) -> bool:
    """Observe, diff, apply. Returns whether anything had to change."""
    text = restore_text(desired, ObservedTable.parse(iptables.save(desired.table)))
    if text is None:
        return False
    iptables.restore(text)
    return True


def remove(iptables: Iptables, table: str, owned_prefix: str) -> bool:
    """Delete our chains with ``owned_prefix`` in ``table`` and every jump into them."""
    return apply(iptables, ChainSet(table=table, chains={}, owned_prefix=owned_prefix))
