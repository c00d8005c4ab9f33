"""User mistakes on the training path: one clear line, a non-zero exit, nothing existing changed.

Classes from issue 14: a forgotten ``--load`` that would overwrite another run, directory flags that
cannot work, numbers that cannot train (and a diverged run reported as such), a model-parallel size
larger than the world.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import file_checksums, gpt2_args, run_gpt2_cli, run_gpt2_main, train_gpt2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("user_errors")
    ckpt = str(folder / "ckpt")
    run_distributed(train_gpt2, 1, gpt2_args(folder, **{"--save": ckpt, "--train-iters": 2, "--eval-iters": 0}))
    return str(folder), ckpt


def test_a_forgotten_load_never_overwrites_another_run(trained, tmp_path, capsys):
    folder, ckpt = trained
    before = file_checksums(ckpt)
    for extra in ({}, {"--load": str(tmp_path / "elsewhere")}):
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        code, out, err = run_gpt2_main(gpt2_args(folder, **{"--save": ckpt, "--train-iters": 1, **extra}), capsys)
        assert_one_line_error(code, err, f"--save {ckpt} already holds", f"--load {ckpt}", "new --save directory")
        assert "iteration        1/" not in out
    assert file_checksums(ckpt) == before


def test_overwrite_checkpoints_starts_over_on_purpose(trained, tmp_path, capsys):
    import shutil

    folder, ckpt = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(ckpt, copy)
    argv = gpt2_args(folder, **{"--save": copy, "--train-iters": 1, "--eval-iters": 0,
                                "--overwrite-checkpoints": True})
    code, _, err = run_gpt2_main(argv, capsys)
    assert code == 0, err
    assert open(os.path.join(copy, "latest_checkpointed_iteration.txt")).read().strip() == "1"


def test_directory_flags_are_checked_before_any_work(trained, tmp_path, capsys):
    folder, ckpt = trained
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    inside = os.path.join(ckpt, "iter_0000002")
    cases = [
        ({"--log-dir": str(a_file)}, ["--log-dir", "is a file"]),
        ({"--cache-dir": str(a_file)}, ["--cache-dir", "is a file"]),
        ({"--save": str(a_file / "sub")}, ["--save", "cannot create"]),
        ({"--load": os.path.join(inside, "mp_rank_00", "model_optim_rng.pt")}, ["a checkpoint file", f"--load {ckpt}"]),
        ({"--load": inside}, ["inside a checkpoint", f"--load {ckpt}"]),
        ({"--load": str(tmp_path / "typo")}, ["--load", "typo", "no such directory"]),
    ]
    before = file_checksums(ckpt)
    for flags, fragments in cases:
        code, out, err = run_gpt2_main(gpt2_args(folder, **{"--train-iters": 1, **flags}), capsys)
        assert_one_line_error(code, err, *fragments)
        assert "padded vocab" not in out, "refused before the tokenizer or model is built"
    assert file_checksums(ckpt) == before
    assert a_file.read_text() == "x"


def test_an_existing_read_only_save_directory_is_refused_before_training(trained, capsys):
    folder, _ = trained
    read_only = "/sys"  # read-only even for root (permission bits are not, here)
    if not os.path.isdir(read_only) or os.access(read_only, os.W_OK) and _can_write(read_only):
        pytest.skip("no read-only directory on this machine")
    code, out, err = run_gpt2_main(gpt2_args(folder, **{"--save": read_only, "--train-iters": 1}), capsys)
    assert_one_line_error(code, err, f"--save {read_only}: not writable")
    assert "iteration        1/" not in out


def _can_write(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".probe"), "w"):
            pass
    except OSError:
        return False
    os.remove(os.path.join(folder, ".probe"))
    return True


@pytest.mark.parametrize("flag,value,fragment", [
    ("--lr", "-0.0001", "--lr must lie in [0, inf)"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "0", "--lr 0 trains nothing"),
    ("--min-lr", "1", "--min-lr 1.0 is above --lr"),
    ("--adam-beta1", "1.0", "--adam-beta1 must lie in [0, 1)"),
    ("--adam-beta2", "-0.5", "--adam-beta2 must lie in [0, 1)"),
    ("--adam-eps", "0", "--adam-eps must lie in (0, inf)"),
    ("--weight-decay", "-0.01", "--weight-decay must lie in [0, inf)"),
    ("--clip-grad", "nan", "--clip-grad must be a finite number"),
    ("--hidden-dropout", "1.0", "--hidden-dropout must lie in [0, 1)"),
    ("--init-method-std", "0", "--init-method-std must lie in (0, inf)"),
    ("--layernorm-epsilon", "-0.00001", "--layernorm-epsilon must lie in (0, inf)"),
    ("--seed", "-5", "--seed must lie in [0, 2**32)"),
    ("--lr-decay-iters", "-3", "--lr-decay-iters must not be negative"),
])
def test_numbers_that_cannot_train_are_argument_errors(tmp_path, capsys, flag, value, fragment):
    _assert_argument_error(gpt2_args(tmp_path, **{flag: value}), capsys, fragment)


def _assert_argument_error(argv: list[str], capsys, *fragments: str) -> None:
    from arguments import get_args

    with pytest.raises(SystemExit) as exit_:
        get_args(argv)
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, *fragments)


def test_model_parallel_larger_than_the_world_says_how_to_launch(tmp_path, capsys):
    _assert_argument_error(gpt2_args(tmp_path, **{"--model-parallel-size": 2}), capsys,
                           "--model-parallel-size 2 needs 2 processes", "torchrun --nproc_per_node 2")


def test_a_diverged_run_reports_nan_and_keeps_metrics_strict_json(tmp_path, capsys):
    log_dir = str(tmp_path / "logs")
    # Weights of scale 1e20 overflow the logits: every loss is inf/nan from the first step.
    argv = gpt2_args(tmp_path, **{"--init-method-std": "1e20", "--train-iters": 2, "--eval-iters": 1,
                                  "--eval-interval": 100, "--log-dir": log_dir})
    code, out, err = run_gpt2_main(argv, capsys)
    assert code == 0, err
    assert "the run diverged: validation lm_loss, ppl is not finite" in out

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.jsonl holds a bare {constant}")

    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        records = [json.loads(line, parse_constant=refuse) for line in f]
    valid = [r for r in records if r["split"] == "valid"]
    assert valid and all(r["lm_loss"] is None and r["ppl"] is None for r in valid)
    assert not any(isinstance(v, float) and not math.isfinite(v) for r in records for v in r.values())


def test_sequence_length_is_checked_against_the_checkpoints_positions(trained, capsys):
    """Without --max-position-embeddings a --load run takes the checkpoint's count (an imported GPT-2 has
    1024, above the flag's default), so --seq-length is checked against that, after reading it."""
    from arguments import get_args

    folder, ckpt = trained
    argv = gpt2_args(folder, **{"--load": ckpt, "--save": ckpt, "--max-position-embeddings": None,
                                "--seq-length": 1024})
    assert get_args(argv).seq_length == 1024  # not refused against the default of 512
    before = file_checksums(ckpt)
    code, _, err = run_gpt2_main(argv, capsys)
    assert_one_line_error(code, err, "--seq-length 1024 exceeds --max-position-embeddings 16", ckpt)
    assert file_checksums(ckpt) == before


@pytest.mark.parametrize("model,flags,fragments", [
    ("gpt2", ["--max-preds-per-seq", "5"], ["--max-preds-per-seq is a BERT flag", "pretrain_gpt2.py"]),
    ("gpt2", ["--presplit-sentences"], ["--presplit-sentences is a BERT flag"]),
    ("bert", ["--reset-position-ids"], ["--reset-position-ids is a GPT2 flag", "pretrain_bert.py would ignore"]),
    ("bert", ["--eod-mask-loss"], ["--eod-mask-loss is a GPT2 flag"]),
    (None, ["--strict-lambada"], ["--strict-lambada only applies with --cloze-eval"]),
])
def test_flags_of_another_model_or_mode_are_refused(tmp_path, capsys, model, flags, fragments):
    from arguments import get_args

    argv = gpt2_args(tmp_path) + flags
    with pytest.raises(SystemExit) as exit_:
        get_args(argv, model=model)
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, *fragments)
    # The model's own flags pass; so does --strict-lambada with --cloze-eval.
    own = {"gpt2": "bert", "bert": "gpt2", None: None}[model]
    get_args(argv + (["--cloze-eval"] if model is None else []), model=own)


def test_a_bert_flag_on_the_gpt2_command_line_is_one_line(tmp_path):
    proc = run_gpt2_cli(gpt2_args(tmp_path, **{"--max-preds-per-seq": 5}))
    assert_one_line_error(proc.returncode, proc.stderr, "--max-preds-per-seq is a BERT flag")
    assert proc.returncode == 2 and "padded vocab" not in proc.stdout
