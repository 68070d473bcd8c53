"""Network-namespace primitives: create, run inside, tear down.

Everything a lab creates lives inside namespaces it owns (named ``xcl<pid>n<k>-<role>``),
so deleting the namespaces removes every interface, address, route and rule with them.
Namespaces of a lab whose process died are swept by the next lab (``sweep_orphans``).

``call_in_netns`` runs a function on a thread that has joined a namespace (setns(2) is
per thread): the test process itself can be the "app" in a pod, or a raw SSH client,
without spawning an interpreter per probe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NAME_PATTERN = re.compile(r"^xcl(\d+)n\d+-")


class LabError(RuntimeError):
    pass


def sh(
    argv: Sequence[str], check: bool = True, input_text: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, input=input_text, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def is_root() -> bool:
    return os.geteuid() == 0


def add(name: str) -> None:
    sh(["ip", "netns", "add", name])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])


def pids_in(name: str) -> list[int]:
    out = sh(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split()]


def delete(name: str) -> None:
    """Kill whatever still runs in the namespace, then delete it (idempotent)."""
    if not (NETNS_DIR / name).exists():
        return
    for pid in pids_in(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids_in(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    sh(["ip", "netns", "del", name], check=False)


def sweep_orphans() -> list[str]:
    """Delete namespaces left by labs whose process is gone (crash, SIGKILL)."""
    removed = []
    for entry in sorted(NETNS_DIR.glob("xcl*")) if NETNS_DIR.exists() else []:
        match = NAME_PATTERN.match(entry.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            delete(entry.name)
            removed.append(entry.name)
    return removed


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def join(name: str) -> None:
    """Move the calling thread into namespace ``name`` (threads it starts follow it)."""
    _setns(NETNS_DIR / name)


def call_in_netns(name: str, function: Callable[[], T], timeout: float = 120) -> T:
    """Run ``function`` on a fresh thread that has joined namespace ``name``."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            _setns(NETNS_DIR / name)
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=body, name=f"netns {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"call in netns {name} did not finish within {timeout}s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
