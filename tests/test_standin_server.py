"""The stand-in model server itself, against real sockets, signals and process groups.

Other tests trust the stand-in to produce each fault; these prove that it does.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STANDIN
from fixtures.ports import port_block
from fixtures.standin_server import write_standin_model
from helpers import cmdline, connectable, http_json, process_group, standin_argv, wait_until

pytestmark = pytest.mark.fixture_selftest


class Standin:
    """One stand-in in its own session, as mlxctl starts servers; the group is killed at the end."""

    def __init__(
        self,
        tmp: Path,
        model: Path,
        *extra: str,
        launch: bool = True,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.port = port_block(1)
        self.model = model
        self.log_file = tmp / f"logs-{self.port}" / "app.log"
        self.stdout = tmp / f"{self.port}.out"
        self.stderr = tmp / f"{self.port}.err"
        argv = standin_argv(
            model,
            self.port,
            *("--model-type", "lm", "--log-file", str(self.log_file), *extra),
            launch=launch,
            prefix=prefix,
        )
        # appended, as mlxctl opens a server's log (O_APPEND)
        with open(self.stdout, "ab") as out, open(self.stderr, "ab") as err:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                cwd=tmp,  # as mlxctl runs a server in its state dir
            )
        self.started = time.monotonic()

    def group(self) -> list[int]:
        """Live members of the process group (zombies excluded), by /proc."""
        return process_group(self.process.pid)

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., Standin]]:
    started: list[Standin] = []

    def start(
        *extra: str,
        launch: bool = True,
        name: str = "m",
        prefix: tuple[str, ...] = (),
        **knobs: Any,
    ) -> Standin:
        model = tmp_path / "models" / name
        if not model.exists():
            write_standin_model(model, **knobs)
        server = Standin(tmp_path, model, *extra, launch=launch, prefix=prefix)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def test_defaults_argv_endpoints_and_sigterm(standin: Callable[..., Standin]) -> None:
    # options it does not act on are accepted (1.6.3 offers them all)
    unknown = ("--chat-template-file", "/t.jinja", "--tool-call-parser", "x", "--max-tokens", "5")
    server = standin(*unknown, "--reasoning-parser", "y", "--trust-remote-code")
    # it "loads the model" (start_delay, 0.3 s by default) before binding
    waited = wait_until(lambda: connectable(server.port))
    assert waited >= 0.25
    assert http_json(server.port, "/health") == (
        200,
        {"status": "ok", "model_id": str(server.model), "model_status": "initialized"},
    )
    status, models = http_json(server.port, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(str(server.model), "model")]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "last one"}]},
    ]
    status, reply = http_json(
        server.port, "/v1/chat/completions", {"model": "x", "messages": messages}
    )
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo: last one"}
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["total_tokens"] == 2
    assert http_json(server.port, "/nope")[0] == 404
    assert str(server.model) in server.log_file.read_text()
    assert "Uvicorn running" in server.stdout.read_text()
    # SIGTERM: gone quickly, by the signal (as the real one: status -15), port free
    start = time.monotonic()
    server.signal_group(signal.SIGTERM)
    assert server.process.wait(2) == -signal.SIGTERM
    assert time.monotonic() - start < 0.2
    assert not connectable(server.port)
    assert server.stderr.read_text() == ""


def test_without_launch_word_and_without_knob_file(tmp_path: Path) -> None:
    model = write_standin_model(tmp_path / "plain")
    (model / "standin.json").unlink()  # the defaults apply
    server = Standin(tmp_path, model, launch=False)
    try:
        wait_until(lambda: connectable(server.port))
        assert http_json(server.port, "/v1/models")[1]["data"][0]["id"] == str(model)
    finally:
        server.kill()


def test_served_id_and_health_delay(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, health_delay=0.6, served_id="org/served-name")
    wait_until(lambda: connectable(server.port))
    bound = time.monotonic()
    assert http_json(server.port, "/health")[0] == 503
    assert http_json(server.port, "/v1/models")[0] == 503
    wait_until(lambda: http_json(server.port, "/health")[0] == 200)
    assert time.monotonic() - bound >= 0.4
    assert http_json(server.port, "/v1/models")[1]["data"][0]["id"] == "org/served-name"
    assert http_json(server.port, "/health")[1]["model_id"] == "org/served-name"


def test_exit_before_bind(standin: Callable[..., Standin]) -> None:
    broken = standin(name="broken", exit_before_bind=0, start_delay=0.2)
    failing = standin(name="failing", exit_before_bind=3, start_delay=0)
    assert failing.process.wait(5) == 3
    assert broken.process.wait(5) == 0  # exit code 0 proves nothing, as with the real server
    assert time.monotonic() - broken.started >= 0.2
    assert not connectable(broken.port) and not connectable(failing.port)
    assert "startup failed" in broken.log_file.read_text()


def test_ignore_sigterm_with_child_needs_a_group_sigkill(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, ignore_sigterm=True, spawn_child=True)
    wait_until(lambda: connectable(server.port))
    members = server.group()
    assert len(members) == 2 and server.process.pid in members
    server.signal_group(signal.SIGTERM)
    time.sleep(0.3)
    assert server.group() == members and http_json(server.port, "/health")[0] == 200
    server.signal_group(signal.SIGKILL)
    assert server.process.wait(2) == -signal.SIGKILL
    wait_until(lambda: server.group() == [])
    assert not connectable(server.port)


def test_child_survives_its_parent_but_dies_with_the_group(
    standin: Callable[..., Standin],
) -> None:
    server = standin(start_delay=0, spawn_child=True)
    wait_until(lambda: connectable(server.port))
    [child] = [pid for pid in server.group() if pid != server.process.pid]
    os.kill(server.process.pid, signal.SIGKILL)  # the parent alone
    server.process.wait(2)
    assert server.group() == [child]
    server.signal_group(signal.SIGTERM)
    wait_until(lambda: server.group() == [])


def test_crash_after(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, crash_after=0.5)
    wait_until(lambda: connectable(server.port))
    assert http_json(server.port, "/health")[0] == 200
    assert server.process.wait(3) == 1
    assert time.monotonic() - server.started >= 0.5
    assert not connectable(server.port)


def test_hang_accepts_but_never_answers(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, hang=True)
    wait_until(lambda: connectable(server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(socket.timeout, match="timed out"):
            sock.recv(100)
    with pytest.raises((socket.timeout, urllib.error.URLError), match="timed out"):
        http_json(server.port, "/v1/models", timeout=0.5)
    start = time.monotonic()
    server.signal_group(signal.SIGTERM)
    assert server.process.wait(2) == -signal.SIGTERM
    assert time.monotonic() - start < 0.2


def test_port_in_use_fails_but_time_wait_does_not(standin: Callable[..., Standin]) -> None:
    first = standin(start_delay=0)
    wait_until(lambda: connectable(first.port))
    assert (
        http_json(first.port, "/health")[0] == 200
    )  # the server closes first: TIME_WAIT on its side
    # the bare argv, as a user types it: no `launch`, `--model-type` or `--log-file`
    rival = subprocess.run(
        standin_argv(first.model, first.port, launch=False),
        capture_output=True,
        text=True,
        timeout=10,
    )
    # uvicorn's words, exit 1
    assert rival.returncode == 1
    assert rival.stderr.startswith(f"ERROR:    [Errno {errno.EADDRINUSE}] error while attempting")
    assert rival.stderr.rstrip().endswith("address already in use")
    first.signal_group(signal.SIGTERM)
    first.process.wait(2)
    again = subprocess.Popen(
        standin_argv(first.model, first.port, launch=False),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: connectable(first.port))
        assert http_json(first.port, "/health")[0] == 200
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait(5)


def test_broken_connections_are_quiet(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0)
    wait_until(lambda: connectable(server.port))
    for request in (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 9999\r\n\r\n{",
        b"GET /v1/models HTTP/1.1\r\n\r\n",
    ):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        sock.close()  # linger 0: a reset instead of a goodbye
    time.sleep(0.3)
    assert http_json(server.port, "/health")[0] == 200
    assert "Traceback" not in server.stderr.read_text()


def test_write_standin_model(tmp_path: Path) -> None:
    model = write_standin_model(tmp_path / "m", size=5_000_000, hang=True, served_id="x")
    assert json.loads((model / "config.json").read_text()) == {
        "model_type": "llama",
        "max_position_embeddings": 4096,
        "quantization": {"group_size": 64, "bits": 4},
    }
    assert (model / "model.safetensors").stat().st_size == 5_000_000
    assert json.loads((model / "standin.json").read_text()) == {"hang": True, "served_id": "x"}
    assert (write_standin_model(tmp_path / "d") / "model.safetensors").stat().st_size == 1024
    with pytest.raises(TypeError, match="hnag"):
        write_standin_model(tmp_path / "typo", hnag=True)


# --- part two: personalities, the model child, streaming, queue stats, failures, memory, logs ---

NEW = ("--as", "1.8.1")  # the launcher prefix that makes it 1.8.1


def probe(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the stand-in's CLI as mlxctl's capability probe does."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, str(STANDIN), *argv],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def version_of(text: str) -> str | None:
    match = re.search(r"\d+\.\d+\.\d+", text)
    return match.group() if match else None


def help_options(text: str) -> set[str]:
    """Every `--name` that begins an option line (SPEC §13)."""
    return set(re.findall(r"^ +(--[a-z0-9][a-z0-9-]*)", text, flags=re.MULTILINE))


def rss_mib(pid: int) -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stats(port: int) -> dict[str, Any]:
    status, body = http_json(port, "/standin/stats")
    assert status == 200
    return body


def queue(port: int, timeout: float = 2.0) -> dict[str, Any]:
    status, body = http_json(port, "/v1/queue/stats", timeout=timeout)
    assert status == 200 and body["status"] == "ok"
    return body["queue_stats"]


def open_stream(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "json"})
    return connection, connection.getresponse()


def events(response: Any) -> Iterator[tuple[float, bytes]]:
    """(arrival time, payload) of each `data:` event, as it arrives."""
    while True:
        line = response.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            yield time.monotonic(), line[6:].rstrip(b"\n")


def test_version_and_help_per_personality() -> None:
    old, new = probe("--version"), probe(*NEW, "--version")
    assert old.returncode == new.returncode == 0
    assert "🚀 Version: 1.6.3" in old.stdout and "🚀 Version: 1.8.1" in new.stdout
    # the probe's rule: the first x.y.z printed, else unknown
    assert version_of(new.stdout) == "1.8.1" and version_of(old.stdout) == "1.6.3"
    assert version_of(probe("--as", "1.7.0", "--version").stdout) == "1.7.0"
    assert version_of(probe("--garbage-version", "--version").stdout) is None
    old_help, new_help = probe("launch", "--help"), probe(*NEW, "launch", "--help")
    assert old_help.returncode == new_help.returncode == 0
    old_options, new_options = help_options(old_help.stdout), help_options(new_help.stdout)
    mlxctl_owned = {
        "--model-path", "--model-type", "--host", "--port", "--log-file", "--no-log-file",
        "--chat-template-file", "--tool-call-parser", "--reasoning-parser",
    }  # fmt: skip
    assert mlxctl_owned | {"--max-concurrency", "--trust-remote-code"} <= old_options
    assert "--served-model-name" not in old_options and "--kv-bits" not in old_options
    assert mlxctl_owned | {"--served-model-name", "--trust-remote-code"} <= new_options
    assert {"--decode-concurrency", "--disable-batching", "--kv-bits"} <= new_options
    assert "--max-concurrency" not in new_options
    assert new_options - old_options >= {"--served-model-name"}
    # help with no --model-path line: capabilities unknown
    garbage = probe("--garbage-help", *NEW, "launch", "--help")
    assert garbage.returncode == 0 and "--model-path" not in help_options(garbage.stdout)
    assert probe(*NEW, "--version").stdout == probe(*NEW, "--garbage-help", "--version").stdout
    assert "launch" in probe("--help").stdout


def test_options_not_offered_exit_2_before_anything(tmp_path: Path) -> None:
    model = write_standin_model(tmp_path / "m", start_delay=0)
    port = port_block(1)
    base = ["launch", "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cases = [
        ((*NEW, *base, "--max-concurrency", "4"), "Error: No such option: --max-concurrency"),
        ((*base, "--served-model-name", "x"), "Error: No such option: --served-model-name"),
        ((*base, "--disable-batching"), "Error: No such option: --disable-batching"),
        ((*base, "--port"), "Error: Option '--port' requires an argument."),
        ((*base, "stray"), "Error: Got unexpected extra argument (stray)"),
        (("launch", "--port", str(port)), "Error: Missing option '--model-path'."),
    ]
    for argv, message in cases:
        result = probe(*argv)
        assert result.returncode == 2, argv
        assert message in result.stderr.splitlines()[-1], result.stderr
        assert result.stderr.startswith("Usage: mlx-openai-server launch [OPTIONS]")
        assert result.stdout == ""
    assert not connectable(port)


def test_served_name_404_and_health_of_1_8(standin: Callable[..., Standin]) -> None:
    server = standin("--served-model-name", "mlx-tiny", prefix=NEW, start_delay=0)
    wait_until(lambda: connectable(server.port))
    assert http_json(server.port, "/health") == (
        200,
        {"status": "ok", "model_id": "mlx-tiny", "model_status": "initialized (1 model(s))"},
    )
    assert [m["id"] for m in http_json(server.port, "/v1/models")[1]["data"]] == ["mlx-tiny"]
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    status, reply = http_json(server.port, "/v1/chat/completions", {**chat, "model": "mlx-tiny"})
    assert status == 200 and reply["choices"][0]["message"]["content"] == "echo: hi"
    assert http_json(server.port, "/v1/chat/completions", chat)[0] == 200  # no model: the default
    for path, body in (
        ("/v1/chat/completions", {**chat, "model": str(server.model)}),
        ("/v1/completions", {"model": "other", "prompt": "p"}),
    ):
        status, reply = http_json(server.port, path, body)
        assert status == 404
        assert reply["detail"]["error"]["type"] == "model_not_found"
        assert reply["detail"]["error"]["code"] == 404
    status, reply = http_json(server.port, "/v1/completions", {"model": "mlx-tiny", "prompt": "p"})
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == "echo: p"
    assert stats(server.port)["rejected"] == 2 and stats(server.port)["completed"] == 3


def test_1_6_ignores_model_and_serves_completions(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0)
    wait_until(lambda: connectable(server.port))
    status, reply = http_json(server.port, "/v1/completions", {"model": "whatever", "prompt": "p"})
    assert status == 200 and reply["choices"][0]["text"] == "echo: p"
    body = stats(server.port)
    assert body["personality"] == "1.6" and body["version"] == "1.6.3"
    assert body["model_pid"] == server.process.pid and body["respawns"] == 0


def test_model_child_dies_and_is_respawned_on_demand(standin: Callable[..., Standin]) -> None:
    server = standin(prefix=NEW, start_delay=0, reload_delay=0.5)
    wait_until(lambda: connectable(server.port))

    def spawned() -> list[int]:
        return [p for p in server.group() if "multiprocessing.spawn" in cmdline(p)]

    [child] = spawned()
    assert stats(server.port)["model_pid"] == child
    assert any("multiprocessing.resource_tracker" in cmdline(p) for p in server.group())
    for trigger in ("/v1/queue/stats", "/v1/chat/completions"):
        os.kill(child, signal.SIGKILL)
        wait_until(lambda dead=child: dead not in server.group())
        # what mlxctl may send a degraded lane still answers, and does not respawn
        assert http_json(server.port, "/health")[0] == 200
        assert http_json(server.port, "/v1/models")[0] == 200
        assert spawned() == []
        start = time.monotonic()
        body = {"messages": [{"role": "user", "content": "x"}]}
        if trigger == "/v1/queue/stats":
            queue(server.port)
        else:
            assert http_json(server.port, trigger, body)[0] == 200
        assert time.monotonic() - start >= 0.5  # the reload
        [child] = spawned()
        assert stats(server.port)["model_pid"] == child
    assert stats(server.port)["respawns"] == 2
    # the whole group goes on SIGTERM (the resource tracker once the others are gone)
    server.signal_group(signal.SIGTERM)
    assert server.process.wait(2) == -signal.SIGTERM
    wait_until(lambda: server.group() == [], timeout=3)
    assert "Traceback" not in server.stderr.read_text()


def test_streaming_events_arrive_one_by_one(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0)
    wait_until(lambda: connectable(server.port))
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    connection, response = open_stream(server.port, {**chat, "standin_interval": 0.2})
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Content-Length") is None
    assert response.getheader("Transfer-Encoding") == "chunked"
    received = list(events(response))
    connection.close()
    assert received[-1][1] == b"[DONE]"
    chunks = [json.loads(payload) for _, payload in received[:-1]]
    assert len(chunks) == 5  # 4 content chunks and the finish
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == [
        "tok0 ", "tok1 ", "tok2 ", "tok3 ", None,
    ]  # fmt: skip
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert received[-1][0] - received[0][0] >= 0.55  # not buffered: each came when written
    # completions, the knob's default count, and a keep-alive connection that stays usable
    connection, response = open_stream(server.port, {"prompt": "p"}, "/v1/completions")
    payloads = [payload for _, payload in events(response)]
    assert len(payloads) == 3 + 1 + 1 and payloads[-1] == b"[DONE]"
    assert json.loads(payloads[0])["choices"][0]["text"] == "tok0 "
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    connection.close()
    assert stats(server.port)["completed"] == 2


def test_streaming_without_chunked_framing(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, sse_framing="close", stream_chunks=2, chunk_interval=0)
    wait_until(lambda: connectable(server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        body = json.dumps({"stream": True}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break  # the end of the answer is the end of the connection
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert rest.count(b"data: ") == 4 and rest.endswith(b"data: [DONE]\n\n")


def test_client_disconnect_mid_stream_frees_the_request(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0)
    wait_until(lambda: connectable(server.port))
    connection, response = open_stream(server.port, {"max_tokens": 1000, "standin_interval": 0.1})
    next(events(response))
    assert stats(server.port)["active"] == 1
    assert queue(server.port)["queue_stats"]["active_requests"] == 1
    connection.close()
    response.close()
    waited = wait_until(lambda: stats(server.port)["active"] == 0, timeout=2)
    assert waited < 1.0  # the next chunk was not written: it noticed within its interval
    assert stats(server.port)["cancelled"] == 1 and stats(server.port)["completed"] == 0
    # a held (delayed) request is noticed too
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = json.dumps({"standin_delay": 30}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        wait_until(lambda: stats(server.port)["active"] == 1)
    wait_until(lambda: stats(server.port)["cancelled"] == 2, timeout=2)
    assert stats(server.port)["active"] == 0


def hold(port: int, seconds: float, results: list[int], **body: Any) -> threading.Thread:
    """A chat held in flight for `seconds` (standin_delay), in a thread."""

    def run() -> None:
        payload = {"messages": [], "standin_delay": seconds, **body}
        results.append(http_json(port, "/v1/chat/completions", payload, timeout=10)[0])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_queue_stats_count_real_requests_1_6(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, max_concurrency=1)
    wait_until(lambda: connectable(server.port))
    idle = queue(server.port)
    assert set(idle) == {"queue_stats"}  # 1.6.3 has no batch_stats
    assert idle["queue_stats"] == {
        "running": True,
        "queue_size": 0,
        "max_queue_size": 100,
        "active_requests": 0,
        "completed_requests": 0,
        "failed_requests": 0,
    }
    results: list[int] = []
    threads = [hold(server.port, 0.25, results) for _ in range(3)]
    wait_until(lambda: queue(server.port)["queue_stats"]["queue_size"] == 2)
    assert queue(server.port)["queue_stats"]["active_requests"] == 1
    for thread in threads:
        thread.join(5)
    assert results == [200, 200, 200]
    q = queue(server.port)["queue_stats"]
    assert (q["active_requests"], q["queue_size"], q["completed_requests"]) == (0, 0, 3)


def test_queue_stats_of_1_8_batched_and_not(standin: Callable[..., Standin]) -> None:
    batched = standin("--queue-size", "7", prefix=NEW, name="b", start_delay=0)
    plain = standin("--disable-batching", prefix=NEW, name="p", start_delay=0, max_concurrency=1)
    wait_until(lambda: connectable(batched.port) and connectable(plain.port))
    assert queue(batched.port)["batch_stats"]["running"] is False  # started at the first request
    results: list[int] = []
    threads = [hold(batched.port, 0.4, results) for _ in range(2)]
    threads += [hold(plain.port, 0.4, results) for _ in range(2)]
    wait_until(lambda: queue(batched.port)["batch_stats"]["active_requests"] == 2)
    q = queue(batched.port)
    assert q["queue_stats"]["active_requests"] == 0 and q["queue_stats"]["queue_size"] == 0
    assert q["batch_stats"]["running"] is True and q["batch_stats"]["max_queue_size"] == 7
    assert q["batch_stats"]["disabled"] is False
    wait_until(lambda: queue(plain.port)["queue_stats"]["queue_size"] == 1)
    q = queue(plain.port)
    assert q["queue_stats"]["active_requests"] == 1 and q["batch_stats"]["disabled"] is True
    assert q["batch_stats"]["active_requests"] == 0
    for thread in threads:
        thread.join(5)
    assert results == [200] * 4
    # 1.8 does not count batched requests as completed; unbatched ones it does
    assert queue(batched.port)["queue_stats"]["completed_requests"] == 0
    assert queue(batched.port)["batch_stats"]["active_requests"] == 0
    assert queue(plain.port)["queue_stats"]["completed_requests"] == 2
    assert stats(batched.port)["completed"] == 2


def test_request_delay_knob_and_queued_client_leaving(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, request_delay=0.3, max_concurrency=1)
    wait_until(lambda: connectable(server.port))
    start = time.monotonic()
    assert http_json(server.port, "/v1/chat/completions", {"messages": []})[0] == 200
    assert time.monotonic() - start >= 0.3
    results: list[int] = []
    first = hold(server.port, 1.0, results)
    wait_until(lambda: stats(server.port)["active"] == 1)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        wait_until(lambda: stats(server.port)["queued"] == 1)
    wait_until(lambda: stats(server.port)["cancelled"] == 1, timeout=2)
    # noticed while still queued: the first request still holds the only slot
    assert stats(server.port)["queued"] == 0 and stats(server.port)["active"] == 1
    first.join(5)
    assert results == [200] and stats(server.port)["completed"] == 2


def test_failure_personalities(standin: Callable[..., Standin]) -> None:
    busy = standin(name="busy", start_delay=0.1, bind_error=True)
    oom = standin(name="oom", start_delay=0, abort_after=0.3, abort_message="Insufficient Memory")
    killed = standin(name="killed", prefix=NEW, start_delay=0, sigkill_after=0.3)
    bad = standin(name="bad", prefix=NEW, start_delay=0, exit_before_bind=0)
    assert busy.process.wait(5) == 1
    line = busy.stderr.read_text()
    assert f"error while attempting to bind on address ('127.0.0.1', {busy.port})" in line
    assert line.rstrip().endswith(": address already in use") and not connectable(busy.port)
    assert bad.process.wait(5) == 0 and "Application startup failed" in bad.stdout.read_text()
    assert oom.process.wait(5) == -signal.SIGABRT
    assert time.monotonic() - oom.started >= 0.3
    assert "Uvicorn running" in oom.stdout.read_text()  # it aborted after binding
    assert "Insufficient Memory" in oom.stderr.read_text()
    assert not list(oom.stdout.parent.glob("core*"))  # its cwd: no core file
    assert killed.process.wait(5) == -signal.SIGKILL
    assert "Uvicorn running" in killed.stdout.read_text()
    # its model child outlives it, in the group, until the group is killed
    assert any("multiprocessing.spawn" in cmdline(p) for p in killed.group())


def test_alloc_mb_lands_in_the_model_process(standin: Callable[..., Standin]) -> None:
    old = standin(name="old", start_delay=0, alloc_mb=64)
    new = standin(name="new", prefix=NEW, start_delay=0, alloc_mb=64)
    wait_until(lambda: connectable(old.port) and connectable(new.port))
    assert rss_mib(old.process.pid) >= 64
    [child] = [p for p in new.group() if "multiprocessing.spawn" in cmdline(p)]
    assert rss_mib(child) >= 64 and rss_mib(new.process.pid) < 64


def test_log_rate_survives_copy_truncate(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, log_rate=100_000, app_log_rate=100_000)
    wait_until(lambda: connectable(server.port))
    wait_until(lambda: server.stdout.stat().st_size > 10_000)
    wait_until(lambda: server.log_file.stat().st_size > 10_000)
    start = time.monotonic()
    before = server.stdout.stat().st_size
    time.sleep(0.4)
    rate = (server.stdout.stat().st_size - before) / (time.monotonic() - start)
    assert 30_000 < rate < 200_000  # about the knob (loose: a loaded machine delays bursts)
    for log in (server.stdout, server.log_file):
        os.truncate(log, 0)  # what a copy-truncate rotation does under the writer
    time.sleep(0.2)
    for log in (server.stdout, server.log_file):
        data = log.read_bytes()
        # O_APPEND: writing resumed at the new end, not at the old offset (no hole of NULs)
        assert 0 < len(data) < 100_000 and b"\0" not in data
        assert data.startswith(b"INFO:     ") and data.endswith(b"\n")
    assert http_json(server.port, "/health")[0] == 200


def test_sigstop_of_the_group_holds_requests_until_sigcont(
    standin: Callable[..., Standin],
) -> None:
    server = standin(prefix=NEW, start_delay=0)
    wait_until(lambda: connectable(server.port))
    server.signal_group(signal.SIGSTOP)
    try:
        assert connectable(server.port)  # the kernel still accepts
        with pytest.raises((socket.timeout, urllib.error.URLError), match="timed out"):
            http_json(server.port, "/health", timeout=0.3)
    finally:
        server.signal_group(signal.SIGCONT)
    assert http_json(server.port, "/health")[0] == 200


def test_write_standin_model_takes_every_new_knob(tmp_path: Path) -> None:
    knobs = {
        "bind_error": True, "abort_after": 1, "abort_message": "m", "sigkill_after": 1,
        "alloc_mb": 1, "reload_delay": 1, "request_delay": 1, "stream_chunks": 1,
        "chunk_interval": 1, "sse_framing": "close", "max_concurrency": 1, "log_rate": 1,
        "app_log_rate": 1,
    }  # fmt: skip
    model = write_standin_model(tmp_path / "m", **knobs)
    assert json.loads((model / "standin.json").read_text()) == knobs
