"""Tests of the route's HTTP layer (SPEC §17.1): RouteServer in mlxctl. Loopback only: a stdlib server
in this file plays the lanes, with answers of every shape a relay can get wrong."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import select
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

import mlxctl as route
from mlxctl import LaneTarget, RouteServer

pytestmark = pytest.mark.timeout(60)

KEY = "sk-route-test-Secret123"

# -- the stand-in lane ----------------------------------------------------------------------------


class Lane(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 resets connections under 64 concurrent streams

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), LaneHandler)
        self.seen: list[dict[str, Any]] = []
        self.closed_at: dict[str, float] = {}  # X-Tag -> when the route closed the connection
        self.release = threading.Event()


class LaneHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Lane

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append(
            {
                "path": self.path,
                "request_version": self.request_version,
                "headers": list(self.headers.items()),
                "body": body if len(body) < (1 << 20) else len(body),
            }
        )
        mode, _, arg = self.headers.get("X-Test", "echo").partition(":")
        getattr(self, "mode_" + mode.replace("-", "_"))(body, arg)

    def tag(self) -> str:
        return self.headers.get("X-Tag", "")

    def send_json(
        self, status: int, document: Any, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def mode_echo(self, body: bytes, arg: str) -> None:
        headers = [[k, v] for k, v in self.headers.items()]
        self.send_json(200, {"path": self.path, "headers": headers, "body": body.decode("latin-1")})

    def mode_status(self, body: bytes, arg: str) -> None:
        status = int(arg)
        self.send_response(status)
        if status == 204:
            self.end_headers()
            return
        data = b'{"error":{"message":"from the lane"}}'
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def mode_hop(self, body: bytes, arg: str) -> None:
        extra = (
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X-T"),
            ("Upgrade", "h2c"),
            ("X-Keep", "yes"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        )
        self.send_json(200, {"ok": True}, extra)

    def start_stream(self, chunked: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()

    def chunk(self, data: bytes, chunked: bool = True) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def mode_sse(self, body: bytes, arg: str) -> None:
        """sse:N:INTERVAL[:close] — N events INTERVAL seconds apart, chunked or until close."""
        count, interval, *rest = arg.split(":")
        chunked = rest != ["close"]
        self.start_stream(chunked)
        for i in range(int(count)):
            if i:
                time.sleep(float(interval))
            self.chunk(b'data: {"n": %d}\n\n' % i, chunked)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def wait_for_close_or_release(self) -> bool:
        """True when the route closed the connection (recorded), False once released."""
        while not self.server.release.is_set():
            if select.select([self.connection], [], [], 0.01)[0]:
                with contextlib.suppress(OSError):
                    if self.connection.recv(1):
                        continue
                self.server.closed_at[self.tag()] = time.monotonic()
                return True
        return False

    def mode_hold(self, body: bytes, arg: str) -> None:
        """One event, then wait for the release (then finish) or for the route to close."""
        self.start_stream()
        self.chunk(b"data: first\n\n")
        if not self.wait_for_close_or_release():
            self.chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def mode_silent(self, body: bytes, arg: str) -> None:
        """No answer at all until the route closes (a long prefill)."""
        self.wait_for_close_or_release()
        self.close_connection = True

    def mode_slow(self, body: bytes, arg: str) -> None:
        time.sleep(float(arg))
        self.mode_echo(body, arg)

    def mode_cut_length(self, body: bytes, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.close_connection = True

    def mode_cut_chunked(self, body: bytes, arg: str) -> None:
        self.start_stream()
        self.chunk(b"data: one\n\n")
        self.close_connection = True

    def mode_no_status(self, body: bytes, arg: str) -> None:
        self.close_connection = True

    def mode_garbage_status(self, body: bytes, arg: str) -> None:
        self.wfile.write(b"SPDY/9 what\r\n\r\n")
        self.close_connection = True

    def mode_flood(self, body: bytes, arg: str) -> None:
        self.start_stream()
        try:
            while True:
                self.chunk(b"x" * 65536)
        except OSError:
            self.server.closed_at[self.tag()] = time.monotonic()
        self.close_connection = True


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def lane() -> Iterator[Lane]:
    server = Lane()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def no_thread_crashes() -> Iterator[list[BaseException]]:
    """Fails a test in which any thread died with an exception (it would print a traceback)."""
    crashes: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda args: crashes.append(args.exc_value or Exception())
    yield crashes
    threading.excepthook = old
    assert not crashes


class Routes:
    """Starts routes wired to the stand-in lane; closes them after the test."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.dead_port = free_port()
        self.logs: list[str] = []
        self.resolved: list[str] = []
        self.servers: list[RouteServer] = []
        self.health_status = 200
        self.blackhole_port = 0

    def resolve(self, model_id: str) -> LaneTarget | str:
        self.resolved.append(model_id)
        port = self.lane.server_address[1]
        table: dict[str, LaneTarget | str] = {
            "mlx-a": LaneTarget(int(port), "mlx-a", "127.0.0.1"),
            "mlx-b": LaneTarget(int(port), "mlx-b", "127.0.0.1", served_id="served-b"),
            "mlx-same": LaneTarget(int(port), "mlx-same", "127.0.0.1", served_id="mlx-same"),
            "mlx-dead": LaneTarget(self.dead_port, "mlx-dead", "127.0.0.1"),
            "mlx-blackhole": LaneTarget(self.blackhole_port, "mlx-blackhole", "127.0.0.1"),
            "mlx-off": "unavailable",
        }
        if model_id == "mlx-boom":
            raise RuntimeError("resolve broke")
        return table.get(model_id, "unknown")

    def health(self) -> tuple[int, dict[str, Any]]:
        port = int(self.lane.server_address[1])
        lanes = [
            {"port": port, "model": "mlx-a", "state": "serving", "draining": False},
            {"port": port, "model": "mlx-b", "state": "serving", "draining": True},
        ]
        status = "ok" if self.health_status == 200 else "stale"
        document = {"status": status, "generation": 7, "tick_age_s": 1.5, "lanes": lanes}
        return self.health_status, document

    def __call__(self, **options: Any) -> RouteServer:
        options.setdefault("key", None)
        server = RouteServer(
            "127.0.0.1",
            0,
            resolve=self.resolve,
            models=lambda: ["mlx-a", "mlx-b"],
            health=self.health,
            log=self.logs.append,
            **options,
        )
        server.start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.close(0)
            assert server.open_connections() == 0
            assert server.in_flight() == {}


@pytest.fixture
def routes(lane: Lane) -> Iterator[Routes]:
    made = Routes(lane)
    yield made
    made.close()


@pytest.fixture
def rt(routes: Routes) -> RouteServer:
    return routes()


# -- clients --------------------------------------------------------------------------------------


class BytesSocket:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse(raw: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    response = http.client.HTTPResponse(BytesSocket(raw))  # type: ignore[arg-type]
    response.begin()
    return response.status, response.msg, response.read()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the route closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def request_bytes(
    model: str = "mlx-a",
    path: str = "/v1/chat/completions",
    headers: tuple[str, ...] = (),
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    if body is None:
        body = json.dumps({"model": model, "messages": []}).encode()
    head = [f"POST {path} HTTP/{version}", "Host: route", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def post(
    rt: RouteServer,
    document: Any = None,
    *,
    body: bytes | None = None,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    if body is None:
        body = json.dumps(document if document is not None else {"model": "mlx-a"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    try:
        conn.request("POST", path, body, headers or {})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def get(
    rt: RouteServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"message", "type", "code"}
    return document["error"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def echoed(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    document["headers"] = {k.lower(): v for k, v in document["headers"]}
    return document  # type: ignore[no-any-return]


# -- pure parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1", None),
        (b"GET /health?x=1 HTTP/1.0\r\nA: b", None),
        (b"GET http://h:1/v1/models?q HTTP/1.1", None),
        (b"GET  / HTTP/1.1", 400),
        (b"GET / HTTP/1.1 x", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/1", 400),
        (b"G(T / HTTP/1.1", 400),
        (b"GET * HTTP/1.1", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x", 400),
        (b"GET / HTTP/1.1\r\nName : x", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n  folded", 400),
        (b"GET / HTTP/1.1\r\nA: b\x00c", 400),
        (b"GET / HTTP/1.1\r\nA: b\rc", 400),
        (b"GET / HTTP/1.1\r\nnocolon", 400),
        (b"GET / HTTP/1.1" + b"\r\nA: b" * 101, 431),
    ],
)
def test_parse_head(head: bytes, status: int | None) -> None:
    if status is None:
        parsed = route.route_parse_head(head)
        assert parsed.path in ("/", "/health", "/v1/models")
        return
    with pytest.raises(route.RouteHttpError, match=r".") as caught:
        route.route_parse_head(head)
    assert caught.value.status == status


def test_parse_head_values() -> None:
    parsed = route.route_parse_head(b"POST /v1/x?y=1 HTTP/1.0\r\nX-A:  v a  \r\nx-b:\xe9")
    assert (parsed.method, parsed.target, parsed.path) == ("POST", "/v1/x?y=1", "/v1/x")
    assert parsed.version == (1, 0)
    assert parsed.headers == [("X-A", "v a"), ("x-b", "\xe9")]
    absolute = route.route_parse_head(b"GET http://h:1/v1/models?q HTTP/1.1")
    assert (absolute.target, absolute.path) == ("/v1/models?q", "/v1/models")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], 0),
        ([("Content-Length", "12")], 12),
        ([("content-length", "0000000000000000001")], 1),
        ([("Transfer-Encoding", "chunked")], None),
        ([("Transfer-Encoding", " Chunked ")], None),
        ([("Content-Length", "12"), ("Content-Length", "12")], 400),
        ([("Content-Length", "1"), ("Transfer-Encoding", "chunked")], 400),
        ([("Content-Length", "+1")], 400),
        ([("Content-Length", "0x1")], 400),
        ([("Content-Length", "1 2")], 400),
        ([("Content-Length", "")], 400),
        ([("Content-Length", "1" * 20)], 400),
        ([("Transfer-Encoding", "gzip, chunked")], 501),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], 501),
    ],
)
def test_body_length(headers: list[tuple[str, str]], expected: int | None) -> None:
    head = route.RouteHead("POST", "/", "/", (1, 1), headers)
    if expected in (400, 501):
        with pytest.raises(route.RouteHttpError, match=r".") as caught:
            route.route_body_length(head)
        assert caught.value.status == expected
    else:
        assert route.route_body_length(head) == expected


def test_transfer_encoding_in_http10_is_refused() -> None:
    head = route.RouteHead("POST", "/", "/", (1, 0), [("Transfer-Encoding", "chunked")])
    with pytest.raises(route.RouteHttpError, match="Transfer-Encoding") as caught:
        route.route_body_length(head)
    assert caught.value.status in (400, 501)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),
        (f"BEARER  {KEY}", True),
        (f"Bearer {KEY}x", False),
        (f"Basic {KEY}", False),
        (KEY, False),
        ("Bearer ", False),
        ("Bearer \xe9", False),
    ],
)
def test_authorized(value: str, ok: bool) -> None:
    assert route.route_authorized([("Authorization", value)], KEY.encode()) is ok


def test_authorized_needs_exactly_one_header() -> None:
    value = f"Bearer {KEY}"
    assert not route.route_authorized([], KEY.encode())
    pair = [("Authorization", value), ("authorization", value)]
    assert not route.route_authorized(pair, KEY.encode())


def test_forward_headers_drop_hop_by_hop_and_named() -> None:
    headers = [
        ("Connection", "keep-alive, X-Named"),
        ("X-Named", "1"),
        ("KEEP-ALIVE", "5"),
        ("te", "trailers"),
        ("Trailer", "x"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "x"),
        ("Proxy-Authenticate", "x"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "1"),
        ("Host", "h"),
        ("Expect", "100-continue"),
        ("X-Kept", "yes"),
        ("Authorization", "Bearer x"),
    ]
    kept = route.route_forward_headers(headers, frozenset({"authorization"}))
    assert kept == [("X-Kept", "yes")]


def test_lane_body_byte_for_byte_unless_model_changes() -> None:
    body = b'{ "model" : "mlx-a",  "t": 1.50, "s": "\\u00e9" }'
    model, document = route.route_request_model(body)
    assert route.route_lane_body(body, document, model, LaneTarget(1, "mlx-a", "h")) is body
    same = LaneTarget(1, "mlx-a", "h", served_id="mlx-a")
    assert route.route_lane_body(body, document, model, same) is body
    served = route.route_lane_body(body, document, model, LaneTarget(1, "mlx-a", "h", "other"))
    assert json.loads(served) == {"model": "other", "t": 1.5, "s": "é"}
    assert list(json.loads(served)) == ["model", "t", "s"]


def test_lane_body_keeps_lone_surrogates_encodable() -> None:
    body = b'{"model": "router-mlx-a", "s": "\\ud800"}'
    model, document = route.route_request_model(body)
    new = route.route_lane_body(body, document, model, LaneTarget(1, "mlx-a", "h"))
    assert json.loads(new)["s"] == "\ud800"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe{}", "invalid_json"),
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b"[]", "invalid_json"),
        (b'"mlx-a"', "invalid_json"),
        (b'{"model": ' + b"[" * 100000 + b"]" * 100000 + b"}", "invalid_json"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b'{"model": 5}', "invalid_model"),
        (b'{"model": ["mlx-a"]}', "invalid_model"),
    ],
)
def test_request_model_refusals(body: bytes, code: str) -> None:
    with pytest.raises(route.RouteHttpError, match=r".") as caught:
        route.route_request_model(body)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_health_document_adds_in_flight_after_state() -> None:
    base = {
        "status": "ok",
        "lanes": [
            {"port": 8100, "model": "mlx-a", "state": "serving", "draining": False},
            {"port": 8101, "model": "mlx-b", "state": "dead", "in_flight": 99},
            "junk",
        ],
    }
    document = route.route_health_document(base, {(8100, "mlx-a"): 3})
    assert list(document["lanes"][0]) == ["port", "model", "state", "in_flight", "draining"]
    assert document["lanes"][0]["in_flight"] == 3
    assert document["lanes"][1]["in_flight"] == 0
    assert len(document["lanes"]) == 2
    assert base["lanes"][0] == {
        "port": 8100,
        "model": "mlx-a",
        "state": "serving",
        "draining": False,
    }  # type: ignore[index]


def test_error_body_shape() -> None:
    for status, kind in (
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (503, "server_error"),
    ):
        assert json.loads(route.route_error_body(status, "m", "c")) == {
            "error": {"message": "m", "type": kind, "code": "c"}
        }


def test_counters_histogram_is_cumulative() -> None:
    counters = route.RouteLaneCounters()
    for ttfb in (0.001, 0.2, 0.2, 1000.0):
        counters.observe(200, ttfb)
    counters.observe(499, None)
    stats = counters.snapshot(2)
    assert stats.requests == {200: 4, 499: 1}
    assert stats.ttfb_count == 4
    assert stats.ttfb_buckets[0] == (0.005, 1)
    assert dict(stats.ttfb_buckets)[0.25] == 3
    assert stats.ttfb_buckets[-1] == (float("inf"), 4)
    assert [count for _, count in stats.ttfb_buckets] == sorted(c for _, c in stats.ttfb_buckets)


def test_log_is_one_line_per_cause_per_minute() -> None:
    lines: list[str] = []
    log = route.RouteLog(lines.append, KEY)
    for _ in range(5):
        log("a", f"first {KEY}")
    log("b", "other")
    assert lines == ["route: first ***", "route: other"]
    log.last["a"] = (time.monotonic() - 61, 4)
    log("a", "again")
    assert lines[-1] == "route: again (4 more like it in the last minute)"


# -- forwarding -----------------------------------------------------------------------------------


def test_forwards_body_byte_for_byte_and_drops_hop_by_hop(rt: RouteServer, lane: Lane) -> None:
    body = b'{ "model":"mlx-a" ,"x":[1, 2.50,"\\u00e9", "\xc3\xa9"],"n":1e400 }'
    headers = {
        "X-Custom": "kept",
        "Connection": "X-Drop",
        "X-Drop": "gone",
        "Keep-Alive": "timeout=1",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eA==",
        "Accept-Encoding": "gzip, br",
        "Authorization": "Bearer passes-without-a-route-key",
    }
    status, answer_headers, answer = post(rt, body=body, headers=headers)
    assert status == 200
    assert answer_headers["Connection"] == "close"
    assert int(answer_headers["Content-Length"]) == len(answer)
    seen = echoed(answer)
    assert seen["body"].encode("latin-1") == body
    got = seen["headers"]
    assert got["x-custom"] == "kept"
    assert got["accept-encoding"] == "identity"
    assert got["host"] == f"127.0.0.1:{lane.server_address[1]}"
    assert got["content-length"] == str(len(body))
    assert got["connection"] == "close"
    assert got["authorization"] == "Bearer passes-without-a-route-key"
    for name in ("x-drop", "keep-alive", "te", "proxy-authorization", "transfer-encoding"):
        assert name not in got
    assert lane.seen[-1]["request_version"] == "HTTP/1.1"


@pytest.mark.parametrize(
    ("model", "lane_model"),
    [
        ("router-mlx-a", "mlx-a"),
        ("mlx-b", "served-b"),
        ("router-mlx-b", "served-b"),
        ("router-mlx-same", "mlx-same"),
    ],
)
def test_model_rewrites(rt: RouteServer, routes: Routes, model: str, lane_model: str) -> None:
    document = {"model": model, "messages": [{"role": "user", "content": "é"}], "stream": False}
    status, _, answer = post(rt, document)
    assert status == 200
    sent = json.loads(echoed(answer)["body"].encode("latin-1"))
    assert sent == {**document, "model": lane_model}
    assert routes.resolved[-1] == model.removeprefix("router-")


def test_path_and_query_reach_the_lane(rt: RouteServer) -> None:
    for path in ("/v1/completions", "/v1/embeddings?x=1&y=%20", "/v1/responses"):
        status, _, answer = post(rt, path=path)
        assert status == 200
        assert echoed(answer)["path"] == path


def test_lane_status_and_headers_are_relayed(rt: RouteServer) -> None:
    status, headers, answer = post(rt, headers={"X-Test": "status:404"})
    assert (status, answer) == (404, b'{"error":{"message":"from the lane"}}')
    status, headers, answer = post(rt, headers={"X-Test": "status:204"})
    assert (status, answer) == (204, b"")
    assert "Content-Length" not in headers and "Transfer-Encoding" not in headers
    status, headers, answer = post(rt, headers={"X-Test": "hop"})
    assert status == 200 and json.loads(answer) == {"ok": True}
    for name in ("X-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert name not in headers
    assert headers["X-Keep"] == "yes"
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers.get_all("Connection") == ["close"]


def read_events(response: http.client.HTTPResponse) -> list[tuple[float, bytes]]:
    events = []
    while data := response.read1(65536):
        events.append((time.monotonic(), data))
    return events


@pytest.mark.parametrize("lane_framing", ["chunked", "close"])
def test_stream_chunks_arrive_as_the_lane_sends_them(rt: RouteServer, lane_framing: str) -> None:
    mode = "sse:5:0.2" + (":close" if lane_framing == "close" else "")
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    started = time.monotonic()
    conn.request("POST", "/v1/chat/completions", b'{"model":"mlx-a"}', {"X-Test": mode})
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Connection") == "close"
    events = read_events(response)
    conn.close()
    assert b"".join(data for _, data in events) == b"".join(
        b'data: {"n": %d}\n\n' % i for i in range(5)
    )
    assert len(events) == 5  # one chunk per event: nothing buffered
    assert events[0][0] - started < 0.15
    assert events[-1][0] - started >= 0.75


def test_http10_client_gets_the_stream_until_close(rt: RouteServer) -> None:
    raw = exchange(rt.port, request_bytes(headers=("X-Test: sse:3:0.05",), version="1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == b"".join(b'data: {"n": %d}\n\n' % i for i in range(3))


def test_http10_client_with_length(rt: RouteServer) -> None:
    status, headers, body = parse(exchange(rt.port, request_bytes(version="1.0")))
    assert status == 200 and int(headers["Content-Length"]) == len(body)


def test_chunked_request_body_is_decoded(rt: RouteServer, lane: Lane) -> None:
    body = b'{"model":"mlx-a","pad":"' + b"z" * 70000 + b'"}'
    pieces = [body[:10], body[10:70000], body[70000:]]
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, answer = parse(exchange(rt.port, head + chunks + b"0\r\nX-Trailer: t\r\n\r\n"))
    assert status == 200
    assert echoed(answer)["body"].encode("latin-1") == body
    assert dict((k.lower(), v) for k, v in lane.seen[-1]["headers"])["content-length"] == str(
        len(body)
    )


def test_expect_100_continue(routes: Routes) -> None:
    rt = routes(key=KEY, max_body=1000)
    body = b'{"model":"mlx-a"}'
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = parse(read_all(sock))
    assert status == 200 and echoed(answer)["body"] == body.decode()
    # refusals come before 100 Continue
    for bad, expected in (
        (head.replace(KEY.encode(), b"wrong"), 401),
        (head.replace(b"Length: 17", b"Length: 1001"), 413),
    ):
        with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:
            sock.sendall(bad)
            status, _, answer = parse(read_all(sock))
        assert status == expected
        assert KEY not in answer.decode()


def test_expect_other_than_continue_is_417(rt: RouteServer) -> None:
    status, _, body = parse(exchange(rt.port, request_bytes(headers=("Expect: teapot",))))
    assert status == 417 and error_of(body)["code"] == "bad_expect"


# -- refusals -------------------------------------------------------------------------------------


RAW_REFUSALS = [
    ("junk line", b"HELLO\r\n\r\n", 400),
    ("binary junk", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("nul in line", b"GET /\x00 HTTP/1.1\r\n\r\n", 400),
    ("http/2", b"GET /health HTTP/2.0\r\n\r\n", 505),
    ("folded header", b"GET /health HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400),
    ("duplicate length", request_bytes(headers=("Content-Length: 30",)), 400),
    ("length and chunked", request_bytes(headers=("Transfer-Encoding: chunked",)), 400),
    ("signed length", request_bytes().replace(b"Content-Length: ", b"Content-Length: +"), 400),
    ("gzip coding", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (
        "bad chunk size",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    (
        "bad chunk end",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz",
        400,
    ),
    ("unknown path", request_bytes(path="/v1/nope"), 404),
    ("root path", b"GET / HTTP/1.1\r\n\r\n", 404),
    ("get on post path", b"GET /v1/chat/completions HTTP/1.1\r\n\r\n", 405),
    ("lowercase method", request_bytes().replace(b"POST", b"post"), 405),
    ("post on models", request_bytes(path="/v1/models"), 405),
    ("too many headers", b"GET /health HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", 431),
    ("huge head", b"GET /health HTTP/1.1\r\nA: " + b"b" * 70000 + b"\r\n\r\n", 431),
    ("not json", request_bytes(body=b"model=mlx-a"), 400),
    ("not utf-8", request_bytes(body=b'{"model":"mlx-\xff"}'), 400),
    ("not an object", request_bytes(body=b'["mlx-a"]'), 400),
    ("deep nesting", request_bytes(body=b'{"a":' + b"[" * 50000 + b"]" * 50000 + b"}"), 400),
    ("model not a string", request_bytes(body=b'{"model":{"id":"mlx-a"}}'), 400),
    ("no model", request_bytes(body=b'{"messages":[]}'), 400),
    ("empty body", request_bytes(body=b""), 400),
    ("unknown model", request_bytes(model="mlx-nope"), 404),
    ("unknown router model", request_bytes(model="router-mlx-nope"), 404),
    ("unavailable model", request_bytes(model="mlx-off"), 503),
    ("lane refuses", request_bytes(model="mlx-dead"), 503),
    ("lane closes before status", request_bytes(headers=("X-Test: no-status",)), 502),
    ("lane answers junk", request_bytes(headers=("X-Test: garbage-status",)), 502),
    ("resolve raises", request_bytes(model="mlx-boom"), 500),
]


@pytest.mark.parametrize(
    ("data", "status"), [r[1:] for r in RAW_REFUSALS], ids=[r[0] for r in RAW_REFUSALS]
)
def test_refusals_are_openai_shaped(rt: RouteServer, data: bytes, status: int) -> None:
    started = time.monotonic()
    raw = exchange(rt.port, data)
    assert time.monotonic() - started < 2.0  # none of them waits for the deadline
    got, headers, body = parse(raw)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert headers["Connection"] == "close"
    error = error_of(body)
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if status == 405:
        assert headers["Allow"] in ("POST", "GET, HEAD")
    if status == 503:
        assert headers["Retry-After"] == "5"


def test_refusals_count_nothing_in_flight(rt: RouteServer, routes: Routes) -> None:
    for model in ("mlx-nope", "mlx-off", "mlx-dead"):
        post(rt, {"model": model})
    assert wait_for(lambda: sum(rt.stats().other.values()) == 2 and rt.in_flight() == {})
    stats = rt.stats()
    dead = (routes.dead_port, "mlx-dead")
    assert stats.lanes[dead].requests == {503: 1} and stats.lanes[dead].in_flight == 0
    assert stats.other == {404: 1, 503: 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux accept-queue behaviour")
def test_lane_connect_timeout_is_503(
    rt: RouteServer, routes: Routes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(route, "ROUTE_LANE_CONNECT_TIMEOUT", 0.3)
    with socket.socket() as full, socket.socket() as queued:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued.connect(full.getsockname())  # the one place in the queue: later SYNs are dropped
        routes.blackhole_port = full.getsockname()[1]
        started = time.monotonic()
        status, headers, body = post(rt, {"model": "mlx-blackhole"})
    assert 0.25 < time.monotonic() - started < 1.5
    assert (status, headers["Retry-After"]) == (503, "5")
    assert error_of(body)["code"] == "lane_unreachable"


def test_key(routes: Routes, lane: Lane) -> None:
    rt = routes(key=KEY)
    status, headers, body = post(rt)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert error_of(body)["type"] == "authentication_error"
    assert post(rt, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert get(rt, "/v1/models")[0] == 401
    assert get(rt, "/v1/nope")[0] == 401  # no probing of paths without the key
    assert get(rt, "/health")[0] == 200
    assert get(rt, "/health", method="HEAD")[0] == 200
    assert get(rt, "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200
    status, _, answer = post(rt, headers={"Authorization": f"bearer {KEY}"})
    assert status == 200
    assert "authorization" not in echoed(answer)["headers"]
    post(rt, {"model": KEY}, headers={"Authorization": f"Bearer {KEY}"})
    assert routes.logs and not any(KEY in line for line in routes.logs)


def test_declared_oversize_body_is_refused_at_once(routes: Routes) -> None:
    rt = routes()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n"
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.settimeout(1)
        first = sock.recv(65536)
        assert time.monotonic() - started < 0.5
    assert first.startswith(b"HTTP/1.1 413")


def test_a_100_mb_upload_is_refused_without_reading_it(routes: Routes) -> None:
    rt = routes()
    body = b"x" * (100 << 20)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    received = []
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:

        def upload() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(head + body)

        sender = threading.Thread(target=upload)
        sender.start()
        with contextlib.suppress(OSError):
            received.append(sock.recv(65536))
        sock.shutdown(socket.SHUT_RDWR)
        sender.join()
    assert received[0].startswith(b"HTTP/1.1 413")
    assert wait_for(lambda: rt.open_connections() == 0)


def test_chunked_body_over_the_limit_is_413(routes: Routes) -> None:
    rt = routes(max_body=100)
    chunk = b"40\r\n" + b"x" * 64 + b"\r\n"
    data = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
    status, _, body = parse(exchange(rt.port, data))
    assert status == 413 and error_of(body)["code"] == "body_too_large"


def test_body_at_the_limit_passes(routes: Routes) -> None:
    body = b'{"model":"mlx-a","p":"' + b"y" * 100 + b'"}'
    rt = routes(max_body=len(body))
    assert post(rt, body=body)[0] == 200
    assert post(rt, body=body + b" ")[0] == 413


# -- time limits ----------------------------------------------------------------------------------


def test_slow_loris_gets_408_at_the_deadline(routes: Routes) -> None:
    rt = routes(request_deadline=1.0)
    data = request_bytes()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:
        with contextlib.suppress(OSError):
            for byte in data:
                sock.send(bytes([byte]))
                time.sleep(0.1)
        raw = read_all(sock)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.0
    assert parse(raw)[0] == 408
    assert any("deadline" in line for line in routes.logs)


def test_idle_connection_is_closed_silently_at_the_deadline(routes: Routes) -> None:
    rt = routes(request_deadline=0.5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as sock:
        assert read_all(sock) == b""
    assert 0.4 < time.monotonic() - started < 1.5
    assert wait_for(lambda: rt.open_connections() == 0)


def test_deadline_never_applies_to_the_lanes_answer(routes: Routes) -> None:
    rt = routes(request_deadline=0.5)
    assert post(rt, headers={"X-Test": "slow:1.2"})[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", b'{"model":"mlx-a"}', {"X-Test": "sse:3:0.4"})
    assert len(read_events(conn.getresponse())) == 3
    conn.close()


def test_stalled_client_closes_both_sides(routes: Routes, lane: Lane) -> None:
    rt = routes(write_stall=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", rt.port))
    sock.sendall(request_bytes(headers=("X-Test: flood", "X-Tag: stall")))
    assert wait_for(lambda: "stall" in lane.closed_at, 10)
    assert wait_for(lambda: any("read nothing" in line for line in routes.logs))
    assert wait_for(lambda: rt.in_flight() == {})
    sock.close()


# -- the client or the lane goes away -------------------------------------------------------------


def test_a_large_body_is_not_held_while_the_answer_streams(rt: RouteServer) -> None:
    size = 16 << 20
    tracemalloc.start()
    try:
        body = json.dumps({"model": "router-mlx-a", "pad": "x" * size}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"X-Test": "hold"})
        response = conn.getresponse()
        assert response.read1(65536) == b"data: first\n\n"
        held = tracemalloc.get_traced_memory()[0]
        response.close()
        conn.close()
    finally:
        tracemalloc.stop()
    # this test's body and the lane's copy are alive; the route's body, parsed document and
    # re-encoded body (3 x 16 MiB) must not be
    assert held < 2 * size + (6 << 20)


def test_client_leaving_mid_stream_closes_the_lane(rt: RouteServer, lane: Lane) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    conn.request(
        "POST", "/v1/chat/completions", b'{"model":"mlx-a"}', {"X-Test": "hold", "X-Tag": "mid"}
    )
    response = conn.getresponse()
    assert response.read1(65536) == b"data: first\n\n"
    assert rt.in_flight() == {(lane.server_address[1], "mlx-a"): 1}
    left = time.monotonic()
    response.close()  # the connection's last reference: the socket closes
    conn.close()
    assert wait_for(lambda: "mid" in lane.closed_at, 3)
    assert lane.closed_at["mid"] - left < 1.0
    assert wait_for(lambda: rt.in_flight() == {})
    assert rt.stats().lanes[(lane.server_address[1], "mlx-a")].requests == {200: 1}


def test_client_leaving_before_the_answer_closes_the_lane(rt: RouteServer, lane: Lane) -> None:
    with socket.create_connection(("127.0.0.1", rt.port)) as sock:
        sock.sendall(request_bytes(headers=("X-Test: silent", "X-Tag: early")))
        assert wait_for(lambda: rt.in_flight() != {})
        left = time.monotonic()
    assert wait_for(lambda: "early" in lane.closed_at, 3)
    assert lane.closed_at["early"] - left < 1.0
    assert wait_for(lambda: rt.in_flight() == {})
    assert rt.stats().lanes[(lane.server_address[1], "mlx-a")].requests == {499: 1}


def test_client_reset_mid_stream_is_one_quiet_log_line(
    rt: RouteServer, routes: Routes, lane: Lane
) -> None:
    for i in range(3):
        sock = socket.create_connection(("127.0.0.1", rt.port))
        sock.sendall(request_bytes(headers=("X-Test: hold", f"X-Tag: reset{i}")))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
        assert wait_for(lambda i=i: f"reset{i}" in lane.closed_at, 3)
    assert wait_for(lambda: rt.in_flight() == {})
    gone = [line for line in routes.logs if "went away" in line or "reset" in line.lower()]
    assert len(gone) == 1
    assert not any("Traceback" in line for line in routes.logs)


def test_lane_ending_early_closes_the_client_without_the_last_chunk(rt: RouteServer) -> None:
    raw = exchange(rt.port, request_bytes(headers=("X-Test: cut-chunked",)))
    assert raw.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in raw
    assert raw.endswith(b"data: one\n\n\r\n")
    assert not raw.endswith(b"0\r\n\r\n")
    with pytest.raises(http.client.IncompleteRead, match="bytes read"):
        parse(raw)
    raw = exchange(rt.port, request_bytes(headers=("X-Test: cut-length",)))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head and body == b"x" * 100


# -- limits and concurrency -----------------------------------------------------------------------


def test_connection_limit_answers_503_without_a_thread(routes: Routes) -> None:
    rt = routes(max_connections=2)
    holders = [socket.create_connection(("127.0.0.1", rt.port)) for _ in range(2)]
    for sock in holders:
        sock.sendall(b"POST /v1/chat")
    assert wait_for(lambda: rt.open_connections() == 2)
    threads = threading.active_count()
    status, headers, body = parse(exchange(rt.port, request_bytes()))
    assert status == 503 and headers["Retry-After"] == "1"
    assert error_of(body)["code"] == "overloaded"
    assert threading.active_count() == threads
    for sock in holders:
        sock.close()
    assert wait_for(lambda: rt.open_connections() == 0)
    assert post(rt)[0] == 200
    assert rt.stats().other[503] == 1


def test_in_flight_is_exact_under_concurrency(rt: RouteServer, lane: Lane) -> None:
    baseline = threading.active_count()
    streams = 64
    port = int(lane.server_address[1])
    errors: list[BaseException] = []
    bodies: list[bytes] = []
    started = threading.Barrier(streams + 1)

    def stream(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=20)
            model = "mlx-a" if i % 2 else "router-mlx-b"
            conn.request(
                "POST", "/v1/chat/completions", json.dumps({"model": model}), {"X-Test": "hold"}
            )
            response = conn.getresponse()
            first = response.read1(65536)
            started.wait()
            bodies.append(first + response.read())
            conn.close()
        except BaseException as error:
            errors.append(error)
            started.abort()

    clients = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in clients:
        thread.start()
    started.wait(timeout=20)
    assert rt.in_flight() == {(port, "mlx-a"): 32, (port, "mlx-b"): 32}
    lanes = json.loads(get(rt, "/health")[2])["lanes"]
    assert [lane_["in_flight"] for lane_ in lanes] == [32, 32]
    lane.release.set()
    for thread in clients:
        thread.join()
    assert errors == []
    assert bodies == [b"data: first\n\ndata: [DONE]\n\n"] * streams
    assert wait_for(lambda: rt.in_flight() == {})
    assert wait_for(lambda: threading.active_count() <= baseline)
    stats = rt.stats()
    assert stats.lanes[(port, "mlx-a")].requests == {200: 32}
    assert stats.lanes[(port, "mlx-b")].ttfb_count == 32


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_descriptor_or_thread_leaks(rt: RouteServer, lane: Lane) -> None:
    def mixed_round(i: int) -> None:
        assert post(rt)[0] == 200
        assert post(rt, {"model": "mlx-dead"})[0] == 503
        assert post(rt, {"model": "mlx-nope"})[0] == 404
        assert post(rt, headers={"X-Test": "no-status"})[0] == 502
        assert exchange(rt.port, b"\x16\x03junk")[:12] == b"HTTP/1.1 400"
        exchange(rt.port, request_bytes(headers=("X-Test: cut-chunked",)))
        sock = socket.create_connection(("127.0.0.1", rt.port))
        sock.sendall(request_bytes(headers=("X-Test: hold", f"X-Tag: leak{i}")))
        sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        assert wait_for(lambda: f"leak{i}" in lane.closed_at)

    mixed_round(-1)
    assert wait_for(lambda: rt.open_connections() == 0 and rt.in_flight() == {})
    descriptors, threads = open_descriptors(), threading.active_count()
    for i in range(25):
        mixed_round(i)
    assert wait_for(lambda: rt.open_connections() == 0 and rt.in_flight() == {})
    assert wait_for(lambda: open_descriptors() <= descriptors)
    assert wait_for(lambda: threading.active_count() <= threads)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_acceptor_survives_running_out_of_descriptors(rt: RouteServer, routes: Routes) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = socket.socket()
    client.settimeout(10)
    dummies: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_descriptors() + 16, hard))
        with contextlib.suppress(OSError):
            while True:
                dummies.append(os.open(os.devnull, os.O_RDONLY))
        client.connect(("127.0.0.1", rt.port))  # the kernel completes it; accept() cannot
        client.sendall(request_bytes())
        assert wait_for(lambda: any("cannot accept" in line for line in routes.logs), 3)
    finally:
        for fd in dummies:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with client:
        assert parse(read_all(client))[0] == 200
    assert rt.alive()


# -- health, models, lifecycle --------------------------------------------------------------------


def test_health_and_models(rt: RouteServer, routes: Routes, lane: Lane) -> None:
    status, headers, body = get(rt, "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert document["generation"] == 7 and document["tick_age_s"] == 1.5
    port = lane.server_address[1]
    assert document["lanes"] == [
        {"port": port, "model": "mlx-a", "state": "serving", "in_flight": 0, "draining": False},
        {"port": port, "model": "mlx-b", "state": "serving", "in_flight": 0, "draining": True},
    ]
    status, headers, body = get(rt, "/health", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    routes.health_status = 503
    assert json.loads(get(rt, "/health")[2])["status"] == "stale"
    status, _, body = get(rt, "/v1/models")
    models = json.loads(body)
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["mlx-a", "mlx-b"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models["data"])
    assert wait_for(lambda: rt.stats().other == {200: 3, 503: 1})


def test_close_lets_requests_finish_within_grace(rt: RouteServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", b'{"model":"mlx-a"}', {"X-Test": "sse:4:0.2"})
    response = conn.getresponse()
    first = response.read1(65536)
    closer = threading.Thread(target=rt.close, args=(5.0,))
    started = time.monotonic()
    closer.start()
    assert wait_for(lambda: not rt.alive(), 1)
    with pytest.raises(ConnectionRefusedError, match="refused"):
        socket.create_connection(("127.0.0.1", rt.port), timeout=1)
    rest = response.read()
    closer.join()
    assert first + rest == b"".join(b'data: {"n": %d}\n\n' % i for i in range(4))
    assert time.monotonic() - started < 1.5


def test_close_cuts_requests_past_grace(rt: RouteServer, lane: Lane) -> None:
    baseline = threading.active_count()
    conn = http.client.HTTPConnection("127.0.0.1", rt.port, timeout=10)
    conn.request(
        "POST", "/v1/chat/completions", b'{"model":"mlx-a"}', {"X-Test": "hold", "X-Tag": "cut"}
    )
    response = conn.getresponse()
    assert response.read1(65536) == b"data: first\n\n"
    idle = socket.create_connection(("127.0.0.1", rt.port))
    assert wait_for(lambda: rt.open_connections() == 2)
    started = time.monotonic()
    rt.close(0.3)
    assert 0.25 < time.monotonic() - started < 1.0
    with pytest.raises(http.client.IncompleteRead, match="bytes read"):
        response.read()
    assert wait_for(lambda: "cut" in lane.closed_at, 2)
    assert rt.in_flight() == {} and rt.open_connections() == 0
    idle.close()
    conn.close()
    # the route's acceptor, reaper and connection threads are gone
    names = {thread.name for thread in threading.enumerate()}
    assert not any(name.startswith("mlxctl-route") for name in names)
    assert wait_for(lambda: threading.active_count() <= baseline - 2)


def test_restart_keeps_counts_and_bind_failure_raises(routes: Routes) -> None:
    rt = routes()
    assert rt.alive()
    rt.start()  # alive: nothing happens
    assert post(rt)[0] == 200
    rt.close(0)
    assert not rt.alive()
    rt.start()
    assert rt.alive()
    assert post(rt)[0] == 200
    assert wait_for(lambda: next(iter(rt.stats().lanes.values())).requests == {200: 2})
    other = RouteServer(
        "127.0.0.1",
        rt.port,
        resolve=lambda m: "unknown",
        models=list,
        health=lambda: (200, {}),
        key=None,
    )
    with pytest.raises(OSError, match="in use"):
        other.start()
    assert not other.alive()
    other.close(0)


def test_sockets_are_not_inheritable(rt: RouteServer) -> None:
    listener = rt._listener
    assert listener is not None and not os.get_inheritable(listener.fileno())
    with socket.create_connection(("127.0.0.1", rt.port)) as sock:
        sock.sendall(b"GET")
        assert wait_for(lambda: rt.open_connections() == 1)
        (conn,) = list(rt._conns)
        assert not os.get_inheritable(conn.sock.fileno())
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_and_the_dual_stack_wildcard(lane: Lane) -> None:
    for host, connect in (("::1", "::1"), ("::", "127.0.0.1")):
        server = RouteServer(
            host, 0, resolve=lambda m: "unknown", models=lambda: ["mlx-a"],
            health=lambda: (200, {"status": "ok"}), key=None, log=lambda line: None,
        )  # fmt: skip
        try:
            server.start()
        except OSError:
            pytest.skip("IPv6 loopback unavailable")
        try:
            conn = http.client.HTTPConnection(connect, server.port, timeout=5)
            conn.request("GET", "/v1/models")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            server.close(0)
