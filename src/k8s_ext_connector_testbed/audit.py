"""The API server's audit log as a test's record of who called what.

A Metadata-level policy records every request's user, verb and object (never a body: Secrets
stay out of the file) once its response is complete, or started for a watch. Tests use it to
hold each component to least privilege: the calls its ServiceAccount made, read from the
server's own record, against the rules its Role grants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# RequestReceived would record every call twice; a watch is recorded when it starts.
POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"""


@dataclass(frozen=True)
class AuditCall:
    user: str
    verb: str
    group: str
    resource: str  # "pods" or "pods/status"
    namespace: str
    name: str
    code: int  # the response's HTTP status (0 when the log has none)


def apiserver_args(directory: Path) -> list[str]:
    """kube-apiserver flags writing the log to ``directory``/audit.log (the policy beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "audit-policy.yaml"
    policy.write_text(POLICY)
    return [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={directory / 'audit.log'}",
        # The log backend writes each event before the request's response completes.
        "--audit-log-mode=blocking",
        "--audit-log-maxsize=0",  # never rotated: one file per control plane
    ]


def read(path: Path, user: str | None = None) -> list[AuditCall]:
    """Every recorded resource request in order, optionally only those of ``user``."""
    calls = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        if not line.strip():
            continue
        event = json.loads(line)
        ref = event.get("objectRef")
        if ref is None or event.get("stage") == "RequestReceived":
            continue  # non-resource URLs (/readyz, /version, discovery)
        who = event.get("user", {}).get("username", "")
        if user is not None and who != user:
            continue
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        calls.append(
            AuditCall(
                who,
                event.get("verb", ""),
                ref.get("apiGroup", ""),
                resource,
                ref.get("namespace", ""),
                ref.get("name", ""),
                int(event.get("responseStatus", {}).get("code", 0)),
            )
        )
    return calls


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"
