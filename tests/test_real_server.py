"""The real file against the real mlx-openai-server 1.6.3 on a tiny generated model (SPEC §8)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from conftest import Env, registry_entry
from helpers import (
    add_entries,
    chat,
    connectable,
    read_record,
    record_path,
    run_records,
    status_row,
)

pytestmark = pytest.mark.real


def register(env: Env, model_id: str, path: Path) -> None:
    add_entries(env, registry_entry(model_id, path, None))


def test_load_chat_status_unload(real_server: Env, tiny_mlx_model: Path) -> None:
    env = real_server
    register(env, "mlx-tiny", tiny_mlx_model)
    result = env.run("load", "mlx-tiny", "auto")
    assert result.returncode == 0, result.stderr
    model_id, port_text = result.stdout.split()
    port = int(port_text)
    assert (model_id, port) == ("mlx-tiny", env.exp[0])
    reply = chat(port, "mlx-tiny", "Say hello.", max_tokens=8)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    entry = env.registry()["models"]["mlx-tiny"]
    assert entry["port"] == port and "reservation" not in entry
    assert entry["context_length"] == 2048 and entry["max_output_tokens"] == 2048
    # the server wrote its own log where mlxctl told it, not into a cwd logs/ dir
    assert (env.state / "logs" / f"{port}.app.log").exists()
    row = status_row(env.run("status", "--json").stdout, port)
    assert row["state"] == "serving" and row["ours"] is True
    # 1.8 serves the name mlxctl gives it (--served-model-name); 1.6.3 serves the model's path
    served = "mlx-tiny" if env.mlx_version == "1.8.1" else str(tiny_mlx_model)
    assert row["served_id"] == served
    assert row["rss_bytes"] > 50_000_000
    # load twice is a no-op: same process, exit 0
    record = read_record(env, port)
    again = env.run("load", "mlx-tiny", "auto")
    assert again.returncode == 0 and again.stdout.split() == ["mlx-tiny", str(port)]
    assert read_record(env, port)["pid"] == record["pid"]
    # the handle reached the gateway files (GATEWAY_HOST=local)
    assert '"handle":"mlx-tiny"' in env.handles.read_text()
    result = env.run("unload", str(port))
    assert result.returncode == 0, result.stderr
    assert env.registry()["models"]["mlx-tiny"]["port"] is None
    assert not connectable(port)
    assert not record_path(env, port).exists()
    assert '"handle":"mlx-tiny"' not in env.handles.read_text()


def test_broken_model_rolls_back(real_server: Env, tiny_mlx_model: Path, tmp_path: Path) -> None:
    env = real_server
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mlx_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    register(env, "mlx-broken", broken)
    before = env.registry_path.read_bytes()
    result = env.run("load", "mlx-broken", str(env.team[3]), "--no-sync")
    assert result.returncode == 1
    assert "exited during start" in result.stderr
    assert "last" in result.stderr and "lines of" in result.stderr  # the log tail
    assert "Traceback (most recent call last)" not in result.stderr.split("---")[0]
    assert json.loads(env.registry_path.read_bytes())["models"] == json.loads(before)["models"]
    assert run_records(env) == []


def test_busy_port_refused_before_any_spawn(real_server: Env, tiny_mlx_model: Path) -> None:
    env = real_server
    register(env, "mlx-tiny", tiny_mlx_model)
    before = env.registry_path.read_bytes()
    port = env.team[1]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        result = env.run("load", "mlx-tiny", str(port), "--no-sync", timeout=30)
    assert result.returncode == 1
    assert f"port {port} held by" in result.stderr
    assert env.registry_path.read_bytes() == before
    assert not (env.state / "logs" / f"{port}.log").exists()  # nothing was spawned
