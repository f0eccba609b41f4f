"""A real LiteLLM proxy reads the router.yaml and env.local mlxctl wrote, next to hand-written
entries, and reaches the real mlx-openai-server by handle and by alias (SPEC §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LITELLM_VENV, Env, need, registry_entry
from fixtures.litellm_proxy import litellm
from helpers import outside_block, seed_registry

pytestmark = pytest.mark.real

HAND_WRITTEN = """\
# LiteLLM on the Mini: hand-written parts stay exactly as they are
model_list:
  - model_name: main        # the team's default alias
    litellm_params:
      model: os.environ/MLX_MLX_TINY_MODEL
      api_base: os.environ/MLX_MLX_TINY_API_BASE
      api_key: os.environ/MLX_MLX_TINY_API_KEY
      max_tokens: 4
  # a provider mlxctl knows nothing about
  - model_name: other-provider
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:9/v1
      api_key: dummy

router_settings:
  num_retries: 0
litellm_settings:
  drop_params: true
"""


def test_litellm_routes_handles_and_aliases(real_server: Env, tiny_mlx_model: Path) -> None:
    need((LITELLM_VENV / "bin" / "litellm").exists(), f"LiteLLM in {LITELLM_VENV}")
    env = real_server
    seed_registry(env, registry_entry("mlx-tiny", tiny_mlx_model, None, repo_id="t/tiny"))
    env.router.parent.mkdir(parents=True)
    env.router.write_text(HAND_WRITTEN)
    env.env_file.write_text("LITELLM_LOG=ERROR\n")
    env.env_file.chmod(0o600)
    log = env.tmp / "litellm.log"

    # OptiLLM routing on (the default): no OptiLLM runs here, but LiteLLM must load the config
    first, second = env.team[0], env.team[1]
    result = env.run("load", "mlx-tiny", str(first), timeout=180)
    assert result.returncode == 0, result.stderr
    assert "router-mlx-tiny" in env.router.read_text()
    with litellm(LITELLM_VENV, env.router, env.env_file, log) as proxy:
        names = {m["id"] for m in proxy.get("/v1/models")["data"]}
        assert {"mlx-tiny", "router-mlx-tiny", "main", "other-provider"} <= names

    # routing off: straight to the server, by handle and by the alias
    result = env.run("sync-gateway", "--no-route-via-optillm")
    assert result.returncode == 0, result.stderr
    assert outside_block(env.router.read_text()) == HAND_WRITTEN
    assert env.env_file.stat().st_mode & 0o777 == 0o600
    assert env.env_file.read_text().startswith("LITELLM_LOG=ERROR\n")
    with litellm(LITELLM_VENV, env.router, env.env_file, log) as proxy:
        for model in ("mlx-tiny", "main"):
            reply = proxy.chat(model)
            assert reply["choices"][0]["message"]["role"] == "assistant"

    # move the model: the same handle and alias reach the new port after a restart
    assert env.run("unload", str(first)).returncode == 0
    sync = json.loads(env.run("--json", "sync-gateway").stdout)
    assert sync["sync"]["dangling_refs"] == ["main"]  # main still names the unloaded model
    assert "MLX_MLX_TINY_API_BASE=http://127.0.0.1:9/v1" in env.env_file.read_text()
    with litellm(LITELLM_VENV, env.router, env.env_file, log) as proxy:
        assert "main" in {m["id"] for m in proxy.get("/v1/models")["data"]}  # still starts
    result = env.run("load", "mlx-tiny", str(second), timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"MLX_MLX_TINY_API_BASE=http://127.0.0.1:{second}/v1" in env.env_file.read_text()
    assert outside_block(env.router.read_text()) == HAND_WRITTEN
    with litellm(LITELLM_VENV, env.router, env.env_file, log) as proxy:
        for model in ("mlx-tiny", "main"):
            assert proxy.chat(model)["choices"]
