"""The documentation runs: every ```python block of README.md, docs/*.md and docs/methods/*.md, and every signature
that docs/api.md states, checked against the code.

Each Markdown file's blocks run in order in one namespace (a block may use what an earlier block of
the same file defined), in a fresh temporary working directory, with torch's random state and the
strategy registry restored afterwards. A block is skipped when the last non-blank line before its
fence is a marker comment:

- ``<!-- not-run -->``: intentionally not runnable (e.g. it needs the reader's own model or data).
- ``<!-- signature -->``: a signature, not run but compared with ``inspect.signature`` of the
  object it names (``MetaAuxWrapper.loss(...)``, ``auxlab.engines.get_engine(...)``).

A failing block's traceback names the Markdown file and line. Every public method of the three
public classes must have a ``<!-- signature -->`` block in docs/api.md.
"""

from __future__ import annotations

import importlib
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
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "methods").glob("*.md")])
NOT_RUN = "<!-- not-run -->"
SIGNATURE = "<!-- signature -->"
#: Where a signature's first name is looked up when it does not start with ``auxlab.``.
SIGNATURE_MODULES = ("auxlab", "auxlab.data", "auxlab.generators", "auxlab.weighting", "auxlab.engines")

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
        marker = previous if previous in (NOT_RUN, SIGNATURE) else None
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


# ------------------------------------------------------------------------------ signatures in api.md
def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    if parts[0] == "auxlab":
        for split in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
            return obj
    for module_name in SIGNATURE_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, parts[0]):
            obj = getattr(module, parts[0])
            for attribute in parts[1:]:
                obj = getattr(obj, attribute)
            return obj
    raise LookupError(f"{dotted!r} is not found in {SIGNATURE_MODULES}")


def _annotation(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def live_signature(dotted: str) -> str:
    """``name(params) -> return`` of the object, as the source code writes it (``self`` left out)."""
    obj = _resolve(dotted)
    signature = inspect.signature(obj)
    parts: list[str] = []
    star_written = False
    params = list(signature.parameters.values())
    if params and params[0].name == "self" and not inspect.isclass(obj):
        params = params[1:]
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_written:
            parts.append("*")
            star_written = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star_written = star_written or p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (p is params[-1] or params[params.index(p) + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    result = f"{dotted}({', '.join(parts)})"
    if not inspect.isclass(obj) and signature.return_annotation is not signature.empty:
        result += f" -> {_annotation(signature.return_annotation)}"
    return result


def _normalise(signature: str) -> str:
    """Whitespace, trailing commas and quote style do not count."""
    text = re.sub(r"\s+", "", signature.replace('"', "'"))
    return text.replace(",)", ")")


def _signature_blocks() -> list[tuple[str, Block]]:
    path = ROOT / "docs" / "api.md"
    if not path.exists():
        return []
    return [(_relative(path), b) for b in python_blocks(path.read_text(encoding="utf-8")) if b.marker == SIGNATURE]


SIGNATURE_BLOCKS = _signature_blocks()


@pytest.mark.parametrize(("path", "block"), SIGNATURE_BLOCKS, ids=[b.code.split("(", 1)[0].strip() for _, b in SIGNATURE_BLOCKS])
def test_documented_signature_matches_the_code(path: str, block: Block) -> None:
    documented = block.code.strip()
    name = documented.split("(", 1)[0].strip()
    assert _normalise(documented) == _normalise(live_signature(name)), (
        f"{path}:{block.line} documents\n  {documented}\nbut the code has\n  {live_signature(name)}"
    )


def test_every_public_method_of_the_public_classes_has_a_documented_signature() -> None:
    documented = {b.code.split("(", 1)[0].strip() for _, b in SIGNATURE_BLOCKS}
    missing = []
    for class_name in ("MetaAuxWrapper", "AuxLabelGenerator", "HierarchyMask"):
        cls = getattr(auxlab, class_name)
        if class_name not in documented:
            missing.append(class_name)
        for attribute, value in vars(cls).items():
            # a class held as a class attribute (a strategy's ``learner``) is a declaration, documented as such
            if attribute.startswith("_") or isinstance(value, (property, type)) or not callable(getattr(cls, attribute)):
                continue
            if f"{class_name}.{attribute}" not in documented:
                missing.append(f"{class_name}.{attribute}")
    assert not missing, f"docs/api.md has no <!-- signature --> block for {missing}"
