"""Checkpoint conversion, one module per format; the names the tools and the runs use, re-exported.

All conversions pass through full (unpartitioned) tensors in this toolkit's names:

* ``layout``: which tensors a model splits over model-parallel ranks and how, read from the model
  itself built on the ``meta`` device; cutting, joining and re-padding full tensors by it;
* ``reshard``: a checkpoint at another model-parallel size, optimizer state included; full weights
  as a ``release`` checkpoint;
* ``huggingface``: Hugging Face ``GPT2LMHeadModel`` / ``BertForPreTraining`` folders, both ways;
* ``megatron2019``: checkpoints of the 2019 Megatron-LM code;
* ``outputs``: output folders that are new, and complete or absent.

The tools in ``tools/`` are thin command lines over these. The modules import one another one way
(``layout`` <- ``reshard`` <- ``huggingface`` <- ``megatron2019``; ``outputs`` stands alone).
"""

from errors import ConversionError

from .huggingface import (
    BERT_ARCHITECTURES,
    BERT_LAYER_NAMES,
    BERT_TOP_NAMES,
    GPT2_ARCHITECTURES,
    GPT2_TANH_GELUS,
    TOKENIZER_FILES,
    config_from_hf,
    full_to_hf,
    hf_bert_to_megatron,
    hf_config_from,
    hf_model_type,
    hf_to_full,
    import_hf,
    read_hf_config,
    read_hf_weights,
    safetensors_torch,
)
from .layout import (
    MODEL_TYPES,
    Layout,
    build_model,
    check_divisible,
    model_layout,
    model_parallel_of_one,
    model_type_of,
    padded_size,
    stage_owns,
    vocab_parallel_names,
)
from .megatron2019 import KNOWN_VOCAB_SIZES, import_megatron2019, pad_2019
from .outputs import check_new_output, new_output_dir
from .reshard import full_model_state, release_states, reshard_states, restage_states, split_stages

__all__ = [
    "BERT_ARCHITECTURES",
    "BERT_LAYER_NAMES",
    "BERT_TOP_NAMES",
    "GPT2_ARCHITECTURES",
    "GPT2_TANH_GELUS",
    "KNOWN_VOCAB_SIZES",
    "MODEL_TYPES",
    "TOKENIZER_FILES",
    "ConversionError",
    "Layout",
    "build_model",
    "check_divisible",
    "check_new_output",
    "config_from_hf",
    "full_model_state",
    "full_to_hf",
    "hf_bert_to_megatron",
    "hf_config_from",
    "hf_model_type",
    "hf_to_full",
    "import_hf",
    "import_megatron2019",
    "model_layout",
    "model_parallel_of_one",
    "model_type_of",
    "new_output_dir",
    "pad_2019",
    "padded_size",
    "read_hf_config",
    "read_hf_weights",
    "release_states",
    "reshard_states",
    "restage_states",
    "split_stages",
    "stage_owns",
    "safetensors_torch",
    "vocab_parallel_names",
]
