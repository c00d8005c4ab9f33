"""Move a checkpoint to another model-parallel size and pipeline layout.

    python tools/reshard_checkpoint.py --load checkpoints/gpt2_345m_mp2 --save checkpoints/gpt2_345m_mp4 \\
        --target-model-parallel-size 4 [--target-pipeline-model-parallel-size 2] [--no-optimizer]

Reads every ``mp_rank_XX`` file of the iteration the tracker names, reassembles each partitioned
tensor by its layer's ``partition_dim``/``partition_stride`` tags (the fused QKV's stride 3, the
vocabulary-split embedding and BERT's LM-head bias, column- and row-parallel weights), cuts it for
the new size and writes the same layout, iteration and stored config. The Adam moments and fp32
master weights follow their parameters, so training resumes at the new size with
``--model-parallel-size N --load OUT``; ``--no-optimizer`` leaves them (and the lr schedule) out.
When the new size does not split the padded vocabulary, it is padded again (zero rows that get no
probability). The model-parallel dropout streams cannot follow the heads to another size; the
resumed run seeds them afresh. The output must not exist yet (or be empty); it appears only when
complete.

A pipelined checkpoint (``mp_rank_TT_PPP`` folders) has its stages joined first (parameters and their
optimizer state by name), and the result is cut into ``--target-pipeline-model-parallel-size`` stages
(default: the checkpoint's), with ``--target-num-layers-per-virtual-pipeline-stage`` for the
interleaved schedule.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing import read_rank_grid, write_checkpoint_files  # noqa: E402
from conversion import (  # noqa: E402
    check_new_output,
    new_output_dir,
    reshard_states,
    restage_states,
    split_stages,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (holds latest_checkpointed_iteration.txt)")
    parser.add_argument("--save", required=True, help="new directory for the resharded checkpoint")
    parser.add_argument("--target-model-parallel-size", type=int, required=True)
    parser.add_argument("--target-pipeline-model-parallel-size", type=int, default=None,
                        help="pipeline stages of the result (default: the checkpoint's)")
    parser.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="layers per chunk for the interleaved schedule (default: none)")
    parser.add_argument("--no-optimizer", action="store_true", help="weights only: drop optimizer and lr schedule")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="padding rule if the vocabulary must be padded again (default: the run's, else 128)")
    args = parser.parse_args(argv)
    for flag in ("target_model_parallel_size", "target_pipeline_model_parallel_size",
                 "target_num_layers_per_virtual_pipeline_stage"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    check_new_output(args.save, "--save")
    iteration, grid = read_rank_grid(args.load)
    stages = args.target_pipeline_model_parallel_size or len(grid[0])
    per_chunk = args.target_num_layers_per_virtual_pipeline_stage
    num_layers = grid[0][0].get("config", {}).get("num_layers", 0)
    if per_chunk is not None and (stages < 2 or num_layers % (stages * per_chunk)):
        parser.error(f"--target-num-layers-per-virtual-pipeline-stage {per_chunk} needs 2 or more pipeline stages of "
                     f"a whole number of chunks ({num_layers} layers, {stages} stages)")
    virtual = 1 if per_chunk is None else num_layers // (stages * per_chunk)
    states = restage_states(grid, args.load)
    divisible_by = args.make_vocab_size_divisible_by or states[0].get("args", {}).get(
        "make_vocab_size_divisible_by", 128)
    new = reshard_states(states, args.target_model_parallel_size, keep_optimizer=not args.no_optimizer,
                         divisible_by=divisible_by, where=args.load)
    new_grid = split_stages(new, stages, virtual, where=args.load)
    with new_output_dir(args.save, "--save") as staging:
        write_checkpoint_files(staging, iteration, new_grid)
    config = new[0]["config"]
    print(f"resharded {args.load} (iteration {iteration}, model-parallel size {len(grid)}, {len(grid[0])} pipeline "
          f"stage(s)) to {args.save} at size {args.target_model_parallel_size}, {stages} stage(s)"
          f"{f' of {virtual} chunks' if virtual > 1 else ''}; vocabulary {config['vocab_size']} (padded), optimizer "
          f"{'kept' if 'optimizer' in new[0] else 'left out'}")


if __name__ == "__main__":
    from initialize import run_main

    run_main(main)
