"""The stand-in hub (fixtures/fake_hub.py) against the real huggingface_hub, run in a subprocess
(the library reads HF_* variables once, at import). Also records which exception each failure
raises, since mlxctl turns them into one-line errors (SPEC §9.1)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from fixtures.fake_hub import FakeHub, git_blob_id

pytestmark = pytest.mark.fixture_selftest

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in 10 MiB chunks

# Runs before each snippet: `attempt(fn)` reports a value or the exception's class, module, MRO.
PRELUDE = """
import json, sys
import huggingface_hub as hf

def attempt(fn):
    try:
        return {"ok": fn()}
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "module": type(exc).__module__,
            "mro": [cls.__name__ for cls in type(exc).__mro__],
            "message": str(exc),
        }
"""


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    need(importlib.util.find_spec("huggingface_hub") is not None, "huggingface_hub")
    with FakeHub() as fake:
        yield fake


def small_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}).encode(),
        "model.safetensors": os.urandom(200_000),
    }


def library(hub: FakeHub, home: Path, code: str, **env: str) -> Any:
    """Run `code` (which sets `result`) with the real library against `hub`; `result` as JSON."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environ.update(
        HOME=str(home),
        HF_HOME=str(home / "hf"),
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        **env,
    )
    script = PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def repo_dir(home: Path, repo_id: str) -> Path:
    return home / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))


def test_snapshot_lands_in_the_cache(hub: FakeHub, tmp_path: Path) -> None:
    files = small_files()
    source = tmp_path / "src"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    repo = hub.add_repo("test-org/small", source)
    assert repo.sha == hub.add_repo("test-org/same", dict(files)).sha  # content decides the sha
    result = library(hub, tmp_path, "result = hf.snapshot_download('test-org/small')")

    cached = repo_dir(tmp_path, "test-org/small")
    assert result == str(cached / "snapshots" / repo.sha)
    assert (cached / "refs" / "main").read_text() == repo.sha
    for name, data in files.items():
        assert (cached / "snapshots" / repo.sha / name).read_bytes() == data
    # blob names as on the real hub: sha256 for LFS files, the git blob id for the others
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (cached / "blobs" / sha256).is_file()
    assert (cached / "blobs" / git_blob_id(files["config.json"])).is_file()
    assert repo.etag("model.safetensors") == sha256

    base = f"/test-org/small/resolve/{repo.sha}/"
    assert all(hub.requests[base + name] == 2 for name in files)  # one HEAD, one GET each
    assert hub.requests["/api/models/test-org/small/revision/main"] == 1
    assert hub.requests[f"/api/models/test-org/small/tree/{repo.sha}"] == 1
    assert hub.bytes_served[("test-org/small", "model.safetensors")] == 200_000
    assert hub.unknown == []


def test_file_sizes_for_the_disk_check(hub: FakeHub, tmp_path: Path) -> None:
    """model_info(files_metadata=True), list_repo_tree and get_paths_info all report sizes."""
    files = small_files()
    hub.add_repo("test-org/small", files)
    hub.add_repo("test-org/huge", files, fake_size=10**15)
    result = library(
        hub,
        tmp_path,
        """
        api = hf.HfApi()
        def sizes(repo):
            info = api.model_info(repo, revision="main", files_metadata=True)
            return {
                s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None, s.blob_id]
                for s in info.siblings
            }
        result = {
            "small": sizes("test-org/small"),
            "huge": sizes("test-org/huge"),
            "tree": {f.path: f.size for f in api.list_repo_tree("test-org/small", recursive=True)},
            "paths": {f.path: f.size for f in api.get_paths_info("test-org/small", ["config.json"])},
        }
        """,
    )
    expected = {name: len(data) for name, data in files.items()}
    assert {name: row[0] for name, row in result["small"].items()} == expected
    assert result["tree"] == expected
    assert result["paths"] == {"config.json": expected["config.json"]}
    safetensors = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert result["small"]["model.safetensors"][1] == safetensors
    assert result["small"]["config.json"] == [
        expected["config.json"],
        None,
        git_blob_id(files["config.json"]),
    ]
    assert {row[0] for row in result["huge"].values()} == {10**15}
    assert hub.requests["/api/models/test-org/small/revision/main"] == 1  # ?blobs=true


def test_missing_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("test-org/small", small_files())
    result = library(
        hub,
        tmp_path,
        """
        result = {
            "repo": attempt(lambda: hf.snapshot_download("test-org/missing")),
            "info": attempt(lambda: hf.HfApi().model_info("test-org/missing", files_metadata=True)),
            "revision": attempt(lambda: hf.snapshot_download("test-org/small", revision="v9")),
            "file": attempt(lambda: hf.hf_hub_download("test-org/small", "nope.json")),
        }
        """,
    )
    assert result["repo"]["error"] == result["info"]["error"] == "RepositoryNotFoundError"
    assert result["revision"]["error"] == "RevisionNotFoundError"
    assert result["file"]["error"] == "RemoteEntryNotFoundError"
    assert "EntryNotFoundError" in result["file"]["mro"]
    for outcome in result.values():
        assert outcome["module"] == "huggingface_hub.errors"
        assert outcome["message"].startswith("404 Client Error.")
        assert "OSError" in outcome["mro"]  # every hub error is an OSError (errno None)
    assert not repo_dir(tmp_path, "test-org/missing").exists()


def test_gated_repo_needs_the_token(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.add_repo("test-org/gated", small_files(), gated=True)
    result = library(
        hub,
        tmp_path,
        """
        result = {
            "none": attempt(lambda: hf.snapshot_download("test-org/gated")),
            "wrong": attempt(lambda: hf.snapshot_download("test-org/gated", token="hf_wrong")),
            "info": attempt(lambda: len(hf.HfApi().model_info("test-org/gated").siblings)),
        }
        """,
    )
    for outcome, status in ((result["none"], 401), (result["wrong"], 403)):
        assert outcome["error"] == "GatedRepoError"
        assert outcome["mro"][1] == "RepositoryNotFoundError"  # test for Gated first
        assert outcome["message"].startswith(f"{status} Client Error.\n\nCannot access gated repo")
    assert result["info"] == {"ok": 4}  # metadata is public, as on the real hub
    cached = repo_dir(tmp_path, "test-org/gated")
    assert (cached / "refs" / "main").exists() and not (cached / "snapshots").exists()

    done = library(
        hub, tmp_path, "result = hf.snapshot_download('test-org/gated')", HF_TOKEN=hub.token
    )
    assert done == str(cached / "snapshots" / repo.sha)


def test_cut_connection_resumes_from_the_last_chunk(hub: FakeHub, tmp_path: Path) -> None:
    """The library retries within the same call (after 1 s) with `Range: bytes=N-`, N being the
    last complete 10 MiB chunk; only the remainder is sent again."""
    size, cut = 24_000_000, 15_000_000
    weights = os.urandom(size)
    hub.add_repo("test-org/cut", {"model.safetensors": weights, "config.json": b"{}"})
    hub.cut_once[("test-org/cut", "model.safetensors")] = cut
    path = library(hub, tmp_path, "result = hf.snapshot_download('test-org/cut')")
    assert (Path(path) / "model.safetensors").read_bytes() == weights
    assert [r for name, r in hub.ranges if name == "model.safetensors"] == ["", f"bytes={CHUNK}-"]
    assert hub.bytes_served[("test-org/cut", "model.safetensors")] == cut + size - CHUNK


def test_killed_download_and_the_next_run(hub: FakeHub, tmp_path: Path) -> None:
    """A download killed mid-file leaves `<blob>.<random>.incomplete` behind. huggingface_hub 2.x
    does not reuse it (the next run starts from byte 0); older releases resume with a Range.
    Either way the stand-in serves the next run correctly."""
    weights = os.urandom(3 * CHUNK)
    hub.add_repo("test-org/killed", {"model.safetensors": weights})
    key = ("test-org/killed", "model.safetensors")
    hub.cut_always[key] = CHUNK + 1  # every attempt makes 1 chunk of progress, then is cut
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.endpoint)
    environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    code = "import huggingface_hub as hf; hf.snapshot_download('test-org/killed')"
    blobs = repo_dir(tmp_path, "test-org/killed") / "blobs"
    proc = subprocess.Popen([sys.executable, "-c", code], env=environ, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size >= CHUNK for p in blobs.glob("*.incomplete")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    partial = sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
    del hub.cut_always[key]
    hub.ranges.clear()
    served_before = hub.bytes_served[key]

    path = library(hub, tmp_path, "result = hf.snapshot_download('test-org/killed')")
    assert (Path(path) / "model.safetensors").read_bytes() == weights
    (range_header,) = [r for _, r in hub.ranges]
    start = int(range_header[len("bytes=") :].rstrip("-")) if range_header else 0
    assert start in (0, partial)
    assert hub.bytes_served[key] - served_before == len(weights) - start


def test_offline_uses_the_cache_only(hub: FakeHub, tmp_path: Path) -> None:
    repo = hub.add_repo("test-org/cached", small_files())
    hub.add_repo("test-org/uncached", small_files())
    library(hub, tmp_path, "result = hf.snapshot_download('test-org/cached')")
    before = sum(hub.requests.values())
    result = library(
        hub,
        tmp_path,
        """
        result = {
            "cached": attempt(lambda: hf.snapshot_download("test-org/cached")),
            "uncached": attempt(lambda: hf.snapshot_download("test-org/uncached")),
            "local_only": attempt(
                lambda: hf.snapshot_download("test-org/uncached", local_files_only=True)
            ),
        }
        """,
        HF_HUB_OFFLINE="1",
    )
    assert result["cached"]["ok"].endswith(f"/snapshots/{repo.sha}")
    for outcome, hint in (
        (result["uncached"], "HF_HUB_OFFLINE=0"),
        (result["local_only"], "local_files_only=False"),
    ):
        assert outcome["error"] == "LocalEntryNotFoundError"
        assert outcome["module"] == "huggingface_hub.errors"
        assert outcome["message"].startswith("Cannot find an appropriate cached snapshot folder")
        assert hint in outcome["message"]
    assert sum(hub.requests.values()) == before  # offline: not one request
