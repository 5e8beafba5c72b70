"""A fault-injecting HTTP proxy on 127.0.0.1 that counts requests and body bytes per key (``FaultProxy``).

It sits in front of an S3 server (``s3server.S3Server``) and can answer errors, slow answers down,
cap the bandwidth and cut bodies short. Used by the remote tests and by the bench scripts, so nothing
here imports pytest. ``s3server`` re-exports ``FaultProxy`` and ``KeyStats``.

    with S3Server() as s3, FaultProxy(s3.endpoint) as proxy:
        proxy.slowdown_share = 0.1            # a tenth of the requests answered 503 SlowDown
        client = s3.boto3_client(endpoint=proxy.endpoint)
"""

from __future__ import annotations

import http.client
import random
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self


# (method, key, headers) -> bool; key is "bucket/key/in/bucket" (URL-decoded, no query, no leading slash)
Predicate = Callable[[str, str, Any], bool]


@dataclass
class KeyStats:
    """What the proxy answered for one key: request counts by (method, status), and 2xx body bytes sent."""

    requests: Counter = field(default_factory=Counter)
    body_bytes: int = 0

    def count(self, method: str | None = None, status: int | None = None) -> int:
        """Requests with this method and/or status (``None`` matches any)."""
        return sum(n for (m, s), n in self.requests.items()
                   if (method is None or m == method) and (status is None or s == status))


class _Throttle:
    """A token bucket shared by all connections: each chunk reserves its slot on one clock.

    Up to ``BURST_S`` of idle link is credited: the proxy's own work on a chunk overlaps the
    link's time instead of adding to it (as a real link's buffers do), so one stream can reach
    the cap; over any longer span the rate stays at the cap.
    """

    BURST_S = 0.005

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_free = 0.0

    def wait(self, nbytes: int, rate: float | None) -> None:
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next_free = max(now - self.BURST_S, self._next_free) + nbytes / rate
            until = self._next_free
        if until > now:
            time.sleep(until - now)


@dataclass
class _Rule:
    """An armed fault: how many more requests it takes, which ones, and (for ``fail_next``) the status."""

    remaining: int
    predicate: Predicate | None
    status: int = 0


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
               "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
_ERROR_CODES = {400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey", 412: "PreconditionFailed",
                500: "InternalError", 503: "SlowDown"}
_CHUNK = 64 * 1024


def _error_body(code: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by FaultProxy</Message><Resource>/{resource}</Resource>"
            f"<RequestId>faultproxy</RequestId></Error>").encode()


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` that injects faults and counts bytes.

    Knobs, all changeable while requests run:

    - ``slowdown_share``: that share of requests is answered ``503 SlowDown`` without reaching the
      server, drawn from ``random.Random(seed)``: the same sequence of requests gets the same 503s.
    - ``latency_s``: slept before every response.
    - ``bandwidth``: bytes/s for all response bodies together; ``None`` is unlimited.
    - ``on_request``: ``callable(method, key, headers)`` run before anything else for every request
      (a test replaces an object mid-download with it). ``key`` is ``bucket/key`` as in ``stats()``.
    - ``fail_next(status, n)``: the next ``n`` matching requests are answered ``status`` with an S3 error.
    - ``truncate_next(n)``: the next ``n`` matching successful GETs send the full Content-Length, half
      the body, then close the connection.

    Order per request: ``on_request``, ``latency_s``, ``fail_next``, ``slowdown_share``, forward,
    ``truncate_next``. Upstream ``If-Match`` (412) and ``Range`` (206) are moto's own answers.
    """

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.seed = seed
        self.slowdown_share = 0.0
        self.latency_s = 0.0
        self.bandwidth: float | None = None
        self.on_request: Callable[[str, str, Any], None] | None = None
        self._lock = threading.RLock()  # re-entrant: a predicate may call stats()
        self._rng = random.Random(seed)
        self._fails: list[_Rule] = []
        self._truncs: list[_Rule] = []
        self._stats: dict[str, KeyStats] = {}
        self._throttle = _Throttle()
        self._conns: set[socket.socket] = set()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fault-proxy", daemon=True)
        self._thread.start()

    # --- knobs ---------------------------------------------------------------------------------

    def fail_next(self, status: int, n: int = 1, predicate: Predicate | None = None) -> None:
        """Answer the next ``n`` requests (matching ``predicate(method, key, headers)``) with ``status``."""
        if n < 1:
            raise ValueError(f"fail_next: n={n}; it counts requests, so it must be 1 or more.")
        with self._lock:
            self._fails.append(_Rule(n, predicate, status))

    def truncate_next(self, n: int = 1, predicate: Predicate | None = None) -> None:
        """Cut the body of the next ``n`` successful GETs (matching ``predicate``) in half and close."""
        if n < 1:
            raise ValueError(f"truncate_next: n={n}; it counts requests, so it must be 1 or more.")
        with self._lock:
            self._truncs.append(_Rule(n, predicate))

    def clear_faults(self) -> None:
        """Every knob back to its start: no faults, no latency, no cap, no hook, the RNG reseeded."""
        with self._lock:
            self.slowdown_share, self.latency_s, self.bandwidth, self.on_request = 0.0, 0.0, None, None
            self._fails.clear()
            self._truncs.clear()
            self._rng = random.Random(self.seed)

    # --- counters ------------------------------------------------------------------------------

    def stats(self) -> dict[str, KeyStats]:
        """A copy of the counters, per ``bucket/key``."""
        with self._lock:
            return {k: KeyStats(Counter(v.requests), v.body_bytes) for k, v in self._stats.items()}

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(v.body_bytes for v in self._stats.values())

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(v.count() for v in self._stats.values())

    def reset(self) -> None:
        """Zero the counters (the knobs stay; ``clear_faults`` resets those)."""
        with self._lock:
            self._stats.clear()

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake handler threads parked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- used by the handler -------------------------------------------------------------------

    def _take(self, rules: list[_Rule], method: str, key: str, headers: Any) -> _Rule | None:
        """The first armed rule matching the request, one use taken from it; ``None`` if none matches."""
        with self._lock:
            for rule in rules:
                if rule.predicate is None or rule.predicate(method, key, headers):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        rules.remove(rule)
                    return rule
        return None

    def _draw_slowdown(self) -> bool:
        with self._lock:
            return self.slowdown_share > 0 and self._rng.random() < self.slowdown_share

    def _count_request(self, key: str, method: str, status: int) -> None:
        with self._lock:
            self._stats.setdefault(key, KeyStats()).requests[(method, status)] += 1

    def _count_bytes(self, key: str, status: int, n: int) -> None:
        if 200 <= status < 300:
            with self._lock:
                self._stats.setdefault(key, KeyStats()).body_bytes += n


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 32+ clients connect at once; a short backlog drops SYNs (1 s retry)
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client resetting an idle keep-alive connection is routine (the truncation tests do it)
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is dropped after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body leave in separate writes: without this, Nagle + delayed ACK add 40 ms to each
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: http.client.HTTPConnection | None = None
        with self.server.proxy._lock:
            self.server.proxy._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.proxy._lock:
            self.server.proxy._conns.discard(self.connection)
        if self.upstream is not None:
            self.upstream.close()
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _proxy(self) -> None:
        proxy = self.server.proxy
        method = self.command
        key = unquote(urlsplit(self.path).path).lstrip("/")
        body = self._read_body()
        hook = proxy.on_request
        if hook is not None:
            try:
                hook(method, key, self.headers)
            except Exception:  # noqa: BLE001 (whatever the test's hook raised)
                # said on stderr and answered 500, so the client fails at once instead of hanging
                traceback.print_exc()
                return self._send_error(key, 500, code="ProxyHookFailed")
        if proxy.latency_s > 0:
            time.sleep(proxy.latency_s)
        fail = proxy._take(proxy._fails, method, key, self.headers)
        if fail is not None:
            return self._send_error(key, fail.status)
        if proxy._draw_slowdown():
            return self._send_error(key, 503)
        try:
            resp = self._forward(method, body)
        except (OSError, http.client.HTTPException):
            return self._send_error(key, 502, code="BadGateway")
        self._relay(proxy, method, key, resp)

    def _forward(self, method: str, body: bytes | None) -> http.client.HTTPResponse:
        """Send the request upstream on this connection's upstream connection; one retry if it went stale."""
        for attempt in (0, 1):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.server.proxy._upstream, timeout=60)
            try:
                self.upstream.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.upstream.putheader(name, value)
                if body is not None:
                    self.upstream.putheader("Content-Length", str(len(body)))
                self.upstream.endheaders(body)
                return self.upstream.getresponse()
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, proxy: FaultProxy, method: str, key: str, resp: http.client.HTTPResponse) -> None:
        """Stream the upstream response to the client, cut short if a truncation is armed."""
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        if method == "HEAD" or resp.status in (204, 304):
            resp.read()
            self._reuse_or_drop(resp)
            self._start(key, resp.status, resp.reason, headers, resp.getheader("Content-Length"))
            return
        # a chunked or read-to-close upstream body is buffered so the client gets a Content-Length
        buffered = resp.read() if resp.length is None else None
        length = len(buffered) if buffered is not None else resp.length
        limit = length
        if (method == "GET" and 200 <= resp.status < 300 and length > 0
                and proxy._take(proxy._truncs, method, key, self.headers) is not None):
            limit = length // 2
        self._start(key, resp.status, resp.reason, headers, length)
        sent = 0
        while sent < limit:
            chunk = buffered[sent:limit] if buffered is not None else resp.read(min(_CHUNK, limit - sent))
            written = self._write(key, resp.status, chunk) if chunk else 0
            sent += written
            if written < len(chunk) or not chunk:
                break
        if sent < length:  # truncated (or the client left): neither connection can carry another request
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            self._reuse_or_drop(resp)

    def _write(self, key: str, status: int, data: bytes) -> int:
        """Write ``data`` to the client at the bandwidth cap; the bytes written (fewer if the client left).

        Bytes are counted before they are written, so a client that has read a body sees it counted.
        """
        proxy = self.server.proxy
        done = 0
        while done < len(data):
            piece = data[done : done + _CHUNK]
            proxy._throttle.wait(len(piece), proxy.bandwidth)
            proxy._count_bytes(key, status, len(piece))
            try:
                self.wfile.write(piece)
            except OSError:
                proxy._count_bytes(key, status, -len(piece))
                self.close_connection = True
                return done
            done += len(piece)
        return done

    def _start(self, key: str, status: int, reason: str, headers: list[tuple[str, str]], length: Any) -> None:
        """Count the request, then send the status line and headers."""
        self.server.proxy._count_request(key, self.command, status)
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
        except OSError:
            self.close_connection = True

    def _reuse_or_drop(self, resp: http.client.HTTPResponse) -> None:
        if resp.will_close and self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _send_error(self, key: str, status: int, code: str | None = None) -> None:
        body = _error_body(code or _ERROR_CODES.get(status, "InjectedFault"), key)
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "faultproxy")]
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        self._start(key, status, reason, headers, len(body))
        if self.command != "HEAD":
            self._write(key, status, body)
