"""Route mode end to end (SPEC §15's drain, §17, §17.1): the real `mlxctl watch` serves the route,
the real LiteLLM 1.106.0 runs from the files mlxctl wrote, and behind the route the real
mlx-openai-server (both versions) or the stand-in where a timing or a fault is needed.

LiteLLM starts once per world and is never restarted: its pid is the same at the end, and a new
model answers through the wildcard entries at once. Every process a test starts is stopped by
the test itself, by pid."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LITELLM_VENV, MLXCTL, ROOT, Env, need, registry_entry, stop_everything
from fixtures.litellm_proxy import Proxy, litellm, read_env_file
from fixtures.ports import port_block
from helpers import (
    alive,
    cmdline,
    live_pids_mentioning,
    one_json,
    outside_block,
    read_record,
    seed_registry,
    spawn_mlxctl,
    wait_until,
)

import mlxctl

KEY = "sk-route-gateway-Test123"
INTERVAL = "0.3"
LITELLM = LITELLM_VENV / "bin" / "litellm"

# -- the real watch, serving the route -------------------------------------------------------------


class RouteWatch:
    """`mlxctl watch` in the background (the real file, or `argv` running it), stderr to a file."""

    def __init__(self, env: Env, argv: list[str] | None = None) -> None:
        self.env = env
        self.port = int(env.vars["MLX_ROUTE_PORT"])
        self.log = env.tmp / f"watch-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv or [sys.executable, str(MLXCTL), "watch"],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env.environ(),
            )
        try:
            wait_until(self.healthy, 30, 0.05)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"watch exited:\n{self.text()}"
        with contextlib.suppress(OSError, http.client.HTTPException):
            return route_call(self.port, "GET", "/health", timeout=2)[0] == 200
        return False

    def health(self) -> dict[str, Any]:
        status, _, body = route_call(self.port, "GET", "/health")
        assert status == 200, body
        document = json.loads(body)
        assert isinstance(document, dict)
        return document

    def lane(self, model_id: str) -> dict[str, Any] | None:
        lanes = [lane for lane in self.health()["lanes"] if lane["model"] == model_id]
        return lanes[0] if lanes else None

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"watch ignored SIGTERM:\n{self.text()}") from None


@contextlib.contextmanager
def route_watch(env: Env, argv: list[str] | None = None) -> Iterator[RouteWatch]:
    watch = RouteWatch(env, argv)
    try:
        yield watch
    finally:
        watch.stop()


def give_route_port(env: Env) -> int:
    """A free port for the route, outside both port ranges (8099 is shared by every world)."""
    taken = set(env.team) | set(env.exp)
    while (port := port_block(1)) in taken:
        pass
    env.set(MLX_ROUTE_PORT=str(port), MLX_WATCH_INTERVAL=INTERVAL, MLX_ROUTE_VIA_OPTILLM="0")
    return port


# -- HTTP: the route, a lane, LiteLLM --------------------------------------------------------------


def route_call(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: (status, headers with lower-case names, body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        answer = {name.lower(): value for name, value in response.getheaders()}
        return response.status, answer, response.read()
    finally:
        conn.close()


def ask_route(
    port: int, model: Any, key: str | None = None, **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return route_call(port, "POST", "/v1/chat/completions", body, headers)


def error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI error shape every refusal of the route carries."""
    document = json.loads(body)
    assert set(document) == {"error"} and {"message", "type", "code"} <= set(document["error"])
    error = document["error"]
    assert isinstance(error, dict)
    return error


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are, half-close, read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def standin_stats(port: int) -> dict[str, Any]:
    status, _, body = route_call(port, "GET", "/standin/stats", timeout=5)
    assert status == 200
    stats = json.loads(body)
    assert isinstance(stats, dict)
    return stats


def gateway_call(
    proxy: Proxy, model: str, timeout: float = 120, **extra: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A chat through LiteLLM: (status, headers, JSON answer)."""
    port = int(proxy.url.rsplit(":", 1)[1])
    body = {
        "model": model,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    headers = {"Authorization": f"Bearer {proxy.key}", "Content-Type": "application/json"}
    status, answer, data = route_call(
        port, "POST", "/v1/chat/completions", body, headers, timeout=timeout
    )
    return status, answer, json.loads(data)


@dataclass
class Stream:
    """An SSE answer read as it arrives: (seconds since the request, event) per event."""

    status: int
    events: list[tuple[float, bytes]]
    done: bool  # `data: [DONE]` arrived


def read_stream(
    port: int, body: dict[str, Any], headers: dict[str, str], stop_after: int | None = None
) -> Stream:
    """POST a streaming request; with `stop_after`, the client goes away after that many events
    (its socket shut down at once, as a killed client's would be)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
    sock = conn.sock  # the response owns it once the answer says Connection: close
    assert sock is not None
    response = conn.getresponse()
    events: list[tuple[float, bytes]] = []
    pending = b""
    done = False
    while not done:
        data = response.read1(65536)
        if not data:
            break
        pending += data.replace(b"\r\n", b"\n")
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            if event.strip() == b"data: [DONE]":
                done = True
            elif event.startswith(b"data:"):
                events.append((time.monotonic() - started, event))
        if stop_after is not None and len(events) >= stop_after:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.shutdown(socket.SHUT_RDWR)
            break
    response.close()
    conn.close()
    sock.close()
    return Stream(response.status, events, done)


def content_events(stream: Stream) -> list[tuple[float, bytes]]:
    return [(t, e) for t, e in stream.events if b'"content"' in e]


def litellm_pids(env: Env) -> list[int]:
    """The LiteLLM processes of this world: their argv names its router.yaml."""
    return [pid for pid in live_pids_mentioning(str(env.router)) if "litellm" in cmdline(pid)]


def mlxctl_json(
    env: Env, *args: str, timeout: float = 300, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    result = env.run("--json", *args, timeout=timeout, env=environ)
    assert result.returncode == 0, result.stderr
    return one_json(result.stdout)


def env_values(env: Env) -> dict[str, str]:
    return read_env_file(env.env_file)


def write_hand_written(env: Env, router: str) -> None:
    env.router.parent.mkdir(parents=True, exist_ok=True)
    env.router.write_text(router)
    env.env_file.write_text("LITELLM_LOG=ERROR\n")
    env.env_file.chmod(0o600)


# mlx-a's alias `main` falls back to mlx-b's alias `backup`
HAND_WRITTEN_STANDIN = """\
model_list:
  - model_name: main
    litellm_params:
      model: os.environ/MLX_MLX_A_MODEL
      api_base: os.environ/MLX_MLX_A_API_BASE
      api_key: os.environ/MLX_MLX_A_API_KEY
  - model_name: backup
    litellm_params:
      model: os.environ/MLX_MLX_B_MODEL
      api_base: os.environ/MLX_MLX_B_API_BASE
      api_key: os.environ/MLX_MLX_B_API_KEY

router_settings:
  # 0: straight to the fallback (with 2, LiteLLM first retries mlx-a twice ~5 s apart, as the
  # route's Retry-After says; measured ~16 s, then the same fallback)
  num_retries: 0
  fallbacks: [{"main": ["backup"]}]
litellm_settings:
  drop_params: true
"""


# -- 1. LiteLLM never restarts: real servers behind the route ---------------------------------------

HAND_WRITTEN_REAL = """\
# LiteLLM on the Mini: hand-written parts stay exactly as they are
model_list:
  - model_name: main        # the team's default alias
    litellm_params:
      model: os.environ/MLX_MLX_TINY_MODEL
      api_base: os.environ/MLX_MLX_TINY_API_BASE
      api_key: os.environ/MLX_MLX_TINY_API_KEY
      max_tokens: 4

router_settings:
  num_retries: 0
litellm_settings:
  drop_params: true
"""


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_litellm_is_never_restarted_in_route_mode(real_server: Env, tiny_mlx_model: Path) -> None:
    """The whole scenario runs to its end: each failed request and each verdict is collected
    and asserted last, so one run shows every deviation."""
    need(LITELLM.exists(), f"LiteLLM in {LITELLM_VENV}")
    env = real_server
    copy = env.tmp / "tiny-copy"  # a second model: the same weights under another id
    shutil.copytree(tiny_mlx_model, copy)
    seed_registry(
        env,
        registry_entry("mlx-tiny", tiny_mlx_model, None, repo_id="t/tiny"),
        registry_entry("mlx-tiny2", copy, None, repo_id="t/tiny2"),
    )
    route_port = give_route_port(env)
    # no request is in flight at any drain below, so a short drain timeout costs nothing
    env.set(MLX_GATEWAY_ROUTE=None, MLX_DRAIN_TIMEOUT="10")
    config = env.home / ".config" / "mlxctl" / "config.env"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("MLX_GATEWAY_ROUTE=direct\n")
    write_hand_written(env, HAND_WRITTEN_REAL)
    route_base = f"http://127.0.0.1:{route_port}/v1"
    verdicts: list[tuple[str, str]] = []
    failed: list[str] = []

    def answers(proxy: Proxy, step: str, *models: str) -> None:
        for model in models:
            status, _, reply = gateway_call(proxy, model)
            if status != 200 or reply["choices"][0]["message"]["role"] != "assistant":
                failed.append(f"after {step}: {model}: {status} {reply}")

    with route_watch(env) as watch:
        # part one first: LiteLLM would go straight to the port
        mlxctl_json(env, "load", "mlx-tiny", str(env.exp[0]))
        assert env_values(env)["MLX_MLX_TINY_API_BASE"] == f"http://127.0.0.1:{env.exp[0]}/v1"
        # the switch as the README orders it: config.env edited while the service runs; watch
        # takes the edit at its next tick, so its own syncs never write direct mode back
        config.write_text("MLX_GATEWAY_ROUTE=studio\n")
        wait_until(lambda: "watch: config.env applied" in watch.text(), 30)
        verdicts.append(("first switch", mlxctl_json(env, "sync-gateway")["sync"]["restart"]))
        values = env_values(env)
        assert values["MLX_MLX_TINY_API_BASE"] == route_base
        assert values["MLX_ROUTE_API_BASE"] == route_base
        assert '- model_name: "mlx-*"' in env.router.read_text()
        assert outside_block(env.router.read_text()) == HAND_WRITTEN_REAL

        with litellm(LITELLM_VENV, env.router, env.env_file, env.tmp / "litellm.log") as proxy:
            pids = litellm_pids(env)
            assert pids, "no LiteLLM process names this world's router.yaml"
            answers(proxy, "the switch", "mlx-tiny", "main")

            # a move: assign-team takes mlx-tiny from the experimental port to a team port
            result = mlxctl_json(env, "assign-team")
            verdicts.append(("move", result["sync"]["restart"]))
            moved = env.registry()["models"]["mlx-tiny"]["port"]
            assert moved in env.team
            answers(proxy, "the move", "mlx-tiny", "main")

            # a new model: the wildcard entries route it at once, under both names
            result = mlxctl_json(env, "load", "mlx-tiny2", str(env.exp[1]))
            verdicts.append(("new model", result["sync"]["restart"]))
            answers(proxy, "the new model", "mlx-tiny2", "router-mlx-tiny2", "mlx-tiny", "main")

            # an unload: the route refuses the handle by itself; the others keep answering
            result = mlxctl_json(env, "unload", str(moved))
            verdicts.append(("unload", result["sync"]["restart"]))
            assert env_values(env)["MLX_MLX_TINY_API_BASE"] == route_base  # main names it
            status, answer, _ = ask_route(route_port, "mlx-tiny")
            assert (status, answer.get("retry-after")) == (503, "5")
            answers(proxy, "the unload", "mlx-tiny2")

            # and back, on a third port
            result = mlxctl_json(env, "load", "mlx-tiny", str(env.exp[2]))
            verdicts.append(("reload", result["sync"]["restart"]))
            answers(proxy, "the reload", "mlx-tiny", "main", "mlx-tiny2", "router-mlx-tiny2")

            assert litellm_pids(env) == pids and all(alive(pid) for pid in pids)
            # what LiteLLM lists is what it read at its start: no restart took mlx-tiny2's entry
            listed = {m["id"] for m in proxy.get("/v1/models")["data"]}
            assert {"mlx-tiny", "main"} <= listed and "mlx-tiny2" not in listed
        assert "Traceback" not in watch.text()

    assert failed == []
    assert dict(verdicts) == {
        "first switch": "required",
        "move": "not-needed",
        "new model": "optional",
        "unload": "not-needed",
        "reload": "optional",
    }


# -- 3. bad input to the route of a running watch -------------------------------------------------


@pytest.fixture
def keyed(env: Env) -> Iterator[RouteWatch]:
    """A real watch serving the route with a key and a 1 MiB body limit; mlx-a serves on
    team[0], mlx-idle is registered without a lane."""
    give_route_port(env)
    env.set(MLX_ROUTE_KEY=KEY, MLX_ROUTE_MAX_BODY=str(1 << 20))
    env.add_model("mlx-a")
    env.add_model("mlx-idle")
    result = env.run("load", "mlx-a", str(env.team[0]), "--no-sync")
    assert result.returncode == 0, result.stderr
    with route_watch(env) as watch:
        wait_until(lambda: (watch.lane("mlx-a") or {}).get("state") == "serving", 10)
        yield watch


AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}


@pytest.mark.timeout(120)
def test_each_refusal_of_the_route(env: Env, keyed: RouteWatch) -> None:
    port = keyed.port
    chat = "/v1/chat/completions"
    assert ask_route(port, "mlx-a", KEY)[0] == 200
    cases: list[tuple[str, str, bytes | dict[str, Any] | None, dict[str, str], int, str]] = [
        ("bad JSON", "POST", b'{"model": "mlx-a",', JSON_AUTH, 400, ""),
        ("no model", "POST", {"messages": []}, JSON_AUTH, 400, ""),
        ("model not a string", "POST", {"model": 7}, JSON_AUTH, 400, ""),
        ("JSON not an object", "POST", b'["mlx-a"]', JSON_AUTH, 400, ""),
        ("not UTF-8", "POST", b'{"model": "mlx-\xff"}', JSON_AUTH, 400, ""),
        ("no key", "POST", {"model": "mlx-a"}, {}, 401, ""),
        ("wrong key", "POST", {"model": "mlx-a"}, {"Authorization": "Bearer nope"}, 401, ""),
        ("unknown model", "POST", {"model": "mlx-nope"}, JSON_AUTH, 404, ""),
        ("unknown path", "POST", {"model": "mlx-a"}, JSON_AUTH, 404, "/v1/nope"),
        ("unknown GET path", "GET", None, AUTH, 404, "/nope"),
        ("wrong method", "GET", None, AUTH, 405, ""),
        ("wrong method on models", "POST", {"model": "mlx-a"}, JSON_AUTH, 405, "/v1/models"),
        ("model without a lane", "POST", {"model": "mlx-idle"}, JSON_AUTH, 503, ""),
    ]
    for why, method, body, headers, expected, path in cases:
        status, answer, data = route_call(port, method, path or chat, body, headers)
        assert status == expected, f"{why}: {status} {data!r}"
        error_of(data)
        assert answer.get("connection") == "close", why
        if expected == 401:
            assert answer.get("www-authenticate", "").startswith("Bearer"), why
        if expected == 405:
            assert answer.get("allow"), why
        if expected == 503:
            assert answer.get("retry-after") == "5", why
    assert route_call(port, "GET", "/health")[0] == 200  # the one path without the key
    assert route_call(port, "GET", "/v1/models", headers=AUTH)[0] == 200

    # over MLX_ROUTE_MAX_BODY: 413 as soon as Content-Length says so, no body read
    head = f"POST {chat} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {2 << 20}\r\n\r\n".encode())
        answer_bytes = sock.recv(65536)
    assert answer_bytes.startswith(b"HTTP/1.1 413"), answer_bytes
    assert time.monotonic() - started < 2

    # withheld (a drain in another process): 503 with Retry-After, until the mark goes
    registry = env.registry()
    registry["models"]["mlx-a"]["withheld"] = mlxctl.self_mark()
    env.registry_path.write_text(json.dumps(registry, indent=2))
    status, answer, _ = ask_route(port, "mlx-a", KEY)
    assert (status, answer.get("retry-after")) == (503, "5")
    registry["models"]["mlx-a"].pop("withheld")
    env.registry_path.write_text(json.dumps(registry))
    assert ask_route(port, "mlx-a", KEY)[0] == 200


def upload(port: int, head: bytes, body_chunks: Iterator[bytes]) -> tuple[bytes, float]:
    """Send a request head, then body chunks while the route still takes them; the first answer
    bytes and the seconds they took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)

        def send() -> None:
            with contextlib.suppress(OSError):
                for chunk in body_chunks:
                    sock.sendall(chunk)

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        with contextlib.suppress(OSError):
            answer = sock.recv(65536)
        elapsed = time.monotonic() - started
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    return answer, elapsed


@pytest.mark.timeout(180)
def test_hostile_clients_leave_the_route_serving_without_leaks(env: Env, keyed: RouteWatch) -> None:
    port = keyed.port
    chat = b"/v1/chat/completions"

    def serves() -> bool:
        return ask_route(port, "mlx-a", KEY)[0] == 200

    for _ in range(5):
        assert serves()
    time.sleep(1)  # the connection threads of those requests have ended
    threads, rss = keyed.threads(), keyed.rss_kib()

    # 100 MB declared: refused before any of it is read, and the watch does not grow by it
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % (chat, KEY.encode())
    megabyte = b"x" * (1 << 20)
    answer, took = upload(
        port, head + b"Content-Length: %d\r\n\r\n" % (100 << 20), iter([megabyte] * 100)
    )
    assert answer.startswith(b"HTTP/1.1 413") and took < 2, (answer, took)
    # 100 MB chunked: refused once past the limit
    chunked = (b"100000\r\n" + megabyte + b"\r\n" for _ in range(100))
    answer, took = upload(port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert serves()

    # garbage, a TLS hello, an unknown path, a broken head: one JSON refusal each, and on it goes
    auth = b"Authorization: Bearer %s\r\n" % KEY.encode()
    for data, expected in (
        (os.urandom(4096), b"400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), b"400"),  # TLS
        (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", b"404"),
        (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", b"401"),
        (
            b"POST " + chat + b" HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"400",
        ),
        (b"POST " + chat + b" HTTP/1.1\r\nBad Header\r\n\r\n", b"400"),
        (b"\r\n\r\n", b""),  # nothing asked, nothing answered
    ):
        reply = raw_exchange(port, data)
        assert reply.split(b" ", 2)[1:2] == ([expected] if expected else []), reply[:80]
        if reply:
            error_of(reply.split(b"\r\n\r\n", 1)[1])
        assert serves()

    # slow clients hold connections (the 30 s deadline is far): the route serves everyone else
    slow = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST " + chat + b" HTTP/1.1\r\nHost: x\r\nContent-Le")
        slow.append(sock)
    try:
        for _ in range(20):
            started = time.monotonic()
            assert serves()
            assert time.monotonic() - started < 2
    finally:
        for sock in slow:
            sock.close()

    # no thread or memory left behind
    wait_until(lambda: keyed.threads() <= threads, 15, 0.1)
    assert keyed.rss_kib() - rss < 50 * 1024, "the watch grew by over 50 MiB"
    assert keyed.proc.poll() is None and serves()
    assert "Traceback" not in keyed.text()


SHORT_DEADLINE = 2.0


@pytest.mark.timeout(120)
def test_a_slow_client_is_cut_at_the_deadline(env: Env) -> None:
    """The real watch with the request deadline shrunk from 30 s (ROUTE_REQUEST_DEADLINE is a
    constant; its value reaches RouteServer as a keyword default, patched here before main)."""
    give_route_port(env)
    env.add_model("mlx-a")
    assert env.run("load", "mlx-a", str(env.team[0]), "--no-sync").returncode == 0
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import mlxctl; "
        f"mlxctl.RouteServer.__init__.__kwdefaults__['request_deadline'] = {SHORT_DEADLINE}; "
        "raise SystemExit(mlxctl.main(['watch']))"
    )
    with route_watch(env, [sys.executable, "-c", code]) as watch:
        wait_until(lambda: (watch.lane("mlx-a") or {}).get("state") == "serving", 10)
        threads = watch.threads()
        started = time.monotonic()
        slow = socket.create_connection(("127.0.0.1", watch.port), timeout=10)
        idle = socket.create_connection(("127.0.0.1", watch.port), timeout=10)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Drip: " + b"a" * 100:  # one byte every 0.2 s, the head never ends
            if select.select([slow], [], [], 0)[0]:
                break  # answered (or closed)
            with contextlib.suppress(OSError):
                slow.sendall(bytes([byte]))
            assert ask_route(watch.port, "mlx-a")[0] == 200  # everyone else is served
            time.sleep(0.2)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := slow.recv(65536):
                received += chunk
        cut_after = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 408"), received
        assert SHORT_DEADLINE - 0.5 < cut_after < SHORT_DEADLINE + 4, cut_after
        assert idle.recv(65536) == b""  # an idle connection closes silently at the deadline
        slow.close()
        idle.close()
        assert ask_route(watch.port, "mlx-a")[0] == 200
        wait_until(lambda: watch.threads() <= threads, 10, 0.1)


# -- the drain and the verdicts of route mode, with stand-ins only ---------------------------------


@pytest.fixture
def route_mode(env: Env) -> Iterator[RouteWatch]:
    give_route_port(env)
    env.set(MLX_GATEWAY_ROUTE="studio")
    env.add_model("mlx-a")
    write_hand_written(env, HAND_WRITTEN_STANDIN)
    with route_watch(env) as watch:
        yield watch


@pytest.mark.timeout(120)
def test_an_idle_lane_drains_at_once_with_the_route(env: Env, route_mode: RouteWatch) -> None:
    mlxctl_json(env, "load", "mlx-a", str(env.team[0]))
    started = time.monotonic()
    result = env.run("--json", "unload", str(env.team[0]), "--drain-timeout", "20")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "cut" not in result.stderr
    # nothing in flight and the queue idle: nothing to wait for but the route taking the mark
    assert took < 6, f"unload of an idle lane took {took:.1f}s (drain timeout 20 s)"


@pytest.mark.timeout(120)
def test_a_move_in_route_mode_needs_no_restart(env: Env, route_mode: RouteWatch) -> None:
    mlxctl_json(env, "load", "mlx-a", str(env.exp[0]))
    router, values = env.router.read_text(), env_values(env)
    result = mlxctl_json(env, "assign-team", "--drain-timeout", "0")
    assert env.registry()["models"]["mlx-a"]["port"] in env.team
    # what LiteLLM read before the move is what the files say after it
    assert env.router.read_text() == router
    assert env_values(env) == values
    assert result["sync"]["restart"] == "not-needed"


@pytest.mark.timeout(120)
def test_an_unloaded_alias_points_at_the_route_and_says_so(
    env: Env, route_mode: RouteWatch
) -> None:
    mlxctl_json(env, "load", "mlx-a", str(env.team[0]))
    result = env.run("--json", "unload", str(env.team[0]), "--drain-timeout", "0")
    assert result.returncode == 0, result.stderr
    assert one_json(result.stdout)["sync"]["dangling_refs"] == ["main"]
    route_base = f"http://127.0.0.1:{route_mode.port}/v1"
    assert env_values(env)["MLX_MLX_A_API_BASE"] == route_base
    warning = [line for line in result.stderr.splitlines() if "main references" in line]
    assert warning and all("127.0.0.1:9/" not in line for line in warning), warning
    assert all(route_base in line for line in warning), warning


@pytest.mark.timeout(120)
def test_a_watch_started_before_the_switch_keeps_route_mode(env: Env) -> None:
    """The README's switch: the watch service runs, then `MLX_GATEWAY_ROUTE=studio` goes into
    config.env and `sync-gateway` writes route mode. A sync that watch makes later (it retries
    gateway.pending, which a failed or interrupted sync leaves) must not write direct mode back:
    that file is what LiteLLM reads at its next restart."""
    route_port = give_route_port(env)
    env.add_model("mlx-a")
    write_hand_written(env, HAND_WRITTEN_STANDIN)
    config = env.home / ".config" / "mlxctl" / "config.env"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("")
    with route_watch(env) as watch:
        mlxctl_json(env, "load", "mlx-a", str(env.team[0]))
        with open(config, "a") as handle:
            handle.write("MLX_GATEWAY_ROUTE=studio\n")
        assert mlxctl_json(env, "sync-gateway")["sync"]["restart"] == "required"
        route_base = f"http://127.0.0.1:{route_port}/v1"
        assert env_values(env)["MLX_MLX_A_API_BASE"] == route_base
        (env.state / "gateway.pending").write_text("2026-01-01T00:00:00Z\n")
        wait_until(lambda: "the pending gateway sync went through" in watch.text(), 30, 0.1)
        values = env_values(env)
        assert values.get("MLX_ROUTE_API_BASE") == route_base, values
        assert values["MLX_MLX_A_API_BASE"] == route_base, values


@pytest.mark.timeout(120)
def test_watch_applies_config_edits_it_can_and_names_the_rest(env: Env) -> None:
    """An edit of config.env reaches watch at its next tick (the route's key too). One that would
    move a listener waits for the service's restart, and watch says so; one that does not parse
    is refused whole."""
    route_port = give_route_port(env)
    config = env.home / ".config" / "mlxctl" / "config.env"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("")
    with route_watch(env) as watch:
        assert route_call(route_port, "GET", "/v1/models")[0] == 200
        config.write_text(f"MLX_ROUTE_MAX_CONNECTIONS=9\nMLX_ROUTE_KEY={KEY}\n")
        held = (
            "watch: config.env applied; MLX_ROUTE_MAX_CONNECTIONS apply when the service restarts"
        )
        wait_until(lambda: held in watch.text(), 30, 0.1)
        assert watch.healthy()  # still on the port it bound
        assert route_call(route_port, "GET", "/v1/models")[0] == 401
        assert route_call(route_port, "GET", "/v1/models", headers=AUTH)[0] == 200
        config.write_text("MLX_GATEWAY_ROUTE=sideways\n")
        wait_until(lambda: "watch: config.env not applied" in watch.text(), 30, 0.1)
        assert "MLX_GATEWAY_ROUTE" in watch.text().rsplit("not applied", 1)[1].splitlines()[0]
        assert watch.healthy()


@pytest.mark.timeout(120)
def test_a_committed_load_routes_at_once_while_a_tick_is_slow(env: Env) -> None:
    """SPEC §17.1: M is routable when "M's assignment was committed after that observation".
    A busy lane (stopped, so its probes time out) makes every observation last the probe
    timeout; a load that commits during one must route at once, not after the tick after it.
    A client asks all along, so the route sees the reservation and then the commit."""
    route_port = give_route_port(env)
    env.set(MLX_PROBE_TIMEOUT="2")
    env.add_model("mlx-a")
    env.add_model("mlx-busy")
    assert env.run("load", "mlx-busy", str(env.team[1]), "--no-sync").returncode == 0
    pgid = int(read_record(env, env.team[1])["pgid"])
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def ask_all_along() -> None:
        while not stop.is_set():
            answers.append((time.monotonic(), ask_route(route_port, "mlx-a")[0]))
            time.sleep(0.05)

    with route_watch(env) as watch:
        os.killpg(pgid, signal.SIGSTOP)
        asker = threading.Thread(target=ask_all_along)
        try:
            wait_until(lambda: (watch.lane("mlx-busy") or {}).get("state") == "unresponsive", 20)
            asker.start()
            refused = []
            for attempt in range(3):
                result = env.run("load", "mlx-a", str(env.team[0]), "--no-sync")
                assert result.returncode == 0, result.stderr
                committed = time.monotonic()
                time.sleep(2)
                refused += [
                    (attempt, round(at - committed, 2), status)
                    for at, status in answers
                    if at > committed + 0.1 and status != 200  # an answer begun after the load
                ]
                unloaded = env.run("unload", str(env.team[0]), "--no-sync", "--drain-timeout", "0")
                assert unloaded.returncode == 0, unloaded.stderr
        finally:
            stop.set()
            if asker.is_alive():
                asker.join()
            os.killpg(pgid, signal.SIGCONT)
    spans = {
        attempt: (
            min(t for a, t, _ in refused if a == attempt),
            max(t for a, t, _ in refused if a == attempt),
        )
        for attempt in {a for a, _, _ in refused}
    }
    assert refused == [], f"{len(refused)} refusals after the commit, (first, last) s: {spans}"


@pytest.mark.timeout(120)
def test_a_committed_load_routes_before_the_next_tick(env: Env) -> None:
    """SPEC §17: "a lane that `load` just committed routes before the next tick" — also when
    the load was quicker than a tick, so that no tick saw its reservation."""
    route_port = give_route_port(env)
    env.set(MLX_WATCH_INTERVAL="5")
    env.add_model("mlx-a")
    with route_watch(env):
        refused = []
        for attempt in range(3):
            result = env.run("load", "mlx-a", str(env.team[0]), "--no-sync")
            assert result.returncode == 0, result.stderr
            status, _, body = ask_route(route_port, "mlx-a")
            if status != 200:
                refused.append((attempt, status, error_of(body)["code"]))
            unloaded = env.run("unload", str(env.team[0]), "--no-sync", "--drain-timeout", "0")
            assert unloaded.returncode == 0, unloaded.stderr
    assert refused == []


# -- 2 and 4. streams through LiteLLM and the route, and a drain under one -------------------------


@dataclass
class Gateway:
    env: Env
    watch: RouteWatch
    proxy: Proxy
    route_port: int

    @property
    def proxy_port(self) -> int:
        return int(self.proxy.url.rsplit(":", 1)[1])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.proxy.key}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Stand-in lanes mlx-a (team[0]) and mlx-b (team[1]) behind the route of a real watch, and
    the real LiteLLM started once from the files a route-mode sync wrote: `main` is an alias of
    mlx-a whose fallback `backup` is an alias of mlx-b."""
    need(LITELLM.exists(), f"LiteLLM in {LITELLM_VENV}")
    with pytest.MonkeyPatch.context() as mp:
        env = Env(tmp_path_factory.mktemp("gateway"), mp)
        route_port = give_route_port(env)
        env.set(MLX_GATEWAY_ROUTE="studio")
        env.add_model("mlx-a")
        env.add_model("mlx-b")
        write_hand_written(env, HAND_WRITTEN_STANDIN)
        try:
            with route_watch(env) as watch:
                for model, port in (("mlx-a", env.team[0]), ("mlx-b", env.team[1])):
                    mlxctl_json(env, "load", model, str(port))
                log = env.tmp / "litellm.log"
                with litellm(LITELLM_VENV, env.router, env.env_file, log) as proxy:
                    yield Gateway(env, watch, proxy, route_port)
        finally:
            stop_everything(env)


@pytest.mark.real
@pytest.mark.timeout(300)
def test_a_stream_through_litellm_and_the_route_arrives_as_sent(gateway: Gateway) -> None:
    body = {
        "model": "mlx-b",
        "stream": True,
        "max_tokens": 8,
        "standin_interval": 0.3,
        "messages": [{"role": "user", "content": "hi"}],
    }
    for port, headers in (
        (gateway.proxy_port, gateway.headers()),
        (gateway.route_port, {"Content-Type": "application/json"}),
    ):
        stream = read_stream(port, body, headers)
        assert stream.status == 200 and stream.done
        times = [t for t, _ in content_events(stream)]
        assert len(times) == 8, stream.events
        # nothing buffered on the way: the first token long before the last, each on its own
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        assert times[-1] - times[0] >= 1.5 and statistics.median(gaps) >= 0.2, times


@pytest.mark.real
@pytest.mark.timeout(300)
def test_a_client_leaving_mid_stream_frees_the_server(gateway: Gateway) -> None:
    lane_port = gateway.env.team[1]
    body = {
        "model": "mlx-b",
        "stream": True,
        "max_tokens": 200,
        "standin_interval": 0.2,
        "messages": [{"role": "user", "content": "hi"}],
    }
    for port, headers in (
        (gateway.proxy_port, gateway.headers()),
        (gateway.route_port, {"Content-Type": "application/json"}),
    ):
        before = standin_stats(lane_port)
        stream = read_stream(port, body, headers, stop_after=2)
        assert stream.status == 200 and len(stream.events) == 2 and not stream.done
        cancelled: int = before["cancelled"] + 1

        def freed(n: int = cancelled) -> bool:
            return bool(standin_stats(lane_port)["cancelled"] == n)

        wait_until(freed, 15)
        after = standin_stats(lane_port)
        assert after["active"] == 0 and after["requests"] == before["requests"] + 1
        wait_until(lambda: (gateway.watch.lane("mlx-b") or {}).get("in_flight") == 0, 5)


@pytest.mark.real
@pytest.mark.timeout(300)
def test_an_unload_drains_a_stream_and_litellm_falls_back(gateway: Gateway) -> None:
    env, watch = gateway.env, gateway.watch
    a_port, b_port = env.team[0], env.team[1]
    b_before = standin_stats(b_port)["requests"]
    body = {
        "model": "main",
        "stream": True,
        "max_tokens": 20,
        "standin_interval": 0.3,
        "messages": [{"role": "user", "content": "hi"}],
    }
    streams: list[Stream] = []
    reader = threading.Thread(
        target=lambda: streams.append(read_stream(gateway.proxy_port, body, gateway.headers()))
    )
    reader.start()
    wait_until(lambda: standin_stats(a_port)["active"] == 1, 30)
    unload = spawn_mlxctl(env.environ(), "--json", "unload", str(a_port), "--drain-timeout", "20")
    try:
        # withheld: the route has applied the mark, and refuses a new request for mlx-a at once
        def withheld() -> bool:
            entry = env.registry()["models"]["mlx-a"]
            generation = int(env.registry()["generation"])
            return bool(entry.get("withheld")) and watch.health()["generation"] >= generation

        wait_until(withheld, 20)
        status, answer, data = ask_route(gateway.route_port, "mlx-a")
        assert (status, answer.get("retry-after")) == (503, "5"), data
        assert error_of(data)["code"] == "model_unavailable"
        # LiteLLM gets that 503 for `main` and takes its fallback, mlx-b
        status, headers, reply = gateway_call(gateway.proxy, "main")
        assert status == 200, reply
        assert headers.get("x-litellm-attempted-fallbacks") == "1"
        assert standin_stats(b_port)["requests"] == b_before + 1
        assert unload.poll() is None, "the drain did not wait for the stream"

        reader.join(60)
        stream_end = time.monotonic()
        assert streams and streams[0].status == 200 and streams[0].done
        assert len(content_events(streams[0])) == 20  # drained, not cut
        out, err = unload.communicate(timeout=60)
        stopped_after = time.monotonic() - stream_end
    finally:
        if unload.poll() is None:
            unload.kill()
            unload.communicate()
    assert unload.returncode == 0, err
    assert "cut" not in err
    assert one_json(out)["sync"]["restart"] == "not-needed"
    assert env.registry()["models"]["mlx-a"]["port"] is None
    # the lane stops once its last request ends, not when the drain timeout passes
    assert stopped_after < 5, f"the stop came {stopped_after:.1f}s after the stream ended"
