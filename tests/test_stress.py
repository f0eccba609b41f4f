"""Concurrency and soak (issue 5): many mlxctl processes on one registry lose nothing; hundreds of
load/unload cycles leak no process, descriptor or zombie, and logs stay bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import MLXCTL, Env
from helpers import SOAK, standin_pids, zombie_children

import mlxctl

WORKERS = 8
SECONDS = 60 if SOAK else 20
CYCLES = 300 if SOAK else 40

WORKER = r"""
import json, random, subprocess, sys, time
mlxctl, worker, seconds, ports, models = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    json.loads(sys.argv[4]), json.loads(sys.argv[5])
rng = random.Random(worker)
deadline = time.monotonic() + seconds
sets, codes, n = [], {}, 0
while time.monotonic() < deadline:
    n += 1
    kind = rng.choice(["set", "set", "load", "unload", "sync", "status", "reconcile"])
    if kind == "set":
        args = ["set", rng.choice(models), f"request_params.p{worker}_{n}={n}", "--no-sync"]
    elif kind == "load":
        args = ["load", rng.choice(models), rng.choice(["auto", str(rng.choice(ports))])]
    elif kind == "unload":
        args = ["unload", str(rng.choice(ports))]
    elif kind == "sync":
        args = ["sync-gateway"]
    elif kind == "status":
        args = ["status", "--json"]
    else:
        args = ["reconcile"]
    result = subprocess.run([sys.executable, mlxctl, *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if "Traceback" in result.stderr:
        print("TRACEBACK", args, result.stderr, file=sys.stderr)
        sys.exit(2)
    codes[kind] = codes.get(kind, 0) + (result.returncode != 0)
    if kind == "set":
        if result.returncode != 0:
            print("SET FAILED", result.stderr, file=sys.stderr)
            sys.exit(3)
        sets.append((args[1], f"p{worker}_{n}", n))
print(json.dumps({"sets": sets, "ops": n, "failures": codes}))
"""


@pytest.mark.slow
def test_eight_processes_lose_no_update(env: Env) -> None:
    env.set(MLX_STOP_TIMEOUT="1")
    models = [f"mlx-busy-{i}" for i in range(3)]
    for model_id in models:
        env.add_model(model_id, None, knobs={"start_delay": 0.05})
    ports = env.team[:3] + env.exp[:3]
    before = env.registry().get("generation", 0)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(MLXCTL),
                str(w),
                str(SECONDS),
                json.dumps(ports),
                json.dumps(models),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env.environ(),
        )
        for w in range(WORKERS)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=SECONDS + 240)
        assert worker.returncode == 0, err
        reports.append(json.loads(out))
    data = env.registry()
    assert mlxctl.schema_errors(data) == []
    ranges = (range(env.team[0], env.team[-1] + 1), range(env.exp[0], env.exp[-1] + 1))
    assert mlxctl.invariant_violations(data["models"], ranges) == set()
    expected = [(m, k, v) for r in reports for m, k, v in r["sets"]]
    for model_id, key, value in expected:
        assert data["models"][model_id]["request_params"][key] == value
    assert data["generation"] >= before + len(expected)
    ops = sum(r["ops"] for r in reports)
    print(f"\n{WORKERS} processes, {SECONDS}s: {ops} commands, {len(expected)} sets, none lost")
    result = env.run("unload-all")
    assert result.returncode == 0, result.stderr
    assert standin_pids(env) == []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_soak_load_unload_cycles(env: Env) -> None:
    env.add_model("mlx-soak", None, knobs={"start_delay": 0.02})
    port = env.exp[0]
    fds_before = open_fds()
    started = time.monotonic()
    for _ in range(CYCLES):
        assert mlxctl.main(["load", "mlx-soak", str(port), "--no-sync"]) == 0
        assert mlxctl.main(["unload", str(port), "--no-sync"]) == 0
    took = time.monotonic() - started
    fds_after = open_fds()
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
    assert standin_pids(env) == []
    assert mlxctl._children == {}  # every server this process spawned was reaped
    assert zombie_children() == []
    log = env.state / "logs" / f"{port}.log"
    assert log.read_text().count("=== mlxctl start mlx-soak") == CYCLES
    print(
        f"\n{CYCLES} load/unload cycles in {took:.0f}s: fds {fds_before}->{fds_after}, "
        f"no leaked process or zombie, log {log.stat().st_size} bytes"
    )


def test_log_rotation_past_50_mb(env: Env) -> None:
    env.add_model("mlx-rot", None)
    port = env.exp[1]
    logs = env.state / "logs"
    logs.mkdir(parents=True)
    for name in (f"{port}.log", f"{port}.app.log"):
        with open(logs / name, "wb") as handle:
            handle.truncate(51 * 1024 * 1024)
    assert mlxctl.main(["load", "mlx-rot", str(port), "--no-sync"]) == 0
    assert (logs / f"{port}.log.1").stat().st_size == 51 * 1024 * 1024
    assert (logs / f"{port}.app.log.1").stat().st_size == 51 * 1024 * 1024
    assert (logs / f"{port}.log").stat().st_size < 1024 * 1024
    assert mlxctl.main(["unload", str(port), "--no-sync"]) == 0
    # a small log is never rotated
    assert mlxctl.main(["load", "mlx-rot", str(port), "--no-sync"]) == 0
    assert (logs / f"{port}.log").read_text().count("=== mlxctl start") == 2
