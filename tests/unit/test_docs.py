"""The documentation keeps up with the code: its Python compiles, every setting is documented."""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from aioqueue.config import UNSUPPORTED_CELERY_SETTINGS, Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ("getting-started.md", "configuration.md", "testing.md", "tasks.md")

# A fenced block opened by ```python (possibly indented, as inside a list item).
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```", re.M | re.S
)
_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.M | re.S)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of a page, dedented."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group("code")))
        for m in _BLOCK.finditer(text)
    ]


@pytest.mark.parametrize("page", PAGES)
def test_page_has_python_examples(page: str) -> None:
    assert python_blocks(page), f"no ```python blocks found in docs/{page}"


@pytest.mark.parametrize(
    ("page", "line", "source"),
    [
        pytest.param(page, line, source, id=f"{page}:{line}")
        for page in PAGES
        for line, source in python_blocks(page)
    ],
)
def test_python_block_compiles(page: str, line: int, source: str) -> None:
    # Snippets meant for the asyncio REPL (python -m asyncio) use top-level await.
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | ast.PyCF_ONLY_AST
    try:
        compile(source, f"docs/{page}:{line}", "exec", flags=flags)
    except SyntaxError as exc:
        pytest.fail(f"docs/{page}, block at line {line}: {exc}")


def documented_names(page: str) -> set[str]:
    """Every identifier inside an inline code span of the page's prose."""
    prose = _FENCE.sub("", (DOCS / page).read_text(encoding="utf-8"))
    return {name for span in _CODE_SPAN.findall(prose) for name in _NAME.findall(span)}


def test_every_setting_is_in_the_configuration_reference() -> None:
    documented = documented_names("configuration.md")
    missing = [f.name for f in fields(Settings) if f.name not in documented]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_every_unsupported_celery_setting_is_listed() -> None:
    documented = documented_names("configuration.md")
    missing = sorted(UNSUPPORTED_CELERY_SETTINGS - documented)
    assert not missing, f"unsupported Celery settings missing from docs/configuration.md: {missing}"
