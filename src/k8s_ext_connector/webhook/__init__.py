"""The mutating admission webhook that injects the sidecar (not built yet: issue #4)."""
