"""The global batch on any number of ranks: micro-batches, gradient accumulation, ramp-up (issue 23).

One global batch of 16 gives the same losses (fp32, no dropout) as one micro-batch of 16, four
accumulated micro-batches of 4, data-parallel 2 x 2 micro-batches and model-parallel 2 x data-parallel
2 x 2 micro-batches, for GPT2 and BERT and both DDP implementations; the gradients are reduced once per
global batch; the micro-batch losses are averaged, not summed; the activations of one micro-batch are
all a step holds; a resumed ramp-up or accumulation run equals the unbroken one bitwise.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import mpu
from errors import ArgumentError
from microbatches import BatchSchedule
from performance import SavedActivationMeter
from tests.distributed import run_distributed
from tests.helpers import bert_args, gpt2_args, read_metrics, run_gpt2_cli, train_bert, train_gpt2

# --- the schedule -----------------------------------------------------------------------------------------------------


def test_without_a_ramp_every_iteration_takes_the_global_batch_in_equal_micro_batches():
    schedule = BatchSchedule(micro_batch_size=4, data_parallel_size=2, global_batch_size=24)
    assert schedule.samples_per_micro_step == 8
    assert [schedule.micro_batches_at(c) for c in (0, 24, 10**9)] == [3, 3, 3]
    assert schedule.samples_after(5) == 120 and schedule.samples_after(2, consumed_samples=48) == 96
    assert "global batch 24 = micro-batch 4 x 3 accumulation steps x 2 data-parallel ranks" == schedule.describe()


def test_a_ramp_grows_the_batch_in_equal_steps_of_samples_and_then_holds():
    # From 8 to 32 by 8: three increments over 300 samples, one every 100 samples.
    schedule = BatchSchedule(4, 2, 32, rampup=(8, 8, 300))
    batches, consumed = [], 0
    while consumed < 500:
        batches.append(schedule.global_batch_at(consumed))
        consumed += batches[-1]
    assert batches[:13] == [8] * 13  # 13 x 8 = 104: the first increment falls at 100 samples
    assert batches[13] == 16 and schedule.global_batch_at(199) == 16 and schedule.global_batch_at(200) == 24
    assert schedule.global_batch_at(299) == 24 and schedule.global_batch_at(300) == 32 == batches[-1]
    assert schedule.micro_batches_at(0) == 1 and schedule.micro_batches_at(300) == 4
    assert schedule.samples_after(len(batches)) == consumed  # what a presampled blend is sized by
    assert schedule.samples_after(3, consumed_samples=104) == 104 + 16 * 3


@pytest.mark.parametrize("kwargs, fragments", [
    ({"global_batch_size": 20}, ["--global-batch-size 20", "--micro-batch-size 4", "data-parallel size 2", "8"]),
    ({"global_batch_size": 32, "rampup": (12, 4, 100)}, ["--rampup-batch-size 12 4 100", "multiples of", "8"]),
    ({"global_batch_size": 32, "rampup": (8, 16, 100)}, ["--rampup-batch-size 8 16 100", "whole increments"]),
    ({"global_batch_size": 32, "rampup": (40, 8, 100)}, ["--rampup-batch-size 40 8 100", "reach"]),
])
def test_batch_sizes_that_do_not_split_are_one_clear_error(kwargs, fragments):
    with pytest.raises(ArgumentError) as error:
        BatchSchedule(micro_batch_size=4, data_parallel_size=2, **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_the_command_line_refuses_a_global_batch_the_micro_batches_do_not_divide(tmp_path):
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--micro-batch-size": 3, "--global-batch-size": 16}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--global-batch-size 16 is not a multiple of --micro-batch-size 3" in proc.stderr.strip().splitlines()[-1]


def test_batch_size_is_the_2019_name_of_the_micro_batch_size(tmp_path):
    from arguments import get_args

    args = get_args(gpt2_args(tmp_path, **{"--batch-size": 6}))
    assert (args.micro_batch_size, args.global_batch_size) == (6, 6)  # one rank: the global batch is one micro-batch
    args = get_args(gpt2_args(tmp_path, **{"--batch-size": None, "--micro-batch-size": 2, "--global-batch-size": 8}))
    assert (args.micro_batch_size, args.global_batch_size) == (2, 8)


# --- the step ---------------------------------------------------------------------------------------------------------


def _linear_step(micro_batches: int, ddp: str | None, world_rank_batches: list) -> dict:
    """``train_step`` on a linear regression with ``micro_batches`` micro-batches of this rank's share of
    ``world_rank_batches`` (every rank's micro-batches, by rank); the gradient, the metrics and how many
    gradient reductions the data-parallel group ran."""
    from fp16 import FP16_Optimizer
    from model.distributed import DistributedDataParallel, wrap_data_parallel
    from training import train_step

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    reductions = [0]
    if ddp is None:
        wrapped = model
    else:
        wrapped = wrap_data_parallel(model, ddp, torch.device("cpu"), fp32_allreduce=False)
        if isinstance(wrapped, DistributedDataParallel):
            original = wrapped.allreduce_gradients

            def counted() -> None:
                reductions[0] += 1
                original()

            wrapped.allreduce_gradients = counted
        else:
            def hook(group, bucket):
                reductions[0] += 1
                reduced = bucket.buffer().div_(dist.get_world_size(group))
                return dist.all_reduce(reduced, group=group, async_op=True).get_future().then(lambda f: f.value()[0])

            wrapped.register_comm_hook(mpu.get_data_parallel_group(), hook)
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.0))

    def forward_step(batch, model):
        x, y = batch
        loss = (model(x).squeeze(-1) - y).square().mean()
        return loss, {"loss": loss.detach()}

    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = world_rank_batches[rank]
    metrics, grad_norm, skipped = train_step(forward_step, iter(mine), wrapped, optimizer,
                                             SimpleNamespace(step=lambda: None), SimpleNamespace(clip_grad=0.0),
                                             num_micro_batches=micro_batches)
    return {"grad": torch.cat([model.weight.grad.flatten(), model.bias.grad]).tolist(), "loss": float(metrics["loss"]),
            "reductions": reductions[0], "grad_norm": grad_norm, "skipped": skipped}


def _regression_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(samples, 6, generator=gen), torch.randn(samples, generator=gen)


def test_accumulated_micro_batches_give_the_mean_gradient_of_the_whole_batch(single_process_group):
    x, y = _regression_data(16)
    whole = _linear_step(1, None, [[(x, y)]])
    micro = _linear_step(4, None, [[(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]])
    assert micro["grad"] == pytest.approx(whole["grad"], rel=1e-6, abs=1e-7)  # a sum would be 4 x
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # the metrics are the micro-batches' mean
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-6) and not micro["skipped"]


def _dp_steps(ddp: str) -> list[dict]:
    x, y = _regression_data(16)
    # Rank r's k-th micro-batch: samples [8 k + 4 r, 8 k + 4 r + 4), as the samplers hand them out.
    shares = [[(x[8 * k + 4 * r:8 * k + 4 * r + 4], y[8 * k + 4 * r:8 * k + 4 * r + 4]) for k in range(2)]
              for r in range(2)]
    return [_linear_step(2, ddp, shares), _linear_step(1, ddp, [[share[0]] for share in shares])]


@pytest.mark.parametrize("ddp", ["local", "torch"])
def test_gradients_are_reduced_once_per_global_batch(single_process_group, ddp):
    x, y = _regression_data(16)
    whole = _linear_step(1, None, [[(x, y)]])
    results = run_distributed(_dp_steps, 2, ddp)
    for accumulated, single in results:
        assert accumulated["grad"] == pytest.approx(whole["grad"], rel=1e-6, abs=1e-7)
        # As many reductions for two micro-batches as for one: none on the first micro-batch's backward.
        assert accumulated["reductions"] == single["reductions"] >= 1, (accumulated, single)


# --- whole runs -------------------------------------------------------------------------------------------------------

# name: (world size, flags) for a global batch of 16; "single" is one micro-batch of 16.
LAYOUTS = {
    "single": (1, {"--micro-batch-size": 16}),
    "accumulated": (1, {"--micro-batch-size": 4, "--global-batch-size": 16}),
    "dp2": (2, {"--micro-batch-size": 4, "--global-batch-size": 16}),
    "dp2_torch_ddp": (2, {"--micro-batch-size": 4, "--global-batch-size": 16, "--DDP-impl": "torch"}),
    "mp2_dp2": (4, {"--micro-batch-size": 4, "--global-batch-size": 16, "--model-parallel-size": 2}),
}
ACCUMULATION = {"single": 1, "accumulated": 4, "dp2": 2, "dp2_torch_ddp": 2, "mp2_dp2": 2}


def _run_layouts(tmp_path, model: str, extra: dict, names=tuple(LAYOUTS)) -> dict[str, list[dict]]:
    build, train = (gpt2_args, train_gpt2) if model == "gpt2" else (bert_args, train_bert)
    records = {}
    for name in names:
        world, flags = LAYOUTS[name]
        log_dir = str(tmp_path / f"{model}_{name}")
        argv = build(tmp_path, **{"--batch-size": None, "--train-iters": 6, "--eval-iters": 0, "--log-dir": log_dir,
                                  **flags, **extra})
        run_distributed(train, world, argv)
        records[name] = read_metrics(log_dir)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_every_split_of_a_global_batch_of_16_gives_the_same_losses(tmp_path, model):
    records = _run_layouts(tmp_path, model, {})
    keys = ["lm_loss", "grad_norm"] + (["nsp_loss"] if model == "bert" else [])
    reference = records["single"]
    assert [r["iteration"] for r in reference] == list(range(1, 7))
    assert reference[-1]["lm_loss"] < reference[0]["lm_loss"], "the loss should fall"
    for name, got in records.items():
        assert [(r["global_batch_size"], r["micro_batch_size"], r["accumulation_steps"]) for r in got] == \
            [(16, LAYOUTS[name][1]["--micro-batch-size"], ACCUMULATION[name])] * 6, name
        for mine, theirs in zip(got, reference, strict=True):
            for key in keys:  # a summed loss would multiply grad_norm by the accumulation steps
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (name, mine["iteration"], key)


@pytest.mark.slow
def test_fp16_skips_the_same_steps_whatever_the_split(tmp_path):
    # A loss scale far too high: the first steps overflow (and are skipped) until the scale comes down.
    fp16 = {"--fp16": True, "--initial-loss-scale": 2.0**26, "--hysteresis": 1, "--train-iters": 10}
    records = _run_layouts(tmp_path, "gpt2", fp16, names=("single", "accumulated", "dp2"))
    skipped = {name: [(r["skipped_iters"], r["loss_scale"]) for r in got] for name, got in records.items()}
    assert skipped["single"][0][0] >= 1 and skipped["single"][-1][0] < 10, skipped["single"]
    assert skipped["accumulated"] == skipped["dp2"] == skipped["single"], skipped
    for name in ("accumulated", "dp2"):
        for mine, theirs in zip(records[name], records["single"], strict=True):
            assert mine["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=1e-3), name  # fp16 arithmetic


# --- memory -----------------------------------------------------------------------------------------------------------


def test_a_step_of_accumulated_micro_batches_holds_the_activations_of_one(single_process_group, tmp_path):
    import pretrain_gpt2
    from arguments import get_args
    from data_utils import build_gpt2_datasets, make_tokenizer
    from restore import TrainState, decide_model_config
    from training import build_data_iterators, setup_model_and_optimizer, train_step

    def peak(micro: int, global_batch: int) -> int:
        args = get_args(gpt2_args(tmp_path, **{"--batch-size": None, "--micro-batch-size": micro,
                                               "--global-batch-size": global_batch, "--seq-length": 64,
                                               "--max-position-embeddings": 64}))
        tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
        datasets = build_gpt2_datasets(args.train_data, None, None, args.split, args.seq_length, tokenizer, False,
                                       None, args.seed)
        mpu.model_parallel_cuda_manual_seed(1)
        model, optimizer, scheduler = setup_model_and_optimizer(
            args, pretrain_gpt2.model_provider, decide_model_config(args, tokenizer.vocab_size), torch.device("cpu"))
        train, _, _ = build_data_iterators(args, (datasets[0], None, None), TrainState())
        forward_step = pretrain_gpt2.forward_step_provider(args, tokenizer, torch.device("cpu"))
        with SavedActivationMeter() as saved:
            train_step(forward_step, train, model, optimizer, scheduler, args,
                       num_micro_batches=global_batch // micro)
        assert saved.live == 0  # nothing is kept once the step is done
        return saved.peak

    one_of_4, four_of_4, one_of_16 = peak(4, 4), peak(4, 16), peak(16, 16)
    assert four_of_4 == pytest.approx(one_of_4, rel=0.15), (four_of_4, one_of_4)
    assert one_of_16 > 3 * one_of_4, (one_of_16, one_of_4)  # the measure sees the batch


# --- ramp-up and resume -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world, flags", [
    (1, {"--micro-batch-size": 2, "--global-batch-size": 8, "--rampup-batch-size": [2, 2, 24]}),
    (2, {"--micro-batch-size": 2, "--global-batch-size": 8}),
])
def test_a_run_stopped_in_a_ramp_or_with_accumulation_resumes_bitwise(tmp_path, world, flags):
    common = {"--batch-size": None, "--train-iters": 10, "--eval-iters": 0, "--hidden-dropout": 0.1,
              "--attention-dropout": 0.1, "--resume-dataloader": True, **flags}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, world, gpt2_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_gpt2, world, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 4,
                                                                       "--log-dir": resumed}))
    run_distributed(train_gpt2, world, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt,
                                                                       "--log-dir": resumed}))
    expected, got = read_metrics(unbroken), read_metrics(resumed)
    assert [r["iteration"] for r in got] == list(range(1, 11))
    fields = ("lm_loss", "grad_norm", "lr", "global_batch_size", "accumulation_steps")
    assert [[r[k] for k in fields] for r in got] == [[r[k] for k in fields] for r in expected]  # bitwise
    if "--rampup-batch-size" in flags:
        # 2 from 0 samples, 4 from 8, 6 from 16, 8 from 24: stopped at iteration 4 (8 samples) mid-ramp.
        assert [r["global_batch_size"] for r in got] == [2, 2, 2, 2, 4, 4, 6, 6, 8, 8]
    state = torch.load(os.path.join(ckpt, "iter_0000010", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert state["consumed_samples"] == sum(r["global_batch_size"] for r in got)


# --- validation and test batches --------------------------------------------------------------------------------------


def _record_batches(entry: str, argv: list[str]) -> list[tuple[bool, tuple[int, ...], int]]:
    """Pretrain ``entry`` on ``argv`` in this process (a group of one), recording for each forward whether
    it trained, its batch's ``text`` shape and the largest number of predicted tokens in a sample (BERT)."""
    import importlib

    from arguments import get_args
    from training import pretrain

    module = importlib.import_module(entry)
    args = get_args(argv, defaults=getattr(module, "FLAG_DEFAULTS", None))
    seen = []

    def provider(args, tokenizer, device):
        step = module.forward_step_provider(args, tokenizer, device)

        def forward_step(batch, model):
            preds = int(batch["mask"].sum(dim=1).max()) if "mask" in batch else 0
            seen.append((model.training, tuple(batch["text"].shape), preds))
            return step(batch, model)

        if hasattr(step, "start_iteration"):
            forward_step.start_iteration = step.start_iteration
        return forward_step

    defaults = module.model_defaults(args) if hasattr(module, "model_defaults") else None
    try:
        pretrain(args, module.model_provider, module.data_provider, provider, defaults)
    finally:
        mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    return seen


def test_validation_and_test_take_the_evaluation_batch_and_sequence_length(tmp_path):
    argv = gpt2_args(tmp_path, **{"--batch-size": None, "--micro-batch-size": 2, "--global-batch-size": 4,
                                  "--train-iters": 2, "--eval-interval": 2, "--eval-iters": 2, "--eval-batch-size": 3,
                                  "--seq-length": 16, "--eval-seq-length": 8})
    seen = _record_batches("pretrain_gpt2", argv)
    assert [shape for training, shape, _ in seen if training] == [(2, 17)] * 4  # two iterations of 2 x 2
    assert [shape for training, shape, _ in seen if not training] == [(3, 9)] * 6  # at 0 and 2, then the test


def test_bert_validation_takes_its_own_sequence_length_and_predictions(tmp_path):
    argv = bert_args(tmp_path, **{"--train-iters": 1, "--eval-interval": 1, "--eval-iters": 2,
                                  "--eval-batch-size": 3, "--eval-seq-length": 24, "--eval-max-preds-per-seq": 2})
    seen = _record_batches("pretrain_bert", argv)
    train = [(shape, preds) for training, shape, preds in seen if training]
    evaluation = [(shape, preds) for training, shape, preds in seen if not training]
    assert [shape for shape, _ in train] == [(4, 32)] and train[0][1] > 2
    assert {shape for shape, _ in evaluation} == {(3, 24)} and max(preds for _, preds in evaluation) <= 2


def test_an_evaluation_sequence_beyond_the_positions_is_one_clear_error(tmp_path):
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--eval-seq-length": 32}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--eval-seq-length 32 exceeds --max-position-embeddings 16" in proc.stderr.strip().splitlines()[-1]
