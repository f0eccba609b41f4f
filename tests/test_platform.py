"""The platform layer (SPEC §13.1, MACOS.md): the macOS parsers against tests/fixtures/macos, the
macOS I/O side (mlxctl.IS_MACOS forced, mlxctl.MACOS_TOOLS pointed at the fake tools in
tests/fixtures/fakebin), the Linux /proc parser, and the real file run through its macOS branch
end to end (MLXCTL_PLATFORM=darwin) against stand-in servers. The fakes and their fixtures are
described in tests/fixtures/macos/README.md."""

from __future__ import annotations

import calendar
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, STANDIN, TESTS, Env
from helpers import (
    alive,
    connectable,
    error_line,
    proc_fields,
    read_record,
    record_path,
    standin_argv,
    standin_pids,
    status_row,
    wait_until,
    write_script,
)
from hypothesis import given
from hypothesis import strategies as st

import mlxctl

MACOS = TESTS / "fixtures" / "macos"
FAKEBIN = TESTS / "fixtures" / "fakebin"
GIB = 1024**3
MEMSIZE = 206158430208
BOOT_SESSION = "3F2B8C1E-5A7D-4E0B-9C61-2D4F8A9B7E10"
DEFAULT_75 = MEMSIZE * 3 // 4
SERVER_ARGV = (
    "/opt/mlx-launch/.venv/bin/python3 /opt/mlx-launch/.venv/bin/mlx-openai-server launch"
    " --model-path /Users/studio/models/Qwen3-8B-4bit --port 8081"
)
# the fakes start with `/usr/bin/env python3`: this interpreter first, not a slow shim
PYTHON_FIRST = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def fixture_text(name: str) -> str:
    return (MACOS / name).read_text()


def fixture_bytes(name: str) -> bytes:
    return (MACOS / name).read_bytes()


def lstart_text(epoch: int) -> str:
    """What C-locale `%c` prints for a UTC epoch, padded to ps's 28 columns (MACOS §1)."""
    t = time.gmtime(epoch)
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    days = "Mon Tue Wed Thu Fri Sat Sun".split()
    text = (
        f"{days[t.tm_wday]} {months[t.tm_mon - 1]} {t.tm_mday:2d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}"
    )
    return text.ljust(28)


def rusage_fixture() -> bytes:
    return bytes.fromhex(fixture_text("rusage_v0.hex").strip())


def fixture_table() -> dict[int, mlxctl.Proc]:
    return mlxctl.parse_ps_table(fixture_text("ps_table.txt"))


# == the parsers (pure) ===========================================================================

# -- parse_lstart ---------------------------------------------------------------------------------


def test_lstart_fixture() -> None:
    assert mlxctl.parse_lstart(fixture_text("ps_lstart.txt")) == 1772442846
    assert mlxctl.parse_lstart(fixture_text("ps_lstart_missing.txt")) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mon Mar  2 09:14:06 2026", 1772442846),
        ("Mon Mar  2 09:14:06 2026    \n", 1772442846),
        ("Mon Mar 02 09:14:06 2026", 1772442846),  # zero-padded day: tolerated
        ("Thu Dec 25 23:59:59 2025", calendar.timegm((2025, 12, 25, 23, 59, 59, 0, 0, 0))),
        ("Sat Feb 29 00:00:00 2020", calendar.timegm((2020, 2, 29, 0, 0, 0, 0, 0, 0))),
        ("Thu Jan  1 00:00:00 1970", 0),
        ("", None),
        ("   \n", None),
        ("Sat Feb 30 00:00:00 2020", None),  # no such day
        ("Mon Mar  2 24:00:00 2026", None),
        # C's tm_sec runs to 60 (a leap second): taken as the next minute's first second; the
        # draft (wip/platform.py, datetime) refused it
        ("Mon Mar  2 09:14:60 2026", 1772442900),
        ("Mon Mar  2 09:14:61 2026", None),
        ("Mon Foo  2 09:14:06 2026", None),
        ("Mon mar  2 09:14:06 2026", None),
        ("Mi. 29 Juli 15:37:10 2026", None),  # de_DE: LC_ALL=C was not set (MACOS §1)
        ("Tue 15 Sep 23:54:57 2026", None),  # en_GB
        ("2026년  7월 29일 수 15:37:10", None),  # ko_KR
        ("Mon Mar  2 09:14:06", None),
        ("Mon Mar  2 09:14:06 2026 extra", None),
        ("Mon Mar  2 9:14:06 2026", None),
        ("Mon Mar  ٢ 09:14:06 2026", None),  # non-ASCII digit
        ("Mon Mar 123 09:14:06 2026", None),
    ],
)
def test_lstart_cases(text: str, expected: int | None) -> None:
    assert mlxctl.parse_lstart(text) == expected


@given(st.integers(min_value=0, max_value=253402300799))  # up to 9999-12-31 23:59:59
def test_lstart_round_trip(epoch: int) -> None:
    assert mlxctl.parse_lstart(lstart_text(epoch)) == epoch


# -- parse_ps_table -------------------------------------------------------------------------------


def test_ps_table_fixture() -> None:
    table = fixture_table()
    assert sorted(table) == [1, 512, 4242, 4245, 4249, 4251, 4300]
    assert table[1] == mlxctl.Proc(1, 0, 1, "S", 20032 * 1024, "1772442000", "/sbin/launchd")
    assert table[512].command == "(mDNSResponder)"  # another user's: (comm), not argv
    assert table[4242].command.startswith("/opt/homebrew/bin/uv run --project /opt/mlx-launch")
    assert table[4245] == mlxctl.Proc(
        4245, 4242, 4242, "S", 96312 * 1024, "1772442846", SERVER_ARGV
    )
    assert table[4249].command.endswith(
        "-c from multiprocessing.resource_tracker import main;main(6)"
    )
    assert table[4251].command.endswith(
        "spawn_main(tracker_fd=7, pipe_handle=9) --multiprocessing-fork"
    )
    assert table[4251].rss == 812344 * 1024
    zombie = table[4300]
    assert (zombie.state, zombie.command, zombie.rss) == ("Z", "<defunct>", 0)
    assert zombie.start == str(calendar.timegm((2026, 3, 2, 9, 20, 10, 0, 0, 0)))
    group = sorted(p.pid for p in table.values() if p.pgid == 4242)
    assert group == [4242, 4245, 4249, 4251, 4300]


def test_ps_table_start_matches_lstart_of_the_same_pid() -> None:
    assert fixture_table()[4245].start == str(mlxctl.parse_lstart(fixture_text("ps_lstart.txt")))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # 2-digit day, 6-digit pid, a command with runs of spaces kept as printed
        (
            "123456     1 123456 R+   1048576 Thu Dec 25 23:59:59 2025     /bin/sh -c a  b",
            mlxctl.Proc(
                123456,
                1,
                123456,
                "R",
                GIB,
                str(calendar.timegm((2025, 12, 25, 23, 59, 59))),
                "/bin/sh -c a  b",
            ),
        ),
        # no command column at all
        (
            "   77     1    77 S          0 Mon Mar  2 09:14:06 2026",
            mlxctl.Proc(77, 1, 77, "S", 0, "1772442846", ""),
        ),
        (
            "    0     0     0 Ss        0 Mon Mar  2 09:00:00 2026     kernel_task",
            mlxctl.Proc(0, 0, 0, "S", 0, "1772442000", "kernel_task"),
        ),
        ("  PID  PPID  PGID STAT    RSS STARTED                      COMMAND", None),  # header
        ("", None),
        ("ps: some warning", None),
        ("   77     1    77 S         12 Mi. 29 Juli 15:37:10 2026 /bin/x", None),
        ("   77     1    77 S         -1 Mon Mar  2 09:14:06 2026     /bin/x", None),
        ("   77     1    77 S          - Mon Mar  2 09:14:06 2026     /bin/x", None),
        ("   7x     1    77 S         12 Mon Mar  2 09:14:06 2026     /bin/x", None),
        ("   77     1    77 s         12 Mon Mar  2 09:14:06 2026     /bin/x", None),
        ("   ٧٧     1    77 S         12 Mon Mar  2 09:14:06 2026     /bin/x", None),
    ],
)
def test_ps_table_odd_lines(line: str, expected: mlxctl.Proc | None) -> None:
    table = mlxctl.parse_ps_table(line + "\n")
    assert list(table.values()) == ([] if expected is None else [expected])


def test_ps_table_skips_odd_lines_between_good_ones() -> None:
    text = "garbage\n" + fixture_text("ps_table.txt") + "\n\n  PID\n"
    assert mlxctl.parse_ps_table(text) == fixture_table()


# -- etime, cputime -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fixture_text("ps_etime.txt"), 93784),
        ("05:21", 321),
        ("   1:02:03", 3723),
        ("100-00:00:01", 8640001),
        ("3-04:05:06", 3 * 86400 + 4 * 3600 + 5 * 60 + 6),
        ("", None),
        ("1-05:21", None),
        ("5:2", None),
    ],
)
def test_etime(text: str, expected: int | None) -> None:
    assert mlxctl.parse_etime(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("  1:02.37", 62.37), ("0:00.00", 0.0), ("123:00.50", 7380.5), ("1:2.3", None), ("", None)],
)
def test_cputime(text: str, expected: float | None) -> None:
    assert mlxctl.parse_ps_cputime(text) == expected


# -- parse_lsof_listeners -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "port", "expected"),
    [
        ("lsof_8081.txt", None, [4245]),
        ("lsof_8081.txt", 8081, [4245]),
        ("lsof_8081.txt", 8082, []),
        ("lsof_8082_wildcard.txt", 8082, [4402]),
        ("lsof_none.txt", 8081, []),
    ],
)
def test_lsof_fixtures(name: str, port: int | None, expected: list[int]) -> None:
    assert mlxctl.parse_lsof_listeners(fixture_text(name), port) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # several pids, several files each, sorted and unique
        ("p9\ncb\nf3\nn*:80\np7\nca\nf4\nn[::]:80\nf5\nn127.0.0.1:80\n", [7, 9]),
        ("p7\nca\nf4\nn[fe80::1%lo0]:80\n", [7]),  # scoped IPv6
        ("p7\nca\n", []),  # a process set without a file
        ("p7\nca\nf4\nn127.0.0.1:8080\n", []),  # another port
        ("p7\nca\nf4\nn127.0.0.1:5000->127.0.0.1:80\n", []),  # connected: local port 5000
        ("p7\nca\nf4\nn127.0.0.1:80->127.0.0.1:5000\n", [7]),
        ("px\nca\nf4\nn*:80\np8\nf1\nn*:80\n", [8]),  # an unreadable pid does not leak forward
        ("n*:80\np8\n", []),  # a name before any process set
        ("\n\nq1\n", []),
    ],
)
def test_lsof_edge_cases(text: str, expected: list[int]) -> None:
    assert mlxctl.parse_lsof_listeners(text, 80) == expected


# -- sysctl values, boot identity, wired limit ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fixture_text("sysctl_hw_memsize.txt"), MEMSIZE),
        (fixture_text("sysctl_wired_limit_mb.txt"), 0),
        (fixture_text("sysctl_wired_limit_mb_set.txt"), 147456),
        ("", None),
        ("  12 \n", 12),
        ("-1", -1),
        ("12a", None),
        ("1_000", None),
        ("+5", None),
        ("iogpu.wired_limit_mb: 0", None),  # without -n
    ],
)
def test_sysctl_int(text: str, expected: int | None) -> None:
    assert mlxctl.parse_sysctl_int(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fixture_text("sysctl_kern_boottime.txt"), 1772442000),
        (fixture_text("sysctl_kern_boottime_local.txt"), 1733390102),  # ctime is local: not read
        ("{ sec = 1, usec = 2 }", 1),
        ("", None),
        ("usec = 5", None),
    ],
)
def test_boottime(text: str, expected: int | None) -> None:
    assert mlxctl.parse_boottime(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fixture_text("sysctl_bootsessionuuid.txt"), BOOT_SESSION),
        ("", None),
        ("3F2B8C1E-5A7D-4E0B-9C61", None),
        ("sysctl: unknown oid 'kern.bootsessionuuid'", None),
    ],
)
def test_boot_session(text: str, expected: str | None) -> None:
    assert mlxctl.parse_boot_session(text) == expected


@pytest.mark.parametrize(
    ("mb_text", "legacy", "expected", "source_has"),
    [
        ("147456\n", None, 147456 * 1024 * 1024, "iogpu.wired_limit_mb"),
        ("147456\n", "1", 147456 * 1024 * 1024, "iogpu.wired_limit_mb"),
        ("0\n", None, DEFAULT_75, "0 (system default)"),
        (None, None, DEFAULT_75, "not available"),
        (None, "51539607552\n", 51539607552, "debug.iogpu.wired_limit"),
        ("0\n", "51539607552\n", 51539607552, "debug.iogpu.wired_limit"),
        (None, "0\n", DEFAULT_75, "0 (system default)"),
        ("garbage", None, DEFAULT_75, "not available"),
        ("-5", None, DEFAULT_75, "not available"),
        ("", "", DEFAULT_75, "not available"),
    ],
)
def test_wired_limit_rule(
    mb_text: str | None, legacy: str | None, expected: int, source_has: str
) -> None:
    limit, source = mlxctl.wired_limit_bytes(mb_text, legacy, MEMSIZE)
    assert limit == expected
    assert source_has in source
    # (147456 MiB happens to be 75 % of 192 GiB: the source tells the rules apart)
    assert source.startswith("75% of hw.memsize") == ("iogpu" not in source_has)


# -- rusage ---------------------------------------------------------------------------------------


def test_rusage_fixture() -> None:
    buf = rusage_fixture()
    assert len(buf) == mlxctl.RUSAGE_INFO_V0_SIZE
    assert mlxctl.footprint_from_rusage(buf) == 9126805504
    assert int.from_bytes(buf[64:72], "little") == 1073741824  # ri_resident_size: not read


def test_rusage_short_buffer() -> None:
    assert mlxctl.footprint_from_rusage(rusage_fixture()[:80]) == 9126805504
    with pytest.raises(ValueError, match="96 bytes, got 79"):
        mlxctl.footprint_from_rusage(rusage_fixture()[:79])


# -- launchctl print ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fixture_text("launchctl_print_running.txt"), ("running", 5120, 0)),
        (fixture_text("launchctl_print_throttled.txt"), ("spawn scheduled", None, 1)),
        ("", (None, None, None)),
        # nested blocks (two tabs) are not the job's own lines
        ("x = {\n\tsub = {\n\t\tstate = waiting\n\t\tpid = 9\n\t}\n}\n", (None, None, None)),
        ("x = {\n\tlast exit code = (never exited)\n}\n", (None, None, None)),
        ("x = {\n\tlast exit code = 78: EX_CONFIG\n}\n", (None, None, 78)),
        ("x = {\n\tpid = 12a\n\tstate = exited\n}\n", ("exited", None, None)),
    ],
)
def test_launchctl_print(text: str, expected: tuple[Any, ...]) -> None:
    job: mlxctl.LaunchdJob = mlxctl.parse_launchctl_print(text)
    assert (job["state"], job["pid"], job["last_exit_code"]) == expected


# -- Linux: /proc/<pid>/stat ----------------------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK")


def stat_line(
    pid: int, comm: str, state: str, ppid: int, pgrp: int, *, start: int, rss: int, cpu: int = 0
) -> str:
    """A /proc/<pid>/stat line: state, ppid, pgrp (fields 3-5), `cpu` clock ticks split between
    utime and stime (14, 15), starttime (22) and rss in pages (24); every other field 0."""
    rest = ["0"] * 50
    rest[0], rest[1], rest[2] = state, str(ppid), str(pgrp)
    rest[11], rest[12] = str(cpu - cpu // 3), str(cpu // 3)
    rest[19], rest[21] = str(start), str(rss)
    return f"{pid} ({comm}) {' '.join(rest)}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            stat_line(42, "python3", "S", 1, 42, start=12345, rss=10, cpu=3 * TICKS),
            mlxctl.Proc(42, 1, 42, "S", 40960, "12345", "", 3.0),
        ),
        # a command name holding ") " and spaces: only the last ")" ends it
        (
            stat_line(7, "a) S 9 9 (b", "Z", 2, 3, start=4, rss=0),
            mlxctl.Proc(7, 2, 3, "Z", 0, "4", "", 0.0),
        ),
        ("", None),
        ("42 (short) S 1 42\n", None),  # fewer than 22 fields
        ("x (bad) " + " ".join(["0"] * 50), None),
        (
            stat_line(42, "p", "S", 1, 42, start=12345, rss=10).replace(" 1 42 ", " one 42 ", 1),
            None,
        ),
    ],
)
def test_parse_proc_stat(text: str, expected: mlxctl.Proc | None) -> None:
    assert mlxctl.parse_proc_stat(text, 4096) == expected


def test_parse_proc_stat_of_this_process() -> None:
    proc = mlxctl.parse_proc_stat(Path("/proc/self/stat").read_text(), 4096)
    assert proc is not None
    assert (proc.pid, proc.ppid, proc.pgid, proc.state) == (
        os.getpid(),
        os.getppid(),
        os.getpgrp(),
        "R",
    )
    assert proc.rss > 0 and proc.start.isdigit()


# == the I/O side against the fake tools ==========================================================


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlxctl in-process on its macOS branch, its tools the fakes answering from the fixtures;
    the boot id and self-mark caches emptied (they hold the other branch's answers)."""
    for name in list(os.environ):
        if name.startswith("FAKE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", PYTHON_FIRST)
    monkeypatch.setattr(mlxctl, "IS_MACOS", True)
    tools = {name: str(FAKEBIN / name) for name in mlxctl.MACOS_TOOL_DEFAULTS}
    monkeypatch.setattr(mlxctl, "MACOS_TOOLS", tools)
    monkeypatch.setattr(mlxctl, "_boot", [])
    monkeypatch.setattr(mlxctl, "_self_start", [])


def scripted_tool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, body: str) -> None:
    """Replace one macOS tool by a shell script (for answers the fakes never give)."""
    tools = {**mlxctl.MACOS_TOOLS, name: str(write_script(tmp_path / name, body))}
    monkeypatch.setattr(mlxctl, "MACOS_TOOLS", tools)


def test_tool_paths_are_absolute_and_repointed_by_the_environment() -> None:
    code = "import json, mlxctl; print(json.dumps([mlxctl.IS_MACOS, mlxctl.MACOS_TOOLS]))"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLXCTL_")}
    plain = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True
    )
    assert plain.returncode == 0, plain.stderr
    is_macos, tools = json.loads(plain.stdout)
    assert (is_macos, tools) == (sys.platform == "darwin", dict(mlxctl.MACOS_TOOL_DEFAULTS))
    assert all(os.path.isabs(path) for path in tools.values())
    forced = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environ, "MLXCTL_PLATFORM": "darwin", "MLXCTL_MACOS_TOOLS": "/fake"},
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == [
        True,
        {name: f"/fake/{name}" for name in mlxctl.MACOS_TOOL_DEFAULTS},
    ]


def test_macos_tool_runs_in_the_c_locale_and_utc(
    macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    # the fake ps shifts lstart by TZ as the real one does: UTC0 gives the fixture's epoch
    code, out, err = mlxctl.macos_tool("ps", "-o", "lstart=", "-p", "4245")
    assert (code, err) == (0, b"")
    assert mlxctl.parse_lstart(out) == 1772442846
    assert mlxctl.macos_tool("ps", "-o", "lstart=", "-p", "999") == (1, "", b"")
    scripted_tool(monkeypatch, tmp_path, "ps", 'echo "$LC_ALL $TZ"; echo "$PATH"; echo oops >&2')
    code, out, err = mlxctl.macos_tool("ps")
    assert (code, out, err) == (0, f"C UTC0\n{PYTHON_FIRST}\n", b"oops\n")  # the rest passed on


def test_macos_sysctl(macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert mlxctl.macos_sysctl("hw.memsize") == fixture_text("sysctl_hw_memsize.txt")
    assert mlxctl.macos_sysctl("kern.bootsessionuuid") == BOOT_SESSION + "\n"
    assert mlxctl.macos_sysctl("no.such.oid") is None  # exit 1, "unknown oid"
    monkeypatch.setenv("FAKE_SYSCTL_HW_MEMSIZE", "unknown")
    assert mlxctl.macos_sysctl("hw.memsize") is None
    scripted_tool(monkeypatch, tmp_path, "sysctl", "echo 'sysctl: weird' >&2; exit 2")
    with pytest.raises(mlxctl.MlxctlError, match=r"^sysctl hw\.memsize exited 2: sysctl: weird$"):
        mlxctl.macos_sysctl("hw.memsize")


def test_read_proc(macos: None) -> None:
    assert mlxctl.read_proc(4245) == fixture_table()[4245]
    assert mlxctl.read_proc(4300) == fixture_table()[4300]  # a zombie keeps its row
    assert mlxctl.read_proc(999) is None  # ps exits 1
    assert mlxctl.read_proc(0) is None
    assert mlxctl.read_proc(-1) is None


def test_proc_table_asks_ps_once(
    macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    table = mlxctl.ProcTable()
    assert {p.pid: p for p in table.all()} == fixture_table()
    assert [p.pid for p in table.members(4242)] == [4242, 4245, 4249, 4251, 4300]
    assert table.members(999) == []
    assert table.get(4245) == fixture_table()[4245]
    assert table.get(999) is None
    assert table.command(4245) == SERVER_ARGV
    assert table.command(512) == "(mDNSResponder)"
    assert table.command(999) == ""
    # everything came from that one snapshot: a broken ps now changes nothing
    scripted_tool(monkeypatch, tmp_path, "ps", "exit 1")
    assert table.get(4251) == fixture_table()[4251]
    assert table.command(4249).endswith("main(6)")


def test_proc_table_from_an_empty_ps_raises(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PS_TABLE", "lsof_none.txt")  # an empty file: ps exits 1
    with pytest.raises(mlxctl.MlxctlError, match=r"^ps exited 1 with 0 processes: no output$"):
        mlxctl.ProcTable()


@pytest.mark.parametrize("answer", ["echo 'ps: something broke' >&2; exit 1", "exit 0", "echo x"])
def test_proc_table_never_reports_an_empty_world(
    macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: str
) -> None:
    scripted_tool(monkeypatch, tmp_path, "ps", answer)
    with pytest.raises(mlxctl.MlxctlError, match=r"^ps exited [01] with 0 processes"):
        mlxctl.ProcTable()


def test_a_missing_tool_is_one_error(
    macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(mlxctl, "MACOS_TOOLS", {"ps": str(tmp_path / "ps")})
    with pytest.raises(mlxctl.MlxctlError, match=r"/ps: command not found$"):
        mlxctl.ProcTable()


def test_listener_pids(macos: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert mlxctl.listener_pids(8081) == [4245]
    assert mlxctl.listener_pids(8082) == [4402]
    assert mlxctl.listener_pids(9) == []  # lsof exits 1: nothing listed
    scripted_tool(monkeypatch, tmp_path, "lsof", "echo 'lsof: boom' >&2; exit 2")
    with pytest.raises(mlxctl.MlxctlError, match=r"^lsof exited 2: lsof: boom$"):
        mlxctl.listener_pids(80)


def test_physical_memory(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mlxctl.physical_memory() == MEMSIZE
    for broken in ("unknown", "=0", "=lots"):
        monkeypatch.setenv("FAKE_SYSCTL_HW_MEMSIZE", broken)
        with pytest.raises(mlxctl.MlxctlError, match=r"^cannot read hw\.memsize$"):
            mlxctl.physical_memory()


def test_boot_id_is_the_boot_session_and_asked_once(
    macos: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert mlxctl.boot_id() == BOOT_SESSION
    monkeypatch.setenv("FAKE_SYSCTL_KERN_BOOTSESSIONUUID", "=5A7D")
    assert mlxctl.boot_id() == BOOT_SESSION  # cached for the process
    monkeypatch.setattr(mlxctl, "_boot", [])
    assert mlxctl.boot_id() is None  # not a UUID
    monkeypatch.setattr(mlxctl, "_boot", [])
    monkeypatch.setenv("FAKE_SYSCTL_KERN_BOOTSESSIONUUID", "unknown")
    assert mlxctl.boot_id() is None


def test_record_is_ours_by_the_ps_start_time(macos: None) -> None:
    table = mlxctl.ProcTable()
    record = {"pid": 4242, "pgid": 4242, "start_time": "1772442845", "boot_id": BOOT_SESSION}
    assert mlxctl.record_is_ours(record, table)
    # records written before the epoch token kept ps's lstart text
    assert mlxctl.record_is_ours({**record, "start_time": "Mon Mar  2 09:14:05 2026"}, table)
    assert not mlxctl.record_is_ours({**record, "start_time": "1772442846"}, table)  # reused pid
    assert not mlxctl.record_is_ours({**record, "boot_id": "another boot"}, table)
    assert not mlxctl.record_is_ours({**record, "pid": 4245}, table)  # not its group's leader


def test_group_footprint(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    table = mlxctl.ProcTable()
    # no libSystem here, so no footprint: every live member's RSS, the zombie not at all
    assert mlxctl.group_footprint(4242, table) == (9120 + 96312 + 10240 + 812344) * 1024
    measured = {4242: 100, 4245: 9126805504, 4249: 200, 4300: 5}  # 4251: EPERM
    asked: list[int] = []

    def footprint(pid: int) -> int | None:
        asked.append(pid)
        return measured.get(pid)

    monkeypatch.setattr(mlxctl, "macos_footprint", footprint)
    assert mlxctl.group_footprint(4242, table) == 100 + 9126805504 + 200 + 812344 * 1024
    assert sorted(asked) == [4242, 4245, 4249, 4251]  # the zombie is not measured
    assert mlxctl.group_footprint(999, table) == 0


class FakeLibSystem:
    """Stands for ctypes.CDLL(libSystem): its proc_pid_rusage answers from the fixture buffer,
    or fails with an errno for the pids in `refused`. (A plain function attribute, as a ctypes
    function is: mlxctl sets its argtypes and restype.)"""

    def __init__(self, refused: dict[int, int] | None = None) -> None:
        self.opened: list[tuple[str, bool]] = []
        self.calls: list[tuple[int, int]] = []
        refused = refused or {}

        def proc_pid_rusage(pid: int, flavor: int, buf: Any) -> int:
            self.calls.append((pid, flavor))
            if pid in refused:
                ctypes.set_errno(refused[pid])
                return -1
            raw = rusage_fixture()
            ctypes.memmove(buf, raw, len(raw))
            return 0

        self.proc_pid_rusage = proc_pid_rusage

    def __call__(self, path: str, use_errno: bool = False) -> FakeLibSystem:
        self.opened.append((path, use_errno))
        return self


def test_footprint_through_proc_pid_rusage(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = FakeLibSystem(refused={4251: errno.EPERM, 4300: errno.ESRCH})
    monkeypatch.setattr(ctypes, "CDLL", lib)
    assert mlxctl.macos_footprint(4245) == 9126805504
    assert lib.opened == [(mlxctl.LIBSYSTEM_PATH, True)]
    assert lib.calls == [(4245, mlxctl.RUSAGE_INFO_V0)]
    # another user's (EPERM) or gone (ESRCH): unreadable, the caller uses the RSS
    assert mlxctl.macos_footprint(4251) is None
    assert mlxctl.macos_footprint(4300) is None
    assert mlxctl.macos_footprint(0) is None
    assert [pid for pid, _ in lib.calls] == [4245, 4251, 4300]  # pid 0 is never asked


def test_footprint_feeds_group_footprint(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", FakeLibSystem(refused={4242: errno.EPERM}))
    total = mlxctl.group_footprint(4242, mlxctl.ProcTable())
    # every live member but the refused leader reads the fixture's footprint
    assert total == 3 * 9126805504 + 9120 * 1024


def test_footprint_without_libsystem_is_none() -> None:
    if sys.platform == "darwin":
        pytest.skip("libSystem is here")
    assert mlxctl.macos_footprint(os.getpid()) is None
    assert mlxctl.macos_footprint(0) is None


# -- the fakes read this machine: real processes and listeners ------------------------------------


def start_epoch(pid: int) -> int:
    """A Linux process's start in epoch seconds, the way the live fake ps computes it."""
    with open("/proc/stat") as handle:
        btime = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
    fields = proc_fields(pid)
    assert fields is not None
    return btime + int(fields[19]) // os.sysconf("SC_CLK_TCK")


def test_live_proc_table_sees_real_processes(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PS", "live")
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while (proc_fields(zombie.pid) or ["Z"])[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        table = mlxctl.ProcTable()
        me = table.get(os.getpid())
        assert me is not None and me.pgid == os.getpgrp() and me.command
        proc = table.get(sleeper.pid)
        assert proc is not None
        assert (proc.ppid, proc.pgid, proc.command) == (os.getpid(), sleeper.pid, "sleep 30")
        assert proc.state in "SR" and proc.rss > 0
        assert proc.start == str(start_epoch(sleeper.pid))
        assert mlxctl.read_proc(sleeper.pid) == proc
        dead = table.get(zombie.pid)
        assert dead is not None and (dead.state, dead.command, dead.rss) == ("Z", "<defunct>", 0)
        assert [p.pid for p in table.members(sleeper.pid)] == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def test_live_listener_pids(macos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LSOF", "live")
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        port = v4.getsockname()[1]
        assert mlxctl.listener_pids(port) == [os.getpid()]
        with socket.socket(socket.AF_INET6) as v6:
            v6.bind(("::1", port))
            v6.listen()
            assert mlxctl.listener_pids(port) == [os.getpid()]  # one pid, two sockets
    assert mlxctl.listener_pids(port) == []


# -- the fakes themselves -------------------------------------------------------------------------


def fake(*argv: str, **environ: str) -> tuple[int, bytes, bytes]:
    done = subprocess.run(
        [str(FAKEBIN / argv[0]), *argv[1:]],
        capture_output=True,
        env={"PATH": PYTHON_FIRST, "LC_ALL": "C", "TZ": "UTC0", **environ},
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.fixture_selftest
def test_fakes_print_the_fixtures_byte_for_byte(tmp_path: Path) -> None:
    ps_table = fake("ps", "-A", "-o", mlxctl.PS_TABLE_KEYWORDS)
    assert ps_table == (0, fixture_bytes("ps_table.txt"), b"")
    assert fake("ps", "-o", "lstart=", "-p", "4245") == (0, fixture_bytes("ps_lstart.txt"), b"")
    assert fake("ps", "-o", "lstart=", "-p", "999") == (1, b"", b"")
    lsof = ("lsof", "-nP", "-iTCP:8081", "-sTCP:LISTEN", "-Fpcn")
    assert fake(*lsof) == (0, fixture_bytes("lsof_8081.txt"), b"")
    assert fake("lsof", "-nP", "-iTCP:9", "-sTCP:LISTEN", "-Fpcn") == (1, b"", b"")
    memsize = fake("sysctl", "-n", "hw.memsize")
    assert memsize == (0, fixture_bytes("sysctl_hw_memsize.txt"), b"")
    uuid = fake("sysctl", "-n", "kern.bootsessionuuid")
    assert uuid == (0, fixture_bytes("sysctl_bootsessionuuid.txt"), b"")
    assert fake("sysctl", "-n", "nope") == (1, b"", b"sysctl: unknown oid 'nope'\n")
    state = str(tmp_path / "launchctl.json")
    missing = fixture_bytes("launchctl_print_missing.stderr")
    print_missing = fake(
        "launchctl", "print", "system/com.mlxctl.watch", FAKE_LAUNCHCTL_STATE=state
    )
    assert print_missing == (113, b"", missing)
    gone = fixture_bytes("launchctl_bootout_missing.stderr")
    bootout = fake("launchctl", "bootout", "system/com.mlxctl.watch", FAKE_LAUNCHCTL_STATE=state)
    assert bootout == (3, b"", gone)


@pytest.mark.fixture_selftest
def test_fake_ps_honours_tz_like_the_real_one() -> None:
    _, stdout, _ = fake("ps", "-o", "lstart=", "-p", "4245", TZ="UTC-1")  # one hour east
    assert mlxctl.parse_lstart(stdout.decode()) == 1772442846 + 3600


# == the real file through its macOS branch =======================================================

MACOS_ENV = {
    "MLXCTL_PLATFORM": "darwin",
    "MLXCTL_MACOS_TOOLS": str(FAKEBIN),
    "FAKE_PS": "live",
    "FAKE_LSOF": "live",
    "PATH": PYTHON_FIRST,
}


@pytest.fixture
def darwin(env: Env) -> Iterator[Env]:
    """The world of `env`, with the real file forced onto its macOS branch and the fakes reading
    this machine. Its servers carry macOS start tokens, which the Linux teardown in conftest
    cannot match to /proc, so they are stopped here."""
    env.set(**MACOS_ENV)
    yield env
    for pid in standin_pids(env):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_load_status_unload_through_the_macos_branch(darwin: Env) -> None:
    env = darwin
    env.add_model("mlx-a")
    port = env.team[0]
    result = env.run("load", "mlx-a", str(port), "--no-sync")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mlx-a", str(port)]
    record = read_record(env, port)
    # identity as on a Mac: epoch seconds from ps's lstart (Linux would record clock ticks) and
    # the boot session from sysctl
    assert record["start_time"] == str(start_epoch(record["pid"]))
    assert record["boot_id"] == BOOT_SESSION
    assert alive(record["pid"]) and connectable(port)

    status = env.run("status", "--json", "--check")
    assert status.returncode == 0, status.stdout + status.stderr
    row = status_row(status.stdout, port)
    assert (row["state"], row["model_id"], row["ours"]) == ("serving", "mlx-a", True)
    assert row["pid"] == record["pid"]
    assert isinstance(row["rss_bytes"], int) and row["rss_bytes"] > 0
    # load again: a no-op, recognised as ours through ps
    again = env.run("load", "mlx-a", "auto", "--no-sync")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["mlx-a", str(port)]
    assert read_record(env, port)["pid"] == record["pid"]

    result = env.run("unload", str(port), "--no-sync")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mlx-a", str(port)]
    assert not alive(record["pid"])
    assert not connectable(port)
    assert not record_path(env, port).exists()
    assert env.registry()["models"]["mlx-a"]["port"] is None


def test_a_busy_port_is_named_through_lsof(darwin: Env) -> None:
    env = darwin
    env.add_model("mlx-a")
    port = env.team[1]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        result = env.run("load", "mlx-a", str(port), "--no-sync")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert f"port {port} held by pid {os.getpid()} (not started by mlxctl)" in line
    assert not record_path(env, port).exists()


def test_a_foreign_model_server_is_found_through_ps_and_lsof(darwin: Env, tmp_path: Path) -> None:
    """A server mlxctl did not start: its pid comes from lsof, "an MLX server" from ps's command
    column, and only --force stops it."""
    env = darwin
    port = env.team[2]
    script = tmp_path / "mlx-openai-server"
    shutil.copy(STANDIN, script)
    child = subprocess.Popen(
        standin_argv(env.model_dir("foreign"), port, script=script),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: connectable(port))
        status = env.run("--json", "status", "--pids")
        assert status.returncode == 0, status.stderr
        row = status_row(status.stdout, port)
        assert (row["state"], row["ours"], row["pid"]) == ("foreign", False, child.pid)
        refused = env.run("unload", str(port), "--no-sync")
        assert refused.returncode == 1
        assert f"port {port} held by pid {child.pid} (not started by mlxctl)" in refused.stderr
        assert "--force" in refused.stderr
        assert child.poll() is None
        forced = env.run("unload", str(port), "--force", "--no-sync")
        assert forced.returncode == 0, forced.stderr
        assert child.wait(10) is not None
        assert not connectable(port)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def test_a_killed_server_is_dead_and_up_restarts_it(darwin: Env) -> None:
    """A server killed behind mlxctl's back lingers as a zombie here (PID 1 does not reap), shown
    by ps as `Z <defunct>`: dead, not ours, and `up` starts a new one."""
    env = darwin
    env.add_model("mlx-a")
    port = env.team[3]
    assert env.run("load", "mlx-a", str(port), "--no-sync").returncode == 0
    old = read_record(env, port)
    os.killpg(old["pgid"], signal.SIGKILL)
    wait_until(lambda: not alive(old["pid"]) and not connectable(port))
    status = env.run("--json", "status", "--check")
    assert status.returncode == 3, status.stderr  # drift
    assert status_row(status.stdout, port)["state"] == "dead"
    up = env.run("up", "--no-sync")
    assert up.returncode == 0, up.stderr
    new = read_record(env, port)
    assert new["pid"] != old["pid"] and alive(new["pid"])
    status = env.run("--json", "status", "--check")
    assert status.returncode == 0, status.stdout + status.stderr
    row = status_row(status.stdout, port)
    assert (row["state"], row["ours"], row["pid"]) == ("serving", True, new["pid"])
    assert env.run("unload", str(port), "--no-sync").returncode == 0


def test_reconcile_stops_an_orphan_found_through_ps(darwin: Env) -> None:
    env = darwin
    env.add_model("mlx-a")
    port = env.team[4]
    assert env.run("load", "mlx-a", str(port), "--no-sync").returncode == 0
    pid = read_record(env, port)["pid"]
    data = env.registry()
    data["models"]["mlx-a"]["port"] = None  # the assignment cleared by hand: an orphan
    env.registry_path.write_text(json.dumps(data))
    status = env.run("--json", "status")
    assert status_row(status.stdout, port)["state"] == "orphan"
    result = env.run("reconcile", "--no-sync")
    assert result.returncode == 0, result.stderr
    assert "stopped orphan" in result.stdout and str(port) in result.stdout
    assert not alive(pid) and not connectable(port)
    assert not record_path(env, port).exists()
