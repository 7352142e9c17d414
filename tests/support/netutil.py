"""Network helpers for tests: addresses on this machine where nothing answers, and a local
ping endpoint that records what it is sent."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def closed_port() -> int:
    """A loopback TCP port that nothing listens on (a connection to it is refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Hit:
    """One request the server received."""

    method: str
    path: str
    body: bytes
    user_agent: str = ""

    @property
    def rid(self) -> str | None:
        """The run id the ping carried (`?rid=`), if any."""
        (rid,) = parse_qs(urlsplit(self.path).query).get("rid", [None])
        return rid

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


@dataclass
class PingServer:
    """Records every request; answers with `answers` in turn, then 200."""

    url: str
    token: str
    hits: list[Hit] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    delay: float = 0.0

    def routes(self) -> list[tuple[str, str]]:
        """(method, path below the check's URL, without the query) of every request, in order."""
        prefix = f"/ping/{self.token}"
        return [
            (hit.method, urlsplit(hit.path).path.removeprefix(prefix) or "/") for hit in self.hits
        ]


@contextlib.contextmanager
def ping_server() -> Iterator[PingServer]:
    """A healthchecks-like endpoint on 127.0.0.1, whose check URL carries a secret token."""
    state: list[PingServer] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            ping = state[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            agent = self.headers.get("User-Agent", "")
            ping.hits.append(Hit(self.command, self.path, body, agent))
            time.sleep(ping.delay)
            code = ping.answers.pop(0) if ping.answers else 200
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = do_HEAD = _answer

        def log_message(self, *_: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, *_: object) -> None:
            pass  # a client that timed out and hung up is what the timeout test wants

    httpd = Server(("127.0.0.1", 0), Handler)
    token = str(uuid.uuid4())
    state.append(PingServer(f"http://127.0.0.1:{httpd.server_port}/ping/{token}", token))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state[0]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
