"""Writers racing on one registry: the lock (SPEC §5.1) and the port reservation (SPEC §8 step 4)
keep every update and never hand one port to two loads."""

from __future__ import annotations

import subprocess

from conftest import Env
from helpers import plain_entry, read_record, record_path, run_records, seed_registry, spawn_mlxctl


def finish(
    children: list[subprocess.Popen[str]], timeout: float = 60
) -> list[tuple[int, str, str]]:
    results = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        results.append((child.returncode, out, err))
    return results


def test_parallel_auto_loads_get_different_ports(env: Env) -> None:
    names = [f"mlx-m{i}" for i in range(4)]
    for name in names:
        env.add_model(name)
    results = finish([spawn_mlxctl(env.environ(), "load", m, "auto", "--no-sync") for m in names])
    for code, _, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    ports = {out.split()[0]: int(out.split()[1]) for _, out, _ in results}
    assert set(ports) == set(names)
    assert len(set(ports.values())) == len(names), ports
    assert set(ports.values()) == set(env.exp[: len(names)])
    models = env.registry()["models"]
    assert {m: models[m]["port"] for m in ports} == ports
    assert not any("reservation" in models[m] for m in ports)
    for model_id, port in ports.items():
        assert read_record(env, port)["model_id"] == model_id


def test_parallel_loads_of_one_model_start_it_once(env: Env) -> None:
    env.add_model("mlx-a")
    results = finish(
        [spawn_mlxctl(env.environ(), "load", "mlx-a", "auto", "--no-sync") for _ in range(3)]
    )
    ok = [out.split() for code, out, _ in results if code == 0]
    assert ok, [err for _, _, err in results]
    assert all("Traceback" not in err for _, _, err in results)
    assert len({tuple(words) for words in ok}) == 1
    port = int(ok[0][1])
    assert env.registry()["models"]["mlx-a"]["port"] == port
    log = (env.state / "logs" / f"{port}.log").read_text()
    assert log.count("=== mlxctl start") == 1
    assert run_records(env) == [record_path(env, port)]


def test_parallel_sets_lose_no_update(env: Env) -> None:
    seed_registry(
        env,
        plain_entry(env, "mlx-a", None, request_params={"base": 0}),
        generation=100,
        untouched_top={"x": 1},
    )
    count = 20
    children = [
        spawn_mlxctl(env.environ(), "set", "mlx-a", f"request_params.k{i}={i}", "--no-sync")
        for i in range(count)
    ]
    for code, _, err in finish(children):
        assert code == 0, err
    data = env.registry()
    params = data["models"]["mlx-a"]["request_params"]
    assert params == {"base": 0, **{f"k{i}": i for i in range(count)}}
    assert data["generation"] == 100 + count
    assert data["untouched_top"] == {"x": 1}
    assert not list(env.hub.glob(".registry.json.tmp-*"))
