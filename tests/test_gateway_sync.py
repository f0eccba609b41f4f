"""The gateway sync's file rules (SPEC §7.3-§7.6, §4 export, §6 exit 4) through the CLI, with
GATEWAY_HOST=local: what is written, what is never written, and what is refused. No LiteLLM here
(tests/test_gateway_litellm.py starts the real one); servers are stand-ins, and only where a test
needs a serving model."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, Env, registry_entry
from helpers import (
    MARK_BEGIN,
    MARK_END,
    bak,
    model_dir,
    one_json,
    outside_block,
    plain_entry,
    read_jsonl,
    record_path,
    seed_registry,
    status_row,
    write_script,
)

import mlxctl

BEGIN, END = MARK_BEGIN, MARK_END
STATE_RE = re.compile(r"# mlxctl generation=(\d+) route_via_optillm=(on|off|-)")

HAND_ROUTER = """\
# hand-written LiteLLM config
model_list:
  - model_name: main   # alias of mlx-a
    litellm_params:
      model: os.environ/MLX_MLX_A_MODEL
      api_base: os.environ/MLX_MLX_A_API_BASE
      api_key: os.environ/MLX_MLX_A_API_KEY

router_settings:
  num_retries: 0
"""
HAND_ENV = "# secrets\nPROVIDER_API_KEY=sk-hand-written-secret\n"
HAND_HANDLES = '{"handle":"cloud-x","kind":"model","invoke":"openai-chat"}\n'
CONFIG = {"max_position_embeddings": 4096}  # every model here: context_length 4096 by default


# -- helpers ------------------------------------------------------------------------------------


def seed(env: Env, *models: tuple[str, int | None], generation: int = 1, **fields: Any) -> None:
    """Registry with (model_id, port) entries whose weights exist (so they are exported)."""
    entries = [
        plain_entry(env, model_id, port, config=CONFIG, **fields) for model_id, port in models
    ]
    seed_registry(env, *entries, generation=generation)


def set_generation(env: Env, generation: int) -> None:
    data = env.registry()
    data["generation"] = generation
    env.registry_path.write_text(json.dumps(data))


def hand_write(env: Env, router: str | None = HAND_ROUTER, envtext: str | None = HAND_ENV) -> None:
    env.router.parent.mkdir(parents=True, exist_ok=True)
    env.handles.parent.mkdir(parents=True, exist_ok=True)
    if router is not None:
        env.router.write_text(router)
    if envtext is not None:
        env.env_file.write_bytes(envtext.encode())
        env.env_file.chmod(0o600)
    env.handles.write_text(HAND_HANDLES)


def sync(cli: Cli, *flags: str) -> dict[str, Any]:
    """`--json sync-gateway`; its one result object (exit 0 required)."""
    code, out, err = cli("--json", "sync-gateway", *flags)
    assert code == 0, err
    return one_json(out)


LOCK = ".mlxctl-sync.lock"  # a real sync takes it first, also when it then refuses


def tree(root: Path, lock: bool = False) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file under root: (content, mtime_ns, inode, mode) - any write shows up."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and (lock or path.name != LOCK):
            st = path.stat()
            found[str(path.relative_to(root))] = (
                path.read_bytes(),
                st.st_mtime_ns,
                st.st_ino,
                stat.S_IMODE(st.st_mode),
            )
    return found


def age(*paths: Path) -> None:
    """Move mtimes into the past, so a rewrite within the same clock tick still shows."""
    for path in paths:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def env_state(env: Env) -> tuple[int, str]:
    match = STATE_RE.search(env.env_file.read_text())
    assert match, env.env_file.read_text()
    return int(match.group(1)), match.group(2)


def env_values(env: Env) -> dict[str, str]:
    lines = env.env_file.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def routed(env: Env, handle: str = "mlx-a") -> bool:
    """Is the handle routed via OptiLLM in router.yaml and env.local (checked to agree)?"""
    in_router = f"model_name: router-{handle}" in env.router.read_text()
    stem = handle.upper().replace("-", "_")
    in_env = env_values(env)[f"MLX_{stem}_MODEL"] == f"openai/router-{handle}"
    assert in_router == in_env
    return in_router


# -- §7.6: unchanged, .bak, modes ---------------------------------------------------------------


def test_unchanged_resync_writes_nothing(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]), ("mlx-b", env.team[1]))
    hand_write(env)
    first = sync(cli)
    assert first["changed"] is True and first["sync"]["status"] == "changed"
    assert first["sync"]["files"] == {"router": "changed", "env": "changed", "handles": "changed"}
    for path in (env.router, env.env_file, env.handles):
        age(path, bak(path))
    before = tree(env.gateway, lock=True)

    again = sync(cli)
    assert again["changed"] is False
    assert again["sync"]["status"] == "unchanged" and again["sync"]["restart_needed"] is False
    assert again["sync"]["files"] == {
        "router": "unchanged",
        "env": "unchanged",
        "handles": "unchanged",
    }
    assert tree(env.gateway, lock=True) == before  # contents, mtimes, inodes, modes; .baks too
    # the real file agrees, and says so
    result = env.run("sync-gateway")
    assert result.returncode == 0, result.stderr
    assert "gateway: unchanged; no restart needed" in result.stderr
    assert tree(env.gateway, lock=True) == before


def test_bak_is_the_content_before_this_sync(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]), ("mlx-b", None))
    hand_write(env)
    env.env_file.chmod(0o640)
    originals = {p: p.read_bytes() for p in (env.router, env.env_file, env.handles)}
    sync(cli, "--no-route-via-optillm")
    for path, content in originals.items():
        assert bak(path).read_bytes() == content
    assert stat.S_IMODE(bak(env.env_file).stat().st_mode) == 0o640

    # mlx-a leaves and mlx-b arrives: env.local is first written with both (the union), then
    # with mlx-b only; its .bak must still be the file as it was before this sync
    synced = {p: p.read_bytes() for p in (env.router, env.env_file, env.handles)}
    data = env.registry()
    data["models"]["mlx-a"]["port"], data["models"]["mlx-b"]["port"] = None, env.team[1]
    data["generation"] = 2
    env.registry_path.write_text(json.dumps(data))
    assert sync(cli)["sync"]["status"] == "changed"
    for path, content in synced.items():
        assert bak(path).read_bytes() == content, path.name
    values = env_values(env)
    assert "MLX_MLX_B_API_BASE" in values and "MLX_MLX_A_API_BASE" in values  # main dangles
    assert values["MLX_MLX_A_API_BASE"] == "http://127.0.0.1:9/v1"
    assert stat.S_IMODE(env.env_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(bak(env.env_file).stat().st_mode) == 0o640
    leftovers = [p.name for p in env.gateway.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("mode", [0o600, 0o640, None])
def test_env_local_mode(env: Env, cli: Cli, mode: int | None) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext=HAND_ENV if mode is not None else None)
    if mode is not None:
        env.env_file.chmod(mode)
    sync(cli)
    # env files hold secrets: a new one is 0600, an existing one keeps its mode
    assert stat.S_IMODE(env.env_file.stat().st_mode) == (mode or 0o600)
    if mode is not None:
        assert stat.S_IMODE(bak(env.env_file).stat().st_mode) == mode
    set_generation(env, 2)
    sync(cli, "--no-route-via-optillm")
    assert stat.S_IMODE(env.env_file.stat().st_mode) == (mode or 0o600)


# -- --dry-run ----------------------------------------------------------------------------------


def test_dry_run_prints_diffs_and_writes_nothing(env: Env) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext="PROVIDER_API_KEY=sk-hand-written-secret")  # no final newline
    before = tree(env.tmp)
    result = env.run("sync-gateway", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert tree(env.tmp) == before  # not a byte, not a .bak (nor a lock file: see below)
    out = result.stdout
    assert "sk-hand-written-secret" not in out + result.stderr
    assert "--- a/router.yaml\n+++ b/router.yaml\n" in out
    assert "+  - model_name: mlx-a\n" in out and "+  # BEGIN MLXCTL AUTO\n" in out
    assert " # hand-written LiteLLM config\n" in out  # router.yaml's diff has context
    assert "--- a/handles.jsonl\n+++ b/handles.jsonl\n" in out
    env_diff = out[out.index("--- a/env.local") : out.index("--- a/handles.jsonl")]
    body = env_diff.splitlines()[2:]
    assert body and all(line[:1] in ("@", "+", "-") for line in body), env_diff  # no context
    assert "+MLX_MLX_A_API_BASE=http://127.0.0.1:4020/v1" in body


def test_dry_run_creates_no_directory_and_no_lock_file(env: Env, cli: Cli) -> None:
    """--dry-run changes nothing (SPEC §6): not even the gateway's directories or its lock file."""
    seed(env, ("mlx-a", env.team[0]))
    code, out, err = cli("sync-gateway", "--dry-run")
    assert code == 0, err
    assert "+++ b/router.yaml" in out
    assert list(env.gateway.iterdir()) == []


def test_dry_run_masks_values_outside_the_block(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env)
    sync(cli)
    # the block moves (a new port) between hand-written secrets: no context line may show them
    text = "OTHER_SECRET=sk-second-secret\n" + env.env_file.read_text() + "TAIL_TOKEN=tok-3\n"
    env.env_file.write_text(text)
    data = env.registry()
    data["models"]["mlx-a"]["port"] = env.team[1]
    env.registry_path.write_text(json.dumps(data))
    before = tree(env.gateway)
    code, out, err = cli("sync-gateway", "--dry-run", "--no-route-via-optillm")
    assert code == 0, err
    assert tree(env.gateway) == before
    for secret in ("sk-hand-written-secret", "sk-second-secret", "tok-3"):
        assert secret not in out + err
    env_diff = out[out.index("--- a/env.local") :]
    env_diff = env_diff[: env_diff.index("--- a/handles.jsonl")]
    assert f"+MLX_MLX_A_API_BASE=http://127.0.0.1:{env.team[1]}/v1" in env_diff
    assert "-MLX_MLX_A_API_BASE=http://127.0.0.1:4020/v1" in env_diff
    assert all(line[:1] in ("@", "+", "-") for line in env_diff.splitlines())


# -- §7.4: the OptiLLM toggle -------------------------------------------------------------------


def test_optillm_toggle_flag_env_remembered_default(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    assert sync(cli)["sync"]["route_via_optillm"] is True  # default: on
    assert routed(env) and env_state(env)[1] == "-"
    values = env_values(env)
    assert values["MLX_MLX_A_API_BASE"] == "http://127.0.0.1:4020/v1"
    assert values["MLX_ROUTER_MLX_A_API_BASE"] == f"http://127.0.0.1:{env.team[0]}/v1"
    assert values["MLX_ROUTER_MLX_A_MODEL"] == "openai/mlx-a"

    sync(cli, "--no-route-via-optillm")
    assert not routed(env) and env_state(env)[1] == "off"
    assert "MLX_ROUTER_MLX_A_API_BASE" not in env_values(env)
    assert env_values(env)["MLX_MLX_A_API_BASE"] == f"http://127.0.0.1:{env.team[0]}/v1"
    assert sync(cli)["sync"]["status"] == "unchanged"  # a plain sync honours the remembered off

    env.set(MLX_ROUTE_VIA_OPTILLM="on")  # the setting beats the remembered value...
    assert sync(cli)["sync"]["route_via_optillm"] is True
    assert routed(env) and env_state(env)[1] == "off"  # ...without replacing it
    env.set(MLX_ROUTE_VIA_OPTILLM=None)
    sync(cli)
    assert not routed(env)

    env.set(MLX_ROUTE_VIA_OPTILLM="0")  # the flag beats the setting, and is remembered
    sync(cli, "--route-via-optillm")
    assert routed(env) and env_state(env)[1] == "on"
    env.set(MLX_ROUTE_VIA_OPTILLM=None)
    assert sync(cli)["sync"]["status"] == "unchanged"

    config = env.tmp / "config.env"  # the gateway's config file counts like the variable
    config.write_text("MLX_ROUTE_VIA_OPTILLM=false\n")
    env.set(MLXCTL_CONFIG=str(config))
    sync(cli)
    assert not routed(env) and env_state(env)[1] == "on"


# -- §7.6: restart_needed, state-only, --reload ------------------------------------------------


def test_state_only_change_needs_no_restart_and_no_reload(env: Env, cli: Cli) -> None:
    calls = env.tmp / "reloads"
    script = env.tmp / "reload.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('reload\\n')\n")
    env.set(GATEWAY_RELOAD_CMD=f"{sys.executable} {script} {calls}")
    seed(env, ("mlx-a", env.team[0]), generation=5)
    first = sync(cli, "--reload")
    assert first["sync"]["restart_needed"] is True
    assert calls.read_text() == "reload\n"

    # the registry moved on (an edit that changes nothing the gateway sees): a new state line only
    assert cli("set", "mlx-a", "optillm=true")[0] == 0
    assert env.registry()["generation"] == 6
    router_before = env.router.read_bytes()
    result = sync(cli, "--reload")
    assert result["sync"]["status"] == "state-only"
    assert result["sync"]["restart_needed"] is False
    assert result["sync"]["files"] == {
        "router": "unchanged",
        "env": "changed",
        "handles": "unchanged",
    }
    assert env_state(env) == (6, "-")
    assert env.router.read_bytes() == router_before
    assert calls.read_text() == "reload\n"  # not run again

    # a real change with --reload: run exactly once
    assert cli("set", "mlx-a", "context_length=2048", "--no-sync")[0] == 0
    result = sync(cli, "--reload")
    assert result["sync"]["status"] == "changed" and result["sync"]["restart_needed"] is True
    assert "max_input_tokens: 2048" in env.router.read_text()
    assert calls.read_text() == "reload\nreload\n"
    assert sync(cli, "--reload")["sync"]["status"] == "unchanged"
    assert calls.read_text() == "reload\nreload\n"


def test_a_changed_variable_alone_needs_a_restart(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    sync(cli, "--no-route-via-optillm")
    env.set(MLX_HOST="localhost")  # api_base changes; router.yaml does not
    result = sync(cli)
    assert result["sync"]["files"]["router"] == "unchanged"
    assert result["sync"]["files"]["env"] == "changed"
    assert result["sync"]["status"] == "changed" and result["sync"]["restart_needed"] is True


# -- §7.6: stale exports ------------------------------------------------------------------------


def test_stale_export_is_refused_unless_accept_older(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]), generation=9)
    hand_write(env)
    sync(cli)
    assert env_state(env) == (9, "-")
    set_generation(env, 3)  # e.g. a registry restored from an old backup
    data = env.registry()
    data["models"]["mlx-a"]["port"] = env.team[1]
    env.registry_path.write_text(json.dumps(data))
    before = tree(env.gateway)
    code, _, err = cli("sync-gateway")
    assert code == 1
    assert "mlxctl: error: stale export: generation 3 is older than the applied 9" in err
    assert "--accept-older" in err
    assert tree(env.gateway) == before
    result = sync(cli, "--accept-older")
    assert result["sync"]["status"] == "changed"
    assert env_state(env) == (3, "-")
    assert f"ep_mlx_slot_{env.team[1]}" in env.handles.read_text()


# -- §4 export and §7.1: what is exported ------------------------------------------------------


def test_only_exportable_models_reach_the_gateway(env: Env, cli: Cli) -> None:
    t = env.team
    live_mark = mlxctl.self_mark()  # this test process: alive, so the mark holds
    entries = {
        "mlx-ok": registry_entry(
            "mlx-ok", model_dir(env.tmp / "plain", "mlx-ok", config=CONFIG), t[0]
        ),
        "mlx-gone": registry_entry("mlx-gone", env.tmp / "not-on-disk", t[1]),
        "mlx-reserved": registry_entry(
            "mlx-reserved",
            model_dir(env.tmp / "plain", "mlx-reserved", config=CONFIG),
            t[2],
            reservation={**live_mark, "since": "t", "previous_port": None},
        ),
        "mlx-withheld": registry_entry(
            "mlx-withheld",
            model_dir(env.tmp / "plain", "mlx-withheld", config=CONFIG),
            t[3],
            withheld=live_mark,
        ),
        "mlx-stale-mark": registry_entry(
            "mlx-stale-mark",
            model_dir(env.tmp / "plain", "mlx-stale-mark", config=CONFIG),
            t[4],
            withheld={"pid": os.getpid(), "start_time": "not this process"},
        ),
        "Mlx_Bad.Id": registry_entry(
            "Mlx_Bad.Id", model_dir(env.tmp / "plain", "bad", config=CONFIG), t[5]
        ),
        "mlx-idle": registry_entry(
            "mlx-idle", model_dir(env.tmp / "plain", "mlx-idle", config=CONFIG), None
        ),
    }
    env.write_registry(entries, generation=4)
    code, out, err = cli("export")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"version", "generation", "api_host", "model_ids", "models"}
    assert (data["version"], data["generation"], data["api_host"]) == (1, 4, "127.0.0.1")
    assert sorted(data["model_ids"]) == sorted(entries)
    assert [m["handle"] for m in data["models"]] == ["mlx-ok", "mlx-stale-mark"]
    assert data["models"][0] == {
        "handle": "mlx-ok",
        "port": t[0],
        "context_length": 4096,
        "max_output_tokens": 4096,
        "request_params": {},
        "unpersisted_defaults": ["context_length", "max_output_tokens"],
    }
    assert "Mlx_Bad.Id" in err and "rename" in err
    assert "mlx-gone" in err

    result = sync(cli)
    assert result["sync"]["unpersisted_defaults"] == [
        "mlx-ok.context_length",
        "mlx-ok.max_output_tokens",
        "mlx-stale-mark.context_length",
        "mlx-stale-mark.max_output_tokens",
    ]
    handles = [row["handle"] for row in read_jsonl(env.handles)]
    assert handles == ["mlx-ok", "mlx-stale-mark"]
    router = env.router.read_text()
    for hidden in ("mlx-gone", "mlx-reserved", "mlx-withheld", "Mlx_Bad", "MLX_BAD", "mlx-idle"):
        assert hidden not in router and hidden not in env.handles.read_text()
        assert hidden.upper().replace("-", "_") not in env.env_file.read_text()
    assert env.registry()["generation"] == 4  # a sync persists nothing on the Studio


# -- exit 4 and gateway.pending -----------------------------------------------------------------


def break_gateway(env: Env, how: str) -> Callable[[], None]:
    """Make the next sync fail the way `how` says; return what repairs it."""
    if how == "mkdir fails":
        # tests run as root, so chmod cannot forbid anything: a regular file in the path can
        blocker = env.tmp / "not-a-dir"
        blocker.write_text("a regular file: nothing can be created under it\n")
        env.set(GATEWAY_ROUTER_YAML=str(blocker / "config" / "router.yaml"))
        return lambda: env.set(GATEWAY_ROUTER_YAML=None)
    # a write that fails midway (root's stand-in for EACCES on a directory owned by the gateway's
    # service user, or a full disk): a directory where the temp file of router.yaml must go
    env.router.parent.mkdir(parents=True, exist_ok=True)
    obstacle = env.router.parent / f".router.yaml.tmp-{os.getpid()}"  # in-process: our pid
    obstacle.mkdir()
    return obstacle.rmdir


@pytest.mark.parametrize("how", ["mkdir fails", "write fails"])
def test_failed_sync_after_a_change_exits_4_and_is_retried(env: Env, cli: Cli, how: str) -> None:
    env.add_model("mlx-a")
    repair = break_gateway(env, how)
    port = env.team[0]

    code, out, err = cli("--json", "load", "mlx-a", str(port))
    assert code == 4, err
    result = json.loads(out)
    assert result["ok"] is False and result["changed"] is True and result["port"] == port
    assert result["sync"]["status"] == "failed"
    assert "mlxctl: error: change applied but the gateway sync failed" in err
    assert env.registry()["models"]["mlx-a"]["port"] == port  # the change is kept
    pending = env.state / "gateway.pending"
    since = pending.read_text().strip()
    assert since
    code, out, _ = cli("status")
    assert code == 0 and f"gateway: stale since {since}" in out
    code, out, _ = cli("status", "--json")
    assert json.loads(out)["gateway"] == {"pending_since": since}

    # still failing: exit 4 again, pending keeps its first time; sync-gateway itself: exit 1
    code, _, err = cli("load", "mlx-a", str(port))
    assert code == 4, err
    assert pending.read_text().strip() == since
    code, _, err = cli("sync-gateway")
    assert code == 1 and err.startswith("mlxctl: error: "), err
    assert pending.exists()

    # fixed: a no-op load of the serving model retries the sync and clears the mark
    repair()
    code, out, err = cli("--json", "load", "mlx-a", str(port))
    assert code == 0, err
    result = json.loads(out)
    assert result["changed"] is False and result["sync"]["status"] == "changed"
    assert not pending.exists()
    assert "- model_name: mlx-a\n" in env.router.read_text()
    code, out, _ = cli("status")
    assert "stale" not in out
    code, _, err = cli("load", "mlx-a", str(port))
    assert code == 0 and "gateway" not in err  # nothing pending, nothing changed: no sync


# -- bad gateway inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("router", "why"),
    [
        ("model_list:\n  - model_name: [unclosed\n", "does not parse"),
        ("model_list:\n  - model_name: x\n  # BEGIN MLXCTL AUTO\n", "unbalanced"),
        ("model_list:\n  # END MLXCTL AUTO\n  # BEGIN MLXCTL AUTO\n", "unbalanced"),
        ("model_list: []\n", "flow-style"),
        ("model_list: [{model_name: x}]\n", "flow-style"),
        ("model_list:\n  main:\n    model: x\n", "not a block list"),
        ("- just\n- a list\n", "not a mapping"),
    ],
)
def test_bad_router_yaml_is_refused_and_nothing_is_written(
    env: Env, cli: Cli, router: str, why: str
) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, router=router)
    before = tree(env.gateway)
    code, _, err = cli("sync-gateway")
    assert code == 1
    assert "router.yaml" in err and why in err and "nothing was written" in err, err
    assert "Traceback" not in err
    assert tree(env.gateway) == before


def test_unbalanced_env_markers_are_refused(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext=HAND_ENV + BEGIN + "\nMLX_MLX_A_API_KEY=dummy\n")
    before = tree(env.gateway)
    code, _, err = cli("sync-gateway")
    assert code == 1 and "env.local" in err and "unbalanced" in err
    assert tree(env.gateway) == before


BLOCK_A = "# BEGIN MLXCTL AUTO\n- model_name: mlx-a\n"


NO_KEY = "# top comment\nrouter_settings:\n  num_retries: 0"
OTHER = "model_list:\n    - model_name: other\n      litellm_params: {model: openai/x}\n"


@pytest.mark.parametrize(
    ("router", "expected_start", "expected_outside"),
    [
        (None, "model_list:\n" + BLOCK_A, "model_list:\n"),  # missing: created
        ("model_list:\n", "model_list:\n" + BLOCK_A, "model_list:\n"),  # empty
        (
            "model_list:\nrouter_settings:\n  num_retries: 0\n",
            "model_list:\n" + BLOCK_A,
            "model_list:\nrouter_settings:\n  num_retries: 0\n",
        ),
        (  # no model_list key (and no final newline): `model_list:` + block appended at the end
            NO_KEY,
            NO_KEY + "\nmodel_list:\n" + BLOCK_A,
            NO_KEY + "\nmodel_list:\n",
        ),
        (  # no markers yet: the block becomes the first items, indented like the others
            OTHER,
            "model_list:\n    # BEGIN MLXCTL AUTO\n    - model_name: mlx-a\n",
            OTHER,
        ),
    ],
)
def test_router_yaml_shapes_that_are_handled(
    env: Env, cli: Cli, router: str | None, expected_start: str, expected_outside: str
) -> None:
    import yaml

    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, router=router)
    sync(cli, "--no-route-via-optillm")
    text = env.router.read_text()
    assert text.startswith(expected_start), text
    assert outside_block(text) == expected_outside
    names = [item["model_name"] for item in yaml.safe_load(text)["model_list"]]
    assert names[0] == "mlx-a"
    assert sync(cli)["sync"]["status"] == "unchanged"


def test_env_local_without_final_newline(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext="PROVIDER_API_KEY=sk-x")
    sync(cli)
    text = env.env_file.read_text()
    assert text.startswith("PROVIDER_API_KEY=sk-x\n" + BEGIN + "\n")
    assert text.endswith(END + "\n")
    assert sync(cli)["sync"]["status"] == "unchanged"


def test_env_local_with_crlf(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext="# hand\r\nPROVIDER_API_KEY=sk-x\r\n")
    sync(cli)
    raw = env.env_file.read_bytes()
    assert raw.startswith(b"# hand\r\nPROVIDER_API_KEY=sk-x\r\n# BEGIN MLXCTL AUTO\r\n")
    assert raw.count(b"\n") == raw.count(b"\r\n")  # every line ends the same way
    assert b"MLX_MLX_A_API_KEY=dummy\r\n" in raw
    set_generation(env, 2)
    data = env.registry()
    data["models"]["mlx-a"]["port"] = env.team[1]
    env.registry_path.write_text(json.dumps(data))
    sync(cli)  # replaced in place, not appended a second time
    raw = env.env_file.read_bytes()
    assert raw.count(b"# BEGIN MLXCTL AUTO\r\n") == 1 and raw.count(b"\n") == raw.count(b"\r\n")
    assert f"http://127.0.0.1:{env.team[1]}/v1\r\n".encode() in raw
    assert env_state(env)[0] == 2
    assert sync(cli)["sync"]["status"] == "unchanged"


def test_env_line_outside_the_block_is_a_conflict_not_deleted(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env, envtext=HAND_ENV + "MLX_MLX_A_API_BASE=http://127.0.0.1:1/v1\n")
    code, _, err = cli("sync-gateway")
    assert code == 0, err
    assert "MLX_MLX_A_API_BASE is also set outside the mlxctl block" in err
    text = env.env_file.read_text()
    assert text.startswith(HAND_ENV + "MLX_MLX_A_API_BASE=http://127.0.0.1:1/v1\n" + BEGIN)


def test_handles_jsonl_keeps_foreign_and_garbage_lines_in_place(env: Env, cli: Cli) -> None:
    t = env.team
    seed(env, ("mlx-a", t[1]), ("mlx-b", t[0]))
    old_managed = {"handle": "mlx-gone", "endpoint_ref": "ep_mlx_slot_8100"}
    text = (
        "this is not json\n"
        '{"handle":"cloud-x","kind":"model"}\n'
        f"{json.dumps(old_managed)}\n"  # managed by its endpoint_ref: replaced here
        "{broken\n"
        "\n"
        '{"handle":"cloud-y","endpoint_ref":"ep_other_1"}'  # no final newline
    )
    hand_write(env)
    env.handles.write_text(text)
    sync(cli)
    lines = env.handles.read_text().split("\n")
    rows = [
        json.dumps(
            {
                "handle": h,
                "kind": "model",
                "invoke": "openai-chat",
                "managed_by": "launchd",
                "endpoint_ref": f"ep_mlx_slot_{p}",
                "selector": {"model": h},
            },
            separators=(",", ":"),
        )
        for h, p in (("mlx-b", t[0]), ("mlx-a", t[1]))  # sorted by port
    ]
    assert lines == [
        "this is not json",
        '{"handle":"cloud-x","kind":"model"}',
        *rows,
        "{broken",
        "",
        '{"handle":"cloud-y","endpoint_ref":"ep_other_1"}',
    ]
    assert sync(cli)["sync"]["status"] == "unchanged"


def test_handles_rows_go_at_the_end_when_none_is_managed(env: Env, cli: Cli) -> None:
    seed(env, ("mlx-a", env.team[0]))
    hand_write(env)
    env.handles.write_text("garbage\n" + HAND_HANDLES)
    sync(cli)
    lines = env.handles.read_text().splitlines()
    assert lines[:2] == ["garbage", HAND_HANDLES.strip()]
    assert json.loads(lines[2])["handle"] == "mlx-a" and len(lines) == 3
    assert "router-mlx-a" not in env.handles.read_text()  # internal entries never appear


# -- without PyYAML -----------------------------------------------------------------------------


def test_without_pyyaml(env: Env) -> None:
    """A host whose python3 lacks PyYAML: commands that do not render work; a syncing command
    stops with the install hint before it changes anything."""
    shadow = env.tmp / "no-yaml"
    shadow.mkdir()
    imported = env.tmp / "yaml-was-imported"
    (shadow / "yaml.py").write_text(
        f"open({str(imported)!r}, 'a').write('x')\n"
        "raise ImportError('No module named yaml (test shadow)')\n"
    )
    environ = {**env.environ(), "PYTHONPATH": str(shadow)}
    env.add_model("mlx-a")
    env.add_model("mlx-b")
    port, other = env.team[0], env.team[1]

    def run(*argv: str) -> Any:
        return env.run(*argv, env=environ)

    for argv in (["list"], ["status"], ["show", "mlx-a"], ["export"], ["config"]):
        assert run(*argv).returncode == 0, argv
    result = run("load", "mlx-a", str(port), "--no-sync")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mlx-a", str(port)]
    assert not imported.exists()  # none of these even tried PyYAML (SPEC §2)

    registry = env.registry_path.read_bytes()
    for argv in (["unload", str(port)], ["load", "mlx-b", str(other)], ["sync-gateway"]):
        result = run(*argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert "mlxctl: error: install PyYAML (python3-yaml)" in result.stderr
        assert "Traceback" not in result.stderr
    assert env.registry_path.read_bytes() == registry  # nothing changed...
    assert not record_path(env, other).exists()  # ...nothing started...
    assert not (env.state / "logs" / f"{other}.log").exists()
    assert list(env.gateway.rglob("*")) == []  # ...nothing written
    row = status_row(run("status", "--json").stdout, port)
    assert row["state"] == "serving"  # ...nothing stopped
    assert run("unload", str(port), "--no-sync").returncode == 0


def without_yaml(env: Env) -> dict[str, str]:
    shadow = env.tmp / "no-yaml"
    shadow.mkdir(exist_ok=True)
    (shadow / "yaml.py").write_text("raise ImportError('No module named yaml (test shadow)')\n")
    return {**env.environ(), "PYTHONPATH": str(shadow)}


def test_without_pyyaml_edits_that_never_render_still_work(env: Env) -> None:
    """Only a command that will render needs PyYAML (SPEC §2): `set` of a field the gateway
    never sees, or `rename` of a model that is not exported, ends without a sync; so do the
    syncing commands that have nothing to do."""
    environ = without_yaml(env)
    seed(env, ("mlx-a", None))
    result = env.run("set", "mlx-a", "optillm=true", env=environ)
    assert result.returncode == 0, result.stderr
    assert env.registry()["models"]["mlx-a"]["optillm"] is True
    result = env.run("rename", "mlx-a", "mlx-b", env=environ)
    assert result.returncode == 0, result.stderr
    assert list(env.registry()["models"]) == ["mlx-b"]
    for argv in (
        ["unload", str(env.exp[0])],
        ["unload-all"],
        ["reconcile"],
        ["up"],
        ["set", "mlx-b", f"context_length={4096}"],  # not exported: no port
    ):
        result = env.run(*argv, env=environ)
        assert result.returncode == 0, (argv, result.stderr)
        assert "PyYAML" not in result.stderr
    assert list(env.gateway.rglob("*")) == []


def test_without_pyyaml_an_edit_that_renders_is_refused_before_it_changes(env: Env) -> None:
    environ = without_yaml(env)
    seed(env, ("mlx-a", env.team[0]))
    before = env.registry_path.read_bytes()
    result = env.run("set", "mlx-a", "context_length=4096", env=environ)
    assert result.returncode == 1
    assert "mlxctl: error: install PyYAML (python3-yaml)" in result.stderr
    assert env.registry_path.read_bytes() == before
    result = env.run("rename", "mlx-a", "mlx-b", env=environ)
    assert result.returncode == 1
    assert "install PyYAML" in result.stderr
    assert env.registry_path.read_bytes() == before


@pytest.mark.parametrize("reply", ["[]", '"export"', "17", "null"])
def test_a_studio_export_that_is_not_an_object_is_one_error_line(
    env: Env, cli: Cli, reply: str
) -> None:
    """Issue 8: an `assert` turned a JSON list from the Studio into a traceback. A peer that
    answers valid JSON of the wrong shape is a fault the real Studio cannot be made to produce,
    so an ssh stand-in prints it."""
    ssh = write_script(env.tmp / "studio-answers", f"printf '%s\\n' '{reply}'")
    env.set(MLXCTL_ROLE="gateway", GATEWAY_HOST="mini", MLXCTL_SSH=str(ssh))
    code, _, err = cli("sync-gateway")
    assert code == 1
    assert "Traceback" not in err
    assert "mlxctl: error: export from studio is not a JSON object" in err
    assert list(env.gateway.rglob("*.yaml")) == []
