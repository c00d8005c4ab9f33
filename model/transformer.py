"""A tensor-model-parallel transformer built from ``mpu`` layers.

Shapes use ``b`` batch, ``s`` sequence, ``h`` hidden, ``p`` model-parallel size, ``n`` heads and
``d = h / n`` the head size. Activations between layers are replicated on every model-parallel
rank; inside attention and the MLP each rank holds ``n / p`` heads and ``4h / p`` MLP columns.

With ``config.sequence_parallel`` the activations between the parallel matrix multiplies (the
residual stream, LayerNorms, the hidden dropouts) are split along the sequence instead of
replicated: each rank holds ``(b, s/p, h)``. The first linear layer of attention and of the MLP
all-gathers the sequence, the last one reduce-scatters it, so attention still sees the whole
sequence; the models scatter their embeddings and gather the stack's output before their heads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mpu

InitMethod = Callable[[torch.Tensor], torch.Tensor]

# The config fields that fix a model's tensors and what they mean: a checkpoint fits a model only
# when these agree.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length",
                "intermediate_size", "num_tokentypes", "post_layernorm", "unpadded_vocab_size")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and regularisation of a transformer stack (plain types, stored in checkpoints)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Width of the residual stream."""
    num_attention_heads: int
    """Attention heads; must divide by the model-parallel size."""
    vocab_size: int
    """Padded vocabulary size (divisible by the model-parallel size)."""
    max_sequence_length: int
    """Number of learned position embeddings."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    scaled_init: bool = True
    """Scale residual output projections by ``1/sqrt(2 * num_layers)`` (GPT2; BERT's ``--deep-init``)."""
    checkpoint_activations: bool = False
    """Recompute layers in backward instead of keeping their activations."""
    checkpoint_num_layers: int = 1
    """Layers per checkpointed chunk."""
    intermediate_size: int | None = None
    """Width of the MLP's hidden layer; ``None`` means ``4 * hidden_size``."""
    post_layernorm: bool = False
    """LayerNorm after each residual sum (BERT: ``x = LN(x + F(x))``) instead of before each branch
    (GPT2: ``x = x + F(LN(x))``, plus a final LayerNorm after the stack)."""
    exact_gelu: bool = False
    """GELU through ``erf`` (BERT) instead of its tanh approximation (GPT2)."""
    causal_attention: bool = True
    """Without an explicit mask, each token sees only itself and earlier ones (GPT2); ``False``
    lets every token see every other one (BERT, whose padding comes as an explicit mask)."""
    num_tokentypes: int = 0
    """Token-type (segment) embeddings: 0 for none (GPT2), 2 for BERT's sentence A / B."""
    unpadded_vocab_size: int | None = None
    """The tokenizer's real vocabulary; the padded entries above it get no probability (their logits
    are the dtype's minimum). ``None`` (checkpoints from before) leaves every entry a candidate."""
    sequence_parallel: bool = False
    """Split the activations outside the model-parallel matrix multiplies (LayerNorm, dropout, the
    residual stream) along the sequence over the model-parallel group (``--sequence-parallel``)."""

    @property
    def ffn_hidden_size(self) -> int:
        """The MLP's hidden width."""
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def gelu_approximation(self) -> str:
        """The ``approximate`` argument of ``F.gelu`` for this model."""
        return "none" if self.exact_gelu else "tanh"


def init_seed(base: int, part: int) -> int:
    """The seed a model part is initialised from: derived from ``base`` (the seed the run set) and the
    part's number, so every part draws the same weights whichever pipeline stage builds it and whatever
    was built before it."""
    return (base * 1_000_003 + 7_919 * (part + 1)) % (2**63 - 1)


# Part numbers for ``seeded_init``: the embeddings and heads; transformer layer ``i`` is ``LAYER_PARTS + i``.
WORD_EMBEDDINGS, POSITION_EMBEDDINGS, TOKENTYPE_EMBEDDINGS, HEADS, LAYER_PARTS = 0, 1, 2, 10, 100


@contextlib.contextmanager
def seeded_init(base: int, part: int):
    """Draw the weights built inside from the CPU stream seeded ``init_seed(base, part)``; the stream
    outside is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(base, part))
        yield


def init_method_normal(std: float) -> InitMethod:
    """``N(0, std^2)`` initialisation."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method(std: float, num_layers: int) -> InitMethod:
    """``N(0, (std / sqrt(2 * num_layers))^2)``: keeps the residual stream's variance flat with depth."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def output_init_method(config: TransformerConfig) -> InitMethod:
    if config.scaled_init:
        return scaled_init_method(config.init_method_std, config.num_layers)
    return init_method_normal(config.init_method_std)


def mask_padded_vocab(logits_parallel: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Give the padded vocabulary entries of this rank's slice ``(..., V/p)`` the dtype's minimum, in place.

    Padding exists only so that the vocabulary splits evenly; a softmax over it must not hand
    probability to entries that are no token (an imported model's logits are often far below 0,
    where a padded entry's would sit). Only the columns past ``unpadded_vocab_size`` are written.
    """
    real = config.unpadded_vocab_size
    if real is None or real >= config.vocab_size:
        return logits_parallel
    width = logits_parallel.shape[-1]
    first_padded = max(0, real - mpu.get_model_parallel_rank() * width)
    if first_padded < width:
        logits_parallel[..., first_padded:] = torch.finfo(logits_parallel.dtype).min
    return logits_parallel


def current_chunk(chunks: list[tuple[int, int]]) -> tuple[int, int]:
    """The layers ``[start, end)`` a stage runs now: its chunk the schedule chose (virtual stages)."""
    return chunks[mpu.get_virtual_pipeline_model_parallel_rank()] if len(chunks) > 1 else chunks[0]


def stage_input(model: nn.Module) -> torch.Tensor:
    """The input the pipeline schedule set on a stage that does not start the model."""
    if model.input_tensor is None:
        raise RuntimeError("a pipeline stage after the first ran without its input: the schedule passes the "
                           "previous stage's output through set_input_tensor")
    return model.input_tensor


def tag_tied_embeddings(weight: torch.Tensor, first_stage: bool) -> None:
    """Tag the word embeddings under pipeline parallelism: ``pipeline_tied`` on the first and last stage
    (their gradients are summed over both), ``pipeline_tied_copy`` on the last stage's copy (left out
    of the gradient norm, which the first stage's counts)."""
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        weight.pipeline_tied = True
        if not first_stage:
            weight.pipeline_tied_copy = True


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in its parameters' precision, returned in the input's.

    Under ``--fp16 --fp32-layernorm`` its parameters stay fp32 while the activations are fp16.
    ``sequence_parallel``: it normalises this rank's slice of the sequence only, so its replicated
    weight and bias get only that slice's gradient; they are tagged for
    ``mpu.allreduce_sequence_parallel_gradients`` to sum the slices.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, sequence_parallel: bool = False) -> None:
        super().__init__(normalized_shape, eps=eps)
        self.weight.sequence_parallel = sequence_parallel
        self.bias.sequence_parallel = sequence_parallel

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = F.layer_norm(input_.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)
        return output.to(input_.dtype)


class Dropout(nn.Dropout):
    """Dropout that, with ``sequence_parallel``, draws from the model-parallel random stream.

    Replicated activations must get the same mask on every model-parallel rank (the default stream,
    seeded alike everywhere); a slice of the sequence must get its own mask on each rank, or positions
    ``r * s/p + i`` of every rank would share one, and the run would differ from a model-parallel
    size of one in more than the masks. ``mpu.checkpoint`` replays the tracked stream, so
    recomputation draws the same masks.
    """

    def __init__(self, p: float, sequence_parallel: bool = False) -> None:
        super().__init__(p)
        self.sequence_parallel = sequence_parallel

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input_  # what nn.Dropout returns then, without its calls (one a layer per decoded token)
        if self.sequence_parallel:
            with mpu.get_cuda_rng_tracker().fork():
                return super().forward(input_)
        return super().forward(input_)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    Buffers are ``(b, n/p, max_length, d)`` per layer, allocated once; ``length`` tokens are filled.
    A forward pass with a cache attends its new tokens to the cached ones plus themselves, writes
    their keys and values after the cached ones, and ``GPT2Model`` advances ``length`` once every
    layer has run. Build one with ``GPT2Model.allocate_kv_cache``.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, heads_per_partition: int,
                 head_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch_size, heads_per_partition, max_length, head_size)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_length, self.length = batch_size, max_length, 0

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``(b, n/p, s, d)`` after the cached ones; return all of them so far."""
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {end} were asked for")
        if key.shape[0] != self.batch_size:
            raise ValueError(f"the KV cache was allocated for batch {self.batch_size}, got {key.shape[0]}")
        self.keys[layer][:, :, self.length:end] = key
        self.values[layer][:, :, self.length:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (in that order), e.g. to drop finished sequences."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.batch_size = len(index)


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention with heads split over the model-parallel group.

    ``[Q_r; K_r; V_r] = X W_r`` (fused, column-parallel with stride 3, so rank ``r`` owns heads
    ``r*n/p ... (r+1)*n/p - 1`` of each), attention per head, then ``Y = sum_r ctx_r O_r``
    (row-parallel).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        world_size = mpu.get_model_parallel_world_size()
        self.heads_per_partition = mpu.divide(config.num_attention_heads, world_size)
        self.head_size = mpu.divide(config.hidden_size, config.num_attention_heads)
        self.hidden_per_partition = mpu.divide(config.hidden_size, world_size)
        self.attention_dropout = config.attention_dropout
        self.causal = config.causal_attention
        self.sequence_parallel = config.sequence_parallel
        self.query_key_value = mpu.ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, gather_output=False, stride=3,
            init_method=init_method_normal(config.init_method_std), sequence_parallel=config.sequence_parallel,
        )
        self.dense = mpu.RowParallelLinear(
            config.hidden_size, config.hidden_size, input_is_parallel=True,
            init_method=output_init_method(config), sequence_parallel=config.sequence_parallel,
        )
        self.output_dropout = Dropout(config.hidden_dropout, config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, layer_number: int = 0) -> torch.Tensor:
        if kv_cache is not None and self.sequence_parallel:
            raise ValueError("decoding with a KV cache is not sequence-parallel: build the model with "
                             "sequence_parallel=False")
        mixed = self.query_key_value(hidden_states)  # (b, s, 3h/p): the whole sequence, also under SP
        b, s, _ = mixed.shape
        # [Q_r, K_r, V_r] along the last dimension, each (b, n/p, s, d) after the permute
        q, k, v = mixed.view(b, s, 3, self.heads_per_partition, self.head_size).permute(2, 0, 3, 1, 4)
        is_causal = self.causal and attention_mask is None
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(layer_number, k, v)  # (b, n/p, past + s, d)
            if is_causal and past and s > 1:  # new token i sees the cache and new tokens 0..i
                attention_mask = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(past)
            is_causal = is_causal and not past  # one new token after a cache sees everything
        # The fused attention kernel wants unit-stride heads; mpu.linear's small-batch form strides them.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        dropout_p = self.attention_dropout if self.training else 0.0
        # Each rank owns different heads, so their dropout masks must differ: model-parallel stream.
        # Without dropout nothing is drawn, and decoding skips the fork's state swaps.
        with mpu.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=is_causal,
            )
        context = context.transpose(1, 2).reshape(b, s, self.hidden_per_partition)  # (b, s, h/p)
        return self.output_dropout(self.dense(context))


class ParallelMLP(nn.Module):
    """``Y = GeLU(X A) B``: ``A`` (h -> f) column-parallel, ``B`` (f -> h) row-parallel, ``f = 4h`` by default."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.approximate = config.gelu_approximation
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, gather_output=False,
            init_method=init_method_normal(config.init_method_std), sequence_parallel=config.sequence_parallel,
        )
        self.dense_4h_to_h = mpu.RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True,
            init_method=output_init_method(config), sequence_parallel=config.sequence_parallel,
        )
        self.dropout = Dropout(config.hidden_dropout, config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate = F.gelu(self.dense_h_to_4h(hidden_states), approximate=self.approximate)  # (b, s, f/p)
        return self.dropout(self.dense_4h_to_h(intermediate))


class ParallelTransformerLayer(nn.Module):
    """One layer, pre-LayerNorm (GPT2): ``x += Attn(LN1(x)); x += MLP(LN2(x))``, or post-LayerNorm
    (BERT, ``config.post_layernorm``): ``x = LN1(x + Attn(x)); x = LN2(x + MLP(x))``.

    ``LN1`` is ``input_layernorm`` in the pre form and the attention output's norm in the post form;
    the parameters are the same two LayerNorms either way.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.post_layernorm = config.post_layernorm
        self.input_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.sequence_parallel)
        self.attention = ParallelSelfAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon,
                                                  config.sequence_parallel)
        self.mlp = ParallelMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, layer_number: int = 0) -> torch.Tensor:
        if self.post_layernorm:
            attention = self.attention(hidden_states, attention_mask, kv_cache, layer_number)
            hidden_states = self.input_layernorm(hidden_states + attention)
            return self.post_attention_layernorm(hidden_states + self.mlp(hidden_states))
        attention = self.attention(self.input_layernorm(hidden_states), attention_mask, kv_cache, layer_number)
        hidden_states = hidden_states + attention
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LayerStack(nn.ModuleDict):
    """Transformer layers named by their number in the whole model (``layers.5`` is layer 5 on whichever
    pipeline stage holds it, so a stage's parameter names are the whole model's), iterated and indexed
    by position like a list."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index):
        if isinstance(index, str):
            return super().__getitem__(index)
        return list(self.values())[index]

    @property
    def numbers(self) -> list[int]:
        return [int(key) for key in self.keys()]


class ParallelTransformer(nn.Module):
    """A stack of layers, optionally checkpointed in chunks of layers.

    Pre-LayerNorm stacks end with a final LayerNorm; post-LayerNorm ones (BERT) end normalised already.
    A pipeline stage holds only the layers numbered ``layer_numbers`` (default: all), and the final
    LayerNorm only with the last layer. Layer ``i`` is initialised from its own seed
    (``seeded_init(init_base, LAYER_PARTS + i)``, ``init_base`` defaulting to the seed the process set),
    so a stage's layers equal the whole model's.
    """

    def __init__(self, config: TransformerConfig, layer_numbers: list[int] | None = None,
                 init_base: int | None = None) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.checkpoint_activations = config.checkpoint_activations
        self.checkpoint_num_layers = config.checkpoint_num_layers
        base = torch.initial_seed() if init_base is None else init_base
        numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.layers = LayerStack()
        for number in numbers:
            with seeded_init(base, LAYER_PARTS + number):
                self.layers[str(number)] = ParallelTransformerLayer(config)
        has_last = config.num_layers - 1 in numbers or config.num_layers == 0
        self.final_layernorm = (None if config.post_layernorm or not has_last else
                                LayerNorm(config.hidden_size, config.layernorm_epsilon, config.sequence_parallel))

    @staticmethod
    def _chunk(layers: list[nn.Module]) -> Callable[..., torch.Tensor]:
        def run(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
            for layer in layers:
                hidden_states = layer(hidden_states, attention_mask)
            return hidden_states

        return run

    @property
    def dtype(self) -> torch.dtype:
        """The precision the layers compute in (embeddings may differ under ``--fp32-embedding``)."""
        return self.layers[0].attention.query_key_value.weight.dtype if self.layers else torch.get_default_dtype()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """Run the held layers numbered in ``[start, end)`` of ``layers`` (default: all held), then the
        final LayerNorm if the last of the model's layers was among them."""
        hidden_states = hidden_states.to(self.dtype)
        start, end = layers or (0, self.num_layers)
        # (position among the held layers, which is the KV cache's index, and the layer) of the ones to run
        run = [(p, layer) for p, (key, layer) in enumerate(self.layers.items()) if start <= int(key) < end]
        if kv_cache is not None:
            for position, layer in run:
                hidden_states = layer(hidden_states, attention_mask, kv_cache, position)
            kv_cache.advance(hidden_states.shape[1])
        elif self.checkpoint_activations and self.training and torch.is_grad_enabled():
            for first in range(0, len(run), self.checkpoint_num_layers):
                chunk = [layer for _, layer in run[first:first + self.checkpoint_num_layers]]
                hidden_states = mpu.checkpoint(self._chunk(chunk), hidden_states, attention_mask)
        else:
            hidden_states = self._chunk([layer for _, layer in run])(hidden_states, attention_mask)
        if self.final_layernorm is None or end < self.num_layers:
            return hidden_states
        return self.final_layernorm(hidden_states)
