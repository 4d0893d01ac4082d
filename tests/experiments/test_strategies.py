"""Strategies ``generator[+weighting]``: parsing, the error messages, what a strategy's runs need."""

from __future__ import annotations

import re

import pytest

from auxlab.experiments import ConfigError, parse_args
from auxlab.experiments.strategies import Strategy


def test_strategy_syntax() -> None:
    config = parse_args(["--strategies", "single,maxl,human+gcs,kmeans+maoal,random+uncertainty,sla,rl,kmeans+constant"])
    assert config.strategies == ("single", "maxl", "human+gcs", "kmeans+maoal", "random+uncertainty", "sla", "rl", "kmeans+constant")
    parsed = [Strategy.parse(s) for s in config.strategies]
    assert [(s.generator, s.weighting) for s in parsed] == [
        ("single", "constant"), ("maxl", "constant"), ("human", "gcs"), ("kmeans", "maoal"), ("random", "uncertainty"),
        ("sla", "constant"), ("rl", "constant"), ("kmeans", "constant"),
    ]
    # What a run needs is read from the classes: maoal's and rl's meta steps learn from a development split.
    assert [s.needs_dev_split for s in parsed] == [False, False, False, True, False, False, True, False]
    assert [s.has_label_diagnostics for s in parsed] == [False, True, True, True, True, False, True, True]
    assert Strategy.parse("sla").psi((5, 5, 2)) == (4, 4, 4) and Strategy.parse("kmeans+gcs").psi((5, 5, 2)) == (5, 5, 2)
    kwargs = parse_args(["--weighting-kwargs", '{"gcs": {"mode": "scale"}}']).weighting_kwargs
    assert kwargs == {"gcs": {"mode": "scale"}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "single,kmeans+gsc"], ("strategies has 'kmeans+gsc' with unknown weighting 'gsc' (did you mean 'gcs'?); "
                                                 "write generator+weighting with a weighting among constant, gcs, maoal, uncertainty")),
        (["--strategies", "single+gcs"], "strategies has 'single+gcs', but 'single' trains without an auxiliary loss"),
        (["--strategies", "kmeans+"], "strategies has 'kmeans+' with unknown weighting ''"),
        (["--strategies", "kmeanz+gcs"], "unknown strategy 'kmeanz+gcs' (did you mean 'kmeans'?); known strategies: dtg, human, kmeans"),
        (["--strategies", "kmeans+gcs,kmeans+gcs"], "strategies lists kmeans+gcs more than once"),
        (["--dev-fraction", "0.6"], "dev_fraction must lie in (0, 0.5], got 0.6"),
        (["--dev-fraction", "0"], "dev_fraction must lie in (0, 0.5], got 0.0"),
        (["--weighting-kwargs", '{"gsc": {}}'], "weighting_kwargs has unknown weighting 'gsc'; its keys must be weightings among"),
        (["--weighting-kwargs", '{"gcs": "scale"}'], "weighting_kwargs['gcs'] must be a JSON object of keyword arguments, got 'scale'"),
        (["--generator-kwargs", '{"slaa": {}}'], "generator_kwargs has unknown generator 'slaa'; its keys must be generators among"),
        (["--generator-kwargs", '{"sla": 1}'], "generator_kwargs['sla'] must be a JSON object of keyword arguments, got 1"),
    ],
)
def test_bad_strategies_name_the_strategy_and_the_choices(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)

