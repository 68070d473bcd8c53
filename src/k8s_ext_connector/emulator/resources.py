"""Which resource types the emulator serves, and the discovery documents that describe them.

Clients learn everything from discovery (kubectl's RESTMapper, kopf's resource scan), so a
type registered here is all it takes to serve a built-in or a CRD-defined resource.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from k8s_ext_connector.emulator.errors import ApiError

Obj = dict[str, Any]
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
CRD_GROUP, CRD_PLURAL = "apiextensions.k8s.io", "customresourcedefinitions"


@dataclass(frozen=True)
class PrinterColumn:
    """A CRD ``additionalPrinterColumns`` entry: what ``kubectl get`` shows for it."""

    name: str
    type: str
    json_path: str
    format: str = ""
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ResourceType:
    """One served group/version/resource."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = False  # has a status subresource
    columns: tuple[PrinterColumn, ...] = ()
    singular: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The group-qualified resource, as the real server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def path_prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def discovery(self) -> list[Obj]:
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
            "shortNames": list(self.short_names),
            "categories": list(self.categories),
        }
        if not self.status:
            return [main]
        status = {"name": f"{self.plural}/status", "singularName": "", "kind": self.kind,
                  "namespaced": self.namespaced, "verbs": ["get", "patch", "update"]}
        return [main, status]


def _builtin(spec: str) -> ResourceType:
    """Parse ``group/version plural Kind scope shortnames flags``; plural ``*``: kind + s."""
    gv, plural, kind, scope, shorts, flags = spec.split()
    group, _, version = gv.rpartition("/")
    return ResourceType(
        group=group, version=version, kind=kind, namespaced=scope == "ns",
        plural=kind.lower() + "s" if plural == "*" else plural,
        short_names=tuple(s for s in shorts.split(",") if s != "-"),
        categories=("all",) if "all" in flags else (), status="status" in flags,
    )


_BUILTINS = [_builtin(line) for line in """
    v1 namespaces Namespace cluster ns status
    v1 nodes Node cluster no status
    v1 services Service ns svc status,all
    v1 endpoints Endpoints ns ep -
    v1 pods Pod ns po status,all
    v1 secrets Secret ns - -
    v1 configmaps ConfigMap ns cm -
    v1 events Event ns ev -
    v1 serviceaccounts ServiceAccount ns sa -
    events.k8s.io/v1 events Event ns ev -
    coordination.k8s.io/v1 leases Lease ns - -
    apps/v1 deployments Deployment ns deploy status,all
    apps/v1 daemonsets DaemonSet ns ds status,all
    apiextensions.k8s.io/v1 * CustomResourceDefinition cluster crd,crds status
    admissionregistration.k8s.io/v1 * MutatingWebhookConfiguration cluster - -
    admissionregistration.k8s.io/v1 * ValidatingWebhookConfiguration cluster - -
    rbac.authorization.k8s.io/v1 roles Role ns - -
    rbac.authorization.k8s.io/v1 rolebindings RoleBinding ns - -
    rbac.authorization.k8s.io/v1 clusterroles ClusterRole cluster - -
    rbac.authorization.k8s.io/v1 clusterrolebindings ClusterRoleBinding cluster - -
""".strip().splitlines()]


def crd_types(crd: Obj) -> list[ResourceType]:
    """The served versions of a CustomResourceDefinition; 422 Invalid for a malformed one."""
    spec, name = crd.get("spec") or {}, crd.get("metadata", {}).get("name", "")
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not (group and plural and kind and spec.get("versions")):
        raise ApiError.invalid(CRD_PLURAL, name, "spec.group, spec.names and spec.versions")
    if name != f"{plural}.{group}":
        raise ApiError.invalid(CRD_PLURAL, name, f"metadata.name must be {plural}.{group}")
    return [
        ResourceType(
            group=group, version=v["name"], plural=plural, kind=kind,
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames", [])),
            categories=tuple(names.get("categories", [])),
            status="status" in (v.get("subresources") or {}),
            singular=names.get("singular", kind.lower()),
            columns=tuple(
                PrinterColumn(c["name"], c.get("type", "string"), c["jsonPath"],
                              c.get("format", ""), c.get("description", ""), c.get("priority", 0))
                for c in v.get("additionalPrinterColumns", [])
            ),
        )
        for v in spec["versions"] if v.get("served", True)
    ]


class Registry:
    """Served types by (group, version, plural), in registration order."""

    def __init__(self) -> None:
        self._types = {(t.group, t.version, t.plural): t for t in _BUILTINS}

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def any_version(self, group: str, plural: str) -> ResourceType | None:
        return next((t for t in self._types.values() if (t.group, t.plural) == (group, plural)),
                    None)

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        return next((t for t in self._types.values()
                     if (t.api_version, t.kind) == (api_version, kind)), None)

    def register(self, types: list[ResourceType]) -> None:
        for t in types:
            self._types[(t.group, t.version, t.plural)] = t

    def unregister(self, group: str, plural: str) -> None:
        self._types = {k: t for k, t in self._types.items() if (k[0], k[2]) != (group, plural)}

    def group_versions(self) -> dict[str, list[str]]:
        """Group -> versions, the first being the preferred one."""
        out: dict[str, list[str]] = {}
        for t in self._types.values():
            versions = out.setdefault(t.group, [])
            if t.version not in versions:
                versions.append(t.version)
        return out

    # Discovery documents (legacy, non-aggregated: kubectl falls back to these).

    def api_versions(self) -> Obj:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}

    def api_group(self, group: str) -> Obj:
        versions = [{"groupVersion": f"{group}/{v}", "version": v}
                    for v in self.group_versions().get(group, [])]
        if not versions:
            raise ApiError.not_found_path()
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
                "preferredVersion": versions[0]}

    def api_group_list(self) -> Obj:
        groups = [self.api_group(g) for g in self.group_versions() if g]
        for g in groups:
            del g["kind"], g["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def resource_list(self, group: str, version: str) -> Obj:
        types = [t for t in self._types.values() if (t.group, t.version) == (group, version)]
        if not types:
            raise ApiError.not_found_path()
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": types[0].api_version,
                "resources": [entry for t in types for entry in t.discovery()]}

    # OpenAPI v3: just enough for kubectl to trust server-side field validation.

    def openapi_gv(self, group: str, version: str) -> Obj:
        """Each PATCH path lists ``fieldValidation``, so kubectl skips client-side validation.

        No strategic-merge content type is advertised: kubectl then computes strategic merge
        patches from its compiled-in types (built-ins) and merge patches for CRs, as it does
        against a real server.
        """
        paths: Obj = {}
        for t in self._types.values():
            if (t.group, t.version) != (group, version):
                continue
            ns = "/namespaces/{namespace}" if t.namespaced else ""
            gvk = {"group": t.group, "version": t.version, "kind": t.kind}
            paths[f"{t.path_prefix}{ns}/{t.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [{"name": "fieldValidation", "in": "query",
                                "schema": {"type": "string"}}],
                "requestBody": {"content": {
                    "application/json-patch+json": {}, "application/merge-patch+json": {}}},
            }}
        if not paths:
            raise ApiError.not_found_path()
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "emulated"},
                "paths": paths, "components": {"schemas": {}}}

    def openapi_root(self) -> Obj:
        paths = {}
        for group, versions in self.group_versions().items():
            for v in versions:
                rel = f"apis/{group}/{v}" if group else f"api/{v}"
                doc = json.dumps(self.openapi_gv(group, v), sort_keys=True).encode()
                digest = hashlib.sha256(doc).hexdigest()[:16]
                paths[rel] = {"serverRelativeURL": f"/openapi/v3/{rel}?hash={digest}"}
        return {"paths": paths}
