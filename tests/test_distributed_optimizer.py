"""The optimizer state sharded over the data-parallel group (``--use-distributed-optimizer``, issue 24).

Runs with the flag equal the plain runs (fp32 within 1e-5 over 20 iterations at data-parallel 2 and 4
and data-parallel 2 x model-parallel 2; fp16 and bf16 with the same skipped steps); each rank keeps a
``1 / data-parallel size`` share of the optimizer state; checkpoints hold the full state, so a run
saved with the flag resumes at another data-parallel size or without it, and the reverse.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

import mpu
from tests.distributed import run_distributed
from tests.helpers import gpt2_args, read_metrics, train_gpt2

# --- the optimizer on its own -----------------------------------------------------------------------------------------


def _toy_model() -> torch.nn.Module:
    """A few parameters of awkward sizes (so shard borders cut through them), decay and no-decay groups."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _toy_steps(dtype_name: str, distributed: bool, steps: int = 4, damage: str | None = None) -> dict:
    """``steps`` optimizer steps of a toy regression on each rank's own batch; the weights, gradient norms
    and state bytes. ``damage`` injects a bug: ``"twice"`` (the shard stepped twice), ``"skip"`` (no
    step), ``"no_gather"`` (the updated shards are not all-gathered)."""
    from fp16 import DistributedOptimizer, FP16_Module, FP16_Optimizer
    from fp16.loss_scaler import DynamicLossScaler, LossScaler
    from model import optimizer_param_groups
    from model.distributed import DistributedDataParallel

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    dtype = getattr(torch, dtype_name)
    model = _toy_model()
    if dtype != torch.float32:
        model = FP16_Module(model, dtype)
    wrapped = DistributedDataParallel(model)
    decay, no_decay = optimizer_param_groups(model)
    inner = torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": 0.1},
                               {"params": [p for _, p in no_decay], "weight_decay": 0.0}], lr=1e-2, fused=True)
    scaler = DynamicLossScaler(init_scale=2.0**8) if dtype == torch.float16 else LossScaler(1.0)
    optimizer = DistributedOptimizer(inner, scaler) if distributed else FP16_Optimizer(inner, scaler)
    if damage == "twice":
        step = optimizer.optimizer.step
        optimizer.optimizer.step = lambda: (step(), step())
    elif damage == "skip":
        optimizer.optimizer.step = lambda: None
    elif damage == "no_gather":
        optimizer._all_gather_weights = lambda: None
    rank = dist.get_rank()
    norms = []
    for step_index in range(steps):
        gen = torch.Generator().manual_seed(100 * step_index + rank)
        x, y = torch.randn(6, 7, generator=gen), torch.randn(6, 3, generator=gen)
        optimizer.zero_grad()
        loss = (wrapped(x).float() - y).square().mean()
        optimizer.backward(loss)
        if not distributed:
            wrapped.allreduce_gradients()
        norm, skipped = optimizer.step(max_norm=0.5)
        norms.append((norm, skipped))
    weights = [p.detach().float().flatten().tolist() for p in model.parameters()]
    return {"weights": weights, "norms": norms, "state_bytes": optimizer.state_bytes(),
            "state": _plain(optimizer.state_dict())}


def _plain(state: dict) -> dict:
    """A state dict with tensors as lists (to cross process boundaries)."""
    if torch.is_tensor(state):
        return state.tolist()
    if isinstance(state, dict):
        return {str(k): _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_plain(v) for v in state]
    return state


def _close(a, b, tol: float) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, float):
        return abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sharded_steps_equal_the_replicated_optimizer_and_checkpoint_the_same_state(dtype):
    plain = run_distributed(_toy_steps, 2, dtype, False)
    sharded = run_distributed(_toy_steps, 2, dtype, True)
    tol = 1e-6 if dtype == "float32" else 1e-3
    for mine, theirs in zip(sharded, plain, strict=True):
        assert _close(mine["weights"], theirs["weights"], tol)
        assert [s for _, s in mine["norms"]] == [s for _, s in theirs["norms"]]
        assert _close([n for n, _ in mine["norms"]], [n for n, _ in theirs["norms"]], tol)
        assert _close(mine["state"], theirs["state"], tol)  # the full state, in the replicated format
    assert sharded[0]["weights"] == sharded[1]["weights"]  # every rank has the gathered weights
    # Each of two ranks keeps about half of the state (shard borders round up by one element at most).
    assert sum(r["state_bytes"] for r in sharded) <= plain[0]["state_bytes"] + 64


@pytest.mark.parametrize("damage", ["twice", "skip", "no_gather"])
def test_a_shard_updated_twice_or_not_at_all_or_not_gathered_is_caught(damage):
    plain = run_distributed(_toy_steps, 2, "float32", False)
    broken = run_distributed(_toy_steps, 2, "float32", True, 4, damage)
    assert not all(_close(b["weights"], p["weights"], 1e-4) for b, p in zip(broken, plain, strict=True))


def test_state_per_rank_falls_with_the_data_parallel_size():
    sizes = {world: run_distributed(_toy_steps, world, "float16", True)[0]["state_bytes"] for world in (1, 4)}
    print(f"optimizer state bytes per rank: dp1 {sizes[1]}, dp4 {sizes[4]} ({sizes[4] / sizes[1]:.3f}x)")
    assert sizes[4] <= 0.3 * sizes[1]


# --- whole runs -------------------------------------------------------------------------------------------------------

def _losses(tmp_path, name: str, world: int, **flags) -> list[dict]:
    log_dir = str(tmp_path / name)
    argv = gpt2_args(tmp_path, **{"--batch-size": None, "--micro-batch-size": 2, "--eval-iters": 0,
                                  "--log-dir": log_dir, **flags})
    run_distributed(train_gpt2, world, argv)
    return read_metrics(log_dir)


def _assert_same(got: list[dict], expected: list[dict], tol: float, keys=("lm_loss",)) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["skipped_iters"] == theirs["skipped_iters"], mine["iteration"]
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=tol, abs=tol), (mine["iteration"], key)


@pytest.mark.slow
@pytest.mark.parametrize("world, mp", [(2, 1), (4, 1), (4, 2)])
def test_runs_with_the_flag_equal_plain_runs(tmp_path, world, mp):
    common = {"--model-parallel-size": mp, "--global-batch-size": 8}
    plain = _losses(tmp_path, "plain", world, **common)
    sharded = _losses(tmp_path, "sharded", world, **common, **{"--use-distributed-optimizer": True})
    assert len(plain) == 20
    _assert_same(sharded, plain, 1e-5, keys=("lm_loss", "grad_norm"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_half_precision_runs_with_the_flag_skip_the_same_steps(tmp_path, precision):
    flags = {precision: True, "--global-batch-size": 8, "--train-iters": 10}
    if precision == "--fp16":
        flags.update({"--initial-loss-scale": 2.0**26, "--hysteresis": 1})
    plain = _losses(tmp_path, "plain", 2, **flags)
    sharded = _losses(tmp_path, "sharded", 2, **flags, **{"--use-distributed-optimizer": True})
    if precision == "--fp16":
        assert plain[0]["skipped_iters"] == 1  # the test sees skipped steps
    _assert_same(sharded, plain, 2e-2)


@pytest.mark.slow
def test_checkpoints_move_between_data_parallel_sizes_and_with_and_without_the_flag(tmp_path):
    common = {"--global-batch-size": 8, "--train-iters": 8, "--resume-dataloader": True}
    unbroken = _losses(tmp_path, "unbroken", 2, **common)
    first = str(tmp_path / "first")
    _losses(tmp_path, "first_half", 2, **common, **{"--use-distributed-optimizer": True, "--save": first,
                                                     "--exit-interval": 4})
    state = torch.load(os.path.join(first, "iter_0000004", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    moments = state["optimizer"]["optimizer"]["state"]
    shapes = sorted(tuple(entry["exp_avg"].shape) for entry in moments.values())
    assert shapes == sorted(tuple(t.shape) for t in state["model"].values())  # the whole state, per parameter
    for name, world, flags in (("dp1", 1, {"--use-distributed-optimizer": True}), ("dp4", 4, {})):
        save = str(tmp_path / f"ckpt_{name}")
        shutil.copytree(first, save)
        resumed = _losses(tmp_path, f"resumed_{name}", world, **common, **flags, **{"--load": save, "--save": save})
        _assert_same(resumed, unbroken[4:], 1e-5)
    # The reverse: a plain checkpoint resumed with the flag.
    plain_ckpt = str(tmp_path / "plain_ckpt")
    _losses(tmp_path, "plain_first", 2, **common, **{"--save": plain_ckpt, "--exit-interval": 4})
    resumed = _losses(tmp_path, "plain_resumed", 2, **common, **{"--use-distributed-optimizer": True,
                                                                 "--load": plain_ckpt, "--save": plain_ckpt})
    _assert_same(resumed, unbroken[4:], 1e-5)


# --- overlapped gradient reduction ------------------------------------------------------------------------------------


def _overlapped_backward(bucket_size: int) -> dict:
    """Backward of a toy model under the local DDP with overlap: reductions in flight when backward
    returns, and the gradients afterwards, against the DDP without overlap."""
    from model.distributed import DistributedDataParallel

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    results = {}
    for overlap in (False, True):
        model = DistributedDataParallel(_toy_model(), bucket_size=bucket_size, overlap=overlap)
        gen = torch.Generator().manual_seed(dist.get_rank())
        x = torch.randn(4, 7, generator=gen)
        with model.no_sync():  # an earlier micro-batch: accumulate, start nothing
            model(x).square().mean().backward()
        started_early = len(model._in_flight)
        model(x * 2).square().mean().backward()
        results[overlap] = {"in_flight": len(model._in_flight), "early": started_early}
        model.allreduce_gradients()
        results[overlap]["grads"] = [p.grad.flatten().tolist() for p in model.parameters()]
    return results


def test_overlapped_reduction_starts_during_backward_and_gives_the_same_gradients():
    for result in run_distributed(_overlapped_backward, 2, 30):
        assert result[True]["early"] == 0  # nothing reduced under no_sync
        assert result[True]["in_flight"] >= 3  # every bucket of 30 elements started before backward returned
        assert result[False]["in_flight"] == 0
        assert result[True]["grads"] == result[False]["grads"]  # bitwise


@pytest.mark.slow
def test_a_run_with_overlapped_reduction_equals_one_without_bitwise(tmp_path):
    common = {"--global-batch-size": 8, "--train-iters": 6}  # two accumulated micro-batches per rank
    plain = _losses(tmp_path, "plain", 2, **common)
    overlapped = _losses(tmp_path, "overlapped", 2, **common, **{"--overlap-grad-reduce": True})
    fields = ("lm_loss", "grad_norm", "lr")
    assert [[r[k] for k in fields] for r in overlapped] == [[r[k] for k in fields] for r in plain]


def test_the_run_reports_the_bytes_it_holds_per_rank(tmp_path):
    from tests.helpers import run_gpt2_cli

    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--train-iters": 2, "--eval-iters": 0}))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "memory after the first iteration" in line)
    assert "this rank holds parameters" in line and "gradients" in line and "optimizer state" in line, line


@pytest.mark.parametrize("flags, world, fragment", [
    ({"--use-distributed-optimizer": True, "--DDP-impl": "torch"}, 2, "works with --DDP-impl local only"),
    ({"--overlap-grad-reduce": True, "--use-distributed-optimizer": True}, 2, "does not combine"),
    ({"--overlap-grad-reduce": True, "--DDP-impl": "torch"}, 2, "torch DDP always overlaps"),
    ({"--sequence-parallel": True}, 1, "--sequence-parallel needs --model-parallel-size 2 or more"),
    ({"--sequence-parallel": True, "--model-parallel-size": 2, "--seq-length": 15,
      "--max-position-embeddings": 16}, 2, "--seq-length 15 is not a multiple of it"),
])
def test_scale_flags_that_cannot_work_together_are_one_clear_line(tmp_path, monkeypatch, capsys, flags, world,
                                                                   fragment):
    from arguments import get_args

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        get_args(gpt2_args(tmp_path, **flags))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and fragment in err and len(err.splitlines()) == 1, err
