"""Continuous batching: many sequences decoded together, joining and leaving between steps.

The engine holds a batch of rows, each a sequence being continued, with one key/value cache for all
of them. Every row has a *pending* token: chosen, not yet fed. One iteration of ``Engine.run``:

1. global rank 0 makes a plan: which rows leave (finished, or cancelled by their client) and which
   queued sequences join (up to ``max_batch_size`` rows), and broadcasts it to the other ranks;
2. every rank drops the leaving rows and, if any join, runs their prompts (left-padded among
   themselves) through the model in a cache of their own, chooses their first tokens, and merges that
   cache into the batch's;
3. every rank feeds all rows' pending tokens in one step and chooses the next ones.

Rows are right-aligned in the cache: all rows write their next key at the same column, and each row's
keys start where its prompt started. A boolean mask (rows x columns) hides the columns before a row's
start from it; positions are per row, so a prompt continues exactly as it would alone. On every merge
the columns no row uses any more are cut off, so the cache is never wider than the longest row plus
some headroom for the coming steps (it grows, by copying, when that runs out).

Tokens are chosen on global rank 0, from the gathered logits, by each row's own sampling parameters
and ``torch.Generator`` (seeded per request, so a seeded request repeats), and broadcast to the
model-parallel group (``generation.decide_tokens``). The other ranks follow rank 0's plans in lockstep;
with nothing to do, rank 0 still sends an empty plan every ``IDLE_PLAN_S`` seconds, so a follower never
waits long enough in a collective to time out. Rank 0 also turns tokens into text (holding back an
incomplete UTF-8 character, and any tail that may begin a stop string) and reports, through each
sequence's ``emit``, one ``TokenEvent`` per token and a ``Finished`` at the end (whose ``tail`` is the
text held back until then).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import threading
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

import mpu
from generation import decide_tokens, left_padded_prompts, sample_next_token
from serving.api import SequenceSpec

IDLE_PLAN_S = 1.0
HEADROOM = 32  # cache columns allocated beyond the current width (rounded to this)


class QueueFull(RuntimeError):
    """The waiting queue cannot take the sequences of a request now."""


class EngineClosed(RuntimeError):
    """The engine stopped (shutting down, or an error): no new sequences."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token: ``text`` is the new text it completes (may be empty), ``offset`` where that text
    starts in the completion; with logprobs, the token's log-probability and the ``top`` alternatives."""

    token: int
    text: str
    offset: int
    token_text: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a sequence: ``reason`` is ``stop`` (end of document or a stop string), ``length``
    (max_tokens or the context) or ``cancelled``; ``text`` the whole completion."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    tail: str = ""
    """The end of ``text`` that no ``TokenEvent`` carried (held back until the end: an incomplete character,
    or what might have begun a stop string)."""


Event = TokenEvent | Finished


class Job:
    """One sequence submitted to the engine; ``emit`` is called from the engine's thread with each event."""

    def __init__(self, spec: SequenceSpec, emit: Callable[[Event], None]) -> None:
        self.spec, self.emit = spec, emit
        self.cancelled = False  # set by the client side; read by the engine's next plan

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """Rank 0's record of one row: its sequence, generator, tokens so far and the text sent."""

    def __init__(self, seq: Job, tokenizer, context: int, seed: int) -> None:
        self.seq, self.spec, self.tokenizer = seq, seq.spec, tokenizer
        self.generator = torch.Generator().manual_seed(seed % 2 ** 64)
        self.limit = min(self.spec.max_tokens, context - len(self.spec.prompt))
        self.ids: list[int] = []
        self.sent = 0  # characters of the completion emitted
        self.finished = False
        self.logprob: tuple[float, dict[str, float] | None] | None = None

    def add(self, token: int, eod: int) -> None:
        """Record the chosen token; emit its text (and the end, if it ends the sequence)."""
        if self.finished:
            return
        if self.seq.cancelled:
            return self._finish("cancelled", self.tokenizer.decode(self.ids))
        if token == eod:
            return self._finish("stop", self.tokenizer.decode(self.ids))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for stop in self.spec.stop:  # a stop string ends the text where it first appears
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                return self._finish("stop", text[:at], token)
        if len(self.ids) >= self.limit:  # the last token: nothing is held back
            self._emit_token(token, text[self.sent:])
            return self._finish("length", text)
        stable = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character waits for its last byte
        stable -= _held_back(text[:stable], self.spec.stop)
        self._emit_token(token, text[self.sent:max(stable, self.sent)])

    def cancel(self) -> None:
        """End a row its client cancelled (nothing once it has finished)."""
        if not self.finished:
            self._finish("cancelled", self.tokenizer.decode(self.ids))

    def _emit_token(self, token: int, text: str) -> None:
        logprob, top = self.logprob if self.logprob is not None else (None, None)
        self.seq.emit(TokenEvent(token, text, self.sent, self.tokenizer.decode([token]), logprob, top))
        self.sent += len(text)

    def _finish(self, reason: str, text: str, token: int | None = None) -> None:
        """End the row; ``token`` (a stop string's last token) still gets its event, with the text before
        the stop; text held back and never sent goes out with the ``Finished`` event."""
        if token is not None:
            self._emit_token(token, text[self.sent:])
        self.finished = True
        self.seq.emit(Finished(reason, text, len(self.spec.prompt), len(self.ids), text[self.sent:]))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclasses.dataclass
class Plan:
    """What every rank does next: drop rows ``leave`` (indices), add ``join`` prompts, or stop."""

    leave: list[int] = dataclasses.field(default_factory=list)
    join: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    stop: bool = False


class Engine:
    """The batch, its cache and the loop (see the module docstring). ``run`` on every rank;
    ``submit``/``close`` from rank 0's other threads."""

    def __init__(self, model: torch.nn.Module, tokenizer, context: int, max_batch_size: int, max_queue: int,
                 seed: int = 0) -> None:
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.device = next(model.parameters()).device
        self.vocab_size = tokenizer.vocab_size
        self.gathered = not getattr(model, "parallel_output", True)
        self._seeds = random.Random(seed)
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self.closed = False
        self.rows: list[_Row] = []  # rank 0 only: one per batch row, in row order
        self.batch = 0
        self.cache = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (b, cache columns): may attend
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (b,) next position to feed
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)  # (b,) chosen, not fed
        self.steps = 0

    # --- rank 0's side: requests come and go ------------------------------------------------------------

    def submit(self, sequences: Sequence[Job]) -> None:
        """Queue a request's sequences, all or none (``QueueFull``, ``EngineClosed``)."""
        with self._wake:
            if self._closing or self.closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._waiting)} sequences waiting, at most "
                                f"{self.max_queue}); retry later")
            self._waiting.extend(sequences)
            self._wake.notify()

    def close(self) -> None:
        """Ask ``run`` to stop after the current step (rank 0)."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def load(self) -> dict:
        """Rows decoding and sequences waiting (for /health)."""
        return {"running": sum(not row.finished for row in self.rows), "waiting": len(self._waiting),
                "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "steps": self.steps}

    def _plan(self) -> Plan:
        leave = [i for i, row in enumerate(self.rows) if row.finished or row.seq.cancelled]
        with self._wake:
            if not self.batch and not self._waiting and not self._closing:  # nothing to do: wait a little
                self._wake.wait(IDLE_PLAN_S)
            if self._closing:
                return Plan(stop=True)
            room = self.max_batch_size - (self.batch - len(leave))
            join: list[Job] = []
            while self._waiting and len(join) < room:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    seq.emit(Finished("cancelled", "", len(seq.spec.prompt), 0))
                else:
                    join.append(seq)
        for i in leave:
            self.rows[i].cancel()
        self.rows = [row for i, row in enumerate(self.rows) if i not in set(leave)]
        self.rows += [_Row(seq, self.tokenizer, self.context,
                           self._seeds.getrandbits(63) if seq.spec.seed is None else seq.spec.seed) for seq in join]
        return Plan(leave, [seq.spec.prompt for seq in join])

    def _share(self, plan: Plan | None) -> Plan:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return plan
        box = [plan]
        dist.broadcast_object_list(box, src=0, device=mpu.collective_device())
        return box[0]

    # --- every rank ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``close`` (rank 0) or rank 0's stop plan (the others)."""
        is_rank_0 = not dist.is_initialized() or dist.get_rank() == 0
        try:
            while self.iterate(is_rank_0):
                pass
        finally:
            self.closed = True
            if is_rank_0:
                self._fail_waiting()

    @torch.inference_mode()
    def iterate(self, is_rank_0: bool = True) -> bool:
        """One plan, shared and carried out (a merge and a decoding step); False once told to stop."""
        plan = self._share(self._plan() if is_rank_0 else None)
        if plan.stop:
            return False
        self._apply(plan)
        return True

    def _fail_waiting(self) -> None:
        with self._wake:
            left = [row.seq for row in self.rows if not row.finished] + list(self._waiting)
            self._waiting.clear()
        for seq in left:
            seq.emit(Finished("cancelled", "", len(seq.spec.prompt), 0))

    def _apply(self, plan: Plan) -> None:
        keep = [i for i in range(self.batch) if i not in set(plan.leave)]
        joiners = self._prefill(plan.join) if plan.join else None
        if plan.leave or joiners is not None:
            self._rebuild(keep, joiners)
        if self.batch:
            self._decode_step()

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Rank 0: each row's next token from the gathered logits (b, V) of its last position."""
        logits = logits[:, :self.vocab_size].float()
        if any(row.spec.logprobs is not None for row in rows):
            logprobs = logits.log_softmax(dim=-1)
        if all(row.spec.sampling.greedy for row in rows):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.stack([sample_next_token(logits[i:i + 1], row.spec.sampling, None, row.generator)[0]
                                  for i, row in enumerate(rows)])
        for i, row in enumerate(rows):
            if row.spec.logprobs is not None:
                top = None
                if row.spec.logprobs:
                    values, ids = logprobs[i].topk(row.spec.logprobs)
                    top = {self.tokenizer.decode([t]): v for t, v in zip(ids.tolist(), values.tolist())}
                row.logprob = (logprobs[i, tokens[i]].item(), top)
        return tokens

    def _decide(self, logits: torch.Tensor, rows: list[_Row] | None) -> torch.Tensor:
        return decide_tokens(logits, self.gathered, None if rows is None else lambda g: self._choose(g, rows))

    def _report(self, tokens: torch.Tensor, rows: list[_Row]) -> None:
        for row, token in zip(rows, tokens.tolist()):
            row.add(token, self.tokenizer.eod)

    def _prefill(self, prompts: list[tuple[int, ...]]):
        """The joining prompts through the model in a cache of their own; their first tokens."""
        tokens, valid, positions, mask = left_padded_prompts(prompts, self.device)
        cache = self.model.allocate_kv_cache(len(prompts), tokens.shape[1])
        logits = self.model(tokens, positions, mask, kv_cache=cache)  # (k, w, V or V/p)
        rows = self.rows[len(self.rows) - len(prompts):] if self.rows else None
        first = self._decide(logits[:, -1], rows)
        if rows is not None:
            self._report(first, rows)
        return cache, valid, positions[:, -1] + 1, first

    def _rebuild(self, keep: list[int], joiners=None, headroom: int = HEADROOM) -> None:
        """A new cache holding rows ``keep`` then the joiners, right-aligned, unused columns cut."""
        width = 0
        if keep:
            index = torch.tensor(keep, device=self.device)
            used = self.valid.index_select(0, index)[:, :self.cache.length].any(dim=0)
            start = int(used.nonzero()[0]) if bool(used.any()) else self.cache.length
            width = self.cache.length - start
        join_width = 0 if joiners is None else joiners[1].shape[1]
        length = max(width, join_width)
        batch = len(keep) + (0 if joiners is None else joiners[1].shape[0])
        columns = -(-(length + 1) // headroom) * headroom
        cache = self.model.allocate_kv_cache(batch, columns) if batch else None
        for buffer in cache.keys + cache.values if cache is not None else []:
            buffer.zero_()  # masked columns still meet the attention weights (0 x NaN is NaN): no garbage there
        valid = torch.zeros(batch, columns, dtype=torch.bool, device=self.device)
        positions, pending = [], []
        if keep:
            for new, old in zip(cache.keys + cache.values, self.cache.keys + self.cache.values):
                new[:len(keep), :, length - width:length] = old.index_select(0, index)[:, :, start:self.cache.length]
            valid[:len(keep), length - width:length] = self.valid.index_select(0, index)[:, start:self.cache.length]
            positions.append(self.positions.index_select(0, index))
            pending.append(self.pending.index_select(0, index))
        if joiners is not None:
            join_cache, join_valid, join_positions, first = joiners
            for new, old in zip(cache.keys + cache.values, join_cache.keys + join_cache.values):
                new[len(keep):, :, length - join_width:length] = old[:, :, :join_width]
            valid[len(keep):, length - join_width:length] = join_valid
            positions.append(join_positions)
            pending.append(first)
        if cache is not None:
            cache.length = length
        self.cache, self.valid, self.batch = cache, valid, batch
        self.positions = torch.cat(positions) if positions else self.positions[:0]
        self.pending = torch.cat(pending) if pending else self.pending[:0]

    def _decode_step(self) -> None:
        """Feed every row's pending token; choose the next ones."""
        if self.cache.length == self.cache.max_length:
            self._rebuild(list(range(self.batch)))
        column = self.cache.length
        self.valid[:, column] = True
        mask = self.valid[:, None, None, :column + 1]  # (b, 1, 1, columns so far): the row's own keys
        if bool(mask.all()):
            mask = None
        positions = self.positions.clamp(max=self.context - 1).unsqueeze(1)  # a finished row may run past
        logits = self.model(self.pending.unsqueeze(1), positions, mask, kv_cache=self.cache)  # (b, 1, V or V/p)
        self.positions = self.positions + 1
        rows = self.rows if (not dist.is_initialized() or dist.get_rank() == 0) else None
        self.pending = self._decide(logits[:, -1], rows)
        self.steps += 1
        if rows is not None:
            self._report(self.pending, rows)
