"""Data-parallel training (``distributed=True``) on CPU: two gloo processes against one process.

The ranks are spawned once per test; each runs every scenario and saves what it ends with. A BN-free
float64 model makes "equal to one process on the concatenated batch" a tight check.
"""

from __future__ import annotations

import copy
import math
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TinyMLP, batch
from torch.amp import GradScaler

from auxlab import MetaAuxWrapper

WORLD = 2
FULL = 8  # samples in the concatenated batch; each rank holds FULL // WORLD
STEPS = 4


def _build(seed: int, **kwargs: Any) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyMLP().double()
    wrapper = MetaAuxWrapper(
        model, num_classes=3, psi=[1, 2, 3], inner_lr=0.3, entropy_weight=0.5, seed=seed,
        generator_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), **kwargs,
    )
    return wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.2, momentum=0.9)


def _batches(shard: slice) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for step in range(STEPS):
        x, y = batch(FULL, seed=step, dtype=torch.float64)
        out.append((x[shard], y[shard], torch.arange(FULL)[shard]))
    return out


SCENARIOS: dict[str, dict[str, Any]] = {
    "maxl_jvp": {"engine": "jvp"},
    "maxl_jvp_meta_every_2": {"engine": "jvp", "meta_every": 2},
    "maxl_finite_difference": {"engine": "finite_difference"},
    "random": {"engine": "jvp", "generator": "random", "generator_kwargs": {"num_samples": FULL}},
    "single": {"engine": "jvp", "generator": "single"},
    # with a GradScaler (no overflow at this scale): the same as without one
    "maxl_jvp_scaler": {"engine": "jvp", "scaler": 2.0**12},
}


def _scaler(kwargs: dict[str, Any]) -> GradScaler | None:
    """The scenario's GradScaler (removed from ``kwargs``), or None."""
    scale = kwargs.pop("scaler", None)
    return None if scale is None else GradScaler("cpu", init_scale=scale, growth_interval=1000)


def _train(
    wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, shard: slice, *, meta_only: bool = False, scaler: GradScaler | None = None
) -> list[float]:
    losses = []
    for x, y, index in _batches(shard):
        if meta_only:
            objective = wrapper.meta_step(x, y)
            assert objective is not None
            losses.append(float(objective))
        else:
            losses.append(float(wrapper.step(x, y, optimizer, index=index, scaler=scaler)))
    return losses


#: Calls the ranks do not agree on: a batch of another size on rank 1; meta_step on rank 1 while rank 0 calls step.
WRONG_CALLS = ("batch_sizes", "meta_step_vs_step")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # a timeout far below gloo's default 30 minutes: a rank left waiting raises instead of hanging (docs/distributed.md)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    shard = slice(rank * FULL // WORLD, (rank + 1) * FULL // WORLD)
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            kwargs = dict(scenario)
            scaler = _scaler(kwargs)
            # each rank builds from its own seed: the wrapper must start every rank from rank 0's state
            wrapper, optimizer = _build(seed=rank, distributed=True, **kwargs)
            losses = _train(wrapper, optimizer, shard, scaler=scaler)
            results[name] = {"state": wrapper.state_dict(), "losses": losses, "steps": dict(wrapper.steps)}
        wrapper, optimizer = _build(seed=rank, distributed=True, engine="jvp")
        results["meta_step_only"] = {"state": wrapper.state_dict(), "losses": _train(wrapper, optimizer, shard, meta_only=True)}
        # a NaN on rank 1 only: both ranks skip the step together, or both raise
        for mode in ("skip", "raise"):
            wrapper, optimizer = _build(seed=0, distributed=True, engine="jvp", nonfinite=mode)
            x, y, index = _batches(shard)[0]
            if rank == 1:
                x = x.clone()
                x[0, 0] = math.nan
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    wrapper.step(x, y, optimizer, index=index)
                    outcome = f"skipped {wrapper.skipped_steps}"
                except FloatingPointError as error:
                    outcome = f"raised: {error}"
            results[f"nan_{mode}"] = {"outcome": outcome, "state": wrapper.state_dict()}
        # wrong calls: a clear error on every rank at once (no hang, no mismatched exchange), then training goes on
        for wrong in WRONG_CALLS:
            wrapper, optimizer = _build(seed=0, distributed=True, engine="jvp")
            x, y, index = _batches(shard)[0]
            try:
                if wrong == "batch_sizes":
                    cut = slice(None) if rank == 0 else slice(0, -1)
                    wrapper.step(x[cut], y[cut], optimizer, index=index[cut])
                elif rank == 0:
                    wrapper.step(x, y, optimizer, index=index)
                else:
                    wrapper.meta_step(x, y, index=index)
                outcome = "no error"
            except ValueError as error:
                outcome = f"raised: {error}"
            state, steps = copy.deepcopy(wrapper.state_dict()), dict(wrapper.steps)  # before the step below moves it
            wrapper.step(x, y, optimizer, index=index)
            results[f"wrong_{wrong}"] = {"outcome": outcome, "state": state, "steps": steps, "then": float(wrapper.last_losses["primary"])}
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks: list[dict[str, Any]], scenario: str) -> None:
    first, second = (_tensors(r[scenario]["state"]) for r in ranks)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between the ranks"
    assert ranks[0][scenario]["losses"] == ranks[1][scenario]["losses"]

    kwargs = dict(SCENARIOS[scenario])
    if _scaler(kwargs) is None and kwargs["engine"] == "jvp" and kwargs.get("generator", "maxl") == "maxl":
        kwargs["engine"] = "functional"  # the reference: exact second order, one process (with a scaler: jvp without one)
    wrapper, optimizer = _build(seed=0, **kwargs)
    losses = _train(wrapper, optimizer, slice(0, FULL))
    expected = _tensors(wrapper.state_dict())
    tolerance = 1e-5 if scenario == "maxl_finite_difference" else 1e-10
    for key, value in expected.items():
        assert torch.allclose(first[key], value, rtol=0, atol=tolerance), f"{key}: {(first[key] - value).abs().max():.3g}"
    assert ranks[0][scenario]["losses"] == pytest.approx(losses, abs=tolerance)
    assert ranks[0][scenario]["steps"] == wrapper.steps


def test_meta_step_alone_averages_the_hypergradient(ranks: list[dict[str, Any]]) -> None:
    wrapper, optimizer = _build(seed=0, engine="functional")
    objectives = _train(wrapper, optimizer, slice(0, FULL), meta_only=True)
    for rank in ranks:
        state = _tensors(rank["meta_step_only"]["state"])
        for key, value in _tensors(wrapper.state_dict()).items():
            assert torch.allclose(state[key], value, rtol=0, atol=1e-10), key
        assert rank["meta_step_only"]["losses"] == pytest.approx(objectives, abs=1e-10)


def test_a_nan_on_one_rank_is_skipped_or_raised_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    untouched, _ = _build(seed=0, engine="jvp")
    for mode in ("skip", "raise"):
        outcomes = [rank[f"nan_{mode}"]["outcome"] for rank in ranks]
        if mode == "skip":
            assert outcomes[0] == outcomes[1] and outcomes[0].startswith("skipped {'model': 1"), outcomes
        else:
            assert all(o.startswith("raised: non-finite loss at model step 1") for o in outcomes), outcomes
        for rank in ranks:
            state = _tensors(rank[f"nan_{mode}"]["state"])
            for key, value in _tensors(untouched.state_dict()).items():
                if key.startswith(("model.", "aux_head.", "generator.")):
                    assert torch.equal(state[key], value), f"{mode}: {key} changed"


@pytest.mark.parametrize("wrong", WRONG_CALLS)
def test_ranks_that_disagree_on_the_call_or_the_batch_size_all_get_a_clear_error(ranks: list[dict[str, Any]], wrong: str) -> None:
    """Issue 15: different per-rank batch sizes were averaged silently; different calls exchanged mismatched tensors or hung."""
    half = FULL // WORLD
    expected = {
        "batch_sizes": f"rank 0 called step with a batch of {half} (meta batch {half}); rank 1 called step with a batch of {half - 1}",
        "meta_step_vs_step": f"rank 0 called step with a batch of {half} (meta batch {half}); rank 1 called meta_step with a batch of {half}",
    }[wrong]
    untouched, _ = _build(seed=0, engine="jvp")
    for rank in ranks:
        outcome = rank[f"wrong_{wrong}"]["outcome"]
        assert outcome.startswith("raised: distributed=True needs every rank to make the same call") and expected in outcome, outcome
        assert rank[f"wrong_{wrong}"]["steps"] == {"model": 0, "meta": 0}
        state = _tensors(rank[f"wrong_{wrong}"]["state"])
        assert all(torch.equal(state[key], value) for key, value in _tensors(untouched.state_dict()).items()), "a refused call changed the state"
    assert ranks[0][f"wrong_{wrong}"]["then"] == ranks[1][f"wrong_{wrong}"]["then"]  # the group still works, in step


def test_distributed_needs_a_process_group_and_a_first_order_engine() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        _build(seed=0, engine="jvp", distributed=True)
    with pytest.raises(ValueError, match="engine='jvp'"):
        _build(seed=0, engine="functional", distributed=True)


def test_loss_warns_once_that_its_gradients_are_not_averaged(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapper, optimizer = _build(seed=0, engine="jvp", distributed=True)
        x, y = batch(4, dtype=torch.float64)
        with pytest.warns(RuntimeWarning, match=r"not averaged over the ranks.*wrapper.step"):
            wrapper.loss(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            wrapper.loss(x, y)  # once only
            wrapper.step(x, y, optimizer)  # step averages: no warning
    finally:
        dist.destroy_process_group()
