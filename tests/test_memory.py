"""Memory (SPEC §15, issue 13): admission from measured footprints, eviction, idle TTL, drain.

Three layers: the pure budget/need/eviction arithmetic (with a property test over what
`eviction_candidates` would feed `choose_evictions`); the real file against stand-in servers whose
footprints come from `stats.footprint_bytes` or `alloc_mb`; the real mlx-openai-server (both
versions) for the footprint load records and a chat that an unload drains."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import MLXCTL, Env, registry_entry
from helpers import (
    add_entries,
    alive,
    connectable,
    error_line,
    http_json,
    one_json,
    process_group,
    read_record,
    record_path,
    run_records,
    spawn_mlxctl,
    standin_pids,
    status_rows,
    wait_until,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mlxctl

GIB = 1 << 30
MIB = 1 << 20
TESTS = Path(__file__).resolve().parent
FAKEBIN = TESTS / "fixtures" / "fakebin"
PYTHON_FIRST = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
# "needs 3.0GB, 81.2MB in use, budget 2.0GB (set by MLX_MEMORY_LIMIT)": every number with a unit
NUMBERS_RE = re.compile(
    r"needs (\d+(?:\.\d)?[KMGT]?B), (\d+(?:\.\d)?[KMGT]?B) in use, "
    r"budget (\d+(?:\.\d)?[KMGT]?B) \(set by (.+?)\)"
)


# == pure: need, budget, admission arithmetic ======================================================


@pytest.mark.parametrize(
    ("entry", "weights", "need"),
    [
        ({"stats": {"footprint_bytes": 5 * GIB}}, 100 * GIB, 5 * GIB),  # measured wins
        ({"stats": {"footprint_bytes": 1}}, 100 * GIB, 1),
        ({}, 10 * GIB, int(10 * GIB * 1.1) + GIB),  # never measured: weights x 1.1 + 1 GiB
        ({}, 0, GIB),
        ({"stats": {}}, 1000, 1100 + GIB),
        ({"stats": {"footprint_bytes": 0}}, 1000, 1100 + GIB),  # 0 is no measurement
        ({"stats": {"footprint_bytes": "5000"}}, 1000, 1100 + GIB),  # a string is none either
        ({"stats": {"footprint_bytes": True}}, 1000, 1100 + GIB),  # nor a bool
        ({"stats": [5]}, 1000, 1100 + GIB),
        ({"stats": None}, 7, int(7 * 1.1) + GIB),
    ],
)
def test_model_need(entry: dict[str, Any], weights: int, need: int) -> None:
    assert mlxctl.model_need(entry, weights) == need


@given(weights=st.integers(0, 1 << 45), measured=st.none() | st.integers(1, 1 << 45))
def test_model_need_properties(weights: int, measured: int | None) -> None:
    entry = {} if measured is None else {"stats": {"footprint_bytes": measured}}
    need = mlxctl.model_need(entry, weights)
    if measured is not None:
        assert need == measured
    else:
        assert need >= weights + GIB  # never below the weights plus the overhead
        assert abs(need - (weights * 1.1 + GIB)) <= 1


@pytest.mark.parametrize(
    ("limit", "wired", "budget", "source"),
    [
        (100, None, 100, "MLX_MEMORY_LIMIT"),
        (100, (99, "iogpu.wired_limit_mb"), 99, "the GPU wired limit (iogpu.wired_limit_mb)"),
        (100, (100, "iogpu.wired_limit_mb"), 100, "MLX_MEMORY_LIMIT"),  # a tie: the operator's
        (100, (101, "iogpu.wired_limit_mb"), 100, "MLX_MEMORY_LIMIT"),
        (
            192 * GIB,
            (144 * GIB, "75% of hw.memsize (GPU wired limit 0 (system default))"),
            144 * GIB,
            "the GPU wired limit (75% of hw.memsize (GPU wired limit 0 (system default)))",
        ),
    ],
)
def test_choose_budget_the_smaller_limit_sets_it_and_is_named(
    limit: int, wired: tuple[int, str] | None, budget: int, source: str
) -> None:
    assert mlxctl.choose_budget(limit, wired) == mlxctl.Budget(budget, source)


@pytest.mark.parametrize(
    ("raw", "physical", "limit"),
    [
        ("1000", 10**12, 1000),
        (" 2147483648 ", 10**12, 2 * GIB),
        ("90%", 1000, 900),
        ("100%", 1000, 1000),
        ("12.5%", 8 * GIB, GIB),
        ("0.1%", 1000, 1),
    ],
)
def test_memory_limit_bytes_or_percent(raw: str, physical: int, limit: int) -> None:
    assert mlxctl.parse_memory_limit(raw, physical) == limit


@pytest.mark.parametrize("raw", ["0", "-5", "0%", "150%", "-1%", "lots", "", "1e9", "5GB", "%"])
def test_memory_limit_malformed(raw: str) -> None:
    with pytest.raises(mlxctl.MlxctlError, match=r"MLX_MEMORY_LIMIT=.*expected bytes or NN%"):
        mlxctl.parse_memory_limit(raw, 1000)


@pytest.mark.parametrize(
    ("need", "used", "budget", "fits"),
    [(1, 1, 2, True), (1, 1, 1, False), (0, 0, 0, True), (GIB, 0, GIB - 1, False)],
)
def test_memory_check_fits_at_the_boundary(need: int, used: int, budget: int, fits: bool) -> None:
    check = mlxctl.MemoryCheck(need, used, mlxctl.Budget(budget, "MLX_MEMORY_LIMIT"))
    assert check.fits is fits


def test_memory_check_describes_with_units_and_the_source() -> None:
    check = mlxctl.MemoryCheck(3 * GIB, 81 * MIB, mlxctl.Budget(2 * GIB, "MLX_MEMORY_LIMIT"))
    assert check.describe() == "needs 3.0GB, 81.0MB in use, budget 2.0GB (set by MLX_MEMORY_LIMIT)"


# == pure: eviction ================================================================================


def candidate(port: int, footprint: int, last_active: float) -> mlxctl.EvictionCandidate:
    return mlxctl.EvictionCandidate(port, f"mlx-m{port}", footprint, last_active)


def check(need: int, used: int, budget: int) -> mlxctl.MemoryCheck:
    return mlxctl.MemoryCheck(need, used, mlxctl.Budget(budget, "MLX_MEMORY_LIMIT"))


def test_choose_evictions_least_recently_active_first_then_port() -> None:
    a, b, c = candidate(8125, 10, 300.0), candidate(8121, 10, 100.0), candidate(8122, 10, 100.0)
    # b and c were last active at the same moment: the lower port goes first
    assert mlxctl.choose_evictions([a, b, c], check(10, 30, 30)) == [b]
    assert mlxctl.choose_evictions([a, b, c], check(10, 30, 20)) == [b, c]
    assert mlxctl.choose_evictions([a, b, c], check(10, 30, 10)) == [b, c, a]
    assert mlxctl.choose_evictions([a, b, c], check(10, 30, 9)) is None  # all of them: not enough
    assert mlxctl.choose_evictions([a, b, c], check(10, 30, 40)) == []  # it fits already
    assert mlxctl.choose_evictions([], check(10, 30, 39)) is None


TEAM = range(100, 110)
EXP = range(200, 210)
OUT = range(300, 310)  # an assignment left outside narrowed ranges
STATES = ("serving", "starting", "degraded", "unresponsive", "mismatch", "orphan", "dead")

lane_strategy = st.fixed_dictionaries(
    {
        "where": st.sampled_from(("team", "exp")),  # out of range: its own test below
        "state": st.sampled_from(STATES),
        "ours": st.booleans(),
        "pinned": st.sampled_from((True, False, None)),
        # (active, queued) from /v1/queue/stats; None: no answer (busy, never idle)
        "queue": st.none() | st.just((0, 0)) | st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "footprint": st.integers(1, 64 * GIB),
        "last_active": st.none() | st.floats(1.0, 1e9),
        "ready": st.none() | st.floats(1.0, 1e9),
    }
)


# a lane that is a candidate unless one of its fields says otherwise, so most examples have some
likely_candidate = lane_strategy.map(
    lambda lane: {**lane, "where": "exp", "state": "serving", "ours": True, "queue": (0, 0)}
)


class Lanes:
    """A world of lanes as one observation sees them, for `eviction_candidates` in-process: the
    queue answers and footprints it would measure are looked up here."""

    def __init__(self, tmp: Path) -> None:
        self.cfg = mlxctl.resolve_settings(
            {
                "HF_HOME": str(tmp / "hf"),
                "HOME": str(tmp),
                "MLX_TEAM_PORTS": f"{TEAM.start}-{TEAM.stop - 1}",
                "MLX_EXPERIMENTAL_PORTS": f"{EXP.start}-{EXP.stop - 1}",
                "MLX_BIND_HOST": "127.0.0.1",
                "MLX_PROBE_TIMEOUT": "0.5",
            },
            {},
        )
        self.queues: dict[int, mlxctl.QueueStats | None] = {}
        self.footprints: dict[int, int] = {}

    def observe(
        self, lanes: list[dict[str, Any]]
    ) -> tuple[mlxctl.Registry, mlxctl.Observation, dict[str, Any]]:
        self.queues.clear()
        self.footprints.clear()
        models: dict[str, Any] = {}
        views: dict[int, mlxctl.PortView] = {}
        history: dict[str, Any] = {}
        procs = mlxctl.ProcTable()
        counters = {"team": iter(TEAM), "exp": iter(EXP), "out": iter(OUT)}
        for n, lane in enumerate(lanes):
            port = next(counters[lane["where"]])
            model_id = f"mlx-lane-{n}"
            models[model_id] = {"model_id": model_id, "port": port, "cache_path": f"/m/{n}"}
            if lane["pinned"] is not None:
                models[model_id]["pinned"] = lane["pinned"]
            pgid = 10_000 + n
            record: dict[str, Any] = {"pid": pgid, "pgid": pgid, "model_id": model_id}
            if lane["ready"] is not None:
                record["ready_epoch"] = lane["ready"]
            if lane["last_active"] is not None:
                history[mlxctl.lane_key(port, model_id)] = {"last_active": lane["last_active"]}
            queue = lane["queue"]
            self.queues[port] = None if queue is None else mlxctl.QueueStats(*queue, 0)
            self.footprints[pgid] = lane["footprint"]
            views[port] = mlxctl.PortView(
                port,
                lane["state"],
                model_id,
                record,
                lane["ours"],
                mlxctl.Probe(True, True, model_id),
                lane["where"] != "out",
                False,
                procs,
            )
        mlxctl.write_watch_history(self.cfg, history)
        registry = mlxctl.Registry(self.cfg.registry_path, {"version": 1, "models": models}, True)
        return registry, mlxctl.Observation(time.time(), procs, views), history


@pytest.fixture
def lanes_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lanes:
    world = Lanes(tmp_path)
    monkeypatch.setattr(mlxctl, "queue_stats", lambda host, port, timeout: world.queues[port])
    monkeypatch.setattr(mlxctl, "group_footprint", lambda pgid, table: world.footprints[pgid])
    return world


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lanes=st.lists(lane_strategy | likely_candidate, max_size=10),
    need=st.integers(0, 64 * GIB),
    extra=st.integers(0, 64 * GIB),
    budget=st.integers(0, 256 * GIB),
)
def test_eviction_candidates_and_choice_properties(
    lanes_world: Lanes, lanes: list[dict[str, Any]], need: int, extra: int, budget: int
) -> None:
    registry, seen, _history = lanes_world.observe(lanes)
    found = mlxctl.eviction_candidates(lanes_world.cfg, registry, seen)
    event(f"{min(len(found), 3)}+ candidates" if len(found) >= 3 else f"{len(found)} candidates")
    by_port = {c.port: c for c in found}
    assert len(by_port) == len(found)
    for view in seen.views.values():
        lane = lanes[int(str(view.assigned).rsplit("-", 1)[1])]
        queue = lane["queue"]
        # SPEC §15: serving lanes on experimental ports, not pinned, idle now (unknown is busy)
        eligible = (
            view.state == "serving"
            and view.ours
            and view.port in EXP
            and lane["pinned"] is not True
            and queue is not None
            and sum(queue) == 0
        )
        assert (view.port in by_port) == eligible, (view.port, lane)
        if eligible:
            got = by_port[view.port]
            assert got.model_id == view.assigned
            assert got.footprint == lane["footprint"]
            assert got.last_active == (lane["last_active"] or lane["ready"] or 0.0)
    # never a team lane, a pinned one, one outside the experimental range
    pinned = {m for m, e in registry.models.items() if e.get("pinned") is True}
    assert not any(c.port in TEAM or c.port in OUT or c.model_id in pinned for c in found)

    # what load --evict then does with them: `used` counts every lane, candidates included
    used = sum(c.footprint for c in found) + extra
    chosen = mlxctl.choose_evictions(found, check(need, used, budget))
    order = sorted(found, key=lambda c: (c.last_active, c.port))
    if need + used <= budget:
        assert chosen == []
    elif chosen is None:
        assert need + used - sum(c.footprint for c in found) > budget  # all are not enough
    else:
        freed = sum(c.footprint for c in chosen)
        assert need + used - freed <= budget  # it says it fits: it frees at least the deficit
        assert chosen == order[: len(chosen)]  # least recently active first
        assert need + used - (freed - chosen[-1].footprint) > budget  # and not one lane more


def test_an_out_of_range_lane_is_no_eviction_candidate(lanes_world: Lanes) -> None:
    """An assignment left outside narrowed ranges is not on an experimental port (SPEC §15:
    candidates are serving lanes on experimental ports); it may have been a team lane."""
    lane = {
        "where": "out",
        "state": "serving",
        "ours": True,
        "pinned": None,
        "queue": (0, 0),
        "footprint": GIB,
        "last_active": 5.0,
        "ready": None,
    }
    registry, seen, _ = lanes_world.observe([lane, {**lane, "where": "exp"}])
    found = mlxctl.eviction_candidates(lanes_world.cfg, registry, seen)
    assert [c.port for c in found] == [EXP.start]


# == the macOS branch: the GPU wired limit sets the budget ===========================================


@pytest.fixture
def darwin(env: Env) -> Iterator[Env]:
    """The real file on its macOS branch with the fake tools (tests/fixtures/macos/README.md):
    hw.memsize 192 GiB; ps and lsof report this machine."""
    env.set(
        MLXCTL_PLATFORM="darwin",
        MLXCTL_MACOS_TOOLS=str(FAKEBIN),
        FAKE_PS="live",
        FAKE_LSOF="live",
        PATH=PYTHON_FIRST,
    )
    return env


@pytest.mark.parametrize(
    ("wired", "limit", "budget", "source"),
    [
        # sudo sysctl iogpu.wired_limit_mb=147456 (the fixture): 144 GiB < 90 % of 192 GiB
        (
            "sysctl_wired_limit_mb_set.txt",
            None,
            144 * GIB,
            "the GPU wired limit (iogpu.wired_limit_mb)",
        ),
        ("=1024", None, GIB, "the GPU wired limit (iogpu.wired_limit_mb)"),
        # 0: the system default, taken as 75 % of hw.memsize, and said so
        (
            "sysctl_wired_limit_mb.txt",
            None,
            144 * GIB,
            "the GPU wired limit (75% of hw.memsize (GPU wired limit 0 (system default)))",
        ),
        (
            "unknown",
            None,
            144 * GIB,
            "the GPU wired limit (75% of hw.memsize (GPU wired limit not available))",
        ),
        # the operator's limit is smaller: it sets the budget
        ("=1024", str(512 * MIB), 512 * MIB, "MLX_MEMORY_LIMIT"),
        ("sysctl_wired_limit_mb_set.txt", "50%", 96 * GIB, "MLX_MEMORY_LIMIT"),
    ],
)
def test_the_wired_limit_sets_the_budget_on_macos(
    darwin: Env, wired: str, limit: str | None, budget: int, source: str
) -> None:
    env = darwin
    env.set(FAKE_SYSCTL_IOGPU_WIRED_LIMIT_MB=wired, MLX_MEMORY_LIMIT=limit)
    env.add_model("mlx-a")
    code, data = estimate(env, "mlx-a")
    assert (data["budget_bytes"], data["budget_source"]) == (budget, source)
    assert code == (0 if data["need_bytes"] <= budget else 1)
    config = env.run("config")
    assert f"memory budget: {mlxctl.human_bytes(budget)} (set by {source})" in config.stdout


def test_a_refusal_names_the_wired_limit(darwin: Env) -> None:
    env = darwin
    env.set(FAKE_SYSCTL_IOGPU_WIRED_LIMIT_MB="=1024")
    env.add_model("mlx-big", stats={"footprint_bytes": 2 * GIB})
    before = env.registry_path.read_bytes()
    result = env.run("load", "mlx-big", "auto", "--no-sync")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "needs 2.0GB" in line and "budget 1.0GB" in line
    assert "(set by the GPU wired limit (iogpu.wired_limit_mb))" in line
    assert env.registry_path.read_bytes() == before
    assert not run_records(env) and not standin_pids(env)


# == stand-ins: admission ==========================================================================


def estimate(env: Env, model: str) -> tuple[int, dict[str, Any]]:
    """`load --estimate --json`: exit code and the estimate (its first line: that it is the only
    one is test_estimate_json_is_exactly_one_object's business)."""
    result = env.run("--json", "load", model, "auto", "--estimate")
    assert result.returncode in (0, 1), result.stderr
    data = json.loads(result.stdout.splitlines()[0])
    assert isinstance(data, dict)
    return result.returncode, data


def load(env: Env, model: str, port: int | str = "auto", *extra: str) -> int:
    result = env.run("load", model, str(port), "--no-sync", *extra)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[1])


def footprints(env: Env) -> dict[int, int]:
    """Each lane's group RSS as `status --json` measures it (what eviction frees)."""
    result = env.run("status", "--json")
    assert result.returncode == 0, result.stderr
    return {p: r["rss_bytes"] for p, r in status_rows(result.stdout).items() if r["rss_bytes"]}


def world_files(env: Env) -> dict[str, bytes]:
    """The registry, the state dir and the gateway files, byte for byte (logs aside)."""
    files = {}
    for root in (env.hub, env.gateway):
        for path in root.rglob("*"):
            if path.is_file() and "logs" not in path.parts:
                files[str(path)] = path.read_bytes()
    return files


def test_a_refusal_names_need_used_and_budget_and_changes_nothing(env: Env) -> None:
    env.add_model("mlx-small", knobs={"alloc_mb": 32})
    port = load(env, "mlx-small")
    pgid = int(read_record(env, port)["pgid"])
    env.add_model("mlx-big", stats={"footprint_bytes": 3 * GIB})
    env.set(MLX_MEMORY_LIMIT=str(2 * GIB))
    before = world_files(env)
    result = env.run("load", "mlx-big", "auto")
    assert result.returncode == 1
    line = error_line(result.stderr)
    match = NUMBERS_RE.search(line)
    assert match, line
    need, used, budget, source = match.groups()
    assert (need, budget, source) == ("3.0GB", "2.0GB", "MLX_MEMORY_LIMIT")
    assert used.endswith("MB") and float(used[:-2]) >= 32  # the serving lane, measured
    assert "--force" in result.stderr and "--evict" in result.stderr  # the hint names both ways
    # nothing changed: no reservation, no record, no new server, no gateway sync owed
    assert world_files(env) == before
    assert [record_path(env, port)] == run_records(env)
    assert len(standin_pids(env)) == 1 and process_group(pgid)
    # the same numbers from --estimate (a reader); the used bytes agree within a few pages
    code, data = estimate(env, "mlx-big")
    assert code == 1 and data["fits"] is False
    assert (data["need_bytes"], data["budget_bytes"]) == (3 * GIB, 2 * GIB)
    assert mlxctl.human_bytes(data["used_bytes"])[-2:] == "MB"
    assert abs(data["used_bytes"] - footprints(env)[port]) < 4 * MIB


def test_force_loads_anyway(env: Env) -> None:
    env.add_model("mlx-big", stats={"footprint_bytes": 3 * GIB})
    env.set(MLX_MEMORY_LIMIT=str(2 * GIB))
    result = env.run("--json", "load", "mlx-big", "auto", "--no-sync", "--force")
    assert result.returncode == 0, result.stderr
    port = one_json(result.stdout)["port"]
    assert connectable(port) and alive(read_record(env, port)["pid"])


def test_admission_with_byte_limits(env: Env) -> None:
    """need + used <= budget admits, more is refused; a measured footprint is the need."""
    env.add_model("mlx-base", knobs={"alloc_mb": 48})
    load(env, "mlx-base")
    env.add_model("mlx-fits", stats={"footprint_bytes": 512 * MIB})
    env.add_model("mlx-over", stats={"footprint_bytes": 512 * MIB})
    _, data = estimate(env, "mlx-fits")
    used = data["used_bytes"]
    assert used > 48 * MIB
    # room for one 512 MiB model and 16 MiB to spare, not for two
    env.set(MLX_MEMORY_LIMIT=str(used + 512 * MIB + 16 * MIB))
    code, data = estimate(env, "mlx-fits")
    assert code == 0 and data["fits"] is True and data["need_bytes"] == 512 * MIB
    load(env, "mlx-fits")  # the stand-in holds far less than its stats say: used grows a little
    code, data = estimate(env, "mlx-over")
    assert code == 1 and data["fits"] is False
    result = env.run("load", "mlx-over", "auto", "--no-sync")
    assert result.returncode == 1
    assert "memory admission: mlx-over needs 512.0MB" in error_line(result.stderr)
    assert env.registry()["models"]["mlx-over"]["port"] is None


def test_two_loads_at_once_cannot_both_squeeze_in(env: Env) -> None:
    """Admission again under the lock, counting reservations made since (SPEC §15)."""
    for name in ("mlx-one", "mlx-two"):
        env.add_model(name, stats={"footprint_bytes": GIB}, knobs={"start_delay": 2.0})
    env.set(MLX_MEMORY_LIMIT=str(GIB + GIB // 2))  # one fits, not both
    procs = [
        spawn_mlxctl(env.environ(), "load", name, "auto", "--no-sync")
        for name in ("mlx-one", "mlx-two")
    ]
    outcomes = [(p.wait(60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 1], outcomes
    refused = next(err for code, _, err in outcomes if code == 1)
    assert "memory admission" in error_line(refused)
    assert len(standin_pids(env)) == 1


def test_estimate_prints_the_numbers_takes_no_lock_and_starts_nothing(env: Env) -> None:
    path = env.add_model("mlx-new", knobs={})
    (path / "model.safetensors").write_bytes(b"")
    os.truncate(path / "model.safetensors", 10 * MIB)
    weights = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    env.state.mkdir(parents=True)
    lock = os.open(env.state / "registry.lock", os.O_RDWR | os.O_CREAT)
    before = world_files(env)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a writer holds the lock: a reader does not wait for it
    try:
        started = time.monotonic()
        result = env.run("load", "mlx-new", "auto", "--estimate", timeout=20)
        took = time.monotonic() - started
    finally:
        os.close(lock)
    assert result.returncode == 0, result.stderr
    assert took < 10  # LOCK_TIMEOUT is 30 s
    need = int(weights * 1.1) + GIB
    budget = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 90.0 / 100)
    assert result.stdout == (
        f"mlx-new needs {mlxctl.human_bytes(need)}, 0B in use, budget "
        f"{mlxctl.human_bytes(budget)} (set by MLX_MEMORY_LIMIT): fits\n"
    )
    code, data = estimate(env, "mlx-new")
    assert code == 0
    assert data == {
        "version": 1,
        "model_id": "mlx-new",
        "need_bytes": need,
        "used_bytes": 0,
        "budget_bytes": budget,
        "budget_source": "MLX_MEMORY_LIMIT",
        "fits": True,
    }
    env.set(MLX_MEMORY_LIMIT=str(need - 1))
    result = env.run("load", "mlx-new", "auto", "--estimate")
    assert result.returncode == 1
    assert result.stdout.endswith(": does not fit\n") and "error" not in result.stderr
    env.set(MLX_MEMORY_LIMIT=str(need))
    assert env.run("load", "mlx-new", "auto", "--estimate").returncode == 0  # need == budget fits
    assert world_files(env) == before
    assert not run_records(env) and not standin_pids(env)


@pytest.mark.parametrize("limit", [None, "1000"])
def test_estimate_json_is_exactly_one_object(env: Env, limit: str | None) -> None:
    """A reader's --json prints its one object (SPEC §6): not the estimate and then a load
    result as well (which would say "ok": true also when the estimate exits 1)."""
    env.set(MLX_MEMORY_LIMIT=limit)
    env.add_model("mlx-a")
    for argv in (
        ["--json", "load", "mlx-a", "auto", "--estimate"],
        ["load", "mlx-a", "auto", "--estimate", "--json"],
    ):
        result = env.run(*argv)
        assert result.returncode == (0 if limit is None else 1), result.stderr
        data = one_json(result.stdout)
        assert set(data) == {
            "version",
            "model_id",
            "need_bytes",
            "used_bytes",
            "budget_bytes",
            "budget_source",
            "fits",
        }


def test_stats_are_written_at_commit(env: Env) -> None:
    env.add_model("mlx-a", knobs={"alloc_mb": 64, "start_delay": 0.5})
    before = time.time()
    port = load(env, "mlx-a")
    record = read_record(env, port)
    stats = env.registry()["models"]["mlx-a"]["stats"]
    assert set(stats) == {"footprint_bytes", "load_seconds", "measured_at"}
    # the footprint at readiness: the group's RSS then, the 64 MiB the model touched included
    assert stats["footprint_bytes"] == record["footprint_bytes"] >= 64 * MIB
    assert abs(stats["footprint_bytes"] - footprints(env)[port]) < 8 * MIB
    assert 0.5 <= stats["load_seconds"] < 30
    measured = datetime.strptime(stats["measured_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert before - 2 <= measured.replace(tzinfo=timezone.utc).timestamp() <= time.time() + 1
    # from now on the model's need is what it measured, not its weights
    _, data = estimate(env, "mlx-a")
    assert data["need_bytes"] == stats["footprint_bytes"]
    # stats are mlxctl's own: set refuses them
    result = env.run("set", "mlx-a", "stats={}", "--no-sync")
    assert result.returncode == 1
    assert "stats cannot be set" in error_line(result.stderr)


# == stand-ins: eviction ===========================================================================


class Held:
    """One generation request held by a stand-in for `delay` seconds, in a thread."""

    def __init__(self, port: int, delay: float, model: str = "x") -> None:
        self.port = port
        self.result: tuple[int, Any] | None = None
        self.error: BaseException | None = None
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body["standin_delay"] = delay  # type: ignore[assignment]
        self.thread = threading.Thread(target=self._run, args=(body, delay + 30), daemon=True)
        self.thread.start()

    def _run(self, body: dict[str, Any], timeout: float) -> None:
        try:
            self.result = http_json(self.port, "/v1/chat/completions", body, timeout=timeout)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> tuple[int, Any] | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request is still in flight"
        return self.result


def standin_stats(port: int) -> dict[str, Any]:
    status, data = http_json(port, "/standin/stats")
    assert status == 200
    assert isinstance(data, dict)
    return data


def set_last_active(env: Env, lanes: dict[tuple[int, str], float]) -> None:
    path = env.state / "watch.json"
    data = json.loads(path.read_text()) if path.exists() else {"version": 1, "lanes": {}}
    for (port, model_id), when in lanes.items():
        data["lanes"].setdefault(mlxctl.lane_key(port, model_id), {})["last_active"] = when
    path.write_text(json.dumps(data))


def plan_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "evict" in line]


def test_evict_picks_idle_experimental_lanes_lru_never_pinned_team_or_busy(env: Env) -> None:
    e, t = env.exp, env.team
    lanes = {
        "mlx-old": e[0],
        "mlx-older": e[1],
        "mlx-pinned": e[2],
        "mlx-busy": e[3],
        "mlx-team": t[0],
    }
    for name, port in lanes.items():
        pinned = {"pinned": True} if name == "mlx-pinned" else {}
        env.add_model(name, knobs={"alloc_mb": 48}, **pinned)
        load(env, name, port)
    # watch's clocks: the pinned, busy and team lanes are the least recently active of all, and
    # mlx-older (on the higher port) was active before mlx-old
    set_last_active(
        env,
        {
            (e[0], "mlx-old"): 2000.0,
            (e[1], "mlx-older"): 1000.0,
            (e[2], "mlx-pinned"): 10.0,
            (e[3], "mlx-busy"): 10.0,
            (t[0], "mlx-team"): 10.0,
        },
    )
    busy = Held(e[3], 120)
    wait_until(lambda: standin_stats(e[3])["active"] == 1)
    env.add_model("mlx-new", stats={"footprint_bytes": GIB})
    _, data = estimate(env, "mlx-new")
    used = data["used_bytes"]
    fp = footprints(env)
    assert all(fp[p] > 48 * MIB for p in lanes.values())
    old, older = fp[e[0]], fp[e[1]]
    pids = {p: read_record(env, p)["pid"] for p in lanes.values()}
    snapshot = env.registry_path.read_bytes()

    def dry_run(deficit: int) -> Any:
        env.set(MLX_MEMORY_LIMIT=str(used + GIB - deficit))
        return env.run("load", "mlx-new", "auto", "--evict", "--dry-run", "--no-sync")

    # a little short: the least recently active idle lane goes, not the lower port
    result = dry_run(older // 2)
    assert result.returncode == 0, result.stderr
    assert [line.split()[2:5] for line in plan_lines(result.stderr)] == [
        ["mlx-older", "on", str(e[1])]
    ]
    assert plan_lines(result.stderr)[0].startswith("would evict mlx-older")
    assert "would start:" in result.stdout
    # more: the next one too, and still never the pinned, busy or team lane
    result = dry_run(older + old // 2)
    assert result.returncode == 0, result.stderr
    assert [line.split()[2] for line in plan_lines(result.stderr)] == ["mlx-older", "mlx-old"]
    # the dry runs changed nothing
    assert env.registry_path.read_bytes() == snapshot
    assert all(alive(pid) for pid in pids.values())

    # more than all idle experimental lanes hold (the other three would make up for it, were
    # they candidates): refused, nothing evicted
    env.set(MLX_MEMORY_LIMIT=str(used + GIB - (older + old + 24 * MIB)))
    result = env.run("load", "mlx-new", "auto", "--evict", "--no-sync")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "would not be enough; nothing was evicted" in line and "needs 1.0GB" in line
    assert not plan_lines(result.stderr.replace(line, ""))
    assert env.registry_path.read_bytes() == snapshot
    assert all(alive(pid) for pid in pids.values())

    # the real thing: the plan first, then the two lanes go, the new model loads
    env.set(MLX_MEMORY_LIMIT=str(used + GIB - (older + old // 2)))
    result = env.run("--json", "load", "mlx-new", "auto", "--evict", "--no-sync")
    assert result.returncode == 0, result.stderr
    assert [line.split()[:2] for line in result.stderr.splitlines()[:2]] == [
        ["evicting", "mlx-older"],
        ["evicting", "mlx-old"],
    ]
    reply = one_json(result.stdout)
    assert reply["evicted"] == [
        {"model_id": "mlx-older", "port": e[1]},
        {"model_id": "mlx-old", "port": e[0]},
    ]
    models = env.registry()["models"]
    assert models["mlx-older"]["port"] is None and models["mlx-old"]["port"] is None
    assert not alive(pids[e[0]]) and not alive(pids[e[1]])
    for name in ("mlx-pinned", "mlx-busy", "mlx-team"):
        assert models[name]["port"] == lanes[name] and alive(pids[lanes[name]])
    assert models["mlx-new"]["port"] == reply["port"] and connectable(reply["port"])
    assert busy.thread.is_alive()  # the busy lane's request was never touched


def test_evict_with_nothing_to_evict_refuses(env: Env) -> None:
    env.add_model("mlx-team", knobs={"alloc_mb": 32})
    load(env, "mlx-team", env.team[0])
    env.add_model("mlx-new", stats={"footprint_bytes": GIB})
    env.set(MLX_MEMORY_LIMIT=str(GIB))
    result = env.run("load", "mlx-new", "auto", "--evict", "--no-sync")
    assert result.returncode == 1
    assert "nothing was evicted" in error_line(result.stderr)
    assert env.registry()["models"]["mlx-team"]["port"] == env.team[0]


# == stand-ins: idle TTL under watch ================================================================


class Watch:
    """`mlxctl watch` (the real file) in the background, its stderr in a file; SIGTERM at exit."""

    def __init__(self, env: Env, *args: str) -> None:
        self.log = env.tmp / f"watch-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(MLXCTL), "watch", *args],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env.environ(),
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"watch ignored SIGTERM:\n{self.text()}") from None


@contextlib.contextmanager
def watching(env: Env, *args: str) -> Iterator[Watch]:
    watch = Watch(env, *args)
    try:
        yield watch
    finally:
        watch.stop()


def test_watch_unloads_an_idle_experimental_lane_past_its_ttl(env: Env) -> None:
    env.set(MLX_WATCH_INTERVAL="0.3", MLX_DRAIN_TIMEOUT="10")
    e, t = env.exp, env.team
    lanes = {"mlx-idle": e[0], "mlx-busy": e[1], "mlx-pinned": e[2], "mlx-team": t[0]}
    for name, port in lanes.items():
        env.add_model(name)
        load(env, name, port)
    for name in lanes:
        extra = ["pinned=true"] if name == "mlx-pinned" else []
        result = env.run("set", name, "ttl=1", *extra, "--no-sync")
        assert result.returncode == 0, result.stderr
        team_warning = "ttl is ignored on a team port" in result.stderr
        assert team_warning == (name == "mlx-team"), result.stderr
    show = env.run("show", "mlx-idle")
    assert "ttl 1 s (enforced by watch)" in show.stdout
    pids = {p: read_record(env, p)["pid"] for p in lanes.values()}
    busy = Held(e[1], 6)
    wait_until(lambda: standin_stats(e[1])["active"] == 1)
    started = time.monotonic()
    with watching(env) as watch:
        wait_until(lambda: env.registry()["models"]["mlx-idle"]["port"] is None, 15)
        assert time.monotonic() - started >= 1.0  # not before its ttl
        wait_until(lambda: not alive(pids[e[0]]), 10)
        assert f"mlx-idle on {e[0]} idle past its ttl" in watch.text()
        models = env.registry()["models"]
        for name in ("mlx-busy", "mlx-pinned", "mlx-team"):
            assert models[name]["port"] == lanes[name] and alive(pids[lanes[name]]), name
        # the busy lane is kept while its request runs; it completes, then the lane expires
        result = busy.join(20)
        assert result is not None and result[0] == 200, busy.error
        assert env.registry()["models"]["mlx-busy"]["port"] == e[1]
        wait_until(lambda: env.registry()["models"]["mlx-busy"]["port"] is None, 15)
        time.sleep(2)  # more ticks past the ttl: the pinned and the team lane stay
        models = env.registry()["models"]
        assert models["mlx-pinned"]["port"] == e[2] and alive(pids[e[2]])
        assert models["mlx-team"]["port"] == t[0] and alive(pids[t[0]])


# == stand-ins: drain ==============================================================================


def test_unload_waits_for_a_request_in_flight(env: Env) -> None:
    env.add_model("mlx-a")
    port = load(env, "mlx-a")
    held = Held(port, 2.0)
    wait_until(lambda: standin_stats(port)["active"] == 1)
    started = time.monotonic()
    result = env.run("unload", str(port), "--no-sync", "--drain-timeout", "20")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    reply = held.join(5)
    assert reply is not None and reply[0] == 200, held.error
    assert reply[1]["choices"][0]["message"]["content"] == "echo: hi"
    assert 1.0 < took < 15
    assert "cut" not in result.stderr
    assert not connectable(port)


@pytest.mark.parametrize("timeout", ["0.5", "0"])
def test_a_drain_past_its_timeout_cuts_and_says_so(env: Env, timeout: str) -> None:
    env.add_model("mlx-a", knobs={"max_concurrency": 1})
    port = load(env, "mlx-a")
    running = Held(port, 60)
    wait_until(lambda: standin_stats(port)["active"] == 1)
    waiting = Held(port, 60)
    wait_until(lambda: standin_stats(port)["queued"] == 1)
    started = time.monotonic()
    result = env.run("unload", str(port), "--no-sync", "--drain-timeout", timeout)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < float(timeout) + 8
    assert "cut 1 active and 1 queued requests" in result.stderr
    for held in (running, waiting):
        held.join(10)
        assert held.result is None and held.error is not None  # cut, not answered
    assert env.registry()["models"]["mlx-a"]["port"] is None


def test_drain_timeout_setting_and_flag(env: Env) -> None:
    """MLX_DRAIN_TIMEOUT is the default; --drain-timeout overrides it."""
    env.add_model("mlx-a")
    port = load(env, "mlx-a")
    held = Held(port, 30)
    wait_until(lambda: standin_stats(port)["active"] == 1)
    env.set(MLX_DRAIN_TIMEOUT="0.3")
    started = time.monotonic()
    result = env.run("unload", str(port), "--no-sync")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 8
    assert "cut 1 active and 0 queued requests" in result.stderr
    held.join(10)
    for raw in ("-1", "soon"):
        bad = env.run("unload", str(port), "--drain-timeout", raw)
        assert bad.returncode == 2, bad.stderr


# == the real mlx-openai-server ===================================================================


def statm_rss(pgid: int) -> int:
    """The group's resident memory read independently of mlxctl: /proc/<pid>/statm, live members."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in process_group(pgid):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
    return total


@pytest.mark.real
def test_real_server_footprint_and_a_drained_chat(real_server: Env, tiny_mlx_model: Path) -> None:
    env = real_server
    add_entries(env, registry_entry("mlx-tiny", tiny_mlx_model, None))
    port = load(env, "mlx-tiny")
    record = read_record(env, port)
    pgid = int(record["pgid"])
    stats = env.registry()["models"]["mlx-tiny"]["stats"]
    rss = statm_rss(pgid)
    assert rss > 50 * MIB
    assert abs(stats["footprint_bytes"] - rss) <= 0.15 * rss, (stats, rss)
    if env.mlx_version == "1.8.1":  # the model lives in a spawned child; the group holds both
        assert record["model_in_child"] is True and len(process_group(pgid)) >= 2

    # a chat in flight while unload drains: it completes with 200. The tiny model would end
    # early; a bias against its end-of-sequence token (id 1) keeps it generating for seconds
    body = {
        "model": "mlx-tiny",
        "max_tokens": 1500,
        "temperature": 0,
        "logit_bias": {"1": -100},
        "messages": [{"role": "user", "content": "hi"}],
    }
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(http_json(port, "/v1/chat/completions", body, timeout=120)),
        daemon=True,
    )
    thread.start()

    def active() -> bool:
        status, data = http_json(port, "/v1/queue/stats")
        queue = mlxctl.parse_queue_stats(data) if status == 200 else None
        return queue is not None and queue.active > 0

    wait_until(active, 30, 0.05)
    result = env.run("unload", str(port), "--drain-timeout", "120")
    assert result.returncode == 0, result.stderr
    thread.join(10)
    [(status, reply)] = outcome
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 1500
    assert "cut" not in result.stderr
    assert not connectable(port) and not process_group(pgid)
