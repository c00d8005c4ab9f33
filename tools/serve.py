"""Serve a trained GPT2 checkpoint over HTTP: OpenAI's completions API, Megatron's /api, a playground page.

    python tools/serve.py --load checkpoints/gpt2_345m --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --port 5000
    torchrun --nproc_per_node 2 tools/serve.py --load CKPT --model-parallel-size 2 ...   # a model-parallel checkpoint

Any model-parallel size works (the shape comes from the checkpoint); global rank 0 listens, and the
other ranks follow it step by step. Requests arriving together are decoded together, up to
``--max-batch-size`` sequences; up to ``--max-queue`` more wait, and beyond that the server answers
429. Ctrl-C (or SIGTERM) stops it after the current step; the ``serving/`` package has the rest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import aiohttp  # noqa: F401 - the server's HTTP library; checked here for a one-line error
except ImportError:
    sys.exit("error: tools/serve.py needs aiohttp (pip install 'aiohttp>=3.9'; it is in requirements.txt)")

import torch.distributed as dist  # noqa: E402

import mpu  # noqa: E402
from arguments import distributed_settings, get_args  # noqa: E402
from data_utils import make_tokenizer  # noqa: E402
from errors import ArgumentError  # noqa: E402
from initialize import initialize_distributed, run_main  # noqa: E402
from restore import load_gpt2_for_inference  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.server import Server  # noqa: E402


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving", "tools/serve.py: the HTTP server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=5000, help="port to listen on (0: any free one; the URL is "
                                                               "printed)")
    group.add_argument("--max-batch-size", type=int, default=8, help="most sequences decoded together")
    group.add_argument("--max-queue", type=int, default=64,
                       help="most sequences waiting for a batch row; more are answered 429")
    group.add_argument("--served-model-name", default=None,
                       help="the model's name in the API (default: the --load folder's name)")


def check_serving_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_batch_size < 1:
        raise ArgumentError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_queue < 1:
        raise ArgumentError(f"--max-queue must be at least 1, got {args.max_queue}")
    if dist.get_world_size() != mpu.get_model_parallel_world_size():
        raise ArgumentError(f"the server runs one copy of the model: start {mpu.get_model_parallel_world_size()} "
                            f"processes (the --model-parallel-size), not {dist.get_world_size()}; for more "
                            "throughput run several servers")


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv, add_serving_args, description="GPT2 text-generation server",
                    defaults={"seq_length": None}, model="gpt2")
    device = initialize_distributed(**distributed_settings(args))
    check_serving_args(args)
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    model, loaded = load_gpt2_for_inference(args, tokenizer, device)
    positions = model.config.max_sequence_length
    context = positions if args.seq_length is None else min(args.seq_length, positions)
    engine = Engine(model, tokenizer, context, args.max_batch_size, args.max_queue, seed=args.seed)
    if not mpu.is_rank_0():
        engine.run()
        return
    name = args.served_model_name or os.path.basename(os.path.normpath(args.load))
    server = Server(engine, tokenizer, context, name, args.host, args.port)
    try:
        url = server.start()
    except OSError as err:
        engine.close()
        engine.run()  # tells the other ranks to stop
        raise ArgumentError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    signals = []

    def stop(signum, frame) -> None:  # the first Ctrl-C or SIGTERM: stop after this step; a second: at once
        signals.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        engine.close()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"loaded {loaded.path} (iteration {loaded.iteration}); serving {name} at {url} (context {context} "
          f"tokens, up to {args.max_batch_size} sequences at once, {args.max_queue} waiting); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        engine.run()
    finally:
        server.stop()
    if signal.SIGINT in signals:
        raise KeyboardInterrupt
    print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main)
