"""Property tests of the three gateway renderers (SPEC §7): random foreign content is preserved
byte for byte, the result parses, and rendering is idempotent."""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlxctl as m

IDS = [f"mlx-model-{i}" for i in range(6)]
SAFE = st.text(alphabet=string.ascii_letters + string.digits + " _-.,:/", min_size=0, max_size=20)
NAME = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)


@st.composite
def exports(draw: st.DrawFn) -> m.ExportSet:
    chosen = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=4))
    ports = draw(
        st.lists(st.integers(8100, 8139), unique=True, min_size=len(chosen), max_size=len(chosen))
    )
    models = tuple(
        m.ExportModel(
            handle,
            port,
            draw(st.integers(1, 200_000)),
            draw(st.integers(1, 65536)),
            draw(
                st.dictionaries(
                    st.sampled_from(["reasoning_effort", "temperature", "top_p"]),
                    st.one_of(SAFE, st.integers(0, 9), st.booleans()),
                    max_size=2,
                )
            ),
        )
        for handle, port in zip(chosen, ports)
    )
    return m.ExportSet(draw(st.integers(0, 10**6)), "127.0.0.1", tuple(IDS), models)


@st.composite
def foreign_router(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A hand-written router.yaml: comments, foreign entries, other sections."""
    indent = draw(st.sampled_from([0, 2, 4]))
    pad = " " * indent
    parts = [f"# {draw(SAFE)}\n", "model_list:\n"]
    foreign: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        name = "alias-" + draw(NAME)
        entry = (
            f"{pad}- model_name: {name}  # {draw(SAFE)}\n"
            f"{pad}  litellm_params:\n"
            f"{pad}    model: openai/{draw(NAME)}\n"
            f"{pad}    api_base: {json.dumps(draw(SAFE))}\n"
        )
        if draw(st.booleans()):
            entry += f"{pad}    api_key: os.environ/MLX_{m.env_stem(draw(st.sampled_from(IDS)))}_API_KEY\n"
        parts.append(entry)
        foreign.append(entry)
        if draw(st.booleans()):
            comment = f"{pad}# {draw(SAFE)}\n"
            parts.append(comment)
            foreign.append(comment)
    tail = f"router_settings:\n  num_retries: {draw(st.integers(0, 5))}\nlitellm_settings:\n  drop_params: true\n"
    parts.append(tail)
    foreign.append(tail)
    return "".join(parts), foreign


@st.composite
def foreign_env(draw: st.DrawFn) -> str:
    lines = [f"FOO_{i}={draw(SAFE)}\n" for i in range(draw(st.integers(0, 5)))]
    lines += [f"# {draw(SAFE)}\n" for _ in range(draw(st.integers(0, 2)))]
    draw(st.randoms()).shuffle(lines)
    return "".join(lines)


@st.composite
def foreign_handles(draw: st.DrawFn) -> str:
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        rows.append(
            draw(
                st.sampled_from(
                    [
                        json.dumps({"handle": "other-" + draw(NAME), "kind": "model"}) + "\n",
                        "not json at all " + draw(SAFE) + "\n",
                        "\n",
                        "{broken\n",
                    ]
                )
            )
        )
    return "".join(rows)


def render(
    router: str | None, env: str | None, handles: str | None, export: m.ExportSet, route: bool
) -> m.GatewayRender:
    return m.render_gateway(
        router,
        env,
        handles,
        export,
        route_via_optillm=route,
        remembered_flag="-",
        optillm_api_base="http://127.0.0.1:4020/v1",
    )


PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(foreign_router(), foreign_env(), foreign_handles(), exports(), st.booleans())
def test_foreign_bytes_survive_and_results_parse(
    router: tuple[str, list[str]], env: str, handles: str, export: m.ExportSet, route: bool
) -> None:
    text, foreign = router
    out = render(text, env, handles, export, route)
    for chunk in foreign:
        assert chunk in out.router
    assert out.env.startswith(env if env.endswith("\n") or not env else env + "\n")
    kept = [line for line in handles.splitlines(keepends=True)]
    new_lines = out.handles.splitlines(keepends=True)
    assert [line for line in new_lines if line in kept] == kept
    parsed = yaml.safe_load(out.router)
    names = [e["model_name"] for e in parsed["model_list"] or []]
    for model in export.models:
        assert names.count(model.handle) == 1
        assert names.count(f"router-{model.handle}") == (1 if route else 0)
    managed = [json.loads(line) for line in new_lines if line not in kept]
    assert [(r["handle"], r["endpoint_ref"]) for r in managed] == [
        (x.handle, f"ep_mlx_slot_{x.port}") for x in sorted(export.models, key=lambda x: x.port)
    ]


@PROPS
@given(foreign_router(), foreign_env(), foreign_handles(), exports(), exports(), st.booleans())
def test_rendering_is_idempotent(
    router: tuple[str, list[str]],
    env: str,
    handles: str,
    first: m.ExportSet,
    second: m.ExportSet,
    route: bool,
) -> None:
    one = render(router[0], env, handles, first, route)
    two = render(one.router, one.env, one.handles, second, route)
    three = render(two.router, two.env, two.handles, second, route)
    assert (three.router, three.env, three.handles) == (two.router, two.env, two.handles)
    assert not three.restart_needed
    for chunk in router[1]:
        assert chunk in two.router


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("model_list: []\n", "flow-style model_list"),
        ("model_list: [{model_name: a}]\n", "flow-style model_list"),
        ("model_list:\n  foo: bar\n", "model_list is not a block list"),
        ("model_list:\n  # BEGIN MLXCTL AUTO\n- model_name: x\n", "unbalanced"),
        ("model_list:\n  - model_name: a\n    litellm_params: {model: x\n", "does not parse"),
        ("model_list:\n# END MLXCTL AUTO\n# BEGIN MLXCTL AUTO\n", "unbalanced"),
        (
            "model_list:\n# BEGIN MLXCTL AUTO\n# BEGIN MLXCTL AUTO\n# END MLXCTL AUTO\n",
            "unbalanced",
        ),
        ("- just a list\n", "top level is not a mapping"),
    ],
)
def test_unsupported_router_yaml_is_refused(text: str, why: str) -> None:
    export = m.ExportSet(1, "127.0.0.1", ("mlx-a",), (m.ExportModel("mlx-a", 8100, 10, 10, {}),))
    with pytest.raises(m.MlxctlError, match=f"^router.yaml: .*{why}.*; nothing was written$"):
        render(text, None, None, export, True)


@pytest.mark.parametrize(
    ("router", "expected_prefix"),
    [
        (None, "model_list:\n# BEGIN MLXCTL AUTO\n"),
        (
            "router_settings:\n  a: 1",
            "router_settings:\n  a: 1\nmodel_list:\n# BEGIN MLXCTL AUTO\n",
        ),
        ("model_list:\n", "model_list:\n# BEGIN MLXCTL AUTO\n"),
        (
            "model_list:\n    - model_name: x\n      litellm_params: {model: y}\n",
            "model_list:\n    # BEGIN MLXCTL AUTO\n    - model_name: mlx-a\n",
        ),
    ],
)
def test_block_placement(router: str | None, expected_prefix: str) -> None:
    export = m.ExportSet(1, "127.0.0.1", ("mlx-a",), (m.ExportModel("mlx-a", 8100, 10, 10, {}),))
    out = render(router, None, None, export, False)
    assert out.router.startswith(expected_prefix)


def test_crlf_env_and_missing_final_newline() -> None:
    export = m.ExportSet(3, "127.0.0.1", ("mlx-a",), (m.ExportModel("mlx-a", 8100, 10, 10, {}),))
    out = render(None, "A=1\r\nB=2", None, export, False)
    assert out.env.startswith("A=1\r\nB=2\r\n# BEGIN MLXCTL AUTO\r\n")
    assert "\n" not in out.env.replace("\r\n", "")
    assert "MLX_MLX_A_API_BASE=http://127.0.0.1:8100/v1\r\n" in out.env
    state = m.parse_env_state(out.env)
    assert state == m.EnvState(3, "-")


def test_dangling_alias_keeps_its_variables() -> None:
    router = (
        "model_list:\n- model_name: main\n  litellm_params:\n"
        "    model: os.environ/MLX_MLX_A_MODEL\n    api_base: os.environ/MLX_MLX_A_API_BASE\n"
        "    api_key: os.environ/MLX_MLX_A_API_KEY\n"
    )
    loaded = m.ExportSet(1, "127.0.0.1", ("mlx-a",), (m.ExportModel("mlx-a", 8100, 10, 10, {}),))
    first = render(router, None, None, loaded, False)
    gone = m.ExportSet(2, "127.0.0.1", ("mlx-a",), ())
    out = render(first.router, first.env, first.handles, gone, False)
    assert out.dangling_refs == ("main",)
    assert "MLX_MLX_A_API_BASE=http://127.0.0.1:9/v1" in out.env
    assert "MLX_MLX_A_MODEL=openai/mlx-a" in out.env
    assert out.env_union == out.env  # nothing dropped: the variables stay, at the dead port
    assert out.restart_needed


def test_union_keeps_dropped_variables_for_the_crash_safe_order() -> None:
    loaded = m.ExportSet(
        1,
        "127.0.0.1",
        ("mlx-a", "mlx-b"),
        (m.ExportModel("mlx-a", 8100, 10, 10, {}), m.ExportModel("mlx-b", 8101, 10, 10, {})),
    )
    first = render(None, None, None, loaded, False)
    only_b = m.ExportSet(
        2, "127.0.0.1", ("mlx-a", "mlx-b"), (m.ExportModel("mlx-b", 8102, 10, 10, {}),)
    )
    out = render(first.router, first.env, first.handles, only_b, False)
    assert "MLX_MLX_A_API_BASE" not in out.env
    assert "MLX_MLX_A_API_BASE=http://127.0.0.1:8100/v1" in out.env_union
    assert "MLX_MLX_B_API_BASE=http://127.0.0.1:8102/v1" in out.env_union  # new values win


STRAY_BLOCKS = [
    # the block after model_list, under another top-level key
    "model_list:\n  - model_name: x\n    litellm_params: {model: y}\n"
    "router_settings:\n  # BEGIN MLXCTL AUTO\n  # END MLXCTL AUTO\n  a: 1\n",
    # the block at the end of the file, after another section
    "model_list:\n  - model_name: x\n    litellm_params: {model: y}\n"
    "litellm_settings:\n  b: 2\n# BEGIN MLXCTL AUTO\n# END MLXCTL AUTO\n",
]


@pytest.mark.parametrize("text", STRAY_BLOCKS)
@pytest.mark.parametrize("models", [(), (m.ExportModel("mlx-a", 8100, 10, 10, {}),)])
def test_markers_after_model_list_are_refused(text: str, models: tuple[m.ExportModel, ...]) -> None:
    """Issue 8: a precedence slip let markers placed after model_list through, and with an empty
    export the stray block was accepted silently; they must be refused, whatever is exported."""
    export = m.ExportSet(1, "127.0.0.1", ("mlx-a",), models)
    with pytest.raises(m.MlxctlError, match="markers outside model_list"):
        render(text, None, None, export, False)
