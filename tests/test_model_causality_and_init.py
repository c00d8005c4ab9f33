"""Contracts of the model on its default paths (issue 15, class 1).

Guards: GPT2 attention is causal when no mask is given (the path pretraining takes by default), at
model-parallel sizes 1 and 2, in eval mode, through activation checkpointing in train mode and
through the key/value cache; and the initialisation scales of the models the entry scripts build
(``pretrain_gpt2.model_provider``, ``pretrain_bert.model_provider``): residual output projections
N(0, (std / sqrt(2 L))^2) where the model scales them, every other weight N(0, std^2), LayerNorm
weight 1 and bias 0, every bias 0.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import mpu
from model import GPT2Model, TransformerConfig
from tests.distributed import run_distributed
from tests.helpers import gpt2_args

SEQ, CUT = 12, 5  # tokens after position CUT are changed; logits at positions <= CUT must not move
# The cut inside the prompt that fills the cache, or inside a chunk of several tokens after a cache.
CACHE_PIECES = {"kv-cache-prompt": [(0, 8), (8, 9), (9, SEQ)], "kv-cache-chunk": [(0, 3), (3, SEQ)]}
VARIANTS = ("eval", "checkpointed-train", *CACHE_PIECES)
CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                           max_sequence_length=16, hidden_dropout=0.0, attention_dropout=0.0)


def _token_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches equal up to position CUT and different at every later position."""
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(17))
    changed = tokens.clone()
    changed[:, CUT + 1:] = (tokens[:, CUT + 1:] + 1 + torch.arange(SEQ - CUT - 1)) % 64
    return tokens, changed


def _default_path_logits(model: GPT2Model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None).detach()  # no mask: what pretrain_gpt2 passes by default


def _cached_logits(model: GPT2Model, tokens: torch.Tensor, pieces) -> torch.Tensor:
    """The pieces fed one after another through the key/value cache: the first fills it (the prompt), the
    next ones attend to it and causally among themselves."""
    cache = model.allocate_kv_cache(tokens.shape[0])
    out = []
    for a, b in pieces:
        positions = torch.arange(a, b).unsqueeze(0).expand(tokens.shape[0], b - a)
        out.append(model(tokens[:, a:b], positions, kv_cache=cache).detach())
    return torch.cat(out, dim=1)


def _causality_worker() -> dict:
    world = torch.distributed.get_world_size()
    tokens, changed = _token_pair()
    seen = {}
    for mp in sorted({1, world}):
        mpu.initialize_model_parallel(mp)
        try:
            for variant in VARIANTS:
                config = CONFIG
                if variant == "checkpointed-train":
                    config = TransformerConfig(**{**CONFIG.__dict__, "checkpoint_activations": True})
                mpu.model_parallel_cuda_manual_seed(3)
                model = GPT2Model(config, parallel_output=False)
                model.train(variant == "checkpointed-train")
                run = _default_path_logits
                if variant in CACHE_PIECES:
                    run = functools.partial(_cached_logits, pieces=CACHE_PIECES[variant])
                with torch.set_grad_enabled(variant == "checkpointed-train"):  # checkpointing needs autograd
                    before, after = run(model, tokens), run(model, changed)
                early = (after[:, :CUT + 1] - before[:, :CUT + 1]).abs().max().item()
                late = (after[:, CUT + 1:] - before[:, CUT + 1:]).abs().amax(dim=(0, 2)).min().item()
                seen[(mp, variant)] = (early, late)
        finally:
            mpu.destroy_model_parallel()
    return seen


def test_gpt2_default_path_never_lets_a_token_see_later_tokens():
    """At model-parallel 1 and 2: changing tokens after t leaves the logits at positions <= t alone
    (and does change every later position, so the comparison is not vacuous)."""
    results = run_distributed(_causality_worker, 2)
    for rank, seen in enumerate(results):
        assert sorted(seen) == sorted((mp, v) for mp in (1, 2) for v in VARIANTS)
        for (mp, variant), (early, late) in seen.items():
            assert early <= 1e-5, f"rank {rank}, mp {mp}, {variant}: positions <= {CUT} moved by {early}"
            assert late > 1e-3, f"rank {rank}, mp {mp}, {variant}: later positions did not react ({late})"


# --- initialisation -----------------------------------------------------------------------------------

STD = 0.03  # not the 0.02 default, so a hard-coded constant shows
LAYERS = 4
RESIDUAL_OUTPUTS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def _check_init(model, std: float, scaled_outputs: bool) -> list[str]:
    """Every parameter against the documented initialisation; returns the names checked as N(0, s^2)."""
    scaled = std / math.sqrt(2 * LAYERS)
    normal = []
    for name, param in model.named_parameters():
        value = param.detach().float()
        if "layernorm" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(value, torch.full_like(value, expected)), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(value) == 0, name
        else:
            target = scaled if scaled_outputs and name.endswith(RESIDUAL_OUTPUTS) else std
            # Four standard errors of the sample's std and mean (at least 5%: 1/sqrt(L) vs 1/sqrt(2L) is 41%).
            n = value.numel()
            assert value.std().item() == pytest.approx(target, rel=max(0.05, 4 / math.sqrt(2 * n))), name
            assert abs(value.mean().item()) < 4 * target / math.sqrt(n), name
            normal.append(name)
    return normal


def test_gpt2_initialisation_scales(single_process_group, tmp_path):
    import pretrain_gpt2
    from arguments import get_args
    from restore import decide_model_config

    argv = gpt2_args(tmp_path, **{"--num-layers": LAYERS, "--hidden-size": 256, "--num-attention-heads": 4,
                                  "--seq-length": 64, "--max-position-embeddings": 64, "--init-method-std": STD})
    mpu.model_parallel_cuda_manual_seed(1)
    model = pretrain_gpt2.model_provider(decide_model_config(get_args(argv), 512))
    normal = _check_init(model, STD, scaled_outputs=True)
    # Every kind of weight was looked at: embeddings, both input projections, both residual outputs.
    for part in ("word_embeddings", "position_embeddings", "query_key_value.weight", "dense_h_to_4h.weight",
                 *RESIDUAL_OUTPUTS):
        assert sum(part in name for name in normal) >= 1, part
    assert sum(name.endswith(RESIDUAL_OUTPUTS) for name in normal) == 2 * LAYERS


@pytest.mark.parametrize("deep_init", [False, True])
def test_bert_entry_point_initialisation_scales(single_process_group, tmp_path, deep_init):
    import pretrain_bert
    from arguments import get_args
    from restore import decide_model_config

    argv = gpt2_args(tmp_path, **{"--num-layers": LAYERS, "--hidden-size": 256, "--num-attention-heads": 4,
                                  "--seq-length": 64, "--max-position-embeddings": 64, "--init-method-std": STD,
                                  "--deep-init": deep_init})
    mpu.model_parallel_cuda_manual_seed(1)
    args = get_args(argv, defaults=pretrain_bert.FLAG_DEFAULTS)
    config = decide_model_config(args, 512, model_defaults=pretrain_bert.model_defaults(args))
    model = pretrain_bert.model_provider(config)
    normal = _check_init(model, STD, scaled_outputs=deep_init)
    for part in ("tokentype_embeddings", "pooler.weight", "nsp_head.weight", "lm_head.dense.weight",
                 *RESIDUAL_OUTPUTS):
        assert sum(part in name for name in normal) >= 1, part
