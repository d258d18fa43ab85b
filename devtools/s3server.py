"""A real S3 endpoint for tests and benchmarks: `moto_server` in its own process, and an HTTP
proxy in front of it that fails chosen requests (`FaultProxy`). Development only: not part of
the installed product (pyproject installs orchestrator and launch).

FACTS: in-process `mock_aws` does not work with s3fs, and buckets must be made with boto3.
tests/fixtures/s3.py makes pytest fixtures of these; bench/ starts them itself.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REGION = "us-east-1"
FAKE_KEY = "testing"
START_TIMEOUT_S = 30.0
# What a process needs to reach the server: fake credentials, no instance-metadata probe.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_KEY,
    "AWS_SECRET_ACCESS_KEY": FAKE_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata probe
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
_SLICE = 64 << 10  # bytes a capped proxy passes on at a time
_ERROR_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown", 429: "SlowDown"}


@dataclass
class S3Server:
    endpoint_url: str
    pid: int
    log_path: Path
    region: str = REGION


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto_server(log_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `moto_server` on a free port, its output to `log_path`, and wait until it answers:
    (its URL, the process). RuntimeError, with the process stopped, if it does not come up."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found (pip install 'moto[server]')")
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it mid-run
        )
    try:
        wait_until_up(url, proc, START_TIMEOUT_S)
    except RuntimeError:
        stop(proc)
        raise
    return url, proc


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/", timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def make_bucket(endpoint_url: str, prefix: str) -> str:
    """A fresh, empty bucket named `<prefix>-<random>`; returns its `s3://` URL."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=FAKE_KEY,
        aws_secret_access_key=FAKE_KEY,
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


# --- fault injection -------------------------------------------------------------------------


@dataclass
class Rule:
    path_contains: str
    action: str  # "status" or "reset"
    status: int = 503
    remaining: int | None = None  # None: forever


class Throttle:
    """One direction of a link of `mb_s` MB/s (10**6 bytes), shared by every connection through
    it: whoever sends n bytes waits until the link would have carried them after what was
    sent before."""

    def __init__(self, mb_s: float) -> None:
        self._bytes_per_s = mb_s * 1e6
        self._free_at = 0.0  # when the link has carried everything taken so far
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + n / self._bytes_per_s
            wait = self._free_at - now
        time.sleep(wait)


@dataclass
class FaultProxy:
    """An HTTP proxy in front of moto that fails chosen requests over real HTTP.

    Rules match a substring of the request path (path-style: `/bucket/key`). The first matching
    rule with budget left fires; everything else is forwarded to moto unchanged.

    `rate_mb_s` caps the bodies' throughput in each direction (requests up, answers down),
    shared by all connections like one network link: a slow remote S3 for benchmarks. A capped
    proxy passes bodies of known length on as they arrive; without a cap, bodies are read whole
    first, as the fault rules have always seen them.
    """

    upstream: str
    rate_mb_s: float | None = None
    rules: list[Rule] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _links: tuple[Throttle, Throttle] | None = None  # (up, down), with a rate
    carried: list[int] = field(default_factory=lambda: [0, 0])  # body bytes (up, down)
    down_at: list[int] = field(default_factory=list)  # carried[1] as each request came

    def __post_init__(self) -> None:
        if self.rate_mb_s is not None:
            self._links = (Throttle(self.rate_mb_s), Throttle(self.rate_mb_s))

    def carry(self, n: int, up: bool) -> None:
        """Count n more body bytes, and wait until a capped link has carried them."""
        with self._lock:
            self.carried[0 if up else 1] += n
        if self._links is not None:
            self._links[0 if up else 1].take(n)

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, path_contains: str, status: int = 503, times: int | None = 2) -> None:
        """Answer `status` (with an S3 error body) to the next `times` matching requests."""
        with self._lock:
            self.rules.append(Rule(path_contains, "status", status, times))

    def reset(self, path_contains: str, times: int | None = 1) -> None:
        """Drop the connection (TCP RST) without answering the next `times` matching requests."""
        with self._lock:
            self.rules.append(Rule(path_contains, "reset", 0, times))

    def seen(self, path_contains: str, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for m, p in self.requests
                if path_contains in p and (method is None or m == method)
            )

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))
            self.down_at.append(self.carried[1])

    def decide(self, method: str, path: str) -> Rule | None:
        """The rule that answers this request (None: forward it); records the request. A
        subclass may choose otherwise (bench/chaos fails requests at random)."""
        self.record(method, path)
        with self._lock:
            for rule in self.rules:
                if rule.path_contains in path and rule.remaining != 0:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client hanging up on the proxy (a reset it asked for, a killed rank) is expected
    here: no traceback for it on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _pieces(self, n: int) -> Iterator[bytes]:
        """The next n bytes of the request body, a slice at a time, at the proxy's rate."""
        while n > 0 and (piece := self.rfile.read(min(n, _SLICE))):
            self.owner.carry(len(piece), up=True)
            n -= len(piece)
            yield piece

    def _read(self, n: int) -> bytes:
        return b"".join(self._pieces(n))

    def _write(self, data: bytes) -> None:
        """The answer's body to the client, at the proxy's rate if it has one."""
        view = memoryview(data)
        for start in range(0, len(view), _SLICE):
            self.owner.carry(len(view[start : start + _SLICE]), up=False)
            self.wfile.write(view[start : start + _SLICE])

    def _streams(self) -> bool:
        """A capped proxy passes bodies of known length on as they arrive (a link, not a
        store-and-forward hop that would add moto's time to the link's)."""
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        return self.owner.rate_mb_s is not None and not chunked

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self._read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self._read(int(self.headers.get("Content-Length", 0)))

    def _handle(self) -> None:
        body = None if self._streams() else self._read_body()  # None: forwarded as it comes
        rule = self.owner.decide(self.command, self.path)
        if rule is not None and body is None:
            body = self._read_body()
        if rule is not None and rule.action == "reset":
            self._reset()
        elif rule is not None:
            self._error(rule.status)
        else:
            self._forward(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, status: int) -> None:
        code = _ERROR_CODES.get(status, str(status))
        payload = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected {status}</Message><RequestId>fault</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes | None) -> None:
        host, port = self.owner.upstream.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        n = int(self.headers.get("Content-Length", 0)) if body is None else len(body)
        if n or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(n)
        payload = (self._pieces(n) if body is None else body) if n else None
        try:
            conn.request(self.command, self.path, body=payload, headers=headers)
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            streamed = body is None and length is not None and self.command != "HEAD"
            data = b"" if streamed else resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            keep = streamed or self.command == "HEAD"
            self.send_header("Content-Length", (length if keep else None) or str(len(data)))
            self.end_headers()
            if streamed:
                while piece := resp.read(_SLICE):
                    self._write(piece)
            elif self.command != "HEAD":
                self._write(data)
        finally:
            conn.close()
