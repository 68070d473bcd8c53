"""A real upstream control plane per module (``k8s_ext_connector_testbed``); tests that
need their own (parallel instances, teardown) start more. Marked ``kube``: without the
binaries they skip loudly, and fail under ``EXTCONN_REQUIRE_KUBE=1`` (CI): tests/conftest.py.
The fixture starts only when a test that is not skipped asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from k8s_ext_connector_testbed.controlplane import ControlPlane


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane() as instance:
        yield instance
