"""Load ``tools/serve.py`` on loopback: one request at a time (``--max-batch-size 1``) against batched.

Starts two servers on 127.0.0.1 (``--port 0``) on the same checkpoint, one with ``--max-batch-size 1``
and one with ``--max-batch-size --batch``, and warms each up with one full request. Then it runs the same
load against each, level by level, ``--rounds`` times, taking turns (the order flips every time, so that
a busy machine slows both alike): C clients (``--concurrency``) share ``--requests`` streamed completions
(the same prompts in the same order, ``max_tokens`` = ``--max-tokens``, temperature 0), each client
sending its next request when its last one ended. Every level is bounded: a request that takes longer
than ``--request-timeout`` is lost, and at ``--time-limit`` seconds since the start everything still
running is cut and nothing more is sent. On CPU the two servers share the cores, but only one is loaded
at a time.

Prints a line per level and round as it ends, then per level and server: requests done / lost (an HTTP
error, a broken stream, no ``[DONE]``, a timeout), the median throughput over the rounds (generated tokens
of the done requests over the level's wall time; the server streams one chunk per token, then one that ends
the choice, is not counted and may carry text held back until then), and p50/p99 latency and time to first
token of all rounds' requests; then the ratio batched / one-at-a-time of the throughput at each concurrency
(the median of the rounds' ratios, each shown: with one client both servers do the same work, so how far
that ratio is from 1 shows the noise), and how many greedy texts the two servers agree on. While the batched
server runs the highest level of the last round, a few bad requests (a prompt longer than the context,
max_tokens of -1, a string temperature, malformed JSON) are sent: each must get HTTP 400 with an OpenAI
error body naming the field at fault, and no request may be lost. Exit status 1 when a request was lost or a
bad request got anything else, 2 when the time limit cut the run.

Without ``--load`` it writes a randomly initialised GPT2 of the given shape to a temporary folder
(no training: the weights only need the right shape for timing), with the real GPT-2 BPE from
``--cache-dir`` when ``gpt2-vocab.json`` and ``gpt2-merges.txt`` are there, else the tests' tiny table.

    python bench/serve_load.py                                  # 2 layers, hidden 64; clients 1 2 4 8
    python bench/serve_load.py --num-layers 12 --hidden-size 768 --heads 12   # GPT-2 small's shape
    python bench/serve_load.py --load CKPT --vocab-file V --merge-file M --concurrency 1 8 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time

import aiohttp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing import write_checkpoint_files  # noqa: E402
from conversion.layout import model_parallel_of_one  # noqa: E402
from conversion.reshard import release_states  # noqa: E402
from data_utils.tokenization import GPT2_MERGES_NAME, GPT2_VOCAB_NAME  # noqa: E402
from model import GPT2Model, TransformerConfig, pad_vocab_size  # noqa: E402
from tests.helpers import write_tiny_gpt2  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("one-at-a-time", "batched")
PROMPTS = [
    "The history of the city begins",
    "In the morning the cat sat on the mat and",
    "Scientists announced on Tuesday that",
    "Once upon a time there was a",
    "The best way to learn a language is",
    "He opened the door and saw",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default=None, help="checkpoint to serve (default: a random one of the shape below)")
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    parser.add_argument("--cache-dir", default=os.path.join(REPO, "cache"),
                        help="where the real GPT-2 vocabulary is looked for when no --load is given")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="clients per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--rounds", type=int, default=3, help="times each level runs against each server")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request streams")
    parser.add_argument("--batch", type=int, default=8, help="--max-batch-size of the batched server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is lost")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1234, help="weights of the random model")
    args = parser.parse_args(argv)
    if args.load and not (args.vocab_file and args.merge_file):
        parser.error("--load needs the model's --vocab-file and --merge-file")
    if min(args.concurrency) < 1 or min(args.requests, args.rounds, args.max_tokens) < 1:
        parser.error("--concurrency, --requests, --rounds and --max-tokens must be positive")
    return args


# --- the checkpoint and the server ------------------------------------------------------------------------------------


def tokenizer_files(cache_dir: str, folder: str) -> tuple[str, str, str]:
    """(vocab, merges, description): the real GPT-2 files if present, else the tests' tiny table."""
    vocab, merges = os.path.join(cache_dir, GPT2_VOCAB_NAME), os.path.join(cache_dir, GPT2_MERGES_NAME)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return vocab, merges, f"GPT-2 BPE from {cache_dir}"
    vocab, merges = write_tiny_gpt2(folder)
    return vocab, merges, "the tests' tiny GPT-2 table (no gpt2-vocab.json in --cache-dir)"


def write_random_checkpoint(folder: str, args, vocab_size: int) -> str:
    """A ``release`` checkpoint of a randomly initialised GPT2 in ``folder/random-gpt2``; returns its path."""
    config = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=args.heads, vocab_size=pad_vocab_size(vocab_size, 128, 1),
                               max_sequence_length=args.max_positions, hidden_dropout=0.0, attention_dropout=0.0,
                               unpadded_vocab_size=vocab_size)
    path = os.path.join(folder, "random-gpt2")
    with model_parallel_of_one():
        torch.manual_seed(args.seed)
        full = GPT2Model(config).state_dict()
        states = release_states("gpt2", config, full, 1, {"tokenizer_type": "GPT2BPETokenizer",
                                                          "make_vocab_size_divisible_by": 128}, path)
    write_checkpoint_files(path, "release", states)
    return path


# --- one level of load ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One request: whether it completed, its streamed tokens and text, latency and time to first token (s)."""

    ok: bool
    tokens: int = 0
    text: str = ""
    latency: float = math.nan
    ttft: float = math.nan
    why: str = ""


def completion_body(i: int, args) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0, "stream": True}


async def _read_stream(session: aiohttp.ClientSession, url: str, body: dict, out: Outcome,
                       first_token: asyncio.Event | None) -> Outcome:
    start = time.perf_counter()
    async with session.post(url + "v1/completions", json=body) as resp:
        if resp.status != 200:
            return dataclasses.replace(out, why=f"HTTP {resp.status}")
        async for raw in resp.content:  # aiohttp splits the stream into lines
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out.ok, out.latency = True, time.perf_counter() - start
                return out
            choices = json.loads(data)["choices"]
            if not choices:
                continue  # a usage chunk
            out.text += choices[0]["text"]
            if choices[0]["finish_reason"]:
                continue  # the chunk that ends the choice (with any text held back until then): not a token
            if out.tokens == 0:
                out.ttft = time.perf_counter() - start
                if first_token is not None:
                    first_token.set()
            out.tokens += 1
    return dataclasses.replace(out, why="stream ended before [DONE]")


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, timeout: float,
                     first_token: asyncio.Event | None = None) -> Outcome:
    """Send one streamed completion and read its events to ``[DONE]`` (``first_token`` is set at its first)."""
    out = Outcome(ok=False)
    try:
        return await asyncio.wait_for(_read_stream(session, url, body, out, first_token), timeout)
    except asyncio.TimeoutError:
        return dataclasses.replace(out, why=f"no [DONE] within {timeout:.0f}s")
    except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError) as err:
        return dataclasses.replace(out, why=f"{type(err).__name__}: {err}")


@dataclasses.dataclass
class Level:
    """What one level of load gave: every sent request's outcome by index, the unsent count and the wall time."""

    concurrency: int
    outcomes: dict[int, Outcome]
    unsent: int
    seconds: float

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.ok]

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if not o.ok]

    @property
    def rate(self) -> float:
        """Generated tokens of the done requests per second of the level's wall time."""
        return sum(o.tokens for o in self.done) / self.seconds


async def run_level(url: str, concurrency: int, args, deadline: float, started: asyncio.Event | None = None,
                    finished: asyncio.Event | None = None) -> Level:
    """``args.requests`` streamed requests from ``concurrency`` clients; nothing is sent after ``deadline``
    (``time.monotonic``) and what still runs then is cut (lost). ``started`` is set at the first token,
    ``finished`` when every client is done."""
    outcomes: dict[int, Outcome] = {}
    queue = iter(range(args.requests))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in queue:  # the clients share one iterator: each request is sent once
            left = deadline - time.monotonic()
            if left <= 0:
                return
            outcomes[i] = await stream_one(session, url, completion_body(i, args), min(args.request_timeout, left),
                                           started)

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    if finished is not None:
        finished.set()
    return Level(concurrency, outcomes, args.requests - len(outcomes), time.perf_counter() - start)


# --- bad requests -----------------------------------------------------------------------------------------------------


def bad_requests() -> list[tuple[str, str, str | None]]:
    """(what, raw JSON body, the field the 400 should name or None) of each bad request."""
    long_prompt = " the" * 20000  # longer than any GPT2 context, in any GPT-2 style vocabulary
    return [
        ("prompt longer than the context", json.dumps({"prompt": long_prompt, "max_tokens": 4}), "prompt"),
        ("max_tokens -1", json.dumps({"prompt": "Hello", "max_tokens": -1}), "max_tokens"),
        ("temperature as a word", json.dumps({"prompt": "Hello", "temperature": "hot"}), "temperature"),
        ("malformed JSON", '{"prompt": "Hello", "max_tokens": 4', None),
    ]


@dataclasses.dataclass
class BadAnswer:
    """How the server answered one bad request: ``ok`` when with 400 and OpenAI's error body naming the field."""

    what: str
    status: int | None
    ok: bool
    note: str


def judge_bad(what: str, status: int, text: str, param: str | None, during: str) -> BadAnswer:
    try:
        error = json.loads(text)["error"]
        kind, named = error["type"], error.get("param")
    except (ValueError, KeyError, TypeError):
        return BadAnswer(what, status, False, f"no OpenAI error body: {text[:80]!r}, {during}")
    ok = status == 400 and kind == "invalid_request_error" and named == param
    return BadAnswer(what, status, ok, f"{kind}, param {named}, {during}")


async def send_bad(url: str, started: asyncio.Event, finished: asyncio.Event, timeout: float) -> list[BadAnswer]:
    """Once ``started`` is set (the load is running), send each bad request; how each was answered, and
    whether the load had ``finished`` by then."""
    try:
        await asyncio.wait_for(started.wait(), timeout)
    except asyncio.TimeoutError:
        pass  # send them anyway: the load's own outcomes will tell what went wrong
    answers = []
    async with aiohttp.ClientSession() as session:
        for what, body, param in bad_requests():
            try:
                async with session.post(url + "v1/completions", data=body,
                                        headers={"Content-Type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    text, status = await resp.text(), resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                answers.append(BadAnswer(what, None, False, f"{type(err).__name__}: {err}"))
                continue
            during = "after the load ended" if finished.is_set() else "during the load"
            answers.append(judge_bad(what, status, text, param, during))
    return answers


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "health", timeout=aiohttp.ClientTimeout(total=30)) as resp:
                return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


# --- the run ----------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def level_line(label: str, levels: list[Level]) -> str:
    """Requests done and lost, the median tokens/s and the pooled latency and ttft percentiles of ``levels``
    (the rounds of one level against one server)."""
    done = [o for level in levels for o in level.done]
    lost = [o for level in levels for o in level.lost]
    unsent = sum(level.unsent for level in levels)
    lat, ttft = [o.latency for o in done], [o.ttft for o in done if o.tokens]
    line = (f"{label} | clients {levels[0].concurrency:>3} | done {len(done):>4} lost {len(lost):>3}"
            f"{f' unsent {unsent}' if unsent else ''} | {statistics.median(lv.rate for lv in levels):8.1f} tokens/s | "
            f"latency p50 {percentile(lat, 50):7.3f}s p99 {percentile(lat, 99):7.3f}s | "
            f"ttft p50 {percentile(ttft, 50):7.3f}s p99 {percentile(ttft, 99):7.3f}s")
    whys = sorted({o.why for o in lost})
    return line + (f"\n{'':>13}   lost: {'; '.join(whys)}" if whys else "")


async def warm_up(url: str, mode: str, args) -> None:
    """One request of the full length, so that the first level does not pay for first-call costs."""
    async with aiohttp.ClientSession() as session:
        warm = await stream_one(session, url, completion_body(0, args), args.request_timeout)
    if not warm.ok:
        raise SystemExit(f"{mode}: the warm-up request failed ({warm.why})")


async def level_with_bad_requests(url: str, concurrency: int, args, deadline: float
                                  ) -> tuple[Level, list[BadAnswer]]:
    """One level with the bad requests sent while it runs, and /health checked after it."""
    started, finished = asyncio.Event(), asyncio.Event()
    level, bad = await asyncio.gather(run_level(url, concurrency, args, deadline, started, finished),
                                      send_bad(url, started, finished, args.request_timeout))
    if not await healthy(url):
        bad.append(BadAnswer("GET /health after them", None, False, "no 200"))
    return level, bad


Levels = dict[str, dict[int, list[Level]]]  # by mode, then concurrency: one Level per round


async def load_both(urls: dict[str, str], args, deadline: float) -> tuple[Levels, list[BadAnswer]]:
    """Every level against both servers, ``args.rounds`` times, taking turns (the order flips every time,
    so that a busy machine slows both alike); the bad requests during the batched server's last level."""
    for mode, url in urls.items():
        await warm_up(url, mode, args)
    levels: Levels = {mode: {c: [] for c in args.concurrency} for mode in urls}
    bad: list[BadAnswer] = []
    turn = 0
    for r in range(args.rounds):
        for k, concurrency in enumerate(args.concurrency):
            for mode in (MODES if turn % 2 == 0 else MODES[::-1]):
                if mode == "batched" and r == args.rounds - 1 and k == len(args.concurrency) - 1:
                    level, bad = await level_with_bad_requests(urls[mode], concurrency, args, deadline)
                else:
                    level = await run_level(urls[mode], concurrency, args, deadline)
                print(level_line(f"round {r + 1} | {mode:>13}", [level]), flush=True)
                levels[mode][concurrency].append(level)
            turn += 1
    return levels, bad


def serve_and_load(serve_argv: list[str], args, deadline: float) -> tuple[Levels, list[BadAnswer]]:
    """Start both servers (each keeps its own copy of the model), load them, stop them."""
    queue = max(args.concurrency) + len(bad_requests()) + 8
    servers: dict[str, ServerProcess] = {}
    try:
        for mode, batch in zip(MODES, (1, args.batch)):
            try:
                servers[mode] = ServerProcess([*serve_argv, "--max-batch-size", batch, "--max-queue", queue], 1,
                                              args.startup_timeout)
            except RuntimeError as err:
                raise SystemExit(f"{mode} server: {err}") from None
        return asyncio.run(load_both({mode: server.url for mode, server in servers.items()}, args, deadline))
    finally:
        for server in servers.values():
            server.stop(signal.SIGINT)


def report(levels: Levels, bad: list[BadAnswer], rounds: int) -> int:
    """Print the summary, the ratios and the bad requests' statuses; the exit status."""
    one, batched = levels["one-at-a-time"], levels["batched"]
    print(f"\nover {rounds} round(s): median tokens/s, latency and ttft percentiles of all requests")
    for concurrency in one:
        for mode in MODES:
            print(level_line(f"{mode:>13}", levels[mode][concurrency]))
    print("\nthroughput batched / one-at-a-time (median of the rounds' ratios):")
    for concurrency, rounds_a in one.items():
        rounds_b = batched[concurrency]
        ratios = [b.rate / a.rate for a, b in zip(rounds_a, rounds_b) if a.rate]
        agree = same = 0
        for a, b in zip(rounds_a, rounds_b):
            both = [i for i in a.outcomes if i in b.outcomes and a.outcomes[i].ok and b.outcomes[i].ok]
            same += len(both)
            agree += sum(a.outcomes[i].text == b.outcomes[i].text for i in both)
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"  clients {concurrency:>3}: {statistics.median(ratios) if ratios else math.nan:.2f}  (rounds: {each}; "
              f"greedy texts agree on {agree}/{same} requests)")
    print("\nbad requests during the batched run at the highest concurrency:")
    for answer in bad:
        print(f"  {answer.what:<32} -> HTTP {answer.status or 'none'}: {'ok' if answer.ok else 'WRONG'} "
              f"({answer.note})")
    every = [level for mode in MODES for rounds_ in levels[mode].values() for level in rounds_]
    lost = sum(len(level.lost) for level in every)
    unsent = sum(level.unsent for level in every)
    wrong = sum(not answer.ok for answer in bad)
    print(f"\nrequests lost: {lost}; bad requests not answered 400: {wrong}; server kept serving: "
          f"{'yes' if not lost and not wrong else 'NO'}")
    if lost or wrong:
        return 1
    if unsent:
        print(f"the time limit cut the run: {unsent} requests were never sent")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="bench-serve-load-") as tmp:
        if args.load:
            load, vocab, merges, what = args.load, args.vocab_file, args.merge_file, f"--load {args.load}"
        else:
            vocab, merges, tokens = tokenizer_files(args.cache_dir, tmp)
            with open(vocab, encoding="utf-8") as f:
                vocab_size = len(json.load(f))
            load = write_random_checkpoint(tmp, args, vocab_size)
            what = (f"random GPT2 ({args.num_layers} layers, hidden {args.hidden_size}, {args.heads} heads, "
                    f"context {args.max_positions}), {tokens}")
        print(f"model: {what}; {args.rounds} round(s) x {len(args.concurrency)} levels x {args.requests} requests "
              f"x {args.max_tokens} tokens; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        serve_argv = ["--load", load, "--vocab-file", vocab, "--merge-file", merges, "--tokenizer-type",
                      args.tokenizer_type, "--device", args.device, "--host", "127.0.0.1", "--port", "0"]
        levels, bad = serve_and_load(serve_argv, args, deadline)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return report(levels, bad, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
