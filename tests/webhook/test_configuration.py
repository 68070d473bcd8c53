"""The chart's MutatingWebhookConfiguration: valid (strict, with a caBundle filled in as an
installer would) and saying what the webhook relies on."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.webhook.harness import NAMESPACE, SERVICE, new_ca

PATH = (
    Path(__file__).parents[2]
    / "charts"
    / "k8s-ext-connector"
    / "files"
    / "mutatingwebhookconfiguration.yaml"
)


def load() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(PATH.read_text())
    return document


def test_valid_as_is_and_with_a_ca_bundle() -> None:
    document = load()
    kubernetes_validate.validate(document, "1.32.0", strict=True)
    filled = copy.deepcopy(document)
    filled["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(new_ca().cert_pem).decode()
    kubernetes_validate.validate(filled, "1.32.0", strict=True)


def test_what_the_webhook_relies_on() -> None:
    document = load()
    assert document["metadata"]["name"] == "k8s-ext-connector"
    (webhook,) = document["webhooks"]
    assert webhook["name"] == "inject.ext-connector.submariner.io"
    assert webhook["clientConfig"]["service"] == {
        "name": SERVICE,
        "namespace": NAMESPACE,
        "path": "/mutate",
        "port": 443,
    }
    assert webhook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["namespaceSelector"] == {
        "matchLabels": {"external-service-injection": "enabled"}
    }
    assert webhook["objectSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["k8s-ext-connector"]}
    ]
    assert webhook["sideEffects"] == "None"  # dryRun requests get the same answer
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["failurePolicy"] == "Ignore"  # an outage never blocks pod creation
    assert webhook["timeoutSeconds"] == 5
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["matchPolicy"] == "Equivalent"
