"""How tensor, pipeline and data parallelism divide a world and a model: the checks of the sizes the
flags give, before any process group exists, each failing with one line naming the flags."""

from __future__ import annotations

from errors import ArgumentError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def check_parallel_sizes(world_size: int, mp: int, pp: int, per_chunk: int | None, ddp_impl: str,
                         num_layers: int | None, micro_batch_size: int, global_batch_size: int,
                         rampup: bool) -> None:
    """Tensor (``mp``) x pipeline (``pp``) sizes fit the world; the pipeline's layers (``num_layers``,
    ``None`` until a checkpoint says), its virtual chunks of ``per_chunk`` layers, the micro-batches
    the interleaved schedule needs and the data-parallel wrapper fit together."""
    _check(mp >= 1 and pp >= 1, f"--model-parallel-size and --pipeline-model-parallel-size must be at least 1, got "
                                f"{mp} and {pp}")
    sizes = f"--model-parallel-size {mp}" + (f" x --pipeline-model-parallel-size {pp}" if pp > 1 else "")
    _check(mp * pp <= world_size, f"{sizes} needs {mp * pp} processes (or a multiple) and this run has "
                                  f"{world_size}; launch with torchrun --nproc_per_node {mp * pp} ...")
    _check(world_size % (mp * pp) == 0, f"world size {world_size} is not divisible by {sizes}")
    _check(per_chunk is None or pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                                        "--pipeline-model-parallel-size 2 or more")
    _check(per_chunk is None or per_chunk >= 1, f"--num-layers-per-virtual-pipeline-stage must be at least 1, got "
                                                f"{per_chunk}")
    _check(pp == 1 or ddp_impl == "local", "--pipeline-model-parallel-size above 1 needs --DDP-impl local "
                                           "(torch DDP cannot follow a pipeline schedule's micro-batches)")
    if pp > 1 and num_layers is not None:
        check_pipeline_layers(num_layers, pp, per_chunk)
    if per_chunk is not None:
        step = micro_batch_size * (world_size // (mp * pp)) * pp
        _check(global_batch_size % step == 0 and not rampup,
               f"the interleaved schedule needs the micro-batches of an iteration in multiples of the pipeline size: "
               f"--global-batch-size a multiple of micro-batch x data-parallel x pipeline = {step}, and no ramp-up")


def check_pipeline_layers(num_layers: int, pp: int, per_chunk: int | None, where: str = "") -> None:
    """The layers split evenly into ``pp`` stages (of chunks of ``per_chunk`` layers); ``where`` names
    the checkpoint the layer count came from."""
    suffix = f" (the checkpoint's in {where})" if where else ""
    _check(num_layers % pp == 0, f"--num-layers {num_layers} does not split into --pipeline-model-parallel-size "
                                 f"{pp} equal stages{suffix}")
    _check(per_chunk is None or (num_layers // pp) % per_chunk == 0,
           f"--num-layers-per-virtual-pipeline-stage {per_chunk} does not divide the {num_layers // pp} layers of "
           f"each pipeline stage{suffix}")


def virtual_pipeline_size(num_layers: int, pp: int, per_chunk: int | None) -> int:
    """Chunks of layers per pipeline stage (1 without virtual stages)."""
    return 1 if per_chunk is None else num_layers // pp // per_chunk
