"""evaluate_gpt2.py and scripts/run_gpt2_eval.py: the WikiText detokenizer, windows that score each
token once, LAMBADA in both protocols, equal numbers at every model-parallel layout, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import evaluate_gpt2
import evaluation
import mpu
from data_utils import make_tokenizer
from data_utils.detokenizers import wikitext_detokenize
from model import GPT2Model, TransformerConfig
from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import write_jsonl, write_tiny_gpt2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import run_gpt2_eval  # noqa: E402

RAW_WIKITEXT = (
    " \n = Valkyria Chronicles III = \n \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the"
    " Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@"
    " playing video game . It sold 1 @,@ 000 copies at 3 @.@ 5 dollars in N days . \n"
    " \n = = Gameplay = = \n \n"
    " The game 's \" main \" mode was [ new ] , at 30 ° C ; players ' squads fought ! Why ? \n"
    " \n = = = Plot = = = \n \n = = = = Notes = = = = \n"
)
DETOKENIZED_WIKITEXT = (
    "\n= Valkyria Chronicles III =\n\n"
    "Senjō no Valkyria 3: Unrecorded Chronicles (Japanese: 戦場のヴァルキュリア3, lit. Valkyria of the"
    " Battlefield 3), commonly referred to as Valkyria Chronicles III outside Japan, is a tactical role-"
    "playing video game. It sold 1,000 copies at 3.5 dollars in 1 days.\n"
    "\n== Gameplay ==\n\n"
    "The game's \"main\" mode was [new], at 30°C; players' squads fought! Why?\n"
    "\n=== Plot ===\n\n==== Notes ====\n"
)


def test_wikitext_detokenizer_restores_prose():
    assert wikitext_detokenize(RAW_WIKITEXT) == DETOKENIZED_WIKITEXT


@pytest.mark.parametrize("raw,expected", [
    (" = = = = Deep = = = = ", " ==== Deep ==== "),  # four before three before two
    ("a ( b ) and c ( d )", "a (b) and c (d)"),  # the brackets match lazily, pair by pair
    ("the dogs ' bones", "the dogs' bones"),
])
def test_wikitext_detokenizer_rule_order_cases(raw, expected):
    assert wikitext_detokenize(raw) == expected


# ---------------------------------------------------------------------------------------------------
# Windows: every target once; batched windows equal a plain loop and a single full pass.


@pytest.mark.parametrize("targets,length,stride", [
    (1, 8, 3), (8, 8, 3), (9, 8, 3), (50, 8, 3), (50, 8, 8), (50, 8, 1), (51, 16, 5), (100, 10, 7),
])
def test_windows_score_every_target_exactly_once(targets, length, stride):
    scored = [0] * targets
    for i, (start, size, first) in enumerate(evaluation.lm_windows(targets, length, stride)):
        assert start == i * stride and 1 <= size <= length and start + size <= targets
        assert first == (0 if i == 0 else length - stride) and first < size, "no window without a target"
        for t in range(start + first, start + size):
            scored[t] += 1
    assert scored == [1] * targets


def _tiny_model(seed: int = 3, vocab: int = 64, positions: int = 16) -> GPT2Model:
    mpu.model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=vocab,
                               max_sequence_length=positions, hidden_dropout=0.0, attention_dropout=0.0)
    return GPT2Model(config).eval()


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (s, V) of one unpadded sequence at model-parallel size 1."""
    tokens = torch.tensor([ids])
    return model(tokens, torch.arange(len(ids)).unsqueeze(0))[0].float()


def _plain_loop_loss(model, tokens: list[int], length: int, stride: int) -> tuple[float, int]:
    """Reference: one window at a time; the first scores all its targets, the others their last ``stride``."""
    total, count, start, num_targets = 0.0, 0, 0, len(tokens) - 1
    while True:
        end = min(start + length, num_targets)  # targets [start, end) are tokens [start + 1, end + 1)
        first = start if start == 0 else start + length - stride
        logits = _full_logits(model, tokens[start:end])
        losses = F.cross_entropy(logits, torch.tensor(tokens[start + 1:end + 1]), reduction="none")
        total += losses[first - start:].double().sum().item()
        count += end - first
        if end == num_targets:
            return total, count
        start += stride


def test_window_scores_match_a_plain_loop_and_a_full_pass(single_process_group):
    model = _tiny_model()
    tokens = torch.randint(0, 64, (61,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        # Many windows, a short last one, batches with padding.
        windows = evaluation.lm_windows(60, 16, 5)
        assert windows[-1][1] < windows[-2][1], "the last window is short and gets padded in its batch"
        got_sum, got_count = evaluation.score_lm_windows(model, tokens, windows, 4, 0, torch.device("cpu"))
        ref_sum, ref_count = _plain_loop_loss(model, tokens, 16, 5)
        assert got_count == ref_count == 60
        assert got_sum == pytest.approx(ref_sum, rel=1e-6)
        # A text that fits one window: the plain full-sequence loss.
        short = tokens[:12]
        one_sum, one_count = evaluation.score_lm_windows(model, short, evaluation.lm_windows(11, 16, 5), 4, 0,
                                                            torch.device("cpu"))
        direct = F.cross_entropy(_full_logits(model, short[:-1]), torch.tensor(short[1:]))
        assert one_count == 11
        assert one_sum / one_count == pytest.approx(direct.item(), rel=1e-6)


def test_cloze_scoring_is_the_same_padded_and_alone(single_process_group):
    model = _tiny_model(vocab=64)
    gen = torch.Generator().manual_seed(1)
    examples = [evaluation.ClozeExample(torch.randint(0, 64, (n,), generator=gen).tolist(),
                                           torch.randint(0, 64, (k,), generator=gen).tolist())
                for n, k in ((3, 1), (9, 2), (1, 3), (6, 1), (12, 4))]
    # Make two passages right: their targets are the model's own greedy continuation.
    for i in (0, 2):
        ctx, tgt = examples[i].context, []
        for _ in range(len(examples[i].target)):
            tgt.append(int(_full_logits(model, ctx + tgt)[-1].argmax()))
        examples[i] = evaluation.ClozeExample(ctx, tgt)
    with torch.no_grad():
        alone = [evaluation.score_cloze(model, [e], 1, 0, torch.device("cpu")) for e in examples]
        batched = evaluation.score_cloze(model, examples, 5, 0, torch.device("cpu"))
    assert [a[2] for a in alone] == [1, 0, 1, 0, 0]
    assert batched[2] == 2 and batched[1] == sum(a[1] for a in alone) == 11
    assert batched[0] == pytest.approx(sum(a[0] for a in alone), rel=1e-5)


def test_vocab_parallel_argmax_breaks_ties_like_torch(single_process_group):
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    assert evaluation.vocab_parallel_argmax(logits).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------
# End to end on a tiny GPT2 trained here to memorise a handful of sentences.

SENTENCES = [
    "the king gave the crown to his son", "the queen sang a song to the moon", "a fox ran into the dark wood",
    "my lord wrote a letter to the duke", "the old man sat by the warm fire", "her horse drank from the cold river",
]
NONSENSE = ["zq vx jkq wpt", "blorp fizzle quark"]  # nothing to recall: the model should miss these
TRAIN_ITERS = 180


def _write_data(folder: str) -> dict[str, str]:
    docs = [". ".join(SENTENCES[(i * 5 + j) % len(SENTENCES)] for j in range(3)) + "." for i in range(120)]
    vocab, merges = write_tiny_gpt2(folder)
    lines = [" \n", " = The King = \n", " \n"]
    for i in range(len(SENTENCES)):
        lines.append(" " + " , ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2)) + " . \n")
        if i == 2:
            lines += [" \n", " = = The Fox @-@ like Queen = = \n", " \n"]
    wiki = os.path.join(folder, "wiki.test.tokens")
    with open(wiki, "w") as f:
        f.write("".join(lines))
    return {"corpus": write_jsonl(os.path.join(folder, "corpus.json"), docs), "vocab": vocab, "merges": merges,
            "wiki": wiki, "lambada": write_jsonl(os.path.join(folder, "lambada.json"), SENTENCES + NONSENSE),
            "folder": folder}


def _train_argv(data: dict[str, str], mp: int, save: str) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "64", "--batch-size", "8", "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3",
            "--warmup", "0.05", "--lr-decay-style", "cosine", "--train-data", data["corpus"], "--split", "1",
            "--vocab-file", data["vocab"], "--merge-file", data["merges"], "--eval-iters", "0", "--num-workers", "0",
            "--cache-dir", os.path.join(data["folder"], "cache"), "--log-interval", "1000", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--seed", "7", "--save", save, "--model-parallel-size", str(mp)]


def _train(argv: list[str]) -> None:
    import pretrain_gpt2
    from arguments import get_args

    pretrain_gpt2.run(get_args(argv))


class _GroupOfOne:
    """A process group of one with model-parallel size 1, torn down on exit."""

    def __enter__(self):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mpu.initialize_model_parallel(1)

    def __exit__(self, *exc):
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    data = _write_data(str(tmp_path_factory.mktemp("tiny_eval")))
    data["ckpt"] = os.path.join(data["folder"], "ckpt_mp1")
    with _GroupOfOne():
        _train(_train_argv(data, 1, data["ckpt"]))
    return data


def _eval_argv(data: dict[str, str], *flags: str, ckpt: str | None = None) -> list[str]:
    return ["--load", ckpt or data["ckpt"], "--vocab-file", data["vocab"], "--merge-file", data["merges"],
            "--eval-batch-size", "3", "--cache-dir", os.path.join(data["folder"], "cache"), *flags]


def _evaluate(data: dict[str, str], *flags: str, results: str | None = None) -> dict:
    """Run evaluate_gpt2's entry point in this process; the results file's contents."""
    from initialize import run_main

    results = results or os.path.join(data["folder"], "results.json")
    run_main(lambda: evaluate_gpt2.main(_eval_argv(data, *flags, "--results-file", results, "--overwrite")))
    with open(results) as f:
        return json.load(f)


def _loaded_model(data: dict[str, str]):
    from restore import load_gpt2_for_inference

    tokenizer = make_tokenizer("GPT2BPETokenizer", data["vocab"], data["merges"])
    args = evaluate_gpt2.parse_args(_eval_argv(data))
    model, _ = load_gpt2_for_inference(args, tokenizer, torch.device("cpu"))
    return model, tokenizer


def test_wikitext_perplexity_end_to_end(tiny):
    results = _evaluate(tiny, "--valid-data", tiny["wiki"], "--overlapping-eval", "16")
    raw = open(tiny["wiki"]).read()
    with _GroupOfOne(), torch.no_grad():
        model, tokenizer = _loaded_model(tiny)
        tokens = tokenizer.encode(wikitext_detokenize(raw))
        ref_sum, ref_count = _plain_loop_loss(model, tokens, 64, 16)  # the window is the checkpoint's 64 positions
    assert len(tokens) > 3 * 64, "the text should span several windows"
    assert results["mode"] == "wikitext" and results["iteration"] == TRAIN_ITERS
    assert results["checkpoint"] == tiny["ckpt"]
    assert results["num_original_tokens"] == len(raw.split())
    assert results["num_tokenized_tokens"] == len(tokens)
    assert results["loss"] == pytest.approx(ref_sum / ref_count, rel=1e-6)
    assert results["ppl"] == pytest.approx(math.exp(results["loss"]), rel=1e-12)
    ratio = (results["num_tokenized_tokens"] - 1) / (results["num_original_tokens"] - 1)
    assert results["adjusted_ppl"] == pytest.approx(math.exp(results["loss"] * ratio), rel=1e-12)


def _reference_cloze(model, tokenizer, text: str, strict: bool) -> tuple[bool, float, int]:
    """(correct, summed loss, target tokens) of one passage, unbatched, from the full logits."""
    if strict:
        word = text.split()[-1]
        context = tokenizer.encode(text[:len(text) - len(word)].strip())
        target = tokenizer.encode(" " + word)
    else:
        ids = tokenizer.encode(text)
        context, target = ids[:-1], ids[-1:]
    full = context + target
    logits = _full_logits(model, full[:-1])[len(context) - 1:]
    labels = torch.tensor(target)
    correct = bool((logits.argmax(dim=-1) == labels).all())
    return correct, F.cross_entropy(logits, labels, reduction="sum").item(), len(target)


@pytest.mark.parametrize("strict", [False, True])
def test_lambada_accuracy_end_to_end(tiny, strict):
    results = _evaluate(tiny, "--valid-data", tiny["lambada"], "--cloze-eval", *(["--strict-lambada"] * strict))
    with _GroupOfOne(), torch.no_grad():
        model, tokenizer = _loaded_model(tiny)
        refs = [_reference_cloze(model, tokenizer, text, strict) for text in SENTENCES + NONSENSE]
    assert results["mode"] == "lambada" and results["strict"] is strict
    assert results["num_examples"] == len(SENTENCES + NONSENSE)
    assert results["num_correct"] == sum(r[0] for r in refs)
    assert results["accuracy"] == pytest.approx(results["num_correct"] / results["num_examples"])
    assert results["loss"] == pytest.approx(sum(r[1] for r in refs) / sum(r[2] for r in refs), rel=1e-5)
    assert [r[0] for r in refs[len(SENTENCES):]] == [False, False], "nonsense should not be recalled"
    assert any(r[0] for r in refs[:len(SENTENCES)]), "some memorised sentences should be recalled"
    if strict:
        assert sum(r[2] for r in refs) > len(refs), "strict targets are whole words of several tokens"


def test_webtext_perplexity_matches_the_training_windows(tiny):
    results = _evaluate(tiny, "--valid-data", tiny["corpus"], "--webtext-eval", "--eval-iters", "3",
                        "--seq-length", "32")
    with _GroupOfOne(), torch.no_grad():
        model, tokenizer = _loaded_model(tiny)
        stream = []
        with open(tiny["corpus"]) as f:
            for line in f:
                stream += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod]
        batch_losses = []
        for b in range(3):
            samples = [stream[i * 32:i * 32 + 33] for i in range(3 * b, 3 * b + 3)]
            losses = [F.cross_entropy(_full_logits(model, s[:-1]), torch.tensor(s[1:])) for s in samples]
            batch_losses.append(torch.stack(losses).mean().item())
    assert results["mode"] == "webtext" and results["num_batches"] == 3 and results["eval_seq_length"] == 32
    assert results["loss"] == pytest.approx(sum(batch_losses) / 3, rel=1e-5)
    assert results["ppl"] == pytest.approx(math.exp(results["loss"]))


def _layout_worker(data: dict[str, str]) -> dict:
    """In a world of 2: train the mp2 twin of the fixture's model, then evaluate the mp1 checkpoint with
    2-way data parallelism and the mp2 one with 2-way model parallelism."""
    ckpt2 = os.path.join(data["folder"], "ckpt_mp2")
    _train(_train_argv(data, 2, ckpt2))
    mpu.destroy_model_parallel()
    # The argmax across vocabulary partitions: the global maximum sits in the second half here.
    mpu.initialize_model_parallel(2)
    logits = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    logits[0, 1, 50] = 9.0
    local = logits.chunk(2, dim=-1)[mpu.get_model_parallel_rank()]
    assert torch.equal(evaluation.vocab_parallel_argmax(local), logits.argmax(dim=-1))
    mpu.destroy_model_parallel()
    out = {}
    for mp, ckpt in ((1, data["ckpt"]), (2, ckpt2)):
        for mode, flags in MODES.items():
            args = evaluate_gpt2.parse_args(_eval_argv(data, "--model-parallel-size", str(mp), *flags(data),
                                                       ckpt=ckpt))
            out[(mp, mode)] = evaluation.evaluate(args)
            mpu.destroy_model_parallel()
    return out


MODES = {
    "wikitext": lambda d: ["--valid-data", d["wiki"], "--overlapping-eval", "16"],
    "lambada": lambda d: ["--valid-data", d["lambada"], "--cloze-eval"],
    "strict": lambda d: ["--valid-data", d["lambada"], "--cloze-eval", "--strict-lambada"],
    "webtext": lambda d: ["--valid-data", d["corpus"], "--webtext-eval", "--eval-iters", "4"],
}


@pytest.mark.slow
def test_same_numbers_at_model_and_data_parallel_layouts(tiny):
    serial = {mode: _evaluate(tiny, *flags(tiny)) for mode, flags in MODES.items()}
    ranks = run_distributed(_layout_worker, 2, tiny)
    assert ranks[0] == ranks[1], "every rank returns the same results"
    for (mp, mode), got in ranks[0].items():
        ref = serial[mode]
        assert got.keys() == ref.keys(), (mp, mode)
        for key, value in ref.items():
            if key in ("checkpoint",):
                continue
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), (mp, mode, key)
            else:
                assert got[key] == value, (mp, mode, key)


# ---------------------------------------------------------------------------------------------------
# Mistakes: one line on stderr, non-zero exit, no traceback, no results file.


def _run_cli(data: dict[str, str], *flags: str, ckpt: str | None = None) -> subprocess.CompletedProcess:
    argv = _eval_argv(data, *flags, ckpt=ckpt)
    return subprocess.run([sys.executable, "evaluate_gpt2.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["missing data", "missing checkpoint", "contradicting shape"])
def test_cli_mistakes_fail_with_one_line(tiny, tmp_path, case):
    results = str(tmp_path / "results.json")
    flags = {
        "missing data": (["--valid-data", str(tmp_path / "wiki.tokens")], None, ["wiki.tokens"]),
        "missing checkpoint": (["--valid-data", tiny["wiki"]], str(tmp_path / "nothing"), ["nothing", "--load"]),
        "contradicting shape": (["--valid-data", tiny["wiki"], "--num-layers", "3"], None,
                                ["--num-layers 3", "--num-layers 2"]),
    }
    argv, ckpt, fragments = flags[case]
    proc = _run_cli(tiny, *argv, "--results-file", results, ckpt=ckpt)
    assert_one_line_error(proc.returncode, proc.stderr, *fragments)
    assert not os.path.exists(results)


def _fails_in_process(data: dict[str, str], capsys, *flags: str) -> str:
    """Run the entry point expecting a user error; its stderr."""
    from initialize import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate_gpt2.main(_eval_argv(data, *flags)))
    err = capsys.readouterr().err
    assert_one_line_error(exit_info.value.code, err)
    return err


def test_empty_malformed_and_too_small_data_are_named(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.tokens"
    empty.write_text(" \n \n")
    assert "fewer than two words" in _fails_in_process(tiny, capsys, "--valid-data", str(empty))
    bad = tmp_path / "bad.json"
    bad.write_text('{"text": "one good passage"}\n{"text": "cut short\n')
    assert f"{bad}:2" in _fails_in_process(tiny, capsys, "--valid-data", str(bad), "--cloze-eval")
    one_word = tmp_path / "one.json"
    one_word.write_text('{"text": "hello"}\n')
    err = _fails_in_process(tiny, capsys, "--valid-data", str(one_word), "--cloze-eval", "--strict-lambada")
    assert "passage 1" in err
    err = _fails_in_process(tiny, capsys, "--valid-data", str(bad), "--cloze-eval", "--text-key", "body")
    assert "'body'" in err
    small = write_jsonl(str(tmp_path / "small.json"), ["a short text"])
    assert "--seq-length" in _fails_in_process(tiny, capsys, "--valid-data", small, "--webtext-eval")
    err = _fails_in_process(tiny, capsys, "--valid-data", tiny["wiki"], "--cloze-eval", "--webtext-eval")
    assert "exclusive" in err
    err = _fails_in_process(tiny, capsys, "--valid-data", tiny["wiki"], "--eval-seq-length", "65")
    assert "--max-position-embeddings 64" in err


def test_failed_run_leaves_an_existing_results_file_alone(tiny, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text('{"previous": true}\n')
    _fails_in_process(tiny, capsys, "--valid-data", str(tmp_path / "absent.tokens"), "--results-file", str(results))
    assert results.read_text() == '{"previous": true}\n'
    assert os.listdir(tmp_path) == ["results.json"]


# ---------------------------------------------------------------------------------------------------
# scripts/run_gpt2_eval.py: the seed's command lines become evaluate_gpt2.py commands.

SEED_COMMON = ["--model-parallel-size", "1", "--num-layers", "24", "--hidden-size", "1024",
               "--num-attention-heads", "16", "--model-path", "ckpt/gpt2_345m", "--batch-size", "16",
               "--cache-dir", "cache"]
SEED_COMMANDS = {
    "wikitext": SEED_COMMON + ["--data-path", "wiki.test.tokens"],
    "lambada": SEED_COMMON + ["--data-path", "lambada_test.json", "--cloze-eval"],
    "webtext": SEED_COMMON + ["--data-path", "webtext_test.json", "--eval-iters", "5000", "--webtext-eval"],
}


def _recorded(monkeypatch, argv: list[str], returncode: int = 0) -> tuple[int, list[str]]:
    calls = []
    monkeypatch.setattr(run_gpt2_eval.subprocess, "call", lambda cmd: calls.append(cmd) or returncode)
    code = run_gpt2_eval.main(argv)
    assert len(calls) == 1
    return code, calls[0]


@pytest.mark.parametrize("mode", sorted(SEED_COMMANDS))
def test_run_script_turns_seed_commands_into_evaluate_flags(monkeypatch, capsys, mode):
    monkeypatch.setattr(run_gpt2_eval, "_cuda_available", lambda: False)
    code, command = _recorded(monkeypatch, SEED_COMMANDS[mode])
    assert code == 0
    assert command[:2] == [sys.executable, os.path.join(REPO, "evaluate_gpt2.py")]
    assert "Running: " in capsys.readouterr().out
    args = evaluate_gpt2.parse_args(command[2:])
    assert (args.load, args.eval_batch_size, args.cache_dir) == ("ckpt/gpt2_345m", 16, "cache")
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (24, 1024, 16)
    assert args.valid_data == [SEED_COMMANDS[mode][SEED_COMMANDS[mode].index("--data-path") + 1]]
    assert (args.cloze_eval, args.webtext_eval) == (mode == "lambada", mode == "webtext")
    assert not args.fp16 and "--seq-length" not in command  # CPU: fp32; the window comes from the checkpoint
    if mode == "webtext":
        assert args.eval_iters == 5000


def test_run_script_launches_torchrun_passes_extras_and_the_exit_code(monkeypatch):
    argv = ["--model-parallel-size", "2", "--model-path", "m", "--data-path", "d.json", "--batch-size", "4",
            "--cloze-eval", "--strict-lambada", "--seq-length", "128", "--overlapping-eval", "8", "--device", "cuda",
            "--results-file", "r.json", "--text-key", "body", "--vocab-file", "v.json", "--eod-mask-loss"]
    code, command = _recorded(monkeypatch, argv, returncode=3)
    assert code == 3
    assert os.path.basename(command[0]) == "torchrun" and command[1:3] == ["--nproc_per_node", "2"]
    assert command[3] == os.path.join(REPO, "evaluate_gpt2.py")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = evaluate_gpt2.parse_args(command[4:])
    assert args.model_parallel_size == 2 and args.eval_batch_size == 4 and args.eval_text_key == "body"
    assert args.cloze_eval and args.strict_lambada and args.eod_mask_loss
    assert (args.seq_length, args.overlapping_eval, args.results_file) == (128, 8, "r.json")
    assert args.fp16 and args.device == "cuda" and args.vocab_file == "v.json"


@pytest.mark.parametrize("flags,cuda,fp16", [
    ([], False, False), ([], True, True), (["--device", "cpu"], True, False), (["--no-fp16"], True, False),
    (["--fp16", "--device", "cpu"], False, True),
])
def test_run_script_uses_fp16_on_cuda_only_unless_told(monkeypatch, flags, cuda, fp16):
    monkeypatch.setattr(run_gpt2_eval, "_cuda_available", lambda: cuda)
    _, command = _recorded(monkeypatch, ["--model-path", "m", "--data-path", "d", *flags])
    assert ("--fp16" in command) is fp16


def test_run_script_runs_a_real_evaluation(tiny, tmp_path):
    results = str(tmp_path / "results.json")
    proc = subprocess.run(
        [sys.executable, "scripts/run_gpt2_eval.py", "--model-path", tiny["ckpt"], "--data-path", tiny["lambada"],
         "--batch-size", "4", "--cloze-eval", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--vocab-file", tiny["vocab"], "--merge-file", tiny["merges"], "--device", "cpu", "--results-file", results],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Running: " in proc.stdout and "lambada | loss" in proc.stdout
    got = json.load(open(results))
    serial = _evaluate(tiny, "--valid-data", tiny["lambada"], "--cloze-eval")
    assert got["num_correct"] == serial["num_correct"]
    assert got["loss"] == pytest.approx(serial["loss"], rel=1e-5)


def test_run_script_refuses_a_checkpoint_of_another_model_parallel_size_before_launching(monkeypatch, tmp_path, capsys):
    for rank in range(2):
        (tmp_path / "iter_0000007" / f"mp_rank_{rank:02d}").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    monkeypatch.setattr(run_gpt2_eval.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    assert run_gpt2_eval.main(["--model-parallel-size", "4", "--model-path", str(tmp_path), "--data-path", "d"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model-parallel size 2" in err and "--model-parallel-size 2" in err
    code, command = _recorded(monkeypatch, ["--model-parallel-size", "2", "--model-path", str(tmp_path),
                                            "--data-path", "d"])
    assert code == 0 and command[1:3] == ["--nproc_per_node", "2"]
