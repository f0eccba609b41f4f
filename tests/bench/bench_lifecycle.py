"""Lifecycle benchmarks: load overhead against the real server, unload-all of stubborn stand-ins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from run import MLXCTL, PY, ROOT, report, world

MLX_VENV = Path(os.environ.get("MLXCTL_TEST_MLX_VENV", ROOT / ".venv-mlx"))


def wait_served(port: int, timeout: float = 180) -> None:
    """Poll tightly until the server answers /v1/models."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"server on {port} never came up")


def bench_load_overhead(tmp: Path) -> None:
    server = MLX_VENV / "bin" / "mlx-openai-server"
    if not server.exists():
        report("load overhead vs the real server started directly", "skipped (no server)", "-")
        return
    from fixtures.tiny_model import build

    model = build("mlx", tmp / "tiny", str(MLX_VENV / "bin" / "python"))
    env = world(tmp)
    env["MLX_LAUNCH_CMD"] = f"{server} launch"
    base = int(env["MLX_EXPERIMENTAL_PORTS"].split("-")[0])
    registry = {
        "version": 1,
        "models": {
            "mlx-tiny": {
                "repo_id": "t/tiny",
                "model_id": "mlx-tiny",
                "cache_path": str(model),
                "format": "mlx",
                "port": None,
            }
        },
    }
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry))
    direct, managed = [], []
    for _ in range(3):
        started = time.perf_counter()
        child = subprocess.Popen(
            [
                str(server),
                "launch",
                "--model-path",
                str(model),
                "--model-type",
                "lm",
                "--host",
                "127.0.0.1",
                "--port",
                str(base + 5),
                "--no-log-file",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
        wait_served(base + 5)
        direct.append(time.perf_counter() - started)
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        started = time.perf_counter()
        subprocess.run(
            [PY, str(MLXCTL), "load", "mlx-tiny", str(base), "--no-sync"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        managed.append(time.perf_counter() - started)
        subprocess.run(
            [PY, str(MLXCTL), "unload", str(base), "--no-sync"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    d, m = sorted(direct)[1], sorted(managed)[1]
    report(
        "load to ready: mlxctl vs the server started directly",
        f"{m:.2f} s vs {d:.2f} s (+{m - d:.2f} s)",
        "<= +0.3 s",
    )


def bench_unload_all(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.standin_server import write_standin_model

    env = world(tmp)
    env["MLX_STOP_TIMEOUT"] = "2"
    base = int(env["MLX_EXPERIMENTAL_PORTS"].split("-")[0])
    models = {}
    for i in range(10):
        path = write_standin_model(
            tmp / "standins" / f"m{i}", ignore_sigterm=True, start_delay=0.05
        )
        models[f"mlx-stubborn-{i}"] = {
            "repo_id": f"t/s{i}",
            "model_id": f"mlx-stubborn-{i}",
            "cache_path": str(path),
            "format": "mlx",
            "port": None,
        }
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps({"version": 1, "models": models}))
    for i in range(10):
        subprocess.run(
            [PY, str(MLXCTL), "load", f"mlx-stubborn-{i}", str(base + i), "--no-sync"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    started = time.perf_counter()
    subprocess.run(
        [PY, str(MLXCTL), "unload-all", "--no-sync"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    took = time.perf_counter() - started
    report("unload-all, 10 stand-ins ignoring SIGTERM, 2 s grace", f"{took:.2f} s", "<= 2.5 s")


def run() -> None:
    with tempfile.TemporaryDirectory() as name:
        bench_unload_all(Path(name))
    with tempfile.TemporaryDirectory() as name:
        bench_load_overhead(Path(name))
