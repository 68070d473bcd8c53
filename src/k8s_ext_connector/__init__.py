"""k8s-ext-connector: static, chosen source IPs for pods towards external servers.

Packages:
- ``core``: the configuration model, the planner and the small side-effect interfaces
  (iptables, addresses, processes) that every component shares.
- ``gateway``: the SSH gateway agent that binds outbound connections to a source IP.
- ``sidecar``: the per-pod agent: iptables redirect + transparent listener + SSH sessions.
- ``certs``: key material (SSH keys now; CA and webhook certificates with the webhook).
- ``lab``: network-namespace topologies used by the tests, the benchmark and ``lab``.
- ``operator``, ``webhook``: the control plane (not built yet, see README).
"""

__version__ = "0.1.0"
