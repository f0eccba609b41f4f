"""Fuzz every file mlxctl reads (issue 5): random and mutated inputs give a clear one-line error or
a correct result, never a traceback, and never a write to a file mlxctl does not own."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MLXCTL, Cli, Env
from helpers import SOAK, record_path

ROUNDS = 400 if SOAK else 60


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: truncate, flip bytes, insert junk, duplicate a slice, replace with noise."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    choice = rng.randrange(6)
    if choice == 0:
        return data[: rng.randrange(len(data))]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if choice == 2:
        at = rng.randrange(len(data))
        junk = rng.choice(
            [
                b"\0",
                b"\n",
                b"\r\n",
                b"{",
                b"]",
                b"'",
                b'"',
                b"\xff\xfe",
                b"# BEGIN MLXCTL AUTO\n",
                b"# END MLXCTL AUTO\n",
                b"model_list: []\n",
                "é".encode(),
                b"1e999",
                b"-",
                b": ",
                b"\t",
            ]
        )
        return data[:at] + junk + data[at:]
    if choice == 3:
        at = rng.randrange(len(data))
        return data[:at] + data[at : at + rng.randrange(1, 200)] + data[at:]
    if choice == 4:
        return json.dumps(json_noise(rng)).encode()
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


def json_noise(rng: random.Random, depth: int = 0) -> object:
    kinds = ["int", "big", "str", "none", "bool", "float"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randrange(-5, 70000)
    if kind == "big":
        return 10 ** rng.randrange(10, 40)
    if kind == "str":
        return rng.choice(["", "mlx-a", "../..", "a\nb", "\0", "é", "$(id)", "8100"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.choice([0.5, -1.0, 1e300])
    if kind == "list":
        return [json_noise(rng, depth + 1) for _ in range(rng.randrange(3))]
    keys = [
        "version",
        "generation",
        "models",
        "model_id",
        "port",
        "cache_path",
        "format",
        "repo_id",
        "pid",
        "pgid",
        "start_time",
        "mlx-a",
    ]
    return {rng.choice(keys): json_noise(rng, depth + 1) for _ in range(rng.randrange(4))}


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def seed_world(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a", env.team[0], request_params={"reasoning_effort": "low"})
    env.add_model("mlx-b", None)
    env.router.parent.mkdir(parents=True, exist_ok=True)
    env.router.write_text(
        "model_list:\n  - model_name: main\n    litellm_params:\n"
        "      model: os.environ/MLX_MLX_A_MODEL\n"
    )
    env.env_file.write_text("KEEP=1\n")
    env.handles.parent.mkdir(parents=True, exist_ok=True)
    env.handles.write_text('{"handle":"x"}\n')
    assert cli("sync-gateway")[0] == 0


def run_clean(cli: Cli, *args: str) -> tuple[int, str]:
    try:
        code, _, err = cli(*args)
    except Exception as exc:  # anything escaping main() is a defect
        pytest.fail(f"mlxctl {' '.join(args)} raised {type(exc).__name__}: {exc}")
    assert "Traceback" not in err, err
    assert code in (0, 1, 3), (args, code, err)
    if code == 1:
        assert any(line.startswith("mlxctl: error: ") for line in err.splitlines()), err
    return code, err


TARGETS: dict[str, tuple[Callable[[Env], Path], list[list[str]]]] = {
    "registry": (
        lambda e: e.registry_path,
        [
            ["list"],
            ["status"],
            ["show", "mlx-a"],
            ["export"],
            ["set", "mlx-b", "optillm=true", "--no-sync"],
            ["sync-gateway"],
        ],
    ),
    "config": (lambda e: e.tmp / "config.env", [["config"], ["list"]]),
    "router": (lambda e: e.router, [["sync-gateway"], ["sync-gateway", "--dry-run"]]),
    "env": (lambda e: e.env_file, [["sync-gateway"], ["config"]]),
    "handles": (lambda e: e.handles, [["sync-gateway"]]),
    "runtime": (
        lambda e: record_path(e, e.team[0]),
        [["status"], ["unload", "0"], ["reconcile", "--dry-run"]],
    ),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_inputs(env: Env, cli: Cli, target: str) -> None:
    seed_world(env, cli)
    locate, commands = TARGETS[target]
    path = locate(env)
    if target == "config":
        path.write_text("MLX_HOST=127.0.0.1\n# comment\nMLX_PROBE_TIMEOUT=0.5\n")
        env.set(MLXCTL_CONFIG=str(path))
    if target == "runtime":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": 1, "pgid": 1, "start_time": "0", "argv": []}))
    original = path.read_bytes()
    rng = random.Random(f"{target}-7")
    outcomes = {"error": 0, "ok": 0}
    for _ in range(ROUNDS):
        bad = mutate(rng, original if rng.random() < 0.8 else path.read_bytes())
        path.write_bytes(bad)
        for index, command in enumerate(commands):
            args = ["unload", str(env.team[0]), "--no-sync"] if command[0] == "unload" else command
            foreign = {p: digest(p) for p in (env.tmp / "models").rglob("*") if p.is_file()}
            registry_before = env.registry_path.read_bytes()
            code, _ = run_clean(cli, *args)
            outcomes["ok" if code in (0, 3) else "error"] += 1
            assert {p: digest(p) for p in foreign} == foreign  # model files: never written
            if code == 1 and target == "registry":
                assert env.registry_path.read_bytes() == registry_before  # corrupt: never rewritten
            if code == 1 and target in ("router", "env", "handles") and index == 0:
                assert path.read_bytes() == bad  # refused gateway file stays byte-identical
        path.write_bytes(bad if rng.random() < 0.2 else original)
    if target == "runtime":
        assert outcomes["error"] == 0  # a corrupt runtime record is ignored with a warning
    if target in ("registry", "router", "config"):
        assert outcomes["error"] > 0  # and these are refused, not silently "fixed"
    print(f"\nfuzz {target}: {ROUNDS} inputs x {len(commands)} commands: {outcomes}")


def test_fuzzed_export_set_over_stdin(env: Env) -> None:
    rng = random.Random(5)
    good = json.dumps(
        {
            "version": 1,
            "generation": 1,
            "api_host": "127.0.0.1",
            "model_ids": ["mlx-a"],
            "models": [
                {
                    "handle": "mlx-a",
                    "port": 8100,
                    "context_length": 10,
                    "max_output_tokens": 10,
                    "request_params": {},
                    "unpersisted_defaults": [],
                }
            ],
        }
    ).encode()
    env.set(MLXCTL_ROLE="gateway")
    for _ in range(ROUNDS // 2):
        result = subprocess.run(
            [sys.executable, str(MLXCTL), "sync-gateway", "--export-stdin", "--accept-older"],
            input=mutate(rng, good),
            capture_output=True,
            env=env.environ(),
            timeout=60,
        )
        err = result.stderr.decode(errors="replace")
        assert "Traceback" not in err, err
        assert result.returncode in (0, 1)
        if result.returncode == 1:
            assert err.strip().splitlines()[-1].startswith(("mlxctl: error:", "hint:"))
