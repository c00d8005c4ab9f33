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


# --- the output layer while decoding one sequence: a transposed copy of the tied embedding ------------

PADDED = TransformerConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=24,
    hidden_dropout=0.0, attention_dropout=0.0, unpadded_vocab_size=59,
)


def _decode_one_by_one(model: GPT2Model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (1, s, V or V/p) of ``tokens`` (1, s) fed one at a time through a KV cache, without autograd."""
    cache = model.allocate_kv_cache(1)
    with torch.no_grad():
        return torch.cat([model(tokens[:, i:i + 1], _positions(1, i, 1), kv_cache=cache)
                          for i in range(tokens.shape[1])], dim=1)


def _transposed_copy_worker(parallel_output: bool):
    mpu.initialize_model_parallel(torch.distributed.get_world_size())
    mpu.model_parallel_cuda_manual_seed(3)
    model = GPT2Model(PADDED, parallel_output=parallel_output).eval()
    tokens = torch.randint(0, 59, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():  # 9 rows: mpu.linear's small-batch (strided) form
        full = model(tokens, _positions(1, 0, 9)).clone()  # the plain output layer: (E_r H^T)^T
    assert model.decoding_output_weight() is not None  # the path under test is taken on this machine
    decoded = _decode_one_by_one(model, tokens)
    copy = model.decoding_output_weight()
    return full, decoded, tuple(copy.shape), copy.is_contiguous(), mpu.get_model_parallel_rank()


@pytest.mark.parametrize("world_size,parallel_output", [(1, True), (2, True), (2, False)])
def test_decoding_one_sequence_gives_the_plain_output_layers_logits(world_size, parallel_output):
    results = run_distributed(_transposed_copy_worker, world_size, parallel_output)
    serial = run_distributed(_transposed_copy_worker, 1, False)[0][0]  # (1, 9, V): the whole vocabulary
    width = 64 // world_size if parallel_output else 64
    for full, decoded, shape, contiguous, rank in results:
        assert shape == (32, 64 // world_size) and contiguous  # (h, V/p): this rank's slice, transposed
        assert decoded.shape == (1, 9, width)
        torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
        start = rank * width if parallel_output else 0
        torch.testing.assert_close(decoded, serial[..., start:start + width], atol=1e-5, rtol=1e-5)
        padded = torch.arange(start, start + width) >= 59  # the padded vocabulary gets the dtype's minimum
        for logits in (decoded, full):  # full: 9 rows through mpu.linear's small-batch (strided) form
            assert bool((logits[..., padded] == torch.finfo(logits.dtype).min).all())
            assert bool((logits[..., ~padded] > -1e4).all())


def _rebuilt_worker():
    model = _model()
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    weight = model.word_embeddings.weight
    checks = []

    def check(what: str) -> None:
        with torch.no_grad():
            full = model(tokens, _positions(1, 0, 6))  # F.linear with the weight as it is now
        decoded = _decode_one_by_one(model, tokens)
        checks.append((what, (decoded - full).abs().max().item(), full.abs().max().item()))

    check("first decoding")
    first_copy = model.decoding_output_weight()
    # An optimizer step (foreach in-place update of every parameter).
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    model(tokens, _positions(1, 0, 6)).square().mean().backward()
    optimizer.step()
    check("after an optimizer step")
    # load_state_dict copies into the same storage: only the version tells.
    other = GPT2Model(CONFIG, parallel_output=False)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3.0)
    model.load_state_dict(other.state_dict())
    check("after load_state_dict")
    # New storage at the same version: .data replaced, then assign=True.
    weight.data = torch.randn_like(weight) * 0.5
    check("after .data was replaced")
    model.load_state_dict({k: v * 0.5 for k, v in other.state_dict().items()}, assign=True)
    check("after load_state_dict(assign=True)")
    model.train()
    dropped = model._decoding_weight is None
    model.eval()
    check("after train() and eval()")
    return checks, first_copy is not model.decoding_output_weight(), dropped


def test_the_transposed_output_weight_is_made_again_whenever_the_weight_changes():
    [(checks, replaced, dropped)] = run_distributed(_rebuilt_worker, 1)
    for what, difference, scale in checks:
        assert scale > 0.01, what  # the logits are not all zero
        assert difference < 1e-5 * max(1.0, scale), f"{what}: decoded logits differ from the plain ones by {difference}"
    assert replaced and dropped


def _gradient_worker():
    model = _model().train()
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(4))  # ids 32..63 never fed
    weight = model.word_embeddings.weight
    _decode_one_by_one(model.eval(), tokens[:1])  # the decoding copy exists now
    assert model._decoding_weight is not None
    grads = []
    # A training step; one token through a cache with autograd on (the single row the copy serves).
    for batch, cache in ((tokens, None), (tokens[:1, :1], model.allocate_kv_cache(1))):
        model.train()
        model.zero_grad()
        b, s = batch.shape
        logits = model(batch, _positions(b, 0, s), kv_cache=cache)
        mpu.vocab_parallel_cross_entropy(logits, tokens.roll(-1, dims=1)[:b, :s]).mean().backward()
        grads.append(weight.grad.clone())
    return grads


def test_training_sends_the_output_layers_gradient_to_the_tied_embedding():
    for grad in run_distributed(_gradient_worker, 1)[0]:
        # Rows never fed as input get gradient only through the output layer, i.e. through E itself.
        unseen = grad[32:].abs().sum(dim=1)
        assert bool((unseen > 0).all()), unseen
