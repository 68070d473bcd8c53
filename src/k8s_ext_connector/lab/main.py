"""``k8s-ext-connector lab``: the seed's whole walkthrough on one machine, with the real
control plane, proved by connections.

- ``lab`` (no subcommand): up, the checks, down. Exit 0 only if every check passes.
- ``lab up``: the same bring-up and checks, then leaves everything running under a
  background supervisor; ``kubectl --kubeconfig /run/k8s-ext-connector-lab/kubeconfig``
  then works against its API server.
- ``lab status``: the supervisor, ``kubectl get externalservices -A`` and the processes.
- ``lab down``: removes every namespace, process, rule and file, even after a crash.

What is real: the network namespaces, the gateway and sidecar agents, the operator, the
webhook, and upstream Kubernetes (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kubectl of the pinned release ``make install`` builds). What the lab
plays (and says so in its output, line by line): the kubelet and kube-proxy
(``lab/kubelet.py``), the gateway DaemonSet's pod and the operator's Deployment (processes
it starts and restarts), and DNS (pods dial the ClusterIP).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from k8s_ext_connector.lab import state
from k8s_ext_connector.lab.cluster import CONNECTOR_NAMESPACE, ES_PLURAL, kubectl_binary
from k8s_ext_connector.lab.netns import LabError, is_root
from k8s_ext_connector.lab.session import (
    Check,
    LabSession,
    all_passed,
    parse_manifest,
    seed_manifest,
    table,
)
from k8s_ext_connector.lab.tools import LAB_TOOLS, missing_message, missing_tools
from k8s_ext_connector_testbed import binaries

PROG = "k8s-ext-connector lab"
UP_TIMEOUT = 180.0  # the control plane alone starts in ~10 s, more on a busy machine


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS if suppress else state.STATE_DIR,
        help=f"where a running lab is recorded (default {state.STATE_DIR})",
    )


def _bring_up_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    parser.add_argument(
        "--file",
        "-f",
        type=Path,
        default=argparse.SUPPRESS if suppress else None,
        help="an ExternalService manifest to apply instead of the seed's example (TEST-NET"
        " addresses only: the lab's external server is 203.0.113.10, the gateway's network"
        " 203.0.113.0/24)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=argparse.SUPPRESS if suppress else 10,
        help="concurrent connections per pod in the egress checks",
    )
    parser.add_argument(
        "--check-timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else 20.0,
        help="seconds the checks may take to pass once the ExternalService is Ready",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The seed's walkthrough on network namespaces with the real operator, webhook,"
        " gateway and sidecars and an upstream control plane (the lab plays the kubelet,"
        " kube-proxy and DNS). Without a subcommand: up, checks, down; exit 0 only if every"
        " check passes."
    )
    _common(parser, suppress=False)
    _bring_up_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="lab_command", metavar="{up,status,down}")
    up = commands.add_parser("up", help="bring the lab up and leave it running")
    _common(up, suppress=True)
    _bring_up_options(up, suppress=True)
    status = commands.add_parser("status", help="what a running lab is doing")
    _common(status, suppress=True)
    down = commands.add_parser("down", help="remove everything a lab made, even after a crash")
    _common(down, suppress=True)
    supervise = commands.add_parser("supervise")  # internal: the process `up` leaves running
    _common(supervise, suppress=True)
    _bring_up_options(supervise, suppress=True)


def _say(text: str) -> None:
    print(f"[lab] {text}", flush=True)


def _error(text: str) -> int:
    print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)
    return 1


def _tool_found(command: str) -> bool:
    if command in binaries.BINARIES:  # the pinned build, not whatever is on PATH
        try:
            return os.access(binaries.assets_dir() / command, os.X_OK)
        except binaries.MissingBinaries:
            return False
    return shutil.which(command) is not None


def run(args: argparse.Namespace) -> int:
    command = args.lab_command or "run"
    state_dir = Path(args.state_dir)
    if command in ("run", "up", "supervise"):
        missing = missing_message(missing_tools(LAB_TOOLS, _tool_found))
        if missing:
            return _error(f"{missing}; nothing was started")
    if not is_root():
        return _error("needs root (network namespaces, iptables)")
    if command == "status":
        return _status(state_dir)
    if command == "down":
        return _down(state_dir)
    try:
        manifest = args.file.read_text() if args.file else seed_manifest()
        parse_manifest(manifest)
    except (OSError, LabError) as error:
        return _error(str(error))
    if command == "supervise":
        return _supervise(state_dir, manifest, args)
    record = state.read_record(state_dir)
    if record is not None and record.alive and record.pid != os.getpid():
        return _error(
            f"a lab is already up (pid {record.pid}, state in {state_dir}):"
            f" `{PROG} status`, `{PROG} down`"
        )
    if record is not None:  # a crashed lab: clear its remains first
        for line in state.teardown(state_dir):
            _say(f"cleanup of an earlier lab: {line}")
    if command == "up":
        return _up(state_dir, args)
    return _run_once(state_dir, manifest, args)


# ---- lab (up + checks + down) ------------------------------------------------------------------
def _run_once(state_dir: Path, manifest: str, args: argparse.Namespace) -> int:
    started = time.monotonic()
    checks: list[Check] = []
    try:
        with _terminated_as_exit():
            session = LabSession.open(state_dir, _say, args.connections)
            try:
                checks = _walkthrough(session, manifest, args.check_timeout)
            finally:
                _say("tearing down: processes, namespaces (with their rules), files")
                session.close()
    except LabError as error:
        _error(str(error))
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    finally:
        state.teardown(state_dir)
    passed = all_passed(checks)
    _say(
        f"{'all checks passed' if passed else 'FAILED'} in {time.monotonic() - started:.1f}s;"
        " everything the lab made is removed"
    )
    return 0 if passed else 1


def _walkthrough(session: LabSession, manifest: str, check_timeout: float) -> list[Check]:
    started = time.monotonic()
    ref = session.walkthrough(manifest)
    _say(f"READY after {time.monotonic() - started:.1f}s; `kubectl get externalservices -A`:")
    print(session.get_externalservices(), end="", flush=True)
    connector = session.cluster.get("services", CONNECTOR_NAMESPACE, ref[1]) or {}
    cluster_ip = (connector.get("spec") or {}).get("clusterIP", "?")
    _say(
        f"checks: each pod dials {ref[1]}.{CONNECTOR_NAMESPACE} at its ClusterIP {cluster_ip}"
        " (DNS is not emulated; that is the address the name resolves to) and the external"
        " server answers with the source IP it saw; then the server dials each source IP"
        " back on the source Service's ports"
    )
    checks = session.wait_checks(ref, check_timeout)
    print(table(checks), flush=True)
    skipped = [c for c in checks if c.skipped]
    if skipped:
        _say(f"{len(skipped)} check(s) SKIPPED, not counted as passed: {skipped[0].seen}")
    return checks


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` clauses clean up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- lab up / the supervisor ---------------------------------------------------------------------
def _up(state_dir: Path, args: argparse.Namespace) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / state.LOG_FILE
    argv = [sys.executable, "-m", "k8s_ext_connector", "lab", "supervise"]
    argv += ["--state-dir", str(state_dir), "--connections", str(args.connections)]
    argv += ["--check-timeout", str(args.check_timeout)]
    if args.file:
        argv += ["--file", str(Path(args.file).resolve())]
    with log_path.open("ab") as log:
        supervisor = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this shell and its Ctrl-C
        )
    _say(f"supervisor started (pid {supervisor.pid}); its log: {log_path}")
    ready = state_dir / state.READY_FILE
    deadline = time.monotonic() + UP_TIMEOUT
    offset = 0
    while True:
        offset = _echo_new(log_path, offset)
        if ready.exists() or supervisor.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _echo_new(log_path, offset)
    if not ready.exists():
        _error(
            "the lab did not come up"
            + (
                f" (supervisor exited {supervisor.returncode})"
                if supervisor.poll() is not None
                else ""
            )
            + "; cleaning up"
        )
        for line in state.teardown(state_dir):
            _say(line)
        return 1
    verdict = ready.read_text().strip()
    if verdict != "pass":
        _say("checks FAILED; the lab is left up for inspection")
    kubeconfig = state_dir / "kubeconfig"
    record = state.read_record(state_dir)
    prefix = record.prefix if record else "?"
    print(
        f"\nThe lab is up (supervisor pid {supervisor.pid}). Try:\n"
        f"  kubectl --kubeconfig {kubeconfig} get externalservices -A\n"
        f"  kubectl --kubeconfig {kubeconfig} describe externalservice my-externalservice\n"
        f"  kubectl --kubeconfig {kubeconfig} apply -f my-externalservice.yaml\n"
        f"  ip netns exec {prefix}-my-pod1 curl -s <connector ClusterIP>:8000"
        "   # answers the source IP the server saw\n"
        f"  {PROG} status\n"
        f"  {PROG} down\n",
        flush=True,
    )
    return 0 if verdict == "pass" else 1


def _echo_new(path: Path, offset: int) -> int:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return offset
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def _supervise(state_dir: Path, manifest: str, args: argparse.Namespace) -> int:
    stop = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
        raise SystemExit(0)  # unwinds the bring-up if it is still going on

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    session: LabSession | None = None
    try:
        session = LabSession.open(state_dir, _say, args.connections, mode="up")
        checks = _walkthrough(session, manifest, args.check_timeout)
        verdict = "pass" if all_passed(checks) else "fail"
        (state_dir / state.READY_FILE).write_text(verdict + "\n")
        _say(f"up; supervising until `{PROG} down`")
        while not stop:
            signal.pause()
    except LabError as error:
        _error(str(error))
        return 1
    except SystemExit:
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # one clean shutdown, not two
            signal.signal(signum, signal.SIG_IGN)
        if session is not None:
            _say("tearing down")
            session.close()
    return 0


# ---- status and down ---------------------------------------------------------------------------
def _status(state_dir: Path) -> int:
    record = state.read_record(state_dir)
    if record is None:
        print(f"no lab recorded in {state_dir}")
        return 1
    age = time.time() - record.started
    print(
        f"lab {record.prefix}: {record.mode} process {record.pid}"
        f" {'running' if record.alive else 'GONE (crashed? `lab down` cleans up)'},"
        f" up {age:.0f}s; state {state_dir}"
    )
    kubeconfig = state_dir / "kubeconfig"
    if record.alive and kubeconfig.exists():
        print(f"$ kubectl --kubeconfig {kubeconfig} get externalservices -A")
        try:
            result = subprocess.run(
                [kubectl_binary(), "--kubeconfig", str(kubeconfig), "get", ES_PLURAL, "-A"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            print((result.stdout + result.stderr).rstrip())
        except (LabError, OSError, subprocess.TimeoutExpired) as error:
            print(f"kubectl: {error}")
    rows = [("process", "pid", "netns", "restarts", "state")]
    for process in state.read_processes(state_dir):
        pid = process.get("pid")
        alive = isinstance(pid, int) and state.is_ours(pid)
        rows.append(
            (
                str(process.get("name")),
                str(pid),
                str(process.get("netns") or "(host)"),
                str(process.get("restarts", 0)),
                "running" if alive else "gone",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0 if record.alive else 1


def _down(state_dir: Path) -> int:
    if state.read_record(state_dir) is None and not state_dir.exists():
        removed = state.teardown(state_dir)  # still sweep orphaned namespaces
        print("\n".join(removed) if removed else f"no lab recorded in {state_dir}; nothing to do")
        return 0
    for line in state.teardown(state_dir):
        _say(line)
    _say("down: nothing of the lab is left")
    return 0


__all__ = ["Check", "add_arguments", "run"]
