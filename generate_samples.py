"""Generate text with a trained GPT2 checkpoint: interactively, from a file of prompts, or unconditionally.

- interactive (neither ``--sample-input-file`` nor ``--num-samples``): read a prompt, stream its
  continuation; an empty line samples unconditionally, ``stop`` or end of input quits;
- ``--sample-input-file F``: one prompt per line (an empty line is an unconditional prompt), in
  batches of ``--batch-size``; one JSON object per prompt (``prompt``, ``text``: the continuation,
  ``token_ids``: its ids) to ``--sample-output-file``, written atomically, or to stdout;
- ``--num-samples N``: N unconditional samples, written the same way.

Sampling and decoding are in ``generation.py``. Global rank 0 reads the prompts and writes the
output; every rank decodes. Diagnostics go to stderr, so stdout holds only the generated text.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch

import mpu
from arguments import distributed_settings, get_args
from atomic import atomic_file, check_new_file
from data_utils import make_tokenizer
from errors import ArgumentError, DataError
from generation import SamplingParams, TextStream, broadcast_prompts, generate
from initialize import initialize_distributed, run_main
from restore import load_gpt2_for_inference

PROMPT = "Context prompt (stop to exit) >>> "
Batch = list[tuple[str, list[int]]]  # (prompt text, prompt ids fed to the model)
Decode = Callable[[list[list[int]]], list[list[int]]]


def check_mode_args(args) -> None:
    """Refuse flag combinations that name no clear mode, and files that cannot be read."""
    if args.out_seq_length < 1:
        raise ArgumentError(f"--out-seq-length must be at least 1, got {args.out_seq_length}")
    if args.num_samples < 0:
        raise ArgumentError(f"--num-samples must not be negative, got {args.num_samples}")
    if args.sample_input_file and args.num_samples:
        raise ArgumentError("give --sample-input-file (prompts) or --num-samples (unconditional), not both")
    if args.sample_output_file and not (args.sample_input_file or args.num_samples):
        raise ArgumentError("--sample-output-file needs --sample-input-file or --num-samples; interactive mode "
                            "prints to the terminal")
    if args.sample_input_file and not os.path.isfile(args.sample_input_file):
        raise DataError(f"--sample-input-file {args.sample_input_file}: no such file; give a text file with one "
                        "prompt per line")
    if args.sample_output_file:  # before the model loads, not at the final rename
        check_new_file(args.sample_output_file, "--sample-output-file", args.overwrite)


def context_length(args, model) -> int:
    """Tokens a sequence may hold: ``--seq-length`` if given, capped by the model's positions."""
    positions = model.config.max_sequence_length
    return positions if args.seq_length is None else min(args.seq_length, positions)


def encode_prompt(tokenizer, text: str, context: int, where: str) -> list[int]:
    """The ids fed for ``text`` (the end-of-document token alone for an empty prompt), leaving room to generate."""
    ids = tokenizer.encode(text) if text else [tokenizer.eod]
    if len(ids) >= context:
        raise DataError(f"{where}: the prompt is {len(ids)} tokens but the context holds {context}, so at most "
                        f"{context - 1} leave room to generate; shorten it (or raise --seq-length up to the "
                        "model's positions)")
    return ids


def interactive_prompts(tokenizer, context: int) -> Iterator[Batch]:
    """Prompts typed at the terminal, one at a time, until ``stop``, end of input or Ctrl-C at the prompt.

    A prompt too long for the context is refused with a message and the next one is read.
    """
    while True:
        try:
            text = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # end of input or Ctrl-C at the prompt: quit cleanly
            print(file=sys.stderr)
            return
        if text.strip() == "stop":
            return
        try:
            ids = encode_prompt(tokenizer, text, context, "prompt")
        except DataError as err:  # as in Megatron: say so and ask again
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        yield [(text, ids)]


def read_prompts(path: str) -> list[str]:
    """The lines of a UTF-8 prompt file; one that is not UTF-8 is a ``DataError`` naming its line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save the prompts as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def file_prompts(args, tokenizer, context: int) -> Iterator[Batch]:
    """The input file's prompts (all checked before the first batch), or ``--num-samples`` empty ones."""
    if args.num_samples:
        texts = [""] * args.num_samples
    else:
        texts = read_prompts(args.sample_input_file)
    path = args.sample_input_file
    prompts = [(t, encode_prompt(tokenizer, t, context, f"{path} line {i + 1}")) for i, t in enumerate(texts)]
    for start in range(0, len(prompts), args.micro_batch_size):
        yield prompts[start:start + args.micro_batch_size]


class AtomicJsonLines:
    """JSON lines into ``path`` through ``atomic.atomic_file``: renamed into place on success, removed on failure."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._context = atomic_file(path)  # a failed write is one WriteError naming the path
        self.file = self._context.__enter__()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __enter__(self) -> AtomicJsonLines:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        return self._context.__exit__(exc_type, exc, tb)


def decode_batches(source: Iterator[Batch] | None, decode: Decode,
                   consume: Callable[[Batch, list[list[int]]], None] | None = None) -> None:
    """Global rank 0 draws batches from ``source`` and shares them; every rank decodes; rank 0 consumes.

    The other ranks pass ``source=None``. An error in rank 0's own reading or writing reaches the
    others as a ``DataError`` instead of leaving them waiting.
    """
    while True:
        try:
            batch = next(source, None) if source is not None else None
        except BaseException:
            broadcast_prompts(failed=True)
            raise
        prompts = broadcast_prompts(None if batch is None else [ids for _, ids in batch])
        if prompts is None:
            return
        outputs = decode(prompts)
        if consume is not None:
            try:
                consume(batch, outputs)
            except BaseException:
                broadcast_prompts(failed=True)
                raise


class Pace:
    """Time to the first generated token and tokens per second, from ``start()`` (rank 0, on stderr)."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.began, self.first, self.tokens = time.perf_counter(), None, 0

    def token(self, *_: object) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def summary(self, tokens: int) -> str:
        elapsed = time.perf_counter() - self.began
        first = "" if self.first is None else f", first after {1e3 * (self.first - self.began):.0f} ms"
        return f"{tokens} tokens{first}, {tokens / max(elapsed, 1e-9):.1f} tokens/s"


class Terminal:
    """Interactive mode on rank 0: streams each continuation to stdout as its tokens arrive."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.stream = TextStream(tokenizer, self.write)
        self.pace = Pace()

    @staticmethod
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def prompts(self, context: int) -> Iterator[Batch]:
        for batch in interactive_prompts(self.tokenizer, context):
            self.stream = TextStream(self.tokenizer, self.write)
            self.write("\nMegatron-LM: ")
            self.pace.start()
            yield batch

    def on_token(self, row: int, token: int) -> None:
        self.pace.token()
        self.stream.put(token)

    def finish(self, batch: Batch, outputs: list[list[int]]) -> None:
        self.stream.end()
        self.write("\n\n")
        print(f"({self.pace.summary(sum(map(len, outputs)))})", file=sys.stderr, flush=True)


def write_samples(args, tokenizer, context: int, decode: Decode, pace: Pace) -> None:
    """File and ``--num-samples`` modes on rank 0: every prompt checked up front, then JSON lines out; the
    pace of the whole run at the end."""
    try:
        batches = list(file_prompts(args, tokenizer, context))
        writer = AtomicJsonLines(args.sample_output_file) if args.sample_output_file else None
    except BaseException:
        broadcast_prompts(failed=True)
        raise

    generated = 0
    pace.start()

    def consume(batch: Batch, outputs: list[list[int]]) -> None:
        nonlocal generated
        generated += sum(map(len, outputs))
        for (text, _), ids in zip(batch, outputs):
            record = {"prompt": text, "text": tokenizer.decode(ids), "token_ids": ids}
            if writer is None:
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                writer.write(record)

    if writer is None:
        decode_batches(iter(batches), decode, consume)
        print(f"generated {sum(map(len, batches))} samples: {pace.summary(generated)}", file=sys.stderr)
        return
    with writer:
        decode_batches(iter(batches), decode, consume)
    print(f"wrote {sum(map(len, batches))} samples to {args.sample_output_file}: {pace.summary(generated)}",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv, description="GPT2 text generation", defaults={"seq_length": None}, model="gpt2")
    params = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    check_mode_args(args)
    device = initialize_distributed(**distributed_settings(args))
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    model, loaded = load_gpt2_for_inference(args, tokenizer, device)
    context = context_length(args, model)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    is_rank_0 = mpu.is_rank_0()
    terminal = Terminal(tokenizer) if is_rank_0 and not (args.sample_input_file or args.num_samples) else None
    pace = terminal.pace if terminal is not None else Pace()

    def decode(prompts: list[list[int]]) -> list[list[int]]:
        return generate(model, prompts, max_new_tokens=args.out_seq_length, context_length=context, params=params,
                        eod=tokenizer.eod, vocab_size=tokenizer.vocab_size, generator=generator,
                        on_token=terminal.on_token if terminal else pace.token)

    if not is_rank_0:
        decode_batches(None, decode)
        return
    print(f"loaded {loaded.path} (iteration {loaded.iteration}); context {context} tokens", file=sys.stderr)
    if terminal is not None:
        decode_batches(terminal.prompts(context), decode, terminal.finish)
    else:
        write_samples(args, tokenizer, context, decode, pace)


if __name__ == "__main__":
    run_main(main)
