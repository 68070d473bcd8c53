"""The lab's crash back-off (kubelet containers and the operator's Deployment)."""

from __future__ import annotations

from k8s_ext_connector.lab.topology import CrashBackoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = CrashBackoff(start=0.5, maximum=2.0, reset_after=60)
    assert [backoff.after_exit(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_long_enough_run_resets_the_delay() -> None:
    backoff = CrashBackoff(start=0.5, maximum=10.0, reset_after=60)
    backoff.after_exit(1.0)
    backoff.after_exit(1.0)
    assert backoff.after_exit(61.0) == 0.5
    assert backoff.after_exit(1.0) == 1.0
