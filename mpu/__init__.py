"""Model-parallel primitives: groups, communication, parallel layers, losses, RNG and clipping.

The public names follow Megatron-LM so that its users feel at home.
"""

from .cross_entropy import vocab_parallel_cross_entropy
from .data import broadcast_data
from .grads import allreduce_sequence_parallel_gradients, clip_grad_norm
from .initialize import (
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    initialize_model_parallel,
    is_rank_0,
    model_parallel_is_initialized,
)
from .layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_model_parallel_attributes,
    set_model_parallel_attributes,
)
from .mappings import (
    SEQUENCE_DIM,
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from .random import (
    RNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)
from .utils import (
    VocabUtility,
    collective_device,
    divide,
    ensure_divisibility,
    merge_partitions,
    partition_tensor,
    split_tensor_along_last_dim,
)

__all__ = [
    "SEQUENCE_DIM",
    "allreduce_sequence_parallel_gradients",
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabUtility",
    "broadcast_data",
    "checkpoint",
    "clip_grad_norm",
    "collective_device",
    "copy_model_parallel_attributes",
    "copy_to_model_parallel_region",
    "destroy_model_parallel",
    "divide",
    "ensure_divisibility",
    "gather_from_model_parallel_region",
    "gather_from_sequence_parallel_region",
    "merge_partitions",
    "partition_tensor",
    "get_cuda_rng_tracker",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_model_parallel_group",
    "get_model_parallel_rank",
    "get_model_parallel_src_rank",
    "get_model_parallel_world_size",
    "get_rng_tracker",
    "initialize_model_parallel",
    "is_rank_0",
    "model_parallel_cuda_manual_seed",
    "model_parallel_is_initialized",
    "model_parallel_manual_seed",
    "reduce_from_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "set_model_parallel_attributes",
    "split_tensor_along_last_dim",
    "vocab_parallel_cross_entropy",
]
