"""The gateway agent: one SSH server per source IP, outbound connections bound to it."""
