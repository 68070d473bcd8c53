"""SSH settings shared by both ends of the tunnel.

Measured on these machines (docs/architecture.md): asyncssh's default cipher is its
slowest; AES-GCM with no compression and a large window roughly doubles throughput.
"""

from __future__ import annotations

import asyncio
import logging

FAST_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
WINDOW = 8 * 1024 * 1024
KEEPALIVE_INTERVAL = 5.0  # seconds between keepalives on an idle session
KEEPALIVE_COUNT_MAX = 3  # unanswered keepalives before the session is declared dead


def tuned_options() -> dict[str, object]:
    """Keyword arguments for asyncssh connect/listen that both ends share."""
    return {
        "encryption_algs": list(FAST_CIPHERS),
        "compression_algs": ["none"],
        "keepalive_interval": KEEPALIVE_INTERVAL,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
    }


def quiet_asyncssh() -> None:
    """asyncssh logs every channel at INFO; keep our own logs readable."""
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def install_fast_event_loop() -> bool:
    """Use uvloop when installed (more requests/s); plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
