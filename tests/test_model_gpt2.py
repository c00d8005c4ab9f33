"""GPT2 model: model-parallel invariance of weights, loss and gradients; masks and positions."""

import torch

import mpu
from model import GPT2Model, TransformerConfig, get_masks_and_position_ids
from tests.distributed import gather_full_parameters, run_distributed

CONFIG = TransformerConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=16,
    hidden_dropout=0.0, attention_dropout=0.0,
)


def _loss_and_grads(model, tokens, reset):
    mask, position_ids = get_masks_and_position_ids(tokens[:, :-1], 3, reset, reset)
    logits = model(tokens[:, :-1], position_ids, mask)
    loss = mpu.vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach()


def _invariance_worker(checkpointed):
    config = TransformerConfig(**{**CONFIG.__dict__, "checkpoint_activations": checkpointed})
    results = {}
    for mp in (1, 2, 4):
        mpu.initialize_model_parallel(mp)
        try:
            mpu.model_parallel_cuda_manual_seed(7)
            model = GPT2Model(config)
            weights = gather_full_parameters(model)
            tokens = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(11))
            tokens[1, 4] = 3  # an end-of-document token to exercise the reset masks
            loss = _loss_and_grads(model, tokens, reset=True)
            results[mp] = (weights, loss, gather_full_parameters(model, grads=True))
        finally:
            mpu.destroy_model_parallel()
    ref_weights, ref_loss, ref_grads = results[1]
    for mp in (2, 4):
        weights, loss, grads = results[mp]
        assert weights.keys() == ref_weights.keys()
        for name in ref_weights:
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=0, atol=0, msg=f"{mp} {name}")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for name in ref_grads:
            # Sums over heads and vocabulary shards change the float summation order: 1e-5.
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=f"{mp} {name}")
    return ref_loss.item()


def test_gpt2_same_full_weights_loss_and_grads_at_every_model_parallel_size():
    losses = run_distributed(_invariance_worker, 4, False)
    assert len(set(losses)) == 1 and 3.0 < losses[0] < 5.0  # near log(64) at initialisation


def test_gpt2_checkpointed_activations_match_across_sizes():
    run_distributed(_invariance_worker, 4, True)


def test_masks_and_positions_restart_after_end_of_document():
    tokens = torch.tensor([[5, 6, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6, 7]])
    mask, positions = get_masks_and_position_ids(tokens, eod_token=0, reset_position_ids=True,
                                                 reset_attention_mask=True)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6]]
    expected_first = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert mask.shape == (2, 1, 7, 7)
    assert torch.equal(mask[0, 0], expected_first)
    assert torch.equal(mask[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_masks_default_to_plain_causal():
    tokens = torch.tensor([[5, 0, 7]])
    mask, positions = get_masks_and_position_ids(tokens, 0, False, False)
    assert mask is None and positions.tolist() == [[0, 1, 2]]


def test_partition_and_merge_are_inverse_for_strided_weights():
    full = torch.arange(24.0).view(12, 2)
    parts = [mpu.partition_tensor(full, 2, r, dim=0, stride=3) for r in range(2)]
    # Blocks of 2 rows: rank 0 keeps blocks 0, 2, 4 (the first half of Q, K and V).
    assert parts[0][:, 0].tolist() == [0.0, 2.0, 8.0, 10.0, 16.0, 18.0]
    assert torch.equal(mpu.merge_partitions(parts, dim=0, stride=3), full)
