"""kopf 1.45's own runner against the emulator: login, watch, patch, status, events, finalizers.

The operator runs with ``kopf.operator(standalone=True, clusterwide=True)`` on a thread and
logs in with kopf's ``login_with_kubeconfig`` (KUBECONFIG points at the emulator), as
``kopf run`` does when neither pykube nor the kubernetes client is installed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from k8s_ext_connector_testbed.emulator import ApiServer
from tests.controlplane.conftest import CRDS, MERGE, WIDGET_CRD, WIDGETS, Http, widget
from tests.polling import wait_for

Obj = dict[str, Any]


class Operator:
    """A tiny operator: records what it saw, patches status, posts an event."""

    def __init__(self) -> None:
        self.registry = kopf.OperatorRegistry()
        self.seen: list[tuple[str, str]] = []
        on = kopf.on

        @on.login(registry=self.registry)
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            return kopf.login_with_kubeconfig(**kwargs)

        @on.create("example.com", "v1", "widgets", registry=self.registry)
        def created(body: kopf.Body, name: str, patch: kopf.Patch, **_: Any) -> None:
            self.seen.append(("create", name))
            kopf.info(body, reason="Seen", message=f"widget {name} seen")
            patch.status["observed"] = body["spec"].get("size")

        @on.update("example.com", "v1", "widgets", registry=self.registry)
        def updated(name: str, **_: Any) -> None:
            self.seen.append(("update", name))

        @on.delete("example.com", "v1", "widgets", registry=self.registry)
        def deleted(name: str, **_: Any) -> None:
            self.seen.append(("delete", name))

    def run(
        self,
        stop: threading.Event,
        ready: threading.Event,
        errors: list[BaseException],
    ) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    standalone=True,
                    clusterwide=True,
                    stop_flag=stop,
                    ready_flag=ready,
                )
            )
        except BaseException as e:
            errors.append(e)


@pytest.fixture
def operator(apiserver: ApiServer, kubeconfig: Path) -> Iterator[Operator]:
    """The operator on its own thread, stopped through its stop flag at the end."""
    apiserver.create_object(WIDGET_CRD)
    op, stop, ready = Operator(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(target=op.run, args=(stop, ready, errors), name="kopf")
    thread.start()
    try:
        assert ready.wait(10), "kopf did not become ready"
        yield op
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "kopf did not stop"
    assert errors == []


def test_kopf_handles_create_update_delete(
    apiserver: ApiServer, http: Http, operator: Operator
) -> None:
    http.ok("POST", WIDGETS, widget("w1", size=3))

    def stored() -> Obj | None:
        return apiserver.get_object("example.com", "v1", "widgets", "default", "w1")

    status = wait_for(
        lambda: (stored() or {}).get("status", {}).get("observed"), what="the status patch"
    )
    assert status == 3
    event = wait_for(
        lambda: [
            e
            for e in apiserver.list_objects("", "v1", "events", "default")
            if e.get("reason") == "Seen"
        ],
        what="the event",
    )[0]
    assert event["involvedObject"]["name"] == "w1"
    assert event["involvedObject"]["kind"] == "Widget"
    assert event["message"] == "widget w1 seen"
    finalizers = wait_for(
        lambda: (stored() or {})["metadata"].get("finalizers"), what="kopf's finalizer"
    )
    assert finalizers

    http.ok("PATCH", f"{WIDGETS}/w1", {"spec": {"size": 4}}, content_type=MERGE)
    wait_for(lambda: ("update", "w1") in operator.seen, what="the update handler")

    http.ok("DELETE", f"{WIDGETS}/w1")
    wait_for(lambda: stored() is None, what="removal once kopf released its finalizer")
    assert operator.seen == [("create", "w1"), ("update", "w1"), ("delete", "w1")]

    verbs = {
        (r.verb, r.resource, r.subresource)
        for r in apiserver.requests
        if r.user_agent.startswith("kopf")
    }
    assert {
        ("list", "widgets", ""),
        ("watch", "widgets", ""),
        ("patch", "widgets", ""),
        ("patch", "widgets", "status"),
        ("create", "events", ""),
        ("watch", "customresourcedefinitions", ""),
    } <= verbs


def test_kopf_picks_up_a_crd_created_while_running(
    apiserver: ApiServer, http: Http, operator: Operator
) -> None:
    """kopf watches CRDs and rescans discovery: a re-created CRD is served and handled."""
    http.ok("DELETE", f"{CRDS}/widgets.example.com")
    http.ok("POST", CRDS, WIDGET_CRD)
    http.ok("POST", WIDGETS, widget("late"))
    wait_for(lambda: ("create", "late") in operator.seen, timeout=15, what="the late widget")
