"""The documentation's code runs: python blocks of the guide pages, and docstring examples.

A ```python block preceded by a ``<!-- skip -->`` line is not run. The blocks of one page
run in order in one namespace, so a page may build on its earlier blocks.
"""

import doctest
import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Pages whose python blocks must run (the guide pages; reference pages hold no code).
PAGES = [
    "index.md",
    "quickstart.md",
    "concepts.md",
    "migration.md",
    "tutorials/sinusoid.md",
    "tutorials/omniglot.md",
    "tutorials/transformer.md",
]

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SKIP = "<!-- skip -->"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block not marked with ``<!-- skip -->``."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == _SKIP:
            continue
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_pages_exist_and_have_code():
    for page in PAGES:
        assert python_blocks((DOCS / page).read_text()), f"{page} has no python block"


def test_skip_marker_is_honoured():
    text = "a\n<!-- skip -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n"
    assert [code for _, code in python_blocks(text)] == ["x = 1\n"]


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, capsys):
    path = DOCS / page
    namespace = {"__name__": f"docs_{page.replace('/', '_').replace('.md', '')}"}
    for line, code in python_blocks(path.read_text()):
        try:
            exec(compile(code, f"{path}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"{page}, block at line {line} failed: {error!r}") from error


def _modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    if hasattr(root, "__path__"):
        names += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
    return names


DOCTEST_MODULES = sorted(
    {
        name
        for package in (
            "paddlefsl.metaopt",
            "paddlefsl.functional",
            "paddlefsl.ops",
            "paddlefsl.models",
            "paddlefsl.train",
        )
        for name in _modules(package)
    }
)


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
        )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
