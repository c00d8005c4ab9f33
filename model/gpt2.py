"""GPT2: learned positions, a pre-LN parallel transformer and a tied vocabulary-parallel output."""

from __future__ import annotations

import torch
from torch import nn

import mpu

from .transformer import (
    POSITION_EMBEDDINGS,
    WORD_EMBEDDINGS,
    Dropout,
    KVCache,
    ParallelTransformer,
    TransformerConfig,
    current_chunk,
    init_method_normal,
    mask_padded_vocab,
    seeded_init,
    stage_input,
    tag_tied_embeddings,
)


class GPT2Model(nn.Module):
    """GPT2 language model.

    ``forward(input_ids (b, s), position_ids (b, s), attention_mask)`` returns logits
    ``(b, s, V/p)`` split over the vocabulary (``parallel_output=True``, the form
    ``mpu.vocab_parallel_cross_entropy`` takes) or gathered ``(b, s, V)``. ``attention_mask`` is
    ``None`` for plain causal attention, or a boolean ``(b, 1, s, s)`` where ``True`` may attend.

    With ``kv_cache`` (from ``allocate_kv_cache``) the call feeds only new tokens: they attend to
    the cached ones and causally among themselves, their keys and values join the cache, and the
    logits of the new positions come back. ``position_ids`` are then their absolute positions, and
    an explicit ``attention_mask`` is ``(b, 1, s_new, cached + s_new)`` (e.g. to hide left padding).

    With ``config.sequence_parallel`` the embeddings (computed for the whole sequence) are scattered
    along the sequence before their dropout; the stack and its final LayerNorm run on this rank's
    slice, which is all-gathered before the logits. The gather's backward reduce-scatters: each rank's
    gradient there is only its vocabulary slice's part (the job ``copy_to_model_parallel_region``'s
    all-reduce does otherwise). Decoding with a KV cache is not sequence-parallel.

    Under pipeline parallelism the model is one stage's: the layers of ``mpu.pipeline_layer_chunks``
    (several chunks with virtual stages), the embeddings on the first stage, the final LayerNorm and
    the output layer on the last, which holds its own copy of the word embeddings (initialised equal,
    kept equal by ``mpu.allreduce_tied_embedding_gradients``). A stage that does not start the model
    reads its input from ``set_input_tensor``; one that does not end it returns its hidden states
    ``(b, s, h)``. Parameter names are the whole model's, so stages' state dicts join into it.
    """

    def __init__(self, config: TransformerConfig, parallel_output: bool = True) -> None:
        super().__init__()
        self.config = config
        self.parallel_output = parallel_output
        self.chunks = mpu.pipeline_layer_chunks(config.num_layers)
        self.pre_process = self.chunks[0][0] == 0
        self.post_process = self.chunks[-1][1] == config.num_layers
        self.input_tensor: torch.Tensor | None = None
        base = torch.initial_seed()
        init_method = init_method_normal(config.init_method_std)
        if self.pre_process or self.post_process:
            with seeded_init(base, WORD_EMBEDDINGS):
                self.word_embeddings = mpu.VocabParallelEmbedding(
                    config.vocab_size, config.hidden_size, init_method=init_method
                )
            tag_tied_embeddings(self.word_embeddings.weight, self.pre_process)
        if self.pre_process:
            with seeded_init(base, POSITION_EMBEDDINGS):
                self.position_embeddings = nn.Embedding(config.max_sequence_length, config.hidden_size)
                init_method(self.position_embeddings.weight.data)
            self.embedding_dropout = Dropout(config.hidden_dropout, config.sequence_parallel)
        layers = [n for start, end in self.chunks for n in range(start, end)]
        self.transformer = ParallelTransformer(config, layers, init_base=base)
        self._decoding_weight: tuple[torch.Tensor, int, torch.Tensor] | None = None  # decoding_output_weight's

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """The previous stage's output, this stage's input on its next forward (pipeline parallelism)."""
        self.input_tensor = tensor

    def allocate_kv_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to ``max_length`` tokens
        (default: the position embeddings' length), in the attention layers' dtype and device."""
        attention = self.transformer.layers[0].attention
        weight = attention.query_key_value.weight
        return KVCache(len(self.transformer.layers), batch_size, max_length or self.config.max_sequence_length,
                       attention.heads_per_partition, attention.head_size, weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        sequence_parallel = self.config.sequence_parallel
        if sequence_parallel and kv_cache is not None:
            raise ValueError("decoding with a KV cache is not sequence-parallel: build the model with "
                             "sequence_parallel=False")
        start, end = current_chunk(self.chunks)
        if start == 0:
            embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (b, s, h)
            if sequence_parallel:
                embeddings = mpu.scatter_to_sequence_parallel_region(embeddings)  # (b, s/p, h)
            hidden = self.embedding_dropout(embeddings)
        else:
            hidden = stage_input(self)
        hidden = self.transformer(hidden, attention_mask, kv_cache, (start, end))
        if end < self.config.num_layers:
            return hidden  # to the next pipeline stage
        return self._logits(hidden, decoding=kv_cache is not None)

    def _logits(self, hidden: torch.Tensor, decoding: bool) -> torch.Tensor:
        """Output layer tied to the input embedding: ``logits_r = H E_r^T`` for this rank's vocabulary
        (b, s, V/p), the padded entries masked; gathered (b, s, V) unless ``parallel_output``."""
        weight = self.word_embeddings.weight
        if self.config.sequence_parallel:
            hidden_parallel = mpu.gather_from_sequence_parallel_region(hidden.to(weight.dtype), True)  # (b, s, h)
        else:
            hidden_parallel = mpu.copy_to_model_parallel_region(hidden.to(weight.dtype))
        one_row = hidden_parallel.numel() == hidden_parallel.shape[-1]  # batch 1, one new token
        transposed = self.decoding_output_weight() if decoding and one_row and not torch.is_grad_enabled() else None
        if transposed is None:
            logits_parallel = mpu.linear(hidden_parallel, weight)
        else:
            logits_parallel = torch.matmul(hidden_parallel, transposed)
        logits_parallel = mask_padded_vocab(logits_parallel, self.config)
        if self.parallel_output:
            return logits_parallel
        return mpu.gather_from_model_parallel_region(logits_parallel)

    def decoding_output_weight(self) -> torch.Tensor | None:
        """``E_r^T`` (h, V/p), contiguous: the output layer's weight in the layout a CPU reads fastest
        when decoding one sequence multiplies a single row ``(1, 1, h)`` by it (GPT-2 small's, measured:
        6.2 ms instead of 8.8 ms for ``F.linear``'s ``(V/p, h)``; for more rows ``mpu.linear`` is
        faster). ``None`` off the CPU, or for an inference-mode weight.

        Kept beside the model between decoding calls and made again whenever the weight changed: other
        storage (``.data =``, ``load_state_dict(assign=True)``), dtype or shape, or a higher in-place
        version (an optimizer step, ``load_state_dict``). The copy holds on to the storage it was made
        from, so no new weight can take that address meanwhile; ``train()`` and ``.to()`` drop it.
        Writes the version counter cannot see (through ``weight.data`` or a collective) are not noticed.
        Only cached decoding without autograd uses it, so gradients still reach ``E``.
        """
        weight = self.word_embeddings.weight
        if weight.device.type != "cpu" or weight.is_inference():
            self._decoding_weight = None
            return None
        held = self._decoding_weight
        if held is None or not _same_tensor(held[0], held[1], weight):
            self._decoding_weight = None  # the old copy goes before the new one is made
            self._decoding_weight = (weight.detach(), weight._version, weight.detach().t().contiguous())
        return self._decoding_weight[2]

    def train(self, mode: bool = True) -> GPT2Model:
        self._decoding_weight = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._decoding_weight = None  # .to(), .half(), ...: the weight is replaced
        return super()._apply(fn, recurse)


def _same_tensor(source: torch.Tensor, version: int, weight: torch.Tensor) -> bool:
    """Whether ``weight`` still holds ``source``'s values: same storage, dtype and shape, no in-place write since."""
    return (weight.data_ptr() == source.data_ptr() and weight._version == version and weight.dtype == source.dtype
            and weight.shape == source.shape)


def get_masks_and_position_ids(
    tokens: torch.Tensor, eod_token: int, reset_position_ids: bool, reset_attention_mask: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention mask and position ids for a batch of token windows ``(b, s)``.

    By default attention is plainly causal (mask ``None``) and positions run ``0..s-1``. With
    ``reset_position_ids`` positions restart after each end-of-document token; with
    ``reset_attention_mask`` tokens do not attend across an end-of-document token (a boolean
    ``(b, 1, s, s)`` mask, ``True`` where attention is allowed).
    """
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s).clone()
    if not (reset_position_ids or reset_attention_mask):
        return None, position_ids
    # Document index of each token: the number of eod tokens strictly before it.
    is_eod = (tokens == eod_token).long()
    doc_index = torch.cumsum(is_eod, dim=1) - is_eod  # (b, s)
    attention_mask = None
    if reset_attention_mask:
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        same_doc = doc_index.unsqueeze(2) == doc_index.unsqueeze(1)  # (b, s, s)
        attention_mask = (causal & same_doc).unsqueeze(1)
    if reset_position_ids:
        # Position of the first token of each token's document, subtracted from its index.
        eod_after = torch.zeros_like(position_ids)
        eod_after[:, 1:] = (tokens[:, :-1] == eod_token).long() * position_ids[:, 1:]
        starts = torch.cummax(eod_after, dim=1).values
        position_ids = position_ids - starts
    return attention_mask, position_ids


def gpt2_forward_step(eod: int, device: torch.device, reset_position_ids: bool = False,
                      reset_attention_mask: bool = False, eod_mask_loss: bool = False):
    """The forward step of GPT2 language modelling, as ``training.pretrain`` and evaluation call it.

    ``forward_step(batch, model) -> (loss, {"lm_loss": loss})``: ``batch["text"]`` holds token windows
    ``(b, s + 1)`` on the first rank of each model-parallel group (``None`` elsewhere; it is broadcast
    to the group). Tokens are ``text[:, :-1]``, labels ``text[:, 1:]``; the loss is the mean
    vocab-parallel cross entropy over the labels, leaving out end-of-document inputs with
    ``eod_mask_loss``. The masks and positions follow ``get_masks_and_position_ids``.
    """

    def forward_step(batch, model):
        text = mpu.broadcast_data(["text"], batch, torch.int64)["text"].to(device)  # (b, s + 1)
        tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
        attention_mask, position_ids = get_masks_and_position_ids(tokens, eod, reset_position_ids,
                                                                  reset_attention_mask)
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=device)
        if eod_mask_loss:
            loss_mask[tokens == eod] = 0.0
        logits = model(tokens, position_ids, attention_mask)  # (b, s, V/p)
        if not mpu.is_pipeline_last_stage():
            return logits, {}  # a pipeline stage's hidden states, for the next stage
        losses = mpu.vocab_parallel_cross_entropy(logits, labels)
        loss = (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        return loss, {"lm_loss": loss.detach()}

    return forward_step
