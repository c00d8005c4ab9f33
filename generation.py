"""Text generation from a GPT2 model: the sampling rule and batched decoding with the key/value cache.

**Sampling** (``sample_next_token``) picks one token per row from the logits of the last position,
over the real vocabulary only: ids ``>= vocab_size`` pad the embedding for model parallelism and are
never chosen. ``greedy`` takes the argmax. Otherwise the logits are divided by ``temperature``; with
``top_k > 0`` only the ``k`` largest stay; with ``0 < top_p < 1`` only the smallest set of most likely
tokens whose probabilities (after top-k, renormalised) sum to at least ``top_p`` stays, never fewer
than the most likely one; the token is drawn from the renormalised rest with a ``torch.Generator``,
so a seed repeats a run exactly.

**Decoding** (``generate``): a batch of prompts is left-padded to the longest and fed in one forward
pass that fills the cache, then each step feeds one token per row. Row ``i`` with ``n_i`` prompt
tokens has positions ``0 .. n_i - 1`` and puts its ``t``-th new token at position ``n_i + t``; the
attention mask hides the padding from every real token (a padded query sees only itself), so a
prompt continues as it would alone. A row stops at the end-of-document token (not part of its
output), after ``max_new_tokens`` tokens, or when ``n_i + t`` reaches ``context_length``.

**Model parallelism**: every rank of a model-parallel group runs the same steps in lockstep. The
next token is decided once, on the group's source rank from the gathered logits, and broadcast to
the group, so the ranks can never diverge. ``broadcast_prompts`` sends the prompts that global
rank 0 read to every rank; data-parallel replicas simply decode the same prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

import mpu
from errors import DataError

TokenCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (see the module docstring for the exact rule)."""

    greedy: bool = False
    """Take the most likely token; the other fields are then ignored."""
    temperature: float = 1.0
    """Divide the logits by this before filtering and sampling (> 0)."""
    top_k: int = 0
    """Keep the ``k`` most likely tokens (0: all)."""
    top_p: float = 0.0
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (0 or 1: all)."""


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits`` (b, V) with every token outside the top ``k``, then outside the top-``p`` nucleus, at -inf.

    The nucleus is the smallest set of most likely tokens whose softmax probabilities sum to at
    least ``top_p``; it always holds the most likely token. Ties at the k-th value are cut arbitrarily.
    """
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first one never goes).
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, params: SamplingParams, vocab_size: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row (b,) from ``logits`` (b, V_padded); ids ``>= vocab_size`` are never chosen.

    ``generator`` must live on ``logits``' device; the same generator state gives the same tokens.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # the padded vocabulary entries are not tokens
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def decide_tokens(last_logits: torch.Tensor, gathered: bool,
                  choose: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """The next token (b,) for the last position's logits (b, V or V/p), the same on every model-parallel rank.

    The source rank of the model-parallel group gathers the logits, calls ``choose`` on them (b, V)
    and broadcasts its choice; the other ranks (which may pass ``choose=None``) take what it sent.
    """
    logits = last_logits if gathered else mpu.gather_from_model_parallel_region(last_logits)  # (b, V)
    if mpu.get_model_parallel_world_size() == 1:
        return choose(logits)
    group = mpu.get_model_parallel_group()
    comm_device = mpu.collective_device(group)
    if mpu.get_model_parallel_rank() == 0:
        token = choose(logits).to(comm_device)
    else:
        token = torch.zeros(logits.shape[0], dtype=torch.long, device=comm_device)
    dist.broadcast(token, mpu.get_model_parallel_src_rank(), group=group)
    return token.to(logits.device)


def decide_next_token(last_logits: torch.Tensor, gathered: bool, params: SamplingParams,
                      vocab_size: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """``decide_tokens`` with one sampling rule for every row (``sample_next_token``)."""
    return decide_tokens(last_logits, gathered, lambda logits: sample_next_token(logits, params, vocab_size, generator))


def left_padded_prompts(prompts: Sequence[Sequence[int]], device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch of prompts as one forward pass's inputs: tokens (b, w) right-aligned with 0 before them,
    which entries are real (b, w), positions (b, w) (each prompt from 0; padding at 0) and the attention
    mask (b, 1, w, w) that hides the padding from every real token (a padded query sees only itself;
    ``None`` when no prompt is padded: plain causal attention)."""
    tokens, valid = _left_padded(prompts, device)
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    width = tokens.shape[1]
    mask = None
    if not bool(valid.all()):
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=device)
        mask = ((causal & valid.unsqueeze(1)) | eye).unsqueeze(1)
    return tokens, valid, positions, mask


def _left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (b, w) right-aligned with 0 before them, and which entries are real (b, w)."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt):] = True
    return tokens.to(device), valid.to(device)


def _trim(generated: list[list[int]], limits: list[int], eod: int | None) -> list[list[int]]:
    """Each row's tokens up to its own limit and before its first end-of-document token."""
    rows = []
    for row, limit in zip(generated, limits):
        row = row[:limit]
        rows.append(row[:row.index(eod)] if eod is not None and eod in row else row)
    return rows


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, context_length: int,
             params: SamplingParams, eod: int | None = None, vocab_size: int | None = None,
             generator: torch.Generator | None = None, on_token: TokenCallback | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) with the cached decoding of the module docstring.

    Returns each row's new tokens, without the end-of-document token that stopped it. Every prompt
    needs 1 to ``context_length - 1`` tokens. ``on_token(row, token)`` is called for each kept token
    as soon as it is decided, in order (for streaming). Call on every rank of the model-parallel
    group with the same prompts.
    """
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1 or max(lengths) >= context_length:
        raise ValueError(f"prompts need 1 to {context_length - 1} tokens, got lengths {lengths}")
    device = model.word_embeddings.weight.device
    limits = [min(max_new_tokens, context_length - n) for n in lengths]
    batch, width, steps = len(prompts), max(lengths), max(limits)
    tokens, valid, positions, mask = left_padded_prompts(prompts, device)
    key_mask = None
    if mask is not None:
        key_mask = torch.ones(batch, 1, 1, width + steps, dtype=torch.bool, device=device)
        key_mask[:, 0, 0, :width] = valid  # generated tokens are always visible
    cache = model.allocate_kv_cache(batch, width + steps)
    logits = model(tokens, positions, mask, kv_cache=cache)  # (b, w, V or V/p)
    gathered = not getattr(model, "parallel_output", True)
    next_position = torch.tensor(lengths, device=device).unsqueeze(1)  # (b, 1)
    out = torch.empty(batch, steps, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_at = torch.tensor(limits, device=device)
    for step in range(steps):
        token = decide_next_token(logits[:, -1], gathered, params, vocab_size, generator)  # (b,)
        out[:, step] = token
        if on_token is not None:
            _report(on_token, token, finished, eod)
        if eod is not None:
            finished |= token == eod
        finished |= stop_at <= step + 1
        # Only an end-of-document token finishes every row early (asking waits for the device).
        if step + 1 == steps or (eod is not None and bool(finished.all())):
            break
        step_mask = None if key_mask is None else key_mask[..., :cache.length + 1]
        # A finished row is still fed (its output ignored); keep its position inside the embedding.
        position = (next_position + step).clamp(max=context_length - 1)  # (b, 1)
        logits = model(token.unsqueeze(1), position, step_mask, kv_cache=cache)  # (b, 1, V or V/p)
    return _trim(out[:, :step + 1].tolist(), limits, eod)


def _report(on_token: TokenCallback, token: torch.Tensor, finished: torch.Tensor, eod: int | None) -> None:
    for row, (value, done) in enumerate(zip(token.tolist(), finished.tolist())):
        if not done and value != eod:
            on_token(row, value)


class TextStream:
    """Decodes tokens as they arrive and writes only the newly completed text.

    GPT-2's byte-level tokens may end inside a UTF-8 character, which decodes as U+FFFD until its
    last byte arrives; trailing U+FFFD are therefore held back until more text or ``end()`` comes.
    What is written in total equals ``tokenizer.decode`` of every token put.
    """

    def __init__(self, tokenizer, write: Callable[[str], object]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded text written so far

    def put(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        if stable > self.written:
            self.write(text[self.written:stable])
            self.written = stable

    def end(self) -> str:
        """Write whatever is still held back; return the whole text."""
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.written:
            self.write(text[self.written:])
        self.written = len(text)
        return text


_BATCH, _DONE, _FAILED = 0, 1, 2


def broadcast_prompts(prompts: Sequence[Sequence[int]] | None = None, failed: bool = False) -> list[list[int]] | None:
    """Send global rank 0's batch of prompts (token ids and lengths) to every rank; ``None`` when done.

    Only global rank 0's arguments count: ``prompts`` is the next batch, ``None`` says there are no
    more, ``failed=True`` that rank 0 hit an error of its own (it raises that itself afterwards;
    the other ranks raise a ``DataError`` pointing at it instead of waiting forever).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None if failed or prompts is None else [list(p) for p in prompts]
    device = mpu.collective_device()
    header = torch.zeros(3, dtype=torch.long)
    if mpu.is_rank_0():
        status = _FAILED if failed else _DONE if prompts is None else _BATCH
        header[:] = torch.tensor([status, len(prompts or []), max((len(p) for p in prompts or []), default=0)])
    header = header.to(device)
    dist.broadcast(header, 0)
    status, batch, width = header.tolist()
    if status == _FAILED:
        if mpu.is_rank_0():
            return None
        raise DataError("global rank 0 stopped reading prompts (its error says why)")
    if status == _DONE:
        return None
    body = torch.zeros(batch, width + 1, dtype=torch.long)  # [length, tokens..., 0 padding]
    if mpu.is_rank_0():
        for row, prompt in enumerate(prompts):
            body[row, 0] = len(prompt)
            body[row, 1:1 + len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    body = body.to(device)
    dist.broadcast(body, 0)
    return [row[1:1 + row[0]] for row in body.tolist()]
