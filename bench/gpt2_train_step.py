"""Time one GPT2 training step (forward, backward, AdamW) here and in Hugging Face transformers.

Both models get the same shape, no dropout and the same batch; steps alternate between the two so
that a noisy machine slows both alike. Prints the median step time of each and their ratio
(ours / transformers: below 1 means we are faster), plus tokens/s and, on CUDA, model FLOPs
utilisation against --peak-tflops.

    python bench/gpt2_train_step.py --num-layers 4 --hidden-size 256 --heads 4 --seq-length 128
    python bench/gpt2_train_step.py --device cuda --dtype bf16 --num-layers 24 --hidden-size 1024 --heads 16 \\
        --seq-length 1024 --batch-size 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mpu  # noqa: E402
from model import GPT2Model, TransformerConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="autocast dtype for both models (fp32: none)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    return parser.parse_args()


def build_ours(args) -> torch.nn.Module:
    config = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                               num_attention_heads=args.heads, vocab_size=args.vocab_size,
                               max_sequence_length=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0)
    return GPT2Model(config)


def build_hf(args) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=args.num_layers, n_embd=args.hidden_size, n_head=args.heads,
                        vocab_size=args.vocab_size, n_positions=args.seq_length, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def step_ours(model, tokens, labels, positions):
    return mpu.vocab_parallel_cross_entropy(model(tokens, positions), labels).mean()


def step_hf(model, tokens, labels, positions):
    logits = model(input_ids=tokens, position_ids=positions).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def timed_step(model, optimizer, loss_fn, batch, device, dtype) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(model, *batch)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(1234)
    models = {"ours": build_ours(args).to(device), "transformers": build_hf(args).to(device)}
    losses = {"ours": step_ours, "transformers": step_hf}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length + 1), device=device)
    positions = torch.arange(args.seq_length, device=device).expand(args.batch_size, -1)
    batch = (tokens[:, :-1], tokens[:, 1:], positions)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 2):
        for name in models:
            elapsed = timed_step(models[name], optimizers[name], losses[name], batch, device, dtype)
            if step >= 2:
                times[name].append(elapsed)
    params = sum(p.numel() for p in models["ours"].parameters())
    tokens_per_step = args.batch_size * args.seq_length
    # 6 N per token for the weights plus the attention scores (12 L s h per token, fwd + bwd).
    flops_per_step = tokens_per_step * (6 * params + 12 * args.num_layers * args.seq_length * args.hidden_size)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype "
          f"{args.dtype}, {params / 1e6:.1f}M parameters, {tokens_per_step} tokens/step, {args.steps} steps")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        line = f"{name:>13}: median step {1000 * median:8.1f} ms | {tokens_per_step / median:9.0f} tokens/s"
        if args.peak_tflops:
            line += f" | MFU {100 * flops_per_step / median / (args.peak_tflops * 1e12):.1f}%"
        print(line)
    print(f"ratio ours/transformers step time: {medians['ours'] / medians['transformers']:.3f}")
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
