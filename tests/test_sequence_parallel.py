"""``--sequence-parallel`` end to end (its mpu pieces: tests/test_mpu_sequence_parallel.py).

Sequence parallelism changes where activations live, not what is computed: without dropout a model's loss
and (after the step's reduction of the ``sequence_parallel`` parameters) its gradients equal those of the
plain model-parallel model of the same size, and a training run's losses equal the plain run's. With
dropout the masks on the sequence slices come from the model-parallel stream, differ across ranks, replay
exactly under activation checkpointing and survive a stop and resume. And it holds less activation
memory per rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mpu
from conversion.layout import build_model, model_layout, model_parallel_of_one
from model.bert import BertModel, bert_config
from model.gpt2 import GPT2Model
from model.transformer import TransformerConfig
from performance import SavedActivationMeter
from tests.distributed import run_distributed
from tests.helpers import bert_args, bert_losses, gpt2_args, gpt2_losses, train_bert, train_gpt2

SEED = 11


# --- building ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_a_sequence_parallel_model_has_the_plain_models_tensors_and_layout(model):
    """Checkpoints, resharding and Hugging Face conversion build models on the meta device, outside any run,
    from stored configs that may say ``sequence_parallel``: the same names, shapes and layout come out."""
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=16)
    configs = [(TransformerConfig if model == "gpt2" else bert_config)(**shape, sequence_parallel=sp)
               for sp in (False, True)]
    assert model_layout(model, configs[0]) == model_layout(model, configs[1])
    with model_parallel_of_one():
        plain, split = ({name: tuple(t.shape) for name, t in build_model(model, config).state_dict().items()}
                        for config in configs)
    assert list(plain.items()) == list(split.items())


def test_decoding_with_a_kv_cache_refuses_a_sequence_parallel_model(single_process_group):
    net = _build("gpt2", sequence_parallel=True)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="KV cache is not sequence-parallel"):
        net(tokens, torch.arange(4).unsqueeze(0), kv_cache=net.allocate_kv_cache(1))


# --- one model, forward and backward, at model-parallel size 2 ------------------------------------------------------


def _batch(model: str, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    """The same batch on every rank."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    if model == "gpt2":
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
    keep = torch.ones(batch, seq, dtype=torch.long)
    keep[0, seq - 3:] = 0  # padding, which the attention mask must hide from every query
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "types": (torch.arange(seq) >= seq // 2).long()
            .expand(batch, seq), "keep": keep, "lm": torch.rand(batch, seq, generator=gen) < 0.3,
            "nsp": torch.randint(0, 2, (batch,), generator=gen)}


def _build(model: str, **config) -> torch.nn.Module:
    torch.manual_seed(SEED)  # the same weights whatever the flags
    mpu.model_parallel_cuda_manual_seed(SEED)  # and the same random streams
    config = {**dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_sequence_length=16),
              **config}
    return GPT2Model(TransformerConfig(**config)) if model == "gpt2" else BertModel(bert_config(**config))


def _loss(model: str, net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if model == "gpt2":
        positions = torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"])
        return mpu.vocab_parallel_cross_entropy(net(batch["tokens"], positions), batch["labels"]).mean()
    lm_logits, nsp_logits = net(batch["tokens"], batch["types"], batch["keep"], batch["lm"])
    lm = mpu.vocab_parallel_cross_entropy(lm_logits, batch["labels"][batch["lm"]]).mean()
    return lm + F.cross_entropy(nsp_logits, batch["nsp"])


def _step(model: str, **config) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of a fresh model on a 16-token batch: the loss and every gradient, after the
    reduction of the ``sequence_parallel`` parameters that ``training.train_step`` does."""
    net = _build(model, **config)
    loss = _loss(model, net, _batch(model, 4, 16, 64))
    loss.backward()
    mpu.allreduce_sequence_parallel_gradients(net)
    return loss.item(), {name: param.grad for name, param in net.named_parameters()}


def _compare_with_plain(model: str) -> list[str]:
    mpu.initialize_model_parallel(2)
    dropout_off = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    plain_loss, plain = _step(model, **dropout_off)
    tagged = [name for name, param in _build(model, sequence_parallel=True).named_parameters()
              if getattr(param, "sequence_parallel", False)]
    for checkpointed in (False, True):
        loss, grads = _step(model, **dropout_off, sequence_parallel=True, checkpoint_activations=checkpointed)
        assert loss == pytest.approx(plain_loss, abs=1e-6), checkpointed
        assert list(grads) == list(plain)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    return tagged


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_loss_and_gradients_equal_the_plain_model_parallel_ones(model):
    tagged = run_distributed(_compare_with_plain, 2, model)[0]
    # The parameters applied to a slice of the sequence: every LayerNorm on the residual stream and the
    # row-parallel biases; not the heads' (BERT's pooler, LM-head LayerNorm), which see the gathered sequence.
    per_layer = ["input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                 "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias"]
    expected = [f"transformer.layers.{i}.{name}" for i in range(2) for name in per_layer]
    if model == "gpt2":
        expected += ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]
    else:
        expected = ["embeddings.layernorm.weight", "embeddings.layernorm.bias", *expected]
    assert sorted(tagged) == sorted(expected)


def _dropout_masks_and_replay() -> dict[str, bool]:
    mpu.initialize_model_parallel(2)
    net = _build("gpt2", hidden_dropout=0.5, attention_dropout=0.0, sequence_parallel=True)
    masks: list[torch.Tensor] = []

    def record(module, inputs, output):
        masks.append((output == 0) & (inputs[0] != 0))

    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record)
    batch = _batch("gpt2", 4, 16, 64)
    _loss("gpt2", net, batch)
    assert len(masks) == 5 and all(mask.shape == (4, 8, 32) for mask in masks)  # embeddings, 2 per layer
    differ = True
    for mask in masks:  # the masks of the two sequence slices
        pieces = [torch.empty(mask.shape, dtype=torch.uint8) for _ in range(2)]
        dist.all_gather(pieces, mask.to(torch.uint8), group=mpu.get_model_parallel_group())
        differ = differ and not torch.equal(pieces[0], pieces[1])
    # Checkpointed, the recomputation in backward must draw the same masks as the forward did (or the
    # gradients would belong to another network than the loss): the gradients equal the plain ones'.
    dropout_on = {"hidden_dropout": 0.3, "attention_dropout": 0.3, "sequence_parallel": True}
    loss, plain = _step("gpt2", **dropout_on)
    loss_checkpointed, checkpointed = _step("gpt2", **dropout_on, checkpoint_activations=True)
    replayed = loss == loss_checkpointed and all(torch.equal(plain[name], checkpointed[name]) for name in plain)
    return {"masks differ across ranks": differ, "checkpointing replays them": replayed}


def test_dropout_on_the_slices_differs_across_ranks_and_replays_under_checkpointing():
    results = run_distributed(_dropout_masks_and_replay, 2)
    assert results == [{"masks differ across ranks": True, "checkpointing replays them": True}] * 2


def _peak_activations(sequence_parallel: bool) -> int:
    """Peak saved activations of one forward and backward of a GPT2Model on this rank, model-parallel 2.

    Hidden dropout is on (its masks are activations too); attention dropout is off, since its
    ``(b, n/p, s, s)`` probabilities and mask, split by heads under either scheme, would swamp this tiny
    width's residual stream.
    """
    mpu.initialize_model_parallel(2)
    config = dict(hidden_size=64, max_sequence_length=64, hidden_dropout=0.1, attention_dropout=0.0)
    net = _build("gpt2", **config, sequence_parallel=sequence_parallel)
    with SavedActivationMeter(net.parameters()) as saved:
        _loss("gpt2", net, _batch("gpt2", 4, 64, 64)).backward()
    return saved.peak


def test_sequence_parallel_holds_fewer_activations(capsys):
    plain = run_distributed(_peak_activations, 2, False)
    split = run_distributed(_peak_activations, 2, True)
    assert len(set(plain)) == len(set(split)) == 1  # the same on both ranks
    ratio = split[0] / plain[0]
    with capsys.disabled():
        print(f"\nGPT2 (2 layers, h 64, s 64, b 4, fp32) at model-parallel 2: peak saved activations per rank "
              f"{plain[0]} B plain, {split[0]} B sequence-parallel, ratio {ratio:.3f}")
    # What stays whole per rank is what tensor parallelism splits already (q, k, v, the attention context,
    # the MLP's 4h/p columns); the LayerNorm inputs and outputs, the column layers' inputs and the dropout
    # masks shrink by p. About 3/4 here.
    assert ratio < 0.8


# --- training runs ----------------------------------------------------------------------------------------------------

RUNS = {"gpt2": (gpt2_args, train_gpt2, gpt2_losses), "bert": (bert_args, train_bert, bert_losses)}
FEW_EVALUATIONS = {"--eval-interval": 1000, "--eval-iters": 1}  # validation at 0 and 20 only: the losses are trained


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "bert"])
@pytest.mark.parametrize("mp,sequence_parallel", [
    pytest.param(2, {"--sequence-parallel": True}, id="mp2"),
    pytest.param(4, {"--sequence-parallel": True, "--checkpoint-activations": True}, id="mp4-checkpointed"),
])
def test_training_losses_equal_the_plain_run(tmp_path, model, mp, sequence_parallel):
    make_args, train, losses = RUNS[model]
    logs = {}
    for name, extra in (("plain", {}), ("sp", sequence_parallel)):
        logs[name] = str(tmp_path / name)
        run_distributed(train, mp, make_args(tmp_path, **FEW_EVALUATIONS, **extra,
                                             **{"--model-parallel-size": mp, "--log-dir": logs[name]}))
    plain, got = losses(logs["plain"]), losses(logs["sp"])
    assert sorted(plain) == sorted(got) == list(range(1, 21))
    for iteration, value in plain.items():
        assert got[iteration] == pytest.approx(value, abs=1e-5), iteration


@pytest.mark.slow
def test_a_stopped_and_resumed_run_with_dropout_matches_the_unbroken_one_bitwise(tmp_path):
    common = {"--model-parallel-size": 2, "--sequence-parallel": True, "--hidden-dropout": 0.1,
              "--attention-dropout": 0.1, "--checkpoint-activations": True, "--resume-dataloader": True,
              **FEW_EVALUATIONS}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 10,
                                                                    "--log-dir": resumed}))
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "10"
    run_distributed(train_gpt2, 2, gpt2_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt,
                                                                    "--log-dir": resumed}))
    expected, got = gpt2_losses(unbroken), gpt2_losses(resumed)
    assert sorted(got) == list(range(1, 21))
    for iteration in range(1, 21):
        assert got[iteration] == expected[iteration], iteration  # bitwise in fp32
