"""The loopback sshd fixture (fixtures/sshd.py) against the real OpenSSH and rsync: what mlxctl's
SSH layer relies on (SPEC §4, §9.3, §11)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from fixtures.sshd import (
    Sshd,
    accepts_connections,
    available,
    read_calls,
    write_remote_wrapper,
    write_ssh_counter,
)

pytestmark = [pytest.mark.real, pytest.mark.fixture_selftest]

TRICKY = [
    "plain",
    "two words",
    "",
    "it's",
    'say "hi"',
    "$(touch {marker})",
    "`touch {marker}`",
    "a; touch {marker}",
    "x && touch {marker} || true",
    "line one\nline two",
    "tab\there",
    "*",
    "~",
    "back\\slash",
    "$HOME",
    "-n",
    "--",
    "ünïcødé",
]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    need(available(), "openssh-server")
    with Sshd(tmp_path / "sshd") as server:
        yield server


def ssh(sshd: Sshd, host: str, *words: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    """One remote command, each word quoted for the remote shell (as mlxctl does)."""
    argv = [*sshd.ssh_argv(host, timeout), *(shlex.quote(w) for w in words)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def test_quoted_words_arrive_exactly(sshd: Sshd, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    words = [w.format(marker=marker) for w in TRICKY]
    result = ssh(sshd, "studio", "printf", "%s\\n", *words)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{w}\n" for w in words)
    assert result.stderr == ""
    assert not marker.exists()  # nothing was run by the remote shell


def test_unquoted_words_do_not(sshd: Sshd) -> None:
    """Why every word goes through shlex.quote: ssh joins argv with spaces for the remote shell."""
    argv = [*sshd.ssh_argv("mini"), "printf", "'%s\\n'", "two words"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.stdout == "two\nwords\n"


def test_exit_codes_and_stderr_pass_through(sshd: Sshd) -> None:
    result = ssh(sshd, "mini", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_only_argv_travels(sshd: Sshd, tmp_path: Path) -> None:
    """Neither the caller's environment nor its variables reach the far side; the wrapper
    exports the far side's own settings (quoted), then runs the program with the same argv."""
    program = tmp_path / "show.py"
    program.write_text(
        "import json, os, sys\n"
        "names = ('MLXCTL_CONFIG', 'HF_HOME', 'CALLER_ONLY', 'LANG_TEST')\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': {n: os.environ.get(n) for n in names}}))\n"
    )
    settings = {"MLXCTL_CONFIG": "/far side/config.env", "HF_HOME": "/tmp/it's $(here)"}
    wrapper = write_remote_wrapper(tmp_path / "remote mlxctl", sys.executable, program, settings)
    with pytest.raises(ValueError, match="not an environment variable name: 'A B'"):
        write_remote_wrapper(tmp_path / "bad", sys.executable, program, {"A B": "x"})
    words = ["--local", "load", "org/model name", "", "$(id)"]
    argv = [*sshd.ssh_argv("studio"), *(shlex.quote(w) for w in [str(wrapper), *words])]
    caller_env = {**os.environ, "CALLER_ONLY": "leak", "LANG_TEST": "leak", "LC_ALL": "C"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=caller_env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == words
    assert seen["env"] == {**settings, "CALLER_ONLY": None, "LANG_TEST": None}


def test_ssh_counter_logs_each_call(sshd: Sshd, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    counted = write_ssh_counter(tmp_path / "counted-ssh", log)
    config = str(sshd.ssh_config)
    for word in ("one", "two words"):
        argv = [str(counted), "-F", config, "-o", "BatchMode=yes", "studio", "--", "echo", word]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stdout) == (0, f"{word}\n")
    assert read_calls(log) == [
        ["-F", config, "-o", "BatchMode=yes", "studio", "--", "echo", "one"],
        ["-F", config, "-o", "BatchMode=yes", "studio", "--", "echo", "two words"],
    ]
    assert read_calls(tmp_path / "never-written") == []


def test_stopped_sshd_is_refused_at_once(sshd: Sshd) -> None:
    port = sshd.port
    sshd.stop()
    assert not sshd.running and not accepts_connections(port)
    start = time.monotonic()
    result = ssh(sshd, "studio", "true", timeout=2)
    elapsed = time.monotonic() - start
    assert result.returncode == 255
    assert f"port {port}: Connection refused" in result.stderr
    assert elapsed < 1.0  # refused, not timed out (measured: about 10 ms)

    sshd.start()
    assert sshd.port == port and accepts_connections(port)
    assert ssh(sshd, "mini", "echo", "back").stdout == "back\n"


def test_rsync_over_the_same_ssh(sshd: Sshd, tmp_path: Path) -> None:
    need(shutil.which("rsync") is not None, "rsync")
    src = tmp_path / "models--org--name"
    (src / "blobs").mkdir(parents=True)
    (src / "blobs" / "weights with space").write_bytes(os.urandom(300_000))
    (src / "snapshots" / "abc").mkdir(parents=True)
    (src / "snapshots" / "abc" / "model.safetensors").symlink_to("../../blobs/weights with space")
    dest = tmp_path / "drive" / "og"
    dest.mkdir(parents=True)
    rsh = shlex.join(["ssh", "-F", str(sshd.ssh_config), "-o", "BatchMode=yes"])
    argv = ["rsync", "-a", "--partial", "-e", rsh, f"{src}/", f"mini:{dest}/{src.name}/"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    copied = dest / src.name
    link = copied / "snapshots" / "abc" / "model.safetensors"
    assert os.readlink(link) == "../../blobs/weights with space"
    assert link.read_bytes() == (src / "blobs" / "weights with space").read_bytes()
