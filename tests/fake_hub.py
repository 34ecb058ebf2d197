"""A fake Hugging Face Hub on 127.0.0.1: what it serves and records (the fixtures are in conftest.py)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = "Doubiiu/DynamiCrafter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAYLOAD = bytes(range(256)) * 1200  # 300 KiB
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


@dataclass
class FakeHub:
    """What the fake hub serves and what it was asked."""

    url: str
    files: dict[tuple[str, str], bytes] = field(default_factory=lambda: {(REPO, "model.ckpt"): PAYLOAD})
    requests: list[dict[str, str | None]] = field(default_factory=list)
    cut_next_get_after: int | None = None  # drop the connection after this many body bytes, once
    forced_status: int | None = None
    unavailable: int = 0  # answer this many file requests with HTTP 503 first (a busy server: huggingface_hub retries)


class Handler(BaseHTTPRequestHandler):
    """/{repo_id}/resolve/{revision}/{filename}, HEAD and GET, with Range support, as the Hub serves it."""

    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.respond(send_body=False)

    def do_GET(self) -> None:
        self.respond(send_body=True)

    def respond(self, send_body: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        hub.requests.append({"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                             "authorization": self.headers.get("Authorization")})
        match = RESOLVE.match(self.path)
        if hub.forced_status is not None:
            return self.fail(hub.forced_status, {})
        if hub.unavailable and match is not None:
            hub.unavailable -= 1
            return self.fail(503, {})
        if match is None or match["repo"] not in {repo for repo, _ in hub.files}:
            return self.fail(404, {"X-Error-Code": "RepoNotFound"})
        data = hub.files.get((match["repo"], match["filename"]))
        if data is None:
            return self.fail(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if hub.cut_next_get_after is not None:
            self.wfile.write(data[start:start + hub.cut_next_get_after])
            hub.cut_next_get_after = None
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def fail(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
