"""The watch cache: pure state, the list+watch loop with a fake client, and KubeClient's
``list``/``watch`` plus ``follow`` against the project's API emulator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import (
    EXTERNALSERVICES,
    SERVICES,
    ApiError,
    Credentials,
    KubeClient,
    Resource,
)
from k8s_ext_connector.webhook.cache import SourceCache, WatchSettings, follow
from k8s_ext_connector_testbed.emulator import ApiServer
from tests.unit.samples import seed_spec

Obj = dict[str, Any]
CRD = (
    Path(__file__).parents[2]
    / "charts"
    / "k8s-ext-connector"
    / "crds"
    / "externalservices.submariner.io.yaml"
)
S1, S2 = ServiceRef("ns1", "my-service1"), ServiceRef("ns2", "my-service2")


def service(namespace: str, name: str, rv: str = "1", **selector: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv},
        "spec": {"selector": selector, "ports": [{"port": 80}]},
    }


def externalservice(name: str = "es", spec: Obj | None = None, rv: str = "1", **meta: Any) -> Obj:
    return {
        "apiVersion": "submariner.io/v1alpha1",
        "kind": "ExternalService",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv, **meta},
        "spec": seed_spec() if spec is None else spec,
    }


def pod(namespace: str = "ns1", **labels: str) -> Obj:
    return {"metadata": {"name": "p", "namespace": namespace, "labels": labels}}


# -- SourceCache -------------------------------------------------------------------------


def full_cache() -> SourceCache:
    cache = SourceCache()
    cache.replace_services(
        [
            service("ns1", "my-service1", app="my-app"),
            service("ns1", "not-a-source", app="my-app"),
            service("ns2", "my-service2", app="two", tier="web"),
        ]
    )
    cache.replace_externalservices([externalservice()])
    cache.mark_synced("services")
    cache.mark_synced("externalservices")
    return cache


def test_sources_for_pods() -> None:
    cache = full_cache()
    assert cache.sources_for(pod(app="my-app")) == (S1,)
    assert cache.sources_for(pod(app="other")) == ()
    assert cache.sources_for(pod("ns2", app="two")) == ()  # selector needs both labels
    assert cache.sources_for(pod("ns2", app="two", tier="web", x="y")) == (S2,)
    assert cache.sources_for(pod("ns3", app="my-app")) == ()
    assert cache.sources_for({"metadata": {}}) == ()
    assert cache.counts() == (3, 1)


def test_ready_only_after_both_lists() -> None:
    cache = SourceCache()
    assert not cache.ready
    cache.mark_synced("services")
    assert not cache.ready
    cache.mark_synced("externalservices")
    assert cache.ready


def test_invalid_or_deleting_externalservices_select_nothing() -> None:
    cache = full_cache()
    cache.put_externalservice(externalservice(spec={"targetIP": "nope"}))
    assert cache.sources_for(pod(app="my-app")) == ()
    cache.put_externalservice(externalservice())
    assert cache.sources_for(pod(app="my-app")) == (S1,)
    cache.put_externalservice(externalservice(deletionTimestamp="2026-01-01T00:00:00Z"))
    assert cache.sources_for(pod(app="my-app")) == ()


def test_a_source_of_two_externalservices_stays_until_both_are_gone() -> None:
    cache = full_cache()
    cache.put_externalservice(externalservice("second"))
    cache.delete_externalservice(externalservice())
    assert cache.sources_for(pod(app="my-app")) == (S1,)
    cache.delete_externalservice(externalservice("second"))
    assert cache.sources_for(pod(app="my-app")) == ()
    cache.delete_externalservice(externalservice("never-there"))  # harmless


def test_service_changes() -> None:
    cache = full_cache()
    cache.put_service(service("ns1", "my-service1", app="renamed"))
    assert cache.sources_for(pod(app="my-app")) == ()
    assert cache.sources_for(pod(app="renamed")) == (S1,)
    cache.delete_service(service("ns1", "my-service1"))
    assert cache.sources_for(pod(app="renamed")) == ()
    cache.put_service({"metadata": {"namespace": "ns1", "name": "my-service1"}, "spec": {}})
    assert cache.sources_for(pod(app="renamed")) == ()  # no selector selects nothing


def test_a_source_service_created_after_its_externalservice() -> None:
    cache = SourceCache()
    cache.put_externalservice(externalservice())
    assert cache.sources_for(pod("ns2", app="b")) == ()  # no Service yet (remembered)
    cache.put_service(service("ns2", "my-service2", app="b"))
    assert cache.sources_for(pod("ns2", app="b")) == (S2,)


def test_relist_replaces_everything() -> None:
    cache = full_cache()
    cache.replace_services([service("ns1", "my-service1", app="v2")])
    cache.replace_externalservices([])
    assert cache.sources_for(pod(app="v2")) == ()
    assert cache.counts() == (1, 0)


# -- the list+watch loop, with a scripted client ------------------------------------------


class ScriptedClient:
    """``list`` answers from ``lists``; each ``watch`` plays the next script entry (a list
    of events, or an exception raised after them). Records what was asked."""

    def __init__(self, lists: dict[str, list[Obj]], scripts: dict[str, list[Any]]) -> None:
        self.lists = lists
        self.scripts = scripts
        self.listed: list[str] = []
        self.watched: list[tuple[str, str]] = []

    async def list(
        self, resource: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> dict[str, Any]:
        self.listed.append(resource.plural)
        version = "11" if resource.plural == "services" else "12"
        return {"items": self.lists[resource.plural], "metadata": {"resourceVersion": version}}

    async def watch(
        self, resource: Resource, resource_version: str, timeout_seconds: int
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.watched.append((resource.plural, resource_version))
        script = self.scripts[resource.plural]
        step = script.pop(0) if script else []
        if not script and not step:
            await asyncio.Event().wait()  # nothing more to say: hang like a quiet watch
        for item in step if isinstance(step, list) else [step]:
            if isinstance(item, Exception):
                raise item
            yield item


def run_until(client: ScriptedClient, cache: SourceCache, done: Any, timeout: float = 5) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(
            follow(cache, client, WatchSettings(backoff_initial=0.001, backoff_max=0.01))
        )
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_watch_events_after_the_list_and_resume_from_the_last_version() -> None:
    added = {"type": "ADDED", "object": service("ns1", "late", rv="20", app="late")}
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "25"}}}
    client = ScriptedClient(
        {"services": [service("ns1", "my-service1", app="my-app")], "externalservices": []},
        {
            "services": [
                [added, bookmark, TransientError("connection reset")],
                [{"type": "DELETED", "object": service("ns1", "my-service1", rv="30")}],
            ],
            "externalservices": [[{"type": "ADDED", "object": externalservice(rv="21")}]],
        },
    )
    cache = SourceCache()
    run_until(
        client, cache, lambda: ("services", "30") in client.watched or len(client.watched) > 4
    )
    assert cache.ready
    assert cache.sources_for(pod(app="my-app")) == ()  # deleted by the second watch
    # the first watch starts at the list's version; after the error it resumes at the
    # bookmark's version; after the second stream ends, at the deletion's version
    services = [v for p, v in client.watched if p == "services"]
    assert services[:3] == ["11", "25", "30"]
    assert client.listed.count("services") == 1


def test_gone_lists_again() -> None:
    client = ScriptedClient(
        {"services": [service("ns1", "my-service1", app="my-app")], "externalservices": []},
        {
            "services": [[ApiError(410, "Expired", "too old resource version")]],
            "externalservices": [],
        },
    )
    cache = SourceCache()
    cache.put_service(service("ns1", "stale", app="my-app"))  # must vanish on relist
    run_until(client, cache, lambda: client.listed.count("services") >= 2)
    assert cache.counts()[0] == 1


def test_malformed_objects_select_nothing() -> None:
    cache = full_cache()
    cache.put_externalservice(externalservice(generation="not a number"))
    assert cache.sources_for(pod(app="my-app")) == ()
    cache.put_service({"metadata": {"namespace": "ns1", "name": "x"}, "spec": {"selector": 3}})
    assert cache.counts() == (4, 0)


def test_an_unexpected_failure_lists_again() -> None:
    client = ScriptedClient(
        {"services": [service("ns1", "my-service1", app="my-app")], "externalservices": []},
        {"services": [[RuntimeError("a bug")]], "externalservices": []},
    )
    cache = SourceCache()
    run_until(client, cache, lambda: client.listed.count("services") >= 2)


def test_list_failures_retry_and_the_cache_is_not_ready_meanwhile() -> None:
    class Failing(ScriptedClient):
        failures = 3

        async def list(self, resource: Resource, *args: Any, **kw: Any) -> dict[str, Any]:
            if resource.plural == "externalservices" and self.failures:
                self.failures -= 1
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return await super().list(resource)

    client = Failing(
        {"services": [], "externalservices": []}, {"services": [], "externalservices": []}
    )
    cache = SourceCache()
    run_until(client, cache, lambda: cache.ready)
    assert client.failures == 0


# -- KubeClient list/watch and follow() against the emulator -----------------------------


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer(history=5).run_in_thread() as server:
        server.create_object(yaml.safe_load(CRD.read_text()))
        for ns in ("ns1", "ns2"):
            server.create_object(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            )
        yield server


def test_list_and_watch(api: ApiServer) -> None:
    api.create_object(service("ns1", "a", app="a"))

    async def scenario() -> None:
        async with KubeClient(Credentials(server=api.url)) as client:
            listing = await client.list(SERVICES)
            assert [i["metadata"]["name"] for i in listing["items"]] == ["a"]
            assert (await client.list(SERVICES, "ns2"))["items"] == []
            api.create_object(
                {
                    **service("ns1", "b"),
                    "metadata": {"name": "b", "namespace": "ns1", "labels": {"x": "y"}},
                }
            )
            assert [
                i["metadata"]["name"]
                for i in (await client.list(SERVICES, label_selector="x=y"))["items"]
            ] == ["b"]
            events = [
                e async for e in client.watch(SERVICES, listing["metadata"]["resourceVersion"], 1)
            ]
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", "b")
            ]

    asyncio.run(scenario())


def test_watch_from_a_compacted_version_is_gone(api: ApiServer) -> None:
    for i in range(8):  # more writes than the history holds
        api.create_object(service("ns1", f"s{i}"))

    async def scenario() -> None:
        async with KubeClient(Credentials(server=api.url)) as client:
            with pytest.raises(ApiError) as gone:
                async for _ in client.watch(SERVICES, "1", 5):
                    pass
            assert gone.value.status == 410

    asyncio.run(scenario())


def test_watch_connection_failure_is_transient() -> None:
    async def scenario() -> None:
        async with KubeClient(Credentials(server="http://127.0.0.1:9")) as client:
            with pytest.raises(TransientError):
                async for _ in client.watch(EXTERNALSERVICES, "1", 5):
                    pass

    asyncio.run(scenario())


def watches(api: ApiServer, plural: str) -> int:
    return sum(1 for r in list(api.requests) if (r.verb, r.resource) == ("watch", plural))


def test_follow_keeps_the_cache_current(api: ApiServer) -> None:
    api.create_object(service("ns1", "my-service1", app="my-app"))

    async def scenario() -> None:
        cache = SourceCache()
        async with KubeClient(Credentials(server=api.url)) as client:
            task = asyncio.create_task(follow(cache, client, WatchSettings(timeout_seconds=1)))

            async def until(check: Any, what: str) -> None:
                try:
                    async with asyncio.timeout(5):
                        while not check():
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    raise AssertionError(f"timed out waiting for {what}") from None

            try:
                await until(lambda: cache.ready, "the initial lists")
                assert cache.sources_for(pod(app="my-app")) == ()
                await asyncio.to_thread(api.create_object, externalservice())
                await until(lambda: cache.sources_for(pod(app="my-app")) == (S1,), "the ES")
                await asyncio.to_thread(api.create_object, service("ns2", "my-service2", app="b"))
                await until(lambda: cache.sources_for(pod("ns2", app="b")) == (S2,), "the Service")
                # past a server-side watch timeout (1 s), the watch resumes; then delete
                await until(lambda: watches(api, "externalservices") >= 2, "a second watch")
                await client.delete(EXTERNALSERVICES, "default", "es")
                await until(lambda: cache.sources_for(pod(app="my-app")) == (), "the deletion")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    asyncio.run(scenario())
