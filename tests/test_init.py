"""init: the HF cache scan (stdlib and huggingface_hub agree) and registration (SPEC §6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli, Env
from fixtures.hf_cache import make_cache

import mlxctl

ORGS, HINTS = ["mlx-community", "mlx", "ml-explore"], ["mlx"]


def answer(repos: list[mlxctl.CachedRepo]) -> dict[str, tuple[str | None, str | None]]:
    return {
        r.repo_id: (r.format, r.snapshot) if r.skip_reason is None else (None, None) for r in repos
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    hub = tmp_path_factory.mktemp("cache") / "hub"
    return hub, make_cache(hub, 500, seed=1)


def test_stdlib_scan_finds_exactly_the_expected(cache: tuple[Path, dict]) -> None:
    hub, expected = cache
    assert answer(mlxctl.scan_cache_stdlib(str(hub), ORGS, HINTS)) == expected


def test_huggingface_hub_scan_agrees(cache: tuple[Path, dict]) -> None:
    hub, _ = cache
    stdlib = mlxctl.scan_cache_stdlib(str(hub), ORGS, HINTS)
    via_hub = mlxctl.scan_cache_hf(str(hub), ORGS, HINTS)
    assert answer(via_hub) == answer(stdlib)
    assert [r.repo_id for r in via_hub] == [r.repo_id for r in stdlib]


def test_missing_cache_is_empty(tmp_path: Path) -> None:
    assert mlxctl.scan_cache_stdlib(str(tmp_path / "nope"), ORGS, HINTS) == []
    assert mlxctl.scan_cache_hf(str(tmp_path / "nope"), ORGS, HINTS) == []


@pytest.mark.parametrize(
    ("repo_id", "dirname"),
    [
        ("org/name", "models--org--name"),
        ("name", "models--name"),
        ("a-b/c--d", "models--a-b--c--d"),
    ],
)
def test_repo_id_of_dir(repo_id: str, dirname: str) -> None:
    assert mlxctl.repo_id_of_dir(dirname) == repo_id


def test_init_registers_every_usable_repo_once(env: Env, cli: Cli) -> None:
    expected = make_cache(env.hub, 45, seed=2)
    usable = {k: v for k, v in expected.items() if v[0] is not None}
    code, out, err = cli("--json", "init")
    assert code == 0, err
    result = json.loads(out)
    models = env.registry()["models"]
    assert {e["repo_id"]: (e["format"], e["cache_path"]) for e in models.values()} == usable
    assert sorted(result["added"]) == sorted(models)
    for key, entry in models.items():
        assert entry["model_id"] == key and entry["port"] is None
        assert entry["source_path"] == entry["cache_path"]
        assert entry["context_length"] > 0 and entry["max_output_tokens"] > 0
    assert "skipped" in err
    before = env.registry_path.read_bytes()
    code, out, _ = cli("init")
    assert code == 0 and "added" not in out
    assert env.registry_path.read_bytes() == before  # idempotent: not even rewritten


def test_init_never_changes_existing_entries_and_skips_collisions(env: Env, cli: Cli) -> None:
    make_cache(env.hub, 9, seed=3)
    repos = mlxctl.scan_cache_stdlib(str(env.hub), ORGS, HINTS)
    first = next(r for r in repos if r.skip_reason is None)
    taken = mlxctl.model_id_from_repo(first.repo_id)
    env.write_registry(
        {
            "mlx-Old_Name": {
                "repo_id": "legacy/x",
                "model_id": "mlx-Old_Name",
                "cache_path": "/nowhere",
                "format": "mlx",
                "port": None,
                "custom": {"kept": True},
            },
            taken: {
                "repo_id": "someone/else",
                "model_id": taken,
                "cache_path": "/x",
                "format": "hf",
                "port": None,
            },
        }
    )
    code, _, err = cli("init")
    assert code == 0
    models = env.registry()["models"]
    assert models["mlx-Old_Name"]["custom"] == {"kept": True}
    assert models[taken]["repo_id"] == "someone/else"
    assert f"id {taken} is taken by someone/else" in err
    assert "breaks the id rules" in err
