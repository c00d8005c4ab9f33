"""The server's two request shapes, checked field by field, and their responses.

``parse_completion`` reads OpenAI's legacy ``/v1/completions`` body (the subset this server implements:
``prompt``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``,
``stream_options``, ``logprobs``, plus ``top_k`` as an extension; OpenAI's other fields are accepted at
their neutral values and refused otherwise); ``parse_megatron`` reads Megatron's ``/api`` body
(``prompts``, ``tokens_to_generate``, ``temperature``, ``top_k``, ``top_p``, ``logprobs``,
``random_seed``, ``add_BOS``, ``stop_on_eol``, ``stop_on_double_eol``). Both turn a body into
``SequenceSpec`` rows (one per prompt and choice) or raise ``RequestError`` naming the field, which the
server answers with 400. Nothing here touches the model: it needs the tokenizer and the context length.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from generation import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 5  # as OpenAI's legacy completions
MAX_CHOICES = 16
# OpenAI fields this server does not implement, and the one value of each that means "not used".
NEUTRAL = {"echo": (False,), "best_of": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
           "logit_bias": (None, {}), "suffix": (None,), "user": None}


class RequestError(ValueError):
    """A bad request: ``message`` for the client, ``param`` the field at fault (None: the whole body)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """One sequence to generate: the prompt's token ids and how to continue it."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None = None
    """The sampling generator's seed (None: drawn by the server)."""
    stop: tuple[str, ...] = ()
    """Strings that end the text (not included in it)."""
    logprobs: int | None = None
    """Report each token's log-probability and this many most likely alternatives (None: nothing)."""


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` body: ``specs[i]`` is choice ``i`` (prompt ``i // n``, sample ``i % n``)."""

    specs: tuple[SequenceSpec, ...]
    stream: bool
    include_usage: bool
    n: int


# --- field checks -------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer, got {_kind(value)}", name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"from {low} to {high}"
        raise RequestError(f"{name} must be {bound}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {_kind(value)}", name)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
        raise RequestError(f"{name} must be {bound}, got {value}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {_kind(value)}", name)
    return value


def _check_fields(body: Any, known: set[str], where: str) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the body of {where} must be a JSON object, got {_kind(body)}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} for {where}; known: {', '.join(sorted(known))}", unknown[0])
    return body


def encode_prompts(value: Any, name: str, tokenizer, context: int) -> list[tuple[int, ...]]:
    """A prompt field (a string, a list of strings, a list of token ids, a list of such lists) as token ids.

    An empty string is an unconditional prompt (the end-of-document token alone, as generate_samples.py).
    Each prompt must leave room for one new token in the context.
    """
    if isinstance(value, str):
        texts: list = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or isinstance(p, list) for p in value):
        texts = value
    else:
        raise RequestError(f"{name} must be a string, a non-empty list of strings, or token ids, got "
                           f"{'an empty list' if value == [] else _kind(value)}", name)
    prompts = []
    for i, item in enumerate(texts):
        where = name if len(texts) == 1 else f"{name}[{i}]"
        if isinstance(item, str):
            ids = tokenizer.encode(item) if item else [tokenizer.eod]
        else:
            if not item or not all(_is_int(t) for t in item):
                raise RequestError(f"{where} must be a non-empty list of token ids", name)
            bad = next((t for t in item if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise RequestError(f"{where} holds token id {bad}, outside the vocabulary "
                                   f"0..{tokenizer.vocab_size - 1}", name)
            ids = item
        if len(ids) >= context:
            raise RequestError(f"{where} is {len(ids)} tokens but the context holds {context}, so at most "
                               f"{context - 1} leave room to generate; shorten it", name)
        prompts.append(tuple(ids))
    return prompts


def _sampling(temperature: float, top_k: int, top_p: float) -> SamplingParams:
    if temperature == 0.0 or top_k == 1:
        return SamplingParams(greedy=True)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=0.0 if top_p >= 1.0 else top_p)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


# --- /v1/completions ------------------------------------------------------------------------------------

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                     "stream_options", "logprobs", *NEUTRAL}


def parse_completion(body: Any, tokenizer, context: int, model_name: str, max_sequences: int) -> CompletionRequest:
    """Check an OpenAI completions body; ``max_sequences`` bounds prompts x ``n`` (the server's queue)."""
    body = _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"the model {model!r} does not exist here; this server serves {model_name!r}", "model",
                           status=404)
    for name, neutral in NEUTRAL.items():
        if neutral is not None and name in body and body[name] not in neutral:
            raise RequestError(f"{name} is not supported by this server (leave it out or give {neutral[-1]!r})", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError(f"user must be a string, got {_kind(body['user'])}", "user")
    if "prompt" not in body:
        raise RequestError("prompt is required", "prompt")
    prompts = encode_prompts(body["prompt"], "prompt", tokenizer, context)
    max_tokens = _integer(body, "max_tokens", min(16, context - 1), 1, context - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, 0)
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    seed = _integer(body, "seed", None, -(2 ** 63))
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("stream_options must be an object with at most the field include_usage", "stream_options")
    include_usage = _boolean(options or {}, "include_usage", False)
    if options is not None and not stream:
        raise RequestError("stream_options needs stream: true", "stream_options")
    if len(prompts) * n > max_sequences:
        raise RequestError(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} sequences; this server queues at "
                           f"most {max_sequences}", "n" if n > 1 else "prompt")
    sampling, stop = _sampling(temperature, top_k, top_p), _stop_strings(body.get("stop"))
    specs = tuple(SequenceSpec(prompt, max_tokens, sampling, None if seed is None else seed + j, stop, logprobs)
                  for prompt in prompts for j in range(n))
    return CompletionRequest(specs, stream, include_usage, n)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_chunk(cid: str, created: int, model: str, index: int, text: str, logprobs: dict | None,
                     finish_reason: str | None) -> dict:
    """One streamed chunk (OpenAI's shape: the same object as the full response, with one choice's new text)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


# --- /api (Megatron) --------------------------------------------------------------------------------------

MEGATRON_FIELDS = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "logprobs", "random_seed",
                   "add_BOS", "stop_on_eol", "stop_on_double_eol"}


@dataclasses.dataclass(frozen=True)
class MegatronRequest:
    specs: tuple[SequenceSpec, ...]
    logprobs: bool


def parse_megatron(body: Any, tokenizer, context: int, max_sequences: int) -> MegatronRequest:
    """Check a body of Megatron's text-generation server (its defaults: 64 tokens (fewer if the context is
    shorter), temperature 1, top-k and top-p off; top-k 1 or temperature 0 is greedy; top-k and top-p
    together are refused, as there)."""
    body = _check_fields(body, MEGATRON_FIELDS, "/api")
    if "prompts" not in body:
        raise RequestError("prompts is required", "prompts")
    if not isinstance(body["prompts"], list) or not body["prompts"] or \
            not all(isinstance(p, str) for p in body["prompts"]):
        raise RequestError("prompts must be a non-empty list of strings", "prompts")
    if len(body["prompts"]) > max_sequences:
        raise RequestError(f"{len(body['prompts'])} prompts; this server queues at most {max_sequences}", "prompts")
    add_bos = _boolean(body, "add_BOS", False)
    texts = body["prompts"]
    prompts = encode_prompts(texts, "prompts", tokenizer, context - 1 if add_bos else context)
    if add_bos:
        prompts = [(tokenizer.eod, *p) if texts[i] else p for i, p in enumerate(prompts)]
    max_tokens = _integer(body, "tokens_to_generate", min(64, context - 1), 1, context - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_k = _integer(body, "top_k", 0, 0, 1000)
    top_p = _number(body, "top_p", 0.0, 0.0, 1.0)
    if top_k > 0 and top_p > 0:
        raise RequestError("give top_k or top_p, not both", "top_p")
    seed = _integer(body, "random_seed", None, 0)
    stop = ("\n",) if _boolean(body, "stop_on_eol", False) else ()
    stop += ("\n\n",) if _boolean(body, "stop_on_double_eol", False) else ()
    logprobs = _boolean(body, "logprobs", False)
    sampling = _sampling(temperature, top_k, top_p)
    specs = tuple(SequenceSpec(p, max_tokens, sampling, seed, stop, 0 if logprobs else None) for p in prompts)
    return MegatronRequest(specs, logprobs)
