"""Seeing it (SPEC §16, issue 14): `metrics` in every lane state, its textfile and watch's
/metrics, a real Prometheus scraping it; `doctor`'s checks, each with its seeded fault, and doctor
across two hosts over the loopback sshd."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MLXCTL, STANDIN, Cli, Env, need
from fixtures.ports import port_block
from fixtures.sshd import Sshd, available, read_calls, write_remote_wrapper, write_ssh_counter
from helpers import (
    NO_PROXY,
    cmdline,
    connectable,
    process_group,
    read_record,
    standin_argv,
    status_rows,
    wait_until,
    write_script,
)
from prometheus_client.parser import text_string_to_metric_families

import mlxctl

GIB = 1 << 30
STATES = {
    "starting",
    "degraded",
    "serving",
    "mismatch",
    "unresponsive",
    "orphan",
    "occupied",
    "failed",
    "dead",
    "foreign",
}
LANE_FAMILIES = {  # family names as the parser gives them (counters lose _total)
    "mlxctl_lane_up": "gauge",
    "mlxctl_lane_state": "gauge",
    "mlxctl_lane_footprint_bytes": "gauge",
    "mlxctl_lane_uptime_seconds": "gauge",
    "mlxctl_lane_restarts": "counter",
    "mlxctl_lane_active_requests": "gauge",
    "mlxctl_lane_queued_requests": "gauge",
    "mlxctl_lane_completed_requests": "counter",
}
GLOBAL_FAMILIES = {
    "mlxctl_memory_budget_bytes": "gauge",
    "mlxctl_memory_used_bytes": "gauge",
    "mlxctl_gateway_pending": "gauge",
    "mlxctl_registry_models": "gauge",
}
SERVING_ONLY = {
    "mlxctl_lane_active_requests",
    "mlxctl_lane_queued_requests",
    "mlxctl_lane_completed_requests_total",
}


# == the world: stand-ins in every state ===========================================================


@pytest.fixture
def outside(env: Env) -> Iterator[contextlib.ExitStack]:
    """What a test starts besides mlxctl's servers (foreign stand-ins, sockets, HTTP servers,
    sleepers), stopped at teardown in reverse order."""
    with contextlib.ExitStack() as stack:
        yield stack


def foreign_standin(stack: contextlib.ExitStack, path: Path, port: int) -> None:
    """A stand-in mlxctl did not start, in its own session."""
    child = subprocess.Popen(
        standin_argv(path, port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, 9)
        child.wait(5)

    stack.callback(stop)
    wait_until(lambda: connectable(port))


def silent_socket(stack: contextlib.ExitStack, port: int) -> None:
    """A listener that accepts and never answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    stack.callback(sock.close)


def http_404(stack: contextlib.ExitStack, port: int) -> None:
    """An HTTP server that is not a model server: 404 to everything."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)


def sleeper(stack: contextlib.ExitStack) -> dict[str, Any]:
    """A live process to own a reservation (a load in progress elsewhere)."""
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    stack.callback(child.wait)
    stack.callback(child.kill)
    proc = mlxctl.read_proc(child.pid)
    assert proc is not None
    return {"pid": child.pid, "start_time": proc.start, "since": "2026-01-01T00:00:00Z"}


def load(env: Env, model: str, port: int) -> None:
    result = env.run("load", model, str(port), "--no-sync")
    assert result.returncode == 0, result.stderr


def edit_registry(env: Env, edit: Callable[[dict[str, Any]], None]) -> None:
    data = env.registry()
    edit(data["models"])
    env.registry_path.write_text(json.dumps(data, indent=2))


def kill_model_child(env: Env, port: int) -> None:
    """1.8's model process dies; the server answers /health on (SPEC §13: degraded)."""
    pgid = int(read_record(env, port)["pgid"])
    [child] = [pid for pid in process_group(pgid) if "multiprocessing.spawn" in cmdline(pid)]
    os.kill(child, 9)
    wait_until(lambda: child not in process_group(pgid))


def every_state(env: Env, stack: contextlib.ExitStack) -> dict[int, tuple[str, str]]:
    """One lane in each state of SPEC §13.1 (and an out-of-range assignment); returns
    port -> (state, model label) as metrics must show them."""
    t, e = env.team, env.exp
    far = e[-1] + 7
    expected: dict[int, tuple[str, str]] = {}
    env.add_model("mlx-serving")
    load(env, "mlx-serving", t[0])
    expected[t[0]] = ("serving", "mlx-serving")
    orphan = env.add_model("mlx-orphan")
    load(env, "mlx-orphan", t[1])
    expected[t[1]] = ("orphan", str(orphan))  # not assigned: its served id (1.6.3: the path)
    env.add_model("mlx-dead", t[2])
    expected[t[2]] = ("dead", "mlx-dead")
    stranger = env.model_dir("mlx-stranger")
    foreign_standin(stack, stranger, t[3])
    expected[t[3]] = ("foreign", str(stranger))
    env.add_model("mlx-occupied", t[4])
    http_404(stack, t[4])
    expected[t[4]] = ("occupied", "mlx-occupied")
    foreign_standin(stack, env.add_model("mlx-hang", t[5], knobs={"hang": True}), t[5])
    expected[t[5]] = ("unresponsive", "mlx-hang")
    mismatch = env.add_model("mlx-mismatch", t[6], knobs={"served_id": "/elsewhere"})
    foreign_standin(stack, mismatch, t[6])
    expected[t[6]] = ("mismatch", "mlx-mismatch")
    env.add_model("mlx-starting", t[7], reservation=sleeper(stack))
    expected[t[7]] = ("starting", "mlx-starting")
    env.add_model("mlx-failed", t[8])
    (env.state).mkdir(parents=True, exist_ok=True)
    history = {"version": 1, "lanes": {f"{t[8]}:mlx-failed": {"failed": "crash-loop"}}}
    (env.state / "watch.json").write_text(json.dumps(history))
    expected[t[8]] = ("failed", "mlx-failed")
    silent_socket(stack, t[9])
    expected[t[9]] = ("unresponsive", "")  # nobody's, says nothing: no model label to give
    launcher = env.vars["MLX_LAUNCH_CMD"]
    env.set(MLX_LAUNCH_CMD=f"{sys.executable} {STANDIN} --as 1.8.1 launch")
    env.add_model("mlx-degraded")
    load(env, "mlx-degraded", e[0])
    env.set(MLX_LAUNCH_CMD=launcher)
    kill_model_child(env, e[0])
    expected[e[0]] = ("degraded", "mlx-degraded")
    env.add_model("mlx-far", far)
    expected[far] = ("dead", "mlx-far")  # status says out-of-range (dead); metrics the state
    edit_registry(env, lambda models: models["mlx-orphan"].update(port=None))
    return expected


def families(text: str) -> dict[str, Any]:
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(parsed) == len(list(text_string_to_metric_families(text)))  # each family once
    return parsed


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in families(text).values() for s in f.samples]


def test_metrics_in_every_lane_state(env: Env, cli: Cli, outside: contextlib.ExitStack) -> None:
    expected = every_state(env, outside)
    result = env.run("--json", "status")
    assert result.returncode == 0, result.stderr
    rows = status_rows(result.stdout)
    far = env.exp[-1] + 7
    assert rows[far]["state"] == "out-of-range (dead)"
    assert {p: r["state"] for p, r in rows.items() if p in expected and p != far} == {
        p: s for p, (s, _) in expected.items() if p != far
    }
    env.state.joinpath("gateway.pending").write_text("2026-01-01T00:00:00Z\n")

    code, text, err = cli("metrics")
    assert code == 0, err
    assert text.endswith("\n")
    parsed = families(text)
    assert {n: f.type for n, f in parsed.items()} == {**LANE_FAMILIES, **GLOBAL_FAMILIES}
    for name, family in parsed.items():
        assert f"# HELP {name}" in text and family.documentation
    got = samples(text)
    # one series set per port that status lists, except free
    listed = {p for p, r in rows.items() if r["state"] != "free"}
    assert listed == set(expected)
    states = [
        (s[1]["port"], s[1]["model"], s[1]["state"]) for s in got if s[0] == "mlxctl_lane_state"
    ]
    assert sorted(states) == sorted((str(p), m, s) for p, (s, m) in expected.items())
    assert all(s[2] == 1 for s in got if s[0] == "mlxctl_lane_state")
    for name in ("mlxctl_lane_up", "mlxctl_lane_restarts_total"):
        series = {(s[1]["port"], s[1]["model"]): s[2] for s in got if s[0] == name}
        assert series == {
            (str(p), m): float(name == "mlxctl_lane_up" and s == "serving")
            for p, (s, m) in expected.items()
        }, name
    assert {s[1]["port"] for s in got if s[0] in SERVING_ONLY} == {str(env.team[0])}
    assert {s[0] for s in got if s[1].get("port") == str(env.team[0])} >= SERVING_ONLY
    # footprint and uptime: the lanes whose group is ours (serving, orphan, degraded)
    ours = {str(env.team[0]), str(env.team[1]), str(env.exp[0])}
    for name in ("mlxctl_lane_footprint_bytes", "mlxctl_lane_uptime_seconds"):
        assert {s[1]["port"] for s in got if s[0] == name} == ours, name
    assert all(s[2] > 10 << 20 for s in got if s[0] == "mlxctl_lane_footprint_bytes")
    assert all(
        set(s[1]) == {"port", "model"}
        for s in got
        if s[0].startswith("mlxctl_lane_") and s[0] != "mlxctl_lane_state"
    )
    globals_ = {s[0]: s[2] for s in got if not s[1]}
    assert globals_["mlxctl_gateway_pending"] == 1
    assert globals_["mlxctl_registry_models"] == len(env.registry()["models"])
    _, out, _ = cli("--json", "load", "mlx-dead", "auto", "--estimate")
    estimate = json.loads(out.splitlines()[0])
    assert globals_["mlxctl_memory_budget_bytes"] == estimate["budget_bytes"]
    assert abs(globals_["mlxctl_memory_used_bytes"] - estimate["used_bytes"]) < 16 << 20


def test_metrics_of_an_empty_world(env: Env, cli: Cli) -> None:
    code, text, err = cli("metrics")
    assert code == 0, err
    got = samples(text)
    assert {s[0] for s in got} == set(GLOBAL_FAMILIES)
    assert {s[0]: s[2] for s in got}["mlxctl_registry_models"] == 0
    assert {s[0]: s[2] for s in got}["mlxctl_gateway_pending"] == 0


@pytest.mark.parametrize(
    ("model", "text"),
    [('a"b', r'model="a\"b"'), ("a\\b", r'model="a\\b"'), ("a\nb", r'model="a\nb"')],
)
def test_label_values_are_escaped(model: str, text: str) -> None:
    lanes = [mlxctl.LaneMetrics(8120, model, "dead", None, None, 0, None)]
    rendered = mlxctl.render_metrics(lanes, budget=1, used=0, pending=False, models=1)
    assert text in rendered
    [state] = [s for s in samples(rendered) if s[0] == "mlxctl_lane_state"]
    assert state[1] == {"port": "8120", "model": model, "state": "dead"}


def test_textfile_is_written_atomically(
    env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.add_model("mlx-a")
    load(env, "mlx-a", env.team[0])
    out_dir = env.tmp / "textfiles"
    out_dir.mkdir()
    target = out_dir / "mlxctl.prom"
    renames: list[tuple[str, str, bytes]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renames.append((str(src), str(dst), Path(src).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # a reader (node_exporter) sees no file, or a whole one: never a part
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(target.read_text())
            seen.extend(f"listed {name}" for name in os.listdir(out_dir) if name != target.name)
            time.sleep(0.0002)  # let the writer have the interpreter too

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(10):
            code, out, err = cli("metrics", "--textfile", str(target))
            assert (code, out) == (0, ""), err
    finally:
        stop.set()
        reader.join(5)
    monkeypatch.undo()
    assert len(renames) == 10
    for src, dst, data in renames:
        assert dst == str(target)
        assert not src.endswith(".prom") and Path(src).parent == out_dir
        assert data.endswith(b"\n") and b"mlxctl_registry_models 1\n" in data
    reads = [s for s in seen if not s.startswith("listed ")]
    assert reads  # the reader did look while the files were replaced
    for text in reads:
        families(text)  # parses whole
        assert text.endswith("mlxctl_registry_models 1\n")
    # temporary names node_exporter's *.prom glob would pick up: none
    assert not [s for s in seen if s.startswith("listed ") and s.endswith(".prom")]
    assert sorted(os.listdir(out_dir)) == ["mlxctl.prom"]
    # the real file: the same text as on stdout (values aside)
    result = env.run("metrics", "--textfile", str(target))
    assert result.returncode == 0 and result.stdout == "", result.stderr
    stdout = env.run("metrics").stdout
    assert [s[:2] for s in samples(target.read_text())] == [s[:2] for s in samples(stdout)]


def test_textfile_is_refused_on_a_gateway(env: Env, tmp_path: Path) -> None:
    env.set(MLXCTL_ROLE="gateway", MLXCTL_SSH=str(write_script(tmp_path / "ssh", "exit 99")))
    result = env.run("metrics", "--textfile", str(tmp_path / "x.prom"))
    assert result.returncode == 1
    assert "metrics --textfile is refused on a gateway" in result.stderr
    assert not (tmp_path / "x.prom").exists()


def free_port_outside(env: Env) -> int:
    while True:
        port = port_block(1)
        if port not in env.team and port not in env.exp:
            return port


def get(port: int, path: str, timeout: float = 5) -> tuple[int, str, str]:
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except OSError as exc:
        status = getattr(exc, "code", 0)
        return int(status or 0), "", str(exc)


@contextlib.contextmanager
def watch_serving_metrics(env: Env, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(env.tmp / "watch.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(MLXCTL), "watch", "--interval", "0.5", "--metrics-port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env.environ(),
    )
    try:
        wait_until(lambda: get(port, "/metrics")[2].startswith("# HELP"), 30, 0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def test_watch_serves_the_same_text_at_metrics(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    load(env, "mlx-a", env.team[0])
    env.add_model("mlx-b", env.exp[0])  # dead
    port = free_port_outside(env)
    with watch_serving_metrics(env, port):
        status, content_type, served = get(port, "/metrics")
        assert status == 200 and content_type == mlxctl.PROMETHEUS_TYPE
        assert get(port, "/other")[0] == 404
        _, text, _ = cli("metrics")
        assert {n: f.type for n, f in families(served).items()} == {
            n: f.type for n, f in families(text).items()
        }
        assert [s[:2] for s in samples(served)] == [s[:2] for s in samples(text)]
    # a port inside the model ranges is refused
    result = env.run("watch", "--once", "--metrics-port", str(env.exp[3]))
    assert result.returncode == 1 and "--metrics-port" in result.stderr


@pytest.mark.real
def test_a_real_prometheus_scrapes_watch(env: Env, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus") or "/usr/bin/prometheus"
    need(os.access(prometheus, os.X_OK), "prometheus (Debian package prometheus)")
    env.add_model("mlx-a")
    load(env, "mlx-a", env.exp[0])
    metrics_port = free_port_outside(env)
    web_port = free_port_outside(env)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mlxctl\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with watch_serving_metrics(env, metrics_port), open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:

            def query(expr: str) -> list[dict[str, Any]]:
                q = urllib.parse.quote(expr)
                status, _, body = get(web_port, f"/api/v1/query?query={q}")
                if status != 200:
                    return []
                result = json.loads(body)["data"]["result"]
                assert isinstance(result, list)
                return result

            wait_until(lambda: get(web_port, "/-/ready")[0] == 200, 60, 0.2)
            wait_until(lambda: query("mlxctl_lane_up"), 60, 0.5)
            [up] = query("mlxctl_lane_up")
            assert up["metric"] == {
                "__name__": "mlxctl_lane_up",
                "job": "mlxctl",
                "instance": f"127.0.0.1:{metrics_port}",
                "port": str(env.exp[0]),
                "model": "mlx-a",
            }
            assert up["value"][1] == "1"
            [state] = query('mlxctl_lane_state{state="serving"}')
            assert state["metric"]["model"] == "mlx-a"
            assert query("mlxctl_lane_restarts_total")[0]["value"][1] == "0"
            assert query("mlxctl_registry_models")[0]["value"][1] == "1"
            _, _, body = get(web_port, "/api/v1/targets")
            [target] = json.loads(body)["data"]["activeTargets"]
            assert (target["health"], target["lastError"]) == ("up", "")
        finally:
            server.terminate()
            server.wait(30)


# == doctor ========================================================================================


def doctor_checks(cli: Cli, *args: str) -> tuple[int, dict[tuple[str, str], dict[str, Any]]]:
    code, out, err = cli("doctor", "--json", *args)
    assert "Traceback" not in err
    report = json.loads(out)
    checks = {(h["role"], c["id"]): c for h in report["hosts"] for c in h["checks"]}
    return code, checks


def statuses(checks: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {key: check["status"] for key, check in checks.items()}


@pytest.fixture
def healthy(env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], str]:
    """A world where doctor finds nothing wrong but the missing watch service: one registered
    model, the gateway files synced, plenty of disk. Returns the statuses it gives."""
    env.set(MLXCTL_SERVICE_DIR=str(env.tmp / "services"))
    disk = shutil.disk_usage("/")._replace(total=1000 * GIB, used=500 * GIB, free=500 * GIB)
    monkeypatch.setattr(mlxctl.shutil, "disk_usage", lambda path: disk)
    env.add_model("mlx-a")
    code, _, err = cli("sync-gateway")
    assert code == 0, err
    code, checks = doctor_checks(cli)
    assert code == 0
    base = statuses(checks)
    assert {k: s for k, s in base.items() if s != "ok"} == {
        ("studio", "watch-service"): "warn",
        ("studio", "route"): "skip",
        ("studio", "ssh-out"): "skip",
    }
    return base


def changed(
    base: dict[tuple[str, str], str], checks: dict[tuple[str, str], dict[str, Any]]
) -> dict[tuple[str, str], str]:
    """The checks that got worse than in the healthy world (a warn that became ok is no news)."""
    return {k: c["status"] for k, c in checks.items() if base.get(k) != c["status"] != "ok"}


def expect_only(
    base: dict[tuple[str, str], str],
    checks: dict[tuple[str, str], dict[str, Any]],
    key: tuple[str, str],
    status: str,
    hint: str,
) -> dict[str, Any]:
    """The seeded fault shows in exactly that check, with its hint. A check that cannot run
    because of the same fault says skip: one fault is one warn or fail, not several."""
    check = checks[key]
    assert (check["status"], hint in (check["hint"] or "")) == (status, True), check
    others = {k: s for k, s in changed(base, checks).items() if k != key}
    assert {k: s for k, s in others.items() if s != "skip"} == {}, {k: checks[k] for k in others}
    return check


def test_doctor_json_shape_and_every_check_listed(env: Env, cli: Cli, healthy: Any) -> None:
    code, out, _ = cli("doctor", "--json")
    report = json.loads(out)
    assert set(report) == {"version", "hosts"} and report["version"] == 1
    assert [h["role"] for h in report["hosts"]] == ["studio", "gateway"]
    for host in report["hosts"]:
        assert set(host) == {"host", "role", "checks"} and host["host"] == socket.gethostname()
        for check in host["checks"]:
            assert set(check) == {"id", "status", "message", "hint"}
            assert check["status"] in ("ok", "warn", "fail", "skip")
            assert isinstance(check["message"], str) and check["message"]
        ids = [c["id"] for c in host["checks"]]
        table = [cid for cid, role, _ in mlxctl.DOCTOR_CHECKS if role == host["role"]]
        assert ids == table + (["ssh-out"] if host["role"] == "studio" else [])
    # the spec's table of ids (SPEC §16), plus the route (§17)
    assert {cid for cid, role, _ in mlxctl.DOCTOR_CHECKS if role == "studio"} | {"ssh-out"} == {
        "python", "launcher", "server-version", "registry", "state-dir", "ports-foreign",
        "memory-fit", "served-name", "watch-service", "disk", "route", "ssh-out",
    }  # fmt: skip
    assert {cid for cid, role, _ in mlxctl.DOCTOR_CHECKS if role == "gateway"} == {
        "python", "pyyaml", "gateway-files", "gateway-blocks", "gateway-refs", "gateway-drift",
        "route-mode",
    }  # fmt: skip
    # text: one line per check, a hint under each warn or fail; exit 0 with warnings only
    code, text, _ = cli("doctor")
    assert code == 0
    assert "watch-service" in text and "hint: sudo mlxctl service install" in text
    assert text.count("hint:") == 1


def test_doctor_ports_foreign(
    env: Env, cli: Cli, healthy: Any, outside: contextlib.ExitStack
) -> None:
    foreign_standin(outside, env.model_dir("mlx-stranger"), env.exp[4])
    code, checks = doctor_checks(cli)
    assert code == 1
    check = expect_only(healthy, checks, ("studio", "ports-foreign"), "fail", "status --pids")
    assert str(env.exp[4]) in check["message"]


def test_doctor_ports_foreign_counts_a_silent_listener(
    env: Env, cli: Cli, healthy: Any, outside: contextlib.ExitStack
) -> None:
    """A listener nobody started that answers nothing (status: unresponsive, not ours) holds the
    port as much as a foreign model server does."""
    silent_socket(outside, env.team[3])
    code, checks = doctor_checks(cli)
    assert code == 1
    check = expect_only(healthy, checks, ("studio", "ports-foreign"), "fail", "status --pids")
    assert str(env.team[3]) in check["message"]


def test_doctor_missing_launcher(env: Env, cli: Cli, healthy: Any) -> None:
    env.set(MLX_LAUNCH_CMD=f"{env.tmp / 'nowhere' / 'mlx-openai-server'} launch")
    code, checks = doctor_checks(cli)
    assert code == 1
    check = checks[("studio", "launcher")]
    assert check["status"] == "fail" and "MLX_LAUNCH_CMD" in check["hint"]
    assert "nowhere" in check["message"]
    # the version cannot be probed without it; nothing else changes
    assert changed(healthy, checks) == {
        ("studio", "launcher"): "fail",
        ("studio", "server-version"): "fail",
    }


@pytest.mark.parametrize(
    ("personality", "status", "hint"),
    [
        ("--as 2.0.0", "warn", "pin a tested version"),
        ("--as 1.5.0", "warn", "pin a tested version"),
        ("--garbage-help", "fail", "launch argv goes unchecked"),
    ],
)
def test_doctor_server_version(
    env: Env, cli: Cli, healthy: Any, personality: str, status: str, hint: str
) -> None:
    env.set(MLX_LAUNCH_CMD=f"{sys.executable} {STANDIN} {personality} launch")
    code, checks = doctor_checks(cli)
    assert code == (1 if status == "fail" else 0)
    expect_only(healthy, checks, ("studio", "server-version"), status, hint)


@pytest.mark.parametrize("version", ["--as 1.8.1", "--as 1.6.3", "--as 1.8.9"])
def test_doctor_supported_server_versions(env: Env, cli: Cli, healthy: Any, version: str) -> None:
    env.set(MLX_LAUNCH_CMD=f"{sys.executable} {STANDIN} {version} launch")
    _, checks = doctor_checks(cli)
    assert checks[("studio", "server-version")]["status"] == "ok"


def test_doctor_corrupt_registry(env: Env, cli: Cli, healthy: Any) -> None:
    env.registry_path.write_text('{"version": 1, "models": {')
    code, checks = doctor_checks(cli)
    assert code == 1
    expect_only(healthy, checks, ("studio", "registry"), "fail", "")
    assert checks[("studio", "registry")]["hint"]


@pytest.mark.parametrize(
    ("edit", "message", "hint"),
    [
        ("newer", "newer than this mlxctl", "upgrade mlxctl"),
        ("bad-id", "ids that break the rules: Bad_Name", "mlxctl rename Bad_Name"),
    ],
)
def test_doctor_registry_warnings(
    env: Env, cli: Cli, healthy: Any, edit: str, message: str, hint: str
) -> None:
    data = env.registry()
    if edit == "newer":
        data["version"] = 2
    else:
        data["models"]["Bad_Name"] = {**data["models"]["mlx-a"], "model_id": "Bad_Name"}
    env.registry_path.write_text(json.dumps(data))
    code, checks = doctor_checks(cli)
    assert code == 0
    check = expect_only(healthy, checks, ("studio", "registry"), "warn", hint)
    assert message in check["message"]


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """A directory nobody may write into, root included (chattr +i), else by mode."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"chattr +i: {made.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_doctor_unwritable_state_dir(env: Env, cli: Cli, healthy: Any) -> None:
    env.state.mkdir(parents=True, exist_ok=True)
    with unwritable(env.state):
        code, checks = doctor_checks(cli)
    assert code == 1
    check = expect_only(healthy, checks, ("studio", "state-dir"), "fail", "owner")
    assert str(env.state) in check["message"]


def test_doctor_state_dir_that_is_a_file(env: Env, cli: Cli, healthy: Any) -> None:
    """A state dir path that is a regular file is no writable directory (as root, os.access
    says W_OK of the file all the same)."""
    blocker = env.tmp / "not-a-dir"
    blocker.write_text("")
    env.set(MLXCTL_STATE_DIR=str(blocker))
    code, checks = doctor_checks(cli)
    assert code == 1
    assert checks[("studio", "state-dir")]["status"] == "fail"


def test_doctor_memory_fit(env: Env, cli: Cli, healthy: Any) -> None:
    edit_registry(env, lambda models: models["mlx-a"].update(port=env.team[0]))
    cli("sync-gateway")
    env.set(MLX_MEMORY_LIMIT=str(GIB))  # the model's need is its weights + 1 GiB
    code, checks = doctor_checks(cli)
    assert code == 0
    check = checks[("studio", "memory-fit")]
    assert check["status"] == "warn" and "load --estimate" in check["hint"]
    assert "budget 1.0GB (set by MLX_MEMORY_LIMIT)" in check["message"]
    assert changed(healthy, checks) == {("studio", "memory-fit"): "warn"}


def test_doctor_served_name(env: Env, cli: Cli, healthy: Any) -> None:
    """A lane started by 1.6.3 (no --served-model-name) under a server that now offers it."""
    load(env, "mlx-a", env.team[0])
    cli("sync-gateway")
    _, checks = doctor_checks(cli)
    assert changed(healthy, checks) == {}
    env.set(MLX_LAUNCH_CMD=f"{sys.executable} {STANDIN} --as 1.8.1 launch")
    code, checks = doctor_checks(cli)
    assert code == 0
    check = expect_only(healthy, checks, ("studio", "served-name"), "warn", "mlxctl unload")
    assert f"mlx-a on {env.team[0]}" in check["message"]


def test_doctor_watch_service(env: Env, cli: Cli, healthy: Any) -> None:
    assert (
        "sudo mlxctl service install" in doctor_checks(cli)[1][("studio", "watch-service")]["hint"]
    )
    # installed but not running
    services = Path(env.vars["MLXCTL_SERVICE_DIR"])
    services.mkdir()
    (services / "mlxctl-watch.service").write_text("[Unit]\n")
    check = doctor_checks(cli)[1][("studio", "watch-service")]
    assert check["status"] == "warn" and "installed but watch does not run" in check["message"]
    # running: watch.lock held (as watch holds it)
    lock = env.state / "watch.lock"
    with open(lock, "w") as handle:
        handle.write("4242")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        check = doctor_checks(cli)[1][("studio", "watch-service")]
    assert (check["status"], check["message"]) == ("ok", "watch runs (pid 4242)")


@pytest.mark.parametrize(
    ("free", "total", "status"),
    [
        (GIB - 1, 8 * GIB, "fail"),  # under 1 GiB: fail, whatever the share
        (GIB - 1, 4 * GIB, "fail"),
        (GIB, 100 * GIB, "warn"),  # 1 GiB is not under 1 GiB, but under 10 %
        (10 * GIB - 1, 100 * GIB, "warn"),
        (10 * GIB, 100 * GIB, "ok"),  # exactly 10 %
        (GIB, 10 * GIB, "ok"),
        (500 * GIB, 1000 * GIB, "ok"),
    ],
)
def test_doctor_disk_thresholds(
    env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch, free: int, total: int, status: str
) -> None:
    usage = shutil.disk_usage("/")._replace(total=total, used=total - free, free=free)
    asked: list[str] = []
    monkeypatch.setattr(mlxctl.shutil, "disk_usage", lambda path: asked.append(path) or usage)
    check = mlxctl.check_disk(mlxctl.Facts(mlxctl.resolve_settings(os.environ, {}), None))
    assert check.status == status
    assert asked == [str(env.hub)]  # the hub cache, where downloads land
    assert mlxctl.human_bytes(free) in check.message
    if status != "ok":
        assert check.hint
    _, checks = doctor_checks(cli)
    assert checks[("studio", "disk")]["status"] == status


def test_doctor_python_too_old(
    env: Env, cli: Cli, healthy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlxctl, "MIN_PYTHON", (sys.version_info[0], sys.version_info[1] + 1))
    code, checks = doctor_checks(cli)
    assert code == 1
    assert changed(healthy, checks) == {("studio", "python"): "fail", ("gateway", "python"): "fail"}
    assert "3.9" in checks[("studio", "python")]["hint"]


def test_doctor_pyyaml_missing(
    env: Env, cli: Cli, healthy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find = mlxctl.importlib_find
    monkeypatch.setattr(mlxctl, "importlib_find", lambda n: None if n == "yaml" else real_find(n))
    code, checks = doctor_checks(cli)
    assert code == 1
    expect_only(healthy, checks, ("gateway", "pyyaml"), "fail", "python3-yaml")


def test_doctor_route_without_its_port(env: Env, cli: Cli, healthy: Any) -> None:
    env.set(MLX_GATEWAY_ROUTE="studio")  # MLX_ROUTE_PORT is off in the test world
    code, checks = doctor_checks(cli)
    assert code == 1
    check = checks[("studio", "route")]
    assert check["status"] == "fail" and "MLX_ROUTE_PORT is off" in check["message"]


def test_doctor_corrupt_router_yaml(env: Env, cli: Cli, healthy: Any) -> None:
    env.router.write_text(env.router.read_text() + "general_settings: {unterminated\n")
    code, checks = doctor_checks(cli)
    assert code == 1
    expect_only(healthy, checks, ("gateway", "gateway-files"), "fail", "router.yaml")


def test_doctor_missing_gateway_file(env: Env, cli: Cli, healthy: Any) -> None:
    env.handles.unlink()
    code, checks = doctor_checks(cli)
    assert code == 0
    check = checks[("gateway", "gateway-files")]
    assert (check["status"], check["hint"]) == ("warn", "mlxctl sync-gateway writes them")
    assert check["message"] == "missing: GATEWAY_HANDLES"


def test_doctor_unbalanced_markers(env: Env, cli: Cli, healthy: Any) -> None:
    text = env.env_file.read_text()
    env.env_file.write_text(text.replace("# END MLXCTL AUTO\n", ""))
    code, checks = doctor_checks(cli)
    assert code == 1
    expect_only(healthy, checks, ("gateway", "gateway-blocks"), "fail", "fix the markers")


def test_doctor_a_reference_env_local_lacks(env: Env, cli: Cli, healthy: Any) -> None:
    """router.yaml (outside the block, by hand) names a managed variable env.local lacks."""
    text = env.router.read_text()
    assert "model_list:" in text
    extra = (
        "model_list:\n"
        "  - model_name: by-hand\n"
        "    litellm_params:\n"
        "      model: openai/mlx-ghost\n"
        "      api_base: os.environ/MLX_MLX_GHOST_API_BASE\n"
    )
    env.router.write_text(text.replace("model_list:\n", extra, 1))
    code, checks = doctor_checks(cli)
    assert code == 1
    check = expect_only(healthy, checks, ("gateway", "gateway-refs"), "fail", "sync-gateway")
    assert "MLX_MLX_GHOST_API_BASE" in check["message"]


def test_doctor_drifted_gateway(env: Env, cli: Cli, healthy: Any) -> None:
    env.add_model("mlx-b", env.team[2])  # assigned after the last sync
    code, checks = doctor_checks(cli)
    assert code == 0
    expect_only(healthy, checks, ("gateway", "gateway-drift"), "warn", "mlxctl sync-gateway")


def test_doctor_route_mode_without_wildcards(env: Env, cli: Cli, healthy: Any) -> None:
    """The Studio is in route mode and its route answers (watch serves it), but the gateway
    files were never synced since: no wildcard entries."""
    route = free_port_outside(env)
    env.set(MLX_GATEWAY_ROUTE="studio", MLX_ROUTE_PORT=str(route))
    log = open(env.tmp / "watch.log", "wb")  # noqa: SIM115 - closed below
    watch = subprocess.Popen(
        [sys.executable, str(MLXCTL), "watch", "--interval", "0.5"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env.environ(),
    )
    try:
        wait_until(lambda: get(route, "/health")[0] == 200, 30, 0.1)
        code, checks = doctor_checks(cli)
    finally:
        watch.terminate()
        watch.wait(20)
        log.close()
    assert code == 1
    assert checks[("studio", "route")]["status"] == "ok"
    check = checks[("gateway", "route-mode")]
    assert check["status"] == "fail" and "no wildcard entries" in check["message"]
    assert "restart LiteLLM" in check["hint"]
    # the same fault seen from the other side: the files differ from a route-mode render
    assert changed(healthy, checks) == {
        ("gateway", "route-mode"): "fail",
        ("gateway", "gateway-drift"): "warn",
    }


def test_doctor_is_a_reader(env: Env, cli: Cli, healthy: Any) -> None:
    files = {p: p.read_bytes() for p in env.tmp.rglob("*") if p.is_file() and "logs" not in p.parts}
    result = env.run("doctor")
    assert result.returncode == 0, result.stderr
    after = {p: p.read_bytes() for p in env.tmp.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert {str(p) for p in after} - {str(p) for p in files} <= {str(env.state / "launcher.json")}
    assert {p: b for p, b in after.items() if p in files} == files


# == doctor across two hosts (the loopback sshd) ==================================================


class TwoHosts:
    """A Studio and a gateway on this machine, joined by a real sshd (as tests/test_ssh.py)."""

    def __init__(self, env: Env, sshd: Sshd) -> None:
        self.env, self.sshd = env, sshd
        root = env.tmp
        self.calls = root / "ssh-calls.jsonl"
        ssh = write_ssh_counter(root / "counted-ssh", self.calls)
        common = {
            "MLXCTL_SSH": str(ssh),
            "MLXCTL_SSH_OPTIONS": f"-F {sshd.ssh_config}",
            "MLXCTL_SSH_CONNECT_TIMEOUT": "3",
            "PATH": "/usr/bin:/bin",
            "MLXCTL_SERVICE_DIR": str(root / "services"),
        }
        common.update({k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")})
        self.gateway_root = root / "mini"
        self.studio_wrapper = root / "studio-mlxctl"
        self.gateway_wrapper = root / "gateway-mlxctl"
        studio_env = dict(env.vars)
        studio_env.update(
            common,
            MLXCTL_ROLE="studio",
            GATEWAY_HOST="mini",
            GATEWAY_MLXCTL=str(self.gateway_wrapper),
        )
        studio_env.pop("GATEWAY_ROOT", None)
        self.gateway_env = {
            **common,
            "HOME": str(root / "mini-home"),
            "HF_HOME": str(root / "mini-hf"),
            "MLXCTL_ROLE": "gateway",
            "GATEWAY_ROOT": str(self.gateway_root),
            "MLX_STUDIO_HOST": "studio",
            "MLX_STUDIO_MLXCTL": str(self.studio_wrapper),
            "MLX_TEAM_PORTS": env.vars["MLX_TEAM_PORTS"],
            "MLX_EXPERIMENTAL_PORTS": env.vars["MLX_EXPERIMENTAL_PORTS"],
            "MLX_ROUTE_PORT": "off",
        }
        write_remote_wrapper(self.studio_wrapper, sys.executable, MLXCTL, studio_env)
        write_remote_wrapper(self.gateway_wrapper, sys.executable, MLXCTL, self.gateway_env)
        self.studio_env = studio_env

    def run(self, side: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(MLXCTL), *args],
            env=self.studio_env if side == "studio" else self.gateway_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def take_calls(self) -> list[list[str]]:
        calls = read_calls(self.calls)
        self.calls.unlink(missing_ok=True)
        return calls


@pytest.fixture
def hosts(env: Env) -> Iterator[TwoHosts]:
    need(available(), "openssh-server")
    with Sshd(env.tmp / "sshd") as sshd:
        two = TwoHosts(env, sshd)
        env.add_model("mlx-a", env.team[0])
        result = two.run("studio", "sync-gateway")
        assert result.returncode == 0, result.stderr
        two.take_calls()
        yield two


def remote_words(call: list[str]) -> list[str]:
    return call[call.index("--") + 1 :]


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict) and set(report) == {"version", "hosts"}
    return report


def by_role(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    return {h["role"]: {c["id"]: c for c in h["checks"]} for h in report["hosts"]}


@pytest.mark.real
@pytest.mark.parametrize("side", ["studio", "gateway"])
def test_doctor_across_two_hosts_one_round_trip_each_way(hosts: TwoHosts, side: str) -> None:
    result = hosts.run(side, "doctor", "--json")
    report = report_of(result)
    calls = hosts.take_calls()
    checks = by_role(report)
    assert [h["role"] for h in report["hosts"]] == ["studio", "gateway"]
    # one call there (the other host's doctor), and that host's ssh-out: one call back
    other = {"studio": ("mini", hosts.gateway_wrapper), "gateway": ("studio", hosts.studio_wrapper)}
    back = {"studio": ("studio", hosts.studio_wrapper), "gateway": ("mini", hosts.gateway_wrapper)}
    flag = "--export-stdin" if side == "studio" else "--with-export"
    host, wrapper = other[side]
    assert [c[c.index("--") - 1] for c in calls] == [host, back[side][0]]
    assert remote_words(calls[0]) == [str(wrapper), "--local", "--json", "doctor", flag]
    assert remote_words(calls[1]) == [str(back[side][1]), "--version"]
    # both hosts' checks, the gateway's judged against the Studio's export
    assert checks["gateway"]["gateway-drift"]["status"] == "ok"
    assert checks["gateway"]["route-mode"]["status"] == "ok"
    assert checks["studio"]["ssh-out"]["status"] == "ok"
    assert checks["gateway"]["ssh-out"]["status"] == "ok"
    bad = {(r, i): c for r, cs in checks.items() for i, c in cs.items() if c["status"] == "fail"}
    assert not bad, bad
    assert result.returncode == 0


@pytest.mark.real
@pytest.mark.parametrize("side", ["studio", "gateway"])
def test_doctor_with_the_other_host_unreachable(hosts: TwoHosts, side: str) -> None:
    hosts.sshd.stop()
    result = hosts.run(side, "doctor", "--json")
    assert result.returncode == 1
    report = report_of(result)
    checks = by_role(report)
    other = "gateway" if side == "studio" else "studio"
    ssh_out = checks[side]["ssh-out"]
    assert ssh_out["status"] == "fail" and ssh_out["message"]
    assert {c["status"] for c in checks[other].values()} == {"skip"}
    name = "mini" if side == "studio" else "studio"
    assert all(f"{name} unreachable" in c["message"] for c in checks[other].values())
    [far] = [h for h in report["hosts"] if h["role"] == other]
    assert far["host"] == name
    assert [c["id"] for c in far["checks"]] == [
        cid for cid, role, _ in mlxctl.DOCTOR_CHECKS if role == other
    ]
    # this host's own checks still ran
    assert checks[side]["python"]["status"] == "ok"
    assert len(hosts.take_calls()) == 1


@pytest.mark.real
def test_doctor_local_runs_one_ssh_out(hosts: TwoHosts) -> None:
    result = hosts.run("studio", "--local", "doctor", "--json")
    report = report_of(result)
    assert [h["role"] for h in report["hosts"]] == ["studio"]
    assert by_role(report)["studio"]["ssh-out"]["status"] == "ok"
    assert "mlxctl " in by_role(report)["studio"]["ssh-out"]["message"]
    [call] = hosts.take_calls()
    assert remote_words(call) == [str(hosts.gateway_wrapper), "--version"]
