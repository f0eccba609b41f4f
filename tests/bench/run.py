"""`make bench`: mlxctl's costs as ratios against baselines measured in the same run.

Each figure is the median of several runs of the real file by subprocess, with the same interpreter
as its baseline. Targets come from the issues; a miss is printed, not asserted (timing assertions
have no place in unit tests)."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.ports import port_block  # noqa: E402

MLXCTL = ROOT / "mlxctl"
PY = sys.executable
RESULTS: list[tuple[str, str, str]] = []


def median_time(run: Callable[[], object], repeat: int = 7) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def report(name: str, figure: str, target: str) -> None:
    RESULTS.append((name, figure, target))
    print(f"{name:<58} {figure:<34} target {target}", flush=True)


FLOOR_MODULES = "argparse, json, os, pathlib, shlex, socket, subprocess, fcntl"


def stdlib_floor() -> Callable[[], object]:
    """The interpreter floor of issue 8: the stdlib modules every command needs, and compiling the
    script (a script is compiled on every start). Whatever mlxctl imports beyond these counts
    against it, so a module only some commands use must be imported only there."""
    code = f"import {FLOOR_MODULES}; compile(open({str(MLXCTL)!r}).read(), 'mlxctl', 'exec')"
    return lambda: subprocess.run([PY, "-c", code], check=True)


def mlxctl_runner(env: dict[str, str], *args: str) -> Callable[[], object]:
    return lambda: subprocess.run(
        [PY, str(MLXCTL), *args],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def world(tmp: Path) -> dict[str, str]:
    base = port_block(40, 30000)
    env = {
        **os.environ,
        "HOME": str(tmp / "home"),
        "HF_HOME": str(tmp / "hf"),
        "XDG_CONFIG_HOME": str(tmp / "cfg"),
        "MLX_BIND_HOST": "127.0.0.1",
        "MLX_HOST": "127.0.0.1",
        "GATEWAY_HOST": "local",
        "MLX_OFFLOAD_HOST": "local",
        "MLXCTL_ROLE": "studio",
        "GATEWAY_ROOT": str(tmp / "gw"),
        "MLX_TEAM_PORTS": f"{base}-{base + 19}",
        "MLX_EXPERIMENTAL_PORTS": f"{base + 20}-{base + 39}",
        "MLX_PROBE_TIMEOUT": "1.0",
        "MLX_LAUNCH_CMD": f"{PY} {ROOT / 'tests/fixtures/standin_server.py'} launch",
    }
    env.pop("MLXCTL_CONFIG", None)
    (tmp / "hf" / "hub").mkdir(parents=True)
    return env


def registry_of(tmp: Path, count: int, base: int) -> None:
    models = {}
    for i in range(count):
        model_id = f"mlx-bench-model-{i:02d}"
        path = tmp / "models" / model_id
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
        models[model_id] = {
            "repo_id": f"bench/{model_id}",
            "model_id": model_id,
            "cache_path": str(path),
            "source_path": str(path),
            "format": "mlx",
            "port": base + i,
            "context_length": 32768,
            "max_output_tokens": 32768,
        }
    registry = {"version": 1, "generation": 1, "models": models}
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry, indent=2))


@contextmanager
def hung_listener(port: int) -> Iterator[None]:
    """Accepts connections and never answers."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def bench_read_commands() -> None:
    floor = median_time(stdlib_floor(), 11)
    report("interpreter floor (stdlib imports + compile)", f"{floor * 1000:.0f} ms", "-")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        env = world(tmp)
        base = int(env["MLX_TEAM_PORTS"].split("-")[0])
        registry_of(tmp, 40, base)
        for args in (("list",), ("show", "mlx-bench-model-07")):
            cost = median_time(mlxctl_runner(env, *args), 11)
            report(
                f"mlxctl {' '.join(args)} (40 models)",
                f"{cost * 1000:.0f} ms = {cost / floor:.2f}x floor",
                "<= 1.30x",
            )
        (tmp / "hf" / "hub" / "registry.json").unlink()
        registry_of(tmp, 0, base)
        cost = median_time(mlxctl_runner(env, "status"), 7)
        report(
            "status, 40 ports, nothing listening",
            f"floor + {(cost - floor) * 1000:.0f} ms",
            "<= floor + 150 ms",
        )
        with hung_listener(base + 5):
            hung = median_time(mlxctl_runner(env, "status"), 5)
        report(
            "status, 40 ports, one hung port (probe timeout 1.0 s)",
            f"floor + {(hung - floor) * 1000:.0f} ms (+{hung - cost:.2f} s)",
            "hung port adds <= 1 probe timeout",
        )


def main() -> int:
    benches = [bench_read_commands]
    extra = ROOT / "tests" / "bench"
    sys.path.insert(0, str(extra))
    for module_name in (
        "bench_lifecycle",
        "bench_gateway",
        "bench_init",
        "bench_watch",
        "bench_memory_metrics",
        "bench_route",
    ):
        if (extra / f"{module_name}.py").exists():
            module = __import__(module_name)
            benches.append(module.run)
    for bench in benches:
        bench()
    print("\nsummary")
    for name, figure, target in RESULTS:
        print(f"  {name}: {figure} (target {target})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
