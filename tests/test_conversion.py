"""Checkpoint conversion: Hugging Face import/export parity, resharding, 2019 checkpoints, bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpu
from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import gpt2_args, minilm_dir, train_gpt2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(name: str, argv: list[str], capsys=None) -> tuple[int, str, str]:
    """Run a tool's main like its command line does: (exit status, stdout, stderr)."""
    from initialize import run_main

    tool = _tool(name)
    try:
        run_main(lambda: tool.main(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


def _perturb(model: torch.nn.Module) -> None:
    """Non-zero biases and LayerNorm parameters, so that a dropped or swapped one shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)


GPT2_VOCAB = 1001  # pads to 1024: the padded entries must get no probability


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=GPT2_VOCAB,
                                     bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    _perturb(hf)
    hf.save_pretrained(str(folder / "hf"))
    tokens = torch.randint(0, GPT2_VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, labels=tokens)
    return {"folder": folder, "hf": str(folder / "hf"), "tokens": tokens, "loss": out.loss.item(),
            "logits": out.logits}


def _gpt2_loss_worker(ckpt: str, tokens: torch.Tensor) -> float:
    from checkpointing import load_checkpoint_state
    from model import GPT2Model, TransformerConfig

    mp = torch.distributed.get_world_size()
    mpu.initialize_model_parallel(mp)
    try:
        mpu.model_parallel_cuda_manual_seed(0)
        state = load_checkpoint_state(ckpt)
        model = GPT2Model(TransformerConfig(**state["config"])).eval()
        model.load_state_dict(state["model"])
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        with torch.no_grad():
            logits = model(tokens[:, :-1], positions[:, :-1])
            return mpu.vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean().item()
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.parametrize("mp", [1, 2])
def test_imported_gpt2_gives_transformers_loss(hf_gpt2, mp, capsys):
    ckpt = str(hf_gpt2["folder"] / f"ours_mp{mp}")
    code, out, err = _run_tool("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", ckpt,
                                                 "--target-model-parallel-size", str(mp)], capsys)
    assert code == 0, err
    assert f"vocabulary {GPT2_VOCAB} padded to 1024" in out
    losses = run_distributed(_gpt2_loss_worker, mp, ckpt, hf_gpt2["tokens"])
    for loss in losses:
        assert loss == pytest.approx(hf_gpt2["loss"], abs=1e-5)


def test_gpt2_exported_back_loads_in_transformers_with_the_same_logits(hf_gpt2, capsys):
    ckpt, back = str(hf_gpt2["folder"] / "roundtrip_mp2"), str(hf_gpt2["folder"] / "exported")
    assert _run_tool("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", ckpt,
                                       "--target-model-parallel-size", "2"], capsys)[0] == 0
    code, out, err = _run_tool("hf_checkpoint", ["export", "--load", ckpt, "--hf-dir", back], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        logits = model(hf_gpt2["tokens"]).logits
    torch.testing.assert_close(logits, hf_gpt2["logits"], rtol=1e-5, atol=1e-5)


def test_resharding_to_a_size_that_does_not_split_the_vocabulary_pads_it_again(hf_gpt2, capsys):
    """1001 tokens unpadded at size 1 (divisible by 1); size 2 needs 1002, and the loss stays transformers'."""
    exact, resharded = str(hf_gpt2["folder"] / "unpadded"), str(hf_gpt2["folder"] / "repadded")
    assert _run_tool("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", exact,
                                       "--make-vocab-size-divisible-by", "1"], capsys)[0] == 0
    code, out, err = _run_tool("reshard_checkpoint", ["--load", exact, "--save", resharded,
                                                      "--target-model-parallel-size", "2"], capsys)
    assert code == 0, err
    assert "vocabulary 1002 (padded)" in out
    for loss in run_distributed(_gpt2_loss_worker, 2, resharded, hf_gpt2["tokens"]):
        assert loss == pytest.approx(hf_gpt2["loss"], abs=1e-5)


def _bert_outputs_worker(ckpt: str, ids, types, keep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from checkpointing import load_checkpoint_state
    from model import BertModel, TransformerConfig

    mpu.initialize_model_parallel(torch.distributed.get_world_size())
    try:
        mpu.model_parallel_cuda_manual_seed(0)
        state = load_checkpoint_state(ckpt)
        config = TransformerConfig(**{**state["config"], "hidden_dropout": 0.0, "attention_dropout": 0.0})
        model = BertModel(config, parallel_output=False).eval()
        model.load_state_dict(state["model"])
        with torch.no_grad():
            hidden = model.transformer(model.embeddings(ids, types), keep.bool()[:, None, None, :])
            lm, nsp = model(ids, types, keep)
        # numpy crosses the result queue by value (a tensor would be shared memory of an exiting process)
        return hidden.numpy(), lm.numpy(), nsp.numpy()
    finally:
        mpu.destroy_model_parallel()


def _bert_inputs(vocab: int, length: int = 12):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, vocab, (2, length), generator=gen)
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    keep = torch.ones_like(ids)
    keep[1, length - 3:] = 0
    return ids, types, keep


def test_bert_for_pretraining_round_trip_at_model_parallel_two(tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24)).eval()
    _perturb(hf)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt, back = str(tmp_path / "ours"), str(tmp_path / "back")
    code, _, err = _run_tool("hf_checkpoint", ["import", "--hf-dir", str(tmp_path / "hf"), "--save", ckpt,
                                               "--target-model-parallel-size", "2"], capsys)
    assert code == 0, err
    ids, types, keep = _bert_inputs(90)
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=keep, output_hidden_states=True)
    real = keep.bool()
    for outputs in run_distributed(_bert_outputs_worker, 2, ckpt, ids, types, keep):
        hidden, lm, nsp = map(torch.from_numpy, outputs)
        torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm[..., :90][real], ref.prediction_logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    resharded = str(tmp_path / "ours_mp4")  # BERT's tensors (LM-head bias, token types) reshard too
    assert _run_tool("reshard_checkpoint", ["--load", ckpt, "--save", resharded,
                                            "--target-model-parallel-size", "4"], capsys)[0] == 0
    for outputs in run_distributed(_bert_outputs_worker, 4, resharded, ids, types, keep):
        hidden, lm, nsp = map(torch.from_numpy, outputs)
        torch.testing.assert_close(lm[..., :90][real], ref.prediction_logits[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    assert _run_tool("hf_checkpoint", ["export", "--load", ckpt, "--hf-dir", back], capsys)[0] == 0
    again = transformers.BertForPreTraining.from_pretrained(back).eval()
    with torch.no_grad():
        out = again(input_ids=ids, token_type_ids=types, attention_mask=keep)
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, rtol=1e-5, atol=1e-5)


def test_real_minilm_bert_weights_give_transformers_hidden_states(tmp_path, capsys):
    source = minilm_dir()
    ckpt, back = str(tmp_path / "minilm"), str(tmp_path / "minilm_hf")
    code, out, err = _run_tool("hf_checkpoint", ["import", "--hf-dir", source, "--save", ckpt], capsys)
    assert code == 0, err
    assert "newly initialised" in out and "cls.predictions.bias" in out  # a BertModel has no heads
    assert os.path.isfile(os.path.join(ckpt, "vocab.txt")) and "--vocab-file" in out
    ids, types, keep = _bert_inputs(30522, 16)
    ref_model = transformers.BertModel.from_pretrained(source).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, token_type_ids=types, attention_mask=keep).last_hidden_state
    hidden = torch.from_numpy(run_distributed(_bert_outputs_worker, 1, ckpt, ids, types, keep)[0][0])
    real = keep.bool()
    torch.testing.assert_close(hidden[real], ref[real], rtol=1e-5, atol=1e-5)
    assert _run_tool("hf_checkpoint", ["export", "--load", ckpt, "--hf-dir", back], capsys)[0] == 0
    assert os.path.isfile(os.path.join(back, "vocab.txt"))
    again = transformers.BertModel.from_pretrained(back).eval()
    with torch.no_grad():
        got = again(input_ids=ids, token_type_ids=types, attention_mask=keep).last_hidden_state
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Resharding a trained checkpoint
# ------------------------------------------------------------------------------------------------


def _train_args(folder, **overrides):
    common = {"--train-iters": 12, "--eval-interval": 6, "--resume-dataloader": True, "--lr-decay-style": "linear"}
    return gpt2_args(folder, **{**common, **overrides})


def _losses_by_split(log_dir: str) -> dict[tuple[str, int], float]:
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return {(r["split"], r["iteration"]): r["lm_loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_resharded_checkpoint_resumes_with_the_unbroken_runs_losses(tmp_path, capsys):
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, 2, _train_args(tmp_path, **{"--model-parallel-size": 2, "--log-dir": unbroken}))
    ckpt = str(tmp_path / "ckpt_mp2")
    run_distributed(train_gpt2, 2, _train_args(tmp_path, **{"--model-parallel-size": 2, "--save": ckpt,
                                                             "--exit-interval": 6, "--log-dir": str(tmp_path / "a")}))
    expected = _losses_by_split(unbroken)
    for target in (1, 4):
        out = str(tmp_path / f"ckpt_mp{target}")
        code, _, err = _run_tool("reshard_checkpoint", ["--load", ckpt, "--save", out,
                                                        "--target-model-parallel-size", str(target)], capsys)
        assert code == 0, err
        logs = str(tmp_path / f"resumed_mp{target}")
        run_distributed(train_gpt2, target, _train_args(tmp_path, **{"--model-parallel-size": target, "--load": out,
                                                                      "--log-dir": logs}))
        got = _losses_by_split(logs)
        assert {key for key in got if key[0] == "train"} == {("train", i) for i in range(7, 13)}
        # Iteration 7's loss is the resharded weights' own; validation and test at the end follow.
        assert ("valid", 12) in got and ("test", 12) in got
        for key, loss in got.items():
            assert loss == pytest.approx(expected[key], abs=1e-5), (target, key)


def _bf16_checkpoint_worker(argv: list[str]) -> None:
    train_gpt2(argv)


def test_reshard_round_trip_keeps_every_tensor_and_the_half_precision_masters(tmp_path):
    from checkpointing import read_all_ranks
    from conversion import reshard_states

    ckpt = str(tmp_path / "bf16")
    run_distributed(_bf16_checkpoint_worker, 2, _train_args(tmp_path, **{
        "--model-parallel-size": 2, "--bf16": True, "--train-iters": 2, "--eval-iters": 0, "--save": ckpt}))
    _, states = read_all_ranks(ckpt)
    assert states[0]["optimizer"]["fp32_master_params"], "bf16 training keeps fp32 masters"
    for target in (1, 4):
        there = reshard_states(states, target)
        assert len(there) == target and all(s["model_parallel_size"] == target for s in there)
        assert all(s["args"]["model_parallel_size"] == target for s in there)
        back = reshard_states(there, 2)
        for original, returned in zip(states, back):
            _assert_same(original["model"], returned["model"])
            _assert_same(original["optimizer"], returned["optimizer"])
            assert "tracker" not in returned["rng"] and returned["iteration"] == original["iteration"]
            assert "lr_scheduler" in there[0] and "data" in there[0]
            for key in set(original) - {"model", "optimizer", "rng", "args"}:
                _assert_same(original[key], returned[key])  # iteration, schedule, data position, config, ...
    single = reshard_states(states, 1)[0]
    masters = single["optimizer"]["fp32_master_params"]
    # Each master holds its parameter's full tensor: at size 1 they round to the bf16 weights.
    from conversion import model_layout, model_type_of
    from model import TransformerConfig

    layout = model_layout(model_type_of(single["model"]), TransformerConfig(**single["config"]))
    half = [n for n in layout.optimizer_order if single["model"][n].dtype != torch.float32]
    for name, master in zip(half, masters, strict=True):
        torch.testing.assert_close(master.to(torch.bfloat16), single["model"][name], rtol=0, atol=0)


def test_repadding_resizes_the_optimizer_state_with_the_weights(tmp_path):
    from checkpointing import read_all_ranks
    from conversion import padded_size, reshard_states
    from model import TransformerConfig

    ckpt = str(tmp_path / "unpadded")  # 263 tokens, padded by 1: size 2 needs 264 rows
    run_distributed(_bf16_checkpoint_worker, 1, _train_args(tmp_path, **{
        "--bf16": True, "--train-iters": 1, "--eval-iters": 0, "--save": ckpt, "--make-vocab-size-divisible-by": 1}))
    _, states = read_all_ranks(ckpt)
    assert states[0]["config"]["vocab_size"] == states[0]["config"]["unpadded_vocab_size"] == 263
    there = reshard_states(states, 2, divisible_by=1)
    order = [n for n in _optimizer_order(there[0]) if there[0]["model"][n].dtype != torch.float32]
    index = _optimizer_order(there[0]).index("word_embeddings.weight")
    for state in there:
        assert state["config"]["vocab_size"] == 264
        local = state["model"]["word_embeddings.weight"]
        assert local.shape[0] == 132
        moments = state["optimizer"]["optimizer"]["state"][index]
        master = state["optimizer"]["fp32_master_params"][order.index("word_embeddings.weight")]
        for tensor in (moments["exp_avg"], moments["exp_avg_sq"], master):
            assert tensor.shape == local.shape
    last = there[1]
    for tensor in (last["model"]["word_embeddings.weight"], last["optimizer"]["optimizer"]["state"][index]["exp_avg"]):
        assert (tensor[-1] == 0).all() and (tensor[-2] != 0).any()  # the one new row is zero
    # The padding rule for a size that doesn't split the vocabulary: a multiple of lcm(divisible_by, size).
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=4, vocab_size=1002,
                               max_sequence_length=4, unpadded_vocab_size=1001)
    assert padded_size(config, 4, 2) == 1004 and padded_size(config, 2, 128) == 1002


def _optimizer_order(state) -> list[str]:
    from conversion import model_layout, model_type_of
    from model import TransformerConfig

    return model_layout(model_type_of(state["model"]), TransformerConfig(**state["config"])).optimizer_order


def _assert_same(a, b) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------------------------
# Megatron-LM 2019 checkpoints
# ------------------------------------------------------------------------------------------------


def _write_2019_checkpoint(folder: str, model_type: str, vocab: int, mp: int, nested: bool = False):
    """A checkpoint as the 2019 code wrote it: full pickles with an argparse namespace and numpy rng
    state, the vocabulary padded to a multiple of 128 x model-parallel size. Returns (full weights, config)."""
    from conversion import build_model, model_layout, model_parallel_of_one
    from model import TransformerConfig, bert_config

    padded_2019 = -(-vocab // (128 * mp)) * (128 * mp)
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=padded_2019,
                 max_sequence_length=16, hidden_dropout=0.0, attention_dropout=0.0)
    config = bert_config(**shape) if model_type == "bert" else TransformerConfig(**shape)
    torch.manual_seed(3)
    with model_parallel_of_one():
        mpu.model_parallel_cuda_manual_seed(3)
        model = build_model(model_type, config, device="cpu")
    _perturb(model)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = model_layout(model_type, config)
    for rank in range(mp):
        local = {}
        for name, tensor in full.items():
            if name in layout.split:
                tensor = mpu.partition_tensor(tensor, mp, rank, *layout.split[name])
            local[_name_2019(model_type, name)] = tensor.clone()
        if model_type == "bert":
            local["cls.predictions.decoder_weight"] = local["bert.embeddings.word_embeddings.weight"]
        namespace = argparse.Namespace(num_layers=2, hidden_size=32, num_attention_heads=4,
                                       max_position_embeddings=16, model_parallel_size=mp,
                                       make_vocab_size_divisible_by=128, tokenizer_type="BertWordPieceTokenizer")
        state = {"iteration": 5000, "model": local, "args": namespace, "random_rng_state": (3, tuple(range(625)), None),
                 "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state(),
                 "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
        if nested:  # NGC's 2020 GPT-2 release: language_model -> embedding / transformer
            state["model"] = {"language_model": {
                "embedding": {k: {"weight": local.pop(f"{k}.weight")}
                              for k in ("word_embeddings", "position_embeddings")},
                "transformer": {k.removeprefix("transformer."): v for k, v in local.items()}}}
            del state["args"]
        path = os.path.join(folder, "iter_0005000", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5000")
    return full, config


def _name_2019(model_type: str, ours: str) -> str:
    if model_type == "gpt2":
        return ours
    from conversion import BERT_LAYER_NAMES, BERT_TOP_NAMES

    if ours in BERT_TOP_NAMES:
        return BERT_TOP_NAMES[ours]
    _, _, index, rest = ours.split(".", 3)
    if rest.startswith("attention.query_key_value"):
        return f"bert.encoder.layer.{index}.attention.self.{rest[len('attention.'):]}"
    return f"bert.encoder.layer.{index}.{BERT_LAYER_NAMES[rest]}"


@pytest.mark.parametrize("model_type,vocab,given,nested", [
    ("gpt2", 300, True, False), ("bert", 90, True, False), ("gpt2", 50257, False, False), ("gpt2", 300, True, True)])
def test_2019_checkpoint_imports_only_with_trust_pickle(tmp_path, capsys, model_type, vocab, given, nested):
    from checkpointing import read_all_ranks
    from conversion import full_model_state, pad_2019
    from model import pad_vocab_size

    assert pad_2019(50257, 128, 1) == 50304 and pad_2019(50257, 128, 2) == 50432 and pad_2019(30522, 128, 1) == 30592
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    full, _ = _write_2019_checkpoint(old, model_type, vocab, mp=2, nested=nested)
    code, _, err = _run_tool("import_megatron2019", ["--load", old, "--save", new], capsys)
    assert_one_line_error(code, err, "--trust-pickle", "run code")
    assert not os.path.exists(new)
    heads = ["--num-attention-heads", "4"] if nested else []  # no namespace stored: the flag says
    if nested:
        code, _, err = _run_tool("import_megatron2019", ["--load", old, "--save", new, "--trust-pickle"], capsys)
        assert_one_line_error(code, err, "--num-attention-heads")
    code, out, err = _run_tool("import_megatron2019", ["--load", old, "--save", new, "--trust-pickle", *heads,
                                                       *(["--vocab-size", str(vocab)] if given else [])], capsys)
    assert code == 0, err
    if not given:
        assert "vocabulary 50257, recognised by its 2019 padding to 50432" in out
    iteration, states = read_all_ranks(new)
    assert iteration == "release" and len(states) == 1
    _, config, got = full_model_state(states)
    assert config.unpadded_vocab_size == vocab and config.vocab_size == pad_vocab_size(vocab, 128, 1)
    for name, tensor in full.items():
        expected = tensor[:config.vocab_size] if got[name].shape != tensor.shape else tensor
        assert torch.equal(got[name], expected), name


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_and_write_nothing(hf_gpt2, tmp_path, capsys):
    out = str(tmp_path / "out")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        ("hf_checkpoint", ["import", "--hf-dir", str(tmp_path / "nowhere"), "--save", out], ["nowhere", "no such"]),
        ("hf_checkpoint", ["import", "--hf-dir", str(odd), "--save", out], ["LlamaForCausalLM", "unsupported"]),
        ("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", out, "--target-model-parallel-size", "3"],
         ["model-parallel size 3", "attention heads"]),
        ("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", str(existing)], ["already exists"]),
        ("hf_checkpoint", ["export", "--load", str(tmp_path / "nowhere"), "--hf-dir", out], ["no such"]),
        ("reshard_checkpoint", ["--load", str(tmp_path / "nowhere"), "--save", out,
                                "--target-model-parallel-size", "2"], ["no such"]),
    ]
    for tool, argv, fragments in cases:
        code, _, err = _run_tool(tool, argv, capsys)
        assert_one_line_error(code, err, *fragments)
        assert not os.path.exists(out), argv
        assert (existing / "keep.txt").read_text() == "mine" and os.listdir(existing) == ["keep.txt"]
    leftovers = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert not leftovers
    imported = str(hf_gpt2["folder"] / "for_bad_reshard")
    assert _run_tool("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", imported], capsys)[0] == 0
    code, _, err = _run_tool("reshard_checkpoint", ["--load", imported, "--save", out,
                                                    "--target-model-parallel-size", "8"], capsys)
    assert_one_line_error(code, err, "model-parallel size 8", "attention heads")
    assert not os.path.exists(out)


def test_a_write_that_fails_midway_leaves_no_output(hf_gpt2, tmp_path, capsys, monkeypatch):
    import checkpointing

    imported = str(tmp_path / "mp2")
    assert _run_tool("hf_checkpoint", ["import", "--hf-dir", hf_gpt2["hf"], "--save", imported,
                                       "--target-model-parallel-size", "2"], capsys)[0] == 0
    real_save, calls = checkpointing._atomic_torch_save, []

    def disk_full_on_second_file(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpointing, "_atomic_torch_save", disk_full_on_second_file)
    out = str(tmp_path / "out")
    code, _, err = _run_tool("reshard_checkpoint", ["--load", imported, "--save", out,
                                                    "--target-model-parallel-size", "4"], capsys)
    assert_one_line_error(code, err, "no space left on the device (ENOSPC)", "nothing was written")
    assert len(calls) == 2 and not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    monkeypatch.undo()
    # A rank folder gone missing: the files say size 2, the folder holds 1.
    import shutil

    shutil.rmtree(os.path.join(imported, "release", "mp_rank_01"))
    code, _, err = _run_tool("hf_checkpoint", ["export", "--load", imported, "--hf-dir", out], capsys)
    assert_one_line_error(code, err, "says model-parallel size 2")
    assert not os.path.exists(out)


def test_padded_vocabulary_gets_no_probability():
    """The padded entries' logits are the dtype's minimum on whichever rank holds them."""
    from model import TransformerConfig
    from model.transformer import mask_padded_vocab

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=12,
                               max_sequence_length=4, unpadded_vocab_size=9)
    logits = torch.zeros(2, 12)
    from conversion import model_parallel_of_one

    with model_parallel_of_one():
        masked = mask_padded_vocab(logits.clone(), config)
    assert (masked[:, :9] == 0).all() and (masked[:, 9:] == torch.finfo(torch.float32).min).all()
    assert F.softmax(masked, dim=-1)[:, 9:].sum() == 0


# ------------------------------------------------------------------------------------------------
# Using an import: finetuning without shape flags, --load-openai in generation and evaluation
# ------------------------------------------------------------------------------------------------

NO_SHAPE = {"--num-layers": None, "--hidden-size": None, "--num-attention-heads": None,
            "--max-position-embeddings": None}


@pytest.fixture(scope="module")
def hf_tiny_bpe(tmp_path_factory) -> dict:
    """A Hugging Face GPT2 over the test BPE vocabulary, saved and imported."""
    from data_utils import make_tokenizer

    folder = tmp_path_factory.mktemp("hf_tiny_bpe")
    argv = gpt2_args(folder)
    vocab, merges = argv[argv.index("--vocab-file") + 1], argv[argv.index("--merge-file") + 1]
    size = make_tokenizer("GPT2BPETokenizer", vocab, merges).vocab_size
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, n_positions=16, vocab_size=size, bos_token_id=size - 1,
        eos_token_id=size - 1)).eval()
    _perturb(hf)
    hf.save_pretrained(str(folder / "hf"))
    imported = str(folder / "imported")  # padded by another rule than the training default: runs keep its padding
    assert _run_tool("hf_checkpoint", ["import", "--hf-dir", str(folder / "hf"), "--save", imported,
                                       "--make-vocab-size-divisible-by", "1"], None)[0] == 0
    return {"folder": folder, "hf": str(folder / "hf"), "imported": imported, "hf_model": hf}


def _inference_logits(argv: list[str]) -> tuple[tuple, np.ndarray]:
    from arguments import distributed_settings, get_args
    from data_utils import make_tokenizer
    from initialize import initialize_distributed
    from restore import load_gpt2_for_inference

    args = get_args(argv)
    device = initialize_distributed(**distributed_settings(args))
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    model, loaded = load_gpt2_for_inference(args, tokenizer, device, parallel_output=False)
    tokens = torch.arange(10).unsqueeze(0) * 7 % tokenizer.vocab_size
    with torch.no_grad():
        logits = model(tokens, torch.arange(10).unsqueeze(0))
    shape = (loaded.config.num_layers, loaded.config.hidden_size, loaded.config.num_attention_heads)
    return shape, logits[..., :tokenizer.vocab_size].numpy()


@pytest.mark.parametrize("mp", [1, 2])
def test_load_openai_converts_a_hugging_face_folder_in_memory(hf_tiny_bpe, mp):
    base = {**NO_SHAPE, "--model-parallel-size": mp}
    direct = run_distributed(_inference_logits, mp, gpt2_args(hf_tiny_bpe["folder"], **base, **{
        "--load": hf_tiny_bpe["hf"], "--load-openai": True}))
    tokens = torch.arange(10).unsqueeze(0) * 7 % hf_tiny_bpe["hf_model"].config.vocab_size
    with torch.no_grad():
        expected = hf_tiny_bpe["hf_model"](tokens).logits
    for shape, logits in direct:
        assert shape == (3, 32, 4)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_finetuning_an_import_takes_its_shape_without_flags(hf_tiny_bpe):
    from checkpointing import read_all_ranks

    save = str(hf_tiny_bpe["folder"] / "finetuned")
    argv = gpt2_args(hf_tiny_bpe["folder"], **NO_SHAPE, **{
        "--load": hf_tiny_bpe["imported"], "--finetune": True, "--save": save, "--train-iters": 2,
        "--eval-iters": 0})
    run_distributed(train_gpt2, 1, argv)
    iteration, states = read_all_ranks(save)
    config = states[0]["config"]
    assert iteration == 2
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"],
            config["max_sequence_length"]) == (3, 32, 4, 16)
    assert config["vocab_size"] == config["unpadded_vocab_size"], "the import's padding (none) is kept"
    _, original = read_all_ranks(hf_tiny_bpe["imported"])
    name = "transformer.layers.2.mlp.dense_4h_to_h.weight"
    diff = (states[0]["model"][name] - original[0]["model"][name]).abs().max().item()
    assert 0 < diff < 0.05, "two small steps from the imported weights"


def test_resharding_repads_from_the_tokenizers_vocabulary_not_the_padded_rows(single_process_group):
    """1005 real tokens trained at model-parallel size 4 (divisible by 1): 1008 rows. Resharded to 5 they
    become pad_vocab_size(1005, 1, 5) = 1005 rows; re-padding the 1008 rows would give 1010."""
    import dataclasses

    from conversion import reshard_states
    from model import GPT2Model, TransformerConfig, pad_vocab_size

    real, divisible_by = 1005, 1
    config = TransformerConfig(num_layers=1, hidden_size=20, num_attention_heads=20, max_sequence_length=4,
                               vocab_size=pad_vocab_size(real, divisible_by, 4), unpadded_vocab_size=real)
    assert config.vocab_size == 1008 and pad_vocab_size(config.vocab_size, divisible_by, 5) == 1010
    state = {"iteration": 3, "model_parallel_size": 1, "model": GPT2Model(config).state_dict(),
             "config": dataclasses.asdict(config), "args": {"make_vocab_size_divisible_by": divisible_by}}
    at_4 = reshard_states([state], 4, divisible_by=divisible_by)  # as a run at size 4 saves it
    assert [s["config"]["vocab_size"] for s in at_4] == [1008] * 4
    at_5 = reshard_states(at_4, 5, divisible_by=divisible_by)
    rows = pad_vocab_size(real, divisible_by, 5)
    assert all(s["config"]["vocab_size"] == rows == 1005 for s in at_5)
    assert sum(s["model"]["word_embeddings.weight"].shape[0] for s in at_5) == rows


def test_exported_files_share_the_umasks_mode(tiny_gpt2_run, tmp_path, capsys):
    """safetensors writes through a 0600 temporary; the export gives model.safetensors config.json's mode."""
    _, ckpt = tiny_gpt2_run
    out = tmp_path / "hf"
    previous = os.umask(0o022)
    try:
        assert _run_tool("hf_checkpoint", ["export", "--load", ckpt, "--hf-dir", str(out)], capsys)[0] == 0
    finally:
        os.umask(previous)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
