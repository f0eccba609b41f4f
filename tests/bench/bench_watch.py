"""watch benchmarks (SPEC §14): how fast a killed lane serves again, how soon a degraded 1.8 lane
is noticed, and what an idle tick costs over 40 stand-in lanes (CPU of the watch process, and
that it sends nothing but its probes). Figures are printed, never asserted."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from run import MLXCTL, PY, ROOT, report, world

sys.path.insert(0, str(ROOT / "tests"))
from fixtures.standin_server import write_standin_model

STANDIN = ROOT / "tests" / "fixtures" / "standin_server.py"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REQUEST_RE = re.compile(r'"(GET|POST) (\S+) HTTP')


def answers(port: int) -> bool:
    try:
        with OPENER.open(f"http://127.0.0.1:{port}/v1/models", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(predicate: object, timeout: float, poll: float = 0.005) -> float:
    started = time.perf_counter()
    while not predicate():  # type: ignore[operator]
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"bench_watch: not reached in {timeout}s: {predicate}")
        time.sleep(poll)
    return time.perf_counter() - started


def mlxctl(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [PY, str(MLXCTL), *args],
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"bench_watch: mlxctl {' '.join(args)}: {result.stderr.strip()}")


def write_registry(tmp: Path, lanes: dict[str, tuple[Path, int | None]]) -> None:
    models = {
        model_id: {
            "repo_id": f"bench/{model_id}",
            "model_id": model_id,
            "cache_path": str(path),
            "source_path": str(path),
            "format": "mlx",
            "port": port,
        }
        for model_id, (path, port) in lanes.items()
    }
    registry = {"version": 1, "generation": 1, "models": models}
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry, indent=2))


def state_dir(tmp: Path) -> Path:
    return tmp / "hf" / "hub" / ".mlxctl"


def record(tmp: Path, port: int) -> dict[str, object]:
    data = json.loads((state_dir(tmp) / "run" / f"{port}.json").read_text())
    assert isinstance(data, dict)
    return data


def watch_history(tmp: Path) -> dict[str, dict[str, object]]:
    path = state_dir(tmp) / "watch.json"
    if not path.exists():
        return {}
    lanes = json.loads(path.read_text()).get("lanes", {})
    assert isinstance(lanes, dict)
    return lanes


def start_watch(env: dict[str, str], tmp: Path) -> subprocess.Popen[bytes]:
    with open(tmp / "watch.log", "wb") as log:
        return subprocess.Popen(
            [PY, str(MLXCTL), "watch"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def stop_watch(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def group_members(pgid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def standin_load_time(tmp: Path, model: Path, port: int, personality: str = "1.6.3") -> float:
    """The stand-in started directly until /v1/models answers: its own load time."""
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        argv = [PY, str(STANDIN), "--as", personality, "launch", "--model-path", str(model)]
        proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=tmp,
        )
        wait_for(lambda: answers(port), 30)
        samples.append(time.perf_counter() - started)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not answers(port), 10)
    return statistics.median(samples)


def watch_world(tmp: Path) -> dict[str, str]:
    env = world(tmp)
    env["MLX_ROUTE_PORT"] = "off"  # 8099 is shared by whatever else runs here
    return env


def bench_recovery(tmp: Path) -> None:
    interval = 1.0
    env = watch_world(tmp)
    env.update(
        MLX_WATCH_INTERVAL=str(interval),
        MLX_WATCH_RESET_AFTER="1",
        MLX_WATCH_CRASH_LOOP="50/900",
        MLX_STOP_TIMEOUT="3",
    )
    port = int(env["MLX_TEAM_PORTS"].split("-")[0])
    model = write_standin_model(tmp / "models" / "mlx-bench-a")
    own = standin_load_time(tmp, model, port)
    write_registry(tmp, {"mlx-bench-a": (model, None)})
    mlxctl(env, "load", "mlx-bench-a", str(port), "--no-sync")
    watch = start_watch(env, tmp)
    key = f"{port}:mlx-bench-a"
    recoveries = []
    try:
        for _ in range(5):
            wait_for(lambda: watch_history(tmp).get(key, {}).get("up"), 30)
            time.sleep(1.3)  # served past MLX_WATCH_RESET_AFTER: the restart is immediate
            pgid = int(str(record(tmp, port)["pgid"]))
            os.killpg(pgid, signal.SIGKILL)
            killed = time.perf_counter()
            wait_for(lambda: not answers(port), 10, poll=0.001)
            wait_for(lambda: answers(port), 60, poll=0.005)
            recoveries.append(time.perf_counter() - killed)
    finally:
        stop_watch(watch)
        mlxctl(env, "unload-all", "--no-sync")
    net = [r - own for r in recoveries]
    report(
        f"watch: kill -9 → serving again (interval {interval:g} s), minus load",
        f"median {statistics.median(net):.2f} s, max {max(net):.2f} s (load {own:.2f} s)",
        f"<= interval + 1 s = {interval + 1:.1f} s",
    )


def bench_degraded(tmp: Path) -> None:
    interval = 1.0
    env = watch_world(tmp)
    env.update(
        MLX_WATCH_INTERVAL=str(interval),
        MLX_WATCH_BACKOFF="0.2-1",
        MLX_WATCH_RESET_AFTER="1",
        MLX_WATCH_CRASH_LOOP="50/900",
        MLX_STOP_TIMEOUT="3",
        MLX_LAUNCH_CMD=f"{PY} {STANDIN} --as 1.8.1 launch",
    )
    port = int(env["MLX_EXPERIMENTAL_PORTS"].split("-")[0])
    model = write_standin_model(tmp / "models" / "mlx-bench-eight")
    write_registry(tmp, {"mlx-bench-eight": (model, None)})
    mlxctl(env, "load", "mlx-bench-eight", str(port), "--no-sync")
    watch = start_watch(env, tmp)
    key = f"{port}:mlx-bench-eight"
    noticed, stopped = [], []
    try:
        for _ in range(5):
            wait_for(lambda: watch_history(tmp).get(key, {}).get("up"), 60)
            time.sleep(1.3)  # past MLX_WATCH_RESET_AFTER: restarted at once, no backoff
            before = watch_history(tmp).get(key, {}).get("last_failure")
            pgid = int(str(record(tmp, port)["pgid"]))
            [child] = [p for p in group_members(pgid) if "multiprocessing.spawn" in cmdline(p)]
            os.kill(child, signal.SIGKILL)
            killed = time.perf_counter()
            # noticed: the failure is booked in watch.json; then the degraded group is stopped
            wait_for(lambda b=before: watch_history(tmp).get(key, {}).get("last_failure") != b, 30)
            noticed.append((time.perf_counter() - killed) / interval)
            wait_for(lambda pgid=pgid: not group_members(pgid), 30)
            stopped.append((time.perf_counter() - killed) / interval)
    finally:
        stop_watch(watch)
        mlxctl(env, "unload-all", "--no-sync")
    report(
        "watch: 1.8 model child killed → degraded noticed",
        f"median {statistics.median(noticed):.2f} ticks, max {max(noticed):.2f} ticks",
        "<= 2 ticks",
    )
    report(
        "watch: ... → the degraded group stopped for the restart",
        f"median {statistics.median(stopped):.2f} ticks, max {max(stopped):.2f} ticks",
        "-",
    )


def request_counts(tmp: Path, ports: list[int], offsets: dict[int, int]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for port in ports:
        log = state_dir(tmp) / "logs" / f"{port}.log"
        with open(log, "rb") as handle:
            handle.seek(offsets[port])
            text = handle.read().decode(errors="replace")
        counts.update(f"{m.group(1)} {m.group(2)}" for m in REQUEST_RE.finditer(text))
    return counts


def bench_idle_tick(tmp: Path) -> None:
    interval = 0.5
    env = watch_world(tmp)
    env.update(MLX_WATCH_INTERVAL=str(interval), MLX_STOP_TIMEOUT="3")
    team = env["MLX_TEAM_PORTS"].split("-")
    exp = env["MLX_EXPERIMENTAL_PORTS"].split("-")
    ports = [*range(int(team[0]), int(team[1]) + 1), *range(int(exp[0]), int(exp[1]) + 1)]
    lanes = {}
    for n, port in enumerate(ports):
        lanes[f"mlx-bench-{n:02d}"] = (
            write_standin_model(tmp / "models" / f"m{n:02d}", start_delay=0.05),
            port,
        )
    write_registry(tmp, lanes)
    started = time.perf_counter()
    mlxctl(env, "up", "--no-sync")
    took = time.perf_counter() - started
    watch = start_watch(env, tmp)
    try:
        wait_for(lambda: sum(1 for v in watch_history(tmp).values() if v.get("up")) == 40, 60)
        time.sleep(2 * interval)  # past the first ticks (imports, the first observation)
        offsets = {p: (state_dir(tmp) / "logs" / f"{p}.log").stat().st_size for p in ports}
        cpu0, wall0 = cpu_seconds(watch.pid), time.perf_counter()
        time.sleep(40 * interval)
        cpu1, wall1 = cpu_seconds(watch.pid), time.perf_counter()
        counts = request_counts(tmp, ports, offsets)
        generation = 0
        for port in ports:
            with OPENER.open(f"http://127.0.0.1:{port}/standin/stats", timeout=5) as response:
                generation += int(json.loads(response.read())["requests"])
    finally:
        stop_watch(watch)
        mlxctl(env, "unload-all", "--no-sync")
    ticks = counts["GET /v1/queue/stats"] / len(ports)  # one queue-stats request per lane a tick
    per_tick = (cpu1 - cpu0) / ticks if ticks else float("nan")
    others = {k: v for k, v in counts.items() if k not in ("GET /v1/models", "GET /v1/queue/stats")}
    report("up: 40 stand-in lanes", f"{took:.1f} s", "-")
    report(
        f"watch idle tick, 40 serving lanes ({ticks:.0f} ticks in {wall1 - wall0:.0f} s)",
        f"{per_tick * 1000:.1f} ms CPU per tick",
        "<= 50 ms",
    )
    per_lane = {k: round(v / len(ports) / ticks, 2) for k, v in counts.items()} if ticks else {}
    report(
        "watch idle tick: requests per lane per tick",
        f"{per_lane}; other {sum(others.values())}, generation {generation}",
        "probes only (0 other)",
    )


def run() -> None:
    for bench in (bench_recovery, bench_degraded, bench_idle_tick):
        with tempfile.TemporaryDirectory() as name:
            bench(Path(name))


if __name__ == "__main__":
    run()
