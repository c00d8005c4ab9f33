"""Mixed precision: loss scalers, the fp32-master optimizer wrapper, overflow skipping across ranks,
half-precision checkpointing, and end-to-end fp16/bf16 training with exact resume."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import mpu
from fp16 import DynamicLossScaler, FP16_Module, FP16_Optimizer, LossScaler
from tests.distributed import run_distributed
from tests.helpers import gpt2_args, gpt2_losses, read_metrics, run_gpt2_cli, train_gpt2


def test_dynamic_scale_halves_after_hysteresis_overflows_and_grows_after_a_clean_window():
    scaler = DynamicLossScaler(init_scale=1024.0, scale_window=3, min_scale=256.0, hysteresis=2)
    scaler.update_scale(overflow=True)
    assert scaler.loss_scale == 1024.0  # one overflow is within the hysteresis
    scaler.update_scale(overflow=True)
    assert scaler.loss_scale == 512.0
    scaler.update_scale(overflow=True)
    assert scaler.loss_scale == 256.0  # the budget stays spent until the scale grows again
    scaler.update_scale(overflow=True)
    assert scaler.loss_scale == 256.0  # --min-scale is the floor
    for _ in range(2):
        scaler.update_scale(overflow=False)
    assert scaler.loss_scale == 256.0
    scaler.update_scale(overflow=False)
    assert scaler.loss_scale == 512.0  # three clean steps: doubled, and the hysteresis refilled
    scaler.update_scale(overflow=True)
    assert scaler.loss_scale == 512.0
    restored = DynamicLossScaler(init_scale=1.0, scale_window=3, hysteresis=2)
    restored.load_state_dict(scaler.state_dict())
    restored.update_scale(overflow=True)
    assert restored.loss_scale == 256.0


def test_static_scale_stays_fixed():
    scaler = LossScaler(128.0)
    for overflow in (True, True, False, True):
        scaler.update_scale(overflow)
    assert scaler.loss_scale == 128.0


def _overflow_worker(hysteresis: int):
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(3)
    model = FP16_Module(mpu.ColumnParallelLinear(8, 4), torch.float16)
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=100, hysteresis=hysteresis)
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler)
    rank = torch.distributed.get_rank()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    before = [p.detach().clone() for p in model.parameters()] + [m.detach().clone() for m in optimizer.master_params]
    scales, skips = [], []
    for _ in range(hysteresis):
        optimizer.zero_grad()
        optimizer.backward(model(x).pow(2).mean())
        if rank == 1:  # only one rank of two overflows
            next(model.parameters()).grad[0, 0] = float("inf")
        _, skipped = optimizer.step()
        skips.append(skipped)
        scales.append(optimizer.loss_scale)
    after = [p.detach() for p in model.parameters()] + [m.detach() for m in optimizer.master_params]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    optimizer.zero_grad()
    optimizer.backward(model(x).pow(2).mean())
    _, skipped_clean = optimizer.step()
    moved = not torch.equal(next(model.parameters()).detach(), before[0])
    return skips, scales, unchanged, skipped_clean, moved


def test_overflow_on_one_rank_skips_the_step_on_every_rank():
    for rank, (skips, scales, unchanged, skipped_clean, moved) in enumerate(run_distributed(_overflow_worker, 2, 2)):
        assert skips == [True, True], rank
        assert scales == [2.0**10, 2.0**9], rank  # halved after --hysteresis (2) overflows
        assert unchanged, f"rank {rank} changed weights on a skipped step"
        assert not skipped_clean and moved, rank


def test_optimizer_keeps_fp32_masters_and_round_trips_its_state(single_process_group):
    torch.manual_seed(0)
    model = FP16_Module(torch.nn.Linear(6, 3), torch.bfloat16)
    optimizer = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), LossScaler(1.0))
    assert all(m.dtype == torch.float32 for m in optimizer.master_params)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = torch.randn(4, 6)
    for _ in range(3):
        optimizer.zero_grad()
        optimizer.backward(model(x).square().mean())
        optimizer.step()
    # Masters hold what bf16 cannot: the model weights are their rounding.
    assert optimizer.master_params
    for param, master in zip(optimizer.model_params, optimizer.master_params, strict=True):
        assert torch.equal(param, master.to(torch.bfloat16))
    state = optimizer.state_dict()
    fresh_model = FP16_Module(torch.nn.Linear(6, 3), torch.bfloat16)
    fresh = FP16_Optimizer(torch.optim.AdamW(fresh_model.parameters(), lr=1e-2), LossScaler(1.0))
    fresh.load_state_dict(state)
    for mine, theirs in zip(fresh.master_params, optimizer.master_params, strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(fresh_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_fp32_islands_compute_in_fp32_and_hand_back_half():
    from model.transformer import LayerNorm

    norm = LayerNorm(16)
    x = torch.randn(2, 16, dtype=torch.float16)
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.layer_norm(x.float(), (16,)), rtol=1e-3, atol=1e-3)


def test_checkpoint_gives_identical_gradients_in_bf16_with_dropout(single_process_group):
    mpu.model_parallel_cuda_manual_seed(11)
    layer = mpu.ColumnParallelLinear(16, 32).to(torch.bfloat16)

    def block(h):
        with mpu.get_cuda_rng_tracker().fork():
            h = F.dropout(layer(h), 0.3)
        return F.dropout(F.gelu(h), 0.3)

    x = torch.randn(4, 16, dtype=torch.bfloat16)
    grads = []
    for use_checkpoint in (False, True):
        mpu.model_parallel_cuda_manual_seed(11)
        layer.zero_grad()
        xin = x.clone().requires_grad_(True)
        out = mpu.checkpoint(block, xin) if use_checkpoint else block(xin)
        out.float().square().sum().backward()
        grads.append((xin.grad.clone(), layer.weight.grad.clone(), out.detach()))
    (gx0, gw0, out0), (gx1, gw1, out1) = grads
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)
    assert (out0 == 0).float().mean() > 0.2  # dropout really dropped


@pytest.mark.slow
def test_fp16_run_resumed_from_a_checkpoint_continues_exactly(tmp_path):
    common = {"--fp16": True, "--initial-loss-scale": 2.0**20, "--loss-scale-window": 5, "--resume-dataloader": True,
              "--hidden-dropout": 0.1, "--lr": 3e-3}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 10,
                                                                    "--log-dir": resumed}))
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt,
                                                                    "--log-dir": resumed}))
    expected = {r["iteration"]: r for r in read_metrics(unbroken)}
    got = {r["iteration"]: r for r in read_metrics(resumed)}
    assert sorted(got) == list(range(1, 21))
    for iteration in range(11, 21):
        for key in ("lm_loss", "loss_scale", "skipped_iters", "grad_norm"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)
    assert expected[20]["loss_scale"] != 2.0**20, "the dynamic scale should have moved"
    assert expected[20]["lm_loss"] < expected[1]["lm_loss"] - 0.5


@pytest.mark.slow
def test_bf16_with_fp32_islands_trains(tmp_path):
    log_dir = str(tmp_path / "bf16")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--bf16": True, "--fp32-layernorm": True,
                                                          "--fp32-embedding": True, "--log-dir": log_dir}))
    losses = gpt2_losses(log_dir)
    assert losses[20] < losses[1] - 0.5
    assert all(r["loss_scale"] == 1.0 and r["skipped_iters"] == 0 for r in read_metrics(log_dir))


@pytest.mark.slow
def test_local_and_torch_ddp_give_the_same_losses_as_one_process(tmp_path):
    runs = {"single": (1, {"--batch-size": 4}), "local": (2, {"--batch-size": 2, "--DDP-impl": "local"}),
            "torch": (2, {"--batch-size": 2, "--DDP-impl": "torch"})}
    losses = {}
    for name, (world, flags) in runs.items():
        log_dir = str(tmp_path / name)
        run_distributed(train_gpt2, world, gpt2_args(tmp_path, **flags, **{"--log-dir": log_dir}))
        losses[name] = gpt2_losses(log_dir)
    for name in runs:  # every iteration on every side, so the comparison below cannot pass on nothing
        assert sorted(losses[name]) == list(range(1, 21)), name
    for iteration, value in losses["local"].items():
        assert losses["torch"][iteration] == pytest.approx(value, abs=1e-5), iteration
        assert losses["single"][iteration] == pytest.approx(value, abs=1e-5), iteration


@pytest.mark.slow
def test_fp32_allreduce_of_bf16_gradients_agrees_between_ddp_implementations(tmp_path):
    losses = {}
    for impl in ("local", "torch"):
        log_dir = str(tmp_path / impl)
        flags = {"--bf16": True, "--fp32-allreduce": True, "--batch-size": 2, "--DDP-impl": impl, "--log-dir": log_dir}
        run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **flags))
        losses[impl] = gpt2_losses(log_dir)
    assert sorted(losses["local"]) == sorted(losses["torch"]) == list(range(1, 21))
    for iteration, value in losses["local"].items():
        assert losses["torch"][iteration] == pytest.approx(value, abs=1e-3), iteration


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_half_precision_training_on_cuda(tmp_path, precision):
    log_dir = str(tmp_path / "gpu")
    flags = {precision: True, "--device": "cuda", "--log-dir": log_dir, "--initial-loss-scale": 2.0**16,
             "--checkpoint-activations": True, "--hidden-dropout": 0.1}
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags))
    losses = gpt2_losses(log_dir)
    assert losses[20] < losses[1] - 0.5
    assert os.path.exists(os.path.join(log_dir, "metrics.jsonl"))


@pytest.mark.gpu
def test_fp16_cli_on_cuda_uses_nccl_and_trains(tmp_path):
    log_dir = str(tmp_path / "cli")
    argv = gpt2_args(tmp_path, **{"--fp16": True, "--device": "cuda", "--initial-loss-scale": 2.0**16,
                                  "--log-dir": log_dir})
    proc = run_gpt2_cli(argv)
    assert proc.returncode == 0, proc.stderr
    losses = gpt2_losses(log_dir)
    assert losses[20] < losses[1] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--finetune", "--no-load-optim"])
def test_half_precision_masters_follow_weights_loaded_without_optimizer_state(tmp_path, how):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--fp16": True, "--initial-loss-scale": 2.0**16,
                                                          "--lr": 3e-3, "--save": ckpt}))
    log_dir = str(tmp_path / "second")
    # A negligible learning rate: one step must leave the loaded model's loss where it was.
    flags = {"--fp16": True, "--initial-loss-scale": 2.0**16, "--lr": 1e-12, "--load": ckpt, how: True,
             "--train-iters": 1 if how == "--finetune" else 21, "--eval-interval": 1, "--log-dir": log_dir}
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **flags))
    valid = [r["lm_loss"] for r in read_metrics(log_dir, "valid")]
    assert valid[-1] < 5.0, "the loaded (trained) weights were not used"
    assert valid[-1] == pytest.approx(valid[0], abs=1e-2)


@pytest.mark.slow
def test_fp32_checkpoint_resumes_under_fp16_with_a_fresh_dynamic_scale(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--save": ckpt, "--exit-interval": 10}))
    log_dir = str(tmp_path / "fp16")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--fp16": True, "--initial-loss-scale": 2.0**16,
                                                          "--load": ckpt, "--log-dir": log_dir}))
    train = read_metrics(log_dir)
    assert [r["iteration"] for r in train] == list(range(11, 21))
    assert train[0]["loss_scale"] == 2.0**16
