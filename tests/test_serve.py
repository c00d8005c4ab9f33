"""The text-generation server (tools/serve.py, serving/): continuous batching, the HTTP API, its errors.

A tiny GPT2 (byte-level vocabulary, context 32) is trained once per module, long enough that its greedy
continuations differ from prompt to prompt. The engine is checked in-process, stepped by hand, against a
full recomputation of each prompt alone; the HTTP side against real server processes at model-parallel
sizes 1 and 2, against generate_samples.py's output for the same prompts, and through the ``openai``
client.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.helpers import REPO, gpt2_args, train_gpt2
from tests.servers import ServerProcess, request, stream, streamed_texts

TRAIN_FLAGS = {"--train-iters": 100, "--lr": 1e-2, "--seq-length": 32, "--max-position-embeddings": 32,
               "--eval-iters": 0, "--log-interval": 20}
CONTEXT = 32
PROMPTS = ["the cat", "", "the dog ran with", "world"]


def _in_process_group(fn, *args):
    import torch.distributed as dist

    import mpu

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return fn(*args)
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder with vocab.json/merges.txt, checkpoint at model-parallel size 1, the same resharded to 2)."""
    folder = tmp_path_factory.mktemp("serve")
    save = str(folder / "ckpt_mp1")
    _in_process_group(train_gpt2, gpt2_args(folder, **TRAIN_FLAGS, **{"--save": save}))
    resharded = str(folder / "ckpt_mp2")
    subprocess.run([sys.executable, "tools/reshard_checkpoint.py", "--load", save, "--save", resharded,
                    "--target-model-parallel-size", "2"], cwd=REPO, check=True, capture_output=True)
    return folder, save, resharded


def _flags(folder, ckpt, *extra) -> list[str]:
    return ["--load", ckpt, "--vocab-file", folder / "vocab.json", "--merge-file", folder / "merges.txt",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def server(trained):
    folder, ckpt, _ = trained
    proc = ServerProcess(_flags(folder, ckpt, "--port", 0, "--max-batch-size", 4, "--max-queue", 16))
    yield proc
    codes = proc.stop(signal.SIGINT)  # Ctrl-C: stops after the current step, one line, 130
    assert codes == [130], proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("interrupted:")


def _complete(server, **body) -> dict:
    status, answer = request(server.url + "v1/completions", body)
    assert status == 200, answer
    return answer


# --- the engine, in-process ----------------------------------------------------------------------------

def _load(folder, ckpt):
    from arguments import get_args
    from data_utils import make_tokenizer
    from restore import load_gpt2_for_inference

    args = get_args([str(a) for a in _flags(folder, ckpt)])
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    model, _ = load_gpt2_for_inference(args, tokenizer, torch.device("cpu"))
    return model, tokenizer


@torch.no_grad()
def _alone(model, prompt: list[int], max_new: int, eod: int, vocab_size: int) -> list[int]:
    """Greedy continuation by a full forward pass over the whole sequence for every token."""
    seq, new = list(prompt), []
    while len(new) < min(max_new, CONTEXT - len(prompt)):
        token = int(model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0))[0, -1, :vocab_size].argmax())
        if token == eod:
            break
        seq.append(token)
        new.append(token)
    return new


class _Collect:
    """A job's events, as the engine emits them."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def finished(self):
        from serving.engine import Finished

        return next((e for e in self.events if isinstance(e, Finished)), None)

    @property
    def tokens(self) -> list[int]:
        from serving.engine import TokenEvent

        return [e.token for e in self.events if isinstance(e, TokenEvent)]

    @property
    def streamed(self) -> str:
        from serving.engine import TokenEvent

        return "".join(e.text for e in self.events if isinstance(e, TokenEvent)) + self.finished.tail


def _job(prompt, max_tokens=CONTEXT, **spec):
    from generation import SamplingParams
    from serving.api import SequenceSpec
    from serving.engine import Job

    sink = _Collect()
    return Job(SequenceSpec(tuple(prompt), max_tokens, spec.pop("sampling", SamplingParams(greedy=True)), **spec),
               sink), sink


def test_rows_joining_and_leaving_between_steps_continue_as_each_prompt_alone(single_process_group, trained):
    from generation import SamplingParams
    from serving.engine import Engine

    model, tokenizer = _load(*trained[:2])
    allocate = model.allocate_kv_cache

    def allocate_garbage(*args, **kwargs):  # what torch.empty may hold: a column no row wrote must not leak
        cache = allocate(*args, **kwargs)
        for buffer in cache.keys + cache.values:
            buffer.fill_(float("nan"))
        return cache

    model.allocate_kv_cache = allocate_garbage
    engine = Engine(model, tokenizer, CONTEXT, max_batch_size=2, max_queue=8)
    texts = ["the", "the dog ran with other dogs around", "dogs", "the cat sat on"]
    prompts = [tokenizer.encode(t) for t in texts] + [[tokenizer.eod]]
    limits = [20, 24, 6, 30, 12]
    jobs = [_job(p, n) for p, n in zip(prompts, limits)]
    sampled, sampled_sink = _job(prompts[3], 30, sampling=SamplingParams(temperature=2.0), seed=3)
    jobs.insert(2, (sampled, sampled_sink))  # a row sampling hot among greedy ones: each row has its own rule
    prompts.insert(2, None)
    limits.insert(2, None)
    engine.submit([jobs[0][0]])
    for _ in range(3):  # the first row alone for a few steps ...
        engine.iterate()
    widths = []
    engine.submit([job for job, _ in jobs[1:]])  # ... then a longer prompt joins; the rest wait for a free row
    for _ in range(200):
        if all(sink.finished for _, sink in jobs):
            break
        assert engine.batch <= 2
        engine.iterate()
        widths.append(engine.cache.max_length if engine.cache is not None else 0)
    assert all(sink.finished for _, sink in jobs)
    for (_, sink), prompt, limit in zip(jobs, prompts, limits):
        if prompt is None:
            assert sink.tokens != _alone(model, prompts[4], 30, tokenizer.eod, tokenizer.vocab_size)
            continue
        expected = _alone(model, prompt, limit, tokenizer.eod, tokenizer.vocab_size)
        assert sink.tokens == expected
        reason = "length" if len(expected) == min(limit, CONTEXT - len(prompt)) else "stop"
        assert (sink.finished.reason, sink.finished.text) == (reason, tokenizer.decode(expected))
        assert sink.streamed == sink.finished.text
    assert engine.batch == 0 or all(sink.finished for _, sink in jobs)
    assert max(widths) <= CONTEXT + 32  # columns no row uses are cut off at each merge


def test_a_cancelled_row_leaves_at_the_next_step_and_frees_its_place(single_process_group, trained):
    from serving.engine import Engine, QueueFull

    model, tokenizer = _load(*trained[:2])
    engine = Engine(model, tokenizer, CONTEXT, max_batch_size=1, max_queue=1)
    (first, first_sink), (second, second_sink) = _job(tokenizer.encode("the")), _job(tokenizer.encode("dogs"), 5)
    engine.submit([first])
    engine.iterate()
    engine.submit([second])  # waits: one row only
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([_job([1])[0]])
    engine.iterate()
    assert engine.batch == 1 and not second_sink.events
    first.cancel()
    engine.iterate()  # the cancelled row leaves; the waiting one takes its place
    assert first_sink.finished.reason == "cancelled" and 2 <= len(first_sink.tokens) < 5
    assert second_sink.tokens
    while not second_sink.finished:
        engine.iterate()
    assert second_sink.tokens == _alone(model, tokenizer.encode("dogs"), 5, tokenizer.eod, tokenizer.vocab_size)


def test_stop_strings_end_the_text_and_what_may_start_one_is_held_back(single_process_group, trained):
    from serving.engine import Engine

    model, tokenizer = _load(*trained[:2])
    engine = Engine(model, tokenizer, CONTEXT, max_batch_size=2, max_queue=4)
    prompt = tokenizer.encode("the dog")
    full = tokenizer.decode(_alone(model, prompt, 20, tokenizer.eod, tokenizer.vocab_size))
    at = next(i for i in range(4, len(full) - 3) if full.find(full[i:i + 3]) == i)  # first seen there
    stop = full[at:at + 3]
    job, sink = _job(prompt, 20, stop=(stop, "never appears"))
    engine.submit([job])
    while not sink.finished:
        engine.iterate()
    assert sink.finished.reason == "stop" and sink.finished.text == full[:full.find(stop)]
    assert sink.streamed == sink.finished.text  # nothing past the stop was ever sent


# --- HTTP, against server processes ------------------------------------------------------------------------

def _generate_samples(trained, tmp_path, max_tokens: int) -> list[str]:
    import generate_samples

    folder, ckpt, _ = trained
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    generate_samples.main([str(a) for a in _flags(folder, ckpt, "--greedy", "--sample-input-file",
                                                  tmp_path / "in.txt", "--out-seq-length", max_tokens,
                                                  "--sample-output-file", out, "--batch-size", 2)])
    return [json.loads(line)["text"] for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_greedy_completions_equal_generate_samples_at_model_parallel_sizes_1_and_2(single_process_group, trained,
                                                                                  server, tmp_path):
    expected = _generate_samples(trained, tmp_path, 20)
    assert len(set(expected)) > 1
    answer = _complete(server, prompt=PROMPTS, max_tokens=20, temperature=0)
    assert [c["text"] for c in answer["choices"]] == expected
    assert answer["usage"]["completion_tokens"] >= len(PROMPTS)
    folder, _, mp2 = trained
    two = ServerProcess(_flags(folder, mp2, "--port", 0, "--model-parallel-size", 2), world=2)
    try:
        status, answer = request(two.url + "v1/completions", {"prompt": PROMPTS, "max_tokens": 20, "temperature": 0})
        assert status == 200 and [c["text"] for c in answer["choices"]] == expected
        texts, _ = streamed_texts(stream(two.url + "v1/completions", {"prompt": PROMPTS[0], "max_tokens": 20,
                                                                      "temperature": 0, "stream": True}))
        assert texts == {0: expected[0]}
    finally:
        codes = two.stop(signal.SIGTERM)  # rank 0 tells rank 1 to stop: both end cleanly
    assert codes == [0, 0], two.stderr


def test_streamed_chunks_concatenate_to_the_returned_text(server):
    body = {"prompt": ["the cat", "the dog ran with"], "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 2,
            "logprobs": 2}
    whole = _complete(server, **body)
    events = stream(server.url + "v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts, reasons = streamed_texts(events)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []
    token_chunks = [e for e in events[:-2] if e["choices"][0]["finish_reason"] is None]
    assert len(token_chunks) == whole["usage"]["completion_tokens"]  # one chunk per token
    for choice in whole["choices"]:  # the chosen token's log-probability, and the two most likely
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        for value, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
            assert len(top) == 2 and value <= max(top.values()) + 1e-6 <= 1e-6
    assert len({c["text"] for c in whole["choices"]}) > 1  # n=2 draws differ


def test_a_seeded_sampled_request_repeats_and_another_seed_differs(server):
    body = {"prompt": ["the", "a dog"], "max_tokens": 24, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    first = _complete(server, **body, seed=123)["choices"]
    again = _complete(server, **body, seed=123)["choices"]
    other = _complete(server, **body, seed=124)["choices"]
    assert [c["text"] for c in first] == [c["text"] for c in again]
    assert [c["text"] for c in first] != [c["text"] for c in other]


def test_the_openai_client_gets_completions_and_a_stream(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=120)
    (model,) = client.models.list().data
    greedy = _complete(server, prompt="the cat", max_tokens=12, temperature=0)["choices"][0]["text"]
    answer = client.completions.create(model=model.id, prompt="the cat", max_tokens=12, temperature=0)
    assert answer.choices[0].text == greedy and answer.usage.completion_tokens >= 1
    chunks = client.completions.create(model=model.id, prompt="the cat", max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == greedy
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model.id, prompt="the cat", max_tokens=0)


LONG = "the cat sat " * 12

BAD_REQUESTS = [
    ({"prompt": LONG}, "prompt", "context holds 32"),
    ({}, "prompt", "prompt is required"),
    ({"prompt": []}, "prompt", "empty list"),
    ({"prompt": [5, 99999]}, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "from 1 to 31"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens", "from 1 to 31"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "an integer, got a string"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "an integer, got a boolean"),
    ({"prompt": "x", "temperature": -1}, "temperature", "from 0"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "a number"),
    ({"prompt": "x", "top_p": 0}, "top_p", "above 0"),
    ({"prompt": "x", "n": 0}, "n", "from 1"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "x", "stop": 3}, "stop", "string"),
    ({"prompt": "x", "logprobs": 9}, "logprobs", "from 0 to 5"),
    ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "max_token": 5}, "max_token", "unknown field"),
    ({"prompt": ["x"] * 9, "n": 2}, "n", "queues at most 16"),
    (["x"], None, "JSON object"),
]


@pytest.mark.parametrize("body,param,fragment", BAD_REQUESTS, ids=[str(b)[:40] for b, _, _ in BAD_REQUESTS])
def test_bad_requests_get_400_naming_the_field_and_the_server_goes_on(server, body, param, fragment):
    status, answer = request(server.url + "v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and fragment in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    assert request(server.url + "health")[1]["status"] == "ok"


def test_malformed_json_an_unknown_model_and_bad_megatron_bodies_are_refused(server):
    status, answer = request(server.url + "v1/completions", raw=b'{"prompt": "x", "max_tokens": 5')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = request(server.url + "v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert status == 404 and answer["error"]["param"] == "model"
    status, answer = request(server.url + "api", {"prompts": ["x"], "top_k": 5, "top_p": 0.5}, method="PUT")
    assert status == 400 and answer["param"] == "top_p" and "not both" in answer["message"]
    status, answer = request(server.url + "api", {"prompt": "x"}, method="PUT")
    assert status == 400 and answer["param"] == "prompt" and "unknown field" in answer["message"]
    assert _complete(server, prompt="the", max_tokens=3)["choices"][0]["finish_reason"] in ("stop", "length")


def test_megatron_api_health_and_models(server):
    greedy = _complete(server, prompt=["the cat", "world"], max_tokens=10, temperature=0)["choices"]
    status, answer = request(server.url + "api", {"prompts": ["the cat", "world"], "tokens_to_generate": 10,
                                                  "top_k": 1, "logprobs": True}, method="PUT")
    assert status == 200
    assert answer["text"] == ["the cat" + greedy[0]["text"], "world" + greedy[1]["text"]]
    assert "".join(answer["segments"][0]) == answer["text"][0]
    assert all(-50 < value <= 0 for row in answer["logprobs"] for value in row)
    status, health = request(server.url + "health")
    assert status == 200 and health["status"] == "ok" and health["max_batch_size"] == 4
    status, models = request(server.url + "v1/models")
    assert status == 200 and models["data"][0]["id"] == "ckpt_mp1" and models["data"][0]["max_model_len"] == CONTEXT


def test_a_busy_port_is_one_line_and_exit_1(trained, server):
    folder, ckpt, _ = trained
    port = server.url.rsplit(":", 1)[1].strip("/")
    run = subprocess.run([sys.executable, "tools/serve.py", *map(str, _flags(folder, ckpt, "--port", port))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "in use" in last, run.stderr


# --- HTTP in-process: the queue's bounds and a client that goes away -------------------------------------

def test_a_full_queue_is_429_a_stopped_engine_503_and_a_vanished_client_frees_its_row(single_process_group,
                                                                                     trained):
    aiohttp = pytest.importorskip("aiohttp")
    from serving.engine import Engine
    from serving.server import Server

    model, tokenizer = _load(*trained[:2])
    forward = model.forward

    def slow_forward(*args, **kwargs):  # 31 steps take at least 1.5 s: the cancellation arrives long before
        time.sleep(0.05)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    engine = Engine(model, tokenizer, CONTEXT, max_batch_size=1, max_queue=1)
    server = Server(engine, tokenizer, CONTEXT, "tiny", "127.0.0.1", 0)
    url = server.start() + "v1/completions"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            # The engine is not running yet: the first request waits in the queue, the second finds it full.
            waiting = asyncio.ensure_future(session.post(url, json={"prompt": "the", "max_tokens": 31,
                                                                    "stream": True}))
            while engine.load()["waiting"] == 0:
                await asyncio.sleep(0.01)
            async with session.post(url, json={"prompt": "the", "max_tokens": 2}) as full:
                assert full.status == 429 and "queue is full" in (await full.json())["error"]["message"]
            runner = threading.Thread(target=engine.run)
            runner.start()
            response = await waiting
            assert response.status == 200
            await response.content.readline()  # the first chunk arrived: the row is decoding
            response.close()  # the client goes away mid-stream
            while engine.load()["running"] or engine.load()["waiting"]:
                await asyncio.sleep(0.01)
            assert engine.steps < 31  # the vanished client's row was not decoded to its end
            async with session.post(url, json={"prompt": "the", "max_tokens": 3, "temperature": 0}) as after:
                assert after.status == 200 and (await after.json())["choices"][0]["finish_reason"]
            engine.close()
            runner.join()
            async with session.post(url, json={"prompt": "the"}) as closed:
                assert closed.status == 503 and "shutting down" in (await closed.json())["error"]["message"]
            async with session.get(url.replace("v1/completions", "health")) as health:
                assert health.status == 503

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
        server.stop()
