"""Route benchmarks (SPEC §17): what the route of a running `mlxctl watch` adds to a request, next
to the same request straight to the lane (a stand-in server on loopback); 64 streams at once; and
a move in route mode: requests cut, LiteLLM restarts, and how long the moved handle answers 503.

Every request opens its own connection (the route closes each one), so the direct path does too;
the two paths are measured interleaved, so drift hits both alike. Figures are printed, never
asserted.

    .venv/bin/python tests/bench/bench_route.py [--requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from run import MLXCTL, PY, ROOT, report, world

sys.path.insert(0, str(ROOT / "tests"))
from fixtures.ports import port_block
from fixtures.standin_server import write_standin_model

LITELLM_VENV = Path(os.environ.get("MLXCTL_TEST_LITELLM_VENV", ROOT / ".venv-litellm"))
STANDIN = ROOT / "tests" / "fixtures" / "standin_server.py"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
REQUESTS = 1000  # per path, small non-streamed requests
CONCURRENT = 64


# -- the world: a watch serving the route, stand-in lanes ------------------------------------------


def mlxctl(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [PY, str(MLXCTL), "--json", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"bench_route: mlxctl {' '.join(args)}: {result.stderr.strip()}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    data = json.loads(lines[-1]) if lines else {}
    assert isinstance(data, dict)
    return data


def route_world(tmp: Path) -> tuple[dict[str, str], list[int], list[int], int]:
    """(environment, team ports, experimental ports, route port) of a route-mode Studio."""
    env = world(tmp)
    team_from, team_to = (int(p) for p in env["MLX_TEAM_PORTS"].split("-"))
    exp_from, exp_to = (int(p) for p in env["MLX_EXPERIMENTAL_PORTS"].split("-"))
    team, exp = list(range(team_from, team_to + 1)), list(range(exp_from, exp_to + 1))
    while (route_port := port_block(1, 30000)) in team + exp:
        pass
    env.update(
        MLX_LAUNCH_CMD=f"{PY} {STANDIN} launch",
        MLX_ROUTE_PORT=str(route_port),
        MLX_GATEWAY_ROUTE="studio",
        MLX_ROUTE_VIA_OPTILLM="0",
        MLX_WATCH_INTERVAL="1",
        MLX_START_TIMEOUT="60",
        MLX_STOP_TIMEOUT="3",
        XDG_CACHE_HOME=str(tmp / "cache"),
    )
    models = {}
    for model_id in ("mlx-bench", "mlx-mover"):
        path = write_standin_model(tmp / "models" / model_id, chunk_interval=0.05)
        models[model_id] = {
            "repo_id": f"bench/{model_id}",
            "model_id": model_id,
            "cache_path": str(path),
            "source_path": str(path),
            "format": "mlx",
            "port": None,
        }
    registry = {"version": 1, "generation": 1, "models": models}
    (tmp / "hf" / "hub" / "registry.json").write_text(json.dumps(registry, indent=2))
    return env, team, exp, route_port


@contextlib.contextmanager
def watching(env: dict[str, str], tmp: Path, route_port: int) -> Iterator[subprocess.Popen[bytes]]:
    with open(tmp / "watch.log", "wb") as log:
        proc = subprocess.Popen(
            [PY, str(MLXCTL), "watch"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while call(route_port, "GET", "/health")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_route: no route:\n{(tmp / 'watch.log').read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        subprocess.run(
            [PY, str(MLXCTL), "unload-all", "--drain-timeout", "0", "--no-sync"],
            env=env,
            check=False,
            capture_output=True,
        )
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in KiB, threads) of a process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


# -- requests ------------------------------------------------------------------------------------


def call(
    port: int, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def small_request(port: int, model: str = "mlx-bench") -> float:
    started = time.perf_counter()
    status, _ = call(port, "POST", CHAT, {"model": model, "messages": MESSAGES})
    if status != 200:
        raise SystemExit(f"bench_route: a small request to {port} answered {status}")
    return time.perf_counter() - started


def stream(
    port: int, model: str, tokens: int, interval: float
) -> tuple[int, float | None, int, bool]:
    """(status, seconds to the first body byte, content events, [DONE] seen)."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": tokens,
        "standin_interval": interval,
        "messages": MESSAGES,
    }
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    first: float | None = None
    received = b""
    try:
        conn.request("POST", CHAT, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        while data := response.read1(65536):
            if first is None:
                first = time.perf_counter() - started
            received += data
        status = response.status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        conn.close()
    return status, first, received.count(b'"content"'), b"data: [DONE]" in received


def first_byte(port: int) -> float:
    status, first, _, _ = stream(port, "mlx-bench", 3, 0.001)
    if status != 200 or first is None:
        raise SystemExit(f"bench_route: a stream from {port} answered {status}")
    return first


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def compare(
    name: str, measure: Callable[[int], float], direct_port: int, route_port: int, count: int
) -> tuple[float, float]:
    """Interleaved direct and routed samples; reports and returns the added (p50, p99)."""
    for _ in range(max(1, count // 20)):  # warm-up
        measure(direct_port)
        measure(route_port)
    direct, routed = [], []
    for _ in range(count):
        direct.append(measure(direct_port))
        routed.append(measure(route_port))
    d50, r50 = statistics.median(direct), statistics.median(routed)
    d99, r99 = percentile(direct, 0.99), percentile(routed, 0.99)
    report(f"{name}: direct p50 / p99 ({count} each)", f"{d50 * 1e3:.2f} / {d99 * 1e3:.2f} ms", "-")
    report(f"{name}: route p50 / p99", f"{r50 * 1e3:.2f} / {r99 * 1e3:.2f} ms", "-")
    return r50 - d50, r99 - d99


# -- the benchmarks --------------------------------------------------------------------------------


def bench_commit_to_route(route_port: int) -> None:
    """From `load` returning (the assignment committed) to the route forwarding the model."""
    started = time.perf_counter()
    refused = 0
    while call(route_port, "POST", CHAT, {"model": "mlx-bench", "messages": MESSAGES})[0] != 200:
        refused += 1
        if time.perf_counter() - started > 60:
            raise SystemExit("bench_route: the route never forwarded mlx-bench")
        time.sleep(0.01)
    report(
        "load committed -> the route forwards it (watch interval 1 s)",
        f"{(time.perf_counter() - started) * 1e3:.0f} ms ({refused} answers 503 first)",
        "at once (before the next tick)",
    )


def bench_latency(direct_port: int, route_port: int, count: int) -> None:
    added50, added99 = compare("small request", small_request, direct_port, route_port, count)
    report(
        "small non-streamed request: route adds (p50, p99)",
        f"{added50 * 1e3:+.2f} ms, {added99 * 1e3:+.2f} ms",
        "p50 <= 1 ms",
    )
    added50, added99 = compare("stream", first_byte, direct_port, route_port, count // 2)
    report(
        "stream time to first byte: route adds (p50, p99)",
        f"{added50 * 1e3:+.2f} ms, {added99 * 1e3:+.2f} ms",
        "p50 <= 2 ms",
    )


def bench_concurrent(route_port: int, watch_pid: int) -> None:
    before = proc_status(watch_pid)
    results: list[tuple[int, float | None, int, bool]] = []
    lock = threading.Lock()
    peak = [before]
    done = threading.Event()

    def one() -> None:
        outcome = stream(route_port, "mlx-bench", 20, 0.05)
        with lock:
            results.append(outcome)

    def sample() -> None:
        while not done.wait(0.05):
            with contextlib.suppress(OSError):
                now = proc_status(watch_pid)
                peak[0] = (max(peak[0][0], now[0]), max(peak[0][1], now[1]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    time.sleep(2)  # the connection threads end after the last byte
    done.set()
    sampler.join()
    after = proc_status(watch_pid)
    errors = Counter(
        f"{status}/{events} events{'' if end else '/no DONE'}"
        for status, _, events, end in results
        if status != 200 or events < 20 or not end
    )
    report(
        f"{CONCURRENT} concurrent streams through the route (20 events, 1 s each)",
        f"{sum(errors.values())} errors{' ' + str(dict(errors)) if errors else ''}, "
        f"all done in {took:.1f} s",
        "0 errors",
    )
    report(
        "watch RSS before / peak / after",
        f"{before[0] / 1024:.1f} / {peak[0][0] / 1024:.1f} / {after[0] / 1024:.1f} MiB",
        "after ~ before",
    )
    report(
        "watch threads before / peak / after",
        f"{before[1]} / {peak[0][1]} / {after[1]}",
        "after == before",
    )


@contextlib.contextmanager
def maybe_litellm(tmp: Path) -> Iterator[Any]:
    """The real LiteLLM from the files the route-mode sync wrote, when its venv exists."""
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        yield None
        return
    from fixtures.litellm_proxy import litellm

    config = tmp / "gw/layer-gateway/litellm-orch/config"
    with litellm(LITELLM_VENV, config / "router.yaml", config / "env.local", tmp / "ll.log") as p:
        yield p


def litellm_pid(proxy: Any) -> int | None:
    port = proxy.url.rsplit(":", 1)[1]
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            if any(b"litellm" in word for word in argv[:2]) and port.encode() in argv:
                return int(name)
    return None


def bench_move(env: dict[str, str], tmp: Path, exp: list[int], route_port: int) -> None:
    """assign-team moves mlx-mover from an experimental to a team port while clients stream to
    it and a poller asks every 20 ms."""
    mlxctl(env, "load", "mlx-mover", str(exp[1]))
    with maybe_litellm(tmp) as proxy:
        pid = litellm_pid(proxy) if proxy is not None else None
        stop = threading.Event()
        polls: list[tuple[float, int]] = []
        streams: list[tuple[int, float | None, int, bool]] = []
        lock = threading.Lock()

        def poller() -> None:
            while not stop.is_set():
                status, _ = call(route_port, "POST", CHAT, {"model": "mlx-mover"}, timeout=10)
                polls.append((time.perf_counter(), status))
                time.sleep(0.02)

        def streamer() -> None:
            while not stop.is_set():
                outcome = stream(route_port, "mlx-mover", 10, 0.1)
                with lock:
                    streams.append(outcome)
                if outcome[0] != 200:
                    time.sleep(0.1)

        workers = [threading.Thread(target=poller)] + [
            threading.Thread(target=streamer) for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        time.sleep(2)
        started = time.perf_counter()
        result = mlxctl(env, "assign-team", "--drain-timeout", "10")
        command = time.perf_counter() - started
        time.sleep(3)
        stop.set()
        for worker in workers:
            worker.join()
        answered_after = None
        if proxy is not None:
            port = int(proxy.url.rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = {"model": "mlx-mover", "messages": MESSAGES}
            headers = {"Authorization": f"Bearer {proxy.key}", "Content-Type": "application/json"}
            conn.request("POST", CHAT, json.dumps(body).encode(), headers)
            answered_after = conn.getresponse().status
            conn.close()
        same_pid = proxy is None or litellm_pid(proxy) == pid

    refused = [t for t, status in polls if status == 503]
    window = None
    if refused:
        later = [t for t, status in polls if status == 200 and t > refused[-1]]
        window = (later[0] if later else refused[-1]) - refused[0]
    cut = sum(1 for status, _, events, end in streams if status == 200 and not (end and events))
    other = sum(1 for _, status in polls if status not in (200, 503))
    verdict = (result.get("sync") or {}).get("restart")
    report(
        "move (assign-team): streams cut",
        f"{cut} of {sum(1 for s in streams if s[0] == 200)} streamed",
        "0 (drain)",
    )
    report(
        "move: LiteLLM restarts the sync asks for",
        f"{1 if verdict == 'required' else 0} (restart: {verdict})",
        "0",
    )
    if proxy is not None:
        report(
            "move: LiteLLM, never restarted, answers the moved handle",
            f"{answered_after} (same pid: {'yes' if same_pid else 'NO'})",
            "200, same pid",
        )
    report(
        "move: the moved handle answers 503 (first to last 503, poll 20 ms)",
        f"{window:.2f} s ({len(refused)} polls; command took {command:.1f} s)"
        if window is not None
        else f"never (command took {command:.1f} s)",
        "withheld until the new lane commits",
    )
    report("move: other answers to the poller (not 200 or 503)", f"{other}", "0")


def run(requests: int = REQUESTS) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        env, _team, exp, route_port = route_world(tmp)
        with watching(env, tmp, route_port) as watch:
            mlxctl(env, "load", "mlx-bench", str(exp[0]))
            bench_commit_to_route(route_port)
            bench_latency(exp[0], route_port, requests)
            bench_concurrent(route_port, watch.pid)
            mlxctl(env, "unload", str(exp[0]), "--drain-timeout", "0")  # only mlx-mover moves
            bench_move(env, tmp, exp, route_port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    run(parser.parse_args(argv).requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
