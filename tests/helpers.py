"""Plain functions the test files share (fixtures live in conftest.py). One place each for: model
directories and registry seeds, runtime records, reading mlxctl's output, the gateway block,
processes seen through /proc, sockets and HTTP, and starting the real file or a stand-in."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest import MLXCTL, STANDIN, registry_entry

if TYPE_CHECKING:
    from conftest import Env

SOAK = os.environ.get("MLXCTL_SOAK") == "1"  # longer fault, stress and fuzz runs (make soak)
MARK_BEGIN, MARK_END = "# BEGIN MLXCTL AUTO", "# END MLXCTL AUTO"
LLAMA_CONFIG: dict[str, Any] = {"model_type": "llama"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# -- model directories and the registry ---------------------------------------------------------


def model_dir(
    parent: Path, name: str, *, config: Mapping[str, Any] | None = None, weights: int = 0
) -> Path:
    """A model directory that no server reads: config.json (LLAMA_CONFIG unless given) and, when
    `weights` > 0, a model.safetensors of that many zero bytes. Stand-in models that a server
    starts from come from `env.add_model` / `env.model_dir` instead."""
    path = parent / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_CONFIG if config is None else dict(config)))
    if weights > 0:
        (path / "model.safetensors").write_bytes(b"\0" * weights)
    return path


def plain_entry(
    env: Env,
    model_id: str,
    port: int | None = None,
    *,
    path: Path | None = None,
    config: Mapping[str, Any] | None = None,
    weights: int = 0,
    **fields: Any,
) -> dict[str, Any]:
    """A registry entry whose weights exist (at `path`, else a new model_dir under tmp/plain)."""
    directory = path or model_dir(env.tmp / "plain", model_id, config=config, weights=weights)
    return registry_entry(model_id, directory, port, **fields)


def seed_registry(env: Env, *entries: Mapping[str, Any], **top: Any) -> bytes:
    """A new registry holding exactly these entries (keyed by model_id); returns its bytes."""
    env.write_registry({e["model_id"]: dict(e) for e in entries}, **top)
    return env.registry_path.read_bytes()


def add_entries(env: Env, *entries: Mapping[str, Any]) -> None:
    """Add (or replace) entries in the registry as it is, keeping its other fields."""
    data: dict[str, Any] = {"version": 1, "models": {}}
    if env.registry_path.exists():
        data = env.registry()
    data["models"].update({e["model_id"]: dict(e) for e in entries})
    env.registry_path.write_text(json.dumps(data, indent=2))


def write_knobs(model: Path, **knobs: Any) -> None:
    """Replace a stand-in model's knob file (tests/fixtures/standin_server.py reads it at start)."""
    (model / "standin.json").write_text(json.dumps(knobs))


def bak(path: Path) -> Path:
    """The backup an atomic rewrite leaves next to `path`."""
    return path.with_name(path.name + ".bak")


def empty_or_absent(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


# -- runtime records ----------------------------------------------------------------------------


def record_path(env: Env, port: int) -> Path:
    return env.state / "run" / f"{port}.json"


def read_record(env: Env, port: int) -> dict[str, Any]:
    data = json.loads(record_path(env, port).read_text())
    assert isinstance(data, dict)
    return data


def write_record(env: Env, port: int, raw: bytes | None = None, **fields: Any) -> Path:
    """The runtime record of `port`: `raw` bytes as they are, else a well-formed record of a
    server that is not running (pid 0) with `fields` replacing its values."""
    path = record_path(env, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is None:
        data = {
            "pid": 0,
            "pgid": 0,
            "start_time": "1",
            "argv": ["x"],
            "model_id": "mlx-a",
            "cache_path": "/x",
            "port": port,
            "started_at": "2025-01-01T00:00:00Z",
            "started_epoch": time.time() - 5,
            "log": "/dev/null",
            **fields,
        }
        raw = json.dumps(data).encode()
    path.write_bytes(raw)
    return path


def run_records(env: Env) -> list[Path]:
    run_dir = env.state / "run"
    return sorted(run_dir.glob("*.json")) if run_dir.is_dir() else []


# -- what mlxctl prints -------------------------------------------------------------------------


def one_json(out: str) -> dict[str, Any]:
    """The one JSON object a `--json` mutating command prints on stdout."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {out!r}"
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data


def error_line(err: str) -> str:
    """The one `mlxctl: error:` line of stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("mlxctl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def status_rows(out: str) -> dict[int, dict[str, Any]]:
    """`status --json` output, its rows by port."""
    return {row["port"]: row for row in json.loads(out)["ports"]}


def status_row(out: str, port: int) -> dict[str, Any]:
    return status_rows(out)[port]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file (handles.jsonl) as an object."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def outside_block(text: str, *, required: bool = True) -> str:
    """The text without the mlxctl block: its BEGIN and END marker lines (indented or not, any
    line ending) and everything between them. Without a block: an assertion error when
    `required`, else the text unchanged (a file no sync has written yet)."""
    lines = text.splitlines(keepends=True)
    marks = [line.strip() for line in lines]
    if MARK_BEGIN not in marks or MARK_END not in marks:
        assert not required, f"no mlxctl block in {text!r}"
        return text
    begin, end = marks.index(MARK_BEGIN), marks.index(MARK_END)
    return "".join(lines[:begin] + lines[end + 1 :])


# -- processes ----------------------------------------------------------------------------------


def spawn_mlxctl(
    environ: Mapping[str, str], *args: str, new_session: bool = False, capture: bool = True
) -> subprocess.Popen[str]:
    """The real file in the background (stdin closed); its output piped unless `capture` is off."""
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, str(MLXCTL), *args],
        stdout=output,
        stderr=output,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(environ),
        start_new_session=new_session,
    )


def write_script(path: Path, body: str) -> Path:
    """An executable /bin/sh script: a stand-in for a program mlxctl runs (ssh, rsync, ...)."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def proc_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (state, ppid, pgrp, session, ...), None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie (PID 1 here does not reap orphans)."""
    fields = proc_fields(pid)
    return fields is not None and fields[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group, sorted."""
    return sorted(
        pid
        for pid in all_pids()
        if (fields := proc_fields(pid)) and fields[0] != "Z" and int(fields[2]) == pgid
    )


def live_pids_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (a test world's model directory)."""
    return sorted(pid for pid in all_pids() if needle in cmdline(pid) and alive(pid))


def standin_pids(env: Env) -> list[int]:
    """The live stand-in servers of a test world, recorded or not: their argv names its models
    directory (where `env.add_model` puts them)."""
    return live_pids_mentioning(str(env.tmp / "models"))


def zombie_children() -> list[int]:
    """Zombies whose parent is this process."""
    me = os.getpid()
    return [
        pid
        for pid in all_pids()
        if (fields := proc_fields(pid)) and fields[0] == "Z" and int(fields[1]) == me
    ]


# -- sockets, HTTP and waiting ------------------------------------------------------------------


def connectable(port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> float:
    """Seconds until `predicate` held; an assertion error once `timeout` has passed."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not reached in {timeout}s: {predicate}"
        time.sleep(interval)
    return time.monotonic() - start


def http_json(port: int, path: str, body: Any = None, timeout: float = 2.0) -> tuple[int, Any]:
    """GET (or POST `body` as JSON) on 127.0.0.1:port, never through a proxy: (status, JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat(
    port: int, model: str, text: str = "hi", *, max_tokens: int = 4, timeout: float = 60
) -> dict[str, Any]:
    """One chat completion from a model server; it must answer 200. `model` is the served name:
    1.8 answers 404 for any other (1.6.3 ignores it)."""
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    status, reply = http_json(port, "/v1/chat/completions", body, timeout=timeout)
    assert status == 200, reply
    assert isinstance(reply, dict)
    return reply


def standin_argv(
    model: Path,
    port: int,
    *extra: str,
    launch: bool = True,
    prefix: tuple[str, ...] = (),
    script: Path = STANDIN,
) -> list[str]:
    """The stand-in server's argv on 127.0.0.1:port: `prefix` (e.g. `--as 1.8.1`), `launch`
    unless told not to, the model path, then `extra` options."""
    argv = [sys.executable, str(script), *prefix, *(["launch"] if launch else [])]
    return [*argv, "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port), *extra]
