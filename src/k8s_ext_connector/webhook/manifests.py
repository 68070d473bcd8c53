"""``k8s-ext-connector inject -f FILE``: the webhook's ``inject`` for GitOps manifests.

Pods are injected as the webhook would; workloads (Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob) have their pod template injected; ``List`` items and
multi-document YAML are handled one by one; anything else passes through unchanged.
Offline there is no cluster to ask which Services select a pod, so the source services
are given with ``--source-service`` (names in each object's namespace).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.webhook.inject import InjectionContext, InjectionSettings, inject

TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def inject_object(obj: Any, sources: Sequence[str], settings: InjectionSettings) -> Any:
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("kind")
    namespace = (obj.get("metadata") or {}).get("namespace", "default")
    context = InjectionContext(tuple(ServiceRef(namespace, s) for s in sources), settings)
    if kind == "List":
        return {**obj, "items": [inject_object(i, sources, settings) for i in obj.get("items", [])]}
    if kind == "Pod":
        return inject(obj, context)
    path = TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return obj
    parent: Any = obj
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    template = parent.get(path[-1]) if isinstance(parent, dict) else None
    if not isinstance(template, dict):
        return obj
    meta = dict(template.get("metadata") or {})
    pod = {"metadata": {**meta, "namespace": namespace}, "spec": template.get("spec") or {}}
    injected = inject(pod, context)
    injected_meta = dict(injected["metadata"])
    injected_meta.pop("namespace", None)
    if "namespace" in meta:
        injected_meta["namespace"] = meta["namespace"]
    parent[path[-1]] = {**template, "metadata": injected_meta, "spec": injected["spec"]}
    return obj


def inject_text(text: str, sources: Sequence[str], settings: InjectionSettings,
                origin: str = "-") -> str:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise ConfigError("-f", origin, f"is not valid YAML ({error})".splitlines()[0]) from None
    injected = [inject_object(d, sources, settings) for d in documents if d is not None]
    return yaml.safe_dump_all(injected, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True,
                        help="manifest file, or - for standard input")
    parser.add_argument("--source-service", action="append", default=[],
                        help="a source service (in each object's namespace) selecting the pods")
    parser.add_argument("--image", default=InjectionSettings.image, help="sidecar image")
    parser.add_argument("--no-native-sidecar", action="store_true",
                        help="clusters before Kubernetes 1.29: a regular first container")


def run(args: argparse.Namespace) -> int:
    settings = InjectionSettings(image=args.image, native_sidecar=not args.no_native_sidecar)
    if args.filename == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.filename).read_text()
        except OSError as error:
            raise ConfigError("-f", args.filename, error.strerror or "cannot be read") from None
    sys.stdout.write(inject_text(text, args.source_service, settings, args.filename))
    return 0
