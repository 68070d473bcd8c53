"""``k8s-ext-connector lab``: the seed's egress walkthrough on network namespaces.

Builds the lab topology (see ``topology``), plans the seed's example ExternalService with
the real planner, starts the real gateway and sidecar agents, and checks from each pod
which source IP the external server sees. Prints a table; exit 0 only if every check
passes. Everything is removed at the end, even on failure or Ctrl-C.

Not yet here (see README): the control plane (operator, webhook, kubectl) and ingress.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from k8s_ext_connector.lab.client import run_gets
from k8s_ext_connector.lab.netns import LabError, is_root
from k8s_ext_connector.lab.scenario import SERVICE1, SERVICE2, ScenarioKeys, plan_seed
from k8s_ext_connector.lab.topology import EXTERNAL_SERVER_IP, SERVICE_IP, SOURCE_IPS, Lab


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    seen: str

    @property
    def passed(self) -> bool:
        return self.expected == self.seen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections",
        type=int,
        default=10,
        help="concurrent connections per pod in the egress checks",
    )


def _step(text: str) -> None:
    print(f"[lab] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    if not is_root():
        print(
            "k8s-ext-connector lab: error: needs root (network namespaces, iptables)",
            file=sys.stderr,
        )
        return 1
    started = time.monotonic()
    _step("building namespaces: external server, gateway node, pods my-pod1, my-pod2, other-pod")
    try:
        with Lab.create(["my-pod1", "my-pod2", "other-pod"]) as lab:
            checks = _walkthrough(lab, args.connections)
    except LabError as error:
        print(f"k8s-ext-connector lab: error: {error}", file=sys.stderr)
        return 1
    _print_table(checks)
    passed = all(c.passed for c in checks)
    _step(
        f"{'all checks passed' if passed else 'FAILED'} in {time.monotonic() - started:.1f}s;"
        " namespaces, processes and rules removed"
    )
    return 0 if passed else 1


def _walkthrough(lab: Lab, connections: int) -> list[Check]:
    _step(f"starting the external server at {EXTERNAL_SERVER_IP}:8000 (logs client IPs)")
    lab.start_external_server()
    keys = ScenarioKeys.generate()
    planned = plan_seed(keys, lab.host_key)
    _step(f"starting the gateway agent holding {', '.join(SOURCE_IPS)}")
    lab.start_gateway(planned.gateway)
    _step(
        "starting sidecars in my-pod1 (ns1/my-service1) and my-pod2 (ns2/my-service2);"
        " the lab plays the kubelet here"
    )
    lab.start_sidecar("my-pod1", planned.sidecars[SERVICE1], keys.clients[SERVICE1])
    lab.start_sidecar("my-pod2", planned.sidecars[SERVICE2], keys.clients[SERVICE2])
    checks = []
    for pod, expected in (("my-pod1", SOURCE_IPS[0]), ("my-pod2", SOURCE_IPS[1])):
        _step(f"{pod}: {connections} connections to my-externalservice ({SERVICE_IP}:8000)")
        outcomes = lab.in_pod(pod, lambda: run_gets(SERVICE_IP, 8000, connections))
        assert isinstance(outcomes, list)
        seen = {o.body if o.ok else f"error: {o.body}" for o in outcomes}
        checks.append(Check(f"{pod} -> my-externalservice:8000", expected, ",".join(sorted(seen))))
    _step("other-pod (no source service): must be refused")
    outcome = lab.in_pod("other-pod", lambda: run_gets(SERVICE_IP, 8000, 1))
    assert isinstance(outcome, list)
    checks.append(
        Check(
            "other-pod -> my-externalservice:8000",
            "refused",
            "refused" if not outcome[0].ok else f"reached as {outcome[0].body}",
        )
    )
    return checks


def _print_table(checks: list[Check]) -> None:
    rows = [("check", "expected source IP", "seen", "result")]
    rows += [(c.name, c.expected, c.seen, "pass" if c.passed else "FAIL") for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
