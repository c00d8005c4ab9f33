"""Mixed precision: loss scalers, the fp32-master optimizer wrapper, overflow skipping across ranks,
half-precision checkpointing, end-to-end fp16/bf16 training with exact resume, and the invariants such
runs hide (a step independent of the loss scale, fp32 islands, a scaler restored mid-window, an
overflowing step that advances nothing)."""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mpu
from fp16 import DynamicLossScaler, FP16_Module, FP16_Optimizer, LossScaler
from learning_rates import AnnealingLR
from model import GPT2Model, TransformerConfig
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


# --- mixed-precision invariants of fp16/ and the loop around it -------------------------------------------------------
# The gradient norm, the clipping and the fp32 master gradients and weights do not depend on the loss scale
# (static scales far apart, and a dynamic scale that changes every step, give the same step); the fp32 islands
# (--fp32-layernorm, --fp32-embedding) stay fp32 after wrapping and after an optimizer step, with no second copy
# as master; a dynamic loss scaler saved mid-window and restored (alone or inside the optimizer wrapper's state)
# continues exactly, overflows included; an overflowing step advances neither the lr schedule nor the optimizer,
# and the next clean step does.

CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                           max_sequence_length=16, hidden_dropout=0.0, attention_dropout=0.0)
MAX_NORM = 0.05  # well below the initial gradient norm, so every step clips


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(50 + step))


def _loss(model, tokens):
    positions = torch.arange(tokens.shape[1] - 1).unsqueeze(0).expand(tokens.shape[0], -1)
    return mpu.vocab_parallel_cross_entropy(model(tokens[:, :-1], positions), tokens[:, 1:]).mean()


def _fp16_steps(scaler, steps: int = 2, fp32_layernorm: bool = False):
    """Train a seeded fp16 GPT2 with SGD (which, unlike Adam, sees a mis-scaled gradient) and clipping;
    ``fp32_layernorm`` keeps the LayerNorms fp32 (their parameters are then their own masters)."""
    mpu.model_parallel_cuda_manual_seed(9)
    keep = (lambda name, m: isinstance(m, torch.nn.LayerNorm)) if fp32_layernorm else None
    model = FP16_Module(GPT2Model(CONFIG), torch.float16, keep_fp32=keep)
    optimizer = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.5), scaler)
    norms, scales = [], []
    for step in range(steps):
        scales.append(optimizer.loss_scale)
        optimizer.zero_grad()
        optimizer.backward(_loss(model, _tokens(step)))
        norm, skipped = optimizer.step(MAX_NORM)
        assert not skipped
        norms.append(norm)
    grads = [m.grad.detach().clone() for m in optimizer.master_params]
    masters = [m.detach().clone() for m in optimizer.master_params]
    return norms, scales, grads, masters


def _fp32_reference_norm() -> float:
    mpu.model_parallel_cuda_manual_seed(9)
    model = GPT2Model(CONFIG)
    _loss(model, _tokens(0)).backward()
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))


def test_grad_norm_clipping_and_masters_do_not_depend_on_the_loss_scale(single_process_group):
    runs = {
        "static 2^4": _fp16_steps(LossScaler(2.0**4)),
        "static 2^12": _fp16_steps(LossScaler(2.0**12)),
        # Doubles after every clean step: the scale used to unscale must be the one the loss was scaled by.
        "dynamic 2^6, window 1": _fp16_steps(DynamicLossScaler(init_scale=2.0**6, scale_window=1)),
        "fp32 LayerNorm, static 2^4": _fp16_steps(LossScaler(2.0**4), fp32_layernorm=True),
        "fp32 LayerNorm, static 2^12": _fp16_steps(LossScaler(2.0**12), fp32_layernorm=True),
    }
    assert runs["dynamic 2^6, window 1"][1] == [2.0**6, 2.0**7]
    reference = _fp32_reference_norm()
    norms, _, grads, masters = runs["static 2^4"]
    assert norms[0] == pytest.approx(reference, rel=1e-2)  # the unscaled norm, not the scaled one
    assert norms[0] > 4 * MAX_NORM
    clipped = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    assert clipped == pytest.approx(MAX_NORM, rel=1e-3)  # the masters' gradients were clipped to --clip-grad
    for name, (other_norms, _, other_grads, other_masters) in runs.items():
        assert other_norms == pytest.approx(norms, rel=2e-3), name
        for mine, theirs in zip(other_grads, grads, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-5, msg=name)
        for mine, theirs in zip(other_masters, masters, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5, msg=name)


def _setup(tmp_path, **flags):
    """The model, optimizer and scheduler ``training.pretrain`` builds for these flags (a group of one)."""
    import pretrain_gpt2
    from arguments import get_args
    from restore import decide_model_config
    from training import setup_model_and_optimizer

    args = get_args(gpt2_args(tmp_path, **flags))
    mpu.model_parallel_cuda_manual_seed(args.seed)
    model, optimizer, scheduler = setup_model_and_optimizer(args, pretrain_gpt2.model_provider,
                                                            decide_model_config(args, 300), torch.device("cpu"))
    return args, model, optimizer, scheduler


@pytest.mark.parametrize("islands", [("--fp32-layernorm",), ("--fp32-embedding",),
                                     ("--fp32-layernorm", "--fp32-embedding")])
def test_fp32_islands_stay_fp32_after_wrapping_and_stepping(single_process_group, tmp_path, islands):
    from model.distributed import unwrap_model

    _, model, optimizer, _ = _setup(tmp_path, **{"--fp16": True, "--loss-scale": 2.0**8, "--warmup": 0,
                                                 **{flag: True for flag in islands}})
    bare = unwrap_model(model)

    def expected_dtype(name: str) -> torch.dtype:
        fp32 = ("layernorm" in name and "--fp32-layernorm" in islands) or \
               ("embeddings" in name and "--fp32-embedding" in islands)
        return torch.float32 if fp32 else torch.float16

    before = {n: p.detach().clone() for n, p in bare.named_parameters()}
    logits = model(_tokens(0)[:, :-1] % 64, torch.arange(12).unsqueeze(0).expand(2, 12))
    assert logits.dtype == torch.float32  # the loss is always computed in fp32
    optimizer.zero_grad()
    optimizer.backward(mpu.vocab_parallel_cross_entropy(logits, _tokens(0)[:, 1:] % 64).mean())
    _, skipped = optimizer.step(1.0)
    assert not skipped
    masters = {id(p): m for p, m in zip(optimizer.model_params, optimizer.master_params, strict=True)}
    for name, param in bare.named_parameters():
        assert param.dtype == expected_dtype(name), name
        master = masters[id(param)]
        assert master.dtype == torch.float32, name
        assert (master is param) == (param.dtype == torch.float32), name  # an island is its own master
        assert not torch.equal(param.detach(), before[name]), f"{name} was not updated"
    assert sum(p.dtype == torch.float32 for p in bare.parameters()) > 0
    assert sum(p.dtype == torch.float16 for p in bare.parameters()) > 0


# --- dynamic loss scaler: save mid-window, restore, continue ------------------------------------------

WINDOW, HYSTERESIS = 3, 2
# From the saved state (scale 2048, one overflow of the hysteresis spent, 2 of 3 clean steps done):
# the first continuation grows the scale at once only if the clean steps were restored, the second
# halves it at once only if the spent hysteresis was (and then must not grow it after one clean step).
CONTINUATIONS = ([False, True, False, False, False, True, True], [True, False, True, True])
TRAILS = ([4096.0, 4096.0, 4096.0, 4096.0, 8192.0, 8192.0, 4096.0], [1024.0, 1024.0, 512.0, 256.0])


def _scaler(init_scale: float = 2.0**10) -> DynamicLossScaler:
    return DynamicLossScaler(init_scale=init_scale, scale_window=WINDOW, hysteresis=HYSTERESIS)


def test_dynamic_scaler_restored_mid_window_continues_exactly():
    original = _scaler()
    for overflow in (False, False, False, True, False, False):  # 2048 after 3 clean steps; then 1 overflow
        original.update_scale(overflow)
    saved = original.state_dict()
    assert (saved["cur_scale"], saved["hysteresis_left"], saved["clean_steps"]) == (2048.0, 1, 2)
    for continuation, expected_trail in zip(CONTINUATIONS, TRAILS, strict=True):
        unbroken, restored = copy.deepcopy(original), _scaler(init_scale=1.0)
        restored.load_state_dict(saved)
        trail = []
        for overflow in continuation:
            unbroken.update_scale(overflow)
            restored.update_scale(overflow)
            assert restored.state_dict() == unbroken.state_dict(), continuation
            trail.append(restored.loss_scale)
        assert trail == expected_trail


def _tiny_fp16():
    torch.manual_seed(4)
    model = FP16_Module(torch.nn.Linear(8, 4), torch.float16)
    return model, FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), _scaler())


def _optimizer_step(model, optimizer, overflow: bool) -> tuple[float, bool]:
    optimizer.zero_grad()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    optimizer.backward(model(x).square().mean())
    if overflow:
        model.module.weight.grad[0, 0] = float("inf")
    return optimizer.step()


def test_optimizer_wrapper_state_restores_the_dynamic_scaler_mid_window(single_process_group):
    model, optimizer = _tiny_fp16()
    for overflow in (False, False, False, True, False, False):
        _optimizer_step(model, optimizer, overflow)
    state = optimizer.state_dict()
    assert state["loss_scaler"]["clean_steps"] == 2 and state["loss_scaler"]["hysteresis_left"] == 1
    for continuation in CONTINUATIONS:
        original, original_opt = copy.deepcopy((model, optimizer))  # the run that was never interrupted
        fresh, fresh_opt = _tiny_fp16()
        fresh_opt.loss_scaler = DynamicLossScaler(init_scale=2.0**20, scale_window=WINDOW, hysteresis=HYSTERESIS)
        fresh_opt.load_state_dict(state)
        for overflow in continuation:
            _, skipped = _optimizer_step(fresh, fresh_opt, overflow)
            _optimizer_step(original, original_opt, overflow)
            assert skipped == overflow
            assert fresh_opt.loss_scaler.state_dict() == original_opt.loss_scaler.state_dict(), continuation
        assert torch.equal(fresh.module.weight, original.module.weight)
        assert fresh_opt.loss_scale != 2.0**11  # the continuation moved the scale


# --- the lr schedule on a skipped step --------------------------------------------------------------


def test_overflow_step_advances_neither_lr_schedule_nor_optimizer(single_process_group):
    from training import train_step

    torch.manual_seed(0)
    model = FP16_Module(torch.nn.Linear(8, 4), torch.float16)
    optimizer = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                               DynamicLossScaler(init_scale=2.0**10, hysteresis=1))
    scheduler = AnnealingLR(optimizer, start_lr=1e-2, warmup_iter=10, num_iters=100, decay_style="cosine")
    overflow = {"now": False}
    model.module.weight.register_hook(lambda g: g * float("inf") if overflow["now"] else g)

    def forward_step(batch, model):
        loss = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(1))).square().mean()
        return loss, {"lm_loss": loss.detach()}

    args = SimpleNamespace(clip_grad=1.0)
    train_step(forward_step, None, model, optimizer, scheduler, args)  # a clean step first
    lr, iters = optimizer.param_groups[0]["lr"], scheduler.num_iters
    weights = [p.detach().clone() for p in model.parameters()] + [m.detach().clone() for m in optimizer.master_params]
    adam_steps = [float(s["step"]) for s in optimizer.optimizer.state.values()]
    overflow["now"] = True
    metrics, grad_norm, skipped = train_step(forward_step, None, model, optimizer, scheduler, args)
    assert skipped and not math.isfinite(grad_norm) and math.isfinite(metrics["lm_loss"].item())
    assert scheduler.num_iters == iters and optimizer.param_groups[0]["lr"] == lr
    assert optimizer.loss_scale == 2.0**9
    assert [float(s["step"]) for s in optimizer.optimizer.state.values()] == adam_steps
    after = list(model.parameters()) + optimizer.master_params
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, weights, strict=True))
    overflow["now"] = False
    _, _, skipped = train_step(forward_step, None, model, optimizer, scheduler, args)
    assert not skipped and scheduler.num_iters == iters + 1 and optimizer.param_groups[0]["lr"] > lr
