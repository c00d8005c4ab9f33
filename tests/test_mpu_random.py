"""Tests of mpu/random.py: the RNG states tracker, per-rank dropout streams and checkpointing."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mpu
from tests.distributed import run_distributed

EXACT = {"rtol": 0, "atol": 0}


def _stream(seed, *sizes):
    """What a fresh generator seeded with ``seed`` gives for successive ``torch.rand`` calls."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=gen) for size in sizes]


# ---------------------------------------------------------------- tracker semantics (serial)


def test_fork_draws_from_the_named_stream_and_keeps_its_place():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    with tracker.fork("a"):
        first = torch.rand(5)
    with tracker.fork("a"):
        second = torch.rand(5)
    expected = _stream(7, 5, 5)
    torch.testing.assert_close(first, expected[0], **EXACT)
    torch.testing.assert_close(second, expected[1], **EXACT)


def test_fork_leaves_the_default_stream_where_it_was():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    torch.manual_seed(3)
    before = torch.rand(4)
    with tracker.fork("a"):
        inside = torch.rand(4)
    after = torch.rand(4)
    expected = _stream(3, 4, 4)
    torch.testing.assert_close(before, expected[0], **EXACT)
    torch.testing.assert_close(after, expected[1], **EXACT)
    assert not torch.equal(inside, after)


def test_fork_restores_the_default_stream_when_the_block_raises():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    torch.manual_seed(3)
    with pytest.raises(ZeroDivisionError), tracker.fork("a"):
        torch.rand(4)
        raise ZeroDivisionError
    after = torch.rand(4)
    torch.testing.assert_close(after, _stream(3, 4)[0], **EXACT)
    with tracker.fork("a"):  # the tracked stream kept the draw made before the error
        resumed = torch.rand(4)
    torch.testing.assert_close(resumed, _stream(7, 4, 4)[1], **EXACT)


def test_two_streams_are_independent():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    with tracker.fork("a"):
        a1 = torch.rand(6)
    with tracker.fork("b"):
        b1 = torch.rand(6)
    with tracker.fork("a"):
        a2 = torch.rand(6)
    assert not torch.equal(a1, b1)
    torch.testing.assert_close(torch.stack([a1, a2]), torch.stack(_stream(1, 6, 6)), **EXACT)
    torch.testing.assert_close(b1, _stream(2, 6)[0], **EXACT)


def test_get_states_and_set_states_copy_and_replay():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    snapshot = tracker.get_states()
    snapshot_cpu = snapshot["a"]["cpu"].clone()
    with tracker.fork("a"):
        first = torch.rand(5)
    torch.testing.assert_close(snapshot["a"]["cpu"], snapshot_cpu, **EXACT)  # a copy, not the live state

    tracker.set_states(snapshot)
    with tracker.fork("a"):
        replayed = torch.rand(5)
    torch.testing.assert_close(replayed, first, **EXACT)
    torch.testing.assert_close(snapshot["a"]["cpu"], snapshot_cpu, **EXACT)  # set_states copied too

    tracker.set_states(snapshot)
    with tracker.fork("a"):
        again = torch.rand(5)
    torch.testing.assert_close(again, first, **EXACT)


def test_reset_forgets_names_and_seeds():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    with tracker.fork("a"):
        first = torch.rand(3)
    tracker.reset()
    assert tracker.get_states() == {}
    with pytest.raises(KeyError, match="'a' is not in the tracker"), tracker.fork("a"):
        pass
    tracker.add("a", 7)  # name and seed are free again
    with tracker.fork("a"):
        fresh = torch.rand(3)
    torch.testing.assert_close(fresh, first, **EXACT)


def test_duplicate_seed_or_name_and_unknown_fork_are_errors():
    tracker = mpu.RNGStatesTracker()
    tracker.add("a", 7)
    with pytest.raises(ValueError, match="seed 7 already exists"):
        tracker.add("b", 7)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 8)
    with pytest.raises(KeyError, match="'nope' is not in the tracker.*model_parallel_cuda_manual_seed"):
        with tracker.fork("nope"):
            pass
    assert sorted(tracker.get_states()) == ["a"]  # the failed adds left nothing behind


# ---------------------------------------------------------------- checkpoint (serial)


def _two_outputs(a, k, b, c, label):
    assert label == "scaled"  # non-tensor arguments reach the function on both passes
    return a * b * k, torch.tanh(a + c) * b


def _two_output_run(use_checkpoint, use_first):
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(4, 3, generator=gen) for _ in range(3))
    g1, g2 = (torch.randn(4, 3, generator=gen) for _ in range(2))
    a.requires_grad_()
    b.requires_grad_()
    args = (a, 3, b, c, "scaled")
    out1, out2 = mpu.checkpoint(_two_outputs, *args) if use_checkpoint else _two_outputs(*args)
    loss = (out2 * g2).sum() + ((out1 * g1).sum() if use_first else 0)
    loss.backward()
    return out1.detach(), out2.detach(), a.grad, b.grad, c.grad


@pytest.mark.parametrize("use_first", [True, False], ids=["both-outputs", "second-output-only"])
def test_checkpoint_with_non_tensor_args_and_two_outputs(use_first):
    plain = _two_output_run(False, use_first)
    ckpt = _two_output_run(True, use_first)
    for name, p, c in zip(("out1", "out2", "a.grad", "b.grad"), plain, ckpt):
        torch.testing.assert_close(c, p, **EXACT, msg=lambda m, name=name: f"{name}: {m}")
    assert ckpt[4] is None and plain[4] is None  # c needs no gradient


def test_checkpoint_refuses_autograd_grad():
    x = torch.randn(3, requires_grad=True)
    y = mpu.checkpoint(torch.sin, x)
    with pytest.raises(RuntimeError, match="backward"):
        torch.autograd.grad(y.sum(), x)


# ---------------------------------------------------------------- distributed

N_MASK = 64


def _gather_world(tensor):
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def _same(masks):
    return [[torch.equal(x, y) for y in masks] for x in masks]


def _dropout_masks():
    mpu.initialize_model_parallel(2)
    mpu.model_parallel_cuda_manual_seed(1234)
    ones = torch.ones(N_MASK)
    with mpu.get_cuda_rng_tracker().fork():
        inside = (F.dropout(ones, 0.5, training=True) != 0).long()
    outside = (F.dropout(ones, 0.5, training=True) != 0).long()
    torch.manual_seed(1234)  # the default stream resumed as if the fork had not been there
    expected_outside = (F.dropout(ones, 0.5, training=True) != 0).long()
    torch.testing.assert_close(outside, expected_outside, **EXACT)
    return {
        "inside": _same(_gather_world(inside)),
        "outside": _same(_gather_world(outside)),
        "inside_is_outside": torch.equal(inside, outside),
    }


def test_dropout_mask_is_per_model_parallel_rank_inside_fork_and_shared_outside():
    results = run_distributed(_dropout_masks, 4)
    # mp size 2: model-parallel rank = rank % 2; ranks 0, 2 and 1, 3 are data-parallel replicas.
    expected_inside = [[i % 2 == j % 2 for j in range(4)] for i in range(4)]
    for rank, out in enumerate(results):
        assert out["inside"] == expected_inside, f"rank {rank}"
        assert out["outside"] == [[True] * 4] * 4, f"rank {rank}"
        assert out["inside_is_outside"] is False, f"rank {rank}"


H = 4


def _block(x, column, row, p_inner, p_outer):
    h = column(x)  # (B, 4H/p): this rank's columns
    with mpu.get_cuda_rng_tracker().fork():
        h = F.dropout(h, p_inner, training=True)  # partitioned region: per-rank stream
    y = row(torch.tanh(h))  # (B, H), replicated
    return F.dropout(y, p_outer, training=True)  # replicated region: default stream


def _states_equal(a, b):
    return sorted(a) == sorted(b) and all(
        sorted(a[n]) == sorted(b[n]) and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def _checkpoint_replays_rng():
    mpu.initialize_model_parallel(2)
    mpu.model_parallel_cuda_manual_seed(1234)
    column = mpu.ColumnParallelLinear(H, 4 * H, gather_output=False)
    row = mpu.RowParallelLinear(4 * H, H, input_is_parallel=True)
    params = [column.weight, column.bias, row.weight, row.bias]
    gen = torch.Generator().manual_seed(9)
    x0, grad_out = torch.randn(8, H, generator=gen), torch.randn(8, H, generator=gen)
    tracker = mpu.get_cuda_rng_tracker()
    rng0, tracker0 = torch.get_rng_state(), tracker.get_states()

    def run(use_checkpoint, p_inner=0.5, p_outer=0.3):
        torch.set_rng_state(rng0)
        tracker.set_states(tracker0)
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_()
        args = (x, column, row, p_inner, p_outer)
        out = mpu.checkpoint(_block, *args) if use_checkpoint else _block(*args)
        # Draws between forward and backward must not be undone by the recomputation.
        between = torch.rand(3)
        with tracker.fork():
            between_tracked = torch.rand(3)
        out.backward(grad_out)
        grads = [x.grad, between, between_tracked] + [p.grad for p in params]
        return out.detach(), grads, torch.get_rng_state(), tracker.get_states()

    out, grads, rng, states = run(False)
    out_ckpt, grads_ckpt, rng_ckpt, states_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out, **EXACT)
    names = ("x.grad", "draw", "tracked draw", "column.weight.grad", "column.bias.grad", "row.weight.grad",
             "row.bias.grad")
    for name, g_ckpt, g in zip(names, grads_ckpt, grads):
        assert torch.equal(g_ckpt, g), f"{name} differs: {(g_ckpt - g).abs().max()}"
    # Both runs leave the streams at the same, advanced, place.
    assert torch.equal(rng_ckpt, rng) and not torch.equal(rng, rng0)
    assert _states_equal(states_ckpt, states) and not _states_equal(states, tracker0)

    # Both dropouts were really active: each changes the output on its own.
    no_dropout, _, _, _ = run(False, 0.0, 0.0)
    inner_only, _, _, _ = run(True, 0.5, 0.0)
    outer_only, _, _, _ = run(True, 0.0, 0.3)
    for name, o in (("both", out), ("inner", inner_only), ("outer", outer_only)):
        assert not torch.allclose(o, no_dropout), f"dropout {name} left the output unchanged"
    return float(out.abs().sum())


def test_checkpoint_with_dropout_in_and_out_of_fork_gives_exact_gradients():
    sums = run_distributed(_checkpoint_replays_rng, 2)
    assert sums[0] == sums[1] > 0  # the output is replicated over the model-parallel group
