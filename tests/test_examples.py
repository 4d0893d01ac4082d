"""Every example runs on a tiny budget (--smoke), so that none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))
#: The files each example writes in its ``--out`` folder; an example not named here takes no ``--out`` and writes nothing.
OUTPUTS = {"custom_generator": ["subclasses.png"], "fashion_mnist_hierarchy": ["accuracy_curves.png"], "lightning_digits": ["checkpoints", "logs"]}


def test_there_are_examples() -> None:
    assert EXAMPLES
    assert set(OUTPUTS) <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_with_smoke(script: Path, tmp_path: Path) -> None:
    """Each example runs with ``--smoke``, writes its files in ``--out`` only, and says where they are."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MPLBACKEND": "Agg"}
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    outputs = OUTPUTS.get(script.stem, [])
    command = [sys.executable, str(script), "--smoke", *(["--out", str(out)] if outputs else [])]
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"
    assert not list(cwd.iterdir()), f"the example wrote in the working directory: {sorted(p.name for p in cwd.iterdir())}"
    if outputs:
        assert sorted(p.name for p in out.iterdir()) == sorted(outputs)
        assert str(out) in result.stdout, f"the example did not print its --out folder:\n{result.stdout}"
