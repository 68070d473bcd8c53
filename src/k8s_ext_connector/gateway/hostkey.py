"""The gateway's host key from its per-node Secret, read through the API (GET only).

Why an API read and not a volume: a DaemonSet has one pod template for every node, so it
cannot mount a Secret whose name depends on the node. The gateway only ever GETs that
one Secret by name (RBAC: ``get`` on ``secrets`` in the connector namespace; no list, no
watch, so it can read no other Secret): a cheap GET every ``interval`` seconds follows it.

- At start, until the Secret exists (404) or while the API cannot be reached, the gateway
  waits (not ready), with backoff up to ``BACKOFF_MAX``; it says so once per reason.
- A refusal (401, 403 or any other 4xx) or a Secret whose ``ssh-privatekey`` is not an
  OpenSSH private key at start is a ``ConfigError`` naming the Secret and its namespace:
  the deployment must be fixed, retrying will not help.
- Later, a changed key is handed on (``on_change``); a deleted, unreadable or invalid
  Secret keeps the running key, logged once per problem. On 401 the credentials are read
  again (a rotated service-account token) before the next poll.

Key material never reaches a log line or an exception: only the Secret's name and the
key's SHA256 fingerprint do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from k8s_ext_connector.core.errors import ConfigError, TransientError
from k8s_ext_connector.core.kube import SECRETS, ApiError, KubeClient, NotFound, reconnected

log = logging.getLogger(__name__)
DATA_KEY = "ssh-privatekey"  # what the operator writes (operator/reconciler._write_secret)
OPTION = "--host-key-secret"
BACKOFF_START = 0.5
BACKOFF_MAX = 10.0


class _Unusable(Exception):
    """The Secret exists but holds no usable host key (the reason says why, no material)."""


class HostKeySecret:
    def __init__(
        self,
        connect: Callable[[], KubeClient],
        namespace: str,
        name: str,
        interval: float = 30.0,
    ) -> None:
        self._connect = connect
        self._client = connect()
        self.namespace = namespace
        self.name = name
        self._interval = interval
        self._digest = b""

    def __str__(self) -> str:
        return f"Secret {self.name} in namespace {self.namespace}"

    async def close(self) -> None:
        await self._client.close()

    async def _get(self) -> dict[str, Any]:
        return await self._client.get(SECRETS, self.namespace, self.name)

    @staticmethod
    def _decode(secret: dict[str, Any]) -> tuple[bytes, asyncssh.SSHKey]:
        value = (secret.get("data") or {}).get(DATA_KEY)
        if not isinstance(value, str) or not value:
            raise _Unusable(f"has no data.{DATA_KEY}")
        try:
            private = base64.b64decode(value, validate=True)
            key = asyncssh.import_private_key(private)
        except (binascii.Error, ValueError, asyncssh.KeyImportError):
            raise _Unusable(f"data.{DATA_KEY} is not an OpenSSH private key") from None
        return hashlib.sha256(private).digest(), key

    def _refused(self, error: ApiError) -> ConfigError:
        message = " ".join(str(error).split())  # one line, whatever the server said
        return ConfigError(
            OPTION, self.name, f"cannot be read in namespace {self.namespace}: {message}"
        )

    async def load(self, waiting: Callable[[str], None]) -> asyncssh.SSHKey:
        """The host key, once the Secret exists; ``waiting(reason)`` while it does not."""
        delay, said = BACKOFF_START, ""
        while True:
            try:
                secret = await self._get()
            except NotFound:
                reason = f"waiting for {self} (not found yet)"
            except TransientError as error:
                reason = f"waiting for {self}: {error}"
            except ApiError as error:
                raise self._refused(error) from None
            else:
                try:
                    self._digest, key = self._decode(secret)
                except _Unusable as error:
                    raise ConfigError(
                        OPTION, self.name, f"in namespace {self.namespace}: {error}"
                    ) from None
                log.info("host key %s read from %s", key.get_fingerprint(), self)
                return key
            waiting(reason)
            if reason != said:
                log.info("%s; retrying with backoff up to %ss", reason, BACKOFF_MAX)
                said = reason
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def follow(self, on_change: Callable[[asyncssh.SSHKey], Awaitable[None]]) -> None:
        """Poll the Secret; hand a changed key to ``on_change``. Runs until cancelled."""
        problem = ""
        while True:
            await asyncio.sleep(self._interval)
            now = await self._poll(on_change)
            if now != problem:
                if now:
                    log.warning("%s; keeping the running host key", now)
                else:
                    log.info("%s readable again", self)
                problem = now

    async def _poll(self, on_change: Callable[[asyncssh.SSHKey], Awaitable[None]]) -> str:
        """One GET; returns what is wrong ("" when nothing is)."""
        try:
            digest, key = self._decode(await self._get())
        except NotFound:
            return f"{self} is gone"
        except _Unusable as error:
            return f"{self} {error}"
        except TransientError as error:
            return f"{self} cannot be read: {error}"
        except ApiError as error:
            if error.status == 401:
                await self._reconnect()
            return f"{self} cannot be read: {' '.join(str(error).split())}"
        if digest != self._digest:
            log.info("host key changed in %s", self)
            await on_change(key)  # logs the new key's fingerprint
            self._digest = digest
        return ""

    async def _reconnect(self) -> None:
        """Read the credentials again: the kubelet rotates a projected token in its file."""
        self._client = await reconnected(self._connect, self._client)
