"""The mutating admission webhook: injects the forwarder sidecar into pods that need it.

- ``inject``: the pure ``inject(pod, context) -> pod`` and the admission patch (its diff);
- ``cache``: Services and ExternalServices from list+watch, so admission never lists;
- ``server``: aiohttp HTTPS ``/mutate``, ``/healthz``, ``/readyz``, ``/metrics``;
- ``manifests``: ``k8s-ext-connector inject -f`` for GitOps manifests.
"""
