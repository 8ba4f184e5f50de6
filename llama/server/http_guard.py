"""What a server left running needs before a request reaches the API: limits on what a client
may send and how long it may take, and which pages may send it.

- `guard(app, ...)`, ASGI middleware: reads a POST body whole before the app sees it, refusing
  one over `max_body` bytes (413, without reading the rest) or one that stalls for
  `body_timeout` seconds between two pieces (408); refuses bodies that are not JSON (415: a web
  page may post text/plain to any address without asking, but not JSON) and Host headers not
  allowed (400: a page of another site that resolves its name to 127.0.0.1). Each refusal is
  an access-log line and counted in /metrics, as the API's own answers are.
- `limited_protocol(...)`, uvicorn's h11 protocol with a connection limit and a timeout for a
  request's head: a connection that sends no complete head within `head_timeout` seconds is
  closed, and a new connection beyond `max_connections` closes the connection idle longest
  (or, when every one is busy with a request, is closed itself). So idle or half-sent
  connections cannot take every file descriptor, and /health stays reachable.
"""

import asyncio
import json
from typing import Callable, Iterable, List, Optional, Tuple

from llama.server.metrics import CLIENT_GONE, Metrics
from llama.server.openai_api import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def default_allowed_hosts(bind_host: str) -> Optional[List[str]]:
    """Listening on loopback only, only loopback names are allowed in Host (a page elsewhere
    cannot reach the server through a name of its own); listening on other addresses, any
    (None), unless --allowed_hosts says otherwise."""
    if host_name(bind_host) in LOOPBACK_HOSTS:
        return list(LOOPBACK_HOSTS)
    return None


class _Refused(Exception):
    def __init__(self, error: ApiError, close: bool, logged: Optional[int] = None):
        self.error, self.close = error, close
        self.logged = logged or error.status  # the status the access log and metrics say


def _error_response(error: ApiError, close: bool):
    from starlette.responses import JSONResponse

    headers = {"Connection": "close"} if close else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def guard(app, max_body: int, body_timeout: float,
          allowed_hosts: Optional[Iterable[str]] = None, metrics: Optional[Metrics] = None):
    """`app` behind the checks above (see the module's docstring); `metrics` logs and counts
    the requests refused."""
    allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        arrived = None if metrics is None else metrics.begin(scope["path"], scope["method"])
        try:
            _check_host(headers.get("host", ""), allowed)
            if scope["method"] != "POST":
                return await app(scope, receive, send)
            _check_content_type(headers.get("content-type", ""))
            body = await _read_body(receive, headers.get("content-length"), max_body,
                                    body_timeout)
        except _Refused as refused:
            if arrived is not None:  # logged and counted as the API's own answers are
                metrics.finish(arrived, refused.logged)
            return await _error_response(refused.error, refused.close)(scope, receive, send)
        return await app(scope, _replay(body, receive), send)

    return guarded


def _check_host(header: str, allowed) -> None:
    if allowed is not None and host_name(header) not in allowed:
        raise _Refused(ApiError(400, f"the Host header {header!r} is not allowed here (allowed: "
                                     f"{', '.join(sorted(allowed))}); start the server with "
                                     f"--allowed_hosts to allow more", "host",
                                code="host_not_allowed"), close=False)


def _check_content_type(header: str) -> None:
    kind = header.partition(";")[0].strip().lower()
    if kind != "application/json":
        raise _Refused(ApiError(415, f"the body must be JSON, sent with 'Content-Type: "
                                     f"application/json' (got {header or 'no Content-Type'!r})",
                                "content-type", code="unsupported_media_type"), close=True)


async def _read_body(receive, length: Optional[str], max_body: int, timeout: float) -> bytes:
    too_big = ApiError(413, f"the body is larger than this server's limit of {max_body} bytes "
                            f"(--max_body_bytes)", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise _Refused(too_big, close=True)  # refused before a byte of it is read
    chunks, size, more = [], 0, True
    while more:
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise _Refused(ApiError(408, f"the body was not sent within {timeout:g} s of its "
                                         f"last part", code="request_timeout"),
                           close=True) from None
        if message["type"] == "http.disconnect":
            raise _Refused(ApiError(400, "the client left before sending its body"), close=True,
                           logged=CLIENT_GONE)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise _Refused(too_big, close=True)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive) -> Callable:
    """A receive() that gives the body read already, then the client's own messages (a
    disconnect, which the app watches for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def decode_json(body: bytes):
    """The body's JSON, or ApiError 400 saying why not (bad JSON, bad UTF-8, or nesting deeper
    than the parser's stack: a client's mistake, not the server's)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None


def limited_protocol(max_connections: int, head_timeout: float):
    """uvicorn's h11 protocol class with the connection limit and head timeout above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer: Optional[asyncio.TimerHandle] = None
            self._idle_since = self.loop.time()
            if len(self.connections) > max_connections and not self._evict_idlest():
                self.connections.discard(self)
                transport.close()
                return
            self._start_head_timer()

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _evict_idlest(self) -> bool:
            idle: List[Tuple[float, "LimitedProtocol"]] = [
                (c._idle_since, c) for c in self.connections
                if c is not self and isinstance(c, LimitedProtocol) and c._between_requests()]
            if not idle:
                return False
            _, victim = min(idle, key=lambda pair: pair[0])
            victim._close()
            return True

        def _start_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out,
                                                        self.cycle)

        def _head_timed_out(self, cycle) -> None:
            self._head_timer = None
            if self.cycle is cycle and self._between_requests():  # no new request began
                self._close()

        def _close(self) -> None:
            if not self.transport.is_closing():
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self.transport.close()
            self.connections.discard(self)

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._start_head_timer()  # a head begins: it has head_timeout to complete
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._idle_since = self.loop.time()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return LimitedProtocol
