"""Every failure leaves a truthful, manageable state (issue 9).

The real file runs by subprocess with faults injected by tests/fixtures/faults.py: an OSError at
each place mlxctl writes (runtime record, port log, registry lock, gateway sync lock,
registry.json, gateway.pending, the three gateway files, the conversion's temp dir), and at each
milestone of a load (reserved, spawned, recorded, ready, committed) a SIGKILL of mlxctl, a
SIGINT/SIGTERM/SIGHUP or a dropped session (stdout and stderr broken). After each, the promise:

- nothing unmanageable runs: every live stand-in of the test's world is recorded in
  run/<port>.json and `status --json` shows it `ours: true` (or none runs);
- the registry is as before, or consistently forward (no reservation of a live owner; a stale one
  is cleared by the next command);
- `status` tells the truth (serving / dead / ours / gateway pending);
- the next commands (`reconcile`, then `load M auto`) clean up and never start a second copy;
- the exit code is the documented one (1 failed, 4 applied but sync failed, 130 interrupted) and
  the error is one line `mlxctl: error: ...` with no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Env
from fixtures.fake_hub import FakeHub
from fixtures.faults import (
    ERRNOS,
    MILESTONES,
    WRITE_POINTS,
    FaultRun,
    PathFault,
    atomic_temp,
    fault_environ,
    fault_log,
    read_fired,
    run_with_faults,
)
from helpers import (
    alive,
    connectable,
    live_pids_mentioning,
    one_json,
    proc_fields,
    read_record,
    record_path,
    run_records,
    standin_pids,
    wait_until,
    write_knobs,
    write_script,
)

import mlxctl

MODEL = "mlx-alpha"
FAST = {"start_delay": 0.05}
SLOW = {"start_delay": 1.5}  # long enough for a dropped session to be noticed while waiting
INTERRUPTS = ("SIGINT", "SIGTERM", "SIGHUP")
ENV_VAR_REF = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")
LOG_TAIL_HEADER = re.compile(r"^--- this start's last (\d+) lines of .* ---$")


# -- the world ----------------------------------------------------------------------------------


@pytest.fixture
def world(env: Env) -> Iterator[Env]:
    """One stand-in model, registered with no port; short stop grace. At the end every stand-in
    of this world is killed, recorded or not (a leak is what these tests look for)."""
    env.set(MLX_STOP_TIMEOUT="1", MLX_START_TIMEOUT="20")
    env.add_model(MODEL, None, knobs=FAST)
    yield env
    for pid in standin_pids(env):
        fields = proc_fields(pid)
        if fields is not None:
            group = int(fields[2])
            try:
                os.killpg(group, signal.SIGCONT)
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def model_path(env: Env, model_id: str = MODEL) -> Path:
    return env.tmp / "models" / model_id


def copies(env: Env, model_id: str = MODEL) -> list[int]:
    """Live stand-in processes serving `model_id` (its --model-path is in their argv)."""
    return live_pids_mentioning(f"--model-path {model_path(env, model_id)} ")


def models(env: Env) -> dict[str, Any]:
    data: dict[str, Any] = env.registry()["models"]
    return data


def pending(env: Env) -> Path:
    return env.state / "gateway.pending"


def status(env: Env) -> dict[str, Any]:
    result = env.run("status", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# -- the promise --------------------------------------------------------------------------------


def own_error_line(stderr: str) -> str:
    """mlxctl's one `mlxctl: error:` line (a server's log tail it passes through is skipped)."""
    assert "Traceback" not in stderr, stderr
    lines, own, i = stderr.splitlines(), [], 0
    while i < len(lines):
        header = LOG_TAIL_HEADER.match(lines[i])
        if header:
            i += 1 + int(header.group(1))
            continue
        if lines[i].startswith("mlxctl: error:"):
            own.append(lines[i])
        i += 1
    assert len(own) == 1, f"expected one mlxctl: error: line, got {stderr!r}"
    return own[0]


def assert_failed(run: FaultRun, code: int) -> str:
    """Exit `code`, one error line, and the one --json result object saying so."""
    assert run.returncode == code, (run.returncode, run.stderr, run.fired)
    line = own_error_line(run.stderr)
    reply = one_json(run.stdout)
    assert reply["ok"] is False
    assert reply["error"] and reply["error"] in line
    return line


def assert_state(env: Env) -> dict[int, int]:
    """One `status --json` against the world. Nothing unmanageable runs: every live stand-in of
    this world is in the group of a run/<port>.json leader that status shows as ours. status
    tells the truth: an assigned model whose server runs serves, one with none is dead, the
    gateway is stale exactly while gateway.pending exists. No reservation has a live owner.
    Returns {port: pid} of the running servers."""
    report = status(env)
    rows = {row["port"]: row for row in report["ports"]}
    records = {}
    for path in run_records(env):
        record = json.loads(path.read_text())
        records[int(record["pgid"])] = record
    servers = {}
    for pid in standin_pids(env):
        fields = proc_fields(pid)
        if fields is None:
            continue  # gone meanwhile
        record = records.get(int(fields[2]))
        assert record is not None, f"stand-in {pid} runs with no runtime record"
        port = int(record["port"])
        assert port in rows, f"status does not show port {port} of stand-in {pid}"
        assert rows[port]["ours"] is True, rows[port]
        assert rows[port]["pid"] == record["pid"], rows[port]
        servers[port] = int(record["pid"])
    for key, entry in models(env).items():
        mark = entry.get("reservation")
        if mark is not None:
            assert not alive(int(mark["pid"])), f"{key} reserved by live pid {mark['pid']}"
        port = entry.get("port")
        if isinstance(port, int):
            state = "serving" if port in servers and copies(env, key) else "dead"
            assert rows[port]["state"] == state, (key, rows[port])
    since = (report.get("gateway") or {}).get("pending_since")
    assert (since is not None) == pending(env).exists(), report.get("gateway")
    return servers


def assert_gateway_startable(env: Env) -> None:
    """LiteLLM could start from what is on disk: every os.environ/ variable router.yaml names is
    set in env.local (SPEC §7.6, crash-safe as a set)."""
    if not env.router.exists():
        return
    names = set(ENV_VAR_REF.findall(env.router.read_text()))
    text = env.env_file.read_text() if env.env_file.exists() else ""
    defined = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line}
    missing = sorted(names - defined)
    assert missing == [], f"router.yaml references variables env.local lacks: {missing}"


def assert_exported(env: Env, model_id: str, port: int) -> None:
    """The gateway shows the model on its port (the sync happened)."""
    assert f"model_name: {model_id}" in env.router.read_text()
    assert f":{port}/v1" in env.env_file.read_text()
    assert model_id in env.handles.read_text()


def recover(env: Env, model_id: str = MODEL) -> int:
    """The next commands clean up: reconcile (clears stale marks, stops what no one owns,
    retries an owed sync), then `load M auto`, which serves M with exactly one copy. Returns
    M's port."""
    result = env.run("--json", "reconcile")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not any("reservation" in e for e in models(env).values()), models(env)
    assert not pending(env).exists(), "the next syncing command retries the owed sync"
    result = env.run("--json", "load", model_id, "auto")
    assert result.returncode == 0, result.stderr
    port = int(one_json(result.stdout)["port"])
    assert len(copies(env, model_id)) == 1, "a second copy of the model was started"
    assert assert_state(env)[port] == copies(env, model_id)[0]  # other lanes may serve too
    assert_gateway_startable(env)
    assert_exported(env, model_id, port)
    return port


def assert_rolled_back(env: Env, before: dict[str, Any]) -> None:
    """Nothing runs, the registry's models are as before, no reservation, no record."""
    assert copies(env) == []
    assert standin_pids(env) == []
    assert models(env) == before
    assert run_records(env) == []


def load(env: Env, *extra: str, **faults: Any) -> FaultRun:
    return run_with_faults(env, "--json", "load", MODEL, "auto", *extra, **faults)


# -- the fault layer itself ---------------------------------------------------------------------

TOY = """\
import os, sys

def milestone(name):
    pass

def main():
    for _ in range(3):
        try:
            with open(sys.argv[1], "w"):
                pass
            print("ok", flush=True)
        except OSError as exc:
            print("err", exc.errno, flush=True)
    milestone("ready")
    print("after", flush=True)
    return 0

raise SystemExit(main())
"""


def run_toy(env: Env, tmp_name: str, **faults: Any) -> FaultRun:
    """A tiny program named `mlxctl` (the layer acts on that name only) under the fault layer."""
    program = env.tmp / "toy" / tmp_name
    program.parent.mkdir(exist_ok=True)
    program.write_text(TOY)
    log = fault_log(env)
    target = env.tmp / "toy" / "target"
    result = subprocess.run(
        [sys.executable, str(program), str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        env=fault_environ(env, log, **faults),
    )
    return FaultRun(result, read_fired(log))


@pytest.mark.fixture_selftest
def test_fault_layer_path_faults_skip_and_times(env: Env) -> None:
    glob = str(env.tmp / "toy" / "targ*")
    run = run_toy(env, "mlxctl", faults=[PathFault(glob, "EROFS", skip=1, times=1)])
    assert run.stdout.split("\n")[:4] == ["ok", f"err {errno.EROFS}", "ok", "after"]
    assert run.returncode == 0
    assert [(e["op"], e["errno"]) for e in run.fired] == [("open", "EROFS")]
    assert run.fired[0]["path"] == str(env.tmp / "toy" / "target")


@pytest.mark.fixture_selftest
def test_fault_layer_acts_only_in_mlxctl(env: Env) -> None:
    glob = str(env.tmp / "toy" / "*")
    run = run_toy(env, "not-mlxctl", fail_path=glob, errno="EACCES", at_milestone="ready")
    assert run.stdout.split() == ["ok", "ok", "ok", "after"]
    assert run.fired == []


@pytest.mark.fixture_selftest
@pytest.mark.parametrize("action", ["kill", "SIGTERM", "close-output"])
def test_fault_layer_milestone_actions(env: Env, action: str) -> None:
    run = run_toy(env, "mlxctl", at_milestone="ready", action=action)
    assert [e["milestone"] for e in run.fired] == ["ready"]
    assert run.stdout.split()[:3] == ["ok", "ok", "ok"]
    assert "after" not in run.stdout
    # after close-output the toy's next print raises BrokenPipeError: exit 1
    expected = {"kill": -signal.SIGKILL, "SIGTERM": -signal.SIGTERM, "close-output": 1}
    assert run.returncode == expected[action], run.stderr


@pytest.mark.fixture_selftest
def test_fault_layer_lets_skipped_calls_through(world: Env) -> None:
    records = atomic_temp(world.state / "run" / "*.json")
    run = load(world, fail_path=records, skip=1)
    # the record at the spawn was written unharmed; its rewrite at readiness failed
    assert len(run.fired_paths()) == 1
    assert (world.state / "logs" / f"{world.exp[0]}.log").exists()
    assert run.returncode == 1
    assert standin_pids(world) == []


# -- every milestone of a load × kill -9, SIGINT/SIGTERM/SIGHUP, a dropped session ---------------


def wait_serving(env: Env, port: int) -> None:
    """A server a killed mlxctl left behind comes up on its own: its record, then its port."""
    wait_until(lambda: record_path(env, port).exists() and copies(env), timeout=10)
    wait_until(lambda: connectable(port), timeout=10)


@pytest.mark.parametrize("milestone", MILESTONES)
@pytest.mark.parametrize("action", ["kill", *INTERRUPTS, "close-output"])
def test_load_stopped_at_every_milestone(world: Env, milestone: str, action: str) -> None:
    env, port = world, world.exp[0]
    dropped = action == "close-output"
    if dropped:
        write_knobs(model_path(env), **SLOW)
    before = models(env)
    run = load(env, at_milestone=milestone, action=action, progress_every=0.1 if dropped else None)
    assert run.fired_milestone() == milestone, (run.returncode, run.stderr)
    write_knobs(model_path(env), **FAST)  # the next start (recover) need not be slow
    stands = milestone == "committed" or (dropped and milestone == "ready")
    if action == "kill":
        assert run.returncode == -signal.SIGKILL
        entry = models(env)[MODEL]
        assert entry["port"] == port
        if milestone == "committed":
            assert "reservation" not in entry
            assert pending(env).exists(), "the owed sync is recorded before the registry write"
        else:
            assert entry["reservation"]["previous_port"] is None  # stale: its owner is dead
        if milestone in ("reserved", "spawned"):  # spawned: the child exits at its gate
            wait_until(lambda: not copies(env), timeout=10)
            assert assert_state(env) == {}
        else:
            wait_serving(env, port)
            assert assert_state(env) == {port: copies(env)[0]}
    elif stands:
        # past the commit (or with nothing written before it) the command completes and syncs
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        if not dropped:
            assert one_json(run.stdout)["ok"] is True
        assert models(env)[MODEL]["port"] == port
        assert not pending(env).exists()
        assert_exported(env, MODEL, port)
        assert assert_state(env) == {port: copies(env)[0]}
    else:
        assert run.returncode == 130, (run.stderr, run.fired)
        if not dropped:
            line = assert_failed(run, 130)
            assert "interrupted" in line
        assert_rolled_back(env, before)
        assert assert_state(env) == {}
    assert_gateway_startable(env)
    recover(env)


@pytest.mark.parametrize("action", ["kill", "SIGTERM"])
def test_up_stopped_while_starting(world: Env, action: str) -> None:
    """`up` restarts a dead assignment through the same load engine: stopped half way (after
    the fork, before the runtime record), the assignment stays (dead), nothing runs — a killed
    mlxctl's child exits at its gate — and the next `up` starts one copy."""
    env, port = world, world.team[0]
    data = env.registry()
    data["models"][MODEL]["port"] = port
    env.registry_path.write_text(json.dumps(data))
    before = models(env)
    run = run_with_faults(env, "--json", "up", at_milestone="spawned", action=action)
    assert run.fired_milestone() == "spawned"
    if action == "kill":
        assert run.returncode == -signal.SIGKILL
        wait_until(lambda: not copies(env), timeout=10)
        assert models(env)[MODEL]["reservation"]["previous_port"] == port  # stale: owner dead
    else:
        assert_failed(run, 130)
        assert copies(env) == []
        assert models(env) == before
    assert models(env)[MODEL]["port"] == port
    assert assert_state(env) == {}
    result = env.run("up")
    assert result.returncode == 0, result.stderr
    assert len(copies(env)) == 1
    assert assert_state(env) == {port: copies(env)[0]}


# -- every write point × the errnos that happen there ------------------------------------------


EVERY_ERRNO = ("record", "port-log", "registry-lock", "sync-lock", "registry", "gateway-pending")
EVERY_ERRNO += ("router.yaml",)
TWO_ERRNOS = ("record-at-ready", "registry-bak", "watch-json", "env.local", "handles.jsonl")
FSYNC = ("record", "registry", "gateway-pending", "router.yaml")
REPLACE = ("record", "registry", "router.yaml")
DIRS = ("run-dir", "log-dir", "gateway-dir")
WRITE_CASES = [
    *[(point, "open", code) for point in EVERY_ERRNO for code in ERRNOS],
    *[(point, "open", code) for point in TWO_ERRNOS for code in ("ENOSPC", "EACCES")],
    *[(point, "fsync", "ENOSPC") for point in FSYNC],
    *[(point, "replace", "EROFS") for point in REPLACE],
    *[(point, "mkdir", code) for point in DIRS for code in ("ENOTDIR", "EACCES")],
]
# how mlxctl recovers does not depend on the errno: the next commands run after the first case
# of each write point and operation only (it keeps the file's run time down)
RECOVERY_CASES = {
    next(case for case in WRITE_CASES if case[:2] == point_op)
    for point_op in {case[:2] for case in WRITE_CASES}
}


def assert_load_failed(env: Env, run: FaultRun, code: str, before: dict[str, Any]) -> None:
    """Exit 1 naming the cause in one line, the --json object printed, nothing running, the
    registry's models as before (no reservation left behind)."""
    line = assert_failed(run, 1)
    assert os.strerror(getattr(errno, code)) in line, line
    assert_rolled_back(env, before)
    assert assert_state(env) == {}


def assert_applied_sync_failed(env: Env, run: FaultRun, port: int) -> None:
    """Exit 4: the load stands (one copy, committed), the sync is owed (gateway.pending, status
    says stale), and the gateway files on disk still make a LiteLLM that can start."""
    line = assert_failed(run, 4)
    assert "change applied but the gateway sync failed" in line
    reply = one_json(run.stdout)
    assert reply["sync"]["status"] == "failed"
    entry = models(env)[MODEL]
    assert entry["port"] == port and "reservation" not in entry
    assert pending(env).exists()
    assert assert_state(env) == {port: copies(env)[0]}
    assert_gateway_startable(env)


@pytest.mark.parametrize(
    ("point", "op", "code"), WRITE_CASES, ids=[f"{p}-{o}-{c}" for p, o, c in WRITE_CASES]
)
def test_load_with_a_write_that_fails(world: Env, point: str, op: str, code: str) -> None:
    env, port = world, world.exp[0]
    glob_of, skip, outcome = WRITE_POINTS[point]
    before = models(env)
    run = load(env, fail_path=glob_of(env), errno=code, ops=(op,), skip=skip)
    assert run.fired, f"the fault at {point} never fired: {run.returncode} {run.stderr}"
    if outcome == "failed":
        assert_load_failed(env, run, code, before)
    else:
        assert_applied_sync_failed(env, run, port)
    if (point, op, code) in RECOVERY_CASES:
        assert recover(env) == port


@pytest.mark.parametrize("times", [1, None], ids=["rollback-writes", "rollback-fails-too"])
@pytest.mark.parametrize("point", ["registry-lock", "registry"])
def test_load_whose_commit_cannot_be_written(world: Env, point: str, times: int | None) -> None:
    """The reservation was written and the server is ready; the commit's lock or write fails.
    The server is stopped; the registry is as before, or (when the rollback's write fails too)
    keeps a reservation whose owner is gone, which the next command clears."""
    env = world
    glob_of, _, _ = WRITE_POINTS[point]
    before = models(env)
    run = load(env, faults=[PathFault(glob_of(env), "EROFS", skip=1, times=times)])
    assert run.fired
    assert_failed(run, 1)
    assert copies(env) == []
    assert assert_state(env) == {}
    after = models(env)
    if times == 1:
        assert after == before
    else:
        assert "reservation" in after[MODEL]
        assert "stays until mlxctl reconcile" in run.stderr
    recover(env)


@pytest.mark.parametrize("point", ["sync-lock", "router.yaml"])
def test_unload_with_a_sync_that_fails(world: Env, point: str) -> None:
    """The server is stopped and the assignment cleared (applied); the sync fails: exit 4 and
    gateway.pending; the next syncing command (here `sync-gateway`) syncs and removes it."""
    env = world
    port = recover(env)
    glob_of, _, _ = WRITE_POINTS[point]
    run = run_with_faults(
        env, "--json", "unload", str(port), fail_path=glob_of(env), errno="EACCES"
    )
    assert run.fired
    line = assert_failed(run, 4)
    assert "change applied but the gateway sync failed" in line
    assert copies(env) == []
    assert models(env)[MODEL]["port"] is None
    assert pending(env).exists()
    assert assert_state(env) == {}
    assert_gateway_startable(env)
    result = env.run("sync-gateway")
    assert result.returncode == 0, result.stderr
    assert not pending(env).exists()
    assert f"model_name: {MODEL}" not in env.router.read_text()
    assert_gateway_startable(env)


# -- the start gate, in process ----------------------------------------------------------------


def gated(argv: list[str], tmp: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*mlxctl.START_GATE, *argv], stdin=subprocess.PIPE, cwd=tmp, start_new_session=True
    )


def test_start_gate_runs_the_server_only_after_its_record(tmp_path: Path) -> None:
    cfg = mlxctl.resolve_settings({"MLXCTL_STATE_DIR": str(tmp_path / "state")}, {})
    flag = tmp_path / "ran"
    child = gated(["/bin/sh", "-c", f"echo $$ > {flag}"], tmp_path)
    try:
        time.sleep(0.2)
        assert not flag.exists(), "the child ran before its record was written"
        record = mlxctl.release_start(cfg, 8100, {"model_id": "m"}, child)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert int(flag.read_text()) == child.pid == record["pid"] == record["pgid"]
    on_disk = json.loads((tmp_path / "state" / "run" / "8100.json").read_text())
    assert on_disk == record and record["model_id"] == "m" and record["start_time"]


def test_start_gate_closed_by_a_dead_parent_runs_nothing(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    child = gated(["/bin/sh", "-c", f"touch {flag}"], tmp_path)
    assert child.stdin is not None
    child.stdin.close()  # what the death of mlxctl does to the pipe
    assert child.wait(timeout=10) != 0
    assert not flag.exists()


def test_start_gate_gone_before_go_is_one_error_and_no_record(tmp_path: Path) -> None:
    cfg = mlxctl.resolve_settings({"MLXCTL_STATE_DIR": str(tmp_path / "state")}, {})
    child = gated(["true"], tmp_path)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    mlxctl._children[child.pid] = child
    with pytest.raises(mlxctl.MlxctlError, match="its start shell exited"):
        mlxctl.release_start(cfg, 8100, {"model_id": "m"}, child)
    assert not (tmp_path / "state" / "run" / "8100.json").exists()
    assert child.pid not in mlxctl._children


# -- the findings of issue 9, one test each -----------------------------------------------------


def test_record_not_written_after_the_spawn_leaves_no_server(world: Env) -> None:
    """The child forked, but run/<port>.json cannot be written: the child, still waiting at
    its gate, exits without becoming the server, so nothing runs that no record names; the load
    fails, rolled back."""
    env = world
    before = models(env)
    records = atomic_temp(env.state / "run" / "*.json")
    run = load(env, fail_path=records, errno="ENOSPC")
    assert len(run.fired_paths()) == 1
    line = assert_failed(run, 1)
    assert "No space left on device" in line
    assert "the server was not started" in line
    assert_rolled_back(env, before)
    assert assert_state(env) == {}
    recover(env)


@pytest.mark.parametrize("milestone", ["spawned", "recorded"])
def test_kill_after_the_spawn_leaves_our_server_or_none_and_never_a_second_copy(
    world: Env, milestone: str
) -> None:
    """kill -9 of mlxctl once the child exists. Before its record is written (spawned) the child
    is still at its gate: its pipe closes and it exits without becoming a server. Once recorded,
    the server is ours (status says so). Either way the next `load M auto` — with no reconcile
    first — ends with one copy of M, not two."""
    env, port = world, world.exp[0]
    run = load(env, at_milestone=milestone, action="kill")
    assert run.returncode == -signal.SIGKILL
    if milestone == "recorded":
        wait_serving(env, port)
        pid = copies(env)[0]
        assert read_record(env, port)["pid"] == pid
        assert assert_state(env) == {port: pid}
    else:
        wait_until(lambda: not copies(env), timeout=10)
        assert not record_path(env, port).exists()
        assert not connectable(port)
    for _ in range(2):
        result = env.run("--json", "load", MODEL, "auto")
        assert result.returncode == 0, result.stderr
        assert len(copies(env)) == 1, "a second copy of the model was started"
    assert "reservation" not in models(env)[MODEL]
    final = int(one_json(result.stdout)["port"])
    assert assert_state(env) == {final: copies(env)[0]}
    result = env.run("up")
    assert result.returncode == 0, result.stderr
    assert len(copies(env)) == 1


def test_kill_at_committed_leaves_the_sync_owed(world: Env) -> None:
    """kill -9 between the registry commit and the sync: gateway.pending was written before the
    commit, status says the gateway is stale, and `sync-gateway` syncs and removes it."""
    env, port = world, world.exp[0]
    run = load(env, at_milestone="committed", action="kill")
    assert run.returncode == -signal.SIGKILL
    assert pending(env).exists()
    assert status(env)["gateway"]["pending_since"]
    assert assert_state(env) == {port: copies(env)[0]}
    assert not env.router.exists() or f"model_name: {MODEL}" not in env.router.read_text()
    result = env.run("sync-gateway")
    assert result.returncode == 0, result.stderr
    assert not pending(env).exists()
    assert status(env)["gateway"]["pending_since"] is None
    assert_exported(env, MODEL, port)
    assert_gateway_startable(env)
    result = env.run("load", MODEL, "auto")
    assert result.returncode == 0 and len(copies(env)) == 1


def test_port_log_that_cannot_be_opened(world: Env) -> None:
    env = world
    before = models(env)
    run = load(env, fail_path=str(env.state / "logs" / "*.log"), errno="EACCES")
    line = assert_failed(run, 1)
    assert line.startswith("mlxctl: error: cannot write ")
    assert f"logs/{env.exp[0]}.log: Permission denied" in line
    reply = one_json(run.stdout)
    assert reply["command"] == "load" and reply["model_id"] == MODEL
    assert not any("reservation" in e for e in models(env).values())
    assert_rolled_back(env, before)


@pytest.mark.parametrize("lock", ["registry-lock", "sync-lock"])
def test_lock_that_cannot_be_opened(world: Env, lock: str) -> None:
    """The registry lock: one line, nothing changed. The gateway's sync lock after the load was
    applied: exit 4, gateway.pending, and the next syncing command syncs."""
    env, port = world, world.exp[0]
    glob_of, _, _ = WRITE_POINTS[lock]
    before = env.registry_path.read_bytes()
    run = load(env, fail_path=glob_of(env), errno="EROFS")
    if lock == "registry-lock":
        line = assert_failed(run, 1)
        assert "cannot open the lock" in line and "Read-only file system" in line
        assert env.registry_path.read_bytes() == before
        assert copies(env) == []
    else:
        assert_applied_sync_failed(env, run, port)
        assert "Read-only file system" in own_error_line(run.stderr)
    recover(env)


@pytest.mark.parametrize("milestone", ["spawned", "recorded"])
def test_dropped_session_during_a_load_rolls_back(world: Env, milestone: str) -> None:
    """The SSH session of a forwarded load dropped: stdout and stderr are broken pipes. The next
    progress line notices (its interval shortened here from 30 s): server stopped, rolled back,
    exit 130."""
    env = world
    write_knobs(model_path(env), **SLOW)
    before = models(env)
    run = load(env, at_milestone=milestone, action="close-output", progress_every=0.1)
    assert run.fired_milestone() == milestone
    assert run.returncode == 130
    assert_rolled_back(env, before)
    assert assert_state(env) == {}


@pytest.mark.parametrize("milestone", ["ready", "committed"])
def test_dropped_session_after_ready_lets_the_load_stand(world: Env, milestone: str) -> None:
    env, port = world, world.exp[0]
    run = load(env, at_milestone=milestone, action="close-output", progress_every=0.1)
    assert run.fired_milestone() == milestone
    assert run.returncode == 0
    assert models(env)[MODEL]["port"] == port and "reservation" not in models(env)[MODEL]
    assert not pending(env).exists()
    assert_exported(env, MODEL, port)
    assert assert_state(env) == {port: copies(env)[0]}


def test_load_elsewhere_while_unresponsive_is_refused(world: Env) -> None:
    """M serves on P1 but does not answer (its group is stopped): `load M P2` is refused — one
    model, one port — and `load M auto` and `up` start no second copy either."""
    env = world
    p1, p2 = env.team[0], env.team[1]
    result = env.run("load", MODEL, str(p1))
    assert result.returncode == 0, result.stderr
    pgid = read_record(env, p1)["pgid"]
    os.killpg(pgid, signal.SIGSTOP)
    try:
        before = env.registry_path.read_bytes()
        rows = {row["port"]: row for row in status(env)["ports"]}
        assert rows[p1]["state"] == "unresponsive" and rows[p1]["ours"] is True
        run = run_with_faults(env, "--json", "load", MODEL, str(p2))
        line = assert_failed(run, 1)
        assert MODEL in line
        assert copies(env) == [read_record(env, p1)["pid"]]
        assert env.registry_path.read_bytes() == before
        for argv in (("load", MODEL, "auto"), ("up",)):
            result = env.run(*argv)
            assert "Traceback" not in result.stderr
            assert copies(env) == [read_record(env, p1)["pid"]], argv
        assert models(env)[MODEL]["port"] == p1
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert assert_state(env) == {p1: copies(env)[0]}


def test_stale_reservation_on_a_fresh_state_dir_is_cleared_in_one_go(world: Env) -> None:
    """kill -9 right after the reservation of the first load ever (no run/ directory yet): the
    next command clears the stale reservation and goes on; it must not fail on the spawn lock of
    a directory that was never created."""
    env = world
    run = load(env, at_milestone="reserved", action="kill")
    assert run.returncode == -signal.SIGKILL
    assert not (env.state / "run").exists()
    result = env.run("--json", "reconcile")
    assert result.returncode == 0, result.stderr
    assert "reservation" not in models(env)[MODEL]


def test_rolled_back_load_leaves_the_gateway_not_stale(world: Env) -> None:
    """A load of a model that was not exported, interrupted and rolled back, changed nothing the
    gateway shows: status must not report the gateway stale (gateway.pending is for a sync that
    failed after a change, SPEC §5.2)."""
    env = world
    run = load(env, at_milestone="spawned", action="SIGINT")
    assert run.returncode == 130
    assert status(env)["gateway"]["pending_since"] is None
    assert not pending(env).exists()


def test_sync_failing_at_env_local_keeps_a_startable_gateway(world: Env) -> None:
    """Another model is already exported; loading M adds variables. env.local cannot be written:
    router.yaml must not name variables that env.local lacks (SPEC §7.6: env.local first)."""
    env = world
    env.add_model("mlx-beta", None, knobs=FAST)
    result = env.run("load", "mlx-beta", str(env.team[0]))
    assert result.returncode == 0, result.stderr
    assert_gateway_startable(env)
    run = load(env, fail_path=atomic_temp(env.env_file), errno="ENOSPC")
    assert run.fired
    assert_failed(run, 4)
    assert_gateway_startable(env)
    recover(env)


@pytest.mark.parametrize("code", ["EACCES", "EROFS"])
def test_owed_sync_marker_that_cannot_be_removed(world: Env, code: str) -> None:
    """The sync succeeded but gateway.pending cannot be removed: no traceback; the marker stays
    (the next syncing command syncs again, harmlessly) and the load stands."""
    env, port = world, world.exp[0]
    run = load(env, fail_path=str(pending(env)), errno=code, ops=("unlink",))
    assert run.fired
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode in (0, 4), run.stderr
    if run.returncode:
        own_error_line(run.stderr)
    one_json(run.stdout)
    assert models(env)[MODEL]["port"] == port
    assert_exported(env, MODEL, port)
    assert assert_state(env) == {port: copies(env)[0]}
    recover(env)


# -- the conversion's temp dir ------------------------------------------------------------------

CONVERT_SCRIPT = 'mkdir -p "$2" && cp "$1/config.json" "$2/" && echo w > "$2/weights.safetensors"'


@pytest.fixture
def hub(env: Env) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        env.set(HF_ENDPOINT=fake.endpoint, HF_HUB_DISABLE_XET="1")
        yield fake


CONVERSION_CASES = [
    ("replace", "EACCES", "converting"),
    ("replace", "EROFS", "converting"),
    ("replace", "ENOSPC", "converting"),
    ("mkdir", "EACCES", "converted-dir"),
    ("open", "ENOSPC", "convert-lock"),
]


@pytest.mark.parametrize(
    ("op", "code", "where"), CONVERSION_CASES, ids=[f"{w}-{o}-{c}" for o, c, w in CONVERSION_CASES]
)
def test_conversion_that_cannot_be_placed_leaves_nothing(
    env: Env, hub: FakeHub, op: str, code: str, where: str
) -> None:
    """`ensure` converts into `.<id>.converting` and renames it into place: when that (or the
    directory or its lock) fails, exit 1 in one line, no temp dir left, the registry untouched,
    and the next `ensure` succeeds."""
    hub.add_repo(
        "test-org/plain",
        {"config.json": json.dumps({"model_type": "llama"}).encode(), "model.safetensors": b"1"},
    )
    script = write_script(env.tmp / "convert", CONVERT_SCRIPT)
    env.set(MLX_CONVERT_CMD=f"{script} {{src}} {{dest}}")
    converted = env.hub / "mlx-converted"
    target = {
        "converting": str(converted / ".mlx-plain.converting"),
        "converted-dir": str(converted),
        "convert-lock": str(env.state / "convert-mlx-plain.lock"),
    }[where]
    before = env.registry_path.read_bytes() if env.registry_path.exists() else None
    run = run_with_faults(
        env, "--json", "ensure", "test-org/plain", "--no-offload-og",
        fail_path=target, errno=code, ops=(op,),
    )  # fmt: skip
    assert run.fired, run.stderr
    line = assert_failed(run, 1)
    assert os.strerror(getattr(errno, code)) in line
    if converted.exists():
        assert not list(converted.glob(".*converting*"))
    assert not (converted / "mlx-plain").exists()
    after = env.registry_path.read_bytes() if env.registry_path.exists() else None
    assert after == before
    result = env.run("ensure", "test-org/plain", "--no-offload-og")
    assert result.returncode == 0, result.stderr
    assert (converted / "mlx-plain" / "config.json").exists()
    assert not list(converted.glob(".*converting*"))
