"""Hugging Face GPT2 / BERT checkpoints to and from this toolkit's checkpoints.

    python tools/hf_checkpoint.py import --hf-dir gpt2-hf --save checkpoints/gpt2 [--target-model-parallel-size 2]
    python tools/hf_checkpoint.py export --load checkpoints/gpt2 --hf-dir gpt2-out

``import`` reads a ``GPT2LMHeadModel`` / ``GPT2Model`` or ``BertForPreTraining`` / ``BertForMaskedLM`` /
``BertModel`` folder (``config.json`` + ``model.safetensors``, its sharded index, or a
``pytorch_model.bin`` that loads with ``weights_only=True``) and writes a weights-only ``release``
checkpoint at the target model-parallel size, with the model config stored: ``--finetune`` training,
generation and evaluation take the shape from it. The vocabulary is padded by the training rule
(``--make-vocab-size-divisible-by``); padded entries get no probability, so the loss equals
``transformers``'. Heads a ``BertModel`` lacks (pooler, masked-LM, next-sentence) are newly
initialised, and said so. Tokenizer files in the folder are copied beside the checkpoint.

``export`` writes ``config.json`` + ``model.safetensors`` that ``transformers``' ``from_pretrained``
loads (``GPT2LMHeadModel`` or ``BertForPreTraining``), the vocabulary cut back to the tokenizer's
size, plus the tokenizer files the checkpoint's run names (``--vocab-file``/``--merge-file``) when
they exist. ``transformers`` is not needed for either direction (``safetensors`` reads and writes).
Outputs must not exist yet (or be empty); they appear only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import default_file_mode  # noqa: E402
from checkpointing import read_rank_grid, write_checkpoint_files  # noqa: E402
from conversion import (  # noqa: E402
    TOKENIZER_FILES,
    ConversionError,
    check_new_output,
    full_model_state,
    full_to_hf,
    hf_config_from,
    import_hf,
    new_output_dir,
    safetensors_torch,
)


def _import(args: argparse.Namespace) -> None:
    check_new_output(args.save, "--save")
    if args.target_model_parallel_size < 1:
        raise ConversionError(f"--target-model-parallel-size must be at least 1, got {args.target_model_parallel_size}")
    states, fresh = import_hf(args.hf_dir, args.target_model_parallel_size, args.make_vocab_size_divisible_by,
                              args.seed)
    copied = []
    with new_output_dir(args.save, "--save") as staging:
        write_checkpoint_files(staging, "release", states)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.hf_dir, name)):
                shutil.copy2(os.path.join(args.hf_dir, name), os.path.join(staging, name))
                copied.append(name)
    config, saved = states[0]["config"], states[0]["args"]
    print(f"imported {args.hf_dir} to {args.save}: {config['num_layers']} layers, hidden {config['hidden_size']}, "
          f"{config['num_attention_heads']} heads, vocabulary {config['unpadded_vocab_size']} padded to "
          f"{config['vocab_size']}, model-parallel size {args.target_model_parallel_size}")
    if fresh:
        print(f"note: the folder has no {', '.join(fresh)}; newly initialised")
    flags = f"--load {args.save} --tokenizer-type {saved['tokenizer_type']}"
    if "vocab.json" in copied and "merges.txt" in copied:
        vocab, merges = os.path.join(args.save, "vocab.json"), os.path.join(args.save, "merges.txt")
        flags += f" --vocab-file {vocab} --merge-file {merges}"
    elif "vocab.txt" in copied:
        flags += (f" --tokenizer-model-type {saved['tokenizer_model_type']} "
                  f"--vocab-file {os.path.join(args.save, 'vocab.txt')}")
    print(f"flags: {flags}")


def _tokenizer_sources(saved_args: dict, model_type: str) -> dict[str, str]:
    """Tokenizer files the checkpoint's run used, by the name Hugging Face gives them."""
    sources = {}
    imported = saved_args.get("imported_from")
    if imported:
        sources.update({name: os.path.join(imported, name) for name in TOKENIZER_FILES})
    if model_type == "gpt2":
        cache = saved_args.get("cache_dir") or ""
        sources["vocab.json"] = saved_args.get("vocab_file") or os.path.join(cache, "gpt2-vocab.json")
        sources["merges.txt"] = saved_args.get("merge_file") or os.path.join(cache, "gpt2-merges.txt")
    elif saved_args.get("vocab_file"):
        sources["vocab.txt"] = saved_args["vocab_file"]
    return {name: path for name, path in sources.items() if path and os.path.isfile(path)}


def _export(args: argparse.Namespace) -> None:
    save_file = safetensors_torch().save_file
    check_new_output(args.hf_dir, "--hf-dir")
    iteration, states = read_rank_grid(args.load)
    model_type, config, full = full_model_state(states)
    tensors = full_to_hf(model_type, full, config)
    copied = []
    with new_output_dir(args.hf_dir, "--hf-dir") as staging:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        default_file_mode(os.path.join(staging, "model.safetensors"))  # like config.json, not 0600
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config_from(model_type, config), f, indent=2)
        for name, path in _tokenizer_sources(states[0][0].get("args", {}), model_type).items():
            shutil.copy2(path, os.path.join(staging, name))
            copied.append(name)
    kind = "GPT2LMHeadModel" if model_type == "gpt2" else "BertForPreTraining"
    print(f"exported {args.load} (iteration {iteration}) to {args.hf_dir} as {kind}"
          f"{'; tokenizer files: ' + ', '.join(copied) if copied else '; no tokenizer files known'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> this toolkit's checkpoint")
    imp.add_argument("--hf-dir", required=True, help="folder with config.json and model.safetensors")
    imp.add_argument("--save", required=True, help="new checkpoint directory")
    imp.add_argument("--target-model-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--seed", type=int, default=1234, help="for heads a BertModel lacks")
    exp = sub.add_parser("export", help="this toolkit's checkpoint -> Hugging Face folder")
    exp.add_argument("--load", required=True, help="checkpoint directory")
    exp.add_argument("--hf-dir", required=True, help="new folder for config.json and model.safetensors")
    args = parser.parse_args(argv)
    _import(args) if args.command == "import" else _export(args)


if __name__ == "__main__":
    from initialize import run_main

    run_main(main)
