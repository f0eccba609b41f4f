"""assign-team (SPEC §10) on a stand-in fleet: the plan, minimal restarts, a swap, the gateway."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import Cli, Env
from helpers import read_jsonl, read_record, status_rows, wait_until, write_knobs

SIZES = {"mlx-a": 6000, "mlx-b": 5000, "mlx-f": 4000, "mlx-c": 3000, "mlx-d": 2000, "mlx-e": 1000}
OPTILLM = {"mlx-a", "mlx-f", "mlx-c"}


def starts(env: Env, model_id: str) -> int:
    """How many times mlxctl started this model (one banner line per start)."""
    count = 0
    for log in (env.state / "logs").glob("*.log"):
        count += sum(
            line.startswith(f"=== mlxctl start {model_id} ")
            for line in log.read_text().splitlines()
        )
    return count


def fleet(env: Env, cli: Cli) -> dict[str, int]:
    t, x = env.team, env.exp
    initial = {
        "mlx-a": t[5],
        "mlx-b": t[0],
        "mlx-c": t[2],
        "mlx-d": x[0],
        "mlx-e": t[7],
        "mlx-f": x[1],
    }
    for model_id, size in SIZES.items():
        env.add_model(
            model_id,
            None,
            optillm=model_id in OPTILLM,
            knobs={"size": size, "start_delay": 0.1},
        )
    for model_id, port in initial.items():
        code, _, err = cli("load", model_id, str(port), "--no-sync")
        assert code == 0, err
    return initial


def test_plan_swap_and_minimal_restarts(env: Env, cli: Cli) -> None:
    t = env.team
    fleet(env, cli)
    expected = {
        "mlx-a": t[0],
        "mlx-f": t[1],
        "mlx-c": t[2],
        "mlx-b": t[5],
        "mlx-d": t[6],
        "mlx-e": t[7],
    }
    code, out, err = cli("assign-team", "--dry-run")
    assert code == 0, err
    assert {line.split()[1]: int(line.split()[0]) for line in out.splitlines()} == expected
    assert all(starts(env, m) == 1 for m in SIZES), "dry-run started nothing"

    code, out, err = cli("--json", "assign-team")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["changed"]
    assert result["plan"] == expected
    ports = {k: v["port"] for k, v in env.registry()["models"].items()}
    assert ports == expected
    # only the moved models were restarted; C and E stayed put
    assert {m: starts(env, m) for m in SIZES} == {
        "mlx-a": 2,
        "mlx-b": 2,
        "mlx-c": 1,
        "mlx-d": 2,
        "mlx-e": 1,
        "mlx-f": 2,
    }
    assert not any("withheld" in e or "reservation" in e for e in env.registry()["models"].values())
    # the gateway agrees with the registry
    rows = read_jsonl(env.handles)
    assert {r["handle"]: int(r["endpoint_ref"].rsplit("_", 1)[1]) for r in rows} == expected
    # every model serves on its planned port
    code, out, _ = cli("--json", "status")
    states = {
        p["model_id"]: (p["port"], p["state"]) for p in status_rows(out).values() if p["model_id"]
    }
    assert states == {m: (p, "serving") for m, p in expected.items()}
    # start.sh reminder with the new load lines
    assert f"mlxctl load mlx-a {t[0]} --no-sync" in err
    # a second run moves nothing
    code, out, err = cli("assign-team")
    assert code == 0
    assert all(line.endswith("stays") for line in out.splitlines())
    assert starts(env, "mlx-a") == 2


def test_too_many_models_moves_nothing(env: Env, cli: Cli) -> None:
    env.set(MLX_TEAM_PORTS=f"{env.team[0]}-{env.team[1]}")
    for i, port in enumerate(env.exp[:3]):
        env.add_model(f"mlx-m{i}", port)
    before = env.registry_path.read_bytes()
    code, _, err = cli("assign-team")
    assert code == 1
    assert "3 models but only 2 team ports" in err
    assert env.registry_path.read_bytes() == before


def test_failure_stops_the_plan_and_leaves_a_consistent_registry(env: Env, cli: Cli) -> None:
    t, x = env.team, env.exp
    env.add_model("mlx-good", None, knobs={"size": 2000, "start_delay": 0.1})
    env.add_model("mlx-zbad", None, knobs={"size": 1000, "start_delay": 0.1})
    assert cli("load", "mlx-good", str(x[0]), "--no-sync")[0] == 0
    assert cli("load", "mlx-zbad", str(x[1]), "--no-sync")[0] == 0
    # from now on mlx-zbad cannot start again (moves run in id order: mlx-good first)
    write_knobs(Path(env.registry()["models"]["mlx-zbad"]["cache_path"]), exit_before_bind=0)
    code, _, err = cli("--json", "assign-team")
    assert code == 1
    assert "assign-team stopped" in err
    models = env.registry()["models"]
    assert models["mlx-good"]["port"] == t[5]
    assert models["mlx-zbad"]["port"] is None  # unloaded from x[1], failed to start on t[6]
    assert not any("withheld" in e or "reservation" in e for e in models.values())
    code, out, _ = cli("--json", "status")
    live = {port: p["state"] for port, p in status_rows(out).items() if p["state"] != "free"}
    assert live == {t[5]: "serving"}


def test_a_dead_lane_is_moved_without_a_drain(env: Env, cli: Cli) -> None:
    """SPEC §15: dead lanes are stopped without a drain. A dead lane cannot say it is idle; with a
    long drain timeout assign-team would wait it out (the random walk found it waiting 120 s)."""
    t, x = env.team, env.exp
    env.set(MLX_DRAIN_TIMEOUT="600")
    env.add_model("mlx-big", None, knobs={"size": 2000, "start_delay": 0.1})
    env.add_model("mlx-small", None, knobs={"size": 1000, "start_delay": 0.1})
    assert cli("load", "mlx-big", str(x[0]), "--no-sync")[0] == 0
    assert cli("load", "mlx-small", str(x[1]), "--no-sync")[0] == 0
    pgid = int(read_record(env, x[0])["pgid"])
    os.killpg(pgid, signal.SIGKILL)
    wait_until(lambda: status_rows(cli("--json", "status")[1])[x[0]]["state"] == "dead", 10)
    done = env.run("--json", "assign-team", timeout=60)  # a drain of the dead lane: 600 s
    assert done.returncode == 0, done.stderr
    assert "timed out" not in done.stderr
    assert {m: e["port"] for m, e in env.registry()["models"].items()} == {
        "mlx-big": t[5],
        "mlx-small": t[6],
    }
    rows = status_rows(cli("--json", "status")[1])
    assert {p: rows[p]["state"] for p in (t[5], t[6])} == {t[5]: "serving", t[6]: "serving"}
