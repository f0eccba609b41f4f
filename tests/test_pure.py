"""Layer 1: the pure core, value in, value out; no temp dir, no processes (STYLE.md §10)."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import pytest

import mlxctl
from mlxctl import MlxctlError, PortFacts

# -- model ids and repo ids (SPEC §5.1, §11) ----------------------------------------------------


@pytest.mark.parametrize(
    ("repo_id", "expected"),
    [
        ("mlx-community/gpt-oss-120b-MXFP4-Q4", "mlx-gpt-oss-120b-mxfp4-q4"),
        ("mlx-community/gpt-oss-20b-MXFP4-Q4", "mlx-gpt-oss-20b-mxfp4-q4"),
        ("Qwen/Qwen2.5-7B-Instruct", "mlx-qwen2-5-7b-instruct"),
        ("meta-llama/Llama-3.1-8B-Instruct", "mlx-llama-3-1-8b-instruct"),
        ("org/Foo__Bar", "mlx-foo-bar"),
        ("org/foo...bar", "mlx-foo-bar"),
        ("org/foo.-_bar", "mlx-foo-bar"),
        ("org/--foo--", "mlx-foo"),
        ("org/_._x_._", "mlx-x"),
        ("org/A B C", "mlx-a-b-c"),
        ("org/ÄäFoo", "mlx-foo"),
        ("gpt2", "mlx-gpt2"),
        ("org/7b", "mlx-7b"),
        # a name already starting with mlx- is not prefixed twice
        ("org/mlx-foo", "mlx-foo"),
        ("org/MLX-Foo-Bar", "mlx-foo-bar"),
        ("org/MLX_Foo", "mlx-foo"),
        ("org/mlx--foo", "mlx-foo"),
        ("org/-mlx-foo-", "mlx-foo"),
        # "mlx" alone and "mlxfoo" do not start with "mlx-"
        ("org/mlx", "mlx-mlx"),
        ("org/mlxfoo", "mlx-mlxfoo"),
        ("org/mlx-", "mlx-mlx"),
        # only the name counts, not the org
        ("mlx-community/Foo", "mlx-foo"),
        ("Some.Org/bar", "mlx-bar"),
        ("org/" + "a" * 101, "mlx-" + "a" * 101),
    ],
)
def test_model_id_from_repo(repo_id: str, expected: str) -> None:
    model_id = mlxctl.model_id_from_repo(repo_id)
    assert model_id == expected
    assert mlxctl.MODEL_ID_RE.fullmatch(model_id)


@pytest.mark.parametrize(
    "repo_id",
    ["", "org/", "org/---", "org/___", "org/...", "org/ÄÖÜ", "/", "org/" + "a" * 102],
)
def test_model_id_from_repo_refuses(repo_id: str) -> None:
    # nothing left to derive from, or a derived id too long for the id rules
    with pytest.raises(MlxctlError, match=r"^(cannot derive a|derived) model id "):
        mlxctl.model_id_from_repo(repo_id)


@pytest.mark.parametrize(
    "model_id",
    [
        "mlx-a",
        "mlx-0",
        "mlx-gpt-oss-20b-mxfp4-q4",
        "mlx-a-",
        "mlx-a--b",
        "mlx-mlx",
        "mlx-" + "a" * 101,
    ],
)
def test_check_model_id_accepts(model_id: str) -> None:
    assert mlxctl.check_model_id(model_id) == model_id


@pytest.mark.parametrize(
    "model_id",
    [
        "",
        "mlx-",
        "mlx--a",
        "mlx",
        "foo",
        "gpt-oss",
        "MLX-a",
        "mlx-A",
        "mlx-a_b",
        "mlx-a.b",
        "mlx-a;rm -rf ~",
        "mlx-a;b",
        "mlx-$(id)",
        "mlx-a$(id)",
        "mlx-`id`",
        "mlx-a|b",
        "mlx-a&b",
        "mlx-a>b",
        "mlx-a\nb",
        "mlx-a\n",
        "\nmlx-a",
        "mlx-a\r",
        "mlx-a\0",
        "mlx-..",
        "mlx-a/../b",
        "mlx-a/b",
        "../mlx-a",
        "mlx-a=b",
        "mlx-a b",
        " mlx-a",
        "mlx-a ",
        "mlx-a\tb",
        "mlx-" + "a" * 102,
        "mlx-é",
    ],
)
def test_check_model_id_refuses(model_id: str) -> None:
    with pytest.raises(MlxctlError, match=re.escape(f"invalid model id {model_id!r}: must match")):
        mlxctl.check_model_id(model_id)


@pytest.mark.parametrize(
    "repo_id",
    [
        "org/name",
        "mlx-community/gpt-oss-20b-MXFP4-Q4",
        "Qwen/Qwen2.5-7B-Instruct",
        "meta-llama/Llama-3.1-8B",
        "a/b",
        "gpt2",
        "org_x/name_y",
    ],
)
def test_check_repo_id_accepts(repo_id: str) -> None:
    assert mlxctl.check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id",
    [
        "",
        "/",
        "org/",
        "/name",
        "org/a/b",
        "org/../x",
        "../x",
        "org/..",
        "org/na..me",
        "..",
        "org/name;rm -rf ~",
        "org/$(id)",
        "org/`id`",
        "org/a|b",
        "org/a&b",
        "org/a\nb",
        "org/name\n",
        "org\n/name",
        "org/name\r",
        "org/a\0b",
        "org/a=b",
        "org/na me",
        " org/name",
        "org/name ",
        "org/" + "a" * 97,
        "o" * 97 + "/name",
        "-org/name",
        "org/-name",
        ".org/name",
        "org/.name",
        "org/name'",
        'org/name"',
        "org/é",
    ],
)
def test_check_repo_id_refuses(repo_id: str) -> None:
    with pytest.raises(MlxctlError, match=re.escape(f"invalid repo id {repo_id!r}: expected")):
        mlxctl.check_repo_id(repo_id)


# -- ports --------------------------------------------------------------------------------------


class FreeSet:
    """An is_free callable that records which ports it was asked about."""

    def __init__(self, free: set[int]) -> None:
        self.free = free
        self.asked: list[int] = []

    def __call__(self, port: int) -> bool:
        self.asked.append(port)
        return port in self.free


@pytest.mark.parametrize(
    ("candidates", "taken", "free", "expected"),
    [
        ([8120, 8121, 8122], set(), {8120, 8121, 8122}, 8120),
        ([8120, 8121, 8122], {8120}, {8120, 8121, 8122}, 8121),
        ([8120, 8121, 8122], set(), {8122}, 8122),
        ([8120, 8121, 8122], {8122}, {8122}, None),
        ([8120, 8121, 8122], {8120, 8121, 8122}, {8120, 8121, 8122}, None),
        ([8120, 8121, 8122], set(), set(), None),
        ([], set(), {1}, None),
        # candidate order is honoured (the caller gives the range lowest first)
        ([8125, 8121], set(), {8121, 8125}, 8125),
    ],
)
def test_pick_free_port(
    candidates: list[int], taken: set[int], free: set[int], expected: int | None
) -> None:
    is_free = FreeSet(free)
    assert mlxctl.pick_free_port(candidates, taken, is_free) == expected
    assert not set(is_free.asked) & taken, "a taken port is never probed"
    if expected is not None:
        assert is_free.asked[-1] == expected, "probing stops at the first free port"


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("X", "8100-8119", range(8100, 8120)),
        ("X", " 8100 - 8119 ", range(8100, 8120)),
        ("X", "8100-8100", range(8100, 8101)),
        ("X", "1-65535", range(1, 65536)),
        ("X", "08100-08119", range(8100, 8120)),
    ],
)
def test_parse_port_range(name: str, raw: str, expected: range) -> None:
    assert mlxctl.parse_port_range(name, raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "8100",
        "8100-",
        "-8119",
        "8119-8100",
        "0-10",
        "65535-65536",
        "8100-70000",
        "abc",
        "8100:8119",
        "8100-8119-8120",
        "8100..8119",
        "81 00-8119",
        "8100-8119;",
    ],
)
def test_parse_port_range_refuses(raw: str) -> None:
    with pytest.raises(MlxctlError, match="MLX_TEAM_PORTS"):
        mlxctl.parse_port_range("MLX_TEAM_PORTS", raw)


# -- status classification (SPEC §6, first match wins) ------------------------------------------

A = "mlx-a"
IDS = ("/models/a", "mlx-a")
T = 900.0


def facts(**kw: Any) -> PortFacts:
    return PortFacts(port=8100, **kw)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # free: nothing at all
        ({}, "free"),
        # starting by a live reservation, whatever the port shows
        ({"assigned": A, "expected_ids": IDS, "reserved_live": True}, "starting"),
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "reserved_live": True,
                "listening": True,
                "answered": True,
                "served_id": "/models/other",
            },
            "starting",
        ),
        (
            {"assigned": A, "expected_ids": IDS, "reserved_live": True, "listening": True},
            "starting",
        ),
        # starting by a young live process of ours whose port still refuses
        ({"assigned": A, "expected_ids": IDS, "ours_alive": True, "ours_age": 5.0}, "starting"),
        ({"ours_alive": True, "ours_age": 5.0}, "starting"),
        # ... but not once it is older than MLX_START_TIMEOUT
        ({"assigned": A, "expected_ids": IDS, "ours_alive": True, "ours_age": T + 1}, "dead"),
        ({"ours_alive": True, "ours_age": T + 1}, "orphan"),
        # serving: the served id is the cache path or the model id (ours or not)
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "ours_alive": True,
                "ours_age": 10.0,
                "listening": True,
                "answered": True,
                "served_id": "/models/a",
                "listener_ours": True,
            },
            "serving",
        ),
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "listening": True,
                "answered": True,
                "served_id": "mlx-a",
            },
            "serving",
        ),
        # a young process that already listens is serving, not starting
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "ours_alive": True,
                "ours_age": 0.5,
                "listening": True,
                "answered": True,
                "served_id": "/models/a",
                "listener_ours": True,
            },
            "serving",
        ),
        # mismatch: serves another model than assigned
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "ours_alive": True,
                "ours_age": 10.0,
                "listening": True,
                "answered": True,
                "served_id": "/models/b",
                "listener_ours": True,
            },
            "mismatch",
        ),
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "listening": True,
                "answered": True,
                "served_id": "/models/b",
            },
            "mismatch",
        ),
        # unresponsive: accepts, no answer (assigned or not, ours or not)
        (
            {
                "assigned": A,
                "expected_ids": IDS,
                "ours_alive": True,
                "ours_age": T + 5,
                "listening": True,
                "listener_ours": True,
            },
            "unresponsive",
        ),
        ({"assigned": A, "expected_ids": IDS, "listening": True}, "unresponsive"),
        ({"listening": True}, "unresponsive"),
        # orphan: ours, not assigned (listening or not)
        (
            {
                "ours_alive": True,
                "ours_age": 10.0,
                "listening": True,
                "answered": True,
                "served_id": "/models/a",
                "listener_ours": True,
            },
            "orphan",
        ),
        # occupied: assigned, a listener that is not ours and not a model server
        (
            {"assigned": A, "expected_ids": IDS, "listening": True, "answered": True},
            "occupied",
        ),
        # dead: assigned, nothing listening
        ({"assigned": A, "expected_ids": IDS}, "dead"),
        # foreign: listening, not ours, not assigned
        ({"listening": True, "answered": True, "served_id": "/models/x"}, "foreign"),
        ({"listening": True, "answered": True}, "foreign"),
    ],
)
def test_classify_port(kw: dict[str, Any], expected: str) -> None:
    assert mlxctl.classify_port(facts(**kw), T) == expected


def test_classify_port_start_timeout_boundary() -> None:
    base = {"assigned": A, "expected_ids": IDS, "ours_alive": True}
    assert mlxctl.classify_port(facts(ours_age=T - 0.01, **base), T) == "starting"
    assert mlxctl.classify_port(facts(ours_age=T, **base), T) == "dead"
    # the same age is young under a longer timeout
    assert mlxctl.classify_port(facts(ours_age=T, **base), T * 2) == "starting"


@pytest.mark.parametrize(
    ("state", "in_range", "assigned", "expected"),
    [
        ("serving", True, True, "serving"),
        ("serving", False, True, "out-of-range (serving)"),
        ("dead", False, True, "out-of-range (dead)"),
        ("orphan", False, False, "orphan"),
        ("free", True, False, "free"),
    ],
)
def test_display_state(state: str, in_range: bool, assigned: bool, expected: str) -> None:
    assert mlxctl.display_state(state, in_range, assigned) == expected


# -- launch argv (SPEC §8) ----------------------------------------------------------------------

LAUNCHER = ["uv", "run", "--project", "/opt/mlx-launch", "mlx-openai-server", "launch"]
BASE_TAIL = ["--model-path", "/m/a", "--model-type", "lm", "--host", "0.0.0.0", "--port", "8101"]
LOG_TAIL = ["--log-file", "/s/logs/8101.app.log"]


@pytest.mark.parametrize(
    ("extra", "tail"),
    [
        ({}, []),
        ({"chat_template": "/t.jinja"}, ["--chat-template-file", "/t.jinja"]),
        ({"tool_call_parser": "harmony"}, ["--tool-call-parser", "harmony"]),
        ({"reasoning_parser": "harmony"}, ["--reasoning-parser", "harmony"]),
        ({"server_args": ["--trust-remote-code"]}, ["--trust-remote-code"]),
        (
            {
                "server_args": ["--max-tokens", "10"],
                "reasoning_parser": "r",
                "chat_template": "/t",
                "tool_call_parser": "p",
            },
            [
                "--chat-template-file",
                "/t",
                "--tool-call-parser",
                "p",
                "--reasoning-parser",
                "r",
                "--max-tokens",
                "10",
            ],
        ),
        # unset, null and empty optional fields add nothing
        ({"chat_template": None, "tool_call_parser": "", "server_args": None}, []),
        ({"server_args": []}, []),
        # a path with spaces stays one word
        ({"chat_template": "/my dir/t.jinja"}, ["--chat-template-file", "/my dir/t.jinja"]),
    ],
)
def test_launch_argv(extra: dict[str, Any], tail: list[str]) -> None:
    entry = {"cache_path": "/m/a", "model_id": "mlx-a", **extra}
    argv = mlxctl.launch_argv(LAUNCHER, entry, 8101, "0.0.0.0", "/s/logs/8101.app.log")
    assert argv == [*LAUNCHER, *BASE_TAIL, *LOG_TAIL, *tail]


def test_launch_argv_never_adds_trust_remote_code() -> None:
    entry = {"cache_path": "/m/a"}
    argv = mlxctl.launch_argv(["srv"], entry, 1, "127.0.0.1", "/l")
    assert "--trust-remote-code" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


# -- settings (SPEC §3) -------------------------------------------------------------------------

HOME_ENV = {"HOME": "/h"}


def settings(
    env: dict[str, str] | None = None,
    file: dict[str, str] | None = None,
    flags: dict[str, str] | None = None,
) -> mlxctl.Config:
    return mlxctl.resolve_settings({**HOME_ENV, **(env or {})}, file or {}, flags)


@pytest.mark.parametrize(
    ("env", "file", "flags", "value", "source"),
    [
        ({}, {}, None, "192.168.1.72", "default"),
        ({}, {"MLX_HOST": "10.0.0.2"}, None, "10.0.0.2", "file"),
        ({"MLX_HOST": "10.0.0.3"}, {"MLX_HOST": "10.0.0.2"}, None, "10.0.0.3", "env"),
        (
            {"MLX_HOST": "10.0.0.3"},
            {"MLX_HOST": "10.0.0.2"},
            {"MLX_HOST": "10.0.0.4"},
            "10.0.0.4",
            "flag",
        ),
        ({}, {}, {"MLX_HOST": "10.0.0.4"}, "10.0.0.4", "flag"),
        # an empty value is still a value given by that source
        ({"MLX_HOST": ""}, {"MLX_HOST": "10.0.0.2"}, None, "", "env"),
    ],
)
def test_resolve_settings_precedence(
    env: dict[str, str],
    file: dict[str, str],
    flags: dict[str, str] | None,
    value: str,
    source: str,
) -> None:
    cfg = settings(env, file, flags)
    assert cfg.values["MLX_HOST"] == value
    assert cfg.sources["MLX_HOST"] == source


def test_resolve_settings_defaults_match_the_spec_table() -> None:
    cfg = settings()
    expected = {
        "MLX_BIND_HOST": "0.0.0.0",
        "MLX_HOST": "192.168.1.72",
        "MLX_TEAM_PORTS": "8100-8119",
        "MLX_EXPERIMENTAL_PORTS": "8120-8139",
        "MLX_START_TIMEOUT": "900",
        "MLX_STOP_TIMEOUT": "20",
        "MLX_PROBE_TIMEOUT": "1.0",
        "MLX_CONVERT_CMD": "python3 -m mlx_lm.convert --hf-path {src} --mlx-path {dest}",
        "MLX_PRECONVERTED_ORGS": "mlx-community,mlx,ml-explore",
        "MLX_PRECONVERTED_HINTS": "mlx",
        "MLX_OFFLOAD_HOST": "mini",
        "MLX_OFFLOAD_DIR": "/mnt/seagate/og_models/mlx-hf",
        "MLX_STUDIO_HOST": "studio",
        "MLX_STUDIO_MLXCTL": "/usr/local/bin/mlxctl",
        "GATEWAY_HOST": "mini",
        "GATEWAY_MLXCTL": "/home/christopherbailey/homelab-llm/platform/ops/scripts/mlxctl",
        "GATEWAY_ROOT": "/home/christopherbailey/homelab-llm",
        "OPTILLM_API_BASE": "http://127.0.0.1:4020/v1",
        "MLXCTL_ROLE": "auto",
        "MLXCTL_SSH": "ssh",
        "MLXCTL_SSH_CONNECT_TIMEOUT": "10",
    }
    for name, value in expected.items():
        assert cfg.values[name] == value, name
        assert cfg.sources[name] == "default", name
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "MLX_LAUNCH_CMD"):
        assert cfg.opt(name) is None, name
    assert cfg.opt("GATEWAY_RELOAD_CMD") is None
    assert cfg.opt("MLX_ROUTE_VIA_OPTILLM") is None
    assert set(mlxctl.SETTING_NAMES) <= set(cfg.values)


@pytest.mark.parametrize(
    ("env", "file", "hub"),
    [
        ({}, {}, "/h/.cache/huggingface/hub"),
        ({"XDG_CACHE_HOME": "/x"}, {}, "/x/huggingface/hub"),
        ({}, {"XDG_CACHE_HOME": "/xf"}, "/xf/huggingface/hub"),
        ({"XDG_CACHE_HOME": "/x", "HF_HOME": "/hf"}, {}, "/hf/hub"),
        ({}, {"HF_HOME": "/hf-file"}, "/hf-file/hub"),
        ({"HF_HOME": "/hf-env"}, {"HF_HOME": "/hf-file"}, "/hf-env/hub"),
        ({"HF_HOME": "/hf", "HUGGINGFACE_HUB_CACHE": "/legacy"}, {}, "/legacy"),
        ({"XDG_CACHE_HOME": "/x"}, {"HUGGINGFACE_HUB_CACHE": "/legacy-file"}, "/legacy-file"),
        (
            {"HF_HOME": "/hf", "HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "/c"},
            {},
            "/c",
        ),
        ({"HUGGINGFACE_HUB_CACHE": "/legacy"}, {"HF_HUB_CACHE": "/c-file"}, "/c-file"),
        ({"HF_HOME": "/hf"}, {"HF_HUB_CACHE": "/c-file"}, "/c-file"),
        # an empty HF_HUB_CACHE is unset: the rules continue
        ({"HF_HUB_CACHE": "", "HF_HOME": "/hf"}, {}, "/hf/hub"),
        ({"HOME": "/other"}, {}, "/other/.cache/huggingface/hub"),
    ],
)
def test_resolve_settings_hub_cache(env: dict[str, str], file: dict[str, str], hub: str) -> None:
    cfg = settings(env, file)
    assert cfg.hub_cache == hub
    assert cfg.registry_path == f"{hub}/registry.json"
    assert cfg.state_dir == f"{hub}/.mlxctl"


@pytest.mark.parametrize(
    ("env", "file", "source"),
    [
        ({"HUGGINGFACE_HUB_CACHE": "/legacy"}, {}, "env"),
        ({}, {"HUGGINGFACE_HUB_CACHE": "/legacy"}, "file"),
        ({"HF_HUB_CACHE": "/c"}, {}, "env"),
        ({}, {"HF_HUB_CACHE": "/c"}, "file"),
    ],
)
def test_resolve_settings_hub_cache_source(
    env: dict[str, str], file: dict[str, str], source: str
) -> None:
    assert settings(env, file).sources["HF_HUB_CACHE"] == source


def test_resolve_settings_registry_and_state_dir_follow_explicit_values() -> None:
    cfg = settings({"MLX_REGISTRY_PATH": "/r/reg.json"})
    assert cfg.registry_path == "/r/reg.json"
    assert cfg.state_dir == "/r/.mlxctl"
    cfg = settings({"MLX_REGISTRY_PATH": "/r/reg.json"}, {"MLXCTL_STATE_DIR": "/s"})
    assert cfg.state_dir == "/s"
    assert cfg.sources["MLXCTL_STATE_DIR"] == "file"


@pytest.mark.parametrize(
    ("env", "router", "env_file", "handles"),
    [
        (
            {},
            "/home/christopherbailey/homelab-llm/layer-gateway/litellm-orch/config/router.yaml",
            "/home/christopherbailey/homelab-llm/layer-gateway/litellm-orch/config/env.local",
            "/home/christopherbailey/homelab-llm/layer-gateway/registry/handles.jsonl",
        ),
        (
            {"GATEWAY_ROOT": "/g"},
            "/g/layer-gateway/litellm-orch/config/router.yaml",
            "/g/layer-gateway/litellm-orch/config/env.local",
            "/g/layer-gateway/registry/handles.jsonl",
        ),
        (
            {"GATEWAY_ROOT": "/g", "GATEWAY_ROUTER_YAML": "/r.yaml", "GATEWAY_HANDLES": "/h.jsonl"},
            "/r.yaml",
            "/g/layer-gateway/litellm-orch/config/env.local",
            "/h.jsonl",
        ),
    ],
)
def test_resolve_settings_gateway_paths(
    env: dict[str, str], router: str, env_file: str, handles: str
) -> None:
    cfg = settings(env)
    assert cfg.get("GATEWAY_ROUTER_YAML") == router
    assert cfg.get("GATEWAY_ENV_FILE") == env_file
    assert cfg.get("GATEWAY_HANDLES") == handles


def test_resolve_settings_unknown_names_are_ignored() -> None:
    cfg = settings({"NOT_A_SETTING": "x"}, {"ALSO_NOT": "y"})
    assert "NOT_A_SETTING" not in cfg.values
    assert "ALSO_NOT" not in cfg.values


@pytest.mark.parametrize(
    ("raw", "ok"),
    [("1", True), ("0.5", True), ("900", True), ("0", False), ("-1", False), ("abc", False)],
)
def test_config_number(raw: str, ok: bool) -> None:
    cfg = settings({"MLX_PROBE_TIMEOUT": raw})
    if ok:
        assert cfg.number("MLX_PROBE_TIMEOUT") == float(raw)
    else:
        with pytest.raises(MlxctlError, match="MLX_PROBE_TIMEOUT"):
            cfg.number("MLX_PROBE_TIMEOUT")


# -- the config file (SPEC §3) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("\n\n   \n", {}),
        ("# a comment\n   # indented comment\n", {}),
        ("A=1", {"A": "1"}),
        ("A=1\nB=2\n", {"A": "1", "B": "2"}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("  A = 1  ", {"A": "1"}),
        ("A=", {"A": ""}),
        ('A="two words"', {"A": "two words"}),
        ("A='single'", {"A": "single"}),
        ('A=""', {"A": ""}),
        ('A="', {"A": '"'}),
        ("A='mixed\"", {"A": "'mixed\""}),
        ("A=a=b=c", {"A": "a=b=c"}),
        ("export A=1", {"A": "1"}),
        ("export   A=1", {"A": "1"}),
        ("  export A=1", {"A": "1"}),
        # no shell expansion: ssh and launchd have no profile
        ("A=$HOME/x", {"A": "$HOME/x"}),
        ("A=~/x", {"A": "~/x"}),
        ("A=$(id)", {"A": "$(id)"}),
        ("A=`id`", {"A": "`id`"}),
        ("A=1\nA=2", {"A": "2"}),
        ("_A1=x", {"_A1": "x"}),
        ("lower_case=x", {"lower_case": "x"}),
        (
            "MLX_LAUNCH_CMD=uv run --project /opt/x srv launch",
            {"MLX_LAUNCH_CMD": "uv run --project /opt/x srv launch"},
        ),
    ],
)
def test_parse_config_text(text: str, expected: dict[str, str]) -> None:
    assert mlxctl.parse_config_text(text, "/c.env") == expected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("nonsense", 1),
        ("A=1\nB", 2),
        ("A=1\n\n# c\n=value", 4),
        ("1A=x", 1),
        ("A-B=x", 1),
        ("A B=x", 1),
        ("export", 1),
        ("A=1\nexport B", 2),
        ("$A=1", 1),
        ("A.B=1", 1),
    ],
)
def test_parse_config_text_refuses_with_line_number(text: str, line: int) -> None:
    with pytest.raises(MlxctlError, match=rf"^/c\.env:{line}: expected KEY=VALUE") as caught:
        mlxctl.parse_config_text(text, "/c.env")
    assert caught.value.message.startswith(f"/c.env:{line}:")


def test_config_file_path() -> None:
    assert mlxctl.config_file_path({"MLXCTL_CONFIG": "/c.env", "HOME": "/h"}) == "/c.env"
    assert (
        mlxctl.config_file_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == "/x/mlxctl/config.env"
    )
    assert mlxctl.config_file_path({"HOME": "/h"}) == "/h/.config/mlxctl/config.env"


# -- memory limit -------------------------------------------------------------------------------

GB = 1 << 30


@pytest.mark.parametrize(
    ("raw", "physical", "expected"),
    [
        ("90%", 100 * GB, 90 * GB),
        ("100%", 64 * GB, 64 * GB),
        ("50%", 1000, 500),
        ("12.5%", 800, 100),
        (" 90% ", 100, 90),
        ("1024", 1, 1024),
        (" 2048 ", 1, 2048),
        (str(200 * GB), 100 * GB, 200 * GB),
    ],
)
def test_parse_memory_limit(raw: str, physical: int, expected: int) -> None:
    assert mlxctl.parse_memory_limit(raw, physical) == expected


@pytest.mark.parametrize(
    "raw", ["", "%", "0%", "-5%", "101%", "abc", "abc%", "0", "-1", "10GB", "1.5", "ninety"]
)
def test_parse_memory_limit_refuses(raw: str) -> None:
    with pytest.raises(MlxctlError, match="MLX_MEMORY_LIMIT"):
        mlxctl.parse_memory_limit(raw, 100 * GB)


# -- registry schema and invariants (SPEC §5.1) -------------------------------------------------


def entry(model_id: str = "mlx-a", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "repo_id": "org/a",
        "model_id": model_id,
        "cache_path": "/m/a",
        "format": "mlx",
        "port": 8100,
    }
    base.update(fields)
    return base


def doc(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "generation": 3, "models": {e["model_id"]: e for e in entries}, **top}


def test_schema_errors_sound_registry() -> None:
    full = entry(
        source_path="/m/a",
        chat_template="/t.jinja",
        tool_call_parser="harmony",
        reasoning_parser="harmony",
        context_length=131072,
        max_output_tokens=65536,
        request_params={"reasoning_effort": "low"},
        optillm=True,
        server_args=["--trust-remote-code"],
        og_path="/og",
        og_offloaded_to="mini:/x",
        reservation={"pid": 5, "start_time": "1", "since": "t", "previous_port": None},
        withheld={"pid": 5, "start_time": "1"},
        unknown_field={"kept": True},
    )
    assert mlxctl.schema_errors(doc(full, extra_top="kept")) == []
    assert mlxctl.schema_errors({"models": {}}) == []
    assert mlxctl.schema_errors({}) == []
    assert mlxctl.schema_errors(doc(entry(repo_id=None, port=None))) == []
    for fmt in ("mlx", "hf", "gguf"):
        assert mlxctl.schema_errors(doc(entry(format=fmt))) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repo_id", 5),
        ("repo_id", ["org/a"]),
        ("model_id", 5),
        ("model_id", None),
        ("cache_path", None),
        ("cache_path", 5),
        ("format", 1),
        ("format", "exe"),
        ("format", None),
        ("port", "8100"),
        ("port", 8100.0),
        ("port", True),
        ("port", 0),
        ("port", 70000),
        ("port", -1),
        ("source_path", 1),
        ("chat_template", 1),
        ("tool_call_parser", ["x"]),
        ("reasoning_parser", {}),
        ("context_length", "131072"),
        ("context_length", 1.5),
        ("context_length", 0),
        ("context_length", -5),
        ("context_length", True),
        ("max_output_tokens", "x"),
        ("max_output_tokens", 0),
        ("request_params", []),
        ("request_params", "a=b"),
        ("optillm", "yes"),
        ("optillm", 1),
        ("server_args", "--trust-remote-code"),
        ("server_args", [1]),
        ("server_args", {"a": 1}),
        ("og_path", 1),
        ("og_offloaded_to", []),
        ("reservation", "x"),
        ("reservation", {"pid": "12"}),
        ("reservation", {}),
        ("withheld", 1),
        ("withheld", {"pid": None}),
    ],
)
def test_schema_errors_name_the_field(field: str, value: Any) -> None:
    problems = mlxctl.schema_errors({"version": 1, "models": {"mlx-a": entry(**{field: value})}})
    assert problems, f"{field}={value!r} must be refused"
    assert any(f"models.mlx-a.{field}" in p for p in problems), problems


@pytest.mark.parametrize("field", ["repo_id", "model_id", "cache_path", "format", "port"])
def test_schema_errors_required_fields(field: str) -> None:
    broken = entry()
    del broken[field]
    problems = mlxctl.schema_errors({"version": 1, "models": {"mlx-a": broken}})
    assert any(f"models.mlx-a.{field}" in p and "missing" in p for p in problems), problems


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([], "top level"),
        ("x", "top level"),
        (None, "top level"),
        ({"version": "1", "models": {}}, "version"),
        ({"version": True, "models": {}}, "version"),
        ({"version": 1.0, "models": {}}, "version"),
        ({"version": 1, "generation": "4", "models": {}}, "generation"),
        ({"version": 1, "generation": False, "models": {}}, "generation"),
        ({"version": 1, "models": []}, "models"),
        ({"version": 1, "models": "x"}, "models"),
        ({"version": 1, "models": {"mlx-a": "x"}}, "models.mlx-a"),
        ({"version": 1, "models": {"mlx-a": None}}, "models.mlx-a"),
        ({"version": 1, "models": {"mlx-a": [1]}}, "models.mlx-a"),
    ],
)
def test_schema_errors_top_level(data: Any, needle: str) -> None:
    problems = mlxctl.schema_errors(data)
    assert any(needle in p for p in problems), problems


def test_schema_errors_reports_every_problem() -> None:
    problems = mlxctl.schema_errors(doc(entry(port="x", format="exe", optillm="y")))
    assert len(problems) == 3


RANGES = (range(8100, 8120), range(8120, 8140))


def test_invariant_violations_none() -> None:
    models = doc(entry("mlx-a", port=8100), entry("mlx-b", port=8139), entry("mlx-c", port=None))
    assert mlxctl.invariant_violations(models["models"], RANGES) == set()
    assert mlxctl.invariant_violations({}, RANGES) == set()


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ({"mlx-a": entry("mlx-a", port=8100), "mlx-b": entry("mlx-b", port=8100)}, "8100"),
        ({"mlx-a": entry("mlx-b")}, "mlx-a"),
        ({"mlx-a": entry("mlx-a", port=8099)}, "8099"),
        ({"mlx-a": entry("mlx-a", port=8140)}, "8140"),
        ({"mlx-a": entry("mlx-a", port=22)}, "22"),
    ],
)
def test_invariant_violations_found(models: dict[str, Any], needle: str) -> None:
    found = mlxctl.invariant_violations(models, RANGES)
    assert len(found) == 1
    assert needle in next(iter(found))


def test_invariant_violations_are_comparable_across_writes() -> None:
    """A write may keep a violation already on disk but must not add one."""
    before = {"mlx-a": entry("mlx-a", port=9000), "mlx-b": entry("mlx-b", port=None)}
    after_unrelated = {"mlx-a": entry("mlx-a", port=9000), "mlx-b": entry("mlx-b", port=8101)}
    after_new = {"mlx-a": entry("mlx-a", port=9000), "mlx-b": entry("mlx-b", port=9001)}
    old = mlxctl.invariant_violations(before, RANGES)
    assert mlxctl.invariant_violations(after_unrelated, RANGES) - old == set()
    assert mlxctl.invariant_violations(after_new, RANGES) - old != set()


# -- gateway defaults (SPEC §7.2) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, (65536, 65536)),
        ({}, (65536, 65536)),
        ({"max_position_embeddings": 131072}, (131072, 65536)),
        ({"max_position_embeddings": 4096}, (4096, 4096)),
        ({"max_position_embeddings": 65536}, (65536, 65536)),
        ({"text_config": {"max_position_embeddings": 32768}}, (32768, 32768)),
        ({"text_config": {"max_position_embeddings": 262144}}, (262144, 65536)),
        (
            {"max_position_embeddings": 8192, "text_config": {"max_position_embeddings": 32768}},
            (8192, 8192),
        ),
        ({"max_position_embeddings": "131072"}, (65536, 65536)),
        ({"max_position_embeddings": True}, (65536, 65536)),
        ({"max_position_embeddings": 0}, (65536, 65536)),
        ({"max_position_embeddings": -1}, (65536, 65536)),
        ({"max_position_embeddings": 1.5e5}, (65536, 65536)),
        (
            {"max_position_embeddings": None, "text_config": {"max_position_embeddings": 2048}},
            (2048, 2048),
        ),
        ({"text_config": "x"}, (65536, 65536)),
        ({"text_config": {"max_position_embeddings": "x"}}, (65536, 65536)),
    ],
)
def test_context_defaults(config: dict[str, Any] | None, expected: tuple[int, int]) -> None:
    assert mlxctl.context_defaults(config) == expected


# -- set (SPEC §6) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("chat_template", "/t/chat.jinja", "/t/chat.jinja"),
        ("chat_template", "/my dir/t.jinja", "/my dir/t.jinja"),
        ("tool_call_parser", "harmony", "harmony"),
        ("reasoning_parser", "qwen3", "qwen3"),
        ("server_args", '["--trust-remote-code"]', ["--trust-remote-code"]),
        ("server_args", "--trust-remote-code", ["--trust-remote-code"]),
        ("server_args", "--a 1 --b 'two words'", ["--a", "1", "--b", "two words"]),
        ("server_args", '"--x --y"', ["--x", "--y"]),
        ("server_args", "[]", []),
        ("context_length", "131072", 131072),
        ("max_output_tokens", "4096", 4096),
        ("optillm", "true", True),
        ("optillm", "false", False),
        ("optillm", "on", True),
        ("optillm", "off", False),
        ("optillm", "1", True),
        ("optillm", "0", False),
        ("request_params.reasoning_effort", "low", {"reasoning_effort": "low"}),
        ("request_params.temperature", "0.2", {"temperature": 0.2}),
        ("request_params.top_k", "40", {"top_k": 40}),
        ("request_params.stream", "true", {"stream": True}),
        ("request_params.stop", '["</s>"]', {"stop": ["</s>"]}),
        ("request_params.extra_body", '{"a": 1}', {"extra_body": {"a": 1}}),
        ("request_params.note", '"quoted"', {"note": "quoted"}),
        ("request_params.note", "not json {", {"note": "not json {"}),
        ("request_params.x", "null", {"x": None}),
    ],
)
def test_apply_set(key: str, raw: str, expected: Any) -> None:
    target = entry()
    before = dict(target)
    mlxctl.apply_set(target, key, raw)
    field = key.split(".", 1)[0]
    assert target[field] == expected
    assert type(target[field]) is type(expected)
    others = {k: v for k, v in target.items() if k != field}
    assert others == {k: v for k, v in before.items() if k != field}


def test_apply_set_request_params_merge_and_remove() -> None:
    target = entry(request_params={"reasoning_effort": "low", "top_p": 0.9})
    mlxctl.apply_set(target, "request_params.temperature", "0.1")
    assert target["request_params"] == {"reasoning_effort": "low", "top_p": 0.9, "temperature": 0.1}
    mlxctl.apply_set(target, "request_params.reasoning_effort", "high")
    assert target["request_params"]["reasoning_effort"] == "high"
    mlxctl.apply_set(target, "request_params.top_p", "")
    assert target["request_params"] == {"reasoning_effort": "high", "temperature": 0.1}
    mlxctl.apply_set(target, "request_params.absent", "")
    assert target["request_params"] == {"reasoning_effort": "high", "temperature": 0.1}
    mlxctl.apply_set(target, "request_params.reasoning_effort", "")
    mlxctl.apply_set(target, "request_params.temperature", "")
    assert "request_params" not in target


@pytest.mark.parametrize(
    "key",
    [
        "chat_template",
        "tool_call_parser",
        "reasoning_parser",
        "server_args",
        "context_length",
        "max_output_tokens",
        "optillm",
    ],
)
def test_apply_set_empty_value_removes(key: str) -> None:
    target = entry(
        chat_template="/t",
        tool_call_parser="p",
        reasoning_parser="r",
        server_args=["--x"],
        context_length=10,
        max_output_tokens=5,
        optillm=True,
    )
    mlxctl.apply_set(target, key, "")
    assert key not in target
    mlxctl.apply_set(target, key, "")  # removing what is absent is fine
    assert key not in target


@pytest.mark.parametrize(
    ("key", "why"),
    [
        *(
            (key, f"^{key} cannot be set")
            for key in (
                "port",
                "model_id",
                "repo_id",
                "cache_path",
                "source_path",
                "format",
                "og_path",
                "og_offloaded_to",
                "reservation",
                "withheld",
                "unknown",
                "request_params",
                "",
            )
        ),
        *(
            (f"request_params.{name}", "would collide in litellm_params")
            for name in ("model", "api_base", "api_key", "max_tokens")
        ),
        *(
            (f"request_params.{name}", "invalid request_params key")
            for name in ("", "a-b", "a.b", "a;b", "$(id)", "a b", "1a", "a" * 65)
        ),
    ],
)
def test_apply_set_refuses_key(key: str, why: str) -> None:
    target = entry()
    before = dict(target)
    with pytest.raises(MlxctlError, match=why):
        mlxctl.apply_set(target, key, "8101")
    assert target == before


POSITIVE = "must be a positive integer"
ONE_LINE = "must be a non-empty single line"
ARGS = "must be a list of strings or a shell-style string"


@pytest.mark.parametrize(
    ("key", "raw", "why"),
    [
        ("context_length", "abc", POSITIVE),
        ("context_length", "0", POSITIVE),
        ("context_length", "-1", POSITIVE),
        ("context_length", "1.5", POSITIVE),
        ("context_length", "true", POSITIVE),
        ("context_length", '"4096"', POSITIVE),
        ("max_output_tokens", "[]", POSITIVE),
        ("max_output_tokens", "0", POSITIVE),
        ("optillm", "maybe", "expected 1/true/on or 0/false/off"),
        ("optillm", "2", "expected 1/true/on or 0/false/off"),
        ("server_args", "[1, 2]", ARGS),
        ("server_args", '{"a": 1}', ARGS),
        ("server_args", "5", ARGS),
        ("server_args", "'unclosed", "No closing quotation"),
        ("server_args", '["a\\nb"]', "must not contain newlines"),
        ("chat_template", "a\nb", ONE_LINE),
        ("chat_template", "   ", ONE_LINE),
        ("tool_call_parser", "x\0y", ONE_LINE),
        ("reasoning_parser", "\n", ONE_LINE),
    ],
)
def test_apply_set_refuses_value(key: str, raw: str, why: str) -> None:
    target = entry(context_length=10)
    before = dict(target)
    with pytest.raises(MlxctlError, match=f"^{key}.*{re.escape(why)}"):
        mlxctl.apply_set(target, key, raw)
    assert target == before


# -- assign-team (SPEC §10) ---------------------------------------------------------------------

M = mlxctl.TeamMember
TEAM10 = list(range(8100, 8110))


def test_plan_team_halves_and_size_order() -> None:
    members = [
        M("mlx-o-small", 1, True, None),
        M("mlx-o-big", 9, True, 8125),
        M("mlx-o-mid", 5, True, None),
        M("mlx-p-small", 2, False, 8100),
        M("mlx-p-big", 8, False, None),
    ]
    plan = mlxctl.plan_team(members, TEAM10)
    assert plan == {
        "mlx-o-big": 8100,
        "mlx-o-mid": 8101,
        "mlx-o-small": 8102,
        "mlx-p-big": 8105,
        "mlx-p-small": 8106,
    }


def test_plan_team_odd_team_gives_optillm_the_larger_half() -> None:
    team = [1, 2, 3, 4, 5]  # ceil(5/2) = 3 OptiLLM ports
    members = [M(f"mlx-p{i}", 10 - i, False, None) for i in range(2)]
    members += [M(f"mlx-o{i}", 10 - i, True, None) for i in range(3)]
    plan = mlxctl.plan_team(members, team)
    assert sorted(plan[f"mlx-o{i}"] for i in range(3)) == [1, 2, 3]
    assert sorted(plan[f"mlx-p{i}"] for i in range(2)) == [4, 5]


def test_plan_team_equal_sizes_tie_break_by_id() -> None:
    members = [M("mlx-b", 5, False, None), M("mlx-a", 5, False, None)]
    assert mlxctl.plan_team(members, [1, 2, 3, 4]) == {"mlx-a": 3, "mlx-b": 4}


def test_plan_team_spills_optillm_into_the_other_half() -> None:
    members = [M(f"mlx-o{i}", 100 - i, True, None) for i in range(7)]
    members.append(M("mlx-p", 1, False, None))
    plan = mlxctl.plan_team(members, TEAM10)
    assert [plan[f"mlx-o{i}"] for i in range(5)] == [8100, 8101, 8102, 8103, 8104]
    spilled = {plan["mlx-o5"], plan["mlx-o6"]}
    assert spilled <= set(range(8105, 8110))
    assert plan["mlx-p"] in range(8105, 8110)
    assert len(set(plan.values())) == len(plan)


def test_plan_team_spills_plain_into_the_optillm_half() -> None:
    members = [M(f"mlx-p{i}", 100 - i, False, None) for i in range(8)]
    members.append(M("mlx-o", 1, True, None))
    plan = mlxctl.plan_team(members, TEAM10)
    assert [plan[f"mlx-p{i}"] for i in range(5)] == [8105, 8106, 8107, 8108, 8109]
    assert plan["mlx-o"] == 8100
    assert {plan["mlx-p5"], plan["mlx-p6"], plan["mlx-p7"]} <= set(range(8101, 8105))
    assert len(set(plan.values())) == len(plan)


def test_plan_team_fills_every_port() -> None:
    members = [M(f"mlx-m{i}", i, i % 3 == 0, None) for i in range(10)]
    plan = mlxctl.plan_team(members, TEAM10)
    assert sorted(plan.values()) == TEAM10


def test_plan_team_too_many_models() -> None:
    members = [M(f"mlx-m{i}", i, False, None) for i in range(11)]
    with pytest.raises(MlxctlError, match="11 models"):
        mlxctl.plan_team(members, TEAM10)


def test_plan_team_empty() -> None:
    assert mlxctl.plan_team([], TEAM10) == {}


def simulate(moves: dict[str, tuple[int | None, int]], batches: list[list[str]]) -> None:
    """Execute the batches (stop every source of a batch, then start every target) and fail if a
    port is ever held by two models."""
    holder: dict[int, str] = {src: m for m, (src, _) in moves.items() if src is not None}
    assert sorted(itertools.chain.from_iterable(batches)) == sorted(moves)
    for batch in batches:
        for model_id in batch:
            source = moves[model_id][0]
            if source is not None:
                assert holder.pop(source) == model_id
        for model_id in batch:
            target = moves[model_id][1]
            assert target not in holder, f"{target} double-booked by {model_id}"
            holder[target] = model_id


@pytest.mark.parametrize(
    "moves",
    [
        {},
        {"a": (None, 1)},
        {"a": (1, 2)},
        {"a": (1, 2), "b": (2, 3)},
        {"a": (1, 2), "b": (2, 3), "c": (3, 4)},
        {"a": (None, 2), "b": (2, 3)},
        {"a": (1, 2), "b": (2, 1)},
        {"a": (1, 2), "b": (2, 3), "c": (3, 1)},
        {"a": (1, 2), "b": (2, 1), "c": (3, 4), "d": (None, 3)},
        {"a": (8120, 8100), "b": (8100, 8101), "c": (8101, 8120)},
        {"a": (5, 1), "b": (6, 2), "c": (None, 3)},
    ],
)
def test_order_moves_never_double_books(moves: dict[str, tuple[int | None, int]]) -> None:
    simulate(moves, mlxctl.order_moves(moves))


def test_order_moves_swap_is_one_batch() -> None:
    assert mlxctl.order_moves({"a": (1, 2), "b": (2, 1)}) == [["a", "b"]]


def test_order_moves_chain_goes_from_the_free_end() -> None:
    assert mlxctl.order_moves({"a": (1, 2), "b": (2, 3), "c": (3, 4)}) == [["c"], ["b"], ["a"]]


def test_order_moves_independent_moves_are_single_batches() -> None:
    batches = mlxctl.order_moves({"a": (1, 10), "b": (2, 20)})
    assert all(len(b) == 1 for b in batches)


# -- output helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("HF_TOKEN", "hf_secret", "****"),
        ("GATEWAY_API_KEY", "k", "****"),
        ("MY_SECRET", "s", "****"),
        ("DB_PASSWORD", "p", "****"),
        ("HF_TOKEN", None, None),
        ("HF_TOKEN", "", ""),
        ("MLX_HOST", "10.0.0.1", "10.0.0.1"),
        ("GATEWAY_ROOT", "/g", "/g"),
        ("MLX_LAUNCH_CMD", "srv launch", "srv launch"),
    ],
)
def test_mask_value(name: str, value: str | None, expected: str | None) -> None:
    assert mlxctl.mask_value(name, value) == expected


def test_mask_value_never_leaks_any_part() -> None:
    for name in ("HF_TOKEN", "X_KEY", "X_SECRET", "X_PASSWORD"):
        masked = mlxctl.mask_value(name, "hf_abcdefgh")
        assert masked is not None
        assert "abcd" not in masked


def test_format_table() -> None:
    text = mlxctl.format_table(
        ["PORT", "MODEL", "REPO"], [[8100, "mlx-a", None], [8101, "", "org/long-name"]]
    )
    assert text.splitlines() == [
        "PORT  MODEL  REPO",
        "8100  mlx-a  -",
        "8101  -      org/long-name",
    ]


def test_format_table_header_only_and_zero() -> None:
    assert mlxctl.format_table(["A", "B"], []) == "A  B"
    assert mlxctl.format_table(["A", "B"], [[0, False]]).splitlines()[1] == "0  False"


def test_format_table_no_trailing_spaces_and_two_space_columns() -> None:
    text = mlxctl.format_table(["LONGHEADER", "X"], [["a", None], ["bb", "c"]])
    for line in text.splitlines():
        assert line == line.rstrip()
    assert text.splitlines()[1].startswith("a" + " " * (len("LONGHEADER") - 1) + "  ")


@pytest.mark.parametrize(
    ("size", "expected"),
    [(None, None), (0, "0B"), (1023, "1023B"), (1024, "1.0KB"), (3 * GB, "3.0GB")],
)
def test_human_bytes(size: int | None, expected: str | None) -> None:
    assert mlxctl.human_bytes(size) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(None, None), (0, "0s"), (59.9, "59s"), (61, "1m1s"), (3661, "1h1m"), (90000, "1d1h")],
)
def test_human_duration(seconds: float | None, expected: str | None) -> None:
    assert mlxctl.human_duration(seconds) == expected


@pytest.mark.parametrize(
    ("handle", "stem"),
    [
        ("mlx-gpt-oss-20b-mxfp4-q4", "MLX_GPT_OSS_20B_MXFP4_Q4"),
        ("mlx-a", "MLX_A"),
    ],
)
def test_env_stem(handle: str, stem: str) -> None:
    assert mlxctl.env_stem(handle) == stem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("ON", True), (" yes ", True), ("0", False), ("off", False)],
)
def test_parse_bool_word(raw: str, expected: bool) -> None:
    assert mlxctl.parse_bool_word("X", raw) is expected


def test_parse_bool_word_refuses() -> None:
    with pytest.raises(MlxctlError, match="X="):
        mlxctl.parse_bool_word("X", "maybe")


def test_settings_constants_are_sane() -> None:
    assert math.isclose(mlxctl.LOCK_TIMEOUT, 30.0)
    assert mlxctl.EXIT_USAGE == 2
    assert mlxctl.EXIT_DRIFT == 3
    assert mlxctl.EXIT_SYNC == 4
    assert mlxctl.EXIT_INTERRUPTED == 130


def sync_of(restart: str | None, basis: list[str] | None, **files: str) -> dict[str, Any]:
    report = mlxctl.sync_report("changed", files={"router": "unchanged", "env": "unchanged"})
    report["files"].update(files)
    if restart is None:
        del report["restart"]
    else:
        report.update(restart=restart, restart_needed=restart == "required")
    if basis is not None:
        report["basis"] = basis
    return report


def test_merged_syncs_that_end_where_they_began_need_no_restart() -> None:
    """A move in route mode: the withholding sync takes the entry out, the last puts it back as
    it was; LiteLLM read the first state, which is the last (helper-8's finding, SPEC §17)."""
    merged = mlxctl.merge_syncs(
        [sync_of("not-needed", ["a", "b"], router="changed"), sync_of("optional", ["b", "a"])]
    )
    assert (merged["restart"], merged["restart_needed"]) == ("not-needed", False)
    assert merged["files"]["router"] == "changed"


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        (("not-needed", "optional"), "optional"),
        (("required", "not-needed"), "required"),
        (("optional", "required", "not-needed"), "required"),
        (("not-needed", "not-needed"), "not-needed"),
    ],
)
def test_merged_syncs_that_end_elsewhere_keep_the_strongest_verdict(
    verdicts: tuple[str, ...], expected: str
) -> None:
    bases = [[str(i), str(i + 1)] for i in range(len(verdicts))]
    merged = mlxctl.merge_syncs([sync_of(v, b) for v, b in zip(verdicts, bases)])
    assert (merged["restart"], merged["restart_needed"]) == (expected, expected == "required")


def test_merged_syncs_of_an_older_gateway_add_up_restart_needed() -> None:
    """A Mini before SPEC §17 reports restart_needed only, and no basis."""
    older = [sync_of(None, None), sync_of(None, None)]
    older[0]["restart_needed"] = True
    merged = mlxctl.merge_syncs(older)
    assert merged["restart_needed"] is True and "restart" not in merged
