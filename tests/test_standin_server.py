"""The stand-in model server itself, against real sockets, signals and process groups.

Other tests trust the stand-in to produce each fault; these prove that it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.ports import port_block
from fixtures.standin_server import write_standin_model

STANDIN = Path(__file__).parent / "fixtures" / "standin_server.py"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Standin:
    """One stand-in in its own session, as mlxctl starts servers; the group is killed at the end."""

    def __init__(self, tmp: Path, model: Path, *extra: str, launch: bool = True) -> None:
        self.port = port_block(1)
        self.model = model
        self.log_file = tmp / f"logs-{self.port}" / "app.log"
        self.stdout = tmp / f"{self.port}.out"
        self.stderr = tmp / f"{self.port}.err"
        argv = [sys.executable, str(STANDIN), *(["launch"] if launch else [])]
        argv += ["--model-path", str(model), "--model-type", "lm", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--log-file", str(self.log_file), *extra]
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        self.started = time.monotonic()

    def group(self) -> list[int]:
        """Live members of the process group (zombies excluded), by /proc."""
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.process.pid and fields[0] != "Z":
                    members.append(int(entry.name))
        return sorted(members)

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

    def start(*extra: str, launch: bool = True, name: str = "m", **knobs: Any) -> Standin:
        model = tmp_path / "models" / name
        if not model.exists():
            write_standin_model(model, **knobs)
        server = Standin(tmp_path, model, *extra, launch=launch)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def connectable(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `predicate` held; fails the test at `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def get(port: int, path: str, body: Any = None, timeout: float = 2.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_defaults_argv_endpoints_and_sigterm(standin: Callable[..., Standin]) -> None:
    unknown = ("--chat-template-file", "/t.jinja", "--tool-call-parser", "x", "--max-tokens", "5")
    server = standin(*unknown, "--reasoning-parser", "y", "--no-such-flag")
    # it "loads the model" (start_delay, 0.3 s by default) before binding
    waited = wait_until(lambda: connectable(server.port))
    assert waited >= 0.25
    assert get(server.port, "/health") == (
        200,
        {"status": "ok", "model_id": str(server.model), "model_status": "initialized"},
    )
    status, models = get(server.port, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(str(server.model), "model")]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "last one"}]},
    ]
    status, reply = get(server.port, "/v1/chat/completions", {"model": "x", "messages": messages})
    assert status == 200 and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo: last one"}
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["total_tokens"] == 2
    assert get(server.port, "/nope")[0] == 404
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
        assert get(server.port, "/v1/models")[1]["data"][0]["id"] == str(model)
    finally:
        server.kill()


def test_served_id_and_health_delay(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, health_delay=0.6, served_id="org/served-name")
    wait_until(lambda: connectable(server.port))
    bound = time.monotonic()
    assert get(server.port, "/health")[0] == 503
    assert get(server.port, "/v1/models")[0] == 503
    wait_until(lambda: get(server.port, "/health")[0] == 200)
    assert time.monotonic() - bound >= 0.4
    assert get(server.port, "/v1/models")[1]["data"][0]["id"] == "org/served-name"
    assert get(server.port, "/health")[1]["model_id"] == "org/served-name"


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
    assert server.group() == members and get(server.port, "/health")[0] == 200
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
    assert get(server.port, "/health")[0] == 200
    assert server.process.wait(3) == 1
    assert time.monotonic() - server.started >= 0.5
    assert not connectable(server.port)


def test_hang_accepts_but_never_answers(standin: Callable[..., Standin]) -> None:
    server = standin(start_delay=0, hang=True)
    wait_until(lambda: connectable(server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(socket.timeout):
            sock.recv(100)
    with pytest.raises((socket.timeout, urllib.error.URLError)):
        get(server.port, "/v1/models", timeout=0.5)
    start = time.monotonic()
    server.signal_group(signal.SIGTERM)
    assert server.process.wait(2) == -signal.SIGTERM
    assert time.monotonic() - start < 0.2


def bare_standin(model: Path, port: int) -> list[str]:
    """The stand-in's argv without `launch`, `--model-type` or `--log-file`."""
    return [
        sys.executable,
        str(STANDIN),
        "--model-path",
        str(model),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]


def test_port_in_use_fails_but_time_wait_does_not(standin: Callable[..., Standin]) -> None:
    first = standin(start_delay=0)
    wait_until(lambda: connectable(first.port))
    assert get(first.port, "/health")[0] == 200  # the server closes first: TIME_WAIT on its side
    rival = subprocess.run(
        bare_standin(first.model, first.port), capture_output=True, text=True, timeout=10
    )
    assert rival.returncode != 0 and "Address already in use" in rival.stderr
    first.signal_group(signal.SIGTERM)
    first.process.wait(2)
    again = subprocess.Popen(
        bare_standin(first.model, first.port), stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until(lambda: connectable(first.port))
        assert get(first.port, "/health")[0] == 200
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
    assert get(server.port, "/health")[0] == 200
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
