"""Mistakes and accidents in the tools (issue 28): outputs are not replaced unasked, a failed write is one
line, unreadable inputs are one line.

An existing output is refused before the work unless ``--overwrite``; a read-only or full file system,
met while writing, is one ``error:`` line naming the path, with no temporary left behind; Ctrl-C in
generation is one line and exit status 130 with no partial output. The real entry points run in a
subprocess; the full and read-only file systems are small tmpfs mounts (skipped where mounting is not
allowed). A truncated ``model.safetensors``, a 2019 import given something else and a prompt file
that is not UTF-8 are one line naming the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate_gpt2
from initialize import run_cli
from tests.cli import assert_one_line_error
from tests.helpers import REPO, file_checksums, gpt2_args, write_indexed, write_jsonl
from tools import import_megatron2019

TEXT = "the cat sat on the mat. the dog ate the bone. " * 20


def _run(script: str, *argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _load_script(path: str):
    """A script of the repository loaded as a module (scripts/ is no package), to run its ``main`` here."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_all(*argvs) -> list[subprocess.CompletedProcess]:
    """``_run`` of every argv at once (each start imports torch: seconds; together they overlap)."""
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    done = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def _model_flags(folder: str, ckpt: str) -> list[str]:
    return ["--load", ckpt, "--vocab-file", os.path.join(folder, "vocab.json"), "--merge-file",
            os.path.join(folder, "merges.txt"), "--device", "cpu"]


def _metrics(folder) -> str:
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        for i in (1, 2, 3):
            f.write(json.dumps({"iteration": i, "split": "train", "lm_loss": 5.0 - i, "lr": 1e-3,
                                "tokens_per_s": 100.0}) + "\n")
    return path


def test_existing_outputs_are_refused_before_the_work(tiny_gpt2_run, tmp_path, capsys):
    folder, ckpt = tiny_gpt2_run
    out = tmp_path / "out"
    out.mkdir()
    existing = {name: out / name for name in ("samples.jsonl", "results.json", "curve.png", "split.json")}
    for path in existing.values():
        path.write_text("an earlier output\n")
    before = file_checksums(str(out))
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(TEXT)
    corpus = write_jsonl(str(tmp_path / "corpus.json"), [TEXT] * 3)
    runs = {
        "generate_samples.py": (["generate_samples.py", *_model_flags(folder, ckpt), "--num-samples", 1,
                                 "--out-seq-length", 2, "--sample-output-file", existing["samples.jsonl"]],
                                "--sample-output-file"),
        "tools/plot_metrics.py": (["tools/plot_metrics.py", _metrics(tmp_path), "-o", existing["curve.png"]], "-o"),
        "scripts/presplit_sentences_json.py": (["scripts/presplit_sentences_json.py", corpus, existing["split.json"]],
                                               "OUTPUT"),
    }
    for (script, (_, flag)), proc in zip(runs.items(), _run_all(*(argv for argv, _ in runs.values()))):
        assert_one_line_error(proc.returncode, proc.stderr, flag, "already exists", "--overwrite")
        assert "loaded" not in proc.stderr, f"{script}: refused before the model loads"
    code = run_cli(lambda: evaluate_gpt2.main([*_model_flags(folder, ckpt), "--valid-data", str(wiki),
                                               "--results-file", str(existing["results.json"])]))
    assert_one_line_error(code, capsys.readouterr().err, "--results-file", "already exists", "--overwrite")
    assert file_checksums(str(out)) == before and sorted(os.listdir(out)) == sorted(existing)
    # --overwrite (and the json tools' --force) replace on purpose; a directory is never an output file.
    presplit = _load_script("scripts/presplit_sentences_json.py")
    assert presplit.main([corpus, str(existing["split.json"]), "--force"]) == 0
    assert json.loads(existing["split.json"].read_text().splitlines()[0])["text"].startswith("the cat sat")
    proc = _run("tools/plot_metrics.py", _metrics(tmp_path), "-o", out)
    assert_one_line_error(proc.returncode, proc.stderr, "is a directory")


@pytest.fixture
def small_mounts(tmp_path):
    """``(full, read_only)``: a tmpfs filled to the last block and a read-only one, each holding ``keep.txt``."""
    mounts = []
    try:
        for name, options in (("full", "size=512k"), ("read_only", "size=64k")):
            point = tmp_path / name
            point.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True).returncode != 0:
                pytest.skip("cannot mount a small tmpfs here (needs root)")
            mounts.append(point)
            (point / "keep.txt").write_text("kept\n")
        try:
            with open(mounts[0] / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:  # full to the last block
            pass
        subprocess.run(["mount", "-o", "remount,ro", str(mounts[1])], check=True)
        yield mounts[0], mounts[1]
    finally:
        for point in mounts:
            subprocess.run(["umount", str(point)], capture_output=True)


def _only_kept(folder) -> None:
    """Nothing but the files that were there: no temporary, no partial output (empty folders may stay)."""
    assert set(file_checksums(str(folder))) <= {"keep.txt", "filler"}, file_checksums(str(folder))
    assert (folder / "keep.txt").read_text() == "kept\n"


def test_a_full_or_read_only_file_system_is_one_line_in_every_tool(tiny_gpt2_run, tmp_path, small_mounts):
    folder, ckpt = tiny_gpt2_run
    full, read_only = small_mounts
    corpus = write_jsonl(str(tmp_path / "corpus.json"), [TEXT] * 40)
    vocab = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(folder, "vocab.json"),
             "--merge-file", os.path.join(folder, "merges.txt")]
    cases = [
        (["tools/preprocess_data.py", "--input", corpus, "--output-prefix", full / "corpus", *vocab],
         ["corpus_text_document.bin", "no space left on the device (ENOSPC)"]),
        (["tools/plot_metrics.py", _metrics(tmp_path), "-o", read_only / "curve.png"],
         ["-o", "curve.png: the file system is read-only (EROFS)"]),
        (["tools/reshard_checkpoint.py", "--load", ckpt, "--save", full / "mp2", "--target-model-parallel-size", 2],
         ["--save cannot write", "mp2: no space left on the device (ENOSPC)"]),
        (["tools/hf_checkpoint.py", "export", "--load", ckpt, "--hf-dir", full / "hf"],
         ["--hf-dir cannot write", "hf: no space left on the device (ENOSPC)"]),
        (["generate_samples.py", *_model_flags(folder, ckpt), "--num-samples", 64, "--out-seq-length", 12,
          "--batch-size", 64, "--sample-output-file", full / "samples.jsonl"],
         ["cannot write", "samples.jsonl: no space left on the device (ENOSPC)"]),
        (["pretrain_gpt2.py", *gpt2_args(folder, **{"--train-data": corpus, "--lazy-loader": True,
                                                    "--cache-dir": full / "cache", "--train-iters": 1})],
         ["cannot write", "no space left on the device (ENOSPC)"]),
    ]
    for (_, fragments), proc in zip(cases, _run_all(*(argv for argv, _ in cases))):
        assert_one_line_error(proc.returncode, proc.stderr, *fragments)
    _only_kept(full)
    _only_kept(read_only)


def test_ctrl_c_in_generation_is_one_line_130_and_no_partial_output(tiny_gpt2_run, tmp_path):
    folder, ckpt = tiny_gpt2_run
    out = tmp_path / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, "generate_samples.py", *_model_flags(folder, ckpt), "--num-samples",
                             "100000", "--out-seq-length", "8", "--sample-output-file", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("loaded "), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        err = first + proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("interrupted: ")] == [err.splitlines()[-1]], err
    assert "error" not in err.lower()
    assert os.listdir(tmp_path) == [], "no partial output, no temporary"



def test_unreadable_inputs_to_the_tools_are_one_line(tiny_gpt2_run, tmp_path, capsys):
    folder, ckpt = tiny_gpt2_run
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16,
                                                "vocab_size": 300}))
    (hf / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"wte.weight\": {")  # cut short
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\u00e9 au lait\n".encode() + "na\u00efve\n".encode("latin-1"))
    cases = [
        (["tools/hf_checkpoint.py", "import", "--hf-dir", hf, "--save", tmp_path / "imported"],
         [f"{hf}: unreadable safetensors weights", "truncated"]),
        (["generate_samples.py", *_model_flags(folder, ckpt), "--sample-input-file", prompts],
         [f"{prompts}:2: not UTF-8 text (byte 0xef)"]),
    ]
    for (_, fragments), proc in zip(cases, _run_all(*(argv for argv, _ in cases))):
        assert_one_line_error(proc.returncode, proc.stderr, *fragments)
    # This toolkit's own checkpoint, and a pickled 2019 one without transformer layers (today: "max() arg is
    # an empty sequence"), through the same run_cli in this process.
    code = run_cli(lambda: import_megatron2019.main(["--load", ckpt, "--save", str(tmp_path / "imported"),
                                                     "--trust-pickle"]))
    assert_one_line_error(code, capsys.readouterr().err, "this is a checkpoint of this toolkit, not of Megatron "
                          "2019: load it directly", f"--load {ckpt}")
    old = tmp_path / "old2019"
    (old / "release" / "mp_rank_00").mkdir(parents=True)
    (old / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"model": {"word_embeddings.weight": torch.zeros(8, 4), "position_embeddings.weight": torch.zeros(4, 4)},
                "args": argparse.Namespace(num_attention_heads=2)},
               old / "release" / "mp_rank_00" / "model_optim_rng.pt")
    code = run_cli(lambda: import_megatron2019.main(["--load", str(old), "--save", str(tmp_path / "imported"),
                                                     "--trust-pickle"]))
    assert_one_line_error(code, capsys.readouterr().err, "holds no transformer layers", "not a 2019 GPT2")
    assert not os.path.exists(tmp_path / "imported")


def test_tools_refuse_inputs_they_cannot_handle_right(tiny_gpt2_run, tmp_path):
    folder, _ = tiny_gpt2_run
    documents = write_indexed(str(tmp_path / "a_text_document"), [[[5, 6, 7]], [[8, 9]]])
    sentences = write_indexed(str(tmp_path / "b_text_sentence"), [[[5, 6], [7]], [[8], [9]]])
    (tmp_path / "empty.json").write_text("\n\n")
    merged, shards = tmp_path / "merged", tmp_path / "shards"
    merge, make = _run_all(
        ["tools/merge_datasets.py", "--input", documents, sentences, "--output-prefix", merged],
        ["openwebtext/make_gpt2_dataset.py", "--input", tmp_path / "empty.json", "--output-dir", shards,
         "--vocab-file", os.path.join(folder, "vocab.json"), "--merge-file", os.path.join(folder, "merges.txt")])
    assert_one_line_error(merge.returncode, merge.stderr, "mix document-level and sentence-level",
                          f"{documents} (document-level)", f"{sentences} (sentence-level)")
    assert_one_line_error(make.returncode, make.stderr, f"corpus {tmp_path / 'empty.json'} is empty")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("merged", ".merged"))]
    assert not os.path.exists(shards) or os.listdir(shards) == []


def test_ctrl_c_in_a_tool_with_worker_processes_is_one_line_130(tiny_gpt2_run, tmp_path):
    """A terminal's Ctrl-C reaches the tool and its pool's workers: one line from the tool, no worker traceback."""
    folder, _ = tiny_gpt2_run
    corpus = write_jsonl(str(tmp_path / "corpus.json"), [TEXT] * 20000)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix",
                             str(out / "corpus"), "--vocab-file", os.path.join(folder, "vocab.json"), "--merge-file",
                             os.path.join(folder, "merges.txt"), "--workers", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    try:
        # The builders' temporaries (tokenizing has begun) and both workers forked: a SIGINT that lands
        # inside os.fork's after-fork hooks is lost ("Exception ignored"), so not during the pool's start.
        while not os.listdir(out) or (os.path.exists(children) and len(open(children).read().split()) < 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "interrupted" in line or "error" in line.lower()] == \
        ["interrupted: stopped by Ctrl-C; no output was left half written"], err
    assert os.listdir(out) == []
