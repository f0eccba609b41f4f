"""Proof under faults (issue 5): a seeded random walk of mlxctl commands against stand-in servers,
interleaved with faults, checking after every step that the registry, the servers and the gateway
files agree. Fixed seeds in CI; MLXCTL_SOAK=1 runs longer walks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Env
from helpers import (
    SOAK,
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
HANDLES_FOREIGN = '{"handle":"someone-else","kind":"model"}\nnot json, kept\n'


class Walk:
    def __init__(self, env: Env, seed: int) -> None:
        self.env = env
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
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
        self.last_stderr = result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode in (0, 1, 3, 4), (args, result.returncode, result.stderr)
        return result.returncode

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
            ],
            weights=[30, 14, 3, 6, 6, 6, 3, 6, 4, 8, 3, 4],
        )[0]
        self.counts[kind] += 1
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

    # -- invariants -----------------------------------------------------------------------------

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
        if number % 30 == 0:
            walk.settle()
    walk.settle()
    faults = sum(
        walk.counts[k]
        for k in ("kill-server", "crashing-model", "kill-mlxctl", "busy-port", "ssh-failure")
    )
    print(
        f"\nrandom walk seed={seed}: {STEPS} steps, {faults} faults "
        f"({dict(sorted(walk.counts.items()))}) in {time.monotonic() - started:.0f}s; "
        "every invariant held"
    )
