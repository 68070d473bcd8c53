"""The per-pod forwarder: iptables redirect, transparent listener, shared SSH sessions."""
