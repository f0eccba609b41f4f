"""`make demo`: the main job end to end on loopback, with the real mlx-openai-server.

A tiny llama is generated offline and converted with the real mlx_lm.convert, placed in a fresh HF
cache, registered by `mlxctl init`, loaded on an experimental port, asked a real chat completion,
shown by `mlxctl status`, synced into gateway files, and unloaded. Everything lives in a temp dir
(kept with --keep); nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.ports import port_block  # noqa: E402
from fixtures.tiny_model import build  # noqa: E402

# what a Studio installs today (SPEC §13): the newest release, 1.8.1
MLX_VENV = Path(os.environ.get("MLXCTL_TEST_MLX18_VENV", ROOT / ".venv-mlx18"))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def place_in_cache(model: Path, hub: Path, repo_id: str) -> Path:
    """Lay the model out as huggingface_hub does: blobs, a snapshot of links, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in sorted(model.iterdir()):
        data = item.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    if not (MLX_VENV / "bin" / "mlx-openai-server").exists():
        raise SystemExit(f"the model server is missing: run `make venvs` ({MLX_VENV})")
    work = Path(tempfile.mkdtemp(prefix="mlxctl-demo-"))
    base = port_block(20, 28100)
    env = {
        **os.environ,
        "HOME": str(work / "home"),
        "XDG_CONFIG_HOME": str(work / "home" / ".config"),
        "HF_HOME": str(work / "hf"),
        "MLX_BIND_HOST": "127.0.0.1",
        "MLX_HOST": "127.0.0.1",
        "GATEWAY_HOST": "local",
        "MLX_OFFLOAD_HOST": "local",
        "MLXCTL_ROLE": "studio",
        "GATEWAY_ROOT": str(work / "gateway"),
        "MLX_TEAM_PORTS": f"{base}-{base + 9}",
        "MLX_EXPERIMENTAL_PORTS": f"{base + 10}-{base + 19}",
        "MLX_LAUNCH_CMD": f"{MLX_VENV / 'bin' / 'mlx-openai-server'} launch",
        "MLX_START_TIMEOUT": "180",
        "MLX_ROUTE_PORT": "off",  # the demo runs no watch, so no route
    }
    env.pop("MLXCTL_CONFIG", None)

    def mlxctl(*args: str) -> str:
        print(f"$ mlxctl {' '.join(args)}", flush=True)
        result = subprocess.run(
            [sys.executable, str(ROOT / "mlxctl"), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        print(result.stdout, end="", flush=True)
        if result.returncode != 0:
            raise SystemExit(f"mlxctl {args[0]} exited {result.returncode}")
        return result.stdout

    port = None
    try:
        say("generating a tiny llama and converting it with the real mlx_lm.convert")
        started = time.monotonic()
        model = build("mlx", work / "tiny-mlx", str(MLX_VENV / "bin" / "python"))
        print(f"{model} ({time.monotonic() - started:.1f}s)")
        place_in_cache(model, work / "hf" / "hub", "demo-org/tiny-llama-mlx")

        say("registering what the HF cache holds")
        mlxctl("init")
        mlxctl("list")

        say("loading it on the lowest free experimental port (the real mlx-openai-server 1.8.1)")
        started = time.monotonic()
        model_id, port_text = mlxctl("load", "mlx-tiny-llama-mlx", "auto", "--no-sync").split()
        port = int(port_text)
        print(f"ready in {time.monotonic() - started:.1f}s")

        say("a real chat completion")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": model_id,
                    "max_tokens": 12,
                    "messages": [{"role": "user", "content": "Say hello."}],
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as response:
            reply = json.loads(response.read())
        print("reply:", json.dumps(reply["choices"][0]["message"])[:200])

        say("status and the Prometheus metrics of the lane")
        mlxctl("status")
        print(
            "\n".join(
                line
                for line in mlxctl("metrics").splitlines()
                if "lane_" in line and not line.startswith("#")
            )
        )

        say("syncing the gateway files (GATEWAY_HOST=local)")
        mlxctl("sync-gateway")
        router = work / "gateway/layer-gateway/litellm-orch/config/router.yaml"
        print(router.read_text())

        say("unloading")
        mlxctl("unload", str(port))
        port = None
        mlxctl("status")
        say("done")
        return 0
    finally:
        if port is not None:
            subprocess.run(
                [sys.executable, str(ROOT / "mlxctl"), "unload", str(port), "--no-sync"],
                env=env,
                check=False,
            )
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
