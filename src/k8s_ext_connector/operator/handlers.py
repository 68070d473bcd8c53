"""kopf glue: watch-fed indexes, change triggers, the ExternalService finalizer.

Handlers are registered on a registry passed in (not kopf's global one), so a test can run
several operators in one process. Every watched change only marks the world dirty; the
``Reconciler`` does the work (one pass for any burst of events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import kopf

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.errors import TransientError
from k8s_ext_connector.core.kube import Credentials, KubeClient
from k8s_ext_connector.operator.desired import OperatorSettings, Snapshot
from k8s_ext_connector.operator.leases import GatewayLeases
from k8s_ext_connector.operator.leases import follow as follow_leases
from k8s_ext_connector.operator.reconciler import Observed, Reconciler
from k8s_ext_connector.operator.snapshot import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    ExternalServiceRecord,
    ManagedConfigMap,
    NodeRecord,
    PodRecord,
    ServiceRecord,
    configmap_record,
    externalservice_record,
    node_record,
    pod_record,
    service_record,
)

log = logging.getLogger(__name__)
ALL = "all"  # every index keeps its records under one key: a reconcile reads them all
FINALIZER = "ext-connector.submariner.io/cleanup"
ANNOTATION_PREFIX = "ext-connector.submariner.io"
ES = ("submariner.io", "v1alpha1", "externalservices")


def _values(index: Any) -> list[Any]:
    return list(index.get(ALL, ())) if index is not None else []


class Views:
    """Holds the live kopf indexes once the first handler hands them over, and the
    gateways' reports (``operator/leases.py``, not a kopf index: see there)."""

    def __init__(self) -> None:
        self.indexes: dict[str, Any] = {}
        self.gateway_leases = GatewayLeases()

    def capture(self, kwargs: dict[str, Any]) -> None:
        for name in ("es_index", "service_index", "node_index", "pod_index", "cm_index"):
            if name in kwargs:
                self.indexes[name] = kwargs[name]

    def snapshot(self) -> Snapshot:
        if len(self.indexes) < 5:  # never plan from a partial view: it would delete things
            raise TransientError("watch caches not populated yet")
        ess: list[ExternalServiceRecord] = _values(self.indexes.get("es_index"))
        # Earlier claims win conflicts. Those already accepted go first, so that a newcomer
        # created in the same second (timestamps have 1 s resolution) never displaces them.
        ess.sort(key=lambda es: (not es.accepted, es.created, es.namespace, es.name))
        services: list[ServiceRecord] = _values(self.indexes.get("service_index"))
        nodes: list[NodeRecord] = _values(self.indexes.get("node_index"))
        pods: list[PodRecord] = _values(self.indexes.get("pod_index"))
        return Snapshot(
            externalservices=ess,
            services={s.ref: s for s in services},
            nodes=sorted(nodes, key=lambda n: n.name),
            pods=pods,
            gateway_leases=self.gateway_leases.records(),
        )

    def configmaps(self) -> list[ManagedConfigMap]:
        return _values(self.indexes.get("cm_index"))

    def managed_services(self, connector_namespace: str) -> list[ServiceRecord]:
        return [
            s
            for s in _values(self.indexes.get("service_index"))
            if s.ref.namespace == connector_namespace and (MANAGED_BY_LABEL, MANAGED_BY) in s.labels
        ]


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    credentials: Credentials,
    on_reconciler: Callable[[Reconciler], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Attach every handler of the operator to ``registry``."""
    views = Views()
    state: dict[str, Any] = {}
    managed = {MANAGED_BY_LABEL: MANAGED_BY}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf calls this again after a 401: a rotated token file is read then."""
        token = credentials.bearer()
        return kopf.ConnectionInfo(
            server=credentials.server,
            token=token,
            scheme="Bearer" if token else None,
            ca_path=credentials.ca_file,
            certificate_path=credentials.cert_file,
            private_key_path=credentials.key_file,
            default_namespace=settings.connector_namespace,
        )

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        client = KubeClient(credentials)
        reconciler = Reconciler(
            client,
            settings_,
            Observed(
                snapshot=views.snapshot,
                configmaps=views.configmaps,
                managed_services=lambda: views.managed_services(settings_.connector_namespace),
            ),
        )
        state["client"] = client
        state["reconciler"] = reconciler
        state["task"] = asyncio.create_task(reconciler.run(), name="reconciler")
        state["leases"] = asyncio.create_task(
            follow_leases(
                views.gateway_leases, client, settings_.connector_namespace, reconciler.trigger
            ),
            name="gateway-leases",
        )
        if on_reconciler is not None:
            on_reconciler(reconciler)

    settings_ = settings

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for key in ("leases", "task"):
            task = state.get(key)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if "client" in state:
            await state["client"].close()
        if on_stop is not None:
            on_stop()  # release the stop-flag waiter when a signal, not the flag, stopped kopf

    @kopf.index(*ES, id="es_index", registry=registry)
    def es_index(body: kopf.Body, **_: Any) -> dict[str, ExternalServiceRecord]:
        return {ALL: externalservice_record(body)}

    @kopf.index("", "v1", "services", id="service_index", registry=registry)
    def service_index(body: kopf.Body, **_: Any) -> dict[str, ServiceRecord]:
        return {ALL: service_record(body)}

    @kopf.index("", "v1", "nodes", id="node_index", registry=registry)
    def node_index(body: kopf.Body, **_: Any) -> dict[str, NodeRecord]:
        return {ALL: node_record(body)}

    @kopf.index("", "v1", "pods", id="pod_index", registry=registry)
    def pod_index(body: kopf.Body, **_: Any) -> dict[str, PodRecord]:
        return {ALL: pod_record(body)}

    @kopf.index("", "v1", "configmaps", labels=managed, id="cm_index", registry=registry)
    def cm_index(body: kopf.Body, **_: Any) -> dict[str, ManagedConfigMap]:
        return {ALL: configmap_record(body)}

    def changed(**kwargs: Any) -> None:
        views.capture(kwargs)
        reconciler = state.get("reconciler")
        if reconciler is not None:
            reconciler.trigger()

    for resource, options in (
        (ES, {}),
        (("", "v1", "services"), {}),
        (("", "v1", "nodes"), {}),
        (("", "v1", "pods"), {}),
        (("", "v1", "configmaps"), {"labels": managed}),
    ):
        kopf.on.event(*resource, registry=registry, **options)(changed)  # type: ignore[arg-type]

    @kopf.on.delete(*ES, registry=registry)
    async def cleanup_externalservice(namespace: str | None, name: str, **kwargs: Any) -> None:
        """Runs while our finalizer holds the object: remove what it contributed first."""
        views.capture(kwargs)
        reconciler: Reconciler | None = state.get("reconciler")
        if reconciler is None:
            raise kopf.TemporaryError("operator still starting", delay=1)
        await reconciler.reconcile_exclusive(deleting=ServiceRef(namespace or "", name))
        log.info("cleaned up after ExternalService %s/%s", namespace, name)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings that fit a CRD with a pruned, schema-checked status."""
    # Our status schema has no room for kopf's own bookkeeping: keep it in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # our own Events say what matters
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]


def resources_watched() -> Iterable[tuple[str, str, str]]:
    return (
        ES,
        ("", "v1", "services"),
        ("", "v1", "nodes"),
        ("", "v1", "pods"),
        ("", "v1", "configmaps"),
    )
