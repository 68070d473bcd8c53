"""ConfigWatcher: a failure while applying never ends the watching (docs/security.md W7)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from k8s_ext_connector.core.errors import ConfigError
from k8s_ext_connector.core.reload import ConfigWatcher
from tests.polling import wait_for_async


def _load(path: Path) -> str:
    text = path.read_text()
    if text.startswith("invalid"):
        raise ConfigError("config", text.strip(), "is not valid")
    return text.strip()


def test_invalid_file_keeps_the_running_config_and_later_changes_apply(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("one")
    applied: list[str] = []

    async def on_change(config: str) -> None:
        applied.append(config)

    async def scenario() -> list[bool]:
        watcher = ConfigWatcher(path, _load, on_change)
        results = [await watcher.check()]  # unchanged: nothing to do
        path.write_text("invalid!")
        results.append(await watcher.check())
        results.append(await watcher.check())  # the same invalid content is not retried
        path.write_text("two")
        results.append(await watcher.check())
        return results

    assert asyncio.run(scenario()) == [False, False, False, True]
    assert applied == ["two"]


def test_unexpected_error_while_applying_is_retried_and_watching_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("one")
    failures = ["address busy", "still busy"]
    applied: list[str] = []

    async def on_change(config: str) -> None:
        if failures:
            raise OSError(failures.pop(0))
        applied.append(config)

    async def scenario() -> None:
        watcher = ConfigWatcher(path, _load, on_change, interval=0.01)
        path.write_text("two")
        running = asyncio.create_task(watcher.run())
        try:
            await wait_for_async(lambda: applied or running.done(), what="the retried apply")
            assert not running.done(), "the watcher task ended"
        finally:
            running.cancel()

    asyncio.run(scenario())
    assert applied == ["two"]
    assert failures == []
