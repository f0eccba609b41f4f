"""Gateway and init benchmarks: sync of 40 models, an unchanged re-sync, ssh calls, a 500-repo init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from run import (
    MLXCTL,
    PY,
    ROOT,
    median_time,
    mlxctl_runner,
    registry_of,
    report,
    stdlib_floor,
    world,
)


def bench_sync(tmp: Path) -> None:
    env = world(tmp)
    base = int(env["MLX_TEAM_PORTS"].split("-")[0])
    registry_of(tmp, 40, base)
    floor = median_time(stdlib_floor(), 7)
    router = tmp / "gw/layer-gateway/litellm-orch/config/router.yaml"

    def fresh_sync() -> None:
        for path in router.parent.glob("*"):
            path.unlink()
        subprocess.run(
            [PY, str(MLXCTL), "sync-gateway"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    router.parent.mkdir(parents=True, exist_ok=True)
    cost = median_time(fresh_sync, 7)
    report(
        "sync-gateway, 40 models, local files",
        f"floor + {(cost - floor) * 1000:.0f} ms",
        "<= floor + 100 ms",
    )
    mtimes = {p: p.stat().st_mtime_ns for p in router.parent.parent.rglob("*") if p.is_file()}
    again = median_time(mlxctl_runner(env, "sync-gateway"), 7)
    unchanged = mtimes == {
        p: p.stat().st_mtime_ns for p in router.parent.parent.rglob("*") if p.is_file()
    }
    report(
        "sync-gateway re-sync, nothing changed",
        f"floor + {(again - floor) * 1000:.0f} ms, "
        f"{'no file written' if unchanged else 'FILES WRITTEN'}",
        "writes nothing",
    )


def bench_ssh_sync(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.sshd import Sshd, available, read_calls, write_remote_wrapper, write_ssh_counter

    if not available():
        report("sync from the Studio over ssh", "skipped (no sshd)", "1 ssh call")
        return
    env = world(tmp)
    base = int(env["MLX_TEAM_PORTS"].split("-")[0])
    registry_of(tmp, 40, base)
    with Sshd(tmp / "sshd") as sshd:
        calls = tmp / "calls.jsonl"
        gateway = write_remote_wrapper(
            tmp / "gw-mlxctl",
            PY,
            MLXCTL,
            {
                "HOME": str(tmp / "mini"),
                "HF_HOME": str(tmp / "mini-hf"),
                "MLXCTL_ROLE": "gateway",
                "GATEWAY_ROOT": str(tmp / "mini-gw"),
            },
        )
        env.update(
            GATEWAY_HOST="mini",
            GATEWAY_MLXCTL=str(gateway),
            MLXCTL_SSH=str(write_ssh_counter(tmp / "ssh", calls)),
            MLXCTL_SSH_OPTIONS=f"-F {sshd.ssh_config}",
        )
        cost = median_time(mlxctl_runner(env, "sync-gateway"), 5)
        count = len(read_calls(calls)) / 5
    report(
        "sync from the Studio over the loopback sshd, 40 models",
        f"{count:.0f} ssh call(s) per sync, {cost * 1000:.0f} ms",
        "exactly 1 ssh call",
    )


def bench_init(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.hf_cache import make_cache

    env = world(tmp)
    make_cache(tmp / "hf" / "hub", 500, seed=1)
    registry = tmp / "hf" / "hub" / "registry.json"
    # the stdlib path: an interpreter without huggingface_hub (the system python3, else -I -S)
    bare = os.environ.get("MLXCTL_BENCH_BARE_PYTHON", "/usr/bin/python3")
    if not Path(bare).exists():
        bare = PY

    def init_with(python: str) -> None:
        registry.unlink(missing_ok=True)
        subprocess.run(
            [python, str(MLXCTL), "init"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    has_hub = (
        subprocess.run(
            [bare, "-c", "import huggingface_hub"], capture_output=True, check=False
        ).returncode
        == 0
    )
    floor_code = stdlib_floor()
    source = MLXCTL.read_text()
    modules = sorted(
        {line.split()[1] for line in source.splitlines() if line.startswith("import ")}
        | {"collections.abc", "typing"}
    )
    floor_cmd = f"import {', '.join(modules)}; compile(open({str(MLXCTL)!r}).read(), 'm', 'exec')"
    bare_floor = median_time(lambda: subprocess.run([bare, "-c", floor_cmd], check=True), 5)
    stdlib = median_time(lambda: init_with(bare), 5)
    label = "stdlib scan" if not has_hub else "stdlib scan UNAVAILABLE (hub importable)"
    report(
        f"init, 500-repo cache, {label}",
        f"floor + {(stdlib - bare_floor) * 1000:.0f} ms",
        "<= floor + 300 ms",
    )
    floor = median_time(floor_code, 5)
    via_hub = median_time(lambda: init_with(PY), 5)
    report(
        "init, 500-repo cache, huggingface_hub.scan_cache_dir",
        f"floor + {(via_hub - floor) * 1000:.0f} ms",
        "reported",
    )
    added = len(json.loads(registry.read_text())["models"])
    report("init, 500-repo cache, models registered", f"{added}", "-")


def run() -> None:
    for bench in (bench_sync, bench_ssh_sync, bench_init):
        with tempfile.TemporaryDirectory() as name:
            bench(Path(name))
