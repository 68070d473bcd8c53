"""Where a running lab is recorded, so ``lab status`` and ``lab down`` find it, even after
the lab's own process crashed.

The state directory (default ``/run/k8s-ext-connector-lab``) holds ``kubeconfig``,
``lab.json`` (the owning process, the namespace prefix, the work directory),
``processes.json`` (every process the lab started, kept current) and, for ``lab up``,
``supervisor.log``. ``teardown`` stops the owner, then kills whatever of the recorded
processes survived, deletes every namespace with the prefix (which kills what still runs
in them, the control plane's etcd, API server, controller-manager and scheduler included,
and removes their interfaces, addresses, routes and iptables rules), sweeps orphaned lab
namespaces and control-plane directories, and removes the work and state directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k8s_ext_connector.lab import netns
from k8s_ext_connector_testbed import controlplane

STATE_DIR = Path("/run/k8s-ext-connector-lab")
LAB_FILE = "lab.json"
PROCESSES_FILE = "processes.json"
LOG_FILE = "supervisor.log"
READY_FILE = "ready"


@dataclass(frozen=True)
class LabRecord:
    pid: int
    prefix: str
    workdir: str
    mode: str  # "run" (lab) or "up" (supervisor)
    started: float

    @property
    def alive(self) -> bool:
        return is_ours(self.pid)


def write_record(state_dir: Path, record: LabRecord) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_json(state_dir / LAB_FILE, record.__dict__)


def read_record(state_dir: Path) -> LabRecord | None:
    data = _read_json(state_dir / LAB_FILE)
    if not isinstance(data, dict):
        return None
    try:
        return LabRecord(
            int(data["pid"]),
            str(data["prefix"]),
            str(data["workdir"]),
            str(data.get("mode", "")),
            float(data.get("started", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None


def write_processes(state_dir: Path, processes: list[dict[str, object]]) -> None:
    with contextlib.suppress(OSError):
        _write_json(state_dir / PROCESSES_FILE, processes)


def read_processes(state_dir: Path) -> list[dict[str, Any]]:
    data = _read_json(state_dir / PROCESSES_FILE)
    return [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []


def is_ours(pid: int) -> bool:
    """Whether ``pid`` is alive and one of this project's processes (not a reused pid): an
    agent, or a control-plane binary (its arguments name the control plane's directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    markers = (b"k8s_ext_connector", b"k8s-ext-connector", controlplane.BASE_DIR_NAME.encode())
    return any(marker in cmdline for marker in markers)


def teardown(state_dir: Path, grace: float = 20) -> list[str]:
    """Remove everything the recorded lab made; returns what was done, one line each."""
    done: list[str] = []
    record = read_record(state_dir)
    if record is not None and record.pid != os.getpid() and record.alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while record.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        if record.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            done.append(f"killed lab process {record.pid} (it did not stop in {grace:.0f}s)")
        else:
            done.append(f"stopped lab process {record.pid}")
    for process in read_processes(state_dir):
        pid = process.get("pid")
        if isinstance(pid, int) and is_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            done.append(f"killed leftover process {process.get('name')} ({pid})")
    if record is not None and record.prefix:
        for entry in sorted(netns.NETNS_DIR.glob(f"{record.prefix}-*")):
            netns.delete(entry.name)
            done.append(f"deleted namespace {entry.name}")
    done += [f"deleted orphaned namespace {name}" for name in netns.sweep_orphans()]
    done += [f"removed control-plane directory {d}" for d in controlplane.sweep_orphans()]
    workdir = Path(record.workdir) if record is not None else None
    if (
        record is not None
        and workdir
        and _is_lab_workdir(workdir, record.prefix)
        and workdir.exists()
    ):
        shutil.rmtree(workdir, ignore_errors=True)
        done.append(f"removed {workdir}")
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        done.append(f"removed {state_dir}")
    return done


def _is_lab_workdir(path: Path, prefix: str) -> bool:
    """Only ever remove a directory the lab made (mkdtemp with its prefix)."""
    return (
        bool(prefix)
        and path.parent == Path(tempfile.gettempdir())
        and path.name.startswith(f"{prefix}-")
    )


def _write_json(path: Path, data: object) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
