"""`mlxctl service install|uninstall|status` (SPEC §14): the launchd plist and the systemd unit
rendered purely (compared parsed, never as bytes; the unit passes `systemd-analyze verify`), the
refusals, `--dry-run` for either platform, and install → status → uninstall into a temp dir
(MLXCTL_SERVICE_DIR) with a fake `systemctl` on PATH (Linux) or the stateful fake `launchctl`
(the macOS branch, forced with MLXCTL_PLATFORM=darwin)."""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MLXCTL, TESTS, Cli, Env, need
from helpers import wait_until, write_script
from hypothesis import given
from hypothesis import strategies as st

import mlxctl

FAKEBIN = TESTS / "fixtures" / "fakebin"
MACOS_FIXTURES = TESTS / "fixtures" / "macos"
UNIT = mlxctl.SYSTEMD_UNIT_NAME
LABEL = mlxctl.LAUNCHD_LABEL


def operator_account() -> pwd.struct_passwd:
    """A real account that is not root (and not `nobody`, which systemd warns about)."""
    accounts = [p for p in pwd.getpwall() if 1000 <= p.pw_uid < 65534]
    return accounts[0] if accounts else pwd.getpwnam("daemon")


OPERATOR = operator_account()


# -- the plist, pure ------------------------------------------------------------------------------

PLIST_ARGS: dict[str, Any] = {
    "user": "studio",
    "home": "/Users/studio",
    "config_path": "/Users/studio/.config/mlxctl/config.env",
    "program": ["/opt/homebrew/bin/python3.12", "/Users/studio/bin/mlxctl", "watch"],
    "path_env": "/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "stdout_path": "/Users/studio/.local/state/mlxctl/watch.out.log",
    "stderr_path": "/Users/studio/.local/state/mlxctl/watch.err.log",
}


def test_plist_round_trips_with_the_keys_spec_names() -> None:
    parsed = plistlib.loads(mlxctl.render_launchd_plist(LABEL, **PLIST_ARGS))
    limits = {"NumberOfFiles": mlxctl.SERVICE_NOFILE}
    assert parsed == {
        "Label": "com.mlxctl.watch",
        "UserName": "studio",
        "ProgramArguments": PLIST_ARGS["program"],
        "EnvironmentVariables": {
            "MLXCTL_CONFIG": PLIST_ARGS["config_path"],
            "HOME": "/Users/studio",
            "PATH": PLIST_ARGS["path_env"],
        },
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 30,
        "ExitTimeOut": 30,
        "ProcessType": "Interactive",
        "StandardOutPath": PLIST_ARGS["stdout_path"],
        "StandardErrorPath": PLIST_ARGS["stderr_path"],
        "SoftResourceLimits": limits,
        "HardResourceLimits": limits,
    }
    longer = plistlib.loads(mlxctl.render_launchd_plist(LABEL, **PLIST_ARGS, exit_timeout=95))
    assert longer["ExitTimeOut"] == 95


def test_plist_against_macos_md_recommendation() -> None:
    """The recommended plist of MACOS.md §9 (fixtures/macos/watch.plist) and what SPEC asks
    more: ExitTimeOut 30 (the note has 60), PATH in the environment, the open-files limits."""
    recommended = plistlib.loads((MACOS_FIXTURES / "watch.plist").read_bytes())
    rendered = plistlib.loads(
        mlxctl.render_launchd_plist(
            LABEL,
            user="studio",
            home="/Users/studio",
            config_path="/Users/studio/.config/mlxctl/config.env",
            program=recommended["ProgramArguments"],
            path_env="/usr/bin:/bin",
            stdout_path=recommended["StandardOutPath"],
            stderr_path=recommended["StandardErrorPath"],
        )
    )
    differ = {
        k for k in recommended.keys() | rendered.keys() if recommended.get(k) != rendered.get(k)
    }
    assert differ == {
        "ExitTimeOut",
        "EnvironmentVariables",
        "SoftResourceLimits",
        "HardResourceLimits",
    }
    assert (recommended["ExitTimeOut"], rendered["ExitTimeOut"]) == (60, 30)
    assert rendered["EnvironmentVariables"] == {
        **recommended["EnvironmentVariables"],
        "PATH": "/usr/bin:/bin",
    }


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("home", "~", "HOME"),
        ("config_path", "$HOME/.config/mlxctl/config.env", "MLXCTL_CONFIG"),
        ("stdout_path", "watch.out.log", "stdout"),
        ("stderr_path", "", "stderr"),
        ("program", ["python3", "/x/mlxctl", "watch"], "program"),
        ("program", [], "program"),
    ],
)
def test_plist_refuses_what_launchd_cannot_expand(field: str, value: Any, what: str) -> None:
    with pytest.raises(mlxctl.MlxctlError, match=f"{what}.* must be an absolute path"):
        mlxctl.render_launchd_plist(LABEL, **{**PLIST_ARGS, field: value})


plist_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
    max_size=30,
)


@given(plist_text, plist_text, plist_text, st.lists(plist_text, max_size=4))
def test_plist_round_trips_any_text(user: str, home: str, config: str, args: list[str]) -> None:
    """XML's special characters, quotes, spaces and any Unicode come back as they went in."""
    program = ["/" + home, *args]
    parsed = plistlib.loads(
        mlxctl.render_launchd_plist(
            LABEL,
            **{
                **PLIST_ARGS,
                "user": user,
                "home": "/" + home,
                "config_path": "/" + config,
                "program": program,
            },
        )
    )
    assert parsed["UserName"] == user and parsed["ProgramArguments"] == program
    assert parsed["EnvironmentVariables"]["HOME"] == "/" + home
    assert parsed["EnvironmentVariables"]["MLXCTL_CONFIG"] == "/" + config


# -- the systemd unit, pure and verified ------------------------------------------------------------


def unit_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line.strip():
            key, _, value = line.partition("=")
            assert key not in current, f"{key} twice"
            current[key] = value
    return sections


def verify_unit(directory: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit under its real name; its warnings go to stderr with
    exit 0, so a clean unit is exit 0 and a stderr that names nothing of the unit."""
    analyze = shutil.which("systemd-analyze")
    need(analyze is not None, "systemd-analyze")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / UNIT
    path.write_text(text)
    return subprocess.run(
        [str(analyze), "verify", str(path)], capture_output=True, text=True, timeout=60
    )


def test_systemd_unit_has_what_spec_names_and_verifies(tmp_path: Path) -> None:
    config = tmp_path / "config.env"
    config.write_text("")
    program = [sys.executable, str(MLXCTL), "watch"]
    text = mlxctl.render_systemd_unit(OPERATOR.pw_name, str(config), program)
    sections = unit_sections(text)
    assert sections["Service"]["User"] == OPERATOR.pw_name
    assert sections["Service"]["Environment"] == f"MLXCTL_CONFIG={config}"
    assert sections["Service"]["ExecStart"] == " ".join(program)
    assert sections["Service"]["Restart"] == "always"
    assert sections["Service"]["RestartSec"] == "30"
    # watch's servers live in its cgroup: the default control-group kill would stop them all
    assert sections["Service"]["KillMode"] == "process"
    assert sections["Install"] == {"WantedBy": "multi-user.target"}
    result = verify_unit(tmp_path / "units", text)
    assert result.returncode == 0, result.stderr
    assert UNIT not in result.stderr and str(tmp_path) not in result.stderr, result.stderr


def executable(directory: Path) -> Path:
    directory.mkdir(parents=True)
    return write_script(directory / "python", "exit 0")


@pytest.mark.parametrize("name", ["with space", "100%", "semi;colon", "mixed 50% ;x"])
def test_systemd_unit_quotes_awkward_paths_so_systemd_reads_them(tmp_path: Path, name: str) -> None:
    """A program and a config under a directory with a space, % or ;: verify finds the
    executable (a wrong quoting or escaping would name another file, as the last check shows)."""
    program = executable(tmp_path / name)
    config = program.parent / "config.env"
    config.write_text("")
    text = mlxctl.render_systemd_unit(OPERATOR.pw_name, str(config), [str(program), "a b", "watch"])
    result = verify_unit(tmp_path / "units", text)
    assert result.returncode == 0, result.stderr
    assert UNIT not in result.stderr, result.stderr
    bad = mlxctl.render_systemd_unit(OPERATOR.pw_name, str(config), [str(tmp_path / "nope")])
    missing = verify_unit(tmp_path / "bad", bad)
    assert "nope" in missing.stderr


def test_systemd_unit_a_dollar_in_the_program_path(tmp_path: Path) -> None:
    """systemd expands `$$` to `$` in ExecStart's arguments but not in the executable's own path
    (measured with systemd 252: `ExecStart=/d/a$$b/python` is "not executable: No such file",
    `ExecStart=/d/a$b/python` verifies), so the first word must keep its `$` as it is."""
    program = executable(tmp_path / "cost$5")
    text = mlxctl.render_systemd_unit(OPERATOR.pw_name, "/etc/x.env", [str(program), "$arg"])
    result = verify_unit(tmp_path / "units", text)
    assert result.returncode == 0 and UNIT not in result.stderr, result.stderr
    assert unit_sections(text)["Service"]["ExecStart"].endswith(" $$arg")  # an argument: escaped


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("a b", '"a b"'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        (";", '";"'),
        ("", '""'),
    ],
)
def test_systemd_exec_word(word: str, written: str) -> None:
    assert mlxctl.systemd_exec_word(word) == written


@pytest.mark.parametrize("field", ["user", "config", "program"])
def test_systemd_unit_refuses_control_characters(field: str) -> None:
    args = {"user": "studio", "config": "/etc/mlxctl.env", "program": "/usr/bin/python3"}
    args[field] += "\nExecStartPre=/bin/rm"
    with pytest.raises(mlxctl.MlxctlError, match="control character"):
        mlxctl.render_systemd_unit(args["user"], args["config"], [args["program"], "watch"])


# -- the command: refusals and --dry-run ----------------------------------------------------------


@pytest.fixture
def svc(env: Env) -> Env:
    """A service world: the operator is a real non-root account ($SUDO_USER, since the suite
    runs as root), its config file exists, files go to a temp dir, a fake systemctl on PATH."""
    config = env.tmp / "config.env"
    config.write_text("# mlxctl settings\n")
    fakes = env.tmp / "fakes"
    fakes.mkdir()
    write_script(
        fakes / "systemctl",
        'printf \'%s\\n\' "$*" >> "$FAKE_SYSTEMCTL_LOG"\n'
        'case "$1" in\n'
        '  is-enabled) [ -e "$FAKE_SYSTEMCTL_ENABLED" ] && exit 0; exit 1;;\n'
        '  enable) : > "$FAKE_SYSTEMCTL_ENABLED";;\n'
        '  disable) rm -f "$FAKE_SYSTEMCTL_ENABLED";;\n'
        "esac\n"
        "exit 0",
    )
    env.set(
        SUDO_USER=OPERATOR.pw_name,
        MLXCTL_CONFIG=str(config),
        MLXCTL_SERVICE_DIR=str(env.tmp / "units"),
        FAKE_SYSTEMCTL_LOG=str(env.tmp / "systemctl.log"),
        FAKE_SYSTEMCTL_ENABLED=str(env.tmp / "systemctl.enabled"),
        PATH=f"{fakes}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    return env


def systemctl_calls(env: Env) -> list[str]:
    log = env.tmp / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def printed_file(out: str) -> tuple[str, str, list[str]]:
    """--dry-run output: (the path it would write, the file, the commands it would run)."""
    lines = out.splitlines()
    assert lines[0].startswith("# would write ")
    commands = [
        line.removeprefix("# would run: ") for line in lines if line.startswith("# would run: ")
    ]
    body = [line for line in lines[1:] if not line.startswith("# would run: ")]
    return lines[0].removeprefix("# would write "), "\n".join(body) + "\n", commands


def test_dry_run_for_linux_prints_the_whole_unit_and_the_commands(svc: Env) -> None:
    env = svc
    result = env.run("service", "install", "--dry-run", "--for", "linux")
    assert result.returncode == 0, result.stderr
    path, text, commands = printed_file(result.stdout)
    assert path == str(env.tmp / "units" / UNIT)
    program = [sys.executable, str(MLXCTL), "watch"]
    assert text == mlxctl.render_systemd_unit(OPERATOR.pw_name, env.vars["MLXCTL_CONFIG"], program)
    assert commands == ["systemctl daemon-reload", f"systemctl enable --now {UNIT}"]
    assert not (env.tmp / "units").exists() and systemctl_calls(env) == []  # nothing done


def test_dry_run_for_macos_prints_the_whole_plist_and_the_commands(svc: Env) -> None:
    env = svc
    result = env.run("service", "install", "--dry-run", "--for", "macos")
    assert result.returncode == 0, result.stderr
    path, text, commands = printed_file(result.stdout)
    assert path == str(env.tmp / "units" / f"{LABEL}.plist")
    job = plistlib.loads(text.encode())
    assert job["Label"] == LABEL and job["UserName"] == OPERATOR.pw_name
    assert job["ProgramArguments"] == [sys.executable, str(MLXCTL), "watch"]
    assert job["EnvironmentVariables"]["MLXCTL_CONFIG"] == env.vars["MLXCTL_CONFIG"]
    assert job["EnvironmentVariables"]["HOME"] == OPERATOR.pw_dir
    launcher_dir = str(Path(sys.executable).parent)  # MLX_LAUNCH_CMD's program lives there
    assert job["EnvironmentVariables"]["PATH"].split(":")[0] == launcher_dir
    assert "/usr/bin" in job["EnvironmentVariables"]["PATH"].split(":")
    assert job["StandardOutPath"] == str(env.state / "watch.out.log")
    assert job["StandardErrorPath"] == str(env.state / "watch.err.log")
    assert (job["KeepAlive"], job["RunAtLoad"], job["ThrottleInterval"]) == (True, True, 30)
    assert job["ProcessType"] == "Interactive"
    # watch stops within MLX_STOP_TIMEOUT + one interval (SPEC §14): launchd must wait that long
    assert job["ExitTimeOut"] >= float(env.vars["MLX_STOP_TIMEOUT"]) + 5
    launchctl = mlxctl.MACOS_TOOL_DEFAULTS["launchctl"]
    assert commands == [
        f"{launchctl} bootout system/{LABEL}",
        f"{launchctl} bootstrap system {path}",
    ]
    assert not (env.tmp / "units").exists()


def test_the_other_platform_only_prints_a_plan(svc: Env) -> None:
    env = svc
    for action in ("install", "uninstall", "status"):
        result = env.run("service", action, "--for", "macos")
        assert result.returncode == 1
        assert "add --dry-run" in result.stderr
    assert not (env.tmp / "units").exists() and systemctl_calls(env) == []


@pytest.mark.parametrize("sudo_user", [None, "root"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_root_is_refused_as_operator(svc: Env, sudo_user: str | None, dry_run: bool) -> None:
    env = svc
    env.set(SUDO_USER=sudo_user)
    result = env.run("service", "install", *(["--dry-run"] if dry_run else []))
    assert result.returncode == 1
    assert "root cannot be the operator" in result.stderr and "Traceback" not in result.stderr
    assert not (env.tmp / "units").exists() and systemctl_calls(env) == []


def test_a_plain_user_is_the_operator_and_install_needs_root(
    svc: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root: the operator is the current user whatever SUDO_USER says; writing needs root."""
    env = svc
    env.set(SUDO_USER="root")
    monkeypatch.setattr(os, "geteuid", lambda: OPERATOR.pw_uid)
    code, out, err = cli("service", "install", "--dry-run")
    assert code == 0, err
    assert f"User={OPERATOR.pw_name}" in out
    code, out, err = cli("service", "install")
    assert code == 1 and "service install needs root" in err
    code, out, err = cli("service", "uninstall")
    assert code == 1 and "service uninstall needs root" in err
    assert not (env.tmp / "units").exists() and systemctl_calls(env) == []


def test_a_missing_config_file_is_refused(svc: Env) -> None:
    env = svc
    missing = env.tmp / "nowhere" / "config.env"
    env.set(MLXCTL_CONFIG=str(missing))
    result = env.run("service", "install", "--dry-run")
    assert result.returncode == 1
    assert f"{missing} does not exist" in result.stderr
    # without MLXCTL_CONFIG: the operator's own ~/.config/mlxctl/config.env
    default = Path(OPERATOR.pw_dir) / ".config" / "mlxctl" / "config.env"
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    env.set(MLXCTL_CONFIG=None)
    result = env.run("service", "install", "--dry-run")
    assert result.returncode == 1
    assert f"{default} does not exist" in result.stderr
    assert not (env.tmp / "units").exists()


def test_a_launcher_from_path_is_refused(svc: Env) -> None:
    env = svc
    write_script(env.tmp / "fakes" / "mlx-openai-server", "exit 0")
    env.set(MLX_LAUNCH_CMD=None)
    for args in (("--dry-run",), ()):
        result = env.run("service", "install", *args)
        assert result.returncode == 1
        assert "came from a PATH lookup" in result.stderr
        assert "MLX_LAUNCH_CMD" in result.stderr  # the hint
    assert not (env.tmp / "units").exists() and systemctl_calls(env) == []


# -- install, status, uninstall -----------------------------------------------------------------


@contextlib.contextmanager
def a_watch(env: Env) -> Iterator[subprocess.Popen[bytes]]:
    """A real `mlxctl watch` holding watch.lock; SIGTERM at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(MLXCTL), "watch", "--interval", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env.environ(),
    )
    try:
        wait_until(lambda: mlxctl_watch_pid(env) == proc.pid, 20)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def mlxctl_watch_pid(env: Env) -> int | None:
    lock = env.state / "watch.lock"
    text = lock.read_text().strip() if lock.exists() else ""
    return int(text) if text.isdigit() else None


def service_status(env: Env) -> tuple[int, dict[str, Any]]:
    """`service status --json`: its exit status and its status object (the first line: see
    test_service_status_json_is_one_document)."""
    result = env.run("service", "status", "--json")
    data = json.loads(result.stdout.splitlines()[0])
    assert isinstance(data, dict)
    return result.returncode, data


def test_service_status_json_is_one_document(svc: Env) -> None:
    """stdout is data: `--json` prints one JSON document, as `status --json` does, so that
    `json.loads(stdout)` works; a second object after it (the mutating commands' result line)
    breaks every consumer."""
    env = svc
    result = env.run("service", "status", "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["installed"] is False


def test_linux_install_status_uninstall(svc: Env) -> None:
    env = svc
    unit = env.tmp / "units" / UNIT
    code, data = service_status(env)
    assert code == 1
    assert data == {
        "version": 1,
        "path": str(unit),
        "installed": False,
        "loaded": False,
        "running": False,
        "pid": None,
    }

    result = env.run("service", "install")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"installed: {unit}"
    program = [sys.executable, str(MLXCTL), "watch"]
    expected = mlxctl.render_systemd_unit(OPERATOR.pw_name, env.vars["MLXCTL_CONFIG"], program)
    assert unit.read_text() == expected
    assert unit.stat().st_mode & 0o777 == 0o644
    assert systemctl_calls(env) == ["daemon-reload", f"enable --now {UNIT}"]

    code, data = service_status(env)
    assert code == 3  # installed, loaded, but no watch holds the lock
    assert (data["installed"], data["loaded"], data["running"]) == (True, True, False)
    text = env.run("service", "status")
    assert text.returncode == 3 and "running: no" in text.stdout

    with a_watch(env) as watch:
        code, data = service_status(env)
        assert code == 0
        assert (data["running"], data["pid"]) == (True, watch.pid)
        assert f"running: yes (pid {watch.pid})" in env.run("service", "status").stdout

    # the same file again: not rewritten, nothing run
    stamp = unit.stat()
    del_log(env)
    time.sleep(0.01)
    again = env.run("service", "install")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"unchanged: {unit}"
    assert (unit.stat().st_mtime_ns, unit.stat().st_ino) == (stamp.st_mtime_ns, stamp.st_ino)
    assert systemctl_calls(env) == [f"is-enabled --quiet {UNIT}"]

    # another config: rewritten, reloaded and enabled again
    other = env.tmp / "other.env"
    other.write_text("")
    env.set(MLXCTL_CONFIG=str(other))
    del_log(env)
    changed = env.run("service", "install")
    assert changed.returncode == 0 and changed.stdout.strip() == f"installed: {unit}"
    assert f"Environment=MLXCTL_CONFIG={other}" in unit.read_text()
    assert systemctl_calls(env) == ["daemon-reload", f"enable --now {UNIT}"]

    del_log(env)
    assert env.run("service", "uninstall", "--dry-run").returncode == 0
    assert unit.exists() and systemctl_calls(env) == []
    gone = env.run("service", "uninstall")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.strip() == f"removed {unit}"
    assert not unit.exists()
    assert systemctl_calls(env) == [f"disable --now {UNIT}", "daemon-reload"]
    assert service_status(env)[0] == 1
    twice = env.run("service", "uninstall")
    assert twice.returncode == 0 and twice.stdout.strip() == "not installed"


def del_log(env: Env) -> None:
    with contextlib.suppress(FileNotFoundError):
        (env.tmp / "systemctl.log").unlink()


def launchctl_state(env: Env) -> dict[str, Any]:
    path = env.tmp / "launchctl.json"
    data = json.loads(path.read_text()) if path.exists() else {"jobs": {}, "calls": []}
    assert isinstance(data, dict)
    return data


@pytest.fixture
def mac(svc: Env) -> Env:
    svc.set(
        MLXCTL_PLATFORM="darwin",
        MLXCTL_MACOS_TOOLS=str(FAKEBIN),
        FAKE_PS="live",
        FAKE_LSOF="live",
        FAKE_LAUNCHCTL_STATE=str(svc.tmp / "launchctl.json"),
    )
    return svc


def test_macos_install_status_uninstall(mac: Env) -> None:
    env = mac
    plist = env.tmp / "units" / f"{LABEL}.plist"
    assert service_status(env)[0] == 1

    result = env.run("service", "install")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"installed: {plist}"
    job = plistlib.loads(plist.read_bytes())
    assert job["Label"] == LABEL and job["UserName"] == OPERATOR.pw_name
    assert job["ProgramArguments"] == [sys.executable, str(MLXCTL), "watch"]
    assert plist.stat().st_mode & 0o777 == 0o644
    state = launchctl_state(env)
    assert state["jobs"][LABEL]["plist"] == str(plist.resolve())
    calls = [c for c in state["calls"] if c[0] != "print"]
    assert calls == [["bootout", f"system/{LABEL}"], ["bootstrap", "system", str(plist)]]

    code, data = service_status(env)
    assert code == 3
    assert (data["installed"], data["loaded"], data["running"]) == (True, True, False)

    # unchanged and loaded: nothing written, nothing bootstrapped
    stamp = plist.stat().st_mtime_ns
    before = len(launchctl_state(env)["calls"])
    again = env.run("service", "install")
    assert again.returncode == 0 and again.stdout.strip() == f"unchanged: {plist}"
    assert plist.stat().st_mtime_ns == stamp
    assert [c[0] for c in launchctl_state(env)["calls"][before:]] == ["print"]

    # unchanged but not loaded (booted out by hand): loaded again, the file left as it is
    booted = subprocess.run(
        [str(FAKEBIN / "launchctl"), "bootout", f"system/{LABEL}"], env=env.environ(), check=False
    )
    assert booted.returncode == 0
    reloaded = env.run("service", "install")
    assert reloaded.returncode == 0, reloaded.stderr
    assert plist.stat().st_mtime_ns == stamp
    assert LABEL in launchctl_state(env)["jobs"]

    before = len(launchctl_state(env)["calls"])
    gone = env.run("service", "uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not plist.exists() and LABEL not in launchctl_state(env)["jobs"]
    calls = [c for c in launchctl_state(env)["calls"][before:] if c[0] != "print"]
    assert calls == [["bootout", f"system/{LABEL}"]]
    assert service_status(env)[0] == 1


def test_macos_status_running_with_a_watch(mac: Env) -> None:
    env = mac
    assert env.run("service", "install").returncode == 0
    with a_watch(env) as watch:
        code, data = service_status(env)
        assert code == 0 and data["pid"] == watch.pid and data["loaded"] is True


def test_status_running_without_the_service_file(svc: Env) -> None:
    """A watch run by hand (not as the service) still answers "running"."""
    env = svc
    with a_watch(env) as watch:
        code, data = service_status(env)
        assert (data["installed"], data["running"], data["pid"]) == (False, True, watch.pid)
        assert code == 0
