"""Proof under faults (issues 5 and 9): a seeded random walk of mlxctl commands against stand-in
servers, interleaved with faults, checking after every step that the registry, the servers and the
gateway files agree. Besides killed servers, crashing models, busy ports, SSH failures and kills of
mlxctl at random moments, the walk injects the faults of tests/fixtures/faults.py: a write point
that fails (ENOSPC, EACCES, EROFS, ENOTDIR on open, fsync, replace or mkdir) during a command, and
a kill -9, a signal or a dropped session at a milestone of a load. Fixed seeds in CI;
MLXCTL_SOAK=1 runs longer walks."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import time
from collections import Counter, deque
from pathlib import Path

import pytest
from conftest import Env
from fixtures.faults import (
    ACTIONS,
    ERRNOS,
    MILESTONES,
    WRITE_POINTS,
    FaultRun,
    PathFault,
    run_with_faults,
)
from helpers import (
    SOAK,
    live_pids_mentioning,
    outside_block,
    run_records,
    spawn_mlxctl,
    standin_pids,
    status_rows,
    write_knobs,
    write_script,
)

import mlxctl

STEPS = 600 if SOAK else 120
TRACE = os.environ.get("MLXCTL_WALK_TRACE") == "1"  # print each step as it starts
MODELS = [f"mlx-walk-{i}" for i in range(4)]
ROUTER = """\
# hand-written: must survive every step byte for byte
model_list:
  - model_name: main
    litellm_params:
      model: os.environ/MLX_MLX_WALK_0_MODEL
      api_base: os.environ/MLX_MLX_WALK_0_API_BASE
      api_key: os.environ/MLX_MLX_WALK_0_API_KEY
  - model_name: elsewhere
    litellm_params: {model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}
router_settings:
  num_retries: 0
"""
ENV_HEAD = "SECRET_TOKEN=do-not-touch\n# a comment\n"
FAULTS = (
    "kill-server",
    "crashing-model",
    "kill-mlxctl",
    "busy-port",
    "ssh-failure",
    "write-fault",
    "milestone-fault",
)
# the operations a write point goes through (atomic writes: all three of open, fsync, replace)
OPS_AT = {
    **{point: ("mkdir",) for point in ("run-dir", "log-dir", "gateway-dir")},
    **{point: ("open",) for point in ("port-log", "registry-lock", "sync-lock")},
}
HANDLES_FOREIGN = '{"handle":"someone-else","kind":"model"}\nnot json, kept\n'


class Walk:
    def __init__(self, env: Env, seed: int) -> None:
        self.env = env
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.trail: deque[str] = deque(maxlen=10)  # the last steps, for a failure's message
        self.steps = 0
        self.busy: socket.socket | None = None
        self.last_stderr = ""  # of the last command, for a failed check's message
        self.failing_ssh = write_script(
            env.tmp / "failing-ssh", "echo 'ssh: connect to host mini: refused' >&2\nexit 255"
        )
        for model_id in MODELS:
            env.add_model(model_id, None, knobs={"start_delay": 0.05})
        env.router.parent.mkdir(parents=True, exist_ok=True)
        env.handles.parent.mkdir(parents=True, exist_ok=True)
        env.router.write_text(ROUTER)
        env.env_file.write_text(ENV_HEAD)
        env.handles.write_text(HANDLES_FOREIGN)

    def mlxctl(self, *args: str, environ: dict[str, str] | None = None) -> int:
        result = self.env.run(*args, env=environ)
        return self.judge(args, result.returncode, result.stderr)

    def judge(
        self, args: tuple[str, ...], code: int, stderr: str, interrupted: bool = False
    ) -> int:
        """A command's exit is a documented one, its error one line and never a traceback."""
        self.last_stderr = stderr
        assert "Traceback" not in stderr, stderr
        assert code in ((0, 1, 3, 4, 130) if interrupted else (0, 1, 3, 4)), (args, code, stderr)
        if code in (1, 3, 4):
            assert [line for line in stderr.splitlines() if line.startswith("mlxctl: error: ")]
        if code == 4:
            assert (self.env.state / "gateway.pending").exists()
        return code

    def faulted_command(self) -> tuple[str, ...]:
        """A command that writes: a load of an unassigned model, an unload of an assigned port,
        a change to a model, a sync or a reconcile."""
        models = self.env.registry()["models"]
        unassigned = [m for m in MODELS if models[m].get("port") is None]
        assigned = [str(e["port"]) for e in models.values() if isinstance(e.get("port"), int)]
        choices: list[tuple[str, ...]] = [
            ("set", self.rng.choice(MODELS), f"context_length={self.rng.randint(512, 8192)}"),
            ("sync-gateway",),
            ("reconcile",),
        ]
        if unassigned:
            load = ("load", self.rng.choice(unassigned), self.rng.choice(["auto", self.port()]))
            choices += [load, load]
        if assigned:
            choices.append(("unload", self.rng.choice(assigned)))
        return self.rng.choice(choices)

    def unassigned_model(self) -> str:
        """A model with no port, unloading one when every model has one."""
        models = self.env.registry()["models"]
        unassigned = [m for m in MODELS if models[m].get("port") is None]
        if unassigned:
            return self.rng.choice(unassigned)
        model_id = self.rng.choice(MODELS)
        self.mlxctl("unload", str(models[model_id]["port"]), "--no-sync")
        return model_id

    def port(self) -> str:
        return str(self.rng.choice(self.env.team[:4] + self.env.exp[:4]))

    def knobs(self, model_id: str, **knobs: object) -> None:
        model = Path(self.env.registry()["models"][model_id]["cache_path"])
        write_knobs(model, start_delay=0.05, **knobs)

    # -- steps and faults -----------------------------------------------------------------------

    def step(self) -> None:
        kind = self.rng.choices(
            [
                "load",
                "unload",
                "unload-all",
                "reconcile",
                "up",
                "sync",
                "assign-team",
                "kill-server",
                "crashing-model",
                "kill-mlxctl",
                "busy-port",
                "ssh-failure",
                "write-fault",
                "milestone-fault",
            ],
            weights=[30, 14, 3, 6, 6, 6, 3, 6, 4, 8, 3, 4, 10, 8],
        )[0]
        self.counts[kind] += 1
        self.trail.append(kind)
        self.steps += 1
        if TRACE:
            print(f"step {self.steps}: {kind}", flush=True)
        getattr(self, "do_" + kind.replace("-", "_"))()

    def do_load(self) -> None:
        sync = ["--no-sync"] if self.rng.random() < 0.5 else []
        self.mlxctl("load", self.rng.choice(MODELS), self.rng.choice(["auto", self.port()]), *sync)

    def do_unload(self) -> None:
        self.mlxctl("unload", self.port(), *(["--no-sync"] if self.rng.random() < 0.5 else []))

    def do_unload_all(self) -> None:
        self.mlxctl("unload-all")

    def do_reconcile(self) -> None:
        self.mlxctl("reconcile")

    def do_up(self) -> None:
        self.mlxctl("up")

    def do_sync(self) -> None:
        if self.mlxctl("sync-gateway") == 0:
            self.check_gateway()

    def do_assign_team(self) -> None:
        self.mlxctl("assign-team")

    def do_kill_server(self) -> None:
        records = run_records(self.env)
        if records:
            record = json.loads(self.rng.choice(records).read_text())
            if mlxctl.record_is_ours(record):
                os.killpg(int(record["pgid"]), signal.SIGKILL)

    def do_crashing_model(self) -> None:
        model_id = self.rng.choice(MODELS)
        fault = self.rng.choice([{"exit_before_bind": 0}, {"crash_after": 0.2}, {}])
        self.knobs(model_id, **fault)

    def do_kill_mlxctl(self) -> None:
        args = self.rng.choice(
            [
                ["load", self.rng.choice(MODELS), "auto"],
                ["unload", self.port()],
                ["sync-gateway"],
                ["reconcile"],
            ]
        )
        child = spawn_mlxctl(self.env.environ(), *args, capture=False)
        time.sleep(self.rng.uniform(0.02, 0.5))
        child.kill()
        child.wait()

    def do_busy_port(self) -> None:
        if self.busy is not None:
            self.busy.close()
            self.busy = None
            return
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", int(self.port())))
            sock.listen(1)
            self.busy = sock
        except OSError:
            sock.close()

    def do_ssh_failure(self) -> None:
        environ = {
            **self.env.environ(),
            "GATEWAY_HOST": "mini",
            "MLXCTL_SSH": str(self.failing_ssh),
        }
        code = self.mlxctl("load", self.rng.choice(MODELS), "auto", environ=environ)
        assert code in (0, 1, 4)
        if code == 4:
            assert (self.env.state / "gateway.pending").exists()

    def do_write_fault(self) -> None:
        """One command while one write point fails, once or every time (issue 9)."""
        point = self.rng.choice(sorted(WRITE_POINTS))
        glob_of, skip, _ = WRITE_POINTS[point]
        fault = PathFault(
            glob_of(self.env),
            self.rng.choice(ERRNOS),
            (self.rng.choice(OPS_AT.get(point, ("open", "fsync", "replace"))),),
            skip,
            times=self.rng.choice((1, None)),
        )
        args = self.faulted_command()
        run = run_with_faults(self.env, *args, faults=[fault])
        self.judge(args, run.returncode, run.stderr)
        fired = bool(run.fired_paths())
        self.counts["write faults that fired"] += fired
        self.trace(f"{shlex.join(args)} with {point} {fault.ops[0]} {fault.errno}", run, fired)

    def do_milestone_fault(self) -> None:
        """A load that is killed, signalled or loses its session at one of its milestones."""
        milestone, action = self.rng.choice(MILESTONES), self.rng.choice(ACTIONS)
        args = ("load", self.unassigned_model(), self.rng.choice(["auto", self.port()]))
        run = run_with_faults(self.env, *args, at_milestone=milestone, action=action)
        fired = run.fired_milestone() is not None
        self.counts["milestone faults that fired"] += fired
        self.trace(f"{shlex.join(args)} at {milestone} {action}", run, fired)
        if action == "kill" and fired:
            assert run.returncode == -signal.SIGKILL
            self.counts["kills of mlxctl at a milestone"] += 1
        elif action != "close-output":  # a dropped session's stderr is nobody's to read
            self.judge(args, run.returncode, run.stderr, interrupted=True)
        if fired and action.startswith("SIG"):
            assert run.returncode in (0, 4, 130), (args, milestone, action, run.stderr)

    @staticmethod
    def trace(what: str, run: FaultRun, fired: bool) -> None:
        if TRACE:
            print(f"  {what}: exit {run.returncode}, fired {fired}; {run.stderr.strip()[-300:]}")

    # -- invariants -----------------------------------------------------------------------------

    def check_one_copy(self) -> None:
        """No model runs twice: while a live process of ours holds a model, nothing starts another
        (issue 9)."""
        for model_id, entry in self.env.registry()["models"].items():
            copies = live_pids_mentioning(f"--model-path {entry['cache_path']} ")
            assert len(copies) <= 1, (model_id, copies, list(self.trail))

    def check_registry(self) -> None:
        data = json.loads(self.env.registry_path.read_text())
        assert mlxctl.schema_errors(data) == []
        ranges = (
            range(self.env.team[0], self.env.team[-1] + 1),
            range(self.env.exp[0], self.env.exp[-1] + 1),
        )
        assert mlxctl.invariant_violations(data["models"], ranges) == set()
        assert set(data["models"]) == set(MODELS)

    def check_foreign_bytes(self) -> None:
        # no sync may have run yet: a file without a block is all foreign bytes
        assert outside_block(self.env.router.read_text(), required=False) == ROUTER
        env_text = self.env.env_file.read_text()
        assert env_text.startswith(ENV_HEAD)
        assert outside_block(env_text, required=False) == ENV_HEAD
        kept = [
            line
            for line in self.env.handles.read_text().splitlines(keepends=True)
            if '"endpoint_ref":"ep_mlx_slot_' not in line
        ]
        assert "".join(kept) == HANDLES_FOREIGN

    def check_gateway(self) -> None:
        data = json.loads(self.env.registry_path.read_text())
        exported = {
            k: e["port"]
            for k, e in data["models"].items()
            if isinstance(e.get("port"), int)
            and "reservation" not in e
            and not mlxctl.mark_is_live(e.get("withheld"))
        }
        rows = [
            json.loads(line)
            for line in self.env.handles.read_text().splitlines()
            if '"endpoint_ref":"ep_mlx_slot_' in line
        ]
        assert {r["handle"]: int(r["endpoint_ref"].rsplit("_", 1)[1]) for r in rows} == exported
        router = self.env.router.read_text()
        for model_id, port in exported.items():
            assert f"- model_name: {model_id}\n" in router
            assert f"MLX_{mlxctl.env_stem(model_id)}_" in self.env.env_file.read_text()
            assert str(port) in self.env.env_file.read_text()

    def settle(self) -> None:
        """Faults off; then reconcile + up must leave every assignment served and no orphans."""
        if self.busy is not None:
            self.busy.close()
            self.busy = None
        for model_id in MODELS:
            self.knobs(model_id)
        self.mlxctl("reconcile")
        assert self.mlxctl("up") == 0, self.last_stderr
        result = self.env.run("--json", "status")
        assert result.returncode == 0, result.stderr
        assigned = {
            k: e["port"]
            for k, e in self.env.registry()["models"].items()
            if e.get("port") is not None
        }
        live = {p: row for p, row in status_rows(result.stdout).items() if row["state"] != "free"}
        assert {p: v["state"] for p, v in live.items()} == {p: "serving" for p in assigned.values()}
        for model_id, port in assigned.items():
            assert live[port]["model_id"] == model_id and live[port]["ours"]
        # no process of ours outside the registry: every stand-in running here is recorded
        recorded = {json.loads(r.read_text())["pgid"] for r in run_records(self.env)}
        for pid in standin_pids(self.env):
            assert os.getpgid(pid) in recorded
        assert self.mlxctl("sync-gateway") == 0
        self.check_gateway()
        assert not (self.env.state / "gateway.pending").exists()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 23])
def test_random_walk_under_faults(env: Env, seed: int) -> None:
    env.set(MLX_STOP_TIMEOUT="1", MLX_START_TIMEOUT="20")
    walk = Walk(env, seed)
    started = time.monotonic()
    for number in range(1, STEPS + 1):
        walk.step()
        walk.check_registry()
        walk.check_foreign_bytes()
        walk.check_one_copy()
        if number % 30 == 0:
            walk.settle()
    walk.settle()
    faults = sum(walk.counts[k] for k in FAULTS)
    print(
        f"\nrandom walk seed={seed}: {STEPS} steps, {faults} faults "
        f"({dict(sorted(walk.counts.items()))}) in {time.monotonic() - started:.0f}s; "
        "every invariant held"
    )
