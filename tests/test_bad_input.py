"""Every bad input: one line `mlxctl: error: ...` on stderr, the right exit code, no traceback,
the registry's bytes unchanged and no .bak left by a failed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import MLXCTL, Cli, Env
from helpers import (
    alive,
    bak,
    empty_or_absent,
    error_line,
    plain_entry,
    read_record,
    seed_registry,
    status_row,
    write_record,
)

import mlxctl

# -- helpers ------------------------------------------------------------------------------------

GOOD_MODEL = "mlx-a"


def good_entry(env: Env, port: int | None = None, model_id: str = GOOD_MODEL) -> dict[str, Any]:
    return plain_entry(env, model_id, port)


def assert_clean_failure(env: Env, code: int, err: str, before: bytes | None, exit_code: int = 1):
    assert code == exit_code, err
    line = error_line(err)  # exactly one, and no traceback
    for other in err.splitlines():
        assert other.startswith(("mlxctl: error:", "mlxctl: warning:", "hint: ")), err
    if before is None:
        assert not env.registry_path.exists()
    else:
        assert env.registry_path.read_bytes() == before
    assert not bak(env.registry_path).exists()
    return line


# Every command that reads the registry, with the arguments it needs; syncing ones get --no-sync.
def commands(env: Env) -> list[list[str]]:
    port = str(env.team[0])
    return [
        ["list"],
        ["status"],
        ["show", GOOD_MODEL],
        ["export"],
        ["set", GOOD_MODEL, "optillm=true", "--no-sync"],
        ["rename", GOOD_MODEL, "mlx-b", "--no-sync"],
        ["load", GOOD_MODEL, "auto", "--no-sync"],
        ["load", GOOD_MODEL, port, "--no-sync"],
        ["unload", port, "--no-sync"],
        ["unload-all", "--no-sync"],
        ["reconcile", "--no-sync"],
        ["up", "--no-sync"],
        ["assign-team", "--no-sync"],
        ["init"],
    ]


COMMAND_IDS = [
    "list",
    "status",
    "show",
    "export",
    "set",
    "rename",
    "load-auto",
    "load-port",
    "unload",
    "unload-all",
    "reconcile",
    "up",
    "assign-team",
    "init",
]

# -- corrupt registries -------------------------------------------------------------------------

CORRUPT_JSON = {
    "empty": b"",
    "whitespace": b"   \n",
    "truncated": b'{"version": 1, "generation": 3, "models": {"mlx-a": {"repo_id": "o/a", ',
    "brace": b"{",
    "garbage": b"this is not json\n",
    "trailing": b'{"version": 1, "models": {}} extra',
    "nul": b"\0\0\0\0",
    "not-utf8": b'{"version": 1, "models": {"\xff\xfe": 1}}',
}


@pytest.mark.parametrize("index", range(len(COMMAND_IDS)), ids=COMMAND_IDS)
@pytest.mark.parametrize("kind", list(CORRUPT_JSON))
def test_corrupt_registry(env: Env, cli: Cli, kind: str, index: int) -> None:
    env.registry_path.write_bytes(CORRUPT_JSON[kind])
    before = env.registry_path.read_bytes()
    argv = commands(env)[index]
    code, _out, err = cli(*argv)
    line = assert_clean_failure(env, code, err, before)
    assert str(env.registry_path) in line
    if kind != "not-utf8":
        assert "line" in line
        assert "backup" in line


def test_corrupt_registry_names_the_backup(env: Env, cli: Cli) -> None:
    bak(env.registry_path).write_text(json.dumps({"version": 1, "models": {}}))
    env.registry_path.write_text("{")
    code, _, err = cli("set", GOOD_MODEL, "optillm=true", "--no-sync")
    assert code == 1
    assert f"{env.registry_path}.bak" in err
    assert env.registry_path.read_text() == "{"
    assert json.loads(bak(env.registry_path).read_text()) == {"version": 1, "models": {}}


def test_registry_is_a_directory(env: Env, cli: Cli) -> None:
    env.registry_path.mkdir()
    code, _, err = cli("list")
    assert code == 1
    assert "Traceback" not in err
    assert str(env.registry_path) in err


SCHEMA_BREAKS: dict[str, tuple[Any, str]] = {
    "top-list": ([], "top level"),
    "top-null": (None, "top level"),
    "models-list": ({"version": 1, "models": []}, "models"),
    "version-string": ({"version": "1", "models": {}}, "version"),
    "generation-string": ({"version": 1, "generation": "3", "models": {}}, "generation"),
    "entry-string": ({"version": 1, "models": {"mlx-a": "x"}}, "mlx-a"),
}

FIELD_BREAKS: list[tuple[str, Any]] = [
    ("repo_id", 5),
    ("model_id", 5),
    ("cache_path", None),
    ("format", "exe"),
    ("format", 3),
    ("port", "8100"),
    ("port", 8100.5),
    ("port", True),
    ("port", 0),
    ("port", 65536),
    ("source_path", []),
    ("chat_template", 1),
    ("tool_call_parser", 1),
    ("reasoning_parser", 1),
    ("context_length", "big"),
    ("context_length", 0),
    ("max_output_tokens", -1),
    ("request_params", "x"),
    ("optillm", "yes"),
    ("server_args", "--trust-remote-code"),
    ("server_args", [1]),
    ("og_path", 1),
    ("og_offloaded_to", 1),
    ("reservation", 1),
    ("reservation", {"pid": "1"}),
    ("withheld", "x"),
]


@pytest.mark.parametrize("name", list(SCHEMA_BREAKS))
def test_registry_schema_breaks(env: Env, cli: Cli, name: str) -> None:
    data, needle = SCHEMA_BREAKS[name]
    env.registry_path.write_text(json.dumps(data))
    before = env.registry_path.read_bytes()
    for argv in (["list"], ["set", GOOD_MODEL, "optillm=true", "--no-sync"]):
        code, _, err = cli(*argv)
        line = assert_clean_failure(env, code, err, before)
        assert needle in line
        assert str(env.registry_path) in line


@pytest.mark.parametrize(
    ("field", "value"), FIELD_BREAKS, ids=[f"{f}={v!r}" for f, v in FIELD_BREAKS]
)
def test_registry_wrong_type_in_a_field(env: Env, cli: Cli, field: str, value: Any) -> None:
    broken = good_entry(env)
    broken[field] = value
    other = good_entry(env, model_id="mlx-other")
    env.write_registry({GOOD_MODEL: broken, "mlx-other": other})
    before = env.registry_path.read_bytes()
    for argv in (
        ["list"],
        ["status"],
        ["set", "mlx-other", "optillm=true", "--no-sync"],
        ["load", "mlx-other", "auto", "--no-sync"],
    ):
        code, _, err = cli(*argv)
        line = assert_clean_failure(env, code, err, before)
        assert f"models.{GOOD_MODEL}.{field}" in line


@pytest.mark.parametrize("field", ["repo_id", "model_id", "cache_path", "format", "port"])
def test_registry_missing_required_field(env: Env, cli: Cli, field: str) -> None:
    broken = good_entry(env)
    del broken[field]
    env.write_registry({GOOD_MODEL: broken})
    before = env.registry_path.read_bytes()
    code, _, err = cli("list")
    line = assert_clean_failure(env, code, err, before)
    assert f"models.{GOOD_MODEL}.{field}" in line


# -- unknown registry version -------------------------------------------------------------------


@pytest.fixture
def future_registry(env: Env) -> bytes:
    return seed_registry(env, good_entry(env, env.team[0]), version=2, generation=9)


@pytest.mark.parametrize(
    "argv", [["list"], ["status"], ["show", GOOD_MODEL], ["export"]], ids=lambda a: a[0]
)
def test_future_version_reads_with_a_warning(
    env: Env, cli: Cli, future_registry: bytes, argv: list[str]
) -> None:
    code, out, err = cli(*argv)
    assert code == 0, err
    assert "warning" in err
    assert "version 2" in err
    assert "Traceback" not in err
    assert out
    assert env.registry_path.read_bytes() == future_registry


def test_future_version_list_content(env: Env, cli: Cli, future_registry: bytes) -> None:
    code, out, _ = cli("list", "--json")
    assert code == 0
    assert [m["model_id"] for m in json.loads(out)["models"]] == [GOOD_MODEL]


@pytest.mark.parametrize(
    "argv",
    [
        ["set", GOOD_MODEL, "optillm=true", "--no-sync"],
        ["rename", GOOD_MODEL, "mlx-b", "--no-sync"],
        ["load", GOOD_MODEL, "auto", "--no-sync"],
        ["unload", "TEAM0", "--no-sync"],
        ["unload-all", "--no-sync"],
        ["reconcile", "--no-sync"],
        ["init"],
    ],
    ids=lambda a: a[0],
)
def test_future_version_refuses_writes(
    env: Env, cli: Cli, future_registry: bytes, argv: list[str]
) -> None:
    argv = [str(env.team[0]) if a == "TEAM0" else a for a in argv]
    code, _, err = cli(*argv)
    line = assert_clean_failure(env, code, err, future_registry)
    assert "version 2" in line
    assert empty_or_absent(env.state / "run")


# -- unknown models, ports, names ---------------------------------------------------------------


@pytest.fixture
def registry(env: Env) -> bytes:
    return seed_registry(env, good_entry(env))


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "mlx-nope"],
        ["set", "mlx-nope", "optillm=true", "--no-sync"],
        ["rename", "mlx-nope", "mlx-new", "--no-sync"],
        ["load", "mlx-nope", "auto", "--no-sync"],
        ["load", "nope", "auto", "--no-sync"],
    ],
    ids=lambda a: a[0] + ":" + a[1],
)
def test_unknown_model(env: Env, cli: Cli, registry: bytes, argv: list[str]) -> None:
    code, _, err = cli(*argv)
    line = assert_clean_failure(env, code, err, registry)
    assert "unknown model" in line
    assert argv[1] in line


def test_unknown_repo_offline(env: Env, cli: Cli, registry: bytes) -> None:
    env.set(HF_HUB_OFFLINE="1")
    code, _, err = cli("load", "test-org/never-downloaded", "auto", "--no-sync")
    line = assert_clean_failure(env, code, err, registry)
    assert "test-org/never-downloaded" in line


@pytest.mark.parametrize("port", ["0", "-1", "80", "65536", "99999", "abc", "8100.5", "", "0x1f90"])
@pytest.mark.parametrize("verb", ["load", "unload", "logs"])
def test_bad_port(env: Env, cli: Cli, registry: bytes, verb: str, port: str) -> None:
    argv = {
        "load": ["load", GOOD_MODEL, port, "--no-sync"],
        "unload": ["unload", port, "--no-sync"],
        "logs": ["logs", port],
    }[verb]
    code, _, err = cli(*argv)
    line = assert_clean_failure(env, code, err, registry)
    assert "port" in line


def test_port_outside_the_ranges_names_them(env: Env, cli: Cli, registry: bytes) -> None:
    outside = env.exp[-1] + 1
    code, _, err = cli("load", GOOD_MODEL, str(outside), "--no-sync")
    line = assert_clean_failure(env, code, err, registry)
    assert str(outside) in line
    assert f"{env.team[0]}-{env.team[-1]}" in line


EVIL_IDS = [
    "mlx-a;rm -rf ~",
    "mlx-a; touch PWNED",
    "mlx-$(touch PWNED)",
    "mlx-`touch PWNED`",
    "mlx-a\nb",
    "mlx-a\n",
    "mlx-..",
    "mlx-../../etc",
    "mlx-a/b",
    "mlx-a=b",
    "mlx-a b",
    "mlx-a|b",
    "mlx-a'b",
]
EVIL_REPOS = [
    "org/a;b",
    "org/a; touch PWNED",
    "org/$(touch PWNED)",
    "org/`touch PWNED`",
    "org/a\nb",
    "org/name\n",
    "org/../x",
    "../org/x",
    "org/a/b",
    "org/a=b",
    "org/a b",
    "org/a|b",
]


@pytest.mark.parametrize("new", EVIL_IDS)
def test_rename_refuses_evil_ids(env: Env, cli: Cli, registry: bytes, new: str) -> None:
    code, _, err = cli("rename", GOOD_MODEL, new, "--no-sync")
    line = assert_clean_failure(env, code, err, registry)
    assert "invalid model id" in line
    assert not list(env.tmp.rglob("PWNED"))


@pytest.mark.parametrize("name", EVIL_IDS)
def test_ensure_refuses_evil_names(env: Env, cli: Cli, registry: bytes, name: str) -> None:
    env.set(HF_HUB_OFFLINE="1")
    code, _, err = cli("ensure", "test-org/fine", "--name", name)
    line = assert_clean_failure(env, code, err, registry)
    assert "invalid model id" in line


@pytest.mark.parametrize("repo", EVIL_REPOS)
@pytest.mark.parametrize("verb", ["ensure", "load"])
def test_evil_repo_ids(env: Env, cli: Cli, registry: bytes, verb: str, repo: str) -> None:
    env.set(HF_HUB_OFFLINE="1")
    argv = ["ensure", repo] if verb == "ensure" else ["load", repo, "auto", "--no-sync"]
    code, _, err = cli(*argv)
    line = assert_clean_failure(env, code, err, registry)
    assert "invalid repo id" in line
    assert not list(env.tmp.rglob("PWNED"))
    assert not list(env.hub.glob("models--*"))


@pytest.mark.parametrize("model", EVIL_IDS)
@pytest.mark.parametrize("verb", ["show", "set", "load"])
def test_evil_model_refs_are_unknown(
    env: Env, cli: Cli, registry: bytes, verb: str, model: str
) -> None:
    env.set(HF_HUB_OFFLINE="1")
    argv = {
        "show": ["show", model],
        "set": ["set", model, "optillm=true", "--no-sync"],
        "load": ["load", model, "auto", "--no-sync"],
    }[verb]
    code, _, err = cli(*argv)
    assert_clean_failure(env, code, err, registry)
    assert not list(env.tmp.rglob("PWNED"))


@pytest.mark.parametrize(
    "assignment",
    [
        "request_params.a;b=1",
        "request_params.$(id)=1",
        "request_params.a\nb=1",
        "chat_template=/a\nb",
        "server_args='unclosed",
        "server_args=[1]",
        "=value",
    ],
)
def test_set_evil_values(env: Env, cli: Cli, registry: bytes, assignment: str) -> None:
    code, _, err = cli("set", GOOD_MODEL, assignment, "--no-sync")
    assert_clean_failure(env, code, err, registry)


# -- the config file and settings ---------------------------------------------------------------


BAD_CONFIGS = [
    ("MLX_HOST=1.2.3.4\nthis line is wrong\n", 2),
    ("# ok\n\n=nothing\n", 3),
    ("MLX HOST=1\n", 1),
    ("export\n", 1),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=["no-equals", "no-key", "space", "export"])
@pytest.mark.parametrize("argv", [["list"], ["status"], ["set", GOOD_MODEL, "optillm=1"]])
def test_corrupt_config_file_line(
    env: Env, cli: Cli, registry: bytes, bad: tuple[str, int], argv: list[str]
) -> None:
    text, line_no = bad
    conf = env.tmp / "config.env"
    conf.write_text(text)
    env.set(MLXCTL_CONFIG=str(conf))
    code, _, err = cli(*argv, *(["--no-sync"] if argv[0] == "set" else []))
    line = assert_clean_failure(env, code, err, registry)
    assert f"{conf}:{line_no}:" in line


def test_config_file_not_utf8(env: Env, cli: Cli, registry: bytes) -> None:
    conf = env.tmp / "config.env"
    conf.write_bytes(b"MLX_HOST=\xff\xfe\n")
    env.set(MLXCTL_CONFIG=str(conf))
    code, _, err = cli("list")
    line = assert_clean_failure(env, code, err, registry)
    assert str(conf) in line


def test_config_file_is_a_directory(env: Env, cli: Cli, registry: bytes) -> None:
    conf = env.tmp / "confdir"
    conf.mkdir()
    env.set(MLXCTL_CONFIG=str(conf))
    code, _, err = cli("list")
    line = assert_clean_failure(env, code, err, registry)
    assert str(conf) in line


def test_missing_config_file_is_fine(env: Env, cli: Cli, registry: bytes) -> None:
    env.set(MLXCTL_CONFIG=str(env.tmp / "absent.env"))
    assert cli("list")[0] == 0


@pytest.mark.parametrize(
    "case",
    [
        ("MLX_TEAM_PORTS", "abc", ["status"]),
        ("MLX_EXPERIMENTAL_PORTS", "9000-8000", ["load", GOOD_MODEL, "auto", "--no-sync"]),
        ("MLX_PROBE_TIMEOUT", "soon", ["status"]),
        ("MLX_PROBE_TIMEOUT", "-1", ["status"]),
        ("MLX_START_TIMEOUT", "0", ["load", GOOD_MODEL, "auto", "--no-sync"]),
        ("MLX_MEMORY_LIMIT", "lots", ["load", GOOD_MODEL, "auto", "--no-sync"]),
        ("MLX_MEMORY_LIMIT", "150%", ["load", GOOD_MODEL, "auto", "--no-sync"]),
        ("MLXCTL_ROLE", "laptop", ["list"]),
        ("MLX_LAUNCH_CMD", "'unclosed", ["load", GOOD_MODEL, "auto", "--no-sync"]),
    ],
    ids=lambda case: f"{case[0]}={case[1]}",
)
def test_bad_setting_values(
    env: Env, cli: Cli, registry: bytes, case: tuple[str, str, list[str]]
) -> None:
    setting, value, argv = case
    env.set(**{setting: value})
    code, _, err = cli(*argv)
    line = assert_clean_failure(env, code, err, registry)
    assert setting in line
    assert empty_or_absent(env.state / "run")


def test_memory_limit_refuses_before_any_spawn(env: Env, cli: Cli, registry: bytes) -> None:
    env.set(MLX_MEMORY_LIMIT="1")
    code, _, err = cli("load", GOOD_MODEL, "auto", "--no-sync")
    line = assert_clean_failure(env, code, err, registry)
    assert "memory" in line
    assert "--force" in err
    assert empty_or_absent(env.state / "logs")


# -- corrupt runtime records --------------------------------------------------------------------


def run_isolated(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """The real file in its own session: a record naming process group 0 must not be able to take
    the test runner down with it if mlxctl wrongly signals it."""
    return subprocess.run(
        [sys.executable, str(MLXCTL), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env.environ(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


CORRUPT_RECORDS: dict[str, bytes] = {
    "garbage": b"{not json",
    "empty": b"",
    "list": b"[1, 2]",
    "string-pid": json.dumps({"pid": "abc", "pgid": "abc", "start_time": "1"}).encode(),
    "missing-fields": json.dumps({"model_id": GOOD_MODEL}).encode(),
    "pid-zero": json.dumps({"pid": 0, "pgid": 0, "start_time": "1"}).encode(),
    "pid-negative": json.dumps({"pid": -1, "pgid": -1, "start_time": "1"}).encode(),
    "pid-huge": json.dumps({"pid": 2**40, "pgid": 2**40, "start_time": "1"}).encode(),
    "pid-float": json.dumps({"pid": 1.5, "pgid": 1.5, "start_time": 1}).encode(),
    "pid-one": json.dumps({"pid": 1, "pgid": 1, "start_time": "0"}).encode(),
    "not-utf8": b'{"pid": "\xff"}',
}


@pytest.mark.parametrize("kind", list(CORRUPT_RECORDS))
def test_corrupt_runtime_record(env: Env, kind: str) -> None:
    port = env.team[0]
    seed_registry(env, good_entry(env, port))
    record = write_record(env, port, raw=CORRUPT_RECORDS[kind])
    try:
        status = run_isolated(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert "Traceback" not in status.stderr
        row = status_row(status.stdout, port)
        assert row["state"] == "dead"
        assert row["ours"] is False
        assert row["pid"] is None
        # unload never signals what the record names: the assignment is dead, so it is cleared
        unload = run_isolated(env, "unload", str(port), "--no-sync")
        assert "Traceback" not in unload.stderr
        assert unload.returncode == 0, (unload.returncode, unload.stderr)
        assert env.registry()["models"][GOOD_MODEL]["port"] is None
    finally:
        # the fixture's teardown stops every group a record names "ours": never let it see these
        record.unlink(missing_ok=True)


UNSAFE_RECORDS = [
    {"pid": 0, "pgid": 0, "start_time": "1"},
    {"pid": -1, "pgid": -1, "start_time": "1"},
    {"pid": 2**40, "pgid": 2**40, "start_time": "1"},
    {"pid": 2**70, "pgid": 2**70, "start_time": "1"},
    {"pid": 99999999, "pgid": 1, "start_time": "1"},
    {"pid": 99999999, "pgid": 0, "start_time": "1"},
    {"pid": True, "pgid": True, "start_time": "1"},
    {"pid": None, "pgid": None, "start_time": None},
]


@pytest.mark.parametrize("record", UNSAFE_RECORDS, ids=lambda r: f"{r['pid']}-{r['pgid']}")
def test_record_is_ours_refuses_impossible_records(record: dict[str, Any]) -> None:
    """Process groups 0 and 1 mean "my own group" and "every process" to killpg: a record naming
    them (or a pid no process can have) is never ours, and asking never raises. (Only signal 0
    is sent here.)"""
    assert mlxctl.record_is_ours(record) is False


def test_record_is_ours_of_the_callers_own_group(env: Env) -> None:
    """A record whose leader is gone but whose pgid names a live group we did not start (here:
    the test runner's own) is not ours: we always spawn servers as their group's leader."""
    record = {"pid": 99999999, "pgid": os.getpgrp(), "start_time": "1"}
    assert mlxctl.record_is_ours(record) is False


def test_runtime_record_of_an_unassigned_port(env: Env) -> None:
    """A record for a port outside both ranges (left behind by older settings) is shown, not fatal."""
    port = env.exp[-1] + 3
    seed_registry(env, good_entry(env))
    write_record(env, port, raw=b"{oops")
    result = run_isolated(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "corrupt" in result.stderr
    assert status_row(result.stdout, port)["state"] == "free"


def test_stray_files_in_the_run_dir_are_ignored(env: Env) -> None:
    seed_registry(env, good_entry(env))
    run_dir = env.state / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "notaport.json").write_text("{}")
    (run_dir / "README").write_text("x")
    (run_dir / "99999999.json").write_text("{}")
    result = run_isolated(env, "status")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr


def test_lock_file_garbage_does_not_matter(env: Env, cli: Cli, registry: bytes) -> None:
    env.state.mkdir(parents=True, exist_ok=True)
    (env.state / "registry.lock").write_bytes(b"\xff garbage")
    code, _, err = cli("set", GOOD_MODEL, "optillm=true", "--no-sync")
    assert code == 0, err
    assert env.registry()["models"][GOOD_MODEL]["optillm"] is True


# -- violations already on disk never block unrelated writes -------------------------------------


def test_violations_on_disk_do_not_block_unrelated_writes(env: Env, cli: Cli) -> None:
    t = env.team
    far = env.exp[-1] + 7
    env.write_registry(
        {
            "mlx-a": good_entry(env, t[0], "mlx-a"),
            "mlx-b": good_entry(env, t[0], "mlx-b"),  # shares a port with mlx-a
            "mlx-far": good_entry(env, far, "mlx-far"),  # outside both ranges
            "Legacy_Id": good_entry(env, None, "Legacy_Id"),  # breaks the id pattern
            "mlx-c": good_entry(env, None, "mlx-c"),
        }
    )
    code, _, err = cli("set", "mlx-c", "optillm=true", "--no-sync")
    assert code == 0, err
    code, _, err = cli("set", "mlx-far", "context_length=4096", "--no-sync")
    assert code == 0, err
    assert env.registry()["models"]["mlx-far"]["context_length"] == 4096
    code, _, err = cli("rename", "Legacy_Id", "mlx-legacy", "--no-sync")
    assert code == 0, err
    assert "mlx-legacy" in env.registry()["models"]


def test_env_var_and_registry_errors_never_leak_secrets(env: Env, cli: Cli) -> None:
    secret = "hf_VerySecretToken42"
    env.set(HF_TOKEN=secret)
    env.registry_path.write_text("{")
    code, out, err = cli("list")
    assert code == 1
    assert secret not in out + err


@pytest.mark.parametrize("verb", ["unload", "unload-all", "reconcile"])
def test_future_version_stops_nothing(env: Env, cli: Cli, verb: str) -> None:
    """Writes are refused on a newer registry, so nothing that the write would record may happen
    first: a server is not stopped by a command that then cannot clear its assignment."""
    port = env.team[0]
    env.add_model(GOOD_MODEL)
    env.add_model("mlx-orphan")
    assert cli("load", GOOD_MODEL, str(port), "--no-sync")[0] == 0
    assert cli("load", "mlx-orphan", str(env.team[1]), "--no-sync")[0] == 0
    data = env.registry()
    data["version"] = 2
    data["models"]["mlx-orphan"]["port"] = None  # its server is now an orphan
    env.registry_path.write_text(json.dumps(data, indent=2))
    before = env.registry_path.read_bytes()
    pids = [read_record(env, p)["pid"] for p in (port, env.team[1])]
    argv = {"unload": ["unload", str(port)], "unload-all": ["unload-all"]}.get(verb, [verb])
    code, _, err = cli(*argv, "--no-sync")
    assert code == 1
    assert "Traceback" not in err
    assert "version 2" in err
    assert env.registry_path.read_bytes() == before
    for pid in pids:
        assert alive(pid), "a server was stopped before the refusal"
