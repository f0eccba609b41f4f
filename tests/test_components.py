"""The real components are installed and behave as measured (COMPONENTS.md, SPEC §13).

Quick checks only, no model is loaded here: each mlx-openai-server is asked for its version, its
`launch --help` and an option it does not have, the way mlxctl probes a launcher (NO_COLOR=1,
COLUMNS=200, stdin from /dev/null). All the probes of a session run at once: 1.6.3 imports its whole
stack before it parses the command line (about 8-10 s per call, 1.8.1 about 1.2 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MLX_SERVERS, mlx_server, need

VERSIONS = list(MLX_SERVERS)
PROBE_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
# SPEC §13: the version is the first \d+.\d+.\d+ printed by `<launcher without launch> --version`;
# the options are every `--name` that begins an option line of `<launcher> --help`.
VERSION = re.compile(r"\d+\.\d+\.\d+")
OPTION_LINE = re.compile(r"^ {2}(--[A-Za-z0-9][A-Za-z0-9-]*)", re.MULTILINE)
ANY_DASHED_LINE = re.compile(r"^\s*(--[A-Za-z0-9][A-Za-z0-9-]*)", re.MULTILINE)

# `launch --help`, in order (measured on the pinned releases).
COMMON_HEAD = ["--config", "--model-path", "--model-type", "--context-length"]
OPTIONS = {
    "1.6.3": [
        *COMMON_HEAD,
        *["--port", "--host", "--max-concurrency", "--queue-timeout", "--queue-size"],
        *["--quantize", "--config-name", "--lora-paths", "--lora-scales", "--disable-auto-resize"],
        *["--log-file", "--no-log-file", "--log-level", "--enable-auto-tool-choice"],
        *["--tool-call-parser", "--reasoning-parser", "--trust-remote-code"],
        *["--chat-template-file", "--debug", "--prompt-cache-size", "--max-bytes"],
        *["--draft-model-path", "--num-draft-tokens", "--max-tokens", "--temperature", "--top-p"],
        *["--top-k", "--min-p", "--presence-penalty", "--xtc-probability", "--xtc-threshold"],
        *["--seed", "--repetition-context-size", "--help"],
    ],
    "1.8.1": [
        *COMMON_HEAD,
        *["--served-model-name", "--port", "--host", "--queue-timeout", "--queue-size"],
        *["--quantize", "--config-name", "--lora-paths", "--lora-scales", "--disable-auto-resize"],
        *["--log-file", "--no-log-file", "--log-level", "--enable-auto-tool-choice"],
        *["--tool-call-parser", "--reasoning-parser", "--trust-remote-code"],
        *["--chat-template-file", "--debug", "--prompt-cache-size", "--max-bytes"],
        *["--prompt-cache-dir", "--draft-model-path", "--num-draft-tokens", "--kv-bits"],
        *["--kv-group-size", "--quantized-kv-start", "--decode-concurrency"],
        *["--prompt-concurrency", "--prefill-step-size", "--disable-batching", "--max-tokens"],
        *["--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty"],
        *["--presence-penalty", "--xtc-probability", "--xtc-threshold", "--seed"],
        *["--repetition-context-size", "--help"],
    ],
}
# an option the other release has: click rejects it with exit 2 before anything is loaded
FOREIGN_OPTION = {"1.6.3": ["--served-model-name", "x"], "1.8.1": ["--max-concurrency", "4"]}


def probe_argv(version: str, what: str) -> list[str]:
    server = str(mlx_server(version))
    if what == "version":
        return [server, "--version"]
    if what == "help":
        return [server, "launch", "--help"]
    return [server, "launch", "--model-path", "/nonexistent/tiny", *FOREIGN_OPTION[version]]


@pytest.fixture(scope="session")
def probes() -> Iterator[dict[tuple[str, str], subprocess.CompletedProcess[str]]]:
    """Every probe of every installed version, run concurrently, once a session."""
    env = {**os.environ, **PROBE_ENV}
    running = {}
    for version in VERSIONS:
        if not mlx_server(version).exists():
            continue
        for what in ("version", "help", "foreign"):
            argv = probe_argv(version, what)
            running[version, what] = (
                argv,
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    start_new_session=True,
                ),
            )
    results = {}
    try:
        for key, (argv, process) in running.items():
            out, err = process.communicate(timeout=120)
            results[key] = subprocess.CompletedProcess(argv, process.returncode, out, err)
        yield results
    finally:
        for _argv, process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def result(
    probes: dict[tuple[str, str], subprocess.CompletedProcess[str]], version: str, what: str
) -> subprocess.CompletedProcess[str]:
    need(mlx_server(version).exists(), f"mlx-openai-server {version} in {MLX_SERVERS[version]}")
    return probes[version, what]


@pytest.mark.real
@pytest.mark.parametrize("version", VERSIONS)
def test_version_is_the_first_dotted_number(probes: dict, version: str) -> None:
    done = result(probes, version, "version")
    assert done.returncode == 0, done.stderr
    match = VERSION.search(done.stdout)
    assert match is not None and match.group() == version
    assert f"🚀 Version: {version}" in done.stdout.splitlines()


@pytest.mark.real
@pytest.mark.parametrize("version", VERSIONS)
def test_help_lists_one_option_per_line(probes: dict, version: str) -> None:
    done = result(probes, version, "help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: mlx-openai-server launch [OPTIONS]")
    options = OPTION_LINE.findall(done.stdout)
    assert options == OPTIONS[version]
    # an option line is two spaces then the option; wrapped descriptions never begin with `--`
    assert ANY_DASHED_LINE.findall(done.stdout) == options


@pytest.mark.real
def test_what_differs_between_the_releases(probes: dict) -> None:
    old = set(OPTION_LINE.findall(result(probes, "1.6.3", "help").stdout))
    new = set(OPTION_LINE.findall(result(probes, "1.8.1", "help").stdout))
    assert "--served-model-name" in new and "--served-model-name" not in old
    assert "--max-concurrency" in old and "--max-concurrency" not in new
    assert {"--model-path", "--model-type", "--host", "--port", "--log-file", "--no-log-file"} <= (
        old & new
    )


@pytest.mark.real
@pytest.mark.parametrize("version", VERSIONS)
def test_an_option_the_release_lacks_exits_2(probes: dict, version: str) -> None:
    done = result(probes, version, "foreign")
    option = FOREIGN_OPTION[version][0]
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"Error: No such option: {option}" in done.stderr


@pytest.mark.real
@pytest.mark.parametrize("version", VERSIONS)
def test_server_venv_runs_mlx_on_the_cpu_without_torchvision(version: str) -> None:
    python = mlx_server(version).parent / "python"
    need(python.exists(), f"mlx-openai-server {version} in {MLX_SERVERS[version]}")
    code = (
        "import importlib.util as u, mlx.core as mx; "
        "print(mx.default_device(), [n for n in ('torchvision', 'mflux') if u.find_spec(n)])"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    # torchvision crashes the server at import on the CPU torch; mflux needs the CUDA mlx
    assert done.stdout.split("\n")[0] == "Device(cpu, 0) []"


# what each program prints when it runs (the Debian packages `make deps` installs)
DEBIAN_PROGRAMS = {
    "/usr/sbin/sshd": (["-V"], "OpenSSH_"),
    "ssh": (["-V"], "OpenSSH_"),
    "ssh-keygen": (["-t", "ed25519", "-N", "", "-C", "probe", "-f", "KEY"], "has been saved in"),
    "rsync": (["--version"], "rsync  version"),
}


@pytest.mark.real
@pytest.mark.parametrize("program", list(DEBIAN_PROGRAMS))
def test_debian_programs_are_installed(program: str, tmp_path: Path) -> None:
    path = shutil.which(program)
    need(path is not None, f"{program} (make deps installs it)")
    assert path is not None
    args, says = DEBIAN_PROGRAMS[program]
    argv = [path, *(str(tmp_path / "key") if word == "KEY" else word for word in args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert says in done.stdout + done.stderr


def test_prometheus_client_parses_the_text_format() -> None:
    """Tests read `metrics` output with prometheus_client's parser (it is in .venv)."""
    from prometheus_client import parser

    text = (
        "# HELP mlxctl_up Whether the lane answers.\n"
        "# TYPE mlxctl_up gauge\n"
        'mlxctl_up{port="8100",model_id="mlx-tiny"} 1\n'
        "# TYPE mlxctl_restarts_total counter\n"
        'mlxctl_restarts_total{port="8100"} 3\n'
    )
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    # a counter's family loses its _total suffix; its sample keeps it
    assert set(families) == {"mlxctl_up", "mlxctl_restarts"}
    assert families["mlxctl_restarts"].type == "counter"
    sample = families["mlxctl_restarts"].samples[0]
    assert (sample.name, sample.labels, sample.value) == (
        "mlxctl_restarts_total",
        {"port": "8100"},
        3.0,
    )
