"""Memory, metrics and doctor benchmarks (SPEC §15-§16, issues 13-14): a memory refusal against a
`status` of the same world, the weights x 1.1 + 1 GiB estimate against the footprint the real
server measures, `metrics` over 40 lanes against `status`, and `doctor` across two hosts over the
loopback sshd (wall time and SSH round trips). Figures are printed, never asserted."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import MLXCTL, PY, ROOT, median_time, mlxctl_runner, report, world

sys.path.insert(0, str(ROOT / "tests"))
from fixtures.sshd import Sshd, available, read_calls, write_remote_wrapper, write_ssh_counter
from fixtures.standin_server import write_standin_model

MLX_SERVERS = {
    "1.6.3": Path(os.environ.get("MLXCTL_TEST_MLX_VENV", ROOT / ".venv-mlx")),
    "1.8.1": Path(os.environ.get("MLXCTL_TEST_MLX18_VENV", ROOT / ".venv-mlx18")),
}
GIB = 1 << 30


def mlxctl(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> str:
    result = subprocess.run(
        [PY, str(MLXCTL), *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    if result.returncode not in ok:
        raise SystemExit(f"bench_memory_metrics: mlxctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def write_registry(tmp: Path, models: dict[str, dict[str, object]]) -> None:
    entries = {
        model_id: {
            "repo_id": f"bench/{model_id}",
            "model_id": model_id,
            "cache_path": str(fields.pop("path")),
            "format": "mlx",
            "port": None,
            **fields,
        }
        for model_id, fields in models.items()
    }
    registry = {"version": 1, "generation": 1, "models": entries}
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry, indent=2))


def ports_of(env: dict[str, str]) -> list[int]:
    team = [int(x) for x in env["MLX_TEAM_PORTS"].split("-")]
    exp = [int(x) for x in env["MLX_EXPERIMENTAL_PORTS"].split("-")]
    return [*range(team[0], team[1] + 1), *range(exp[0], exp[1] + 1)]


def bench_refusal(tmp: Path) -> None:
    """A refusal decides before anything is reserved: one observation, like status."""
    env = world(tmp)
    env["MLX_ROUTE_PORT"] = "off"
    ports = ports_of(env)
    models: dict[str, dict[str, object]] = {
        f"mlx-lane-{n}": {
            "path": write_standin_model(tmp / "models" / f"lane-{n}", start_delay=0.05),
            "port": port,
        }
        for n, port in enumerate(ports[:5])
    }
    models["mlx-huge"] = {
        "path": write_standin_model(tmp / "models" / "huge"),
        "stats": {"footprint_bytes": 1 << 50},  # 1 PiB: never fits
    }
    write_registry(tmp, models)
    mlxctl(env, "up", "--no-sync")
    try:
        mlxctl(env, "load", "mlx-huge", "auto", "--no-sync", ok=(1,))  # the launcher cache is warm
        refusals, statuses = [], []
        for _ in range(9):  # interleaved: both see the same machine
            refusals.append(median_time(mlxctl_runner(env, "load", "mlx-huge", "auto"), 1))
            statuses.append(median_time(mlxctl_runner(env, "status"), 1))
        refusal, status = statistics.median(refusals), statistics.median(statuses)
        report(
            "memory refusal vs status (40 ports, 5 serving)",
            f"{refusal * 1000:.0f} ms vs {status * 1000:.0f} ms ({refusal / status:.2f}x)",
            "<= status",
        )
    finally:
        mlxctl(env, "unload-all", "--no-sync")


def bench_estimate_error(tmp: Path) -> None:
    """need = weights x 1.1 + 1 GiB for a model never loaded, against what the load measures."""
    python = MLX_SERVERS["1.6.3"] / "bin" / "python"
    if not python.exists():
        report("estimate vs measured footprint (real server)", "skipped (no server)", "-")
        return
    from fixtures.tiny_model import build

    model = build("mlx", tmp / "tiny", str(python))
    weights = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    for version, venv in MLX_SERVERS.items():
        server = venv / "bin" / "mlx-openai-server"
        if not server.exists():
            report(f"estimate vs measured footprint ({version})", "skipped (no server)", "-")
            continue
        env = world(tmp / version)
        env.update(MLX_LAUNCH_CMD=f"{server} launch", MLX_START_TIMEOUT="300", MLX_ROUTE_PORT="off")
        write_registry(tmp / version, {"mlx-tiny": {"path": model}})
        estimate = json.loads(
            mlxctl(env, "--json", "load", "mlx-tiny", "auto", "--estimate").splitlines()[0]
        )
        mlxctl(env, "load", "mlx-tiny", "auto", "--no-sync")
        try:
            registry = json.loads((tmp / version / "hf/hub/registry.json").read_text())
            stats = registry["models"]["mlx-tiny"]["stats"]
        finally:
            mlxctl(env, "unload-all", "--no-sync")
        measured = int(stats["footprint_bytes"])
        need = int(estimate["need_bytes"])
        report(
            f"estimate vs measured footprint, tiny model ({version})",
            f"{need / 2**20:.0f} MiB vs {measured / 2**20:.0f} MiB ({(need - measured) / measured:+.0%})",
            f"- (weights {weights / 2**20:.1f} MiB; load {stats['load_seconds']} s)",
        )


def bench_metrics_vs_status(tmp: Path) -> None:
    env = world(tmp)
    env["MLX_ROUTE_PORT"] = "off"
    ports = ports_of(env)
    write_registry(
        tmp,
        {
            f"mlx-bench-{n:02d}": {
                "path": write_standin_model(tmp / "models" / f"m{n:02d}", start_delay=0.05),
                "port": port,
            }
            for n, port in enumerate(ports)
        },
    )
    mlxctl(env, "up", "--no-sync")
    try:
        text = mlxctl(env, "metrics")
        serving = text.count('state="serving"')
        metrics, statuses = [], []
        for _ in range(9):
            metrics.append(median_time(mlxctl_runner(env, "metrics"), 1))
            statuses.append(median_time(mlxctl_runner(env, "status"), 1))
        cost, status = statistics.median(metrics), statistics.median(statuses)
        report(
            f"metrics vs status, 40 lanes ({serving} serving)",
            f"{cost * 1000:.0f} ms vs {status * 1000:.0f} ms ({(cost - status) * 1000:+.0f} ms)",
            "<= status + 20 ms",
        )
    finally:
        mlxctl(env, "unload-all", "--no-sync")


def bench_doctor_two_hosts(tmp: Path) -> None:
    if not available():
        report("doctor across two hosts (loopback sshd)", "skipped (no sshd)", "-")
        return
    with Sshd(tmp / "sshd") as sshd:
        calls = tmp / "ssh-calls.jsonl"
        common = {
            "MLXCTL_SSH": str(write_ssh_counter(tmp / "counted-ssh", calls)),
            "MLXCTL_SSH_OPTIONS": f"-F {sshd.ssh_config}",
            "MLXCTL_SSH_CONNECT_TIMEOUT": "3",
            "MLXCTL_SERVICE_DIR": str(tmp / "services"),
            "MLX_ROUTE_PORT": "off",
        }
        studio = {**world(tmp), **common, "GATEWAY_HOST": "mini"}
        studio.pop("GATEWAY_ROOT")
        gateway = {
            **os.environ,
            **common,
            "HOME": str(tmp / "mini-home"),
            "HF_HOME": str(tmp / "mini-hf"),
            "MLXCTL_ROLE": "gateway",
            "GATEWAY_ROOT": str(tmp / "mini"),
            "MLX_STUDIO_HOST": "studio",
            "MLX_TEAM_PORTS": studio["MLX_TEAM_PORTS"],
            "MLX_EXPERIMENTAL_PORTS": studio["MLX_EXPERIMENTAL_PORTS"],
        }
        gateway.pop("MLXCTL_CONFIG", None)
        studio_wrapper, gateway_wrapper = tmp / "studio-mlxctl", tmp / "gateway-mlxctl"
        studio["GATEWAY_MLXCTL"] = str(gateway_wrapper)
        gateway["MLX_STUDIO_MLXCTL"] = str(studio_wrapper)
        keep = ("PATH", "HOME", "HF_HOME", "XDG_CONFIG_HOME", "LANG")
        far = {k: v for k, v in {**studio}.items() if k.startswith(("MLX", "GATEWAY")) or k in keep}
        write_remote_wrapper(studio_wrapper, PY, MLXCTL, far)
        far = {k: v for k, v in gateway.items() if k.startswith(("MLX", "GATEWAY")) or k in keep}
        write_remote_wrapper(gateway_wrapper, PY, MLXCTL, far)
        write_registry(tmp, {"mlx-a": {"path": write_standin_model(tmp / "models" / "a")}})
        mlxctl(studio, "sync-gateway")
        for side, env in (("studio", studio), ("gateway", gateway)):
            mlxctl(env, "doctor", ok=(0, 1))  # the launcher cache is warm
            calls.unlink(missing_ok=True)
            runs = 5
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                mlxctl(env, "doctor", "--json", ok=(0, 1))
                times.append(time.perf_counter() - started)
            made = read_calls(calls)
            there = sum(1 for c in made if "doctor" in c)
            back = sum(1 for c in made if c[-1] == "--version")
            local = median_time(mlxctl_runner(env, "--local", "doctor", "--json"), runs)
            calls.unlink(missing_ok=True)
            report(
                f"doctor from the {side}, both hosts over the loopback sshd",
                f"median {statistics.median(times) * 1000:.0f} ms; ssh per run: "
                f"{there / runs:g} there, {back / runs:g} back ({len(made) / runs:g} in all)",
                "one round trip each way",
            )
            report(
                f"... the {side}'s own checks alone (--local: one ssh out)",
                f"median {local * 1000:.0f} ms",
                "-",
            )


def run() -> None:
    for bench in (
        bench_refusal,
        bench_estimate_error,
        bench_metrics_vs_status,
        bench_doctor_two_hosts,
    ):
        with tempfile.TemporaryDirectory() as name:
            bench(Path(name))


if __name__ == "__main__":
    run()
