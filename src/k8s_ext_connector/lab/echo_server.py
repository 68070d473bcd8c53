"""The lab's "external server": HTTP that answers and logs each client's source IP.

``GET /`` answers the client IP (``--name NAME``: "NAME client-IP", so a pod serving ingress
says who answered and whom it saw); ``GET /bytes?n=N&delay=S`` streams N bytes in 64 KiB
chunks, sleeping S seconds between chunks (a transfer that stays in flight). Every
request is appended to the log as one JSON line: {"port", "client", "path"}.
``--sink-port`` adds raw TCP ports that read to EOF and answer the byte count (benchmarks).
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

CHUNK = 64 * 1024


class _Log:
    def __init__(self, path: Path) -> None:
        self._handle = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def write(self, record: dict[str, object]) -> None:
        with self._lock:
            self._handle.write(json.dumps(record) + "\n")


def _handler(log: _Log, port: int, name: str | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            pass  # our JSON log replaces the default stderr line

        def do_GET(self) -> None:
            client = self.client_address[0]
            url = urlparse(self.path)
            log.write({"port": port, "client": client, "path": url.path})
            if url.path == "/bytes":
                query = parse_qs(url.query)
                total = int(query.get("n", ["0"])[0])
                delay = float(query.get("delay", ["0"])[0])
                self.send_response(200)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                sent = 0
                while sent < total:
                    size = min(CHUNK, total - sent)
                    self.wfile.write(b"x" * size)
                    sent += size
                    if delay:
                        time.sleep(delay)
                return
            body = (f"{name} {client}" if name else client).encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _Sink(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        total = 0
        while chunk := self.request.recv(1 << 20):
            total += len(chunk)
        self.request.sendall(f"{total}\n".encode())


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096


class _ThreadingHTTP(ThreadingHTTPServer):
    request_queue_size = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, action="append", default=[])
    parser.add_argument("--sink-port", type=int, action="append", default=[])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--name", help="answer GET / with this name before the client IP")
    args = parser.parse_args()
    log = _Log(args.log)
    servers: list[socketserver.BaseServer] = [
        _ThreadingHTTP((args.host, port), _handler(log, port, args.name)) for port in args.port
    ]
    servers += [_ThreadingTCP((args.host, port), _Sink) for port in args.sink_port]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print("listening", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
