"""Lifecycle benchmarks: load overhead against both real servers, unload-all of stubborn stand-ins."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from run import MLXCTL, PY, ROOT, report, world

SERVERS = {
    "1.6.3": Path(os.environ.get("MLXCTL_TEST_MLX_VENV", ROOT / ".venv-mlx")),
    "1.8.1": Path(os.environ.get("MLXCTL_TEST_MLX18_VENV", ROOT / ".venv-mlx18")),
}
PAIRS = int(os.environ.get("MLXCTL_BENCH_PAIRS", "10"))


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


def swap_value(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def bench_load_overhead(tmp: Path, version: str, venv: Path) -> None:
    """mlxctl's wall time from `load` to its return (ready and committed) against the same server,
    with the same argv, started directly and polled tightly: PAIRS alternating A/B pairs (the order
    flips each pair), with the capability cache warm as on every load but a Studio's first."""
    name = f"load to ready vs the server started directly, {version}"
    server = venv / "bin" / "mlx-openai-server"
    if not server.exists():
        report(name, "skipped (no server)", "-")
        return
    from fixtures.tiny_model import build

    model = build("mlx", tmp / "tiny", str(venv / "bin" / "python"))
    env = world(tmp)
    env["MLX_LAUNCH_CMD"] = f"{server} launch"
    base = int(env["MLX_EXPERIMENTAL_PORTS"].split("-")[0])
    entry = {"repo_id": "t/tiny", "model_id": "mlx-tiny", "cache_path": str(model), "format": "mlx"}
    registry = {"version": 1, "models": {"mlx-tiny": {**entry, "port": None}}}
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry))

    def mlxctl(*args: str) -> str:
        done = subprocess.run(
            [PY, str(MLXCTL), *args], env=env, check=True, stdout=subprocess.PIPE, text=True
        )
        return done.stdout

    mlxctl("load", "mlx-tiny", str(base), "--no-sync")  # warms the capability cache
    argv = json.loads(mlxctl("--json", "show", "mlx-tiny"))["launch_argv"]
    mlxctl("unload", str(base), "--no-sync")
    argv = swap_value(swap_value(argv, "--port", str(base + 5)), "--log-file", str(tmp / "d.log"))

    def direct() -> float:
        started = time.perf_counter()
        child = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
        wait_served(base + 5)
        took = time.perf_counter() - started
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        return took

    def managed() -> float:
        started = time.perf_counter()
        mlxctl("load", "mlx-tiny", str(base), "--no-sync")
        took = time.perf_counter() - started
        mlxctl("unload", str(base), "--no-sync")
        return took

    pairs = []
    for number in range(PAIRS):
        first, second = (direct, managed) if number % 2 == 0 else (managed, direct)
        a, b = first(), second()
        pairs.append((a, b) if first is direct else (b, a))
    differences = sorted(m - d for d, m in pairs)
    quartiles = statistics.quantiles(differences, n=4)
    report(
        f"{name} ({PAIRS} A/B pairs)",
        f"median {statistics.median(differences):+.2f} s, IQR {quartiles[0]:+.2f}..{quartiles[2]:+.2f}"
        f" (direct {statistics.median(d for d, _ in pairs):.2f} s)",
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
    for version, venv in SERVERS.items():
        with tempfile.TemporaryDirectory() as name:
            bench_load_overhead(Path(name), version, venv)
