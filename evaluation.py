"""Zero-shot GPT2 evaluation (``evaluate_gpt2.py``) of a checkpoint on one ``--valid-data`` file, in three modes.

* WikiText perplexity (default): the word-level ``.tokens`` file is read whole, detokenized
  (``data_utils.detokenizers.wikitext_detokenize``) and tokenized as one stream of T + 1 tokens.
  Windows of L = ``--eval-seq-length`` targets start every S = ``--overlapping-eval`` tokens; the
  first window scores all its targets, each later one only its last S, so every target is scored
  exactly once, most with at least L - S tokens of context (``lm_windows``). ``loss`` is the mean
  over the T targets, ``ppl = exp(loss)`` and ``adjusted_ppl = exp(loss * (T_tok - 1) / (T_words - 1))``
  with T_tok the tokens of the detokenized text and T_words the whitespace-split words of the raw
  file: the perplexity per original word, comparable with word-level results.
* LAMBADA cloze accuracy (``--cloze-eval``): one json object per line, the passage under
  ``--eval-text-key``. By default the target is the passage's last BPE token given all the others;
  with ``--strict-lambada`` it is every token of the last whitespace-separated word, tokenized as
  `` word`` apart from its context, each predicted greedily given the context and the word's earlier
  tokens. A passage counts as correct when every target token is the argmax over the whole
  vocabulary; ``loss`` is the mean cross entropy over the target tokens. A passage longer than the
  window keeps its last tokens.
* Loose-json perplexity (``--webtext-eval``): the file is cut into ``--eval-seq-length`` windows
  exactly as a ``--valid-data`` corpus in training; its first ``--eval-iters`` batches of
  ``--eval-batch-size`` windows (fewer when the file is shorter) go through GPT2's training forward
  step, ``model.gpt2_forward_step`` (``--eod-mask-loss``, ``--reset-position-ids``,
  ``--reset-attention-mask`` apply), and ``loss`` is the mean of the batch losses.

The shape comes from the checkpoint (``restore.load_gpt2_for_inference``); the window defaults to
``--seq-length`` when given, else the checkpoint's position count. Every rank reads and tokenizes
the data itself; batches are dealt round-robin to the data-parallel ranks and the sums are
all-reduced, so the numbers do not depend on the model- or data-parallel layout. Rank 0 prints
one summary line and, with ``--results-file``, writes one JSON object (atomically).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import mpu
from arguments import distributed_settings
from atomic import atomic_file, check_new_file
from data_utils import build_gpt2_datasets, make_tokenizer, read_loose_json
from data_utils.detokenizers import wikitext_detokenize
from errors import ArgumentError, DataError
from initialize import initialize_distributed
from model import gpt2_forward_step
from restore import load_gpt2_for_inference

# The position count comes from the checkpoint; until it is loaded, --seq-length has no bound to break.


@dataclasses.dataclass(frozen=True)
class ClozeExample:
    """A LAMBADA passage: the model reads ``context + target[:-1]`` and must predict ``target``."""

    context: list[int]
    target: list[int]


def lm_windows(num_targets: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, length, first_scored)`` per window over a stream of ``num_targets + 1`` tokens.

    A window reads tokens ``[start, start + length)``, predicts ``[start + 1, start + length + 1)``
    and scores its positions ``>= first_scored``. Windows start every ``stride`` tokens; the first
    scores everything, later ones their last ``stride`` positions, and the last window stops at the
    end of the stream, so every target is scored exactly once.
    """
    windows = [(0, min(seq_length, num_targets), 0)]
    start = stride
    while start + seq_length - stride < num_targets:  # the previous window scored up to here
        windows.append((start, min(seq_length, num_targets - start), seq_length - stride))
        start += stride
    return windows


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the whole vocabulary of vocabulary-parallel logits ``[..., V/p]``.

    Each rank takes its partition's max and argmax; the p candidates are all-gathered and the best
    kept, ties going to the lowest id, as ``torch.argmax`` of the gathered logits would.
    """
    values, index = logits.float().max(dim=-1)  # (...), ids within this partition
    world_size = mpu.get_model_parallel_world_size()
    if world_size == 1:
        return index
    group = mpu.get_model_parallel_group()
    device = mpu.collective_device(group)
    index = index + mpu.get_model_parallel_rank() * logits.size(-1)
    gathered = []
    for local in (values, index):
        parts = [torch.empty_like(local, device=device) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous().to(device), group=group)
        gathered.append(torch.stack(parts))  # (p, ...)
    best = gathered[0].argmax(dim=0, keepdim=True)  # first (lowest-rank, lowest-id) maximum
    return gathered[1].gather(0, best).squeeze(0).to(logits.device)


def _dp_sum(values: Sequence[float]) -> list[float]:
    """Sum each value over the data-parallel group (in float64)."""
    group = mpu.get_data_parallel_group()
    totals = torch.tensor(values, dtype=torch.float64, device=mpu.collective_device(group))
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(totals, group=group)
    return totals.tolist()


def _my_batches(num_items: int, batch_size: int) -> list[range]:
    """This data-parallel rank's batches (round-robin) of ``num_items`` items."""
    starts = range(0, num_items, batch_size)[mpu.get_data_parallel_rank()::mpu.get_data_parallel_world_size()]
    return [range(s, min(s + batch_size, num_items)) for s in starts]


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", disable=not mpu.is_rank_0())


def _forward(model, rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` to one batch; the logits ``(b, s, V/p)`` and the padded ids ``(b, s)``."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    positions = torch.arange(width, device=device).unsqueeze(0).expand_as(ids)
    return model(ids, positions), ids  # causal: padding on the right never reaches a real token


def score_lm_windows(model, tokens: Sequence[int], windows: list[tuple[int, int, int]], batch_size: int,
                     pad_id: int, device: torch.device) -> tuple[float, int]:
    """(sum of losses, number of targets) over the scored targets of ``windows`` on ``tokens``."""
    loss_sum, count = 0.0, 0
    batches = _my_batches(len(windows), batch_size)
    with _progress(len(batches), "wikitext") as bar:
        for batch in batches:
            chunks = [list(tokens[start:start + length + 1]) for start, length, _ in (windows[i] for i in batch)]
            logits, padded = _forward(model, [c[:-1] for c in chunks], pad_id, device)
            labels = torch.full_like(padded, pad_id)
            mask = torch.zeros(padded.shape, dtype=torch.float64, device=device)
            for row, (i, chunk) in enumerate(zip(batch, chunks)):
                _, length, first = windows[i]
                labels[row, :length] = torch.tensor(chunk[1:], device=device)
                mask[row, first:length] = 1.0
            losses = mpu.vocab_parallel_cross_entropy(logits, labels)  # (b, s)
            loss_sum += float((losses.double() * mask).sum())
            count += int(mask.sum())
            bar.update()
    return loss_sum, count


def score_cloze(model, examples: Sequence[ClozeExample], batch_size: int, pad_id: int,
                device: torch.device) -> tuple[float, int, int]:
    """(sum of target-token losses, number of target tokens, passages entirely predicted)."""
    loss_sum, count, correct = 0.0, 0, 0
    batches = _my_batches(len(examples), batch_size)
    with _progress(len(batches), "lambada") as bar:
        for batch in batches:
            full = [examples[i].context + examples[i].target for i in batch]
            logits, padded = _forward(model, [f[:-1] for f in full], pad_id, device)
            labels = torch.full_like(padded, pad_id)
            mask = torch.zeros(padded.shape, dtype=torch.bool, device=device)
            for row, i in enumerate(batch):
                first, end = len(examples[i].context) - 1, len(full[row]) - 1
                labels[row, first:end] = torch.tensor(examples[i].target, device=device)
                mask[row, first:end] = True
            losses = mpu.vocab_parallel_cross_entropy(logits, labels)
            hits = (vocab_parallel_argmax(logits) == labels) | ~mask
            loss_sum += float(losses.double()[mask].sum())
            count += int(mask.sum())
            correct += int(hits.all(dim=1).sum())
            bar.update()
    return loss_sum, count, correct


def read_wikitext(path: str) -> str:
    """The whole text of a WikiText ``.tokens`` file; ``DataError`` if missing, not UTF-8 or too short."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read --valid-data {path}: {err.strerror}; give a WikiText .tokens file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start}); give a WikiText .tokens file") \
            from None
    if len(text.split()) < 2:
        raise DataError(f"{path}: fewer than two words; give a WikiText .tokens file (e.g. wiki.test.tokens)")
    return text


def lambada_example(text: str, tokenizer, strict: bool, max_tokens: int) -> ClozeExample:
    """The context and target tokens of a passage (see the module docstring); the context loses
    tokens from the left when the passage exceeds ``max_tokens`` model inputs. ``ValueError`` when
    there is nothing to predict from."""
    text = text.rstrip()
    if strict:
        word = text.split()[-1] if text.strip() else ""
        context, target = tokenizer.encode(text[:text.rfind(word)].strip()), tokenizer.encode(" " + word)
    else:
        tokens = tokenizer.encode(text)
        context, target = tokens[:-1], tokens[-1:]
    if not context or not target:
        raise ValueError("a passage needs at least two tokens (a context and a last word)")
    keep = max(1, max_tokens + 1 - len(target))
    return ClozeExample(context[-keep:], target[-max_tokens:])


def read_lambada(path: str, text_key: str, tokenizer, strict: bool, max_tokens: int) -> list[ClozeExample]:
    """One ``ClozeExample`` per json line of ``path``; ``DataError`` naming the line for a bad one."""
    examples = []
    for lineno, text in enumerate(read_loose_json(path, text_key), start=1):
        try:
            examples.append(lambada_example(text, tokenizer, strict, max_tokens))
        except ValueError as err:
            raise DataError(f"{path}: passage {lineno}: {err}") from None
    if not examples:
        raise DataError(f"{path}: no passages; give a LAMBADA json file with one {{{text_key!r}: ...}} per line")
    return examples


def evaluate_wikitext(args, text: str, tokenizer, model, device: torch.device, window: int) -> dict[str, Any]:
    tokens = tokenizer.encode(wikitext_detokenize(text))
    if len(tokens) < 2:
        raise DataError(f"{args.valid_data[0]}: fewer than two tokens after detokenizing")
    stride = min(args.overlapping_eval, window)  # a stride past the window means windows that do not overlap
    windows = lm_windows(len(tokens) - 1, window, stride)
    loss_sum, count = _dp_sum(score_lm_windows(model, tokens, windows, _batch_size(args), tokenizer.eod, device))
    loss = loss_sum / count
    words = len(text.split())
    return {"loss": loss, "ppl": math.exp(loss), "adjusted_ppl": math.exp(loss * (len(tokens) - 1) / (words - 1)),
            "num_tokenized_tokens": len(tokens), "num_original_tokens": words,
            "eval_seq_length": window, "overlapping_eval": stride}


def evaluate_lambada(args, tokenizer, model, device: torch.device, window: int) -> dict[str, Any]:
    examples = read_lambada(args.valid_data[0], _text_key(args), tokenizer, args.strict_lambada, window)
    loss_sum, count, correct = _dp_sum(score_cloze(model, examples, _batch_size(args), tokenizer.eod, device))
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / len(examples),
            "num_examples": len(examples), "num_correct": int(correct), "strict": args.strict_lambada}


def evaluate_webtext(args, tokenizer, model, device: torch.device, window: int) -> dict[str, Any]:
    _, valid, _ = build_gpt2_datasets(None, args.valid_data, None, "1", window, tokenizer, args.lazy_loader,
                                      args.cache_dir, args.seed, _text_key(args))
    batch_size = _batch_size(args)
    num_batches = min(args.eval_iters, len(valid) // batch_size)
    if num_batches < 1:
        raise DataError(f"{args.valid_data[0]}: {len(valid)} windows of {window} tokens, fewer than one batch of "
                        f"{batch_size}; lower --eval-batch-size or --seq-length, or give --eval-iters 1 or more")
    forward_step = gpt2_forward_step(tokenizer.eod, device, args.reset_position_ids, args.reset_attention_mask,
                                     args.eod_mask_loss)
    feeds = mpu.get_model_parallel_rank() == 0  # the forward step broadcasts the batch to the rest of the group
    loss_sum = 0.0
    batches = _my_batches(num_batches * batch_size, batch_size)
    with _progress(len(batches), "webtext") as bar:
        for batch in batches:
            data = {"text": torch.from_numpy(np.stack([valid[i]["text"] for i in batch]))} if feeds else None
            loss, _ = forward_step(data, model)
            loss_sum += float(loss)
            bar.update()
    loss = _dp_sum([loss_sum])[0] / num_batches
    return {"loss": loss, "ppl": math.exp(loss), "num_batches": num_batches, "eval_seq_length": window}


def _batch_size(args) -> int:
    return args.eval_batch_size or args.micro_batch_size


def _text_key(args) -> str:
    return args.eval_text_key or args.text_key


def _mode(args) -> str:
    if args.cloze_eval and args.webtext_eval:
        raise ArgumentError("--cloze-eval and --webtext-eval are exclusive; pick one mode")
    if not args.valid_data or len(args.valid_data) != 1:
        raise ArgumentError("give the evaluation data as exactly one file: --valid-data PATH")
    if args.overlapping_eval < 1:
        raise ArgumentError(f"--overlapping-eval must be at least 1, got {args.overlapping_eval}")
    if _batch_size(args) < 1:
        raise ArgumentError(f"--eval-batch-size must be at least 1, got {_batch_size(args)}")
    return "lambada" if args.cloze_eval else "webtext" if args.webtext_eval else "wikitext"


def _window(args, positions: int) -> int:
    """--eval-seq-length, else --seq-length, else the checkpoint's position count."""
    window = args.eval_seq_length or args.seq_length or positions
    if not 1 <= window <= positions:
        raise ArgumentError(f"evaluation window {window} (--eval-seq-length/--seq-length) must be between 1 and the "
                            f"checkpoint's --max-position-embeddings {positions}")
    return window


def _check_results_file(path: str | None, overwrite: bool) -> None:
    if path:  # before the model loads, not at the final rename
        check_new_file(path, "--results-file", overwrite)


def write_results(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` as one JSON object to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as f:
        json.dump(results, f, indent=2)
        f.write("\n")


def evaluate(args) -> dict[str, Any]:
    """Run the mode ``args`` asks for on every rank; returns the results (the same on every rank)."""
    mode = _mode(args)
    _check_results_file(args.results_file, args.overwrite)
    text = read_wikitext(args.valid_data[0]) if mode == "wikitext" else None
    if mode == "lambada" and not os.path.isfile(args.valid_data[0]):  # before the minutes a large model takes to load
        raise DataError(f"--valid-data {args.valid_data[0]}: no such file; give a LAMBADA json file")
    device = initialize_distributed(**distributed_settings(args))
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir,
                               model_type=args.tokenizer_model_type, tokenizer_path=args.tokenizer_path)
    model, loaded = load_gpt2_for_inference(args, tokenizer, device)
    window = _window(args, loaded.config.max_sequence_length)
    with torch.no_grad():
        if mode == "wikitext":
            results = evaluate_wikitext(args, text, tokenizer, model, device, window)
        elif mode == "lambada":
            results = evaluate_lambada(args, tokenizer, model, device, window)
        else:
            results = evaluate_webtext(args, tokenizer, model, device, window)
    return {"mode": mode, **results, "checkpoint": loaded.path, "iteration": loaded.iteration}


def summary(results: dict[str, Any]) -> str:
    """The one line printed at the end."""
    parts = [results["mode"], f"loss {results['loss']:.4f}", f"ppl {results['ppl']:.3f}"]
    if "adjusted_ppl" in results:
        parts += [f"adjusted ppl {results['adjusted_ppl']:.3f}",
                  f"{results['num_tokenized_tokens']} tokens / {results['num_original_tokens']} words"]
    if "accuracy" in results:
        protocol = "strict (whole last word)" if results["strict"] else "last token"
        parts += [f"accuracy {results['accuracy']:.4f} ({results['num_correct']}/{results['num_examples']}, "
                  f"{protocol})"]
    if "num_batches" in results:
        parts.append(f"{results['num_batches']} batches")
    parts.append(f"checkpoint {results['checkpoint']} iteration {results['iteration']}")
    return " | ".join(parts)
