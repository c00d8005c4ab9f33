"""The key/value cache: incremental decoding gives the logits of the full forward pass."""

import pytest
import torch

import mpu
from model import GPT2Model, TransformerConfig
from tests.distributed import run_distributed

CONFIG = TransformerConfig(
    num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=24,
    hidden_dropout=0.0, attention_dropout=0.0,
)


def _model() -> GPT2Model:
    """The same full weights at every model-parallel size: the whole world is one model-parallel group."""
    mpu.initialize_model_parallel(torch.distributed.get_world_size())
    mpu.model_parallel_cuda_manual_seed(3)
    return GPT2Model(CONFIG, parallel_output=False).eval()


def _positions(b: int, start: int, s: int) -> torch.Tensor:
    return torch.arange(start, start + s).unsqueeze(0).expand(b, s)


@torch.no_grad()
def _cached_equals_full_worker():
    model = _model()
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(5))
    full = model(tokens, _positions(3, 0, 20))
    cache = model.allocate_kv_cache(3)
    pieces = [(0, 6), (6, 7), (7, 10), (10, 11), (11, 20)]  # a prompt, single tokens and chunks after a cache
    cached = torch.cat([model(tokens[:, a:b], _positions(3, a, b - a), kv_cache=cache) for a, b in pieces], dim=1)
    assert cache.length == 20
    # Greedy continuation: recomputing the whole sequence each step against the cache, one token a step.
    seq, cache = tokens[:, :5].clone(), model.allocate_kv_cache(3)
    step_logits = model(seq, _positions(3, 0, 5), kv_cache=cache)[:, -1]
    recomputed, incremental = seq.clone(), seq.clone()
    for _ in range(10):
        full_next = model(recomputed, _positions(3, 0, recomputed.shape[1]))[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, full_next], dim=1)
        next_token = step_logits.argmax(-1, keepdim=True)
        incremental = torch.cat([incremental, next_token], dim=1)
        step_logits = model(next_token, _positions(3, incremental.shape[1] - 1, 1), kv_cache=cache)[:, -1]
    return full, cached, recomputed, incremental


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_decoding_matches_the_full_forward_pass(world_size):
    results = run_distributed(_cached_equals_full_worker, world_size)
    for full, cached, recomputed, incremental in results:
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        assert torch.equal(recomputed, incremental)
    if world_size == 2:  # both ranks hold the gathered logits, and they agree with each other
        torch.testing.assert_close(results[0][0], results[1][0])
        assert torch.equal(results[0][3], results[1][3])


@torch.no_grad()
def _left_padding_worker():
    model = _model()
    lengths = [7, 4, 2]
    rows = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], valid[i, width - len(row):] = row, True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal & valid.unsqueeze(1)) | torch.eye(width, dtype=torch.bool)  # padding sees itself only
    cache = model.allocate_kv_cache(len(rows), width + 3)
    prompt_logits = model(tokens, positions, mask.unsqueeze(1), kv_cache=cache)
    nxt = torch.tensor([[5], [6], [7]])
    step_mask = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], dim=1)[:, None, None, :]
    step_logits = model(nxt, positions[:, -1:] + 1, step_mask, kv_cache=cache)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, nxt[i]]).unsqueeze(0), _positions(1, 0, len(row) + 1))
        torch.testing.assert_close(prompt_logits[i, -1], alone[0, len(row) - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_logits[i, 0], alone[0, len(row)], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 10 positions"):
        for _ in range(3):
            model(nxt, positions[:, -1:] + 2, kv_cache=cache)
    return True


def test_left_padded_prompts_of_different_lengths_decode_like_each_alone():
    assert run_distributed(_left_padding_worker, 1) == [True]
