"""Proof under faults (issue 5): the registry, the servers and the gateway always end up in
agreement.

A model-based random walk (seeded; fixed seeds in CI) of `load`, `unload`, `unload-all`,
`reconcile`, `up`, `sync-gateway`, `assign-team` and `set`, every one run as the real file by
subprocess against stand-in servers, interleaved with faults:

- `kill -9` of a server;
- a model that crashes while loading (`exit_before_bind`) or right after binding (`crash_after`),
  or that ignores SIGTERM (the stop then needs SIGKILL);
- `kill -9` of mlxctl itself in the middle of a load, an unload, a sync, an assign-team;
- a busy port (a plain socket of the test listening on an assigned or a free port);
- an SSH failure during the sync of a mutating command (GATEWAY_HOST names a host, MLXCTL_SSH is
  a script that exits 255): exit 4 and gateway.pending, healed by a later sync.

After every step: the registry parses and keeps SPEC §5.1's invariants, its generation never goes
back, unknown fields survive; the bytes of the gateway files outside mlxctl's entries never change;
each command's own post-condition holds (a load that exits 0 serves, an unload that exits 0 left
the port closed, ...); after every successful sync the three gateway files equal the export.
Every SETTLE_EVERY steps the faults are lifted and `reconcile` + `up` must leave every assigned
port served by its model and nothing else of ours running (status --json, the runtime records and
the processes in /proc agree).

MLXCTL_SOAK=1 (`make soak`) walks more seeds, longer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MLXCTL, Env
from fixtures import procs

SOAK = os.environ.get("MLXCTL_SOAK", "") == "1"
SEEDS = (11, 23, 37, 41, 53, 67) if SOAK else (11, 23)
STEPS = int(os.environ.get("MLXCTL_WALK_STEPS") or (500 if SOAK else 150))
SETTLE_EVERY = 25

# model -> (weights size, optillm): sizes and groups give assign-team a real plan
MODELS = {
    "mlx-walk-0": (4000, True),
    "mlx-walk-1": (3000, False),
    "mlx-walk-2": (2000, True),
    "mlx-walk-3": (1000, False),
}
HEALTHY = {"start_delay": 0.05}
FAULTS = ("kill-server", "crash-knobs", "kill-mlxctl", "busy-port", "ssh-failure")
DEAD_API_BASE = "http://127.0.0.1:9/v1"
OPTILLM_API_BASE = "http://127.0.0.1:4020/v1"
SLOT_RE = re.compile(r"ep_mlx_slot_\d+")

# Foreign content of the three gateway files: every byte must survive every step.
ROUTER = """\
# hand-written: survives every step byte for byte
model_list:
  # the operator's aliases reference the handles' variables
  - model_name: main
    litellm_params:
      model: os.environ/MLX_MLX_WALK_0_MODEL
      api_base: os.environ/MLX_MLX_WALK_0_API_BASE
      api_key: os.environ/MLX_MLX_WALK_0_API_KEY
  - model_name: deep
    litellm_params:
      model: os.environ/MLX_ROUTER_MLX_WALK_1_MODEL
      api_base: os.environ/MLX_ROUTER_MLX_WALK_1_API_BASE
      api_key: os.environ/MLX_ROUTER_MLX_WALK_1_API_KEY
  - model_name: elsewhere
    litellm_params: {model: openai/x, api_base: "http://127.0.0.1:9/v1", api_key: k}

router_settings:
  num_retries: 0   # trailing comment
litellm_settings:
  drop_params: true
"""
ENV_HEAD = "LITELLM_MASTER_KEY=sk-do-not-touch\n# the operator's own lines\nOTHER=1\n"
HANDLES_FOREIGN = (
    '{"handle":"someone-else","kind":"model","endpoint_ref":"ep_other"}\n'
    "not json, kept byte for byte\n"
    '{"handle": "spaced", "kind": "alias"}\n'
)


def outside_markers(text: str) -> str:
    """The text with mlxctl's marked block (marker lines included) removed."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == "# BEGIN MLXCTL AUTO"]
    ends = [i for i, line in enumerate(lines) if line.strip() == "# END MLXCTL AUTO"]
    if not begins and not ends:
        return text
    assert len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0], text
    return "".join(lines[: begins[0]] + lines[ends[0] + 1 :])


def inside_markers(text: str) -> str:
    lines = text.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == "# BEGIN MLXCTL AUTO")
    end = next(i for i, line in enumerate(lines) if line.strip() == "# END MLXCTL AUTO")
    return "".join(lines[begin + 1 : end])


def managed_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    ref = row.get("endpoint_ref")
    if row.get("handle") in MODELS or (isinstance(ref, str) and SLOT_RE.fullmatch(ref)):
        return row
    return None


def stem(handle: str) -> str:
    return handle.upper().replace("-", "_")


def served_id(port: int) -> str | None:
    """What /v1/models on the port reports, or None when nothing answers like a model server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        body = json.loads(response.read())
        return str(body["data"][0]["id"]) if response.status == 200 else None
    except (OSError, ValueError, KeyError, IndexError, TypeError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Walk:
    """The world, the model of what must hold in it, and the steps that change it."""

    def __init__(self, env: Env, seed: int) -> None:
        self.env = env
        self.seed = seed
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.reaped = 0
        self.settles = 0
        self.syncs_checked = 0
        self.generation = -1
        self.busy: socket.socket | None = None
        self.busy_port: int | None = None
        self.route = True  # SPEC §7.4: on until a flag says otherwise
        self.crashy_until: dict[str, float] = {}  # model -> last step its servers may crash
        self.step_no = 0
        self.paths: dict[str, str] = {}
        self.team = range(env.team[0], env.team[-1] + 1)
        self.exp = range(env.exp[0], env.exp[-1] + 1)
        self.ssh = env.tmp / "failing-ssh"
        self.ssh.write_text(
            "#!/bin/sh\necho 'ssh: connect to host mini port 22: Connection refused' >&2\nexit 255\n"
        )
        self.ssh.chmod(0o755)
        env.set(MLX_STOP_TIMEOUT="1", MLX_START_TIMEOUT="20")
        for model_id, (size, optillm) in MODELS.items():
            path = env.add_model(
                model_id,
                None,
                optillm=optillm,
                x_unknown={"kept": [1, "two"]},
                knobs={"size": size, **HEALTHY},
            )
            self.paths[model_id] = str(path)
        data = env.registry()
        data["x_top_unknown"] = {"kept": True}
        data["generation"] = 1
        env.registry_path.write_text(json.dumps(data, indent=2))
        env.router.parent.mkdir(parents=True, exist_ok=True)
        env.handles.parent.mkdir(parents=True, exist_ok=True)
        env.router.write_text(ROUTER)
        env.env_file.write_text(ENV_HEAD)
        env.env_file.chmod(0o600)
        env.handles.write_text(HANDLES_FOREIGN)

    # -- running mlxctl -------------------------------------------------------------------------

    def mlxctl(
        self, *args: str, environ: dict[str, str] | None = None, codes: tuple[int, ...] = (0, 1)
    ) -> tuple[int, dict[str, Any] | None, str]:
        """The real file; `--json` for mutating commands, whose one result object is returned."""
        result = subprocess.run(
            [sys.executable, str(MLXCTL), *args],
            env=environ or self.env.environ(),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        where = f"seed {self.seed} step {self.step_no}: mlxctl {' '.join(args)}"
        assert "Traceback" not in result.stderr, f"{where}\n{result.stderr}"
        assert result.returncode in codes, f"{where}: exit {result.returncode}\n{result.stderr}"
        errors = [x for x in result.stderr.splitlines() if x.startswith("mlxctl: error:")]
        assert len(errors) == (result.returncode not in (0, 3)), f"{where}\n{result.stderr}"
        reply = None
        if "--json" in args:
            lines = result.stdout.splitlines()
            assert len(lines) == 1, f"{where}: one JSON object expected\n{result.stdout}"
            reply = json.loads(lines[0])
            if "ok" in reply:
                assert reply["ok"] is (result.returncode == 0), f"{where}: {reply}"
        self.outcomes[f"{args[1] if args[0] == '--json' else args[0]}:{result.returncode}"] += 1
        return result.returncode, reply, result.stderr

    def command(self, *args: str) -> tuple[int, dict[str, Any]]:
        code, reply, _ = self.mlxctl("--json", *args)
        assert reply is not None
        status = (reply.get("sync") or {}).get("status")
        if code == 0 and status in ("changed", "state-only", "unchanged"):
            self.check_gateway()
        return code, reply

    # -- reading the world ----------------------------------------------------------------------

    def registry(self) -> dict[str, Any]:
        data = json.loads(self.env.registry_path.read_text())
        assert isinstance(data, dict)
        return data

    def assigned(self) -> dict[str, int]:
        """model -> port, for every model with a port."""
        return {k: e["port"] for k, e in self.registry()["models"].items() if e["port"] is not None}

    def exported(self) -> dict[str, int]:
        """SPEC §7.1, independently: a port and no reservation; between steps every withheld mark
        is stale (its owner exited), and stale marks do not withhold."""
        models = self.registry()["models"]
        return {
            k: e["port"]
            for k, e in models.items()
            if isinstance(e["port"], int) and "reservation" not in e
        }

    def records(self) -> dict[int, dict[str, Any]]:
        run = self.env.state / "run"
        found = {}
        for path in run.glob("*.json") if run.is_dir() else []:
            found[int(path.stem)] = json.loads(path.read_text())
        return found

    def live_record(self, record: dict[str, Any]) -> bool:
        """The recorded leader still runs with the recorded start time (SPEC §5.2 'ours')."""
        info = procs.stat(int(record["pid"]))
        if info is None or info.state == "Z":
            return False
        fields = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19] == record["start_time"] and info.pgid == int(record["pgid"])

    def stable(self, model_id: str) -> bool:
        """No crash knob on this model lately: a server of it may not die at any moment."""
        return self.step_no > self.crashy_until.get(model_id, -1)

    def pending(self) -> bool:
        return (self.env.state / "gateway.pending").exists()

    # -- invariants -----------------------------------------------------------------------------

    def check_registry(self) -> None:
        data = self.registry()
        assert data["version"] == 1
        assert isinstance(data["generation"], int) and data["generation"] >= self.generation, (
            "generation went back"
        )
        self.generation = data["generation"]
        assert data["x_top_unknown"] == {"kept": True}
        models = data["models"]
        assert set(models) == set(MODELS), "a model was lost or invented"
        owners: dict[int, str] = {}
        for key, entry in models.items():
            assert entry["model_id"] == key
            assert entry["cache_path"] == self.paths[key]
            assert entry["format"] == "mlx"
            assert entry["x_unknown"] == {"kept": [1, "two"]}
            port = entry["port"]
            if port is None:
                assert "reservation" not in entry, f"{key}: a reservation without a port"
                continue
            assert isinstance(port, int) and not isinstance(port, bool)
            assert port in self.team or port in self.exp, f"{key}: port {port} out of range"
            assert port not in owners, f"port {port}: {owners.get(port)} and {key}"
            owners[port] = key

    def check_foreign_bytes(self) -> None:
        router = self.env.router.read_text()
        env_text = self.env.env_file.read_text()
        handles = self.env.handles.read_text()
        assert outside_markers(router) == ROUTER, router
        assert outside_markers(env_text) == ENV_HEAD, env_text
        assert "".join(x for x in handles.splitlines(True) if not managed_row(x)) == HANDLES_FOREIGN
        assert stat.S_IMODE(self.env.env_file.stat().st_mode) == 0o600, "env.local mode changed"
        # every file still parses as what LiteLLM expects, whatever instant a kill hit
        assert isinstance(yaml.safe_load(router), dict)

    def check_gateway(self) -> None:
        """After a successful sync: the three files are exactly the export (SPEC §7)."""
        self.syncs_checked += 1
        assert not self.pending(), "a successful sync left gateway.pending"
        exported = self.exported()
        models = self.registry()["models"]
        by_port = sorted(exported.items(), key=lambda kv: (kv[1], kv[0]))
        # handles.jsonl: the managed rows, sorted by port, in the documented shape
        rows = [managed_row(x) for x in self.env.handles.read_text().splitlines()]
        assert [r for r in rows if r] == [
            {
                "handle": h,
                "kind": "model",
                "invoke": "openai-chat",
                "managed_by": "launchd",
                "endpoint_ref": f"ep_mlx_slot_{p}",
                "selector": {"model": h},
            }
            for h, p in by_port
        ]
        # router.yaml: the block holds exactly the exported handles (and their router- twins)
        router = self.env.router.read_text()
        block = yaml.safe_load(inside_markers(router)) or []
        names = [item["model_name"] for item in block]
        want = []
        for handle, _ in by_port:
            want += [handle, f"router-{handle}"] if self.route else [handle]
        assert names == want, (names, want)
        for item in block:
            handle = item["model_name"].removeprefix("router-")
            prefix = "MLX_ROUTER_" if item["model_name"].startswith("router-") else "MLX_"
            entry = models[handle]
            params = item["litellm_params"]
            assert params["api_base"] == f"os.environ/{prefix}{stem(handle)}_API_BASE"
            assert params["model"] == f"os.environ/{prefix}{stem(handle)}_MODEL"
            assert params["max_tokens"] == entry["max_output_tokens"]
            for key, value in (entry.get("request_params") or {}).items():
                assert params[key] == value
            assert item["model_info"]["max_input_tokens"] == entry["context_length"]
        parsed = yaml.safe_load(router)
        everywhere = [i.get("model_name") for i in parsed["model_list"]]
        assert sorted(everywhere) == sorted([*want, "main", "deep", "elsewhere"])
        # env.local: each handle's variables point at its port (OptiLLM on: the router twin does)
        env_vars = dict(
            line.split("=", 1)
            for line in inside_markers(self.env.env_file.read_text()).splitlines()
            if "=" in line and not line.startswith("#")
        )
        for handle, port in by_port:
            direct = f"http://127.0.0.1:{port}/v1"
            if self.route:
                assert env_vars[f"MLX_{stem(handle)}_API_BASE"] == OPTILLM_API_BASE
                assert env_vars[f"MLX_ROUTER_{stem(handle)}_API_BASE"] == direct
            else:
                assert env_vars[f"MLX_{stem(handle)}_API_BASE"] == direct
        # the aliases' variables exist even when their model is not exported: a dead address
        if "mlx-walk-0" not in exported:
            assert env_vars["MLX_MLX_WALK_0_API_BASE"] == DEAD_API_BASE
        if "mlx-walk-1" not in exported or not self.route:
            assert env_vars["MLX_ROUTER_MLX_WALK_1_API_BASE"] == DEAD_API_BASE
        for name, value in env_vars.items():
            port_match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1", value)
            if port_match and value not in (DEAD_API_BASE, OPTILLM_API_BASE):
                assert int(port_match.group(1)) in exported.values(), (name, value)

    def check_settled(self) -> None:
        """Every assigned port serves its model; nothing else of ours runs (SPEC §1, §5.2)."""
        assigned = self.assigned()
        _, status, _ = self.mlxctl("--json", "status", "--check", codes=(0,))
        assert status is not None
        busy = {p["port"]: p for p in status["ports"] if p["state"] != "free"}
        assert {p: v["state"] for p, v in busy.items()} == dict.fromkeys(
            assigned.values(), "serving"
        ), status
        records = self.records()
        servers = procs.servers_under(self.env.tmp / "models")
        for model_id, port in assigned.items():
            view = busy[port]
            assert view["model_id"] == model_id and view["ours"] is True
            assert served_id(port) == self.paths[model_id]
            record = records[port]
            assert record["model_id"] == model_id and self.live_record(record)
            assert view["pid"] == record["pid"]
        live_records = {p: r for p, r in records.items() if self.live_record(r)}
        assert set(live_records) == set(assigned.values()), "a live runtime record is unassigned"
        # the processes: exactly one group per assigned port, each the recorded one
        assert {s.pgid for s in servers.values()} == {
            int(r["pgid"]) for r in live_records.values()
        }, (servers, live_records)
        for server in servers.values():
            record = live_records[server.port]  # type: ignore[index]
            assert record["pgid"] == server.pgid
            assert server.model_path == self.paths[record["model_id"]]

    def after_step(self) -> None:
        self.reaped += procs.reap_detached_zombies()
        self.check_registry()
        self.check_foreign_bytes()

    # -- the steps ------------------------------------------------------------------------------

    def port(self) -> int:
        """A port worth naming: mostly the first few of each range, sometimes an assigned one."""
        assigned = list(self.assigned().values())
        if assigned and self.rng.random() < 0.4:
            return self.rng.choice(assigned)
        return self.rng.choice([*self.team[:4], *self.exp[:4]])

    def model(self) -> str:
        return self.rng.choice(sorted(MODELS))

    def sync_flag(self) -> list[str]:
        return ["--no-sync"] if self.rng.random() < 0.3 else []

    def knobs(self, model_id: str, knobs: dict[str, Any]) -> None:
        Path(self.paths[model_id], "standin.json").write_text(json.dumps(knobs))
        if "crash_after" in knobs or "exit_before_bind" in knobs:
            self.crashy_until[model_id] = math.inf
        elif self.crashy_until.get(model_id) == math.inf:
            # servers started with the old knobs may still be about to crash
            self.crashy_until[model_id] = self.step_no + 3

    def step(self) -> None:
        kinds = {
            "load": 26,
            "unload": 12,
            "unload-all": 3,
            "reconcile": 6,
            "up": 6,
            "sync-gateway": 6,
            "assign-team": 4,
            "set": 4,
            "kill-server": 7,
            "crash-knobs": 6,
            "kill-mlxctl": 9,
            "busy-port": 4,
            "ssh-failure": 5,
        }
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        self.counts[kind] += 1
        getattr(self, "do_" + kind.replace("-", "_"))()

    def do_load(self, environ: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
        model_id = self.model()
        port = self.rng.choice(["auto", str(self.port())])
        args = ("--json", "load", model_id, port, *([] if environ else self.sync_flag()))
        code, reply, err = self.mlxctl(
            *args, environ=environ, codes=(0, 1, 4) if environ else (0, 1)
        )
        assert reply is not None
        if code in (0, 4):
            entry = self.registry()["models"][model_id]
            assert entry["port"] == reply["port"] and "reservation" not in entry
            if port != "auto":
                assert reply["port"] == int(port)
            assert reply["port"] != self.busy_port
            if self.stable(model_id):
                assert served_id(reply["port"]) == self.paths[model_id]
        if code == 0 and not environ and reply["sync"]["status"] not in ("skipped", "not-needed"):
            self.check_gateway()
        return code, reply, err

    def do_unload(self, environ: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
        port = self.port()
        code, reply, err = self.mlxctl(
            "--json",
            "unload",
            str(port),
            *([] if environ else self.sync_flag()),
            environ=environ,
            codes=(0, 1, 4) if environ else (0, 1),
        )
        assert reply is not None
        if code in (0, 4):
            assert port not in self.assigned().values()
            assert refused(port), f"unload {port} exited {code} but the port still accepts"
        if code == 0 and not environ and reply["sync"]["status"] not in ("skipped", "not-needed"):
            self.check_gateway()
        return code, reply, err

    def do_unload_all(self) -> None:
        code, _ = self.command("unload-all")
        if code == 0:
            assert self.assigned() == {}
            assert procs.servers_under(self.env.tmp / "models") == {}, "unload-all left a server"

    def do_reconcile(self) -> None:
        code, _ = self.command("reconcile")
        if code == 0:
            models = self.registry()["models"]
            assert not [k for k, e in models.items() if "reservation" in e or "withheld" in e]
            assigned = self.assigned()
            for port, record in self.records().items():
                if self.live_record(record):
                    assert assigned.get(record["model_id"]) == port, f"orphan on {port} kept"

    def do_up(self) -> None:
        code, _ = self.command("up")
        if code == 0:
            for model_id, port in self.assigned().items():
                if self.stable(model_id) and port != self.busy_port:
                    assert served_id(port) == self.paths[model_id], f"up left {model_id} dead"

    def do_sync_gateway(self) -> None:
        flag = self.rng.choice([[], [], ["--route-via-optillm"], ["--no-route-via-optillm"]])
        if flag:
            self.route = flag == ["--route-via-optillm"]
        code, reply = self.command("sync-gateway", *flag)
        assert code == 0, reply
        if flag:
            code, reply = self.command("sync-gateway")  # the flag is remembered
            assert code == 0 and reply["sync"]["route_via_optillm"] is self.route
        self.check_gateway()

    def do_assign_team(self) -> None:
        before = set(self.assigned())
        code, _ = self.command("assign-team")
        after = self.assigned()
        if code == 0:
            assert set(after) == before
            assert all(port in self.team for port in after.values()), after

    def do_set(self) -> None:
        value = self.rng.choice(["low", "high", "", 0.5, 7])
        code, _ = self.command(
            "set", self.model(), f"request_params.walk_param={json.dumps(value)}"
        )
        assert code == 0

    # -- the faults -----------------------------------------------------------------------------

    def do_kill_server(self) -> None:
        servers = list(procs.servers_under(self.env.tmp / "models").values())
        if servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(servers).pid, signal.SIGKILL)

    def do_crash_knobs(self) -> None:
        model_id = self.model()
        knobs = self.rng.choice(
            [
                {"start_delay": 0.05, "exit_before_bind": self.rng.choice([0, 1])},
                {"start_delay": 0.05, "crash_after": round(self.rng.uniform(0.0, 0.3), 2)},
                {"start_delay": 0.05, "ignore_sigterm": True},
                HEALTHY,
                HEALTHY,
            ]
        )
        self.knobs(model_id, knobs)

    def do_kill_mlxctl(self) -> None:
        """kill -9 of mlxctl itself, some random instant into a load, unload, sync, move."""
        model_id = self.model()
        args = self.rng.choice(
            [
                ["load", model_id, "auto"],
                ["load", model_id, str(self.port())],
                ["unload", str(self.port())],
                ["sync-gateway"],
                ["unload-all"],
                ["assign-team"],
                ["up"],
            ]
        )
        slow = args[0] == "load" and self.stable(model_id)
        if slow:  # a wider window to be killed in
            self.knobs(model_id, {"start_delay": round(self.rng.uniform(0.2, 0.6), 2)})
        child = subprocess.Popen(
            [sys.executable, str(MLXCTL), *args],
            env=self.env.environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(self.rng.uniform(0.05, 0.9))
        child.kill()
        child.wait(30)
        self.outcomes[f"killed-{args[0]}:{child.returncode}"] += 1
        if slow:
            self.knobs(model_id, HEALTHY)

    def do_busy_port(self) -> None:
        if self.busy is not None:
            self.busy.close()
            self.busy, self.busy_port = None, None
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = self.port()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(4)
        except OSError:
            sock.close()
            return
        self.busy, self.busy_port = sock, port

    def do_ssh_failure(self) -> None:
        """One step with the gateway behind a failing SSH: a change is kept, exit 4 and
        gateway.pending; a later successful sync heals it (check_gateway asserts that)."""
        environ = {**self.env.environ(), "GATEWAY_HOST": "mini", "MLXCTL_SSH": str(self.ssh)}
        had_pending = self.pending()
        gateway = (self.env.router, self.env.env_file, self.env.handles)
        before = [p.read_bytes() for p in gateway]
        verb = self.rng.choice(["load", "load", "unload", "set", "sync-gateway"])
        if verb == "sync-gateway":
            code, reply, err = self.mlxctl("--json", "sync-gateway", environ=environ)
            assert code == 1 and reply is not None and reply["error"]
            assert "ssh to mini failed" in err and "Connection refused" in err
            assert self.pending() == had_pending
        elif verb == "set":
            model_id = self.model()
            exported = model_id in self.exported()
            code, reply, err = self.mlxctl(
                "--json",
                "set",
                model_id,
                f"request_params.ssh_step={self.step_no}",
                environ=environ,
                codes=(0, 4),
            )
            assert code == (4 if exported or had_pending else 0), err
            entry = self.registry()["models"][model_id]
            assert entry["request_params"]["ssh_step"] == self.step_no, "the change was lost"
        else:
            code, reply, err = (self.do_load if verb == "load" else self.do_unload)(environ)
            if code == 0:
                assert not had_pending and reply["sync"]["status"] == "not-needed", reply
        if code == 4:
            assert self.pending(), "exit 4 without gateway.pending"
            assert reply["sync"]["status"] == "failed"
            assert "change applied but the gateway sync failed: ssh to mini failed" in err
            assert "Connection refused" in err
        elif verb != "sync-gateway":
            assert self.pending() == had_pending
        assert [p.read_bytes() for p in gateway] == before, "a failed remote sync wrote here"

    # -- settling -------------------------------------------------------------------------------

    def settle(self) -> None:
        """Lift every fault; then reconcile + up must bring all three truths into agreement."""
        self.settles += 1
        if self.busy is not None:
            self.busy.close()
            self.busy, self.busy_port = None, None
        for model_id in MODELS:
            self.knobs(model_id, HEALTHY)
        # a server started with crash_after (or ignore_sigterm) is still running with it: stop
        # the crashers' chance to die mid-check by waiting out the longest crash_after
        time.sleep(0.4)
        self.crashy_until.clear()
        code, _ = self.command("reconcile")
        assert code == 0
        self.after_step()
        # servers that ignore SIGTERM keep that knob until restarted: restart them healthy
        code, _ = self.command("up")
        assert code == 0
        self.after_step()
        self.check_settled()
        code, _ = self.command("sync-gateway")
        assert code == 0
        self.check_gateway()


def run_walk(env: Env, seed: int, steps: int, capsys: pytest.CaptureFixture[str]) -> None:
    walk = Walk(env, seed)
    started = time.monotonic()
    try:
        with procs.child_subreaper():
            for number in range(1, steps + 1):
                walk.step_no = number
                walk.step()
                walk.after_step()
                if number % SETTLE_EVERY == 0 or number == steps:
                    walk.settle()
    finally:
        if walk.busy is not None:
            walk.busy.close()
    faults = sum(walk.counts[k] for k in FAULTS)
    litter = [
        p
        for d in (env.hub, env.state / "run", env.router.parent, env.handles.parent)
        for p in d.glob(".*.tmp-*")
    ]
    loads_ok = walk.outcomes["load:0"] + walk.outcomes["load:4"]
    # a walk in which (almost) nothing succeeded would prove nothing
    assert loads_ok >= walk.counts["load"] // 4, walk.outcomes
    assert walk.syncs_checked >= walk.settles
    with capsys.disabled():
        print(
            f"\nrandom walk seed={seed}: {steps} steps, {faults} faults, {walk.settles} settles, "
            f"{walk.syncs_checked} gateway checks, {walk.reaped} zombies reaped, "
            f"{len(litter)} temp files left by kills, "
            f"{time.monotonic() - started:.0f}s; every invariant held\n"
            f"  steps: {dict(sorted(walk.counts.items()))}\n"
            f"  exits: {dict(sorted(walk.outcomes.items()))}"
        )


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.skipif(not procs.IS_LINUX, reason="reads /proc")
@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_under_faults(env: Env, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        run_walk(env, seed, STEPS, capsys)
    finally:
        procs.kill_servers_under(env.tmp / "models")
