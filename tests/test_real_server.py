"""The real file against the real mlx-openai-server 1.6.3 on a tiny generated model (SPEC §8)."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
from conftest import Env

pytestmark = pytest.mark.real


def chat(port: int, text: str = "Say hello.") -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(
            {"model": "any", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def register(env: Env, model_id: str, path: Path) -> None:
    models = env.registry()["models"] if env.registry_path.exists() else {}
    models[model_id] = {
        "repo_id": f"test-org/{model_id}",
        "model_id": model_id,
        "cache_path": str(path),
        "source_path": str(path),
        "format": "mlx",
        "port": None,
    }
    env.write_registry(models)


def test_load_chat_status_unload(real_server: Env, tiny_mlx_model: Path) -> None:
    env = real_server
    register(env, "mlx-tiny", tiny_mlx_model)
    result = env.run("load", "mlx-tiny", "auto")
    assert result.returncode == 0, result.stderr
    model_id, port_text = result.stdout.split()
    port = int(port_text)
    assert (model_id, port) == ("mlx-tiny", env.exp[0])
    reply = chat(port)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    entry = env.registry()["models"]["mlx-tiny"]
    assert entry["port"] == port and "reservation" not in entry
    assert entry["context_length"] == 2048 and entry["max_output_tokens"] == 2048
    # the server wrote its own log where mlxctl told it, not into a cwd logs/ dir
    assert (env.state / "logs" / f"{port}.app.log").exists()
    status = json.loads(env.run("status", "--json").stdout)
    row = next(p for p in status["ports"] if p["port"] == port)
    assert row["state"] == "serving" and row["ours"] is True
    assert row["served_id"] == str(tiny_mlx_model)
    assert row["rss_bytes"] > 50_000_000
    # load twice is a no-op: same process, exit 0
    record = json.loads((env.state / "run" / f"{port}.json").read_text())
    again = env.run("load", "mlx-tiny", "auto")
    assert again.returncode == 0 and again.stdout.split() == ["mlx-tiny", str(port)]
    assert json.loads((env.state / "run" / f"{port}.json").read_text())["pid"] == record["pid"]
    # the handle reached the gateway files (GATEWAY_HOST=local)
    assert '"handle":"mlx-tiny"' in env.handles.read_text()
    result = env.run("unload", str(port))
    assert result.returncode == 0, result.stderr
    assert env.registry()["models"]["mlx-tiny"]["port"] is None
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert not (env.state / "run" / f"{port}.json").exists()
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
    assert not list((env.state / "run").glob("*.json"))


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
