"""Shared fixtures. Every test points all state at a temp dir; nothing touches ~ or the network
beyond 127.0.0.1. Real components come from the venvs `make venvs` builds; when one is missing a
test skips locally (make test-fast) and fails under make test and in CI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

from fixtures.ports import port_block  # noqa: E402

import mlxctl  # noqa: E402

MLXCTL = ROOT / "mlxctl"
MLX_VENV = Path(os.environ.get("MLXCTL_TEST_MLX_VENV", ROOT / ".venv-mlx"))
MLX18_VENV = Path(os.environ.get("MLXCTL_TEST_MLX18_VENV", ROOT / ".venv-mlx18"))
# The real model servers, by version (COMPONENTS.md): 1.6.3, the newest that installs on Linux with
# its own dependencies, and 1.8.1, the newest release (what a Studio runs today), installed without
# mflux. `real_server` runs each test once per version; MLXCTL_TEST_MLX_VERSIONS="1.6.3" (comma
# separated) narrows that.
MLX_SERVERS = {"1.6.3": MLX_VENV, "1.8.1": MLX18_VENV}
MLX_VERSIONS = [
    v.strip()
    for v in os.environ.get("MLXCTL_TEST_MLX_VERSIONS", ",".join(MLX_SERVERS)).split(",")
    if v.strip()
]
LITELLM_VENV = Path(os.environ.get("MLXCTL_TEST_LITELLM_VENV", ROOT / ".venv-litellm"))
STANDIN = TESTS / "fixtures" / "standin_server.py"
# `make test` (which installs every component first) and CI never skip a real-component test.
IN_CI = any(
    os.environ.get(name, "").lower() in ("1", "true", "yes")
    for name in ("CI", "MLXCTL_TESTS_STRICT")
)


def need(condition: bool, what: str) -> None:
    """Skip a real-component test when the component is missing; under `make test` and in CI
    that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing in CI", pytrace=False)
    pytest.skip(f"{what} is missing")


def registry_entry(
    model_id: str, path: Path, port: int | None = None, **fields: Any
) -> dict[str, Any]:
    """A registry entry of SPEC §5.1 for a model at `path`."""
    return {
        "repo_id": f"test-org/{model_id}",
        "model_id": model_id,
        "cache_path": str(path),
        "source_path": str(path),
        "format": "mlx",
        "port": port,
        **fields,
    }


class Env:
    """A temp-dir world for one test: settings as environment variables, helpers to seed state."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.mp = monkeypatch
        # the real server's version when `real_server` set MLX_LAUNCH_CMD, else None (the stand-in)
        self.mlx_version: str | None = None
        self.home = tmp / "home"
        self.hub = tmp / "hf" / "hub"
        self.gateway = tmp / "gateway"
        for d in (self.home, self.hub, self.gateway):
            d.mkdir(parents=True, exist_ok=True)
        base = port_block(20)
        self.team = list(range(base, base + 10))
        self.exp = list(range(base + 10, base + 20))
        self.vars: dict[str, str] = {
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "HF_HOME": str(tmp / "hf"),
            "MLX_BIND_HOST": "127.0.0.1",
            "MLX_HOST": "127.0.0.1",
            "GATEWAY_HOST": "local",
            "MLX_OFFLOAD_HOST": "local",
            "MLXCTL_ROLE": "studio",
            "GATEWAY_ROOT": str(self.gateway),
            "MLX_TEAM_PORTS": f"{self.team[0]}-{self.team[-1]}",
            "MLX_EXPERIMENTAL_PORTS": f"{self.exp[0]}-{self.exp[-1]}",
            "MLX_START_TIMEOUT": "60",
            "MLX_STOP_TIMEOUT": "3",
            "MLX_PROBE_TIMEOUT": "0.5",
            # no route unless a test asks for one on a port of its own (8099 is shared)
            "MLX_ROUTE_PORT": "off",
            "MLX_LAUNCH_CMD": f"{sys.executable} {STANDIN} launch",
            "HF_HUB_DISABLE_XET": "1",
            # never the public hub: a dead loopback port unless a test starts a stand-in hub
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for name in (*mlxctl.SETTING_NAMES, "MLXCTL_CONFIG", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(name, raising=False)
        for key, value in self.vars.items():
            monkeypatch.setenv(key, value)

    def set(self, **values: str | None) -> None:
        for key, value in values.items():
            if value is None:
                self.vars.pop(key, None)
                self.mp.delenv(key, raising=False)
            else:
                self.vars[key] = value
                self.mp.setenv(key, value)

    @property
    def registry_path(self) -> Path:
        return self.hub / "registry.json"

    @property
    def state(self) -> Path:
        return self.hub / ".mlxctl"

    @property
    def router(self) -> Path:
        return self.gateway / "layer-gateway/litellm-orch/config/router.yaml"

    @property
    def env_file(self) -> Path:
        return self.gateway / "layer-gateway/litellm-orch/config/env.local"

    @property
    def handles(self) -> Path:
        return self.gateway / "layer-gateway/registry/handles.jsonl"

    def registry(self) -> dict[str, Any]:
        return json.loads(self.registry_path.read_text())

    def write_registry(self, models: dict[str, dict[str, Any]], **top: Any) -> None:
        data = {"version": 1, "generation": 1, "models": models, **top}
        self.registry_path.write_text(json.dumps(data, indent=2))

    def model_dir(self, name: str, size: int = 1024, **knobs: Any) -> Path:
        from fixtures.standin_server import write_standin_model

        return write_standin_model(self.tmp / "models" / name, size=size, **knobs)

    def add_model(self, model_id: str, port: int | None = None, **fields: Any) -> Path:
        """Register a stand-in model (an existing registry is extended)."""
        knobs = fields.pop("knobs", {})
        path = self.model_dir(model_id, **knobs)
        data = self.registry() if self.registry_path.exists() else {"version": 1, "models": {}}
        entry = registry_entry(model_id, path, port, **fields)
        data["models"][model_id] = entry
        self.registry_path.write_text(json.dumps(data, indent=2))
        return path

    def environ(self) -> dict[str, str]:
        return dict(os.environ)

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The real file, by subprocess."""
        return subprocess.run(
            [sys.executable, str(MLXCTL), *args],
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.environ(),
            stdin=None if input is not None else subprocess.DEVNULL,
        )


class Cli:
    """mlxctl.main() in-process, output captured."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = mlxctl.main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    world = Env(tmp_path, monkeypatch)
    yield world
    stop_everything(world)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def stop_everything(world: Env) -> None:
    """No test leaves a server behind: kill every group a runtime record names."""
    run_dir = world.state / "run"
    if not run_dir.is_dir():
        return
    for record_file in run_dir.glob("*.json"):
        with contextlib.suppress(Exception):
            record = json.loads(record_file.read_text())
            if mlxctl.record_is_ours(record):
                mlxctl.stop_groups([int(record["pgid"])], 2.0)


def mlx_server(version: str = "1.6.3") -> Path:
    """The `mlx-openai-server` program of that version's venv (it may not exist)."""
    if version not in MLX_SERVERS:
        raise ValueError(f"no venv for mlx-openai-server {version}: one of {sorted(MLX_SERVERS)}")
    return MLX_SERVERS[version] / "bin" / "mlx-openai-server"


def mlx_server_available(version: str = "1.6.3") -> bool:
    return mlx_server(version).exists()


@pytest.fixture(scope="session")
def tiny_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama generated offline and converted by the real mlx_lm.convert (once a session).

    Converted with the 1.6.3 venv's mlx_lm; both server versions load it (measured)."""
    need(mlx_server_available("1.6.3"), f"mlx-openai-server in {MLX_VENV}")
    from fixtures.tiny_model import build

    dest = tmp_path_factory.mktemp("tiny") / "tiny-mlx"
    return build("mlx", dest, str(MLX_VENV / "bin" / "python"))


@pytest.fixture(params=MLX_VERSIONS, ids=lambda version: f"mlx-{version}")
def mlx_version(request: pytest.FixtureRequest) -> str:
    """The mlx-openai-server version a `real_server` test runs against. A test for one version
    only: `@pytest.mark.parametrize("mlx_version", ["1.8.1"])`."""
    version: str = request.param
    return version


@pytest.fixture
def real_server(env: Env, mlx_version: str) -> Env:
    """Point mlxctl at the real mlx-openai-server of `mlx_version` (`env.mlx_version`)."""
    server = mlx_server(mlx_version)
    need(server.exists(), f"mlx-openai-server {mlx_version} in {server.parent.parent}")
    env.mlx_version = mlx_version
    env.set(
        MLX_LAUNCH_CMD=f"{server} launch",
        MLX_START_TIMEOUT="120",
        MLX_STOP_TIMEOUT="10",
    )
    return env
