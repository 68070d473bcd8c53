"""The webhook server in a process of its own, for attack tests that measure its memory:
``python -m tests.webhook.server_process TLS_DIR LIMITS_JSON`` prints the port and serves
(uvloop, as deployed) until terminated. Its cache: ``my-service1`` selects ``app=my-app``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from k8s_ext_connector.core.api import ServiceRef
from k8s_ext_connector.core.run import setup_logging
from k8s_ext_connector.core.ssh import install_fast_event_loop
from k8s_ext_connector.webhook.inject import InjectionSettings
from k8s_ext_connector.webhook.server import Limits, ServingCertificate, WebhookServer
from tests.webhook.harness import FakeIndex


async def serve(tls_dir: Path, limits: Limits) -> None:
    index = FakeIndex([(ServiceRef("ns1", "my-service1"), {"app": "my-app"})])
    certificate = ServingCertificate(tls_dir / "tls.crt", tls_dir / "tls.key")
    server = WebhookServer(index, InjectionSettings(), certificate, limits)
    print(await server.start("127.0.0.1", 0), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    setup_logging("info")
    install_fast_event_loop()
    asyncio.run(serve(Path(sys.argv[1]), Limits(**json.loads(sys.argv[2]))))


if __name__ == "__main__":
    main()
