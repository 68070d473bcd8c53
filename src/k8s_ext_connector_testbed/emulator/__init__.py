"""A small Kubernetes API server emulator for the control-plane tests (kubectl 1.32, kopf 1.45).

Project-owned rather than a kmock 0.8 subclass: the fixes needed (cluster-scoped creates,
404s, typed lists, uid/resourceVersion, watches kopf follows) outgrew kmock's model.
It serves real HTTP on 127.0.0.1, so tests drive it with kubectl, kopf and aiohttp as they
would drive a cluster; ``write_kubeconfig`` gives both clients their settings.

Emulated: legacy discovery (/api, /apis, APIResourceList with verbs, short names,
categories, status subresources); a stub OpenAPI v3 that makes kubectl trust server-side
field validation; the built-in types in ``resources.py`` and CRD-defined ones (served as
soon as the CRD is created, gone when it is removed); uid, creationTimestamp, generation,
a global resourceVersion and optimistic concurrency; the status subresource; label and field
selectors; Tables with CRD printer columns; watches with history, resume, 410, selector
entry/exit and the watch-list bookmark; merge, JSON and strategic merge patches;
finalizers, namespace and CRD termination, ownerReference garbage collection; Service
ClusterIP allocation; the protobuf bodies of ``kubectl create ns|configmap|secret``; a
mutating admission hook on Pod CREATE; every call recorded in RBAC terms
(``ApiServer.requests``) so tests can check what permissions a component needs.

Deliberately NOT emulated:

- authentication and authorisation: every request is allowed and recorded instead (no
  SelfSubjectAccessReview, so ``kubectl auth can-i`` gets 404);
- server-side apply (``application/apply-patch+yaml`` answers 415), managedFields,
  field managers, dryRun (400), and the fieldValidation parameter (accepted, ignored);
- ValidatingAdmissionPolicies and CEL rules (CRD x-kubernetes-validations): stored, never
  evaluated (tests evaluate the chart's and the CRD's expressions with cel-python);
- schema validation, defaulting and pruning (built-in or CRD openAPIV3Schema), so
  ``kubectl explain`` prints only KIND and VERSION; no version conversion beyond apiVersion;
- strategic merge patch beyond a merge patch plus the directives kubectl generates
  (merge keys are taken from ``$setElementOrder``/``$patch: delete``, not from a schema);
- protobuf beyond those bodies (responses are always JSON, which clients accept),
  aggregated discovery (kubectl falls back to legacy), OpenAPI v2 (404), pagination
  (``limit`` is ignored, lists are complete), periodic watch bookmarks;
- controllers: no scheduler, kubelet, kube-proxy, endpoints or deployment controller;
  pods are deleted at once (no grace period); events.k8s.io/v1 and core/v1 events are
  stored apart; garbage collection is background-only (Foreground/Orphan act like
  Background) and dangling owner references are left as they are;
- other API-server checks: PUT without metadata.resourceVersion is accepted, immutable
  fields are not enforced, DELETE options (preconditions, grace period) are ignored, and
  field selectors accept any dotted path (the real server allows a few per resource);
- kubectl Table columns for built-ins are NAME and AGE only.
"""

from k8s_ext_connector_testbed.emulator.errors import ApiError
from k8s_ext_connector_testbed.emulator.server import AdmissionHook, ApiServer, RecordedRequest

__all__ = ["AdmissionHook", "ApiError", "ApiServer", "RecordedRequest"]
