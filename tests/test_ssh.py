"""Studio <-> Mini over a real sshd on loopback (SPEC §4): forwarding, one-round-trip syncs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MLXCTL, Env, need
from fixtures.sshd import Sshd, available, read_calls, write_remote_wrapper, write_ssh_counter
from helpers import read_jsonl

pytestmark = pytest.mark.real

TRICKY = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "x; touch PWNED2", "`id`", "tab\there"]


class TwoHosts:
    def __init__(self, env: Env, sshd: Sshd) -> None:
        self.env = env
        self.sshd = sshd
        root = env.tmp
        self.calls = root / "ssh-calls.jsonl"
        ssh = write_ssh_counter(root / "counted-ssh", self.calls)
        common = {
            "MLXCTL_SSH": str(ssh),
            "MLXCTL_SSH_OPTIONS": f"-F {sshd.ssh_config}",
            "MLXCTL_SSH_CONNECT_TIMEOUT": "3",
            "PATH": "/usr/bin:/bin",
        }
        # line coverage follows the real file to the far side too (nothing else travels)
        common.update({k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")})
        self.gateway_root = root / "mini"
        self.studio_wrapper = root / "studio-mlxctl"
        self.gateway_wrapper = root / "gateway-mlxctl"
        studio_env = {k: v for k, v in env.vars.items()}
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
        }
        write_remote_wrapper(self.studio_wrapper, sys.executable, MLXCTL, studio_env)
        write_remote_wrapper(self.gateway_wrapper, sys.executable, MLXCTL, self.gateway_env)
        self.studio_env = studio_env

    @property
    def handles(self) -> Path:
        return self.gateway_root / "layer-gateway/registry/handles.jsonl"

    @property
    def router(self) -> Path:
        return self.gateway_root / "layer-gateway/litellm-orch/config/router.yaml"

    def run(self, side: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = self.studio_env if side == "studio" else self.gateway_env
        return subprocess.run(
            [sys.executable, str(MLXCTL), *args],
            env=env,
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
        yield TwoHosts(env, sshd)


def test_forwarded_load_reaches_the_studio_and_syncs_in_one_round_trip(hosts: TwoHosts) -> None:
    env = hosts.env
    env.add_model("mlx-a", None)
    result = hosts.run("gateway", "load", "mlx-a", "auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mlx-a", str(env.exp[0])]
    assert env.registry()["models"]["mlx-a"]["port"] == env.exp[0]
    calls = hosts.take_calls()
    # one call forwards the load, the Studio's sync is one more: the export travels on stdin
    assert [c[c.index("--") + 1 :][:3] for c in calls] == [
        [str(hosts.studio_wrapper), "--local", "load"],
        [str(hosts.gateway_wrapper), "--local", "--json"],
    ]
    for call in calls:
        assert call[:4] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=3"]
        assert "-t" not in call
    rows = read_jsonl(hosts.handles)
    assert [(r["handle"], r["endpoint_ref"]) for r in rows] == [
        ("mlx-a", f"ep_mlx_slot_{env.exp[0]}")
    ]
    assert "mlx-a" in hosts.router.read_text()
    # a sync by hand on the gateway fetches the export with one call
    result = hosts.run("gateway", "sync-gateway")
    assert result.returncode == 0, result.stderr
    calls = hosts.take_calls()
    assert len(calls) == 1 and calls[0][-2:] == ["--local", "export"]


def test_sync_from_the_studio_is_exactly_one_ssh_call(hosts: TwoHosts) -> None:
    env = hosts.env
    env.add_model("mlx-b", env.team[0])
    result = hosts.run("studio", "sync-gateway", "--no-route-via-optillm")
    assert result.returncode == 0, result.stderr
    calls = hosts.take_calls()
    assert len(calls) == 1
    assert calls[0][-3:] == ["sync-gateway", "--export-stdin", "--no-route-via-optillm"]
    env_text = (hosts.gateway_root / "layer-gateway/litellm-orch/config/env.local").read_text()
    assert "route_via_optillm=off" in env_text
    assert f"MLX_MLX_B_API_BASE=http://127.0.0.1:{env.team[0]}/v1" in env_text


@pytest.mark.parametrize("word", TRICKY)
def test_argv_arrives_byte_exact(hosts: TwoHosts, word: str) -> None:
    env = hosts.env
    env.add_model("mlx-c", None)
    result = hosts.run("gateway", "set", "mlx-c", f"request_params.note={word}", "--no-sync")
    assert result.returncode == 0, result.stderr
    assert env.registry()["models"]["mlx-c"]["request_params"]["note"] == word
    assert not list(env.tmp.rglob("PWNED*"))
    assert not list(Path.home().glob("PWNED*"))


def test_remote_exit_codes_come_back(hosts: TwoHosts) -> None:
    result = hosts.run("gateway", "show", "mlx-missing model")
    assert result.returncode == 1
    assert "unknown model 'mlx-missing model'" in result.stderr
    result = hosts.run("gateway", "status", "--check")
    assert result.returncode == 0, result.stderr
    assert len(hosts.take_calls()) == 2
    result = hosts.run("gateway", "frobnicate")
    assert result.returncode == 2  # refused locally by argparse, never forwarded
    assert not hosts.take_calls()


def test_sshd_down_fails_fast_with_a_clear_message(hosts: TwoHosts) -> None:
    env = hosts.env
    env.add_model("mlx-d", None)
    assert hosts.run("studio", "sync-gateway").returncode == 0
    gateway_files = {p: p.read_bytes() for p in hosts.gateway_root.rglob("*") if p.is_file()}
    hosts.sshd.stop()
    started = time.monotonic()
    result = hosts.run("gateway", "list")
    assert result.returncode == 1
    assert "mlxctl: error: ssh to studio failed running" in result.stderr
    result = hosts.run("studio", "sync-gateway")
    assert result.returncode == 1
    assert "ssh to mini failed running" in result.stderr
    # the load itself works on the Studio; only its sync fails: exit 4 and gateway.pending
    result = hosts.run("studio", "load", "mlx-d", "auto")
    assert result.returncode == 4, result.stderr
    assert (env.state / "gateway.pending").exists()
    assert time.monotonic() - started < 3 * 3 + 10
    assert {p: p.read_bytes() for p in hosts.gateway_root.rglob("*") if p.is_file()} == (
        gateway_files
    )
    status = hosts.run("studio", "status")
    assert "gateway: stale since" in status.stdout
    hosts.sshd.start()
    result = hosts.run("studio", "load", "mlx-d", "auto")  # a no-op load retries the sync
    assert result.returncode == 0, result.stderr
    assert not (env.state / "gateway.pending").exists()
    assert '"handle":"mlx-d"' in hosts.handles.read_text()
