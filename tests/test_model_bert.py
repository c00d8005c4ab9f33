"""BERT model: parity with Hugging Face ``BertForPreTraining``, model-parallel invariance, masks, init."""

from __future__ import annotations

import pytest
import torch

import mpu
from conversion import hf_to_full, release_states
from model import BertModel, bert_config
from tests.distributed import gather_full_parameters, run_distributed

VOCAB, PADDED = 90, 128
CONFIG = bert_config(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=PADDED,
                     max_sequence_length=24, hidden_dropout=0.0, attention_dropout=0.0, intermediate_size=48)


def _inputs(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    keep = torch.ones_like(ids)
    keep[1, 14:] = 0  # padding at the end of two samples
    keep[2, 17:] = 0
    return ids, types, keep


def _parity_worker(mp: int) -> None:
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so a dropped one shows
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    mpu.initialize_model_parallel(mp)
    try:
        mpu.model_parallel_cuda_manual_seed(0)
        model = BertModel(CONFIG).eval()
        # The import's own path: renamed and padded to PADDED rows, then this rank's slice by the layout.
        full, fresh = hf_to_full("bert", hf.state_dict(), CONFIG, "BertForPreTraining")
        assert fresh == []
        states = release_states("bert", CONFIG, full, mp, {}, "BertForPreTraining")
        model.load_state_dict(states[mpu.get_model_parallel_rank()]["model"])
        ids, types, keep = _inputs()
        with torch.no_grad():
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=keep, output_hidden_states=True)
            hidden = model.transformer(model.embeddings(ids, types), keep.bool()[:, None, None, :])
            model.parallel_output = False
            lm, nsp = model(ids, types, keep)
            lm_masked, _ = model(ids, types, keep, lm_positions=keep)
        real = keep.bool()
        torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm[..., :VOCAB][real], ref.prediction_logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm_masked[:, :VOCAB], ref.prediction_logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.parametrize("mp", [1, 2])
def test_same_hidden_states_and_logits_as_transformers(mp):
    pytest.importorskip("transformers")
    run_distributed(_parity_worker, mp, mp)


def _loss(model, ids, types, keep):
    lm, nsp = model(ids, types, keep, lm_positions=keep)
    labels = torch.roll(ids, 1, dims=1)[keep.bool()]
    loss = mpu.vocab_parallel_cross_entropy(lm, labels).mean() + torch.nn.functional.cross_entropy(
        nsp, torch.tensor([0, 1, 1]))
    loss.backward()
    return loss.detach()


def _invariance_worker(checkpointed: bool) -> float:
    config = bert_config(**{**CONFIG.__dict__, "checkpoint_activations": checkpointed})
    results = {}
    for mp in (1, 2, 4):
        mpu.initialize_model_parallel(mp)
        try:
            mpu.model_parallel_cuda_manual_seed(7)
            model = BertModel(config)
            weights = gather_full_parameters(model)
            loss = _loss(model, *_inputs())
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
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=f"{mp} {name}")
    return ref_loss.item()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_same_full_weights_loss_and_grads_at_every_model_parallel_size(checkpointed):
    losses = run_distributed(_invariance_worker, 4, checkpointed)
    assert len(set(losses)) == 1 and 4.0 < losses[0] < 6.5  # about log(128) + log(2) at initialisation


def test_attention_is_bidirectional_and_ignores_padding(single_process_group):
    mpu.model_parallel_cuda_manual_seed(0)
    model = BertModel(CONFIG).eval()
    ids, types, keep = _inputs()
    with torch.no_grad():
        lm, nsp = model(ids, types, keep)
        changed_pad = ids.clone()
        changed_pad[1, 15] = (ids[1, 15] + 1) % VOCAB  # a padding position of sample 1
        lm_pad, nsp_pad = model(changed_pad, types, keep)
        changed_last = ids.clone()
        changed_last[0, -1] = (ids[0, -1] + 1) % VOCAB  # the last real token of sample 0
        lm_last, _ = model(changed_last, types, keep)
    real = keep.bool()
    torch.testing.assert_close(lm_pad[real], lm[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(nsp_pad, nsp, rtol=0, atol=1e-6)
    assert (lm_last[0, 0] - lm[0, 0]).abs().max() > 1e-4, "the first token must see the last one"


def test_initialisation_scales_and_deep_init(single_process_group):
    torch.manual_seed(0)
    wide = bert_config(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=256,
                       max_sequence_length=64)
    model = BertModel(wide)
    for name, param in model.named_parameters():
        if name.endswith("bias") or "layernorm" in name:
            expected = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            assert torch.all(param == expected), name
        else:
            assert abs(param.std().item() - 0.02) < 0.003, name
    torch.manual_seed(0)
    deep = BertModel(bert_config(**{**wide.__dict__, "scaled_init": True}))
    scaled = 0.02 / (2 * 4) ** 0.5
    for name, param in deep.named_parameters():
        if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            assert abs(param.std().item() - scaled) < 0.001, name
        elif name.endswith("query_key_value.weight"):
            assert abs(param.std().item() - 0.02) < 0.003, name


def test_post_layernorm_and_exact_gelu_are_options_of_the_shared_layer(single_process_group):
    from model.transformer import ParallelTransformerLayer

    mpu.model_parallel_cuda_manual_seed(0)
    layer = ParallelTransformerLayer(CONFIG).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = layer.input_layernorm(x + layer.attention(x, None))
        mlp = layer.mlp
        ffn = mlp.dense_4h_to_h(torch.nn.functional.gelu(mlp.dense_h_to_4h(h), approximate="none"))
        expected = layer.post_attention_layernorm(h + ffn)
        torch.testing.assert_close(layer(x, None), expected, rtol=0, atol=0)
        # The first token must see the last one (no causal mask without an explicit one).
        y = x.clone()
        y[:, -1] += 1.0
        assert (layer(y, None)[:, 0] - layer(x, None)[:, 0]).abs().max() > 1e-4
    assert layer.mlp.dense_h_to_4h.weight.shape == (48, 32)


def test_fp32_islands_and_no_weight_decay_on_the_lm_bias(single_process_group):
    from types import SimpleNamespace

    from fp16 import FP16_Module
    from training import _fp32_islands, get_optimizer

    mpu.model_parallel_cuda_manual_seed(0)
    flags = SimpleNamespace(fp32_embedding=False, fp32_tokentypes=True, fp32_layernorm=True)
    model = FP16_Module(BertModel(CONFIG), torch.bfloat16, keep_fp32=_fp32_islands(flags))
    dtypes = {name: p.dtype for name, p in model.module.named_parameters()}
    assert dtypes["embeddings.tokentype_embeddings.weight"] == torch.float32
    assert dtypes["embeddings.word_embeddings.weight"] == torch.bfloat16
    assert dtypes["embeddings.position_embeddings.weight"] == torch.bfloat16
    assert all(dtypes[n] == torch.float32 for n in dtypes if "layernorm" in n)
    assert dtypes["transformer.layers.0.attention.query_key_value.weight"] == torch.bfloat16
    ids, types, keep = _inputs()
    lm, nsp = model(ids, types, keep, lm_positions=keep)
    assert lm.dtype == torch.float32 and torch.isfinite(lm).all() and torch.isfinite(nsp).all()

    optimizer = get_optimizer(model, SimpleNamespace(weight_decay=0.01, lr=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                                                     adam_eps=1e-8, device="cpu"))
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    names = {id(p): n for n, p in model.module.named_parameters()}
    assert id(model.module.lm_head.bias) in no_decay
    assert {names[i] for i in no_decay} == {n for n in names.values() if n.endswith("bias") or "layernorm" in n}
