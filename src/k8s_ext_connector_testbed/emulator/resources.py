"""Which resource types the emulator serves, and the discovery documents that describe them.

Clients learn everything from discovery (kubectl's RESTMapper, kopf's resource scan), so a
type registered here is all it takes to serve a built-in or a CRD-defined resource.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from k8s_ext_connector_testbed.emulator.errors import ApiError

Obj = dict[str, Any]
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
CRD_GROUP, CRD_PLURAL = "apiextensions.k8s.io", "customresourcedefinitions"


@dataclass(frozen=True)
class ResourceType:
    """One served group/version/resource; ``columns`` are a CRD's additionalPrinterColumns."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = False  # has a status subresource
    columns: tuple[Obj, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The group-qualified resource, as the real server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery(self) -> list[Obj]:
        main = {
            "name": self.plural,
            "singularName": self.kind.lower(),
            "kind": self.kind,
            "namespaced": self.namespaced,
            "verbs": VERBS,
            "shortNames": list(self.short_names),
            "categories": list(self.categories),
        }
        status = {
            **main,
            "name": f"{self.plural}/status",
            "singularName": "",
            "verbs": ["get", "patch", "update"],
            "shortNames": [],
            "categories": [],
        }
        return [main, status] if self.status else [main]


def _builtin(line: str) -> ResourceType:
    """``group/version plural Kind scope shortnames flags``; plural ``*`` is kind + s."""
    gv, plural, kind, scope, shorts, flags = line.split()
    group, _, version = gv.rpartition("/")
    return ResourceType(
        group,
        version,
        kind.lower() + "s" if plural == "*" else plural,
        kind,
        scope == "ns",
        tuple(s for s in shorts.split(",") if s != "-"),
        ("all",) if "all" in flags else (),
        "status" in flags,
    )


_BUILTINS = [
    _builtin(line)
    for line in """
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
    policy/v1 poddisruptionbudgets PodDisruptionBudget ns pdb status
    networking.k8s.io/v1 networkpolicies NetworkPolicy ns netpol -
    apiextensions.k8s.io/v1 * CustomResourceDefinition cluster crd,crds status
    admissionregistration.k8s.io/v1 * MutatingWebhookConfiguration cluster - -
    admissionregistration.k8s.io/v1 * ValidatingWebhookConfiguration cluster - -
    admissionregistration.k8s.io/v1 * ValidatingAdmissionPolicy cluster - status
    admissionregistration.k8s.io/v1 * ValidatingAdmissionPolicyBinding cluster - -
    rbac.authorization.k8s.io/v1 roles Role ns - -
    rbac.authorization.k8s.io/v1 rolebindings RoleBinding ns - -
    rbac.authorization.k8s.io/v1 clusterroles ClusterRole cluster - -
    rbac.authorization.k8s.io/v1 clusterrolebindings ClusterRoleBinding cluster - -
""".strip().splitlines()
]


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
            group,
            v["name"],
            plural,
            kind,
            spec.get("scope", "Namespaced") == "Namespaced",
            tuple(names.get("shortNames", [])),
            tuple(names.get("categories", [])),
            "status" in (v.get("subresources") or {}),
            tuple(v.get("additionalPrinterColumns", [])),
        )
        for v in spec["versions"]
        if v.get("served", True)
    ]


class Registry:
    """Served types by (group, version, plural), in registration order."""

    def __init__(self) -> None:
        self._types = {(t.group, t.version, t.plural): t for t in _BUILTINS}

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def find(self, **fields: str) -> ResourceType | None:
        """The first type whose attributes equal ``fields`` (e.g. api_version and kind)."""
        return next(
            (t for t in self._types.values() if all(getattr(t, k) == v for k, v in fields.items())),
            None,
        )

    def register(self, types: list[ResourceType]) -> None:
        self._types.update({(t.group, t.version, t.plural): t for t in types})

    def unregister(self, group: str, plural: str) -> None:
        self._types = {k: t for k, t in self._types.items() if (k[0], k[2]) != (group, plural)}

    def group_versions(self) -> dict[str, list[str]]:
        """Group -> versions, the first being the preferred one."""
        out: dict[str, list[str]] = {}
        for t in self._types.values():
            if t.version not in out.setdefault(t.group, []):
                out[t.group].append(t.version)
        return out

    def _of(self, group: str, version: str) -> list[ResourceType]:
        types = [t for t in self._types.values() if (t.group, t.version) == (group, version)]
        if not types:
            raise ApiError.not_found_path()
        return types

    # Legacy (non-aggregated) discovery: kubectl falls back to it, kopf only reads it.

    def api_group(self, group: str) -> Obj:
        versions = [
            {"groupVersion": f"{group}/{v}", "version": v}
            for v in self.group_versions().get(group, [])
        ]
        if not group or not versions:
            raise ApiError.not_found_path()
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": versions,
            "preferredVersion": versions[0],
        }

    def api_group_list(self) -> Obj:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {k: v for k, v in self.api_group(g).items() if k not in ("kind", "apiVersion")}
                for g in self.group_versions()
                if g
            ],
        }

    def resource_list(self, group: str, version: str) -> Obj:
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [e for t in self._of(group, version) for e in t.discovery()],
        }

    # OpenAPI v3: just enough for kubectl to trust server-side field validation.

    def openapi(self, group: str, version: str) -> Obj:
        """Each PATCH operation lists ``fieldValidation``, so kubectl skips client-side
        validation (which would need full schemas). No strategic-merge content type is
        advertised: kubectl then computes strategic merge patches from its compiled-in types
        and merge patches for CRs, as it does against a real server."""
        paths = {}
        for t in self._of(group, version):
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            ns = "/namespaces/{namespace}" if t.namespaced else ""
            paths[f"{prefix}{ns}/{t.plural}/{{name}}"] = {
                "patch": {
                    "x-kubernetes-group-version-kind": {
                        "group": group,
                        "version": version,
                        "kind": t.kind,
                    },
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                    ],
                    "requestBody": {
                        "content": {
                            "application/json-patch+json": {},
                            "application/merge-patch+json": {},
                        }
                    },
                }
            }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "emulated"},
            "paths": paths,
            "components": {"schemas": {}},
        }

    def openapi_root(self) -> Obj:
        """The index; each hash changes with its document, so kubectl's cache follows CRDs."""
        paths = {}
        for group, versions in self.group_versions().items():
            for v in versions:
                rel = f"apis/{group}/{v}" if group else f"api/{v}"
                doc = json.dumps(self.openapi(group, v), sort_keys=True).encode()
                digest = hashlib.sha256(doc).hexdigest()[:16]
                paths[rel] = {"serverRelativeURL": f"/openapi/v3/{rel}?hash={digest}"}
        return {"paths": paths}
