"""CUDA checks of the RNG tracker, the vocabulary-parallel cross entropy and checkpointing.

Skipped without CUDA (see conftest.py). The distributed ones run a world of 1 (gloo, no
collective on a group of one), which is enough to put the mpu code on CUDA tensors.
"""

import pytest
import torch
import torch.nn.functional as F

import mpu
from tests.distributed import run_distributed

pytestmark = pytest.mark.gpu

EXACT = {"rtol": 0, "atol": 0}


def test_tracker_fork_on_cuda_uses_its_own_streams_and_restores_the_default():
    torch.cuda.init()  # so that the tracker seeds CUDA streams, not only CPU ones
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    assert all("cuda" in state for state in tracker.get_states().values())
    ones = torch.ones(1024, device="cuda")
    torch.cuda.manual_seed(3)
    default_state = torch.cuda.get_rng_state()

    with tracker.fork("a"):
        mask_a = F.dropout(ones, 0.5, training=True) != 0
    with tracker.fork("b"):
        mask_b = F.dropout(ones, 0.5, training=True) != 0
    assert mask_a.is_cuda and not torch.equal(mask_a, mask_b)
    assert torch.equal(torch.cuda.get_rng_state(), default_state)

    default_mask = F.dropout(ones, 0.5, training=True) != 0
    torch.cuda.manual_seed(3)
    torch.testing.assert_close(default_mask, F.dropout(ones, 0.5, training=True) != 0, **EXACT)
    assert not torch.equal(default_mask, mask_a)

    tracker.reset()
    tracker.add("a", 1)
    with tracker.fork("a"):
        replayed = F.dropout(ones, 0.5, training=True) != 0
    torch.testing.assert_close(replayed, mask_a, **EXACT)


def _fp16_cross_entropy():
    mpu.initialize_model_parallel(1)
    vocab = 64
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, vocab, generator=gen).cuda()
    target = torch.randint(0, vocab, (4, 8), generator=gen).cuda()
    grad = (torch.rand(4, 8, generator=gen) + 0.5).cuda()

    half = logits.half().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(half, target)
    loss.backward(grad)
    assert half.grad.dtype == torch.float16

    def reference(inputs):
        inputs = inputs.detach().clone().requires_grad_()
        out = F.cross_entropy(inputs.view(-1, vocab), target.view(-1), reduction="none").view(4, 8)
        out.backward(grad)
        return out.detach(), inputs.grad

    # Against fp32 math on the same fp16 values: the loss is computed in fp32, the gradient is
    # rounded to fp16 (11 significant bits, so 2**-11 relative; 1e-3 leaves room).
    same_loss, same_grad = reference(half.float())
    torch.testing.assert_close(loss, same_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half.grad.float(), same_grad, rtol=1e-3, atol=1e-5)
    # Against the unrounded fp32 logits (|z| < 5): fp16 moves a logit by up to ~2.5e-3.
    fp32_loss, fp32_grad = reference(logits)
    torch.testing.assert_close(loss, fp32_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(half.grad.float(), fp32_grad, rtol=1e-2, atol=1e-3)
    return float(loss.sum())


def test_vocab_parallel_cross_entropy_fp16_on_cuda_matches_fp32():
    (total,) = run_distributed(_fp16_cross_entropy, 1)
    assert total > 0


def _block(x, column, row, p_inner, p_outer):
    h = column(x)
    with mpu.get_cuda_rng_tracker().fork():
        h = F.dropout(h, p_inner, training=True)
    return F.dropout(row(torch.tanh(h)), p_outer, training=True)


def _fp16_checkpoint():
    torch.cuda.init()
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(1234)
    column = mpu.ColumnParallelLinear(16, 64, gather_output=False).cuda().half()
    row = mpu.RowParallelLinear(64, 16, input_is_parallel=True).cuda().half()
    params = [column.weight, column.bias, row.weight, row.bias]
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(8, 16, generator=gen).cuda().half()
    grad_out = torch.randn(8, 16, generator=gen).cuda().half()
    tracker = mpu.get_cuda_rng_tracker()
    cpu0, cuda0, tracker0 = torch.get_rng_state(), torch.cuda.get_rng_state(), tracker.get_states()
    assert all("cuda" in state for state in tracker0.values())

    def run(use_checkpoint, p_inner=0.5, p_outer=0.3):
        torch.set_rng_state(cpu0)
        torch.cuda.set_rng_state(cuda0)
        tracker.set_states(tracker0)
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_()
        args = (x, column, row, p_inner, p_outer)
        out = mpu.checkpoint(_block, *args) if use_checkpoint else _block(*args)
        out.backward(grad_out)
        return out.detach(), [x.grad] + [p.grad for p in params], torch.cuda.get_rng_state()

    out, grads, cuda_after = run(False)
    out_ckpt, grads_ckpt, cuda_after_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out, **EXACT)
    for i, (g_ckpt, g) in enumerate(zip(grads_ckpt, grads)):
        assert g.dtype == torch.float16, i
        torch.testing.assert_close(g_ckpt, g, **EXACT, msg=lambda m, i=i: f"grad {i}: {m}")
    assert torch.equal(cuda_after_ckpt, cuda_after) and not torch.equal(cuda_after, cuda0)
    no_dropout, _, _ = run(False, 0.0, 0.0)
    assert not torch.equal(out, no_dropout)
    return float(out.float().abs().sum())


def test_checkpoint_gradients_equal_on_cuda_with_fp16_dropout():
    (total,) = run_distributed(_fp16_checkpoint, 1)
    assert total > 0
