"""BERT: word + position + token-type embeddings, a post-LN parallel transformer, pooler, MLM and NSP heads.

Parameter names map one to one onto Hugging Face ``BertForPreTraining``, the fused query/key/value
weight being the only tensor built from three of theirs; the name tables and the conversion live in
``conversion.huggingface``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mpu

from .transformer import (
    HEADS,
    POSITION_EMBEDDINGS,
    TOKENTYPE_EMBEDDINGS,
    WORD_EMBEDDINGS,
    Dropout,
    LayerNorm,
    ParallelTransformer,
    TransformerConfig,
    current_chunk,
    init_method_normal,
    mask_padded_vocab,
    seeded_init,
    stage_input,
    tag_tied_embeddings,
)

# BERT's departures from ``TransformerConfig``'s (GPT2's) defaults: post-LN, exact GELU, bidirectional,
# two token types, LayerNorm epsilon 1e-12 and no depth-scaled initialisation (``--deep-init`` turns it on).
BERT_DEFAULTS = dict(post_layernorm=True, exact_gelu=True, causal_attention=False, num_tokentypes=2,
                     layernorm_epsilon=1e-12, scaled_init=False)


def bert_config(**kwargs) -> TransformerConfig:
    """A ``TransformerConfig`` with ``BERT_DEFAULTS`` under ``kwargs``."""
    return TransformerConfig(**{**BERT_DEFAULTS, **kwargs})


def _linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    """A replicated ``nn.Linear`` with weight ``N(0, std^2)`` and a zero bias."""
    layer = nn.Linear(in_features, out_features)
    init_method_normal(std)(layer.weight.data)
    nn.init.zeros_(layer.bias)
    return layer


class BertEmbeddings(nn.Module):
    """``E = Dropout(LN(W[ids] + P[positions] + T[types]))``, the word table ``W`` split over the vocabulary.

    With ``config.sequence_parallel`` the sum is scattered along the sequence before the LayerNorm, which
    (with the dropout) then runs on this rank's slice: ``E`` is ``(b, s/p, h)``.

    ``word_only``: just the word table, the last pipeline stage's copy for its tied LM head.
    """

    def __init__(self, config: TransformerConfig, init_base: int | None = None, word_only: bool = False) -> None:
        super().__init__()
        base = torch.initial_seed() if init_base is None else init_base
        init_method = init_method_normal(config.init_method_std)
        with seeded_init(base, WORD_EMBEDDINGS):
            self.word_embeddings = mpu.VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                              init_method=init_method)
        if word_only:
            return
        with seeded_init(base, POSITION_EMBEDDINGS):
            self.position_embeddings = nn.Embedding(config.max_sequence_length, config.hidden_size)
            init_method(self.position_embeddings.weight.data)
        with seeded_init(base, TOKENTYPE_EMBEDDINGS):
            self.tokentype_embeddings = nn.Embedding(config.num_tokentypes, config.hidden_size)
            init_method(self.tokentype_embeddings.weight.data)
        self.sequence_parallel = config.sequence_parallel
        self.layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.sequence_parallel)
        self.dropout = Dropout(config.hidden_dropout, config.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, tokentype_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, s)
        words = self.word_embeddings(input_ids)  # (b, s, h)
        # Under --fp32-tokentypes the token-type table is fp32 while the others may be half.
        embeddings = words + self.position_embeddings(position_ids).to(words.dtype)
        embeddings = (embeddings.float() + self.tokentype_embeddings(tokentype_ids).float()).to(words.dtype)
        if self.sequence_parallel:
            embeddings = mpu.scatter_to_sequence_parallel_region(embeddings)  # (b, s/p, h)
        return self.dropout(self.layernorm(embeddings))


class BertLMHead(nn.Module):
    """Masked-LM head: ``logits_r = LN(GeLU(H D)) W_r^T + b_r``, ``W_r`` this rank's slice of the word
    embedding (tied) and ``b_r`` the matching slice of a per-token bias."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.approximate = config.gelu_approximation
        self.dense = _linear(config.hidden_size, config.hidden_size, config.init_method_std)
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        per_partition = mpu.divide(config.vocab_size, mpu.get_model_parallel_world_size())
        self.bias = nn.Parameter(torch.zeros(per_partition))
        mpu.set_model_parallel_attributes(self.bias, True, partition_dim=0, stride=1)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = self.layernorm(F.gelu(self.dense(hidden), approximate=self.approximate))
        hidden_parallel = mpu.copy_to_model_parallel_region(hidden.to(word_embeddings.dtype))
        logits = F.linear(hidden_parallel, word_embeddings) + self.bias.to(word_embeddings.dtype)  # (..., V/p)
        return mask_padded_vocab(logits, self.config)


class BertModel(nn.Module):
    """BERT for pretraining.

    ``forward(input_ids (b, s), tokentype_ids (b, s), attention_mask (b, s), lm_positions=None)``
    returns ``(lm_logits, nsp_logits)``: ``lm_logits`` split over the vocabulary, ``(b, s, V/p)``, or
    ``(m, V/p)`` for the ``m`` positions where the boolean ``lm_positions (b, s)`` is true (the
    masked tokens: the head then runs on those alone), and ``nsp_logits (b, 2)`` from the pooled
    first token. ``attention_mask`` is 1 (or true) for real tokens and 0 for padding, which no token
    attends to. ``parallel_output=False`` gathers the vocabulary.

    With ``config.sequence_parallel`` the embeddings and the stack run on this rank's slice of the
    sequence; the stack's output is all-gathered before the heads, since the pooler needs token 0 and
    the LM head the predicted positions wherever they are. Every rank then computes the same pooler
    and NSP head, and the LM head's input gradient is all-reduced already, so the gather's backward
    keeps this rank's slice.

    Under pipeline parallelism the model is one stage's, as ``GPT2Model`` describes: the embeddings on
    the first stage, the pooler and both heads on the last (with its copy of the word table), and a
    stage that does not end the model returns its hidden states.
    """

    def __init__(self, config: TransformerConfig, parallel_output: bool = True) -> None:
        super().__init__()
        if config.num_tokentypes < 1:
            raise ValueError("BertModel needs num_tokentypes >= 1 (BERT uses 2)")
        self.config = config
        self.parallel_output = parallel_output
        self.chunks = mpu.pipeline_layer_chunks(config.num_layers)
        self.pre_process = self.chunks[0][0] == 0
        self.post_process = self.chunks[-1][1] == config.num_layers
        self.input_tensor: torch.Tensor | None = None
        base = torch.initial_seed()
        if self.pre_process or self.post_process:
            self.embeddings = BertEmbeddings(config, base, word_only=not self.pre_process)
            tag_tied_embeddings(self.embeddings.word_embeddings.weight, self.pre_process)
        layers = [n for start, end in self.chunks for n in range(start, end)]
        self.transformer = ParallelTransformer(config, layers, init_base=base)
        if self.post_process:
            with seeded_init(base, HEADS):
                self.pooler = _linear(config.hidden_size, config.hidden_size, config.init_method_std)
                self.lm_head = BertLMHead(config)
                self.nsp_head = _linear(config.hidden_size, 2, config.init_method_std)

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """The previous stage's output, this stage's input on its next forward (pipeline parallelism)."""
        self.input_tensor = tensor

    def forward(self, input_ids: torch.Tensor, tokentype_ids: torch.Tensor, attention_mask: torch.Tensor,
                lm_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = attention_mask.bool()
        # Keys that may be attended to: (b, 1, 1, s); None when nothing is padding (a faster kernel).
        mask = None if bool(keep.all()) else keep[:, None, None, :]
        start, end = current_chunk(self.chunks)
        hidden = self.embeddings(input_ids, tokentype_ids) if start == 0 else stage_input(self)
        hidden = self.transformer(hidden, mask, layers=(start, end))  # (b, s, h), SP: (b, s/p, h)
        if end < self.config.num_layers:
            return hidden  # to the next pipeline stage
        if self.config.sequence_parallel:
            hidden = mpu.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (b, h)
        nsp_logits = self.nsp_head(pooled)  # (b, 2)
        lm_hidden = hidden if lm_positions is None else hidden[lm_positions.bool()]
        lm_logits = self.lm_head(lm_hidden, self.embeddings.word_embeddings.weight)
        if not self.parallel_output:
            lm_logits = mpu.gather_from_model_parallel_region(lm_logits)
        return lm_logits, nsp_logits

