"""The documentation runs: every ```python block of README.md and of every Markdown page under docs/
(the pages of the MkDocs site), and the docstrings that the generated API reference shows are there.

Each Markdown file's blocks run in order in one namespace (a block may use what an earlier block of
the same file defined), in a fresh temporary working directory, with torch's random state and the
strategy registry restored afterwards. A block is skipped when the last non-blank line before its
fence is the marker comment ``<!-- not-run -->``: intentionally not runnable (e.g. it needs the
reader's own model or data, or a long run).

A failing block's traceback names the Markdown file and line. The API reference (docs/api/*.md) is
generated from the docstrings by mkdocstrings, so every public method and property of the three
public classes must have a docstring.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import auxlab
from auxlab.generators import GENERATORS
from auxlab.generators.sla import TRANSFORMATIONS
from auxlab.weighting import WEIGHTINGS

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
NOT_RUN = "<!-- not-run -->"

_FENCE_OPEN = re.compile(r"^(\s*)```+\s*python\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```+\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: its code, the Markdown line of its first code line, its marker."""

    code: str
    line: int
    marker: str | None


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of a Markdown text, with the marker comment just before it (if any)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opened = _FENCE_OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = previous if previous == NOT_RUN else None
        indent, start, body = len(opened.group(1)), i + 1, []
        i += 1
        while i < len(lines) and not _FENCE_CLOSE.match(lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"the ```python block opened on line {start} is never closed")
        blocks.append(Block("\n".join(body) + "\n", start + 1, marker))
        i += 1
    return blocks


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------ the parser itself
def test_parser_finds_blocks_markers_and_lines() -> None:
    lines = [
        "# Title",                 # 1
        "```python",               # 2
        "a = 1",                   # 3
        "```",                     # 4
        "<!-- not-run -->",        # 5
        "",                        # 6
        "```python",               # 7
        "model = MyClassifier()",  # 8
        "```",                     # 9
        "- item:",                 # 10
        "  ```python",             # 11
        "  if a:",                 # 12
        "      b = 2",             # 13
        "  ```",                   # 14
        "```text",                 # 15
        "not python",              # 16
        "```",                     # 17
    ]
    text = "\n".join(lines)
    blocks = python_blocks(text)
    assert [(b.line, b.marker) for b in blocks] == [(3, None), (8, NOT_RUN), (12, None)]
    assert blocks[2].code == "if a:\n    b = 2\n"
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n")


# ------------------------------------------------------------------------------ the blocks run
@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A temporary working directory; torch's RNG, default dtype, thread count and the registries
    (strategies, weightings, SLA transformations) restored afterwards. One thread: the snippets are tiny, and threads only add overhead."""
    monkeypatch.chdir(tmp_path)
    registry, weightings, transformations = dict(GENERATORS), dict(WEIGHTINGS), dict(TRANSFORMATIONS)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield tmp_path
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        GENERATORS.clear()
        GENERATORS.update(registry)
        WEIGHTINGS.clear()
        WEIGHTINGS.update(weightings)
        TRANSFORMATIONS.clear()
        TRANSFORMATIONS.update(transformations)


@pytest.mark.parametrize("path", DOC_FILES, ids=_relative)
def test_code_blocks_run(path: Path, isolated: Path) -> None:
    if not path.exists():
        pytest.skip(f"{_relative(path)} does not exist")
    runnable = [b for b in python_blocks(path.read_text(encoding="utf-8")) if b.marker is None]
    if not runnable:
        pytest.skip(f"{_relative(path)} has no runnable ```python block")
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for block in runnable:
        # Pad with blank lines so that a traceback gives the line number in the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - running the docs is the point


# ------------------------------------------------------------------------------ docstrings of the reference
PUBLIC_CLASSES = ("MetaAuxWrapper", "AuxLabelGenerator", "HierarchyMask")


def public_members(cls: type) -> dict[str, Any]:
    """The public methods and properties that ``cls`` itself defines (what its reference page lists), by name."""
    members = {}
    for attribute, value in vars(cls).items():
        # a class held as a class attribute (a strategy's ``learner``) is a declaration, not a method
        if attribute.startswith("_") or isinstance(value, type):
            continue
        if isinstance(value, property):
            members[attribute] = value.fget
        elif isinstance(value, (classmethod, staticmethod)):
            members[attribute] = value.__func__
        elif callable(value):
            members[attribute] = value
    return members


def test_public_members_are_found() -> None:
    members = public_members(auxlab.MetaAuxWrapper)
    assert {"loss", "meta_step", "step", "engine", "meta_learner"} <= set(members)
    assert {"uniform", "from_fine_to_coarse", "softmax", "psi"} <= set(public_members(auxlab.HierarchyMask))
    assert {"forward", "from_wrapper", "learns", "one_hot"} <= set(public_members(auxlab.AuxLabelGenerator))
    assert "learner" not in public_members(auxlab.AuxLabelGenerator)


@pytest.mark.parametrize("class_name", PUBLIC_CLASSES)
def test_every_public_method_and_property_has_a_docstring(class_name: str) -> None:
    cls = getattr(auxlab, class_name)
    assert (cls.__doc__ or "").strip(), f"auxlab.{class_name} has no docstring"
    missing = [name for name, function in public_members(cls).items() if not (getattr(function, "__doc__", None) or "").strip()]
    assert not missing, f"the generated API reference shows no documentation for auxlab.{class_name}.{missing}: give each a docstring"


def test_the_argument_table_of_getting_started_lists_every_argument() -> None:
    """docs/getting-started.md summarises the constructor in a table; it must name every argument, in order."""
    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    section = text.split("\n## Arguments\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    arguments = [name for name in inspect.signature(auxlab.MetaAuxWrapper.__init__).parameters if name not in ("self", "model")]
    assert documented == arguments, f"docs/getting-started.md's argument table has {documented} but MetaAuxWrapper takes {arguments}"
