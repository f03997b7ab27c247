"""A lean HTTP/1.1 client for the upstream side: asyncio Protocols, httptools, a keep-alive pool.

Why not aiohttp's client: it was the largest single CPU cost per proxied request. The proxy
needs very little of it: POST/GET a bytes body with a handful of headers, wait for the status
line and headers, then stream or read the body, over pooled keep-alive connections.

Design
------
* :class:`Pool` (one per app) keeps idle connections per ``(scheme, host, port)`` in a LIFO
  (the most recently used connection is the one most likely still open, and the oldest ones
  age out). An idle connection is dropped when it has been idle longer than ``keepalive_s``
  (checked when taken, and by a sweep timer that runs while anything is idle), when the
  server closed it (``connection_lost`` seen, or the transport is closing), or when more than
  ``max_idle_per_host`` connections are idle for its host.
* Per URL, the pieces that never change (pool key, request target, ``Host`` header) are
  parsed once and cached. The hot path is: take a connection, write ONE bytes object
  (request line, ``Host``, the given headers, ``Content-Length``, body), wait for the headers.
  Nothing else is sent: no User-Agent, no Accept-Encoding unless the caller gives one, and
  bodies are never decompressed.
* :class:`_Connection` is the asyncio Protocol. It owns one ``httptools.HttpResponseParser``
  for its whole life; httptools does the framing (Content-Length, chunked). A body delimited
  by the end of the connection (neither length nor chunked) ends at EOF; that we track
  ourselves, as httptools has no "feed EOF". 1xx interim responses (100 Continue) are
  skipped. Body bytes are queued; above ~256 KiB unread the transport is paused, and
  resumed when the reader drains the queue.
* :class:`Response` is handed out once the headers are in; it owns the connection until
  ``release()`` (back to the pool if the whole body arrived and the connection is
  keep-alive, closed otherwise) or ``close()``. After either, it no longer touches the
  connection, so a late ``close()`` can never hurt a connection already pooled again.
* Reuse safety: a *reused* connection that fails before any byte of the response arrived
  (the server closed it while it was idle) is retried once on a fresh connection. Once a
  response byte came, nothing is retried.
* Errors are the proxy's own failures (:mod:`proxy.failures`), raised here directly:
  ``ConnRefused``, ``UpstreamTimeout(phase, s)``, ``ProcessExited(...)``. A wait for the
  headers or the body may carry a timeout: one timer on the loop, armed only when there
  is something to wait for (a body already complete is read without one); it fails the
  wait and closes the connection. A request cancelled mid-flight closes its connection,
  so cancellation never leaks one.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from proxy.failures import ConnRefused, ProcessExited, UpstreamTimeout
from proxy.headers import Headers

#: Unread body bytes above which the transport stops reading (resumed once drained).
HIGH_WATER = 256 * 1024

_REFUSAL_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
_NO_BODY_STATUSES = frozenset({204, 304})
_MAX_CACHED_URLS = 4096
#: Headers the client writes itself; a caller's own are ignored.
_OURS = frozenset({"host", "content-length", "transfer-encoding"})
_ERRNO_RE = re.compile(r"\[Errno (\d+)\]")


_HeadKey = tuple[str, str, tuple[tuple[str, str], ...]]


class _Limit(NamedTuple):
    """A request's deadline (time.monotonic()), and what to call it when it passes."""

    deadline: float
    phase: str
    seconds: float


def _limit(timeout_s: float | None, phase: str) -> _Limit | None:
    return None if timeout_s is None else _Limit(time.monotonic() + timeout_s, phase, timeout_s)


class _Target(NamedTuple):
    """The per-URL pieces, parsed once."""

    key: tuple[str, str, int]  # (scheme, host, port): the pool key
    path: str  # request target: path and query
    host_line: str  # "Host: ...\r\n"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection and its response parser. Serves one request at a time."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False  # connection_lost seen
        self.idle_since = 0.0
        # Per-request state, reset by start().
        self.busy = False
        self.started = False  # a byte of the response arrived
        self.head_method = False
        self.interim = False  # parsing a 1xx response
        self.status = 0
        self.raw_headers: dict[str, str] = {}
        self.headers_waiter: asyncio.Future[None] | None = None
        self.headers_done = False
        self.until_eof = False  # body delimited by the connection's end
        self.body_done = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.body_waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.timeout: tuple[str, float] | None = None  # (phase, seconds) of the armed timer

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are one.
        self.transport = cast(asyncio.Transport, transport)
        self.pool._all.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.body_done:
            # Nothing is expected on an idle connection or after a whole response: a
            # server sending more is not one to reuse.
            self.keep_alive = False
            self.close()
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._fail(ProcessExited(f"unparsable response: {exc}"))
        except httptools.HttpParserUpgrade:
            self._fail(ProcessExited("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(ProcessExited(f"unparsable response: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._all.discard(self)
        if not self.busy or self.body_done:
            return
        if self.headers_done and self.until_eof and exc is None:
            self.body_done = True  # the end of the connection is the end of this body
            self.keep_alive = False
            self._wake_body()
            return
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionAbortedError) \
                and exc.errno is not None:
            failure = ProcessExited("connection reset")
        elif not self.headers_done:
            failure = ProcessExited("server closed the connection")
        else:
            failure = ProcessExited("response body cut short")
        self._fail(failure, close=False)

    # -- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        seen = self.raw_headers.get(key)
        self.raw_headers[key] = text if seen is None else f"{seen}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue and friends: skip, a real answer follows
            self.raw_headers = {}
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        headers = self.raw_headers
        if self.head_method or status in _NO_BODY_STATUSES:
            self.until_eof = False
        else:
            self.until_eof = "content-length" not in headers and \
                "chunked" not in headers.get("transfer-encoding", "").lower()
        self.headers_done = True
        if self.head_method:
            # httptools cannot be told a HEAD response has no body: done now, never reused.
            self.body_done = True
            self.keep_alive = False
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self.paused = True
                transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.body_done = True
        self._wake_body()

    # -- used by Pool and Response ---------------------------------------------------

    def start(self, head_method: bool) -> None:
        """Reset the per-request state before a request is written."""
        self.busy = True
        self.started = False
        self.head_method = head_method
        self.interim = False
        self.status = 0
        self.raw_headers = {}
        self.headers_done = False
        self.until_eof = False
        self.body_done = False
        self.keep_alive = False
        self.chunks.clear()
        self.buffered = 0
        self.body_waiter = None
        self.error = None

    async def send(self, data: bytes, limit: _Limit | None) -> None:
        """Write the request and wait until the response's headers have arrived (before
        the limit's deadline, else UpstreamTimeout)."""
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            raise ProcessExited("server closed the connection")
        waiter = self.headers_waiter = self.loop.create_future()
        timer = None if limit is None else self._arm(limit)
        transport.write(data)
        try:
            await waiter
        finally:
            self.headers_waiter = None
            if timer is not None:
                timer.cancel()

    def _arm(self, limit: _Limit) -> asyncio.TimerHandle:
        """Fail the current wait with UpstreamTimeout(phase, seconds) at the deadline."""
        self.timeout = (limit.phase, limit.seconds)
        return self.loop.call_later(max(limit.deadline - time.monotonic(), 0.0),
                                    self._timed_out)

    def _timed_out(self) -> None:
        phase, seconds = self.timeout or ("idle", 0.0)
        self._fail(UpstreamTimeout(phase, seconds))

    async def readany(self, limit: _Limit | None = None) -> bytes:
        """Body bytes at hand, else wait for some (no timer unless it must wait)."""
        timer = None
        try:
            while True:
                data = self._take_chunks()
                if data:
                    return data
                if self.body_done:
                    return b""
                if self.error is not None:
                    raise self.error
                if timer is None and limit is not None:
                    timer = self._arm(limit)
                waiter = self.body_waiter = self.loop.create_future()
                try:
                    await waiter
                finally:
                    self.body_waiter = None
        finally:
            if timer is not None:
                timer.cancel()

    def _take_chunks(self) -> bytes:
        """Every body byte at hand (b"" when none)."""
        while True:
            chunks = self.chunks
            if not chunks:
                return b""
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self.buffered = 0
            if self.paused:
                self.paused = False
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.resume_reading()
            return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the queue (read() took more than its limit)."""
        self.chunks.appendleft(data)
        self.buffered += len(data)

    def close(self) -> None:
        self.busy = False
        self.pool._all.discard(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _fail(self, failure: BaseException, close: bool = True) -> None:
        if self.error is None:
            self.error = failure
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)
        self._wake_body()
        if close and self.transport is not None:
            self.transport.close()

    def _wake_body(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Response:
    """An upstream response whose status line and headers have arrived; the body is read
    on demand. Owns its connection until `release()` or `close()`."""

    __slots__ = ("status", "headers", "_conn")

    def __init__(self, conn: _Connection) -> None:
        self.status = conn.status
        self.headers = Headers(conn.raw_headers)
        self._conn: _Connection | None = conn

    async def readany(self, timeout_s: float | None = None, phase: str = "idle") -> bytes:
        """The next available body bytes; b"" at the end of the body. Waits at most
        `timeout_s` for them (UpstreamTimeout(phase) after that)."""
        conn = self._conn
        if conn is None:
            return b""
        return await conn.readany(_limit(timeout_s, phase))

    async def read(self, limit: int | None = None, timeout_s: float | None = None,
                   phase: str = "body") -> bytes:
        """The whole body, or (with `limit`) up to `limit` bytes of it, within `timeout_s`
        (no timer at all when it has already arrived)."""
        conn = self._conn
        if conn is None:
            return b""
        deadline = _limit(timeout_s, phase)
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            data = await conn.readany(deadline)
            if not data:
                break
            parts.append(data)
            size += len(data)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if limit is not None and len(body) > limit:
            conn.unread(body[limit:])
            body = body[:limit]
        return body

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (read or not)."""
        return self._conn is None or self._conn.body_done

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if its whole body
        arrived and it may be kept alive, otherwise it is closed. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.body_done and conn.keep_alive and conn.error is None and not conn.lost:
            conn.pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection (the body is abandoned). Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.close()

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None:  # dropped without release(): never leak the socket
            try:
                conn.close()
            except Exception:  # the loop may be gone already
                pass

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class Pool:
    """Keep-alive HTTP/1.1 connections per (scheme, host, port); one per app."""

    def __init__(self, connect_timeout_s: float, keepalive_s: float = 60.0,
                 max_idle_per_host: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._heads: dict[_HeadKey, bytes] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- the hot path ----------------------------------------------------------------

    async def request(self, method: str, url: str, body: bytes | None,
                      headers: Mapping[str, str], timeout_s: float | None = None,
                      phase: str = "first_byte") -> Response:
        """Send a request; return once the status line and headers have arrived, within
        `timeout_s` from now (connecting included), else UpstreamTimeout(phase)."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        key = (method, url, tuple(headers.items()))
        head = self._heads.get(key)
        if head is None:
            head = self._head(method, target, headers, key)
        if body is not None:
            data = b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
        else:
            data = head + b"\r\n"
        is_head = method == "HEAD"

        limit = _limit(timeout_s, phase)
        conn = self._take(target.key)
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target.key, limit)
            try:
                conn.start(is_head)
                await conn.send(data, limit)
                return Response(conn)
            except ProcessExited:
                conn.close()
                if not reused or conn.started:
                    raise
                # The server closed the idle connection as we reused it: once more, fresh.
                conn = None
            except BaseException:
                conn.close()  # cancelled or failed mid-flight: the connection is unusable
                raise

    def _head(self, method: str, target: _Target, headers: Mapping[str, str],
              key: _HeadKey) -> bytes:
        """Request line, Host and the given headers (no blank line), cached by all three."""
        lines = [f"{method} {target.path} HTTP/1.1\r\n{target.host_line}"]  # two lines
        # Header names are case-insensitive: one line per name, the last value wins.
        merged = {name.lower(): (name, value) for name, value in headers.items()}
        lines.extend(f"{name}: {value}\r\n" for lower, (name, value) in merged.items()
                     if lower not in _OURS)
        text = "".join(lines)
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            raise ValueError("line breaks in a request header")
        head = text.encode("utf-8", "surrogateescape")  # (a client's header, byte for byte)
        if len(self._heads) >= _MAX_CACHED_URLS:
            self._heads.clear()
        self._heads[key] = head
        return head

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        cutoff = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.lost or transport is None or transport.is_closing() \
                    or conn.idle_since < cutoff:
                conn.close()
                continue
            return conn
        return None

    def _put(self, conn: _Connection) -> None:
        conn.busy = False
        conn.chunks.clear()  # (a body released unread)
        conn.buffered = 0
        if conn.paused:  # a released body had filled the buffer: read again
            conn.paused = False
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.resume_reading()
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(max(self.keepalive_s / 2, 0.5), self._sweep)

    def _sweep(self) -> None:
        """Drop idle connections past keepalive_s or closed by their server."""
        self._sweeper = None
        cutoff = time.monotonic() - self.keepalive_s
        loop: asyncio.AbstractEventLoop | None = None
        for key in list(self._idle):
            idle = self._idle[key]
            keep = deque(c for c in idle if not c.lost and c.idle_since >= cutoff)
            for conn in idle:
                if conn.lost or conn.idle_since < cutoff:
                    conn.close()
            if keep:
                self._idle[key] = keep
                loop = keep[0].loop
            else:
                del self._idle[key]
        if loop is not None and not self._closed:
            self._sweeper = loop.call_later(max(self.keepalive_s / 2, 0.5), self._sweep)

    # -- setting up ------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {url!r}")
        host = parts.hostname
        if not host:
            raise ValueError(f"no host in {url!r}")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_text = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_text += f":{port}"
        if any(c in path for c in " \r\n") or any(c in host_text for c in " \r\n"):
            raise ValueError(f"blanks or line breaks in {url!r}")
        target = _Target((scheme, host, port), path, f"Host: {host_text}\r\n")
        if len(self._targets) >= _MAX_CACHED_URLS:
            self._targets.clear()
        self._targets[url] = target
        return target

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, key: tuple[str, str, int],
                       limit: _Limit | None = None) -> _Connection:
        """A new connection, within the connect timeout (or the request's deadline, when
        that comes first)."""
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = scheme == "https"
        timeout_s = self.connect_timeout_s
        failure = UpstreamTimeout("connect", timeout_s)
        if limit is not None and limit.deadline - time.monotonic() < timeout_s:
            timeout_s = limit.deadline - time.monotonic()
            failure = UpstreamTimeout(limit.phase, limit.seconds)
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), host, port,
                    ssl=self._ssl_context() if tls else None,
                    server_hostname=host if tls else None)
        except TimeoutError:
            raise failure from None
        except socket.gaierror as exc:
            raise ConnRefused(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        except ssl.SSLError as exc:
            raise ConnRefused(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        except OSError as exc:
            if exc.errno in _REFUSAL_ERRNOS or isinstance(exc, ConnectionRefusedError) \
                    or _all_refusals(exc):
                raise ConnRefused(f"connection refused by {host}:{port}") from exc
            raise ConnRefused(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle.clear()
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    @property
    def idle_count(self) -> int:
        """Connections idle in the pool and still open (for tests and diagnostics)."""
        return sum(self.idle_by_key().values())

    def idle_by_key(self) -> dict[tuple[str, str, int], int]:
        """Open idle connections per (scheme, host, port) (for tests and diagnostics)."""
        return {key: n for key, idle in self._idle.items()
                if (n := sum(1 for c in idle if not c.lost))}

    @property
    def in_use_count(self) -> int:
        """Connections checked out of the pool (a request or response holds them)."""
        return len(self._all) - self.idle_count

    @property
    def open_count(self) -> int:
        """Connections open, idle or in use (for tests and diagnostics)."""
        return len(self._all)


def _all_refusals(exc: OSError) -> bool:
    """Whether a "Multiple exceptions" connect error (several addresses) was all refusals."""
    codes = [int(c) for c in _ERRNO_RE.findall(str(exc))]
    return bool(codes) and all(c in _REFUSAL_ERRNOS for c in codes)
