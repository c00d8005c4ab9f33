"""Rules about flags that argparse cannot state, each in one table beside the parser (``arguments.py``).

* ``FLOAT_RANGES``: float flags that must be finite and lie in a range.
* ``MODEL_FLAGS`` / ``NEEDS``: flags that belong to one model or need another flag's mode. Such a flag
  given to the other model (BERT's masking on GPT2, GPT2's document masks on BERT) or without its mode
  (``--strict-lambada`` without ``--cloze-eval``) used to be ignored without a word; ``misplaced_flag``
  names the first one given, and ``arguments.get_args`` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# Float flags that must be finite and lie in a range: (flag, low, high, low inclusive, high inclusive, why).
FLOAT_RANGES = (
    ("lr", 0.0, math.inf, True, False, "the peak learning rate"),
    ("min_lr", 0.0, math.inf, True, False, "the learning-rate floor"),
    ("weight_decay", 0.0, math.inf, True, False, "AdamW's decoupled weight decay"),
    ("adam_beta1", 0.0, 1.0, True, False, "Adam's first-moment decay"),
    ("adam_beta2", 0.0, 1.0, True, False, "Adam's second-moment decay"),
    ("adam_eps", 0.0, math.inf, False, False, "Adam's denominator term"),
    ("clip_grad", 0.0, math.inf, True, False, "the gradient-norm clip (0 disables it)"),
    ("hidden_dropout", 0.0, 1.0, True, False, "a dropout probability"),
    ("attention_dropout", 0.0, 1.0, True, False, "a dropout probability"),
    ("init_method_std", 0.0, math.inf, False, False, "the initialisation's standard deviation"),
    ("layernorm_epsilon", 0.0, math.inf, False, False, "LayerNorm's epsilon"),
    ("loss_scale", 0.0, math.inf, False, False, "a static loss scale"),
    ("initial_loss_scale", 0.0, math.inf, False, False, "the dynamic loss scale's start"),
)

# Flag destination -> the one model whose entry scripts read it.
MODEL_FLAGS = {
    "max_preds_per_seq": "bert",  # masked-LM samples
    "eval_max_preds_per_seq": "bert",
    "presplit_sentences": "bert",  # sentence pairs
    "use_tfrecords": "bert",  # Google BERT's pretraining records
    "fp32_tokentypes": "bert",  # token-type embeddings
    "reset_position_ids": "gpt2",  # document boundaries inside a sample
    "reset_attention_mask": "gpt2",
    "eod_mask_loss": "gpt2",
    "use_npy_data_loader": "gpt2",  # openwebtext/make_gpt2_dataset.py's shards
}
MODEL_SCRIPTS = {"gpt2": "pretrain_gpt2.py, generate_samples.py and evaluate_gpt2.py", "bert": "pretrain_bert.py"}
# Flag destination -> the flag (a mode) without which it does nothing.
NEEDS = {"strict_lambada": "cloze_eval"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def misplaced_flag(given: Callable[[str], bool], model: str | None) -> str | None:
    """The line refusing the first flag ``given`` (a destination -> whether the user set it) that ``model``
    (``gpt2``, ``bert``; ``None``: any) would ignore, or ``None``."""
    for dest, owner in MODEL_FLAGS.items():
        if model is not None and owner != model and given(dest):
            return (f"{_flag(dest)} is a {owner.upper()} flag that {MODEL_SCRIPTS[model]} would ignore; drop it "
                    f"(or run {MODEL_SCRIPTS[owner].split(',')[0]})")
    for dest, mode in NEEDS.items():
        if given(dest) and not given(mode):
            return f"{_flag(dest)} only applies with {_flag(mode)}; add {_flag(mode)} or drop it"
    return None
