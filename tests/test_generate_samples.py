"""Text generation: the sampling rule, cached decoding, generate_samples.py's modes and errors, its launcher.

A tiny GPT2 (byte-level vocabulary of 263 tokens padded to 384, context 32) is trained once per
module on a repetitive corpus so that its greedy continuations are confident; the model-parallel
test trains the same model at size 2 and expects the same generated tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import REPO, gpt2_args, recorded_launcher_calls, train_gpt2

TRAIN_FLAGS = {"--train-iters": 60, "--lr": 3e-3, "--seq-length": 32, "--max-position-embeddings": 32,
               "--eval-iters": 0, "--log-interval": 20}
CONTEXT = 32
PROMPT = "Context prompt (stop to exit) >>> "


def _in_process_group(fn, *args):
    """``fn(*args)`` inside a gloo group of one in this process, torn down afterwards."""
    import torch.distributed as dist

    import mpu

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return fn(*args)
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder holding vocab.json/merges.txt and the corpus, checkpoint trained at model-parallel size 1)."""
    folder = tmp_path_factory.mktemp("generate")
    save = str(folder / "ckpt_mp1")
    _in_process_group(train_gpt2, gpt2_args(folder, **TRAIN_FLAGS, **{"--save": save}))
    return folder, save


def _argv(folder, ckpt, *extra) -> list[str]:
    return ["--load", ckpt, "--vocab-file", str(folder / "vocab.json"), "--merge-file", str(folder / "merges.txt"),
            "--device", "cpu", *map(str, extra)]


def _load(folder, ckpt):
    """(model, tokenizer) from ``ckpt``; call inside a process group."""
    from arguments import get_args
    from data_utils import make_tokenizer
    from restore import load_gpt2_for_inference

    args = get_args(_argv(folder, ckpt))
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    model, _ = load_gpt2_for_inference(args, tokenizer, torch.device("cpu"))
    return model, tokenizer


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- the sampling rule on hand-made logits ---------------------------------------------------------

PROBS = [0.0625, 0.5, 0.125, 0.25, 0.0625]  # by id; most likely first: 1, 3, 2, then 0 and 4 tied


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


@pytest.mark.parametrize("top_k, top_p, expected", [
    (0, 0.0, {0, 1, 2, 3, 4}), (0, 1.0, {0, 1, 2, 3, 4}), (2, 0.0, {1, 3}), (10, 0.0, {0, 1, 2, 3, 4}),
    (0, 0.3, {1}),           # the most likely token alone already reaches p
    (0, 0.6, {1, 3}),        # 0.5 < 0.6 <= 0.75
    (0, 0.8, {1, 2, 3}),     # 0.75 < 0.8 <= 0.875
    (3, 0.8, {1, 3}),        # top-k first: renormalised 0.57, 0.29, 0.14, so 0.86 already reaches 0.8
])
def test_top_k_then_top_p_keep_exactly_the_stated_sets(top_k, top_p, expected):
    from generation import filter_logits

    logits = torch.tensor(PROBS).log()
    permutation = torch.tensor([3, 0, 4, 1, 2])  # the same distribution in another order, in a second row
    batch = torch.stack([logits, logits[permutation]])
    kept = _kept(filter_logits(batch, top_k, top_p))
    assert kept[0] == expected
    assert kept[1] == {int((permutation == i).nonzero()) for i in expected}


def test_top_p_always_keeps_at_least_the_most_likely_token_and_drops_ties_beyond_the_nucleus():
    from generation import filter_logits

    peaked = torch.tensor([[0.0, 9.0, 1.0]])
    assert _kept(filter_logits(peaked, 0, 1e-6)) == [{1}]
    nucleus = _kept(filter_logits(torch.tensor(PROBS).log().unsqueeze(0), 0, 0.9))[0]
    assert len(nucleus) == 4 and {1, 2, 3} < nucleus  # 0.875 < 0.9: one of the two tied 0.0625s joins


def test_padded_vocabulary_entries_are_never_sampled():
    from generation import SamplingParams, sample_next_token

    logits = torch.randn(500, 384, generator=torch.Generator().manual_seed(0))
    logits[:, 263:] = 50.0  # the padding would win every draw if it were allowed
    generator = torch.Generator().manual_seed(1)
    for params in (SamplingParams(greedy=True), SamplingParams(), SamplingParams(temperature=3.0, top_k=50),
                   SamplingParams(top_p=0.99)):
        tokens = sample_next_token(logits, params, vocab_size=263, generator=generator)
        assert tokens.shape == (500,) and int(tokens.max()) < 263, params
        if not params.greedy:
            assert len(set(tokens.tolist())) > 20  # real sampling, not a constant


def test_sampling_follows_the_filtered_distribution():
    from generation import SamplingParams, sample_next_token

    logits = torch.tensor(PROBS).log().expand(20000, -1)
    tokens = sample_next_token(logits, SamplingParams(top_p=0.8), generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    torch.testing.assert_close(counts, torch.tensor([0.0, 4 / 7, 1 / 7, 2 / 7, 0.0]), atol=0.015, rtol=0)
    hot = sample_next_token(logits, SamplingParams(temperature=1e9), generator=torch.Generator().manual_seed(3))
    assert float(torch.bincount(hot, minlength=5).min()) > 3500  # a huge temperature flattens it


def test_temperature_is_applied_before_top_p():
    """The nucleus is taken of softmax(logits / T): at T = 0.5 the probabilities are 0.744, 0.186, 0.047, ...,
    so top_p 0.8 keeps tokens 1 and 3 only (at T = 1 it would keep token 2 as well)."""
    from generation import SamplingParams, filter_logits, sample_next_token

    logits, temperature, top_p = torch.tensor(PROBS).log(), 0.5, 0.8
    sharp = (logits / temperature).softmax(dim=-1)
    order = sharp.argsort(descending=True)
    reach = int((sharp[order].cumsum(dim=-1) >= top_p).nonzero()[0]) + 1
    nucleus = set(order[:reach].tolist())
    assert nucleus == {1, 3} and _kept(filter_logits(logits.unsqueeze(0), 0, top_p))[0] == {1, 2, 3}
    tokens = sample_next_token(logits.expand(20000, -1), SamplingParams(temperature=temperature, top_p=top_p),
                               generator=torch.Generator().manual_seed(4))
    assert set(tokens.tolist()) == nucleus
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    expected = torch.zeros(5)
    expected[list(nucleus)] = sharp[list(nucleus)] / sharp[list(nucleus)].sum()
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


def test_streamed_text_equals_the_decoded_text_even_when_tokens_split_characters(trained):
    from data_utils import make_tokenizer
    from generation import TextStream

    folder, _ = trained
    tokenizer = make_tokenizer("GPT2BPETokenizer", str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = "é€ the 😀 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    stray = next(i for i in range(256) if tokenizer.decode([i]) == "\ufffd")  # a byte that is no character
    ids.insert(3, stray)
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append)
    for token in ids:
        stream.put(token)
    assert stream.end() == "".join(pieces) == tokenizer.decode(ids)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # half characters were held back


class _Counting(torch.nn.Module):
    """A stand-in model whose next token is always (position + 1): a prompt of n tokens continues n, n + 1, ..."""

    parallel_output = False

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.word_embeddings = torch.nn.Embedding(vocab, 1)

    def allocate_kv_cache(self, batch_size: int, max_length: int):
        return type("Cache", (), {"length": 0})()

    def forward(self, tokens, position_ids, attention_mask=None, kv_cache=None):
        kv_cache.length += tokens.shape[1]
        return torch.nn.functional.one_hot((position_ids + 1).clamp(max=self.vocab - 1), self.vocab).float()


def test_rows_stop_at_end_of_document_their_limit_or_a_full_context(single_process_group):
    from generation import SamplingParams, generate

    eod, streamed = 6, []
    prompts = [[0, 1], [0] * 7, [0], [0] * 4]
    got = generate(_Counting(), prompts, max_new_tokens=5, context_length=10, params=SamplingParams(greedy=True),
                   eod=eod, on_token=lambda row, token: streamed.append((row, token)))
    # eod ends row 0 (and is not output); row 1 fills the context of 10; row 2 stops after 5; row 3 at eod.
    assert got == [[2, 3, 4, 5], [7, 8, 9], [1, 2, 3, 4, 5], [4, 5]]
    assert [[t for r, t in streamed if r == row] for row in range(4)] == got
    assert generate(_Counting(), [[0, 0]], max_new_tokens=20, context_length=10, params=SamplingParams(greedy=True)) \
        == [[2, 3, 4, 5, 6, 7, 8, 9]]  # without an eod only the context stops it


# --- decoding with a trained model --------------------------------------------------------------

@torch.no_grad()
def _recomputed(model, prompt: list[int], max_new: int, eod: int, vocab_size: int) -> list[int]:
    """Greedy continuation by a full forward pass over the whole sequence for every token."""
    seq, new = list(prompt), []
    while len(new) < min(max_new, CONTEXT - len(prompt)):
        logits = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0))[0, -1, :vocab_size]
        token = int(logits.argmax())
        if token == eod:
            break
        seq.append(token)
        new.append(token)
    return new


def test_cached_batched_generation_equals_full_recomputation_of_each_prompt(single_process_group, trained):
    from generation import SamplingParams, generate

    model, tokenizer = _load(*trained)
    texts = ["the cat sat", "dogs", "the dog ran with other dogs around"]
    prompts = [[tokenizer.eod]] + [tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 4  # left padding of every width
    got = generate(model, prompts, max_new_tokens=24, context_length=CONTEXT, params=SamplingParams(greedy=True),
                   eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)
    expected = [_recomputed(model, p, 24, tokenizer.eod, tokenizer.vocab_size) for p in prompts]
    assert got == expected
    assert all(got) and len(got[-1]) == CONTEXT - len(prompts[-1])  # the longest prompt filled the context
    assert got != [got[0]] * len(got)


def test_top_k_1_equals_greedy_and_a_seed_repeats_samples(single_process_group, trained):
    from generation import SamplingParams, generate

    model, tokenizer = _load(*trained)
    prompts = [tokenizer.encode("the cat"), [tokenizer.eod], tokenizer.encode("the world")]

    def run(params, seed=0):
        return generate(model, prompts, max_new_tokens=16, context_length=CONTEXT, params=params, eod=tokenizer.eod,
                        vocab_size=tokenizer.vocab_size, generator=torch.Generator().manual_seed(seed))

    assert run(SamplingParams(top_k=1, temperature=0.7)) == run(SamplingParams(greedy=True))
    nucleus = SamplingParams(temperature=1.5, top_p=0.95)
    assert run(nucleus, seed=5) == run(nucleus, seed=5)
    assert run(nucleus, seed=5) != run(nucleus, seed=6)


def test_file_mode_writes_one_json_object_per_prompt_and_batches_do_not_change_them(single_process_group, trained,
                                                                                    tmp_path, capsys):
    import generate_samples
    from data_utils import make_tokenizer

    folder, ckpt = trained
    prompts = ["the cat", "", "the dog ran with other dogs", "é ü", "mat"]
    (tmp_path / "in.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    records = {}
    for batch in (3, 1):
        out = tmp_path / f"out{batch}.jsonl"
        generate_samples.main(_argv(folder, ckpt, "--greedy", "--sample-input-file", tmp_path / "in.txt",
                                    "--sample-output-file", out, "--batch-size", batch, "--out-seq-length", 20))
        records[batch] = _read_jsonl(out)
        generated = sum(len(r["token_ids"]) for r in records[batch])
        assert re.search(rf"wrote 5 samples to {re.escape(str(out))}: {generated} tokens, first after \d+ ms, "
                         r"[\d.]+ tokens/s", capsys.readouterr().err)
    assert records[3] == records[1]
    tokenizer = make_tokenizer("GPT2BPETokenizer", str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert [r["prompt"] for r in records[3]] == prompts
    for record in records[3]:
        assert set(record) == {"prompt", "text", "token_ids"}
        assert record["token_ids"] and tokenizer.decode(record["token_ids"]) == record["text"]
        assert all(0 <= t < tokenizer.vocab_size and t != tokenizer.eod for t in record["token_ids"])
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out1.jsonl", "out3.jsonl"]  # no temporary files left


def test_num_samples_repeat_with_a_seed_and_differ_with_another(single_process_group, trained, tmp_path):
    import generate_samples

    folder, ckpt = trained
    samples = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{name}.jsonl"
        generate_samples.main(_argv(folder, ckpt, "--num-samples", 5, "--top_p", 0.9, "--seed", seed,
                                    "--out-seq-length", 12, "--batch-size", 2, "--sample-output-file", out))
        samples[name] = [r["token_ids"] for r in _read_jsonl(out)]
    assert len(samples["a"]) == 5 and len({tuple(s) for s in samples["a"]}) > 1
    assert samples["a"] == samples["b"]
    assert samples["a"] != samples["c"]
    assert all(r["prompt"] == "" for r in _read_jsonl(tmp_path / "a.jsonl"))


def test_a_failed_run_leaves_an_existing_output_untouched(single_process_group, trained, tmp_path):
    import generate_samples
    from data_utils.errors import DataError

    folder, ckpt = trained
    (tmp_path / "in.txt").write_text("the cat\n" + "the cat sat " * 4 + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's output\n")
    with pytest.raises(DataError, match=r"in\.txt line 2: the prompt is \d+ tokens but the context holds 32"):
        generate_samples.main(_argv(folder, ckpt, "--sample-input-file", tmp_path / "in.txt",
                                    "--sample-output-file", out, "--overwrite"))
    assert out.read_text() == "an earlier run's output\n"
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.jsonl"]


def test_a_run_failing_mid_way_leaves_no_partial_output(single_process_group, trained, tmp_path, monkeypatch):
    import generate_samples

    folder, ckpt = trained
    (tmp_path / "in.txt").write_text("the cat\nthe dog\n")
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's output\n")
    calls = []

    def fail_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return generate(*args, **kwargs)

    generate = generate_samples.generate
    monkeypatch.setattr(generate_samples, "generate", fail_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_samples.main(_argv(folder, ckpt, "--sample-input-file", tmp_path / "in.txt", "--batch-size", 1,
                                    "--sample-output-file", out, "--out-seq-length", 4, "--overwrite"))
    assert len(calls) == 2 and out.read_text() == "an earlier run's output\n"
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.jsonl"]


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--top_p", "1.5"], "--top_p is a probability"),
    (["--top_k", "-1"], "--top_k must not be negative"),
])
def test_bad_sampling_flags_are_refused_while_parsing(flags, fragment, capsys):
    import generate_samples

    with pytest.raises(SystemExit) as exit_info:
        generate_samples.main(["--load", "unused", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flags, fragment", [
    (["--out-seq-length", "0"], "--out-seq-length"),
    (["--num-samples", "2", "--sample-input-file", "x.txt"], "not both"),
    (["--sample-output-file", "x.jsonl"], "needs --sample-input-file"),
])
def test_bad_generation_flags_are_argument_errors(flags, fragment):
    import generate_samples
    from arguments import ArgumentError

    with pytest.raises(ArgumentError, match=fragment):
        generate_samples.main(["--load", "unused", *flags])


# --- the command line, through subprocesses (started together to save time) -----------------------

LONG_PROMPT = "the cat sat " * 4


@pytest.fixture(scope="module")
def cli_runs(trained):
    """Each case's CompletedProcess-like (returncode, stdout, stderr), all run concurrently."""
    folder, ckpt = trained
    (folder / "long.txt").write_text(f"the cat\n{LONG_PROMPT}\n")
    greedy = ["--greedy", "--out-seq-length", 12]
    cases = {
        "interactive": (_argv(folder, ckpt, *greedy), f"the cat\n{LONG_PROMPT}\n\nstop\n"),
        "end_of_input": (_argv(folder, ckpt, *greedy), "the cat"),
        "missing_checkpoint": (_argv(folder, folder / "nothing_here"), ""),
        "missing_input": (_argv(folder, ckpt, "--sample-input-file", folder / "absent.txt"), ""),
        "contradicting_layers": (_argv(folder, ckpt, "--num-layers", 3), ""),
        "long_prompt": (_argv(folder, ckpt, "--sample-input-file", folder / "long.txt"), ""),
    }
    procs = {name: subprocess.Popen([sys.executable, "generate_samples.py", *argv], cwd=REPO, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(cases[name][1], timeout=180)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def test_interactive_session_streams_continuations_and_stops_cleanly(single_process_group, trained, cli_runs):
    from generation import SamplingParams, generate

    model, tokenizer = _load(*trained)
    expected = [tokenizer.decode(ids) for ids in generate(
        model, [tokenizer.encode("the cat"), [tokenizer.eod]], max_new_tokens=12, context_length=CONTEXT,
        params=SamplingParams(greedy=True), eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)]
    code, stdout, stderr = cli_runs["interactive"]
    assert code == 0, stderr
    assert stdout.count(PROMPT) == 4  # the cat, the rejected long prompt, the empty line, stop
    assert f"Megatron-LM: {expected[0]}\n" in stdout and f"Megatron-LM: {expected[1]}\n" in stdout
    assert stdout.count("Megatron-LM: ") == 2
    assert "the prompt is" in stderr and "Traceback" not in stderr
    assert len(re.findall(r"\(\d+ tokens, first after \d+ ms, [\d.]+ tokens/s\)", stderr)) == 2  # after each sample
    code, stdout, stderr = cli_runs["end_of_input"]
    assert code == 0 and f"Megatron-LM: {expected[0]}\n" in stdout, stderr


@pytest.mark.parametrize("case, fragments", [
    ("missing_checkpoint", ["nothing_here", "no checkpoint"]),
    ("missing_input", ["absent.txt", "no such file"]),
    ("contradicting_layers", ["--num-layers 3", "--num-layers 2"]),
    ("long_prompt", ["long.txt line 2", "context holds 32"]),
])
def test_user_errors_are_one_line_and_a_non_zero_exit(cli_runs, case, fragments):
    code, stdout, stderr = cli_runs[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr and stdout == "", stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# --- model parallelism ----------------------------------------------------------------------------

def _train_then_generate(train_argv: list[str], generate_argv: list[str], failing_argv: list[str]) -> str:
    import generate_samples
    from data_utils.errors import DataError

    train_gpt2(train_argv)
    generate_samples.main(generate_argv)
    try:  # a prompt only rank 0 can reject must stop the other rank too, not leave it waiting
        generate_samples.main(failing_argv)
    except DataError as err:
        return str(err)
    return "no error"


@pytest.mark.slow
def test_greedy_generation_is_the_same_at_model_parallel_sizes_1_and_2(single_process_group, trained, tmp_path):
    import generate_samples

    folder, ckpt = trained
    (tmp_path / "in.txt").write_text("the cat\n\nthe dog ran with\nworld\n")
    (tmp_path / "long.txt").write_text(f"the cat\n{LONG_PROMPT}\n")
    flags = ["--greedy", "--sample-input-file", tmp_path / "in.txt", "--batch-size", 2, "--out-seq-length", 24]
    generate_samples.main(_argv(folder, ckpt, *flags, "--sample-output-file", tmp_path / "mp1.jsonl"))
    ckpt2 = str(tmp_path / "ckpt_mp2")
    train_argv = gpt2_args(folder, **TRAIN_FLAGS, **{"--save": ckpt2, "--model-parallel-size": 2})
    mp2 = [*flags, "--model-parallel-size", 2]
    errors = run_distributed(_train_then_generate, 2, train_argv,
                             _argv(folder, ckpt2, *mp2, "--sample-output-file", tmp_path / "mp2.jsonl"),
                             _argv(folder, ckpt2, "--model-parallel-size", 2, "--sample-input-file",
                                   tmp_path / "long.txt"))
    one, two = _read_jsonl(tmp_path / "mp1.jsonl"), _read_jsonl(tmp_path / "mp2.jsonl")
    assert len(one) == 4 and all(r["token_ids"] for r in one)
    assert [r["token_ids"] for r in two] == [r["token_ids"] for r in one]
    assert "line 2" in errors[0] and "global rank 0" in errors[1]


# --- the launcher ----------------------------------------------------------------------------------

def _launcher_args(tmp_path, monkeypatch, **env):
    from arguments import get_args

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = recorded_launcher_calls(tmp_path, "generate_text.sh")
    assert len(calls) == 1, calls
    argv = calls[0]
    entry = argv.index("generate_samples.py")
    if entry:
        monkeypatch.setenv("WORLD_SIZE", argv[argv.index("--nproc_per_node") + 1])
    return argv[:entry], get_args(argv[entry + 1:])


def test_generate_text_sh_defaults_to_the_cpu_sample_checkpoint(tmp_path, monkeypatch):
    launcher, args = _launcher_args(tmp_path, monkeypatch)
    assert launcher == []  # plain `python generate_samples.py` (the recorder drops the command's name)
    assert args.load == "checkpoints/gpt2_cpu_sample" and args.tokenizer_type == "GPT2BPETokenizer"
    assert (args.temperature, args.top_k, args.top_p, args.greedy) == (0.9, 0, 0.9, False)
    assert args.out_seq_length == 256 and args.cache_dir == "cache" and args.model_parallel_size == 1
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (None, None, None)  # the checkpoint's
    assert args.log_interval == 7  # extra flags are appended


def test_generate_text_sh_takes_its_settings_from_the_environment(tmp_path, monkeypatch):
    launcher, args = _launcher_args(tmp_path, monkeypatch, CHECKPOINT_PATH="ckpts/mp2", MP_SIZE="2", GREEDY="1",
                                    TOP_K="5", TEMPERATURE="0.7", OUT_SEQ_LENGTH="64")
    assert launcher[launcher.index("--nproc_per_node") + 1] == "2"  # torchrun's flags before the script
    assert args.load == "ckpts/mp2" and args.model_parallel_size == 2 and args.greedy
    assert (args.top_k, args.temperature, args.out_seq_length) == (5, 0.7, 64)
    assert math.isclose(args.top_p, 0.9)
