"""More of the CLI: logs, foreign MLX servers, --replace, the busy lock, progress, config checks."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MLXCTL, STANDIN, Cli, Env
from helpers import (
    connectable,
    empty_or_absent,
    read_jsonl,
    standin_argv,
    status_row,
    wait_until,
    write_script,
)

import mlxctl


def test_logs_tail_app_and_missing(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a", None)
    port = env.exp[0]
    assert cli("load", "mlx-a", str(port), "--no-sync")[0] == 0
    code, out, _ = cli("logs", str(port), "-n", "1")
    assert code == 0 and len(out.splitlines()) == 1
    code, out, _ = cli("logs", str(port))
    assert out.startswith("=== mlxctl start mlx-a ")
    code, out, _ = cli("logs", str(port), "--app")
    assert code == 0 and str(env.tmp / "models" / "mlx-a") in out
    code, _, err = cli("logs", str(env.exp[5]))
    assert code == 1 and "no log for port" in err
    code, _, err = cli("logs", "auto")
    assert code == 1


def test_logs_follow_stops_quietly_on_ctrl_c(env: Env) -> None:
    """`logs -f` prints the tail, then each new line as it comes (flushed: it is piped to grep
    as often as read), and Ctrl-C ends it with exit 0 and no traceback."""
    env.add_model("mlx-a", None)
    port = env.exp[0]
    assert env.run("load", "mlx-a", str(port), "--no-sync").returncode == 0
    seen = env.tmp / "follow.out"
    with open(seen, "w") as out:
        follower = subprocess.Popen(
            [sys.executable, str(MLXCTL), "logs", str(port), "-f"],
            stdout=out,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env.environ(),
        )
    wait_until(lambda: "=== mlxctl start mlx-a" in seen.read_text(), 30)  # the tail is out
    with open(env.state / "logs" / f"{port}.log", "a") as log:
        log.write("a new line\n")
    wait_until(lambda: "a new line" in seen.read_text(), 30)
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=10)
    assert follower.returncode == 0 and "Traceback" not in err


def foreign_mlx_server(env: Env, port: int) -> subprocess.Popen[bytes]:
    """A server mlxctl did not start whose command line says mlx-openai-server."""
    script = env.tmp / "mlx-openai-server"
    shutil.copy(STANDIN, script)
    model = env.model_dir("foreign")
    child = subprocess.Popen(
        standin_argv(model, port, script=script),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: connectable(port))
    return child


def test_unload_foreign_mlx_server_needs_force(env: Env, cli: Cli) -> None:
    port = env.team[2]
    child = foreign_mlx_server(env, port)
    try:
        code, _, err = cli("unload", str(port), "--no-sync")
        assert code == 1
        assert f"port {port} held by pid {child.pid} (not started by mlxctl)" in err
        assert "--force" in err
        code, out, _ = cli("--json", "status", "--pids", "--all")
        row = status_row(out, port)
        assert row["state"] == "foreign" and row["pid"] == child.pid and not row["ours"]
        code, _, err = cli("unload", str(port), "--force", "--no-sync")
        assert code == 0, err
        assert child.wait(10) is not None
    finally:
        child.kill()
        child.wait()


def test_load_replace_withholds_then_swaps(env: Env, cli: Cli) -> None:
    env.add_model("mlx-old", None)
    env.add_model("mlx-new", None)
    port = env.team[0]
    assert cli("load", "mlx-old", str(port))[0] == 0
    code, _, err = cli("load", "mlx-new", str(port))
    assert code == 1 and "--replace" in err
    code, _out, err = cli("load", "mlx-new", str(port), "--replace")
    assert code == 0, err
    models = env.registry()["models"]
    assert models["mlx-old"]["port"] is None and "withheld" not in models["mlx-old"]
    assert models["mlx-new"]["port"] == port
    assert [r["handle"] for r in read_jsonl(env.handles)] == ["mlx-new"]


def test_registry_busy_names_the_holder(
    env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.add_model("mlx-a", None)
    env.state.mkdir(parents=True, exist_ok=True)
    lock = env.state / "registry.lock"
    holder = {"pid": 4242, "argv": ["mlxctl", "load", "x", "auto"], "since": "2026-01-01T00:00:00Z"}
    lock.write_text(json.dumps(holder))
    monkeypatch.setattr(mlxctl, "LOCK_TIMEOUT", 0.3)
    with open(lock, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        before = env.registry_path.read_bytes()
        code, _, err = cli("set", "mlx-a", "optillm=true", "--no-sync")
    assert code == 1
    assert "registry busy: pid 4242 (mlxctl load x auto) since 2026-01-01T00:00:00Z" in err
    assert env.registry_path.read_bytes() == before


def test_quiet_progress_line_while_waiting(
    env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.add_model("mlx-slow", None, knobs={"start_delay": 1.0})
    monkeypatch.setattr(mlxctl, "QUIET_PROGRESS_EVERY", 0.2)
    code, _, err = cli("load", "mlx-slow", "auto", "--no-sync")
    assert code == 0
    assert f"loading mlx-slow on {env.exp[0]}" in err


def test_load_dry_run_prints_argv_and_changes_nothing(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a", None)
    before = env.registry_path.read_bytes()
    code, out, _ = cli("--dry-run", "load", "mlx-a", "auto")
    assert code == 0
    assert "would start:" in out and "--model-path" in out and str(env.exp[0]) in out
    assert env.registry_path.read_bytes() == before
    assert empty_or_absent(env.state / "run")


def test_unload_dry_run_keeps_the_server(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a", None)
    assert cli("load", "mlx-a", str(env.exp[0]), "--no-sync")[0] == 0
    before = env.registry_path.read_bytes()
    code, out, _ = cli("unload", str(env.exp[0]), "--dry-run")
    assert code == 0 and "would stop process group" in out
    assert env.registry_path.read_bytes() == before
    assert not mlxctl.connect_refused("127.0.0.1", env.exp[0])


def test_config_reports_problems(env: Env, cli: Cli) -> None:
    env.set(MLX_TEAM_PORTS=f"{env.exp[0]}-{env.exp[3]}", MLX_LAUNCH_CMD=None, PATH="/nonexistent")
    code, out, err = cli("config")
    assert code == 1
    assert "overlap" in err and "no server launcher found" in err
    # issue 9: a converter that does not exist here is a problem too (python3 is not on this PATH)
    assert "MLX_CONVERT_CMD: python3 is not an executable here" in err
    code, out, err = cli("--json", "config")
    data = json.loads(out)
    assert data["role"] == "studio" and len(data["problems"]) == 3


def test_config_gateway_role(env: Env, cli: Cli) -> None:
    env.set(MLXCTL_ROLE="gateway")
    code, out, _ = cli("--json", "config")
    assert code == 0
    assert json.loads(out)["role"] == "gateway"
    rows = {r["name"]: r for r in json.loads(out)["settings"]}
    assert rows["MLXCTL_ROLE"]["source"] == "env"


def test_role_auto(env: Env, cli: Cli) -> None:
    env.set(MLXCTL_ROLE="auto")
    cfg = mlxctl.resolve_settings(os.environ, {})
    assert mlxctl.detect_role(cfg) == "studio"  # a fresh Studio before its first init
    env.router.parent.mkdir(parents=True)
    env.router.write_text("model_list:\n")
    assert mlxctl.detect_role(cfg) == "gateway"
    env.add_model("mlx-a", None)
    assert mlxctl.detect_role(cfg) == "studio"  # both files here: Studio commands run locally


def test_status_shows_orphans_and_reconcile_stops_them(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a", None)
    port = env.exp[0]
    assert cli("load", "mlx-a", str(port), "--no-sync")[0] == 0
    data = env.registry()
    data["models"]["mlx-a"]["port"] = None  # someone cleared the assignment by hand
    env.registry_path.write_text(json.dumps(data))
    code, out, _ = cli("status", "--check")
    assert code == 3 and "orphan" in out
    code, out, _ = cli("reconcile", "--no-sync")
    assert code == 0 and f"stopped orphan server on {port}" in out
    assert mlxctl.connect_refused("127.0.0.1", port)


def test_stop_pid_kills_a_stubborn_process(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        ]
    )
    time.sleep(0.3)
    started = time.monotonic()
    assert mlxctl.stop_pid(child.pid, 0.5)
    assert time.monotonic() - started < 5
    child.wait(5)


def test_a_warm_load_runs_the_launcher_once(env: Env, cli: Cli) -> None:
    """SPEC §13, issue 10: the launcher's version and options are learned once and cached; a
    load with a warm cache runs no extra process, and a changed launcher is probed again."""
    calls = env.tmp / "launcher-calls"
    launcher = env.tmp / "launcher"
    body = f'echo "$*" >> {calls}\nexec {sys.executable} {STANDIN} "$@"'
    write_script(launcher, body)
    env.set(MLX_LAUNCH_CMD=f"{launcher} launch")
    env.add_model("mlx-a")
    port = str(env.exp[0])

    def load_and_unload() -> list[str]:
        calls.write_text("")
        code, _, err = cli("load", "mlx-a", port, "--no-sync")
        assert code == 0, err
        assert cli("unload", port, "--no-sync")[0] == 0
        return sorted(" ".join(line.split()[:2]) for line in calls.read_text().splitlines())

    probes_and_server = ["--version", "launch --help", "launch --model-path"]
    assert load_and_unload() == probes_and_server
    assert load_and_unload() == ["launch --model-path"]  # warm: the server only
    write_script(launcher, body + "\n# upgraded")
    assert load_and_unload() == probes_and_server
