"""Rules the test suite keeps, checked on its own source with `ast` (nothing is run):

- every `pytest.raises` names the error it expects with `match=` (a bare one also passes for the
  wrong error: any MlxctlError, any ValueError);
- no assertion that cannot fail: a constant, or a comparison of an expression with itself;
- the shared helpers live once, in tests/helpers.py: no test file defines its own copy, and no
  test file imports from another;
- a test of a test fixture (not of mlxctl) is marked `fixture_selftest`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TESTS

SUITE = sorted(p for p in TESTS.rglob("*.py") if "fixtures" not in p.relative_to(TESTS).parts)
TEST_FILES = [p for p in SUITE if p.name.startswith("test_")]
# the modules whose tests exercise a fixture rather than mlxctl
FIXTURE_SELFTESTS = {"test_fake_hub.py", "test_sshd_fixture.py", "test_standin_server.py"}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(TESTS.parent)}:{getattr(node, 'lineno', '?')}"


def raises_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.raises":
            yield node


def futile_asserts(tree: ast.AST) -> Iterator[tuple[ast.Assert, str]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        test = node.test
        if isinstance(test, ast.Constant):
            yield node, f"asserts the constant {test.value!r}"
        elif isinstance(test, ast.Compare):
            sides = [ast.dump(side) for side in (test.left, *test.comparators)]
            if len(set(sides)) < len(sides):
                yield node, f"compares an expression with itself: {ast.unparse(test)}"


def top_level_functions(tree: ast.Module) -> set[str]:
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def marker_names(tree: ast.Module) -> set[str]:
    """The markers of a module-level `pytestmark = pytest.mark.x` (or a list of them)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            values = (
                node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            )
            return {ast.unparse(v).removeprefix("pytest.mark.") for v in values}
    return set()


@pytest.mark.parametrize("path", SUITE, ids=lambda p: p.name)
def test_every_pytest_raises_names_its_error(path: Path) -> None:
    bare = [
        where(path, call)
        for call in raises_calls(parsed(path))
        if not any(keyword.arg == "match" for keyword in call.keywords)
    ]
    assert bare == [], "pytest.raises without match= (it also passes for the wrong error)"


@pytest.mark.parametrize("path", SUITE, ids=lambda p: p.name)
def test_no_assertion_that_cannot_fail(path: Path) -> None:
    futile = [f"{where(path, node)}: {why}" for node, why in futile_asserts(parsed(path))]
    assert futile == []


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_helpers_are_not_copied_and_tests_not_imported(path: Path) -> None:
    tree = parsed(path)
    shared = top_level_functions(parsed(TESTS / "helpers.py"))
    copies = sorted(top_level_functions(tree) & shared)
    assert copies == [], f"{path.name} defines its own copy of tests/helpers.py's {copies}"
    from_tests = [
        where(path, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_")
    ]
    assert from_tests == [], "a shared function belongs in tests/helpers.py"


@pytest.mark.parametrize("name", sorted(FIXTURE_SELFTESTS))
def test_fixture_self_tests_are_marked(name: str) -> None:
    assert "fixture_selftest" in marker_names(parsed(TESTS / name))


# -- the checks above catch what they are meant to (and only that) -------------------------------


def test_the_checks_see_what_they_look_for() -> None:
    tree = ast.parse(
        "import pytest\n"
        "def test_x(a):\n"
        "    with pytest.raises(ValueError):\n"
        "        pass\n"
        "    with pytest.raises(ValueError, match='m'):\n"
        "        pass\n"
        "    assert True\n"
        "    assert f(a) == f(a)\n"
        "    assert 1 < a < a\n"
        "    assert f(a) == f(b)\n"
        "    assert a\n"
    )
    calls = list(raises_calls(tree))
    assert [any(k.arg == "match" for k in c.keywords) for c in calls] == [False, True]
    assert [node.lineno for node, _ in futile_asserts(tree)] == [7, 8, 9]
    marks = ast.parse(
        "import pytest\npytestmark = [pytest.mark.real, pytest.mark.fixture_selftest]"
    )
    assert marker_names(marks) == {"real", "fixture_selftest"}
    assert marker_names(ast.parse("pytestmark = pytest.mark.real")) == {"real"}
    assert marker_names(ast.parse("x = 1")) == set()
