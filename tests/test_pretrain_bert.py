"""BERT pretraining end to end on CPU: layouts agree, resume is exact, every tokenizer and TFRecords train."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import (
    BERT_WORDS,
    REAL_CACHE,
    bert_args,
    bert_losses,
    read_metrics,
    train_bert,
    write_bert_corpus,
    write_google_bert_tfrecord,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _falls(log_dir, key: str, first: int = 5, last: int = 5) -> tuple[float, float]:
    """Mean of ``key`` over the first and the last iterations of a run."""
    values = [r[key] for r in read_metrics(log_dir)]
    return sum(values[:first]) / first, sum(values[-last:]) / last


def _forward_step_against_direct_computation(folder: str) -> tuple[float, float, float, float, float]:
    import torch
    import torch.nn.functional as F

    import mpu
    import pretrain_bert
    from arguments import get_args
    from data_utils import build_bert_datasets, make_tokenizer
    from restore import decide_model_config

    mpu.initialize_model_parallel(1)
    args = get_args(bert_args(folder, **{"--hidden-size": 32, "--seq-length": 48,
                                         "--max-position-embeddings": 48}), defaults=pretrain_bert.FLAG_DEFAULTS)
    tokenizer = make_tokenizer("BertWordPieceTokenizer", args.vocab_file)
    train_set = build_bert_datasets(args.train_data, None, None, "1", 48, 5, tokenizer, False, None, 5,
                                    presplit_sentences=True)[0]
    samples = [train_set[i] for i in range(6)]
    batch = {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in samples[0]}
    assert batch["pad_mask"].any(), "the batch must hold padding for this test to mean anything"
    torch.manual_seed(0)
    mpu.model_parallel_cuda_manual_seed(0)
    model = pretrain_bert.model_provider(decide_model_config(args, tokenizer.vocab_size,
                                                             model_defaults=pretrain_bert.model_defaults(args)))
    model.eval()
    loss, metrics = pretrain_bert.forward_step_provider(args, tokenizer, torch.device("cpu"))(batch, model)
    # The reference: logits at every position, real tokens attended to, labels read where mask is 1.
    lm_logits, nsp_logits = model(batch["text"], batch["types"], (batch["pad_mask"] == 0).long())
    where = batch["mask"] == 1
    lm = F.cross_entropy(lm_logits[where], batch["mask_labels"][where])
    nsp = F.cross_entropy(nsp_logits, batch["is_random"])
    return metrics["lm_loss"].item(), lm.item(), metrics["nsp_loss"].item(), nsp.item(), loss.item()


def test_forward_step_is_the_mean_masked_lm_loss_plus_next_sentence_loss(tmp_path):
    write_bert_corpus(str(tmp_path))
    lm, lm_ref, nsp, nsp_ref, loss = run_distributed(_forward_step_against_direct_computation, 1, str(tmp_path))[0]
    assert lm == pytest.approx(lm_ref, rel=1e-5) and nsp == pytest.approx(nsp_ref, rel=1e-5)
    assert loss == pytest.approx(lm_ref + nsp_ref, rel=1e-5)


@pytest.mark.slow
def test_single_model_and_data_parallel_runs_give_the_same_losses(tmp_path):
    layouts = {"single": (1, 1, 4), "mp2": (2, 2, 4), "dp2": (2, 1, 2)}  # (world, mp, per-rank batch)
    results = {}
    for name, (world, mp, batch) in layouts.items():
        log_dir = str(tmp_path / name)
        argv = bert_args(tmp_path, **{"--model-parallel-size": mp, "--batch-size": batch, "--log-dir": log_dir})
        run_distributed(train_bert, world, argv)
        results[name] = bert_losses(log_dir)
    reference = results["single"]
    assert sorted(reference) == list(range(1, 21))
    for name in ("mp2", "dp2"):
        for iteration, (lm, nsp) in reference.items():
            assert results[name][iteration][0] == pytest.approx(lm, abs=1e-4), (name, iteration)
            assert results[name][iteration][1] == pytest.approx(nsp, abs=1e-4), (name, iteration)
    valid = read_metrics(str(tmp_path / "single"), "valid")
    assert [r["iteration"] for r in valid] == [0, 10, 20] and all("nsp_loss" in r for r in valid)


@pytest.mark.slow
def test_stopped_and_resumed_run_matches_an_unbroken_one_bitwise(tmp_path):
    common = {"--hidden-dropout": 0.1, "--attention-dropout": 0.1, "--checkpoint-activations": True,
              "--resume-dataloader": True, "--num-workers": 1, "--eval-iters": 0}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 10,
                                                                     "--log-dir": resumed}))
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt,
                                                                     "--log-dir": resumed}))
    expected, got = bert_losses(unbroken), bert_losses(resumed)
    assert sorted(got) == list(range(1, 21))
    for iteration in range(1, 21):
        assert got[iteration] == expected[iteration], iteration  # bitwise in fp32


@pytest.mark.slow
@pytest.mark.parametrize("precision", [["--fp16", "--fp32-embedding"], ["--bf16"]])
def test_half_precision_trains_and_the_loss_falls(tmp_path, precision):
    log_dir = str(tmp_path / "logs")
    argv = bert_args(tmp_path, **{"--log-dir": log_dir, "--train-iters": 80, "--lr": 3e-3, "--eval-iters": 0,
                                  "--loss-scale": 1024 if "--fp16" in precision else None})
    run_distributed(train_bert, 1, argv + precision)
    start, end = _falls(log_dir, "lm_loss")
    assert end < start - 0.25, (start, end)  # from log(real vocabulary) ~3.4 towards the data's ~3.1


def write_topic_corpus(folder, docs: int = 160, topics: int = 8) -> str:
    """Documents that each use one of ``topics`` disjoint word sets: a random B usually changes topic."""
    path = os.path.join(folder, "topics.json")
    per = len(BERT_WORDS) // topics
    with open(path, "w") as f:
        for d in range(docs):
            vocab = BERT_WORDS[(d % topics) * per:(d % topics + 1) * per]
            sentences = [" ".join(vocab[(d + s + j) % per] for j in range(3 + (d + s) % 4)) + "."
                         for s in range(3 + d % 4)]
            f.write(json.dumps({"text": "\n".join(sentences)}) + "\n")
    return path


@pytest.mark.slow
def test_next_sentence_head_learns_pairs_that_change_topic(tmp_path):
    # Only a model whose NSP label, pooler and segment layout line up can tell a random B by its topic.
    log_dir = str(tmp_path / "logs")
    argv = bert_args(tmp_path, **{"--train-data": write_topic_corpus(str(tmp_path)), "--batch-size": 8,
                                  "--train-iters": 400, "--lr": 3e-3, "--eval-iters": 0, "--log-dir": log_dir})
    run_distributed(train_bert, 1, argv)
    start, end = _falls(log_dir, "nsp_loss", first=20, last=50)
    assert start > 0.5 and end < 0.1, (start, end)


@pytest.mark.slow
def test_sentencepiece_model_is_trained_once_then_reused_and_character_level_trains(tmp_path):
    spm_path = str(tmp_path / "spm" / "bert.model")
    os.makedirs(os.path.dirname(spm_path))
    for attempt in ("trains", "reuses"):
        log_dir = str(tmp_path / f"spm_{attempt}")
        argv = bert_args(tmp_path, **{"--tokenizer-type": "SentencePieceTokenizer", "--vocab-file": None,
                                      "--tokenizer-path": spm_path, "--vocab-size": 60, "--log-dir": log_dir,
                                      "--train-iters": 30, "--lr": 3e-3, "--eval-iters": 0})
        run_distributed(train_bert, 1, argv)
        if attempt == "trains":
            stamp = os.path.getmtime(spm_path)
        start, end = _falls(log_dir, "lm_loss")
        assert end < start - 0.3, (attempt, start, end)
    assert os.path.getmtime(spm_path) == stamp, "an existing SentencePiece model must not be retrained"
    assert os.path.isfile(str(tmp_path / "spm" / "bert.vocab"))
    log_dir = str(tmp_path / "char")
    argv = bert_args(tmp_path, **{"--tokenizer-type": "CharacterLevelTokenizer", "--vocab-file": None,
                                  "--seq-length": 64, "--max-position-embeddings": 64, "--max-preds-per-seq": 10,
                                  "--log-dir": log_dir, "--train-iters": 30, "--lr": 3e-3, "--eval-iters": 0})
    run_distributed(train_bert, 1, argv)
    start, end = _falls(log_dir, "lm_loss")
    assert end < start - 0.3, (start, end)


def _tfrecords(folder, files: int, per_file: int, seq: int = 32, preds: int = 5) -> list[str]:
    """Files in Google's format whose masked tokens are predictable from their neighbours."""
    import random

    rng = random.Random(0)
    paths = []
    for f in range(files):
        records = []
        for _ in range(per_file):
            n = rng.randint(12, seq)
            ids = [2] + [5 + (rng.randint(0, 3) + j) % 20 for j in range(n - 3)] + [3, 3]
            positions = sorted(rng.sample(range(1, n - 2), rng.randint(1, preds)))
            labels = [ids[p] for p in positions]
            for p in positions:
                ids[p] = 4  # [MASK]
            pad = seq - n
            records.append({
                "input_ids": ids + [0] * pad, "input_mask": [1] * n + [0] * pad,
                "segment_ids": [0] * (n // 2) + [1] * (n - n // 2) + [0] * pad,
                "masked_lm_positions": positions + [0] * (preds - len(positions)),
                "masked_lm_ids": labels + [0] * (preds - len(labels)),
                "masked_lm_weights": [1.0] * len(positions) + [0.0] * (preds - len(positions)),
                "next_sentence_labels": [rng.randint(0, 1)],
            })
        path = os.path.join(folder, f"part-{f}.tfrecord")
        write_google_bert_tfrecord(path, records)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_tfrecords_train_with_two_data_parallel_ranks_reading_different_files(tmp_path):
    pytest.importorskip("tfrecord")
    train_files = _tfrecords(str(tmp_path), files=2, per_file=40)
    log_dir = str(tmp_path / "logs")
    argv = bert_args(tmp_path, **{"--use-tfrecords": True, "--train-data": train_files, "--split": None,
                                  "--presplit-sentences": False, "--batch-size": 4, "--train-iters": 30,
                                  "--lr": 3e-3, "--eval-iters": 0, "--log-dir": log_dir})
    run_distributed(train_bert, 2, argv)
    start, end = _falls(log_dir, "lm_loss")
    assert end < start - 0.3, (start, end)
    assert all("nsp_loss" in r for r in read_metrics(log_dir))


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain_bert.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)


def test_corrupt_tfrecord_is_one_clear_error(tmp_path):
    pytest.importorskip("tfrecord")
    path = _tfrecords(str(tmp_path), files=1, per_file=6)[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    argv = bert_args(tmp_path, **{"--use-tfrecords": True, "--train-data": path, "--split": None,
                                  "--presplit-sentences": False, "--eval-iters": 0, "--train-iters": 2})
    _assert_one_line_error(_run_cli(argv), path)


def test_tfrecords_without_max_preds_is_refused(tmp_path):
    argv = bert_args(tmp_path, **{"--use-tfrecords": True, "--max-preds-per-seq": None})
    _assert_one_line_error(_run_cli(argv), "--max-preds-per-seq")


def test_vocab_size_with_a_vocabulary_file_tokenizer_is_refused(tmp_path):
    _assert_one_line_error(_run_cli(bert_args(tmp_path, **{"--vocab-size": 100})), "--vocab-size")


def test_the_gpt2_npy_loader_is_refused_for_bert(tmp_path):
    argv = bert_args(tmp_path, **{"--train-data": None, "--use-npy-data-loader": True,
                                  "--train-data-path": str(tmp_path)})
    _assert_one_line_error(_run_cli(argv), "--use-npy-data-loader is a GPT2 flag", "pretrain_bert.py would ignore")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CACHE, "bert-uncased-vocab.txt"))
                    or not os.path.isfile(os.path.join(REAL_CACHE, "shakespeare.json")),
                    reason="real BERT vocabulary or sample corpus absent; run python tools/fetch_sample_data.py "
                           "--cache-dir cache")
def test_real_vocabulary_and_sample_corpus_train(tmp_path):
    log_dir = str(tmp_path / "logs")
    argv = bert_args(tmp_path, **{"--train-data": os.path.join(REAL_CACHE, "shakespeare.json"),
                                  "--vocab-file": None, "--cache-dir": REAL_CACHE, "--presplit-sentences": False,
                                  "--tokenizer-model-type": "bert-base-uncased", "--seq-length": 64,
                                  "--max-position-embeddings": 64, "--max-preds-per-seq": 10, "--hidden-size": 64,
                                  "--log-dir": log_dir, "--eval-iters": 1, "--split": "949,50,1"})
    run_distributed(train_bert, 1, argv)
    records = read_metrics(log_dir)
    assert [r["iteration"] for r in records] == list(range(1, 21))
    assert all(r["lm_loss"] > 0 and r["nsp_loss"] > 0 for r in records)


# --- --pretrained-bert ---------------------------------------------------------------------------------------------

def _started_hidden_states(argv: list[str], imported: str | None, ids, types, keep) -> list[np.ndarray]:
    """The hidden states and NSP logits of the model a ``--pretrained-bert`` run starts with (it takes no
    step), then with ``imported`` the hidden states of that checkpoint, read at the same model-parallel size."""
    import torch

    import pretrain_bert
    import training
    from arguments import get_args
    from checkpointing import load_checkpoint_state
    from model import BertModel, TransformerConfig

    built = []
    args = get_args(argv, defaults=pretrain_bert.FLAG_DEFAULTS)
    training.pretrain(args, lambda config: built.append(pretrain_bert.model_provider(config)) or built[-1],
                      pretrain_bert.data_provider, pretrain_bert.forward_step_provider,
                      pretrain_bert.model_defaults(args))
    models = [built[0].eval()]
    if imported:
        state = load_checkpoint_state(imported)
        models.append(BertModel(TransformerConfig(**{**state["config"], "hidden_dropout": 0.0,
                                                     "attention_dropout": 0.0})).eval())
        models[1].load_state_dict(state["model"])
    with torch.no_grad():
        hidden = [m.transformer(m.embeddings(ids, types), keep.bool()[:, None, None, :]).numpy() for m in models]
        return [models[0](ids, types, keep)[1].numpy(), *hidden]


@pytest.mark.slow
def test_pretrained_bert_starts_from_the_imported_weights_at_model_parallel_sizes_1_and_2(tmp_path):
    import torch

    from tests.helpers import load_tool, minilm_dir

    source, imported = minilm_dir(), str(tmp_path / "imported")
    load_tool("hf_checkpoint").main(["import", "--hf-dir", source, "--save", imported, "--seed", "5"])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(999, 30522, (2, 12), generator=gen)
    types = (torch.arange(12) >= 6).long().expand(2, 12).contiguous()
    keep = torch.ones_like(ids)
    keep[1, 9:] = 0
    real = keep.bool().numpy()
    argv = bert_args(tmp_path, **{"--pretrained-bert": True, "--tokenizer-model-type": source, "--vocab-file": None,
                                  "--num-layers": None, "--hidden-size": None, "--num-attention-heads": None,
                                  "--max-position-embeddings": None, "--train-iters": 0, "--eval-iters": 0})
    nsp, started, reference = run_distributed(_started_hidden_states, 1, argv, imported, ids, types, keep)[0]
    assert np.abs(reference[real]).mean() > 0.1  # real hidden states, not zeros
    np.testing.assert_allclose(started[real], reference[real], rtol=1e-5, atol=1e-5)
    for nsp_2, started_2 in run_distributed(_started_hidden_states, 2, argv + ["--model-parallel-size", "2"], None,
                                            ids, types, keep):
        np.testing.assert_allclose(started_2[real], reference[real], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(nsp_2, nsp, rtol=1e-5, atol=1e-5)  # the fresh heads are the same at every size


def _bert_main(argv: list[str], capsys) -> tuple[int, str]:
    """``pretrain_bert.py argv`` in this process, as its command line runs: (exit status, stderr)."""
    import pretrain_bert
    from initialize import run_main

    try:
        run_main(lambda: pretrain_bert.main(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_pretrained_bert_from_a_hub_name_is_one_line(tmp_path, capsys):
    argv = bert_args(tmp_path, **{"--pretrained-bert": True, "--tokenizer-model-type": "bert-large-uncased"})
    assert_one_line_error(*_bert_main(argv, capsys), "--tokenizer-model-type bert-large-uncased is not one",
                          "hubs are not reached", "--tokenizer-model-type DIR")


def test_pretrained_bert_is_refused_for_gpt2(tmp_path):
    import pretrain_gpt2
    from arguments import get_args
    from errors import ArgumentError
    from tests.helpers import gpt2_args

    with pytest.raises(ArgumentError, match="--pretrained-bert starts BERT"):
        pretrain_gpt2.run(get_args(gpt2_args(tmp_path, **{"--pretrained-bert": True})))
