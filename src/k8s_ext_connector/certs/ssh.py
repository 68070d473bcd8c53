"""SSH key pairs for sidecar identities and gateway host keys.

Private keys are written with mode 0600 and never logged; only public keys travel in
configs. Ed25519 keeps keys short and signing cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from k8s_ext_connector.core.errors import ConfigError


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_openssh: str  # "ssh-ed25519 AAAA..." without comment

    def __repr__(self) -> str:  # keep private material out of logs and tracebacks
        return f"KeyPair(public={self.public_openssh[:32]}...)"


def generate_key_pair() -> KeyPair:
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().split()
    return KeyPair(
        private_openssh=key.export_private_key("openssh"), public_openssh=f"{public[0]} {public[1]}"
    )


def write_private_key(path: Path, pair: KeyPair) -> None:
    """Create ``path`` with mode 0600 from the start (no window where others can read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pair.private_openssh)
    path.with_name(path.name + ".pub").write_text(pair.public_openssh + "\n")


def load_private_key(path: Path, option: str) -> asyncssh.SSHKey:
    """Read an OpenSSH private key; a ConfigError names the command-line ``option``."""
    try:
        return asyncssh.read_private_key(str(path))
    except OSError as error:
        raise ConfigError(option, str(path), error.strerror or "cannot be read") from None
    except (asyncssh.KeyImportError, ValueError):
        raise ConfigError(option, str(path), "is not an OpenSSH private key") from None


def public_key_of(private_key_path: Path) -> str:
    key = asyncssh.read_private_key(str(private_key_path))
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{algorithm} {blob}"
