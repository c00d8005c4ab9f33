"""GPT2 pretraining end to end on CPU: layouts agree, resume is exact, bad input fails clearly."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import gpt2_args, gpt2_losses, read_metrics, run_gpt2_cli, train_gpt2


@pytest.mark.slow
def test_single_model_data_and_hybrid_parallel_runs_give_the_same_losses(tmp_path):
    layouts = {  # name: (world size, model-parallel size, per-rank batch) with a global batch of 4
        "single": (1, 1, 4), "mp2": (2, 2, 4), "dp2": (2, 1, 2), "mp2xdp2": (4, 2, 2),
    }
    losses = {}
    for name, (world, mp, batch) in layouts.items():
        log_dir = str(tmp_path / name)
        argv = gpt2_args(tmp_path, **{"--model-parallel-size": mp, "--batch-size": batch, "--log-dir": log_dir})
        run_distributed(train_gpt2, world, argv)
        losses[name] = gpt2_losses(log_dir)
    reference = losses["single"]
    assert sorted(reference) == list(range(1, 21))
    assert reference[20] < reference[1] - 0.5, "the loss should fall on this repetitive corpus"
    for name in ("mp2", "dp2", "mp2xdp2"):
        for iteration, value in reference.items():
            assert losses[name][iteration] == pytest.approx(value, abs=1e-4), (name, iteration)


@pytest.mark.slow
@pytest.mark.parametrize("world,mp", [(1, 1), (2, 2)])
def test_stopped_and_resumed_run_matches_an_unbroken_one_bitwise(tmp_path, world, mp):
    common = {"--model-parallel-size": mp, "--hidden-dropout": 0.1, "--attention-dropout": 0.1,
              "--checkpoint-activations": True, "--resume-dataloader": True}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, world, gpt2_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    first = gpt2_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 10, "--log-dir": resumed})
    run_distributed(train_gpt2, world, first)
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "10"
    second = gpt2_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt, "--log-dir": resumed})
    run_distributed(train_gpt2, world, second)
    expected, got = gpt2_losses(unbroken), gpt2_losses(resumed)
    assert sorted(got) == list(range(1, 21))
    for iteration in range(1, 21):
        assert got[iteration] == expected[iteration], iteration  # bitwise in fp32


@pytest.mark.slow
def test_checkpoints_without_optimizer_schedule_or_data_state_resume_on_the_flags_schedule(tmp_path, capfd):
    import torch

    unbroken, ckpt, resumed = str(tmp_path / "unbroken"), str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--log-dir": unbroken}))
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--save": ckpt, "--exit-interval": 10,
                                                          "--no-save-optim": True}))
    path = os.path.join(ckpt, "iter_0000010", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    assert "optimizer" not in state and "lr_scheduler" not in state  # Megatron: --no-save-optim drops both
    del state["data"]  # as an older checkpoint would be
    torch.save(state, path)
    capfd.readouterr()
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--load": ckpt, "--log-dir": resumed,
                                                          "--resume-dataloader": True, "--lr": 2e-3}))
    out = capfd.readouterr().out
    assert out.count("holds no lr-scheduler state; the lr schedule follows the flags from iteration 10") == 1, out
    assert out.count("holds no data-loader position") == 1, out
    expected = {r["iteration"]: r["lr"] for r in read_metrics(unbroken)}
    got = {r["iteration"]: r["lr"] for r in read_metrics(resumed)}
    assert sorted(got) == list(range(11, 21))
    for iteration in got:  # the cosine schedule continues at iteration 10 with the new peak
        assert got[iteration] == pytest.approx(expected[iteration] * 2, rel=1e-6), iteration
    # A checkpoint with its schedule, resumed with other schedule flags, says what changed once.
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--save": ckpt, "--load": ckpt, "--train-iters": 30,
                                                          "--lr": 1e-3}))
    capfd.readouterr()
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--load": ckpt, "--train-iters": 32, "--lr": 5e-4}))
    out = capfd.readouterr().out
    assert out.count("differs from the checkpoint's (start_lr 0.001 -> 0.0005") == 1, out


def test_a_bert_only_precision_flag_on_gpt2_says_it_does_nothing(tmp_path, capfd):
    argv = gpt2_args(tmp_path, **{"--bf16": True, "--fp32-tokentypes": True, "--train-iters": 1, "--eval-iters": 0})
    run_distributed(train_gpt2, 1, argv)
    assert capfd.readouterr().out.count("--fp32-tokentypes has no effect") == 1


@pytest.mark.slow
def test_metrics_file_has_the_documented_fields(tmp_path):
    log_dir = str(tmp_path / "logs")
    results = run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--log-dir": log_dir, "--train-iters": 10}))[0]
    train = read_metrics(log_dir)
    assert [r["iteration"] for r in train] == list(range(1, 11))
    for record in train:
        assert {"iteration", "split", "lm_loss", "lr", "loss_scale", "grad_norm", "skipped_iters",
                "tokens_per_s", "elapsed_s"} <= set(record)
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    valid, test = read_metrics(log_dir, "valid"), read_metrics(log_dir, "test")
    assert [r["iteration"] for r in valid] == [0, 10] and [r["iteration"] for r in test] == [10]
    assert valid[1]["ppl"] == pytest.approx(2.718281828 ** valid[1]["lm_loss"], rel=1e-6)
    assert results["valid"]["lm_loss"] == pytest.approx(valid[1]["lm_loss"])
    assert valid[1]["lm_loss"] < valid[0]["lm_loss"]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)


def test_malformed_json_line_names_file_and_line(tmp_path):
    argv = gpt2_args(tmp_path)
    corpus = argv[argv.index("--train-data") + 1]
    with open(corpus, "a") as f:
        f.write('{"text": "unterminated\n')
    _assert_one_line_error(run_gpt2_cli(argv), corpus, "161")


def test_missing_text_key_names_the_key(tmp_path):
    _assert_one_line_error(run_gpt2_cli(gpt2_args(tmp_path, **{"--text-key": "body"})), "body")


def test_unknown_corpus_alias_is_named(tmp_path):
    _assert_one_line_error(run_gpt2_cli(gpt2_args(tmp_path, **{"--train-data": "no-such-corpus"})), "no-such-corpus")


def test_missing_vocabulary_gives_the_fetch_command(tmp_path):
    argv = gpt2_args(tmp_path, **{"--vocab-file": None, "--merge-file": None,
                                  "--cache-dir": str(tmp_path / "empty")})
    _assert_one_line_error(run_gpt2_cli(argv), "tools/fetch_sample_data.py")


def test_heads_not_divisible_by_model_parallel_size(tmp_path):
    argv = gpt2_args(tmp_path, **{"--num-attention-heads": 3, "--hidden-size": 33, "--model-parallel-size": 2})
    proc = run_gpt2_cli(argv, env={"WORLD_SIZE": "2", "RANK": "0"})
    _assert_one_line_error(proc, "--num-attention-heads 3 is not divisible by --model-parallel-size 2")


def test_checkpoint_of_another_shape_is_refused_naming_both(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--save": ckpt, "--train-iters": 2, "--eval-iters": 0}))
    before = sorted(os.listdir(ckpt))
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--load": ckpt, "--save": ckpt, "--hidden-size": 64}))
    _assert_one_line_error(proc, "--hidden-size 64", "has --hidden-size 32")
    assert sorted(os.listdir(ckpt)) == before


def test_evaluation_split_smaller_than_a_global_batch_is_refused_before_training(tmp_path):
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--batch-size": 90}))
    _assert_one_line_error(proc, "split has", "fewer than one evaluation batch over the data-parallel ranks (90)")
    assert "iteration        1/" not in proc.stdout


def test_unwritable_save_directory_is_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _assert_one_line_error(run_gpt2_cli(gpt2_args(tmp_path, **{"--save": str(blocker / "ckpt")})), "--save", "ckpt")


def test_truncated_checkpoint_names_the_file(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(tmp_path, **{"--save": ckpt, "--train-iters": 2, "--eval-iters": 0}))
    path = os.path.join(ckpt, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _assert_one_line_error(run_gpt2_cli(gpt2_args(tmp_path, **{"--load": ckpt})), path, "unreadable checkpoint")
