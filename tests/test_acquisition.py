"""Acquisition (SPEC §9): a local stand-in hub, the real snapshot_download, the real mlx_lm.convert,
the real mlx-openai-server, and base-weight offload by rsync over a real sshd on loopback."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MLX_VENV, Cli, Env, need, registry_entry
from fixtures.fake_hub import FakeHub
from helpers import add_entries, chat, empty_or_absent, model_dir, write_script

CONVERT = f"{MLX_VENV / 'bin' / 'python'} -m mlx_lm.convert --hf-path {{src}} --mlx-path {{dest}}"


@pytest.fixture
def hub(env: Env) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        env.set(HF_ENDPOINT=fake.endpoint, HF_HUB_DISABLE_XET="1")
        yield fake


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need((MLX_VENV / "bin" / "python").exists(), f"mlx venv {MLX_VENV}")
    from fixtures.tiny_model import build

    return build("hf", tmp_path_factory.mktemp("tinyhf") / "tiny-hf", str(MLX_VENV / "bin/python"))


def small_repo() -> dict[str, bytes]:
    config = {
        "model_type": "llama",
        "max_position_embeddings": 1024,
        "quantization": {"bits": 4, "group_size": 64},
    }
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": b"\1" * 4096,
        "tokenizer.json": b"{}",
        "original/consolidated.pth": b"\2" * 100,
        "model.gguf": b"\3" * 10,
    }


@pytest.mark.real
def test_load_preconverted_repo_on_an_empty_cache(
    real_server: Env, hub: FakeHub, tiny_mlx_model: Path
) -> None:
    env = real_server
    hub.add_repo("mlx-community/Tiny-Llama-4bit", tiny_mlx_model)
    result = env.run("--json", "load", "mlx-community/Tiny-Llama-4bit", "auto")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] and reply["model_id"] == "mlx-tiny-llama-4bit"
    assert reply["offload"] == "skipped"
    entry = env.registry()["models"]["mlx-tiny-llama-4bit"]
    assert entry["repo_id"] == "mlx-community/Tiny-Llama-4bit"
    assert entry["format"] == "mlx" and entry["port"] == env.exp[0]
    assert "/models--mlx-community--Tiny-Llama-4bit/snapshots/" in entry["cache_path"]
    assert entry["source_path"] == entry["cache_path"]
    assert "og_path" not in entry
    assert chat(env.exp[0], "mlx-tiny-llama-4bit")["choices"]


@pytest.mark.real
def test_load_converts_and_offloads_over_ssh(
    real_server: Env, hub: FakeHub, tiny_hf_model: Path
) -> None:
    from fixtures.sshd import Sshd, available

    need(available(), "openssh-server")
    env = real_server
    hub.add_repo("test-org/tiny", tiny_hf_model)
    drive = env.tmp / "seagate" / "og_models"
    with Sshd(env.tmp / "sshd") as sshd:
        env.set(
            MLX_CONVERT_CMD=CONVERT,
            MLX_OFFLOAD_HOST="mini",
            MLX_OFFLOAD_DIR=str(drive),
            MLXCTL_SSH_OPTIONS=f"-F {sshd.ssh_config}",
        )
        result = env.run("--json", "load", "test-org/tiny", "auto", timeout=300)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["model_id"] == "mlx-tiny" and reply["offload"] == "done"
    entry = env.registry()["models"]["mlx-tiny"]
    converted = env.hub / "mlx-converted" / "mlx-tiny"
    og = env.hub / "models--test-org--tiny"
    assert entry["cache_path"] == entry["source_path"] == str(converted)
    assert entry["format"] == "mlx" and entry["repo_id"] == "test-org/tiny"
    assert entry["og_path"] == str(og)
    assert entry["og_offloaded_to"] == f"mini:{drive / og.name}"
    assert entry["context_length"] == 2048 and entry["max_output_tokens"] == 2048
    assert not og.exists()  # verified, then deleted
    assert (drive / og.name / "blobs").is_dir()
    assert (converted / "config.json").exists()
    assert not list((env.hub / "mlx-converted").glob(".*tmp*"))
    assert chat(entry["port"], "mlx-tiny")["choices"]
    assert "Traceback" not in result.stderr


def test_ensure_preconverted_skips_default_excluded_files(env: Env, cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("mlx-community/small", small_repo())
    code, out, err = cli("ensure", "mlx-community/small")
    assert code == 0, err
    assert out.strip() == "mlx-small"
    snapshot = Path(env.registry()["models"]["mlx-small"]["cache_path"])
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # ensure again: reused as it is, nothing downloaded
    before = sum(hub.requests.values())
    code, out, _ = cli("ensure", "mlx-community/small")
    assert code == 0 and out.strip() == "mlx-small"
    assert sum(hub.requests.values()) == before


def test_interrupted_download_resumes(env: Env, cli: Cli, hub: FakeHub) -> None:
    """A cut connection resumes with a byte range instead of starting over (huggingface_hub
    writes in 10 MB chunks, so the file must be bigger than one chunk)."""
    files = small_repo()
    files["model.safetensors"] = os.urandom(24_000_000)
    hub.add_repo("mlx-community/cut", files)
    hub.cut_once[("mlx-community/cut", "model.safetensors")] = 15_000_000
    code, _, err = cli("ensure", "mlx-community/cut")
    assert code == 0, err
    ranges = [r for name, r in hub.ranges if name == "model.safetensors"]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert hub.bytes_sent["model.safetensors"] < 24_000_000 + 15_000_000
    snapshot = Path(env.registry()["models"]["mlx-cut"]["cache_path"])
    assert (snapshot / "model.safetensors").read_bytes() == files["model.safetensors"]


@pytest.mark.parametrize(
    ("repo", "setup", "message"),
    [
        ("test-org/missing", {}, "no such repo on the hub"),
        ("test-org/gated", {}, "is gated"),
        ("test-org/huge", {}, "not enough disk"),
        ("test-org/offline", {"HF_HUB_OFFLINE": "1"}, "not in the HF cache"),
    ],
)
def test_download_failures_are_one_line(
    env: Env, cli: Cli, hub: FakeHub, repo: str, setup: dict[str, str], message: str
) -> None:
    hub.add_repo("test-org/gated", small_repo(), gated=True)
    hub.add_repo("test-org/huge", small_repo(), fake_size=10**15)
    hub.add_repo("test-org/offline", small_repo())
    env.add_model("mlx-existing", None)
    before = env.registry_path.read_bytes()
    env.set(**setup)
    code, _, err = cli("load", repo, "auto", "--no-sync")
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("mlxctl: error:") and message in lines[0], err
    assert "Traceback" not in err
    assert env.registry_path.read_bytes() == before
    assert not list(env.hub.glob("models--test-org--*/snapshots/*/model.safetensors"))


def test_gated_repo_with_token_works(env: Env, cli: Cli, hub: FakeHub) -> None:
    hub.add_repo("test-org/gated-mlx", small_repo(), gated=True)
    env.set(HF_TOKEN=hub.token)
    code, out, err = cli("ensure", "test-org/gated-mlx")
    assert code == 0, err
    assert out.strip() == "mlx-gated-mlx"
    assert env.registry()["models"]["mlx-gated-mlx"]["format"] == "mlx"  # quantized config
    code, out, _ = cli("config")
    assert hub.token not in out


def test_failed_conversion_leaves_nothing(env: Env, cli: Cli, hub: FakeHub) -> None:
    files = small_repo()
    files["config.json"] = json.dumps({"model_type": "llama"}).encode()
    hub.add_repo("test-org/plain", files)
    script = write_script(
        env.tmp / "bad-convert", 'mkdir -p "$2" && echo partial > "$2/weights" && exit 3'
    )
    env.set(MLX_CONVERT_CMD=f"{script} {{src}} {{dest}}")
    before = env.registry_path.read_bytes() if env.registry_path.exists() else None
    code, _, err = cli("ensure", "test-org/plain")
    assert code == 1
    assert "conversion of test-org/plain failed (exit 3)" in err
    assert empty_or_absent(env.hub / "mlx-converted")
    after = env.registry_path.read_bytes() if env.registry_path.exists() else None
    assert after == before


def test_convert_argv_is_split_before_substitution() -> None:
    import mlxctl

    argv = mlxctl.convert_argv(
        "conv --in {src} --out={dest} --repo {repo}", "o/r", "/a b/src", "/c d/dest"
    )
    assert argv == ["conv", "--in", "/a b/src", "--out=/c d/dest", "--repo", "o/r"]


def registered_converted(env: Env, og: Path, model_id: str = "mlx-conv") -> None:
    (og / "blobs").mkdir(parents=True)
    (og / "blobs" / "abc").write_bytes(b"w" * 1000)
    snap = og / "snapshots" / "1234"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/abc")
    converted = model_dir(env.hub / "mlx-converted", model_id, config={})
    add_entries(env, registry_entry(model_id, converted, None, repo_id="o/conv", og_path=str(og)))


def test_offload_local_drive_and_dry_run(env: Env, cli: Cli) -> None:
    og = env.hub / "models--o--conv"
    registered_converted(env, og)
    drive = env.tmp / "drive"
    env.set(MLX_OFFLOAD_DIR=str(drive))
    code, out, _ = cli("offload-og", "--dry-run")
    assert code == 0 and "would offload mlx-conv" in out and og.exists()
    code, out, err = cli("offload-og", "--verify", "checksum")
    assert code == 0, err
    assert not og.exists()
    assert (drive / og.name / "blobs" / "abc").read_bytes() == b"w" * 1000
    assert env.registry()["models"]["mlx-conv"]["og_offloaded_to"] == f"local:{drive / og.name}"
    code, _, err = cli("offload-og")
    assert code == 0 and "nothing to offload" in err


def test_offload_never_moves_what_serves_inference(env: Env, cli: Cli) -> None:
    og = env.hub / "models--o--conv"
    registered_converted(env, og)
    snapshot = og / "snapshots" / "1234"  # an hf-format model served from the base weights
    add_entries(env, registry_entry("mlx-other", snapshot, None, repo_id="o/other", format="hf"))
    env.set(MLX_OFFLOAD_DIR=str(env.tmp / "drive"))
    code, _, err = cli("offload-og")
    assert code == 0
    assert "serves inference" in err
    assert og.exists() and not (env.tmp / "drive").exists()


def fake_rsync(env: Env, body: str) -> None:
    """An rsync first on PATH that runs the real one, then misbehaves as `body` says."""
    bindir = env.tmp / "bin"
    bindir.mkdir(exist_ok=True)
    write_script(bindir / "rsync", body)
    env.set(PATH=f"{bindir}:{os.environ['PATH']}")


def test_offload_verification_failure_deletes_nothing(env: Env, cli: Cli) -> None:
    og = env.hub / "models--o--conv"
    registered_converted(env, og)
    env.set(MLX_OFFLOAD_DIR=str(env.tmp / "drive"))
    # the real copy happens, then a source file changes: sizes no longer match
    fake_rsync(env, '/usr/bin/rsync "$@" && printf more >> "$4/blobs/abc"')
    code, _, err = cli("offload-og")
    assert code == 1
    assert "verification" in err and "nothing was deleted" in err
    assert og.exists() and "og_offloaded_to" not in env.registry()["models"]["mlx-conv"]


def test_interrupted_offload_resumes(env: Env, cli: Cli) -> None:
    og = env.hub / "models--o--conv"
    registered_converted(env, og)
    env.set(MLX_OFFLOAD_DIR=str(env.tmp / "drive"))
    marker = env.tmp / "interrupted-once"
    fake_rsync(env, f'if [ ! -e {marker} ]; then touch {marker}; exit 30; fi\n/usr/bin/rsync "$@"')
    code, _, err = cli("offload-og")
    assert code == 1 and "rerun to resume" in err and og.exists()
    code, _, err = cli("offload-og")
    assert code == 0, err
    assert not og.exists()


def test_hub_env_reaches_the_library(env: Env, hub: FakeHub) -> None:
    """Settings from the config file reach huggingface_hub (it reads them once at import)."""
    config = env.tmp / "config.env"
    config.write_text(f"HF_ENDPOINT={hub.endpoint}\nHF_TOKEN={hub.token}\n")
    hub.add_repo("test-org/viafile-mlx", small_repo(), gated=True)
    environ = env.environ()
    environ.pop("HF_ENDPOINT")
    environ["MLXCTL_CONFIG"] = str(config)
    result = env.run("ensure", "test-org/viafile-mlx", env=environ)
    assert result.returncode == 0, result.stderr
    # the repo is gated: only the token from the file lets it through, from the file's endpoint
    assert result.stdout.strip() == "mlx-viafile-mlx"
    snapshot = Path(env.registry()["models"]["mlx-viafile-mlx"]["cache_path"])
    assert (snapshot / "model.safetensors").read_bytes() == small_repo()["model.safetensors"]
    assert hub.total_requests("test-org/viafile-mlx") > 0
