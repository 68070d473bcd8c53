"""The API server emulator against what the project relies on, over real HTTP.

Each test gets a fresh emulator (``apiserver``); ``http`` is a plain JSON client and
``kubectl`` runs kubectl 1.32 with a kubeconfig pointing at the emulator.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_ext_connector_testbed.emulator import ApiError, ApiServer
from k8s_ext_connector_testbed.emulator.tables import human_duration, jsonpath
from tests.controlplane.conftest import (
    CMS,
    CRDS,
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    TABLE,
    WIDGET_CRD,
    WIDGETS,
    Http,
    Kubectl,
    cm,
    widget,
)
from tests.polling import wait_for

Obj = dict[str, Any]


def stored(apiserver: ApiServer, group: str, plural: str, namespace: str, name: str) -> Obj:
    """The stored object, which must exist (the emulator serves every group at v1 here)."""
    obj = apiserver.get_object(group, "v1", plural, namespace, name)
    assert obj is not None, f"{plural} {namespace}/{name} is not stored"
    return obj


def rv(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


def list_rv(http: Http, path: str = CMS) -> int:
    return int(http.ok("GET", path)["metadata"]["resourceVersion"])


# Discovery.


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/version", None),
        ("/api", "APIVersions"),
        ("/api/v1", "APIResourceList"),
        ("/apis", "APIGroupList"),
        ("/apis/apps", "APIGroup"),
        ("/apis/apps/v1", "APIResourceList"),
        ("/openapi/v3", None),
        ("/openapi/v3/api/v1", None),
    ],
)
def test_discovery_documents(http: Http, path: str, kind: str | None) -> None:
    assert http.ok("GET", path).get("kind") == kind


@pytest.mark.parametrize(
    ("group_version", "plural", "kind", "namespaced", "short", "status"),
    [
        ("api/v1", "namespaces", "Namespace", False, ["ns"], True),
        ("api/v1", "nodes", "Node", False, ["no"], True),
        ("api/v1", "services", "Service", True, ["svc"], True),
        ("api/v1", "endpoints", "Endpoints", True, ["ep"], False),
        ("api/v1", "pods", "Pod", True, ["po"], True),
        ("api/v1", "secrets", "Secret", True, [], False),
        ("api/v1", "configmaps", "ConfigMap", True, ["cm"], False),
        ("api/v1", "events", "Event", True, ["ev"], False),
        ("api/v1", "serviceaccounts", "ServiceAccount", True, ["sa"], False),
        ("apis/events.k8s.io/v1", "events", "Event", True, ["ev"], False),
        ("apis/coordination.k8s.io/v1", "leases", "Lease", True, [], False),
        ("apis/apps/v1", "deployments", "Deployment", True, ["deploy"], True),
        ("apis/apps/v1", "daemonsets", "DaemonSet", True, ["ds"], True),
        (
            "apis/apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            ["crd", "crds"],
            True,
        ),
        (
            "apis/admissionregistration.k8s.io/v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            False,
            [],
            False,
        ),
        ("apis/rbac.authorization.k8s.io/v1", "roles", "Role", True, [], False),
        ("apis/rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", True, [], False),
        ("apis/rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", False, [], False),
        (
            "apis/rbac.authorization.k8s.io/v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            False,
            [],
            False,
        ),
    ],
)
def test_builtin_resources_in_discovery(
    http: Http,
    group_version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    short: list[str],
    status: bool,
) -> None:
    resources = {r["name"]: r for r in http.ok("GET", f"/{group_version}")["resources"]}
    entry = resources[plural]
    assert (entry["kind"], entry["namespaced"], entry["shortNames"]) == (kind, namespaced, short)
    assert entry["singularName"] == kind.lower()
    assert {"get", "list", "watch", "create", "update", "patch", "delete"} <= set(entry["verbs"])
    assert (f"{plural}/status" in resources) == status


def test_crd_is_served_at_once_and_gone_with_it(apiserver: ApiServer, http: Http) -> None:
    crd = http.ok("POST", CRDS, WIDGET_CRD)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]} == {
        "NamesAccepted": "True",
        "Established": "True",
    }
    resources = {r["name"]: r for r in http.ok("GET", "/apis/example.com/v1")["resources"]}
    assert resources["widgets"]["shortNames"] == ["wdg"]
    assert resources["widgets"]["categories"] == ["gadgetry"]
    assert (resources["widgets"]["kind"], resources["widgets"]["namespaced"]) == ("Widget", True)
    assert "widgets/status" in resources
    assert "example.com" in {g["name"] for g in http.ok("GET", "/apis")["groups"]}
    http.ok("POST", WIDGETS, widget("w1"))
    watched: list[list[Obj]] = []
    watcher = threading.Thread(
        target=lambda: watched.append(
            http.watch(
                f"{WIDGETS}?watch=true&resourceVersion={list_rv(http, WIDGETS)}", lambda e: False
            )
        )
    )
    watcher.start()
    wait_for(lambda: any(r.verb == "watch" for r in apiserver.requests), what="the watch")

    http.ok("DELETE", f"{CRDS}/widgets.example.com")
    watcher.join(timeout=5)  # the server ends watches of a removed CRD's resource
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in watched[0]] == [("DELETED", "w1")]
    assert http.call("GET", "/apis/example.com/v1")[0] == 404
    assert http.call("GET", WIDGETS)[0] == 404
    assert "example.com" not in {g["name"] for g in http.ok("GET", "/apis")["groups"]}
    http.ok("POST", CRDS, WIDGET_CRD)  # the old objects went with the CRD
    assert http.ok("GET", WIDGETS)["items"] == []


# Errors, as Status objects.

ERRORS = [
    pytest.param(
        "GET",
        f"{CMS}/nope",
        None,
        MERGE,
        404,
        "NotFound",
        {"name": "nope", "kind": "configmaps"},
        id="get-missing",
    ),
    pytest.param(
        "GET",
        f"{CRDS}/nope",
        None,
        MERGE,
        404,
        "NotFound",
        {"name": "nope", "group": "apiextensions.k8s.io", "kind": "customresourcedefinitions"},
        id="get-missing-cluster-scoped",
    ),
    pytest.param(
        "POST",
        CMS,
        cm("taken"),
        MERGE,
        409,
        "AlreadyExists",
        {"name": "taken", "kind": "configmaps"},
        id="create-existing",
    ),
    pytest.param(
        "POST",
        "/api/v1/namespaces/nope/configmaps",
        cm("x", "nope"),
        MERGE,
        404,
        "NotFound",
        {"name": "nope", "kind": "namespaces"},
        id="missing-namespace",
    ),
    pytest.param(
        "PUT",
        f"{CMS}/taken",
        {**cm("taken"), "metadata": {"name": "taken", "resourceVersion": "1"}},
        MERGE,
        409,
        "Conflict",
        {"name": "taken", "kind": "configmaps"},
        id="stale-update",
    ),
    pytest.param(
        "PATCH",
        f"{CMS}/taken",
        {"metadata": {"resourceVersion": "1"}},
        MERGE,
        409,
        "Conflict",
        None,
        id="stale-patch",
    ),
    pytest.param(
        "PUT",
        f"{CMS}/taken",
        cm("other"),
        MERGE,
        400,
        "BadRequest",
        None,
        id="name-disagrees-with-url",
    ),
    pytest.param(
        "POST",
        CMS,
        cm("x", "kube-system"),
        MERGE,
        400,
        "BadRequest",
        None,
        id="namespace-disagrees-with-url",
    ),
    pytest.param("POST", CMS, cm("Not_A_Name"), MERGE, 422, "Invalid", None, id="invalid-name"),
    pytest.param("POST", CMS, {"metadata": {}}, MERGE, 422, "Invalid", None, id="no-name"),
    pytest.param(
        "POST",
        CRDS,
        {"metadata": {"name": "x.y"}, "spec": {}},
        MERGE,
        422,
        "Invalid",
        None,
        id="invalid-crd",
    ),
    pytest.param(
        "GET", "/api/v1/widgets", None, MERGE, 404, "NotFound", None, id="unknown-resource"
    ),
    pytest.param("GET", "/apis/nope.io/v1", None, MERGE, 404, "NotFound", None, id="unknown-group"),
    pytest.param("GET", "/openapi/v2", None, MERGE, 404, "NotFound", None, id="openapi-v2"),
    pytest.param(
        "GET",
        "/api/v1/configmaps/taken",
        None,
        MERGE,
        404,
        "NotFound",
        None,
        id="namespaced-item-without-namespace",
    ),
    pytest.param(
        "GET", f"{CMS}/taken/status", None, MERGE, 404, "NotFound", None, id="no-status-subresource"
    ),
    pytest.param(
        "POST", f"{CMS}/taken", cm("taken"), MERGE, 405, "MethodNotAllowed", None, id="post-to-item"
    ),
    pytest.param(
        "PUT", CMS, cm("taken"), MERGE, 405, "MethodNotAllowed", None, id="put-to-collection"
    ),
    pytest.param(
        "PATCH",
        f"{CMS}/taken",
        {},
        "application/apply-patch+yaml",
        415,
        "UnsupportedMediaType",
        None,
        id="server-side-apply",
    ),
    pytest.param(
        "PATCH",
        f"{CMS}/taken",
        [{"op": "test", "path": "/data/a", "value": "x"}],
        JSON_PATCH,
        422,
        "Invalid",
        None,
        id="json-patch-test-fails",
    ),
    pytest.param(
        "GET",
        f"{CMS}?labelSelector=" + urllib.parse.quote("a in b"),
        None,
        MERGE,
        400,
        "BadRequest",
        None,
        id="bad-label-selector",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "code", "reason", "details"), ERRORS
)
def test_errors_are_status_objects(
    http: Http,
    method: str,
    path: str,
    body: Any,
    content_type: str,
    code: int,
    reason: str,
    details: dict[str, str] | None,
) -> None:
    http.ok("POST", CMS, cm("taken", a="1"))
    status, result = http.call(method, path, body, content_type=content_type)
    assert (status, result["kind"], result["status"]) == (code, "Status", "Failure")
    assert (result["code"], result["reason"]) == (code, reason)
    if details is not None:
        assert result["details"] == details


# Object metadata and writes.


def test_metadata_of_created_and_updated_objects(http: Http) -> None:
    a, b = http.ok("POST", CMS, cm("a", x="1")), http.ok("POST", CMS, cm("b"))
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["metadata"]["creationTimestamp"])
    assert (a["metadata"]["generation"], a["kind"], a["apiVersion"]) == (1, "ConfigMap", "v1")
    assert rv(b) > rv(a)
    updated = http.ok("PUT", f"{CMS}/a", {**a, "data": {"x": "2"}})
    assert rv(updated) > rv(b)
    assert updated["metadata"]["uid"] == a["metadata"]["uid"]
    assert updated["metadata"]["creationTimestamp"] == a["metadata"]["creationTimestamp"]
    unchanged = http.ok("PUT", f"{CMS}/a", updated)  # a no-op write is not a write
    assert rv(unchanged) == rv(updated)

    generated = http.ok("POST", CMS, {"metadata": {"generateName": "gen-"}})
    assert re.fullmatch(r"gen-[a-z0-9]{5}", generated["metadata"]["name"])
    node = http.ok("POST", "/api/v1/nodes", {"metadata": {"name": "gw1", "namespace": "x"}})
    assert "namespace" not in node["metadata"]
    assert http.ok("GET", "/api/v1/nodes/gw1")["metadata"]["uid"] == node["metadata"]["uid"]


def test_services_get_a_cluster_ip_for_life(http: Http) -> None:
    services = "/api/v1/namespaces/default/services"
    first = http.ok("POST", services, {"metadata": {"name": "a"}, "spec": {"ports": []}})
    second = http.ok("POST", services, {"metadata": {"name": "b"}})
    headless = http.ok("POST", services, {"metadata": {"name": "c"}, "spec": {"clusterIP": "None"}})
    assert first["spec"]["clusterIP"].startswith("10.96.")
    assert first["spec"]["clusterIPs"] == [first["spec"]["clusterIP"]]
    assert first["spec"]["type"] == "ClusterIP"
    assert second["spec"]["clusterIP"] != first["spec"]["clusterIP"]
    assert headless["spec"]["clusterIP"] == "None"
    replaced = http.ok("PUT", f"{services}/a", {"metadata": {"name": "a"}, "spec": {}})
    assert replaced["spec"]["clusterIP"] == first["spec"]["clusterIP"]


def test_generation_and_status_subresource(http: Http) -> None:
    http.ok("POST", CRDS, WIDGET_CRD)
    created = http.ok("POST", WIDGETS, {**widget("w", size=1), "status": {"ready": True}})
    assert "status" not in created
    assert created["metadata"]["generation"] == 1

    relabelled = copy.deepcopy(created)
    relabelled["metadata"]["labels"] = {"a": "b"}
    relabelled["status"] = {"ready": True}
    put = http.ok("PUT", f"{WIDGETS}/w", relabelled)
    assert "status" not in put
    assert put["metadata"]["generation"] == 1

    resized = http.ok("PATCH", f"{WIDGETS}/w", {"spec": {"size": 2}}, content_type=MERGE)
    assert resized["metadata"]["generation"] == 2

    status_put = http.ok(
        "PUT", f"{WIDGETS}/w/status", {**resized, "spec": {"size": 99}, "status": {"ready": True}}
    )
    assert status_put["spec"] == {"size": 2}
    assert status_put["status"] == {"ready": True}
    assert status_put["metadata"]["generation"] == 2
    patched = http.ok(
        "PATCH", f"{WIDGETS}/w/status", {"status": {"phase": "Up"}}, content_type=MERGE
    )
    assert patched["status"] == {"ready": True, "phase": "Up"}
    assert http.ok("GET", f"{WIDGETS}/w/status")["status"] == patched["status"]


# Lists and selectors.


def test_list_shape_and_all_namespaces(http: Http) -> None:
    http.ok("POST", CMS, cm("a"))
    last = http.ok("POST", "/api/v1/namespaces/kube-system/configmaps", cm("b", "kube-system"))
    everywhere = http.ok("GET", "/api/v1/configmaps")
    assert (everywhere["kind"], everywhere["apiVersion"]) == ("ConfigMapList", "v1")
    assert everywhere["metadata"]["resourceVersion"] == last["metadata"]["resourceVersion"]
    assert [(i["kind"], i["apiVersion"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        ("ConfigMap", "v1", "a"),
        ("ConfigMap", "v1", "b"),
    ]
    assert [i["metadata"]["name"] for i in http.ok("GET", CMS)["items"]] == ["a"]
    deployments = http.ok("GET", "/apis/apps/v1/deployments")
    assert (deployments["kind"], deployments["apiVersion"]) == ("DeploymentList", "apps/v1")


@pytest.mark.parametrize(
    ("param", "selector", "names"),
    [
        ("labelSelector", "app=web", ["a"]),
        ("labelSelector", "app==db", ["b"]),
        ("labelSelector", "app!=web", ["b", "c"]),
        ("labelSelector", "app in (web,db)", ["a", "b"]),
        ("labelSelector", "app notin (web)", ["b", "c"]),
        ("labelSelector", "tier", ["a"]),
        ("labelSelector", "!tier", ["b", "c"]),
        ("labelSelector", "app in (web, db),!tier", ["b"]),
        ("fieldSelector", "metadata.name=a", ["a"]),
        ("fieldSelector", "metadata.name!=a", ["b", "c"]),
        ("fieldSelector", "metadata.namespace=default,metadata.name==c", ["c"]),
        ("fieldSelector", "metadata.namespace=kube-system", []),
    ],
)
def test_selectors(http: Http, param: str, selector: str, names: list[str]) -> None:
    for name, labels in (("a", {"app": "web", "tier": "front"}), ("b", {"app": "db"}), ("c", {})):
        http.ok("POST", CMS, cm(name, labels=labels))
    found = http.ok("GET", f"{CMS}?{param}={urllib.parse.quote(selector)}")["items"]
    assert [i["metadata"]["name"] for i in found] == names


# Server-side printing.


def test_tables_for_builtins_and_printer_columns(http: Http) -> None:
    http.ok("POST", CMS, cm("a"))
    table = http.ok("GET", CMS, headers={"Accept": TABLE})
    assert (table["kind"], table["apiVersion"]) == ("Table", "meta.k8s.io/v1")
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Age"]
    assert table["rows"][0]["cells"][0] == "a"
    assert re.fullmatch(r"\d+s", table["rows"][0]["cells"][1])
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"

    http.ok("POST", CRDS, WIDGET_CRD)
    http.ok("POST", WIDGETS, widget("w", targetIP="192.0.2.1", size=3))
    http.ok(
        "PATCH",
        f"{WIDGETS}/w/status",
        {
            "status": {
                "conditions": [
                    {"type": "Synced", "status": "False"},
                    {"type": "Ready", "status": "True"},
                ]
            }
        },
        content_type=MERGE,
    )
    table = http.ok("GET", f"{WIDGETS}/w?includeObject=Object", headers={"Accept": TABLE})
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Target",
        "Ready",
        "Size",
        "Age",
    ]
    assert table["rows"][0]["cells"][:4] == ["w", "192.0.2.1", "True", 3]
    assert table["rows"][0]["object"]["spec"]["size"] == 3


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (".spec.targetIP", ["192.0.2.1"]),
        ("{.spec.ports[1].port}", [443]),
        (".spec.ports[*].port", [80, 443]),
        ('.status.conditions[?(@.type=="Ready")].status', ["True"]),
        (".status.missing", []),
    ],
)
def test_printer_column_jsonpath(path: str, expected: list[Any]) -> None:
    obj = {
        "spec": {"targetIP": "192.0.2.1", "ports": [{"port": 80}, {"port": 443}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert jsonpath(obj, path) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (119, "119s"),
        (150, "2m30s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (10 * 3600, "10h"),
        (3 * 86400, "3d"),
    ],
)
def test_ages_render_like_kubectl(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


# Watch.


def test_watch_replays_changes_after_a_resource_version_in_order(http: Http) -> None:
    start = list_rv(http)
    http.ok("POST", CMS, cm("a"))
    http.ok("PATCH", f"{CMS}/a", {"data": {"k": "v"}}, content_type=MERGE)
    http.ok("DELETE", f"{CMS}/a")
    http.ok("POST", "/api/v1/namespaces/kube-system/configmaps", cm("b", "kube-system"))
    events = http.watch(f"{CMS}?watch=true&resourceVersion={start}", lambda e: len(e) == 3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
    ]
    versions = [rv(e["object"]) for e in events]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3
    assert all(e["object"]["kind"] == "ConfigMap" for e in events)


def test_watch_without_resource_version_lists_then_follows(http: Http) -> None:
    http.ok("POST", CMS, cm("a"))
    http.ok("POST", CMS, cm("b"))

    def until(events: list[Obj]) -> bool:
        if len(events) == 2:
            http.ok("POST", CMS, cm("c"))  # a live change, after the initial state
        return len(events) == 3

    events = http.watch(f"{CMS}?watch=1", until)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
    ]


def test_watch_list_ends_initial_events_with_a_bookmark(http: Http) -> None:
    http.ok("POST", CMS, cm("a"))
    events = http.watch(
        f"{CMS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"
        "&resourceVersionMatch=NotOlderThan",
        lambda e: len(e) == 2,
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_honours_selectors_and_scope(http: Http) -> None:
    start = list_rv(http)
    http.ok("POST", CMS, cm("x", labels={"app": "web"}))
    http.ok("POST", CMS, cm("y"))
    http.ok(
        "POST",
        "/api/v1/namespaces/kube-system/configmaps",
        cm("x", "kube-system", labels={"app": "web"}),
    )
    http.ok("PATCH", f"{CMS}/y", {"metadata": {"labels": {"app": "web"}}}, content_type=MERGE)
    http.ok("PATCH", f"{CMS}/x", {"metadata": {"labels": None}}, content_type=MERGE)

    by_label = http.watch(
        f"{CMS}?watch=true&labelSelector=app%3Dweb&resourceVersion={start}", lambda e: len(e) == 3
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in by_label] == [
        ("ADDED", "x"),
        ("ADDED", "y"),
        ("DELETED", "x"),
    ]  # entering and leaving the selector
    cluster_wide = http.watch(
        f"/api/v1/configmaps?watch=true&fieldSelector=metadata.name%3Dx&resourceVersion={start}",
        lambda e: len(e) == 3,
    )
    assert [(e["type"], e["object"]["metadata"]["namespace"]) for e in cluster_wide] == [
        ("ADDED", "default"),
        ("ADDED", "kube-system"),
        ("MODIFIED", "default"),
    ]


def test_watch_ends_at_timeout_seconds(http: Http) -> None:
    started = time.monotonic()
    assert http.watch(f"{CMS}?watch=true&timeoutSeconds=1", lambda e: False) == []
    assert time.monotonic() - started < 5


def test_watch_too_old_resource_version_is_410_in_stream() -> None:
    with ApiServer(history=2).run_in_thread() as server:
        client = Http(server.url)
        for name in "abcd":
            client.ok("POST", CMS, cm(name))
        events = client.watch(f"{CMS}?watch=true&resourceVersion=1", lambda e: False)
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [
        ("ERROR", 410, "Expired")
    ]


def test_watch_streams_end_cleanly_when_the_server_stops() -> None:
    outcome: list[object] = []
    with ApiServer().run_in_thread() as server:
        client = Http(server.url)

        def watch() -> None:
            try:
                outcome.append(client.watch(f"{CMS}?watch=true", lambda e: False, timeout=20))
            except Exception as e:
                outcome.append(e)

        reader = threading.Thread(target=watch)
        reader.start()
        wait_for(lambda: any(r.verb == "watch" for r in server.requests), what="the watch")
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert outcome == [[]]


# Patches.


@pytest.mark.parametrize(
    ("content_type", "body", "data"),
    [
        (MERGE, {"data": {"a": None, "c": "3"}}, {"b": "2", "c": "3"}),
        (
            JSON_PATCH,
            [
                {"op": "add", "path": "/data/c", "value": "3"},
                {"op": "remove", "path": "/data/a"},
                {"op": "replace", "path": "/data/b", "value": "x"},
                {"op": "test", "path": "/data/b", "value": "x"},
                {"op": "copy", "from": "/data/b", "path": "/data/d"},
                {"op": "move", "from": "/data/d", "path": "/data/e~1f"},
            ],
            {"b": "x", "c": "3", "e/f": "x"},
        ),
        (STRATEGIC, {"data": {"a": None}, "metadata": {"labels": {"k": "v"}}}, {"b": "2"}),
    ],
)
def test_patch_flavours(http: Http, content_type: str, body: Any, data: dict[str, str]) -> None:
    http.ok("POST", CMS, cm("p", a="1", b="2"))
    assert http.ok("PATCH", f"{CMS}/p", body, content_type=content_type)["data"] == data


def test_strategic_merge_directives(http: Http) -> None:
    services = "/api/v1/namespaces/default/services"
    http.ok(
        "POST",
        services,
        {
            "metadata": {"name": "s", "finalizers": ["a", "b"]},
            "spec": {
                "selector": {"app": "old", "tier": "x"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "https", "port": 443, "targetPort": 8443},
                    {"name": "alt", "port": 8080},
                ],
            },
        },
    )
    patched = http.ok(
        "PATCH",
        f"{services}/s",
        {
            "metadata": {
                "$deleteFromPrimitiveList/finalizers": ["a"],
                "$setElementOrder/finalizers": ["b", "c"],
                "finalizers": ["c"],
            },
            "spec": {
                "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
                "ports": [{"port": 80, "targetPort": 9090}, {"$patch": "delete", "port": 8080}],
                "selector": {"$patch": "replace", "app": "new"},
            },
        },
        content_type=STRATEGIC,
    )
    assert patched["metadata"]["finalizers"] == ["b", "c"]
    assert patched["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": 8443},
        {"name": "http", "port": 80, "targetPort": 9090},
    ]
    assert patched["spec"]["selector"] == {"app": "new"}

    deployments = "/apis/apps/v1/namespaces/default/deployments"
    http.ok(
        "POST",
        deployments,
        {
            "metadata": {"name": "d"},
            "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}},
        },
    )
    retained = http.ok(
        "PATCH",
        f"{deployments}/d",
        {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}},
        content_type=STRATEGIC,
    )
    assert retained["spec"]["strategy"] == {"type": "Recreate"}


# Deletion.


def test_finalizers_hold_deletion_until_removed(http: Http) -> None:
    start = list_rv(http)
    http.ok("POST", CMS, {**cm("f"), "metadata": {"name": "f", "finalizers": ["example/x"]}})
    marked = http.ok("DELETE", f"{CMS}/f")
    assert marked["metadata"]["deletionTimestamp"]
    assert http.ok("GET", f"{CMS}/f")["metadata"]["deletionTimestamp"]
    http.ok("PATCH", f"{CMS}/f", {"data": {"still": "writable"}}, content_type=MERGE)
    http.ok("PATCH", f"{CMS}/f", {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert http.call("GET", f"{CMS}/f")[0] == 404
    events = http.watch(f"{CMS}?watch=true&resourceVersion={start}", lambda e: len(e) == 5)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]


def test_namespace_deletion_takes_its_objects(http: Http) -> None:
    http.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    http.ok("POST", "/api/v1/namespaces/ns1/configmaps", cm("a", "ns1"))
    http.ok(
        "POST",
        "/api/v1/namespaces/ns1/configmaps",
        {"metadata": {"name": "held", "finalizers": ["example/x"]}},
    )
    http.ok("DELETE", "/api/v1/namespaces/ns1")
    assert http.ok("GET", "/api/v1/namespaces/ns1")["status"]["phase"] == "Terminating"
    assert http.call("GET", "/api/v1/namespaces/ns1/configmaps/a")[0] == 404
    status, refused = http.call("POST", "/api/v1/namespaces/ns1/configmaps", cm("late", "ns1"))
    assert (status, refused["reason"]) == (403, "Forbidden")
    http.ok(
        "PATCH",
        "/api/v1/namespaces/ns1/configmaps/held",
        {"metadata": {"finalizers": None}},
        content_type=MERGE,
    )
    assert http.call("GET", "/api/v1/namespaces/ns1")[0] == 404


def test_owner_references_are_garbage_collected(http: Http) -> None:
    owner = http.ok("POST", CMS, cm("owner"))
    other = http.ok("POST", CMS, cm("other"))

    def owned_by(name: str, *owners: Obj, namespace: str = "default") -> Obj:
        refs = [
            {
                "apiVersion": "v1",
                "kind": o["kind"],
                "name": o["metadata"]["name"],
                "uid": o["metadata"]["uid"],
            }
            for o in owners
        ]
        return {"metadata": {"name": name, "namespace": namespace, "ownerReferences": refs}}

    http.ok("POST", "/api/v1/namespaces/default/secrets", owned_by("dependent", owner))
    http.ok("POST", "/api/v1/namespaces/default/secrets", owned_by("shared", owner, other))
    http.ok(
        "POST",
        "/api/v1/namespaces/kube-system/secrets",
        owned_by("elsewhere", owner, namespace="kube-system"),
    )
    node = http.ok("POST", "/api/v1/nodes", {"metadata": {"name": "gw1"}})
    http.ok("POST", "/api/v1/namespaces/default/pods", owned_by("on-node", node))

    http.ok("DELETE", f"{CMS}/owner")
    http.ok("DELETE", "/api/v1/nodes/gw1")
    assert http.call("GET", "/api/v1/namespaces/default/secrets/dependent")[0] == 404
    assert http.call("GET", "/api/v1/namespaces/default/secrets/shared")[0] == 200
    assert http.call("GET", "/api/v1/namespaces/kube-system/secrets/elsewhere")[0] == 200
    assert http.call("GET", "/api/v1/namespaces/default/pods/on-node")[0] == 404


def test_delete_collection(http: Http) -> None:
    for name, labels in (("a", {"x": "1"}), ("b", {"x": "1"}), ("c", {})):
        http.ok("POST", CMS, cm(name, labels=labels))
    gone = http.ok("DELETE", f"{CMS}?labelSelector=x%3D1")
    assert [i["metadata"]["name"] for i in gone["items"]] == ["a", "b"]
    assert [i["metadata"]["name"] for i in http.ok("GET", CMS)["items"]] == ["c"]


# Admission.


def test_admission_hook_mutates_pods_on_create(apiserver: ApiServer, http: Http) -> None:
    seen: list[Obj] = []

    def inject(pod: Obj) -> Obj:
        seen.append(copy.deepcopy(pod))
        pod["spec"]["initContainers"] = [{"name": "sidecar", "restartPolicy": "Always"}]
        return pod

    apiserver.admission_hook = inject
    pod = http.ok(
        "POST",
        "/api/v1/namespaces/default/pods",
        {"metadata": {"generateName": "app-"}, "spec": {"containers": [{"name": "app"}]}},
    )
    assert pod["spec"]["initContainers"][0]["name"] == "sidecar"
    assert seen[0]["metadata"] == {"generateName": "app-", "namespace": "default"}
    http.ok("POST", CMS, cm("not-a-pod"))
    assert len(seen) == 1


async def _async_no_change(pod: Obj) -> None:
    return None


def _deny(pod: Obj) -> Obj:
    raise ApiError(403, "Forbidden", 'admission webhook "inject" denied the request: no')


def _broken(pod: Obj) -> Obj:
    raise RuntimeError("connection refused")


@pytest.mark.parametrize(("hook", "code"), [(_async_no_change, 201), (_deny, 403), (_broken, 500)])
def test_admission_hook_outcomes(apiserver: ApiServer, http: Http, hook: Any, code: int) -> None:
    apiserver.admission_hook = hook
    status, _ = http.call("POST", "/api/v1/namespaces/default/pods", {"metadata": {"name": "p"}})
    assert status == code
    assert (apiserver.get_object("", "v1", "pods", "default", "p") is not None) == (code == 201)


# Recording and direct store access.


def test_requests_are_recorded_in_rbac_terms(
    apiserver: ApiServer, http: Http, kubectl: Kubectl
) -> None:
    http.ok("POST", CRDS, WIDGET_CRD)
    http.ok("POST", WIDGETS, widget("w"))
    http.ok("PATCH", f"{WIDGETS}/w/status", {"status": {"a": 1}}, content_type=MERGE)
    http.watch("/api/v1/pods?watch=true&timeoutSeconds=1", lambda e: False)
    kubectl("get", "leases", "-n", "kube-system")
    seen = {
        (r.verb, r.api_group, r.resource, r.subresource, r.namespace) for r in apiserver.requests
    }
    assert {
        ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", ""),
        ("create", "example.com", "widgets", "", "default"),
        ("patch", "example.com", "widgets", "status", "default"),
        ("watch", "", "pods", "", ""),
        ("list", "coordination.k8s.io", "leases", "", "kube-system"),
    } <= seen
    by_kubectl = [r for r in apiserver.requests if r.resource == "leases"]
    assert by_kubectl[0].user_agent.startswith("kubectl")


def test_direct_store_access(apiserver: ApiServer, http: Http) -> None:
    apiserver.create_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    assert http.ok("GET", "/api/v1/nodes/n1")["kind"] == "Node"
    http.ok("POST", CMS, cm("a", k="v"))
    assert stored(apiserver, "", "configmaps", "default", "a")["data"] == {"k": "v"}
    assert apiserver.get_object("", "v1", "configmaps", "default", "nope") is None
    assert [o["metadata"]["name"] for o in apiserver.list_objects("", "v1", "namespaces")] == [
        "default",
        "kube-node-lease",
        "kube-public",
        "kube-system",
    ]


# kubectl as a user.

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: my-service1, namespace: ns1, labels: {app: a}}
spec:
  selector: {app: a}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
"""


def test_kubectl_create_apply_get_label_delete(apiserver: ApiServer, kubectl: Kubectl) -> None:
    assert "created" in kubectl("create", "ns", "ns1").stdout
    assert "created" in kubectl("apply", "-f", "-", input=SERVICE).stdout
    assert "unchanged" in kubectl("apply", "-f", "-", input=SERVICE).stdout
    edited = SERVICE.replace("targetPort: 8080", "targetPort: 9090")
    assert "configured" in kubectl("apply", "-f", "-", input=edited).stdout
    svc = stored(apiserver, "", "services", "ns1", "my-service1")
    assert svc["spec"]["ports"][0] == {"name": "http", "port": 80, "targetPort": 9090}
    assert "kubectl.kubernetes.io/last-applied-configuration" in svc["metadata"]["annotations"]

    as_yaml = yaml.safe_load(kubectl("get", "svc", "-n", "ns1", "-o", "yaml").stdout)
    assert as_yaml["items"][0]["metadata"]["name"] == "my-service1"
    as_json = yaml.safe_load(
        kubectl("get", "service", "my-service1", "-n", "ns1", "-o", "json").stdout
    )
    assert as_json["kind"] == "Service"
    everywhere = kubectl("get", "svc", "-A").stdout.split("\n")
    assert everywhere[0].split() == ["NAMESPACE", "NAME", "AGE"]
    assert everywhere[1].split()[:2] == ["ns1", "my-service1"]

    kubectl("label", "svc", "my-service1", "-n", "ns1", "tier=web")
    assert "my-service1" in kubectl("get", "svc", "-A", "-l", "tier=web").stdout
    assert "my-service1" not in kubectl("get", "svc", "-A", "-l", "tier!=web").stdout
    kubectl("annotate", "svc", "my-service1", "-n", "ns1", "note=hi")

    kubectl("create", "configmap", "c1", "-n", "ns1", "--from-literal=k=v")  # protobuf bodies
    kubectl("create", "secret", "generic", "s1", "-n", "ns1", "--from-literal=k=v")
    assert stored(apiserver, "", "configmaps", "ns1", "c1")["data"] == {"k": "v"}
    assert stored(apiserver, "", "secrets", "ns1", "s1")["data"] == {"k": "dg=="}

    assert "deleted" in kubectl("delete", "-f", "-", input=edited).stdout
    assert apiserver.get_object("", "v1", "services", "ns1", "my-service1") is None
    kubectl("delete", "ns", "ns1")
    assert kubectl("get", "ns", "ns1", check=False).returncode != 0


def test_kubectl_custom_resources(apiserver: ApiServer, kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump(WIDGET_CRD))
    kubectl("apply", "-f", "-", input=yaml.safe_dump(widget("w1", targetIP="192.0.2.7", size=2)))
    lines = kubectl("get", "wdg").stdout.splitlines()
    assert lines[0].split() == ["NAME", "TARGET", "READY", "AGE"]
    assert lines[1].split()[:2] == ["w1", "192.0.2.7"]  # READY is empty: no status yet
    assert kubectl("get", "widgets", "-o", "wide").stdout.splitlines()[0].split() == [
        "NAME",
        "TARGET",
        "READY",
        "SIZE",
        "AGE",
    ]
    assert "w1" in kubectl("get", "gadgetry").stdout  # by category
    edited = widget("w1", targetIP="192.0.2.8", size=2)
    assert "configured" in kubectl("apply", "-f", "-", input=yaml.safe_dump(edited)).stdout
    assert stored(apiserver, "example.com", "widgets", "default", "w1")["spec"] == {
        "targetIP": "192.0.2.8",
        "size": 2,
    }
    kubectl("delete", "widget", "w1")
    assert apiserver.get_object("example.com", "v1", "widgets", "default", "w1") is None


def test_kubectl_applies_the_project_crd(kubectl: Kubectl) -> None:
    """The chart's CRD is accepted and its printer columns are what ``kubectl get`` shows."""
    path = (
        Path(__file__).parents[2]
        / "charts"
        / "k8s-ext-connector"
        / "crds"
        / "externalservices.submariner.io.yaml"
    )
    crd = yaml.safe_load(path.read_text())
    kubectl("apply", "-f", str(path))
    kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "submariner.io/v1alpha1",
                "kind": "ExternalService",
                "metadata": {"name": "my-externalservice"},
                "spec": {
                    "targetIP": "192.168.122.139",
                    "ports": [{"port": 8000}],
                    "sources": [
                        {
                            "service": {"namespace": "ns1", "name": "my-service1"},
                            "sourceIP": "192.168.122.200",
                        }
                    ],
                },
            }
        ),
    )
    short = crd["spec"]["names"]["shortNames"][0]
    header = kubectl("get", short).stdout.splitlines()[0].split()
    columns = [
        c["name"].upper()
        for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
        if not c.get("priority")
    ]
    assert header == ["NAME", *columns]


def test_kubectl_get_watch(apiserver: ApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    binary = shutil.which("kubectl")
    assert binary is not None, "kubectl is required (scripts/install.sh installs it)"
    watcher = subprocess.Popen(
        [
            binary,
            "--kubeconfig",
            str(kubeconfig),
            "--cache-dir",
            str(tmp_path / "c"),
            "get",
            "configmaps",
            "-w",
            "-o",
            "name",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(r.verb == "watch" for r in apiserver.requests), what="kubectl -w")
        apiserver.create_object(cm("seen"))
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "configmap/seen"
    finally:
        watcher.terminate()
        watcher.wait(timeout=5)
