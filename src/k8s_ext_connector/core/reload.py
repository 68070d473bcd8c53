"""Follow a config file: reload on SIGHUP and when its content changes.

Content, not mtime, is compared: a mounted ConfigMap changes by swapping a symlink, and
editors may keep mtimes. An invalid new file is logged in one line and the running config
stays in force, so a bad edit never takes a working agent down. Any other failure while
applying (an OS error adding an address, a bug) is logged too and retried at the next
check: the watcher itself never dies, or the agent would silently stop following its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

from k8s_ext_connector.core.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


class ConfigWatcher(Generic[T]):
    def __init__(
        self,
        path: Path,
        load: Callable[[Path], T],
        on_change: Callable[[T], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        self._path = path
        self._load = load
        self._on_change = on_change
        self._interval = interval
        self._digest = self._read_digest()
        self._wake = asyncio.Event()

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None

    def install_sighup(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._wake.set)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.check()

    async def check(self) -> bool:
        """Reload if the content changed; returns whether a new config was applied."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        try:
            config = self._load(self._path)
            log.info("config %s changed, applying", self._path)
            await self._on_change(config)
        except ConfigError as error:
            log.error("config %s not applied, keeping the running one: %s", self._path, error)
            return False
        except Exception as error:  # any failure: see the module docstring
            self._digest = None  # retry the same content at the next check
            log.error(
                "config %s not applied (%s: %s), keeping the running one; retrying",
                self._path,
                type(error).__name__,
                error,
            )
            return False
        return True
