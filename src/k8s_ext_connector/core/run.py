"""Shared glue for long-running agents: logging, signals, the event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from k8s_ext_connector.core.ssh import install_fast_event_loop, quiet_asyncssh


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every file-configured agent shares."""
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between config file checks (SIGHUP reloads at once)",
    )
    add_log_level(parser)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_asyncssh()


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT (kubelet stops containers with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_agent(body: Callable[[], Awaitable[None]], fast_loop: bool = True) -> int:
    if fast_loop:
        install_fast_event_loop()
    asyncio.run(body())  # type: ignore[arg-type]
    return 0
