"""bench/serve_load.py: end to end with tiny settings (it runs, prints every field and exits 0; timings
unchecked), and its client against a stub server whose failures must be counted as lost."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time

from tests.helpers import REPO

LEVEL = (r"clients +{clients} \| done +(\d+) lost +(\d+) \| +[\d.]+ tokens/s \| latency p50 +[\d.]+s p99 +[\d.]+s \| "
         r"ttft p50 +[\d.]+s p99 +[\d.]+s$")


def test_serve_load_bench_runs_and_reports(tmp_path):
    argv = [sys.executable, "bench/serve_load.py", "--cache-dir", str(tmp_path), "--num-layers", "1",
            "--hidden-size", "32", "--heads", "2", "--max-positions", "64", "--concurrency", "1", "2",
            "--requests", "3", "--rounds", "2", "--max-tokens", "4", "--batch", "2", "--time-limit", "240"]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "tests' tiny GPT-2 table" in out  # the empty --cache-dir has no real vocabulary
    for mode in ("one-at-a-time", "batched"):
        for clients in (1, 2):
            rounds = re.findall(rf"^round (\d) \| +{mode} \| " + LEVEL.format(clients=clients), out, re.M)
            assert rounds == [("1", "3", "0"), ("2", "3", "0")], f"{mode}, {clients} clients:\n{out}"
            summary = re.findall(rf"^ *{mode} \| " + LEVEL.format(clients=clients), out, re.M)
            assert summary == [("6", "0")], f"{mode}, {clients} clients:\n{out}"
    for clients in (1, 2):
        assert re.search(rf"clients +{clients}: \d+\.\d\d +\(rounds: \d+\.\d\d \d+\.\d\d; "
                         r"greedy texts agree on \d/6 requests\)", out), out
    bad = re.findall(r"-> HTTP (\S+): (ok|WRONG) \(invalid_request_error, param \w+, during the load\)", out)
    assert bad == [("400", "ok")] * 4, out
    assert "requests lost: 0; bad requests not answered 400: 0; server kept serving: yes" in out


def _stub_app(web):
    """/v1/completions answering its requests in turn: a good stream (3 tokens, then the chunk that ends
    it), HTTP 500, a stream cut before [DONE], a stream whose event is not JSON."""
    calls = []

    async def completions(request):
        kind = len(calls) % 4
        calls.append(kind)
        if kind == 1:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "text": " x", "logprobs": None, "finish_reason": None}]}
        for _ in range(3):
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if kind == 0:
            end = {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
            await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        elif kind == 3:
            await resp.write(b"data: {not json\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions)])
    return app


async def _against(app, fn):
    """``await fn(url)`` with ``app`` served on a free loopback port meanwhile."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        return await fn(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/")
    finally:
        await runner.cleanup()


def test_failed_requests_count_as_lost():
    from aiohttp import web

    from bench.serve_load import parse_args, run_level

    args = parse_args(["--requests", "8", "--max-tokens", "3", "--request-timeout", "30"])
    level = asyncio.run(_against(_stub_app(web), lambda url: run_level(url, 1, args, time.monotonic() + 60)))
    assert (len(level.done), len(level.lost), level.unsent) == (2, 6, 0)
    assert all(o.tokens == 3 and o.text == " x x x" for o in level.done)
    whys = sorted(o.why.split(":")[0] for o in level.lost)
    assert whys == ["HTTP 500"] * 2 + ["JSONDecodeError"] * 2 + ["stream ended before [DONE]"] * 2


def test_percentile_is_nearest_rank():
    from bench.serve_load import percentile

    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and math.isnan(percentile([], 50))


def test_a_bad_request_not_answered_400_fails_the_run(capsys):
    """Against a server that answers a bad request with 200, with 500, or with 400 without OpenAI's error
    body, the bench says WRONG and exits 1."""
    from aiohttp import web

    from bench.serve_load import MODES, Level, Outcome, report, send_bad

    answers = iter([(400, {"error": {"message": "too long", "type": "invalid_request_error", "param": "prompt"}}),
                    (200, {"choices": []}),
                    (500, {"error": {"message": "oops", "type": "invalid_request_error", "param": "temperature"}}),
                    (400, {"detail": "bad JSON"})])

    async def completions(request):
        status, body = next(answers)
        return web.json_response(body, status=status)

    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions)])
    started, finished = asyncio.Event(), asyncio.Event()
    started.set()
    bad = asyncio.run(_against(app, lambda url: send_bad(url, started, finished, 30)))
    assert [(a.status, a.ok) for a in bad] == [(400, True), (200, False), (500, False), (400, False)]

    good = Level(1, {0: Outcome(ok=True, tokens=2, text=" x", latency=0.1, ttft=0.05)}, 0, 1.0)
    assert report({mode: {1: [good]} for mode in MODES}, bad, 1) == 1
    out = capsys.readouterr().out
    assert len(re.findall(r"-> HTTP 400: ok", out)) == 1 and len(re.findall(r": WRONG \(", out)) == 3, out
    assert "bad requests not answered 400: 3; server kept serving: NO" in out
