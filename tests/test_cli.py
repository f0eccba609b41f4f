"""Layer 2: the CLI in-process (mlxctl.main), all state in a temp dir; then the lifecycle against
stand-in servers (tests/fixtures/standin_server.py). Gateway syncs are kept out with --no-sync:
the renderer has its own tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, Env
from helpers import (
    alive,
    bak,
    connectable,
    empty_or_absent,
    error_line,
    model_dir,
    one_json,
    plain_entry,
    read_record,
    record_path,
    run_records,
    seed_registry,
    spawn_mlxctl,
    standin_argv,
    status_row,
    status_rows,
    wait_until,
    write_record,
)

import mlxctl

# -- helpers ------------------------------------------------------------------------------------

RESULT_KEYS = {"ok", "command", "changed", "model_id", "port", "sync", "error"}
STATUS_KEYS = {
    *("port", "state", "model_id", "served_id", "ours", "pid", "uptime_s", "rss_bytes"),
    # SPEC §13.1: watch's verdicts; restart_needed: serves under its path on a 1.8 server
    *("failed_reason", "next_restart_at", "restarts", "last_failure", "restart_needed"),
}
LIST_KEYS = {"model_id", "port", "format", "repo_id", "size_bytes"}
EXPORT_MODEL_KEYS = {
    "handle",
    "port",
    "context_length",
    "max_output_tokens",
    "request_params",
    "unpersisted_defaults",
}


# -- reading commands ---------------------------------------------------------------------------


def test_list_text_sorted_by_port_null_last(env: Env, cli: Cli) -> None:
    t = env.team
    seed_registry(
        env,
        plain_entry(env, "mlx-zeta", t[3]),
        plain_entry(env, "mlx-beta", None),
        plain_entry(env, "mlx-alpha", None, repo_id=None),
        plain_entry(env, "mlx-gamma", t[1], format="hf"),
    )
    code, out, err = cli("list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "PORT", "FORMAT", "REPO"]
    assert [line.split()[0] for line in lines[1:]] == [
        "mlx-gamma",
        "mlx-zeta",
        "mlx-alpha",
        "mlx-beta",
    ]
    assert lines[1].split() == ["mlx-gamma", str(t[1]), "hf", "test-org/mlx-gamma"]
    assert lines[3].split() == ["mlx-alpha", "-", "mlx", "-"]
    assert "  " in lines[1]
    assert all(line == line.rstrip() for line in lines)


def test_list_json_shape(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a", env.team[0]), plain_entry(env, "mlx-b"))
    code, out, _ = cli("list", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"version", "models"}
    assert data["version"] == 1
    assert [set(m) for m in data["models"]] == [LIST_KEYS, LIST_KEYS]
    assert data["models"][0] == {
        "model_id": "mlx-a",
        "port": env.team[0],
        "format": "mlx",
        "repo_id": "test-org/mlx-a",
        "size_bytes": None,
    }
    # the global flag works before the subcommand too
    code, out2, _ = cli("--json", "list")
    assert code == 0
    assert json.loads(out2) == data


def test_list_size(env: Env, cli: Cli) -> None:
    seed_registry(
        env, plain_entry(env, "mlx-a", path=model_dir(env.tmp / "plain", "mlx-a", weights=5000))
    )
    code, out, _ = cli("list", "--size", "--json")
    assert code == 0
    size = json.loads(out)["models"][0]["size_bytes"]
    config_size = len(json.dumps({"model_type": "llama"}))
    assert size == 5000 + config_size
    code, out, _ = cli("list", "--size")
    assert out.splitlines()[0].split() == ["MODEL", "PORT", "FORMAT", "REPO", "SIZE"]


def test_list_without_registry_is_empty(env: Env, cli: Cli) -> None:
    code, out, _ = cli("list", "--json")
    assert code == 0
    assert json.loads(out) == {"version": 1, "models": []}
    assert not env.registry_path.exists()


def test_list_warns_about_bad_ids(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "Old_Name"))
    code, out, err = cli("list")
    assert code == 0
    assert "Old_Name" in out
    assert "warning" in err
    assert "rename" in err


def test_show_text_and_json(env: Env, cli: Cli) -> None:
    port = env.team[2]
    e = plain_entry(
        env, "mlx-a", port, chat_template="/t.jinja", server_args=["--trust-remote-code"]
    )
    seed_registry(env, e)
    code, out, _ = cli("show", "mlx-a", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"model_id", "entry", "runtime", "launch_argv"}
    assert data["entry"] == e
    assert data["runtime"] is None
    # the exact argv of SPEC §8, spelt out (not recomputed by mlxctl.launch_argv)
    assert data["launch_argv"] == [
        *mlxctl.shlex.split(env.vars["MLX_LAUNCH_CMD"]),
        "--model-path",
        e["cache_path"],
        "--model-type",
        "lm",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-file",
        str(env.state / "logs" / f"{port}.app.log"),
        "--chat-template-file",
        "/t.jinja",
        "--trust-remote-code",
    ]
    # by repo id too
    code, out, _ = cli("show", "test-org/mlx-a")
    assert code == 0
    assert "--trust-remote-code" in out
    assert e["cache_path"] in out


def test_show_unassigned_has_no_argv(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a"))
    code, out, _ = cli("show", "mlx-a", "--json")
    assert code == 0
    assert json.loads(out)["launch_argv"] is None


def test_export_shape(env: Env, cli: Cli) -> None:
    t = env.team
    big = model_dir(env.tmp / "plain", "mlx-big", config={"max_position_embeddings": 131072})
    seed_registry(
        env,
        plain_entry(
            env,
            "mlx-b",
            t[1],
            context_length=8192,
            max_output_tokens=4096,
            request_params={"reasoning_effort": "low"},
        ),
        plain_entry(env, "mlx-a", t[0], path=big),
        plain_entry(env, "mlx-unassigned"),
        plain_entry(
            env,
            "mlx-reserved",
            t[2],
            reservation={
                "pid": os.getpid(),
                "start_time": "x",
                "since": "t",
                "previous_port": None,
            },
        ),
        plain_entry(env, "mlx-gone", t[3], cache_path=str(env.tmp / "nowhere")),
        plain_entry(env, "Bad_Id", t[4]),
        generation=7,
    )
    code, out, err = cli("export")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"version", "generation", "api_host", "model_ids", "models"}
    assert data["version"] == 1
    assert data["generation"] == 7
    assert data["api_host"] == "127.0.0.1"
    assert sorted(data["model_ids"]) == sorted(
        ["mlx-a", "mlx-b", "mlx-unassigned", "mlx-reserved", "mlx-gone", "Bad_Id"]
    )
    assert [m["handle"] for m in data["models"]] == ["mlx-a", "mlx-b"]
    for item in data["models"]:
        assert set(item) == EXPORT_MODEL_KEYS
    assert data["models"][0] == {
        "handle": "mlx-a",
        "port": t[0],
        "context_length": 131072,
        "max_output_tokens": 65536,
        "request_params": {},
        "unpersisted_defaults": ["context_length", "max_output_tokens"],
    }
    assert data["models"][1] == {
        "handle": "mlx-b",
        "port": t[1],
        "context_length": 8192,
        "max_output_tokens": 4096,
        "request_params": {"reasoning_effort": "low"},
        "unpersisted_defaults": [],
    }
    assert "Bad_Id" in err  # skipped with a warning suggesting rename
    assert "rename" in err


def test_export_never_writes(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a", env.team[0]))
    assert cli("export")[0] == 0
    assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()


# -- settings through a real config file --------------------------------------------------------


def config_rows(cli: Cli) -> dict[str, dict[str, Any]]:
    code, out, err = cli("config", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)["settings"]}


def test_config_sources_through_a_real_file(env: Env, cli: Cli) -> None:
    conf = env.tmp / "config.env"
    conf.write_text(
        "# the operator's settings\n"
        "export MLX_HOST=10.9.9.9\n"
        'MLX_OFFLOAD_DIR="/mnt/drive/models"\n'
        "MLX_BIND_HOST=10.1.1.1\n"
    )
    env.set(MLXCTL_CONFIG=str(conf), MLX_HOST=None)
    rows = config_rows(cli)
    assert rows["MLX_HOST"] == {"name": "MLX_HOST", "value": "10.9.9.9", "source": "file"}
    assert rows["MLX_OFFLOAD_DIR"]["value"] == "/mnt/drive/models"
    assert rows["MLX_OFFLOAD_DIR"]["source"] == "file"
    # the environment beats the file
    assert rows["MLX_BIND_HOST"] == {"name": "MLX_BIND_HOST", "value": "127.0.0.1", "source": "env"}
    assert rows["MLX_STUDIO_HOST"]["source"] == "default"
    assert rows["MLX_STUDIO_HOST"]["value"] == "studio"
    code, out, _ = cli("config")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("MLX_HOST "))
    assert line.split() == ["MLX_HOST", "10.9.9.9", "file"]
    assert str(conf) in out


def test_config_file_decides_where_the_registry_is(env: Env, cli: Cli) -> None:
    elsewhere = env.tmp / "elsewhere" / "reg.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(
        json.dumps({"version": 1, "models": {"mlx-far": plain_entry(env, "mlx-far")}})
    )
    seed_registry(env, plain_entry(env, "mlx-near"))
    conf = env.tmp / "config.env"
    conf.write_text(f"MLX_REGISTRY_PATH={elsewhere}\n")
    env.set(MLXCTL_CONFIG=str(conf))
    code, out, _ = cli("list", "--json")
    assert code == 0
    assert [m["model_id"] for m in json.loads(out)["models"]] == ["mlx-far"]
    # an environment variable still wins over the file
    env.set(MLX_REGISTRY_PATH=str(env.registry_path))
    code, out, _ = cli("list", "--json")
    assert [m["model_id"] for m in json.loads(out)["models"]] == ["mlx-near"]


def test_config_default_file_location(env: Env, cli: Cli) -> None:
    conf = Path(env.vars["XDG_CONFIG_HOME"]) / "mlxctl" / "config.env"
    conf.parent.mkdir(parents=True)
    conf.write_text("MLX_OFFLOAD_DIR=/from/xdg\n")
    rows = config_rows(cli)
    assert rows["MLX_OFFLOAD_DIR"] == {
        "name": "MLX_OFFLOAD_DIR",
        "value": "/from/xdg",
        "source": "file",
    }


def test_config_file_does_not_expand(env: Env, cli: Cli) -> None:
    conf = env.tmp / "config.env"
    conf.write_text("MLX_OFFLOAD_DIR=$HOME/models\n")
    env.set(MLXCTL_CONFIG=str(conf))
    assert config_rows(cli)["MLX_OFFLOAD_DIR"]["value"] == "$HOME/models"


def test_config_masks_secrets(env: Env, cli: Cli) -> None:
    secret = "hf_SuperSecretValue123"
    conf = env.tmp / "config.env"
    conf.write_text(f"HF_TOKEN={secret}\nGATEWAY_RELOAD_CMD=systemctl restart litellm\n")
    env.set(MLXCTL_CONFIG=str(conf))
    code, out, err = cli("config")
    assert code == 0
    assert secret not in out + err
    line = next(x for x in out.splitlines() if x.startswith("HF_TOKEN "))
    assert line.split() == ["HF_TOKEN", "****", "file"]
    # a setting that is not a secret is shown as it is
    assert "systemctl restart litellm" in out
    code, out, err = cli("config", "--json")
    assert secret not in out + err
    # from the environment too
    env.set(HF_TOKEN=secret)
    code, out, err = cli("config")
    assert secret not in out + err
    assert next(x for x in out.splitlines() if x.startswith("HF_TOKEN ")).split()[2] == "env"


def test_config_exits_1_on_overlapping_ranges(env: Env, cli: Cli) -> None:
    t = env.team
    env.set(MLX_EXPERIMENTAL_PORTS=f"{t[5]}-{t[5] + 20}")
    code, out, err = cli("config")
    assert code == 1
    assert "overlap" in error_line(err)
    assert "MLX_TEAM_PORTS" in out  # the settings are still printed


def test_config_ok(env: Env, cli: Cli) -> None:
    code, out, err = cli("config", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["role"] == "studio"
    assert data["problems"] == []
    assert "MLX_LAUNCH_CMD" in data["launcher"]


def test_config_missing_launcher(env: Env, cli: Cli) -> None:
    env.set(MLX_LAUNCH_CMD=None, PATH=str(env.tmp / "empty-bin"))
    code, _, err = cli("config")
    assert code == 1
    assert "launcher" in error_line(err)


# -- set ----------------------------------------------------------------------------------------


def test_set_persists_and_increments_generation(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"), generation=41)
    code, out, err = cli(
        "set",
        "mlx-a",
        "context_length=8192",
        "request_params.reasoning_effort=high",
        "server_args=--trust-remote-code --foo 'a b'",
        "optillm=true",
        "--no-sync",
    )
    assert code == 0, err
    data = env.registry()
    assert data["generation"] == 42
    model = data["models"]["mlx-a"]
    assert model["context_length"] == 8192
    assert model["request_params"] == {"reasoning_effort": "high"}
    assert model["server_args"] == ["--trust-remote-code", "--foo", "a b"]
    assert model["optillm"] is True
    assert bak(env.registry_path).read_bytes() == before
    assert "context_length=8192" in out
    # removing with key=
    code, _, _ = cli("set", "mlx-a", "context_length=", "server_args=", "--no-sync")
    assert code == 0
    model = env.registry()["models"]["mlx-a"]
    assert "context_length" not in model
    assert "server_args" not in model
    assert env.registry()["generation"] == 43


def test_set_unchanged_writes_nothing(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a", context_length=100))
    code, _, err = cli("set", "mlx-a", "context_length=100", "--no-sync")
    assert code == 0
    assert "unchanged" in err
    assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()


def test_set_preserves_unknown_fields(env: Env, cli: Cli) -> None:
    e = plain_entry(env, "mlx-a", future_field={"nested": [1, 2, {"x": None}]}, note="héllo ✓")
    other = plain_entry(env, "mlx-b", weird=[True, 1.5])
    seed_registry(env, e, other, generation=3, operator_notes={"a": "b"}, schema_hint="x")
    before = env.registry()
    code, _, err = cli("set", "mlx-a", "tool_call_parser=harmony", "--no-sync")
    assert code == 0, err
    after = env.registry()
    assert after["operator_notes"] == {"a": "b"}
    assert after["schema_hint"] == "x"
    assert after["models"]["mlx-b"] == before["models"]["mlx-b"]
    changed = dict(after["models"]["mlx-a"])
    assert changed.pop("tool_call_parser") == "harmony"
    assert changed == before["models"]["mlx-a"]
    assert set(after) == set(before)
    assert "héllo ✓" in env.registry_path.read_text(encoding="utf-8")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_set_preserves_file_mode(env: Env, cli: Cli, mode: int) -> None:
    seed_registry(env, plain_entry(env, "mlx-a"))
    env.registry_path.chmod(mode)
    assert cli("set", "mlx-a", "optillm=on", "--no-sync")[0] == 0
    assert stat.S_IMODE(env.registry_path.stat().st_mode) == mode
    assert stat.S_IMODE(bak(env.registry_path).stat().st_mode) == mode


@pytest.mark.parametrize(
    "assignment",
    [
        "port=8100",
        "model_id=mlx-b",
        "cache_path=/x",
        "format=hf",
        "repo_id=a/b",
        "request_params.model=x",
        "request_params.api_base=http://x",
        "request_params.api_key=k",
        "request_params.max_tokens=5",
        "context_length=abc",
        "optillm=maybe",
        "nonsense=1",
        "no-equals-sign",
    ],
)
def test_set_refused_changes_nothing(env: Env, cli: Cli, assignment: str) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, _out, err = cli("set", "mlx-a", "chat_template=/ok", assignment, "--no-sync")
    assert code == 1
    error_line(err)
    assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()


def test_set_json_result(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a"))
    code, out, _ = cli("set", "mlx-a", "optillm=true", "--no-sync", "--json")
    assert code == 0
    data = one_json(out)
    assert set(data) >= RESULT_KEYS
    assert data["ok"] is True
    assert data["command"] == "set"
    assert data["changed"] is True
    assert data["model_id"] == "mlx-a"
    assert data["error"] is None
    code, out, err = cli("set", "mlx-a", "port=1", "--no-sync", "--json")
    assert code == 1
    data = one_json(out)
    assert set(data) >= RESULT_KEYS
    assert data["ok"] is False
    assert data["error"]
    assert "mlxctl: error:" in err


def test_set_dry_run_changes_nothing(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, _, _ = cli("set", "mlx-a", "context_length=1000", "--dry-run", "--no-sync")
    assert code == 0
    assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()


def test_set_by_repo_id(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a"))
    assert cli("set", "test-org/mlx-a", "optillm=false", "--no-sync")[0] == 0
    assert env.registry()["models"]["mlx-a"]["optillm"] is False


# -- rename -------------------------------------------------------------------------------------


def test_rename(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "Old_Name", keep="me"), plain_entry(env, "mlx-other"))
    code, _out, err = cli("rename", "Old_Name", "mlx-new-name", "--no-sync")
    assert code == 0, err
    models = env.registry()["models"]
    assert "Old_Name" not in models
    assert models["mlx-new-name"]["model_id"] == "mlx-new-name"
    assert models["mlx-new-name"]["keep"] == "me"
    assert "mlx-other" in models
    assert env.registry()["generation"] == 2


@pytest.mark.parametrize(
    "new", ["Bad", "mlx-A", "mlx-a;b", "mlx-$(id)", "mlx-a/b", "mlx-..", "mlx-a b", "mlx-"]
)
def test_rename_enforces_the_pattern(env: Env, cli: Cli, new: str) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, _, err = cli("rename", "mlx-a", new, "--no-sync")
    assert code == 1
    error_line(err)
    assert env.registry_path.read_bytes() == before


def test_rename_onto_existing_refused(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"), plain_entry(env, "mlx-b"))
    code, _, err = cli("rename", "mlx-a", "mlx-b", "--no-sync")
    assert code == 1
    assert "mlx-b" in error_line(err)
    assert env.registry_path.read_bytes() == before


def test_rename_dry_run(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    assert cli("rename", "mlx-a", "mlx-b", "--dry-run", "--no-sync")[0] == 0
    assert env.registry_path.read_bytes() == before


# -- usage errors, version ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["load"],
        ["load", "mlx-a"],
        ["list", "--bogus"],
        ["set", "mlx-a"],
        ["unload"],
        ["rename", "mlx-a"],
        ["ensure"],
        ["ensure", "org/x", "--convert", "sometimes"],
        ["logs", "8100", "-n", "many"],
        ["offload-og", "--verify", "maybe"],
        ["sync-gateway", "--route-via-optillm", "--no-route-via-optillm"],
    ],
)
def test_usage_errors_exit_2(env: Env, cli: Cli, argv: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 2
    assert out == ""
    assert "usage:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["load", "mlx-a", "99999"],
        ["load", "mlx-a", "abc"],
        ["load", "mlx-a", "22"],
        ["load", "mlx-a", "-5"],
        ["unload", "99999"],
        ["unload", "auto"],
        ["set", "mlx-a", "port=1"],
        ["show", "mlx-nope"],
        ["load", "mlx-nope", "auto"],
        ["rename", "mlx-a", "Bad"],
        ["logs", "99999"],
    ],
)
def test_refused_values_exit_1(env: Env, cli: Cli, argv: list[str]) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, _, err = cli(*argv, *(["--no-sync"] if argv[0] in ("load", "unload", "set") else []))
    assert code == 1, err
    error_line(err)
    assert env.registry_path.read_bytes() == before
    assert run_records(env) == []


def test_version(cli: Cli) -> None:
    code, out, _err = cli("--version")
    assert code == 0
    assert out.strip() == f"mlxctl {mlxctl.__version__}"


def test_version_by_subprocess(env: Env) -> None:
    result = env.run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mlxctl {mlxctl.__version__}"


# -- dry runs of the lifecycle commands ---------------------------------------------------------


def test_load_dry_run_starts_nothing(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, out, err = cli("load", "mlx-a", "auto", "--dry-run", "--no-sync")
    assert code == 0, err
    assert "would start" in out
    assert "--model-path" in out
    assert env.registry_path.read_bytes() == before
    assert run_records(env) == []
    assert empty_or_absent(env.state / "logs")


def test_unload_dry_run_changes_nothing(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a", env.team[0]))
    code, out, _ = cli("unload", str(env.team[0]), "--dry-run", "--no-sync")
    assert code == 0
    assert "would unload" in out
    assert env.registry_path.read_bytes() == before


def test_unload_all_and_reconcile_dry_run_change_nothing(env: Env, cli: Cli) -> None:
    before = seed_registry(
        env, plain_entry(env, "mlx-a", env.team[0]), plain_entry(env, "mlx-b", env.exp[0])
    )
    code, out, _ = cli("unload-all", "--dry-run", "--no-sync")
    assert code == 0
    assert "would unload mlx-a" in out
    assert env.registry_path.read_bytes() == before
    code, out, _err = cli("reconcile", "--dry-run", "--no-sync")
    assert code == 0
    assert "would clear dead assignment mlx-a" in out
    assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()


def test_unload_free_port_is_a_noop(env: Env, cli: Cli) -> None:
    before = seed_registry(env, plain_entry(env, "mlx-a"))
    code, out, _err = cli("unload", str(env.team[0]), "--no-sync")
    assert code == 0
    assert out == ""
    assert env.registry_path.read_bytes() == before


def test_unload_dead_assignment_clears_it(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a", env.team[0]))
    code, out, _ = cli("unload", str(env.team[0]), "--no-sync")
    assert code == 0
    assert out.split() == ["mlx-a", str(env.team[0])]
    assert env.registry()["models"]["mlx-a"]["port"] is None


def test_status_of_an_empty_world(env: Env, cli: Cli) -> None:
    code, out, err = cli("status", "--json", "--check")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"version", "ports", "gateway"}
    assert data["gateway"] == {"pending_since": None}
    assert [p["port"] for p in data["ports"]] == env.team + env.exp
    assert {p["state"] for p in data["ports"]} == {"free"}
    for row in data["ports"]:
        assert set(row) == STATUS_KEYS


def test_status_out_of_range_assignment(env: Env, cli: Cli) -> None:
    far = env.exp[-1] + 5
    seed_registry(env, plain_entry(env, "mlx-far", far))
    code, out, _ = cli("status")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith(str(far)))
    assert "out-of-range (dead)" in line
    assert cli("status", "--check")[0] == 3
    code, out, _ = cli("status", "--json")
    row = next(p for p in json.loads(out)["ports"] if p["port"] == far)
    assert row["state"].startswith("out-of-range")
    assert row["model_id"] == "mlx-far"


def test_status_dead_check_exits_3(env: Env, cli: Cli) -> None:
    seed_registry(env, plain_entry(env, "mlx-a", env.team[0]))
    code, out, _ = cli("status", "--check")
    assert code == 3
    line = next(x for x in out.splitlines() if x.startswith(str(env.team[0])))
    assert line.split()[:3] == [str(env.team[0]), "dead", "mlx-a"]


def test_status_shows_gateway_pending(env: Env, cli: Cli) -> None:
    env.state.mkdir(parents=True)
    (env.state / "gateway.pending").write_text("2025-01-01T00:00:00Z\n")
    code, out, _ = cli("status")
    assert code == 0
    assert "gateway: stale since 2025-01-01T00:00:00Z" in out
    code, out, _ = cli("status", "--json")
    assert json.loads(out)["gateway"] == {"pending_since": "2025-01-01T00:00:00Z"}


# -- the lifecycle against stand-in servers -----------------------------------------------------


@pytest.fixture
def foreign(env: Env) -> Iterator[Any]:
    """Start stand-in servers mlxctl did not start (own session, killed at teardown)."""
    children: list[subprocess.Popen[bytes]] = []

    def start(path: Path, port: int, *, wait: bool = True) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            standin_argv(path, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        children.append(child)
        if wait:
            wait_until(lambda: connectable(port))
        return child

    yield start
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(5)


@pytest.fixture
def listening_socket() -> Iterator[Any]:
    """A plain listening socket held by the test process (accepts, never answers)."""
    socks: list[socket.socket] = []

    def open_on(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(8)
        socks.append(sock)
        return sock

    yield open_on
    for sock in socks:
        sock.close()


@pytest.fixture
def http_404(env: Env) -> Iterator[Any]:
    """An HTTP server that answers every request with 404 (a listener that is not a model server)."""
    import http.server
    import threading

    servers: list[http.server.HTTPServer] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    def serve(port: int) -> None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_load_auto_picks_the_lowest_free_experimental_port(
    env: Env, cli: Cli, listening_socket: Any
) -> None:
    e = env.exp
    env.add_model("mlx-a")
    env.add_model("mlx-holder", port=e[0])  # assigned (dead): taken
    listening_socket(e[1])  # busy: refuses no connect
    code, out, err = cli("load", "mlx-a", "auto", "--no-sync")
    assert code == 0, err
    assert out.split() == ["mlx-a", str(e[2])]
    model = env.registry()["models"]["mlx-a"]
    assert model["port"] == e[2]
    assert "reservation" not in model
    # defaults are persisted when a load is committed
    assert isinstance(model["context_length"], int)
    assert isinstance(model["max_output_tokens"], int)
    rec = read_record(env, e[2])
    assert rec["model_id"] == "mlx-a"
    assert rec["pid"] == rec["pgid"]
    assert alive(rec["pid"])
    assert mlxctl.record_is_ours(rec)
    assert os.getpgid(rec["pid"]) == rec["pid"]  # its own process group
    log = (env.state / "logs" / f"{e[2]}.log").read_text()
    assert log.startswith("=== mlxctl start mlx-a ")
    assert "--model-path" in log.splitlines()[0]
    # the server got the exact argv of SPEC §8 and HF_HUB_OFFLINE=1
    launcher = mlxctl.shlex.split(env.vars["MLX_LAUNCH_CMD"])
    assert rec["argv"] == [
        *launcher,
        "--model-path",
        model["cache_path"],
        "--model-type",
        "lm",
        "--host",
        "127.0.0.1",
        "--port",
        str(e[2]),
        "--log-file",
        str(env.state / "logs" / f"{e[2]}.app.log"),
    ]
    environ = (Path("/proc") / str(rec["pid"]) / "environ").read_bytes().split(b"\0")
    assert b"HF_HUB_OFFLINE=1" in environ
    assert os.readlink(f"/proc/{rec['pid']}/cwd") == str(env.state)


def test_load_twice_is_a_noop(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    code, out, err = cli("load", "mlx-a", "auto", "--no-sync")
    assert code == 0, err
    port = int(out.split()[1])
    first = read_record(env, port)
    before = env.registry_path.read_bytes()
    for argv in (["load", "mlx-a", "auto"], ["load", "mlx-a", str(port)]):
        code, out, err = cli(*argv, "--no-sync")
        assert code == 0, err
        assert out.split() == ["mlx-a", str(port)]
        assert read_record(env, port)["pid"] == first["pid"]
        assert read_record(env, port)["start_time"] == first["start_time"]
        assert env.registry_path.read_bytes() == before
    log = (env.state / "logs" / f"{port}.log").read_text()
    assert log.count("=== mlxctl start") == 1
    # and --json says nothing changed
    code, out, _ = cli("load", "mlx-a", "auto", "--no-sync", "--json")
    data = one_json(out)
    assert data["ok"] is True
    assert data["changed"] is False
    assert data["port"] == port


def test_load_explicit_port_while_serving_elsewhere_is_refused(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    assert cli("load", "mlx-a", str(env.team[0]), "--no-sync")[0] == 0
    before = env.registry_path.read_bytes()
    code, _, err = cli("load", "mlx-a", str(env.team[1]), "--no-sync")
    assert code == 1
    assert "one model, one port" in error_line(err)
    assert env.registry_path.read_bytes() == before


def test_status_shows_every_state(env: Env, cli: Cli, foreign: Any, http_404: Any) -> None:
    t = env.team
    # serving (ours)
    env.add_model("mlx-serving")
    assert cli("load", "mlx-serving", str(t[0]), "--no-sync")[0] == 0
    # orphan: ours, then its assignment disappears
    env.add_model("mlx-orphan")
    assert cli("load", "mlx-orphan", str(t[1]), "--no-sync")[0] == 0
    data = env.registry()
    data["models"]["mlx-orphan"]["port"] = None
    env.registry_path.write_text(json.dumps(data))
    # dead
    env.add_model("mlx-dead", port=t[2])
    # foreign: a model server mlxctl did not start, on an unassigned port
    foreign(env.model_dir("mlx-stranger"), t[3])
    # occupied: assigned, the listener is not ours and not a model server
    env.add_model("mlx-occupied", port=t[4])
    http_404(t[4])
    # unresponsive: accepts, never answers
    hang_path = env.add_model("mlx-hang", port=t[5], knobs={"hang": True})
    foreign(hang_path, t[5])
    # mismatch: serves another model than assigned
    mismatch_path = env.add_model("mlx-mismatch", port=t[6], knobs={"served_id": "/elsewhere"})
    foreign(mismatch_path, t[6])

    code, out, err = cli("status", "--json")
    assert code == 0, err
    rows = status_rows(out)
    expected = {
        t[0]: ("serving", "mlx-serving", True),
        t[1]: ("orphan", None, True),
        t[2]: ("dead", "mlx-dead", False),
        t[3]: ("foreign", None, False),
        t[4]: ("occupied", "mlx-occupied", False),
        t[5]: ("unresponsive", "mlx-hang", False),
        t[6]: ("mismatch", "mlx-mismatch", False),
        t[7]: ("free", None, False),
    }
    for port, (state, model_id, ours) in expected.items():
        row = rows[port]
        assert (row["state"], row["model_id"], row["ours"]) == (state, model_id, ours), row
        assert set(row) == STATUS_KEYS
    serving = rows[t[0]]
    assert serving["served_id"] == env.registry()["models"]["mlx-serving"]["cache_path"]
    assert serving["pid"] == read_record(env, t[0])["pid"]
    assert isinstance(serving["uptime_s"], (int, float))
    assert isinstance(serving["rss_bytes"], int) and serving["rss_bytes"] > 0
    assert rows[t[6]]["served_id"] == "/elsewhere"
    # a foreign listener's pid only with --pids
    assert rows[t[3]]["pid"] is None
    code, out, _ = cli("status", "--json", "--pids")
    rows = status_rows(out)
    assert isinstance(rows[t[3]]["pid"], int)
    # text: free ports hidden unless --all, and --check exits 3 on drift
    code, out, err = cli("status", "--check")
    assert code == 3
    states = {int(line.split()[0]): line.split()[1] for line in out.splitlines()[1:]}
    assert states == {port: s for port, (s, _, _) in expected.items() if s != "free"}
    assert out.splitlines()[0].split() == [
        "PORT",
        "STATE",
        "MODEL",
        "SERVED",
        "OURS",
        "PID",
        "UPTIME",
        "RSS",
    ]
    code, out, _ = cli("status", "--all")
    assert str(t[7]) in out


def test_status_one_hung_port_does_not_delay_the_rest(env: Env, cli: Cli, foreign: Any) -> None:
    hung = env.team[:6]
    for i, port in enumerate(hung):
        path = env.add_model(f"mlx-hang{i}", port=port, knobs={"hang": True, "start_delay": 0})
        foreign(path, port, wait=False)
    wait_until(lambda: all(connectable(p) for p in hung))
    started = time.monotonic()
    code, out, _ = cli("status", "--check")
    elapsed = time.monotonic() - started
    assert code == 3
    assert out.count("unresponsive") == len(hung)
    # probes run concurrently: about one probe timeout (0.5 s) in total, not six (3 s)
    assert elapsed < 1.5, elapsed


def test_status_check_passes_when_all_serving(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    assert cli("load", "mlx-a", "auto", "--no-sync")[0] == 0
    code, out, err = cli("status", "--check")
    assert code == 0, out + err


def test_unload(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    port = env.team[0]
    assert cli("load", "mlx-a", str(port), "--no-sync")[0] == 0
    pid = read_record(env, port)["pid"]
    code, out, err = cli("unload", str(port), "--no-sync")
    assert code == 0, err
    assert out.split() == ["mlx-a", str(port)]
    assert not alive(pid)
    assert not connectable(port)
    assert not record_path(env, port).exists()
    assert env.registry()["models"]["mlx-a"]["port"] is None
    # again: a free port is a no-op
    before = env.registry_path.read_bytes()
    assert cli("unload", str(port), "--no-sync")[0] == 0
    assert env.registry_path.read_bytes() == before


def test_unload_all_stops_in_parallel(env: Env, cli: Cli) -> None:
    env.set(MLX_STOP_TIMEOUT="2")
    pids = []
    for i in range(3):
        env.add_model(f"mlx-stubborn{i}", knobs={"ignore_sigterm": True})
        code, out, err = cli("load", f"mlx-stubborn{i}", str(env.team[i]), "--no-sync")
        assert code == 0, err
        pids.append(read_record(env, env.team[i])["pid"])
    env.add_model("mlx-dead", port=env.team[5])
    started = time.monotonic()
    code, out, err = cli("unload-all", "--no-sync", "--json")
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 3.5, f"unload-all took {elapsed:.1f}s: not one shared grace period"
    assert elapsed >= 1.9, "the SIGTERM-ignoring stand-ins got their grace period"
    assert not any(alive(pid) for pid in pids)
    assert all(e["port"] is None for e in env.registry()["models"].values())
    assert run_records(env) == []
    data = one_json(out)
    assert data["ok"] is True
    assert data["command"] == "unload-all"
    assert sorted(r["model_id"] for r in data["results"]) == [
        "mlx-dead",
        "mlx-stubborn0",
        "mlx-stubborn1",
        "mlx-stubborn2",
    ]
    assert all(r["ok"] for r in data["results"])
    for r in data["results"]:
        assert set(r) >= {"model_id", "port", "ok", "error"}


def test_unload_all_keeps_a_foreign_listener(env: Env, cli: Cli, foreign: Any) -> None:
    path = env.add_model("mlx-f", port=env.team[0])
    child = foreign(path, env.team[0])
    env.add_model("mlx-dead", port=env.team[1])
    code, _, err = cli("unload-all", "--no-sync")
    assert code == 1
    assert "mlx-f" in err
    assert child.poll() is None
    models = env.registry()["models"]
    assert models["mlx-f"]["port"] == env.team[0]
    assert models["mlx-dead"]["port"] is None


def test_reconcile(env: Env, cli: Cli) -> None:
    t = env.team
    env.add_model("mlx-serving")
    assert cli("load", "mlx-serving", str(t[0]), "--no-sync")[0] == 0
    env.add_model("mlx-orphan")
    assert cli("load", "mlx-orphan", str(t[1]), "--no-sync")[0] == 0
    orphan_pid = read_record(env, t[1])["pid"]
    data = env.registry()
    data["models"]["mlx-orphan"]["port"] = None
    env.registry_path.write_text(json.dumps(data))
    env.add_model("mlx-dead", port=t[2])
    serving_pid = read_record(env, t[0])["pid"]
    code, out, err = cli("reconcile", "--no-sync")
    assert code == 0, err
    assert not alive(orphan_pid)
    assert alive(serving_pid)
    models = env.registry()["models"]
    assert models["mlx-dead"]["port"] is None
    assert models["mlx-serving"]["port"] == t[0]
    assert f"mlxctl load mlx-dead {t[2]}" in err
    assert "orphan" in out
    assert "mlx-dead" in out
    # nothing left to do
    before = env.registry_path.read_bytes()
    code, out, err = cli("reconcile", "--no-sync")
    assert code == 0
    assert "nothing to reconcile" in err
    assert env.registry_path.read_bytes() == before


def test_up_restarts_dead_assignments(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    port = env.team[0]
    assert cli("load", "mlx-a", str(port), "--no-sync")[0] == 0
    old = read_record(env, port)
    os.killpg(old["pgid"], signal.SIGKILL)
    wait_until(lambda: not alive(old["pid"]) and not connectable(port))
    env.add_model("mlx-b", port=env.team[1])
    code, out, _ = cli("status", "--check")
    assert code == 3
    code, out, err = cli("up", "--no-sync", "--json")
    assert code == 0, err
    data = one_json(out)
    assert sorted((r["model_id"], r["port"], r["ok"]) for r in data["results"]) == [
        ("mlx-a", port, True),
        ("mlx-b", env.team[1], True),
    ]
    new = read_record(env, port)
    assert new["pid"] != old["pid"]
    assert alive(new["pid"])
    assert cli("status", "--check")[0] == 0
    # up again: nothing to do
    before = env.registry_path.read_bytes()
    code, out, err = cli("up", "--no-sync")
    assert code == 0
    assert env.registry_path.read_bytes() == before


def test_up_reports_failures_and_tries_all(env: Env, cli: Cli) -> None:
    env.add_model("mlx-broken", port=env.team[0], knobs={"exit_before_bind": 0})
    env.add_model("mlx-good", port=env.team[1])
    code, _out, err = cli("up", "--no-sync")
    assert code == 1
    assert "mlx-broken" in error_line(err)
    models = env.registry()["models"]
    # a failed start keeps the assignment
    assert models["mlx-broken"]["port"] == env.team[0]
    assert models["mlx-good"]["port"] == env.team[1]
    assert connectable(env.team[1])


def test_broken_model_rolls_back(env: Env, cli: Cli) -> None:
    env.add_model("mlx-good", port=None)
    env.add_model("mlx-broken", knobs={"exit_before_bind": 0})
    data = env.registry()
    data["operator_note"] = "kept"
    env.registry_path.write_text(json.dumps(data, indent=2))
    before = env.registry()
    port = env.exp[0]
    code, out, err = cli("load", "mlx-broken", "auto", "--no-sync")
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    error_line(err)
    after = env.registry()
    assert after["models"] == before["models"]
    assert after["operator_note"] == "kept"
    # a reservation and its rollback are writes, and every write advances the generation
    assert after["generation"] > before.get("generation", 0)
    assert {k: v for k, v in after.items() if k != "generation"} == {
        k: v for k, v in before.items() if k != "generation"
    }
    assert run_records(env) == []
    assert not connectable(port)
    log_lines = (env.state / "logs" / f"{port}.log").read_text().splitlines()
    assert log_lines, "the server's output went to the port's log"
    assert log_lines[-1] in err.splitlines()
    # the explicit-port variant keeps nothing either
    code, _, err = cli("load", "mlx-broken", str(env.team[3]), "--no-sync")
    assert code == 1
    assert env.registry()["models"] == before["models"]
    assert run_records(env) == []


def test_broken_model_json_result(env: Env, cli: Cli) -> None:
    env.add_model("mlx-broken", knobs={"exit_before_bind": 0})
    code, out, _err = cli("load", "mlx-broken", "auto", "--no-sync", "--json")
    assert code == 1
    data = one_json(out)
    assert data["ok"] is False
    assert data["command"] == "load"
    assert data["model_id"] == "mlx-broken"
    assert data["error"]
    assert set(data) >= RESULT_KEYS


def test_busy_port_is_refused_before_any_spawn(env: Env, cli: Cli, listening_socket: Any) -> None:
    env.add_model("mlx-a")
    port = env.team[0]
    listening_socket(port)
    before = env.registry_path.read_bytes()
    code, _out, err = cli("load", "mlx-a", str(port), "--no-sync")
    assert code == 1
    line = error_line(err)
    assert f"port {port} held by pid {os.getpid()} (not started by mlxctl)" in line
    assert env.registry_path.read_bytes() == before
    assert run_records(env) == []
    assert not (env.state / "logs" / f"{port}.log").exists()


def test_busy_port_held_by_a_foreign_model_server(env: Env, cli: Cli, foreign: Any) -> None:
    env.add_model("mlx-a")
    port = env.team[0]
    child = foreign(env.model_dir("mlx-other"), port)
    before = env.registry_path.read_bytes()
    code, _, err = cli("load", "mlx-a", str(port), "--no-sync")
    assert code == 1
    assert f"held by pid {child.pid}" in error_line(err)
    assert env.registry_path.read_bytes() == before
    assert run_records(env) == []


def test_load_onto_a_port_serving_another_model_needs_replace(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    env.add_model("mlx-b")
    port = env.team[0]
    assert cli("load", "mlx-a", str(port), "--no-sync")[0] == 0
    old_pid = read_record(env, port)["pid"]
    before = env.registry_path.read_bytes()
    code, _, err = cli("load", "mlx-b", str(port), "--no-sync")
    assert code == 1
    assert "mlx-a" in error_line(err)
    assert "--replace" in err
    assert env.registry_path.read_bytes() == before
    assert alive(old_pid)
    code, out, err = cli("load", "mlx-b", str(port), "--replace", "--no-sync")
    assert code == 0, err
    assert out.split() == ["mlx-b", str(port)]
    assert not alive(old_pid)
    models = env.registry()["models"]
    assert models["mlx-a"]["port"] is None
    assert "withheld" not in models["mlx-a"]
    assert models["mlx-b"]["port"] == port
    assert read_record(env, port)["model_id"] == "mlx-b"
    code, out, _ = cli("status", "--json")
    row = status_row(out, port)
    assert (row["state"], row["model_id"]) == ("serving", "mlx-b")


def test_load_takes_over_a_port_whose_model_is_dead(env: Env, cli: Cli) -> None:
    env.add_model("mlx-old", port=env.team[0])
    env.add_model("mlx-new")
    code, _out, err = cli("load", "mlx-new", str(env.team[0]), "--no-sync")
    assert code == 0, err
    models = env.registry()["models"]
    assert models["mlx-old"]["port"] is None
    assert models["mlx-new"]["port"] == env.team[0]


def test_rename_refused_while_serving(env: Env, cli: Cli) -> None:
    env.add_model("mlx-a")
    assert cli("load", "mlx-a", str(env.team[0]), "--no-sync")[0] == 0
    before = env.registry_path.read_bytes()
    code, _, err = cli("rename", "mlx-a", "mlx-b", "--no-sync")
    assert code == 1
    assert "serving" in error_line(err)
    assert env.registry_path.read_bytes() == before


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield child
    child.kill()
    child.wait(5)


@pytest.mark.parametrize("variant", ["reused-pid", "dead-leader-foreign-group"])
@pytest.mark.parametrize("verb", ["unload", "unload-all", "reconcile", "status"])
def test_a_reused_pid_is_never_signalled(
    env: Env, cli: Cli, sleeper: subprocess.Popen[bytes], verb: str, variant: str
) -> None:
    port = env.team[0]
    env.write_registry({"mlx-a": plain_entry(env, "mlx-a", port)})
    real = mlxctl.read_proc(sleeper.pid)
    assert real is not None
    if variant == "reused-pid":
        # the recorded server died and its pid now belongs to an unrelated process
        write_record(env, port, pid=sleeper.pid, pgid=sleeper.pid, start_time=real.start + "9")
    else:
        # the leader is gone and the recorded group is some other live group
        write_record(env, port, pid=4194000, pgid=sleeper.pid, start_time="1")
    try:
        argv = {
            "unload": ["unload", str(port), "--no-sync"],
            "unload-all": ["unload-all", "--no-sync"],
            "reconcile": ["reconcile", "--no-sync"],
            "status": ["status", "--json"],
        }[verb]
        code, out, err = cli(*argv)
        time.sleep(0.2)
        assert sleeper.poll() is None, "an unrelated process was signalled"
        assert "Traceback" not in err
        if verb == "status":
            row = status_row(out, port)
            assert (row["state"], row["ours"], row["pid"]) == ("dead", False, None)
        else:
            assert code == 0, err
            assert env.registry()["models"]["mlx-a"]["port"] is None
    finally:
        record_path(env, port).unlink(missing_ok=True)


@pytest.mark.parametrize("assigned", [True, False])
def test_unload_of_a_foreign_listener_unloads_nothing(
    env: Env, cli: Cli, foreign: Any, assigned: bool
) -> None:
    port = env.team[0]
    path = env.add_model("mlx-a", port=port if assigned else None)
    child = foreign(path, port)
    before = env.registry_path.read_bytes()
    code, _, err = cli("unload", str(port), "--no-sync")
    assert code == 1
    line = error_line(err)
    assert f"port {port} held by pid {child.pid} (not started by mlxctl); nothing unloaded" in line
    assert child.poll() is None
    assert connectable(port)
    assert env.registry_path.read_bytes() == before


def test_unload_of_a_plain_listener_unloads_nothing(
    env: Env, cli: Cli, listening_socket: Any
) -> None:
    port = env.team[0]
    env.add_model("mlx-a", port=port)
    sock = listening_socket(port)
    before = env.registry_path.read_bytes()
    code, _, err = cli("unload", str(port), "--force", "--no-sync")
    assert code == 1  # --force only ever stops an MLX server, never another process
    assert "nothing unloaded" in error_line(err)
    assert sock.fileno() != -1
    assert env.registry_path.read_bytes() == before


def reservation_of(env: Env, model_id: str) -> dict[str, Any] | None:
    try:
        mark = env.registry()["models"][model_id].get("reservation")
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def test_status_starting_and_a_second_load_waits(env: Env, cli: Cli) -> None:
    env.add_model("mlx-slow", knobs={"start_delay": 1.5})
    loader = spawn_mlxctl(env.environ(), "load", "mlx-slow", "auto", "--no-sync", new_session=True)
    try:
        wait_until(lambda: reservation_of(env, "mlx-slow") is not None)
        port = env.registry()["models"]["mlx-slow"]["port"]
        code, out, err = cli("status", "--json", "--check")
        assert code == 0, out + err  # starting is not drift
        row = status_row(out, port)
        assert (row["state"], row["model_id"]) == ("starting", "mlx-slow")
        # the same load again waits for the running one instead of starting a second server
        code, out, err = cli("load", "mlx-slow", "auto", "--no-sync")
        assert code == 0, err
        assert out.split() == ["mlx-slow", str(port)]
        stdout, stderr = loader.communicate(timeout=30)
        assert loader.returncode == 0, stderr
        assert stdout.split() == ["mlx-slow", str(port)]
        log = (env.state / "logs" / f"{port}.log").read_text()
        assert log.count("=== mlxctl start") == 1
        assert reservation_of(env, "mlx-slow") is None
    finally:
        if loader.poll() is None:
            loader.kill()
        loader.communicate()


def test_a_dead_loaders_reservation_is_rolled_back(env: Env, cli: Cli) -> None:
    env.add_model("mlx-slow", knobs={"start_delay": 30})
    loader = spawn_mlxctl(
        env.environ(), "load", "mlx-slow", str(env.team[2]), "--no-sync", new_session=True
    )
    try:
        wait_until(record_path(env, env.team[2]).exists)
        server_pid = read_record(env, env.team[2])["pid"]
        assert reservation_of(env, "mlx-slow") is not None
        loader.kill()  # SIGKILL: no rollback, the reservation's owner is gone
        loader.communicate()
        assert alive(server_pid)
        # our young server still loading is "starting" even though its loader is gone
        code, out, _ = cli("status", "--json")
        row = status_row(out, env.team[2])
        assert row["state"] == "starting"
        assert row["ours"] is True
        code, out, err = cli("reconcile", "--no-sync")
        assert code == 0, err
        assert "stale reservation" in out
        model = env.registry()["models"]["mlx-slow"]
        assert model["port"] is None  # previous_port of a new assignment
        assert "reservation" not in model
        wait_until(lambda: not alive(server_pid))
        assert run_records(env) == []
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.communicate()
