"""SSH settings shared by both ends of the tunnel.

Measured on these machines (docs/architecture.md): asyncssh's default cipher is its
slowest; AES-GCM with no compression and a large window roughly doubles throughput.

Only modern algorithms are offered (docs/security.md lists them; ``ssh-audit`` checks the
gateway in tests/netns/test_ssh_hardening.py): key exchange ML-KEM-768 + X25519 (hybrid,
post-quantum: recorded tunnels stay secret should X25519 fall), authenticated encryption
(AES-GCM, ChaCha20-Poly1305: no separate MAC is used), encrypt-then-MAC SHA-2/UMAC
listed only because the protocol needs a MAC list, and Ed25519 signatures. No SHA-1, no
CBC, no NIST curves, no finite-field groups. The sidecar also offers plain X25519, which
the gateway accepts only when its ``cryptography`` lacks ML-KEM (older than the image's):
both ends, built from one image, always agree.
"""

from __future__ import annotations

import asyncio
import logging

FAST_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
PQ_KEX = "mlkem768x25519-sha256"
KEX_ALGS = (
    PQ_KEX,  # post-quantum hybrid; only where cryptography has ML-KEM
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
)
MAC_ALGS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
)
SIGNATURE_ALGS = ("ssh-ed25519",)
# The identification string: the product, no version (asyncssh sends its own by default).
SERVER_VERSION = "ExtConnector"
WINDOW = 8 * 1024 * 1024
KEEPALIVE_INTERVAL = 5.0  # seconds between keepalives on an idle session
KEEPALIVE_COUNT_MAX = 3  # unanswered keepalives before the session is declared dead


def kex_algs(server: bool = False) -> list[str]:
    """KEX_ALGS that this asyncssh and cryptography provide (ML-KEM needs recent ones);
    a server with the post-quantum hybrid offers nothing else."""
    from asyncssh.kex import get_kex_algs

    available = {alg.decode() for alg in get_kex_algs()}
    algs = [alg for alg in KEX_ALGS if alg in available]
    if server and PQ_KEX in algs:
        return [PQ_KEX]
    return algs


def tuned_options() -> dict[str, object]:
    """Keyword arguments for asyncssh connect/listen that both ends share."""
    return {
        "kex_algs": kex_algs(),
        "encryption_algs": list(FAST_CIPHERS),
        "mac_algs": list(MAC_ALGS),
        "signature_algs": list(SIGNATURE_ALGS),
        "compression_algs": ["none"],
        "keepalive_interval": KEEPALIVE_INTERVAL,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
    }


def server_options() -> dict[str, object]:
    """Keyword arguments for the gateway's asyncssh listeners: ``tuned_options`` with the
    server's key exchange and an identification string without a version."""
    return {**tuned_options(), "kex_algs": kex_algs(server=True), "server_version": SERVER_VERSION}


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
