"""How auxlab.experiments is laid out: argparse in the command-line module only, ConfigError from its own module, and no
branch on a strategy's name or class anywhere (what a strategy needs is asked of its class)."""

from __future__ import annotations

import ast
from pathlib import Path

import auxlab
import auxlab.generators
from auxlab.experiments import cli, config
from auxlab.generators import GENERATORS

PACKAGE = Path(auxlab.__file__).parent / "experiments"
MODULES = sorted(PACKAGE.glob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_argparse_lives_in_the_command_line_module_only() -> None:
    users = [path.name for path in MODULES if "argparse" in imported_modules(ast.parse(path.read_text(encoding="utf-8")))]
    assert users == ["cli.py"]
    # parse_args and build_parser, which lived in config.py, are still importable from there.
    assert config.parse_args is cli.parse_args and config.build_parser is cli.build_parser


def test_config_error_is_imported_from_its_own_module() -> None:
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(alias.name == "ConfigError" for alias in node.names):
                assert node.module == "auxlab.experiments.errors", f"{path.name} imports ConfigError from {node.module}"
    strategies = ast.parse((PACKAGE / "strategies.py").read_text(encoding="utf-8"))
    assert "auxlab.experiments.config" not in imported_modules(strategies)  # no import cycle with config.py


def test_no_module_branches_on_a_strategy_name_or_class() -> None:
    names = set(GENERATORS)
    classes = {name for name in auxlab.generators.__all__ if name not in ("GENERATORS", "AuxLabelGenerator")}
    found = []
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):  # generator == "maxl", "maxl" in strategies
                for operand in [node.left, *node.comparators]:
                    if isinstance(operand, ast.Constant) and operand.value in names:
                        found.append(f"{path.name}:{node.lineno} compares with {operand.value!r}")
            elif isinstance(node, ast.Name) and node.id in classes:  # isinstance(generator, PolicyLabels)
                found.append(f"{path.name}:{node.lineno} names {node.id}")
            elif isinstance(node, ast.alias) and node.name in classes:
                found.append(f"{path.name} imports {node.name}")
    assert not found, found
