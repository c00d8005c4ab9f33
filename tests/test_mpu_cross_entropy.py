"""Tests of mpu/cross_entropy.py against torch.nn.functional.cross_entropy on the full logits.

Logits, targets and upstream gradients depend on the data-parallel rank only, so the ranks of a
model-parallel group share one full problem and each feeds its own vocabulary slice.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mpu
from tests.distributed import run_distributed

WORLD = 4
BATCH, SEQ, VOCAB = 3, 4, 16


def _problem(scale=1.0):
    gen = torch.Generator().manual_seed(11 + mpu.get_data_parallel_rank())
    logits = torch.randn(BATCH, SEQ, VOCAB, generator=gen) * scale
    # Targets in every quarter of the vocabulary, so every rank owns some of them at size 4.
    target = (torch.arange(BATCH * SEQ) * 5 + torch.randint(0, VOCAB, (1,), generator=gen)) % VOCAB
    target = target.view(BATCH, SEQ)
    assert set((target // (VOCAB // 4)).flatten().tolist()) == {0, 1, 2, 3}
    grad = torch.rand(BATCH, SEQ, generator=gen) + 0.5
    return logits, target, grad


def _reference(logits, target, grad):
    """Loss and logits gradient of the serial torch cross entropy, in the dtype of ``logits``."""
    logits = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), reduction="none").view(BATCH, SEQ)
    loss.backward(grad.to(loss.dtype))
    return loss.detach(), logits.grad


def _local(logits):
    mp, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    return logits.chunk(mp, -1)[rank].clone().requires_grad_()


def _parallel(local, target, grad):
    loss = mpu.vocab_parallel_cross_entropy(local, target)
    loss.backward(grad)
    return loss.detach(), local.grad


def _check_matches_torch():
    logits, target, grad = _problem()
    local = _local(logits)
    local_before = local.detach().clone()
    loss, local_grad = _parallel(local, target, grad)
    loss_ref, grad_ref = _reference(logits, target, grad)
    # Another order of max, exp and sum than torch's log_softmax: a few ulps on values of order 1.
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local_grad, _local(grad_ref).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local.detach(), local_before, rtol=0, atol=0)  # input not modified


def _check_large_logits():
    logits, target, grad = _problem(scale=1000.0)
    loss, local_grad = _parallel(_local(logits), target, grad)
    loss_ref, grad_ref = _reference(logits.double(), target, grad)
    assert torch.isfinite(loss).all(), loss
    assert loss.max().item() > 100.0, loss  # the scale made the problem hard
    # Losses reach thousands; fp32 keeps ~7 digits, so 1e-6 relative is the tightest fair bound.
    torch.testing.assert_close(loss, loss_ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local_grad, _local(grad_ref.float()).detach(), rtol=1e-6, atol=1e-6)


def _check_bf16():
    logits, target, grad = _problem()
    rounded = logits.bfloat16()
    local = _local(rounded)
    loss, local_grad = _parallel(local, target, grad)
    assert local_grad.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    # Computed in fp32 from the bf16 values: as tight as fp32 against fp32 math on the same values.
    loss_same_input, grad_same_input = _reference(rounded.float(), target, grad)
    torch.testing.assert_close(loss, loss_same_input, rtol=1e-6, atol=1e-6)
    # The gradient is rounded to bf16 (8 significant bits): within 2**-8 relative of fp32.
    torch.testing.assert_close(
        local_grad.float(), _local(grad_same_input).detach(), rtol=2**-8, atol=1e-6
    )
    # Against the unrounded fp32 logits: bf16 moves each logit by up to 2**-9 relative (|z| < 4
    # here), so the loss may move by ~1e-2.
    loss_fp32, _ = _reference(logits, target, grad)
    torch.testing.assert_close(loss, loss_fp32, rtol=1e-2, atol=2e-2)


def _over_sizes(check, sizes):
    done = []
    for mp in sizes:
        mpu.initialize_model_parallel(mp)
        check()
        done.append((mp, dist.get_rank()))
        mpu.destroy_model_parallel()
    return done


def _expected(sizes, world):
    return [[(mp, rank) for mp in sizes] for rank in range(world)]


def test_matches_torch_cross_entropy_forward_and_backward():
    sizes = (1, 2, 4)
    assert run_distributed(_over_sizes, WORLD, _check_matches_torch, sizes) == _expected(sizes, WORLD)


def test_logits_scaled_by_1000_give_finite_loss_equal_to_float64():
    sizes = (1, 2)
    assert run_distributed(_over_sizes, 2, _check_large_logits, sizes) == _expected(sizes, 2)


def test_bf16_logits_give_bf16_grad_and_fp32_accurate_loss():
    sizes = (1, 2)
    assert run_distributed(_over_sizes, 2, _check_bf16, sizes) == _expected(sizes, 2)
