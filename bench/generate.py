"""Time cached greedy decoding here (``generation.generate``) and in Hugging Face ``GPT2LMHeadModel.generate``.

Both models hold the same weights (ours copied into transformers' layout, checked by comparing
the logits of a full forward pass within 1e-4 before anything is timed), get the same random prompts
and produce exactly ``--new-tokens`` tokens: greedy, ``min_new_tokens = max_new_tokens`` and an
end-of-sequence token that transformers may not pick before then, while ours is given no
end-of-document token at all. Runs alternate between the two so that a noisy machine slows both
alike. Prints, per batch size, the median tokens/s (new tokens of the whole batch per second, the
prompt's forward pass included) of each, their ratio (ours / transformers: above 1 means we are
faster) and whether the greedy tokens agree.

Beside each figure stands the memory-bandwidth limit: one decoding step must read every weight once
(all parameters but the position-embedding table, of which it reads one row) and each sequence's
keys and values cached so far; the run's average of those bytes divided by this machine's read
bandwidth gives the most steps per second, times the batch size the most tokens/s. The bandwidth is
measured in the same run: a 512 MiB fp32 buffer, far larger than the caches, read by ``torch.sum``
and by a matrix-vector product, each timed between the models' runs; the faster one's median counts.
Each model's fraction of that limit follows. The limit is our model's (its vocabulary is padded to
128s, 0.1% more bytes than transformers' at GPT-2's 50257).

    python bench/generate.py                                   # 4 layers, hidden 256, batches 1 and 8
    python bench/generate.py --num-layers 12 --hidden-size 768 --heads 12   # GPT-2 small's shape
    python bench/generate.py --device cuda --dtype bf16 --num-layers 24 --hidden-size 1024 --heads 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import DTYPES, init_single_process  # noqa: E402
from generation import SamplingParams, generate  # noqa: E402
from model import (  # noqa: E402
    GPT2Model,
    TransformerConfig,
    pad_vocab_size,  # noqa: E402
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=50257, help="real vocabulary (ours pads it to 128s)")
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and batch size (after one "
                                                                "warm-up run each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights' dtype for both models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--bandwidth-mib", type=int, default=512, help="buffer the read bandwidth is measured on")
    return parser.parse_args()


def build_ours(args) -> GPT2Model:
    config = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=args.heads, vocab_size=pad_vocab_size(args.vocab_size, 128, 1),
                               max_sequence_length=args.max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    return GPT2Model(config, parallel_output=False).eval()


def hf_state_dict(ours: GPT2Model, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our (model-parallel size 1) parameters under ``GPT2LMHeadModel``'s names; Conv1D stores (in, out)."""
    state = {"transformer.wte.weight": ours.word_embeddings.weight[:vocab_size],
             "transformer.wpe.weight": ours.position_embeddings.weight,
             "transformer.ln_f.weight": ours.transformer.final_layernorm.weight,
             "transformer.ln_f.bias": ours.transformer.final_layernorm.bias}
    pairs = {"input_layernorm": "ln_1", "attention.query_key_value": "attn.c_attn", "attention.dense": "attn.c_proj",
             "post_attention_layernorm": "ln_2", "mlp.dense_h_to_4h": "mlp.c_fc", "mlp.dense_4h_to_h": "mlp.c_proj"}
    for i, layer in enumerate(ours.transformer.layers):
        for name, tensor in layer.state_dict().items():
            module, kind = name.rsplit(".", 1)
            linear = kind == "weight" and "layernorm" not in module
            state[f"transformer.h.{i}.{pairs[module]}.{kind}"] = tensor.t() if linear else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def build_hf(args, ours: GPT2Model) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.num_layers, n_embd=args.hidden_size, n_head=args.heads,
                        vocab_size=args.vocab_size, n_positions=args.max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(hf_state_dict(ours, args.vocab_size), strict=False)
    if unexpected or [k for k in missing if not k.endswith("attn.bias")]:
        raise RuntimeError(f"weight mapping is off: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def check_same_logits(ours: GPT2Model, hf: torch.nn.Module, args, device: torch.device) -> float:
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.arange(32, device=device).expand(2, -1)
    ours_logits = ours(tokens, positions)[..., :args.vocab_size].float()
    hf_logits = hf(input_ids=tokens, position_ids=positions).logits.float()
    torch.testing.assert_close(ours_logits, hf_logits, atol=1e-4, rtol=1e-4)
    return (ours_logits - hf_logits).abs().max().item()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(model: GPT2Model, prompts: torch.Tensor, args) -> torch.Tensor:
    new = generate(model, prompts.tolist(), max_new_tokens=args.new_tokens, context_length=args.max_positions,
                   params=SamplingParams(greedy=True), eod=None, vocab_size=args.vocab_size)
    return torch.tensor(new)


def run_hf(model: torch.nn.Module, prompts: torch.Tensor, args) -> torch.Tensor:
    eos = args.vocab_size - 1  # masked out until min_new_tokens, so never picked here
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=eos,
                         pad_token_id=eos)
    return out[:, prompts.shape[1]:].cpu()


READS = {
    "torch.sum": lambda buffer, row: buffer.sum(),
    "1 x 1024 @ (1024, n) matrix-vector product": lambda buffer, row: row @ buffer.view(1024, -1),
}
"""Two ways to read a buffer once: a reduction, and the product a decoding step's layers are made of
(on this CPU the product reads faster: MKL streams more rows at once than torch's reduction)."""


def time_reads(buffer: torch.Tensor, row: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Seconds each of ``READS`` takes to read ``buffer`` once: with a buffer far larger than the caches,
    its bytes over this time are the memory's read bandwidth."""
    times = {}
    for name, read in READS.items():
        _synchronize(device)
        start = time.perf_counter()
        read(buffer, row)
        _synchronize(device)
        times[name] = time.perf_counter() - start
    return times


def bytes_per_step(model: GPT2Model, batch: int, args) -> float:
    """Bytes one decoding step reads, averaged over the run: every weight but the position table once,
    plus each sequence's cached keys and values (``prompt + (new - 1) / 2`` positions on average)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    positions = model.position_embeddings.weight
    weights -= positions.numel() * positions.element_size()
    cached = args.prompt_length + (args.new_tokens - 1) / 2
    kv = 2 * args.num_layers * cached * args.hidden_size * positions.element_size()
    return weights + batch * kv


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "identical tokens"
    differ = (a != b).any(dim=0).nonzero()
    return f"tokens differ from step {differ[0].item() if len(differ) else '?'} on"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    init_single_process()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ours = build_ours(args)
    hf = build_hf(args, ours)
    ours, hf = ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)
    max_diff = check_same_logits(ours, hf, args, device)
    params = sum(p.numel() for p in hf.parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"dtype {args.dtype}, {params / 1e6:.1f}M parameters "
          f"({args.num_layers} layers, hidden {args.hidden_size}), prompt {args.prompt_length} tokens, "
          f"{args.new_tokens} new tokens, {args.repeats} timed runs; logits agree (max diff {max_diff:.1e})")
    buffer = torch.ones(args.bandwidth_mib * 2**20 // 4, device=device)  # fp32, for the read bandwidth
    row = torch.ones(1, 1024, device=device)
    runners = {"ours": (run_ours, ours), "transformers": (run_hf, hf)}
    for batch in args.batch_sizes:
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_length),
                                generator=torch.Generator().manual_seed(batch)).to(device)
        times: dict[str, list[float]] = {name: [] for name in runners}
        read_times: dict[str, list[float]] = {name: [] for name in READS}  # between the runs: the same load
        outputs = {}
        for run in range(args.repeats + 1):
            for name, (fn, model) in runners.items():
                _synchronize(device)
                start = time.perf_counter()
                outputs[name] = fn(model, prompts, args)
                _synchronize(device)
                if run:
                    times[name].append(time.perf_counter() - start)
                    for _ in range(3):
                        for name, seconds in time_reads(buffer, row, device).items():
                            read_times[name].append(seconds)
        rates = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
        speeds = {name: buffer.numel() * buffer.element_size() / statistics.median(t) for name, t in read_times.items()}
        read_op, bandwidth = max(speeds.items(), key=lambda item: item[1])  # the faster read sets the limit
        step_bytes = bytes_per_step(ours, batch, args)
        limit = batch * bandwidth / step_bytes
        others = ", ".join(f"{name} {speed / 1e9:.1f}" for name, speed in speeds.items() if name != read_op)
        print(f"batch {batch:2d} read bandwidth {bandwidth / 1e9:.1f} GB/s: {read_op} over {args.bandwidth_mib} MiB "
              f"fp32, median of {len(read_times[read_op])} timed between the runs (also {others} GB/s); a step "
              f"reads {step_bytes / 1e6:.0f} MB, so at most {limit:.1f} tokens/s")
        for name, rate in rates.items():
            print(f"batch {batch:2d} {name:>13}: median {statistics.median(times[name]):7.3f} s | "
                  f"{rate:8.1f} tokens/s | {rate / limit:.2f} of the bandwidth limit")
        print(f"batch {batch:2d} ratio ours/transformers tokens/s: {rates['ours'] / rates['transformers']:.2f} "
              f"({agreement(outputs['ours'], outputs['transformers'])})")


if __name__ == "__main__":
    main()
