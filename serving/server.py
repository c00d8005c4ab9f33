"""The HTTP side of the server: aiohttp in a thread of global rank 0, the engine in the main thread.

aiohttp because it is one well-kept package that gives both an asyncio HTTP server with streamed
responses (server-sent events need nothing more than writing to an open response) and the client
the load benchmark uses; it needs no separate ASGI server and no schema library, and its
``handler_cancellation`` cancels a handler whose client went away, which is how a cancelled request
frees its batch row.

Routes: ``POST /v1/completions`` (OpenAI), ``PUT``/``POST /api`` (Megatron), ``GET /health``,
``GET /v1/models``, ``GET /`` (the playground page, ``page.html`` beside this file). A bad request is
answered 400 with a JSON body naming the field (OpenAI's error shape on ``/v1``, ``{"message"}`` on
``/api`` as Megatron's client reads it), a full queue 429, a stopping server 503; an unexpected error
in a handler is a 500 with its message, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable

from aiohttp import web

from serving.api import (
    RequestError,
    completion_chunk,
    completion_id,
    now,
    parse_completion,
    parse_megatron,
    usage,
)
from serving.engine import Engine, EngineClosed, Finished, Job, QueueFull, TokenEvent

SHUTDOWN_S = 5.0  # how long a stopping server waits for the responses in flight
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


def _error(status: int, message: str, param: str | None, megatron: bool) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "server_error")
    body = {"message": message, "param": param} if megatron else \
        {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


class _Choices:
    """The events of one request's sequences, as they arrive on the HTTP thread's loop."""

    def __init__(self, engine: Engine, specs, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs = [Job(spec, self._emitter(loop, i)) for i, spec in enumerate(specs)]
        self.engine = engine
        self.open = len(self.jobs)

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable:
        def emit(event) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop closed: the server is stopping
                pass
        return emit

    async def next(self) -> tuple[int, TokenEvent | Finished]:
        index, event = await self.queue.get()
        if isinstance(event, Finished):
            self.open -= 1
        return index, event

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def _logprobs(events: list[TokenEvent]) -> dict:
    """OpenAI's legacy logprobs object for some tokens."""
    return {"tokens": [e.token_text for e in events], "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [e.top for e in events] if any(e.top is not None for e in events) else None,
            "text_offset": [e.offset for e in events]}


class Server:
    """The aiohttp application over an ``Engine``; ``start`` runs it in a daemon thread."""

    def __init__(self, engine: Engine, tokenizer, context: int, model_name: str, host: str, port: int) -> None:
        self.engine, self.tokenizer, self.context, self.model_name = engine, tokenizer, context, model_name
        self.host, self.port = host, port
        self.created = now()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/", self.page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_route("PUT", "/api", self.megatron)
        app.router.add_post("/api", self.megatron)
        self.app = app

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> str:
        """Listen (in a thread); return the URL. An address that cannot be bound raises ``OSError``."""
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), name="http", daemon=True)
        self.thread.start()
        ready.wait()
        if self.error is not None:
            raise self.error
        return f"http://{self.host}:{self.port}/"

    def _serve(self, ready: threading.Event) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                             shutdown_timeout=SHUTDOWN_S)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            self.port = runner.addresses[0][1]
        except BaseException as err:  # noqa: BLE001 - handed to start() on the main thread
            self.error = err
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Stop listening, let the requests in flight send what they have (``SHUTDOWN_S`` at most), end the thread."""
        if self.loop is None or self.thread is None or not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=SHUTDOWN_S + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    # --- handlers --------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        megatron = request.path.startswith("/api")
        try:
            return await handler(request)
        except RequestError as err:
            return _error(err.status, str(err), err.param, megatron)
        except QueueFull as err:
            return _error(429, str(err), None, megatron)
        except EngineClosed as err:
            return _error(503, str(err), None, megatron)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the server
            traceback.print_exc(file=sys.stderr)
            return _error(500, f"internal error: {type(err).__name__}: {err}", None, megatron)

    async def _body(self, request: web.Request):
        data = await request.read()
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"the body is not valid JSON ({err})") from None

    async def page(self, request: web.Request) -> web.StreamResponse:
        if not os.path.isfile(PAGE):
            raise web.HTTPNotFound(text="the playground page (serving/page.html) is missing from this install")
        return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        closed = self.engine.closed
        return web.json_response({"status": "stopping" if closed else "ok", "model": self.model_name,
                                  **self.engine.load()}, status=503 if closed else 200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "megatron-lm",
             "max_model_len": self.context}]})

    def _submit(self, specs) -> _Choices:
        choices = _Choices(self.engine, specs, asyncio.get_running_loop())
        self.engine.submit(choices.jobs)
        return choices

    async def _collect(self, choices: _Choices) -> tuple[list[Finished], list[list[TokenEvent]]]:
        finished: list[Finished | None] = [None] * len(choices.jobs)
        tokens: list[list[TokenEvent]] = [[] for _ in choices.jobs]
        while choices.open:
            index, event = await choices.next()
            if isinstance(event, Finished):
                finished[index] = event
            else:
                tokens[index].append(event)
        if any(f.reason == "cancelled" for f in finished):
            raise EngineClosed("the server stopped before this request finished")
        return finished, tokens

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        req = parse_completion(body, self.tokenizer, self.context, self.model_name, self.engine.max_queue)
        choices = self._submit(req.specs)
        try:
            if req.stream:
                return await self._stream(request, req, choices)
            finished, tokens = await self._collect(choices)
        finally:
            choices.cancel()  # frees the rows of a client that went away; nothing for finished ones
        want_logprobs = req.specs[0].logprobs is not None
        return web.json_response({
            "id": completion_id(), "object": "text_completion", "created": now(), "model": self.model_name,
            "choices": [{"index": i, "text": f.text, "logprobs": _logprobs(tokens[i]) if want_logprobs else None,
                         "finish_reason": f.reason} for i, f in enumerate(finished)],
            "usage": usage(sum(len(s.prompt) for s in req.specs[::req.n]), sum(f.completion_tokens for f in finished)),
        })

    async def _stream(self, request: web.Request, req, choices: _Choices) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        cid, created = completion_id(), now()
        completion_tokens = 0

        async def send(payload: dict | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            await response.write(f"data: {text}\n\n".encode())

        while choices.open:
            index, event = await choices.next()
            if isinstance(event, TokenEvent):
                logprobs = _logprobs([event]) if req.specs[index].logprobs is not None else None
                await send(completion_chunk(cid, created, self.model_name, index, event.text, logprobs, None))
            else:
                completion_tokens += event.completion_tokens
                await send(completion_chunk(cid, created, self.model_name, index, event.tail, None, event.reason))
        if req.include_usage:
            await send({"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": usage(sum(len(s.prompt) for s in req.specs[::req.n]),
                                                      completion_tokens)})
        await send("[DONE]")
        await response.write_eof()
        return response

    async def megatron(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        req = parse_megatron(body, self.tokenizer, self.context, self.engine.max_queue)
        choices = self._submit(req.specs)
        try:
            finished, tokens = await self._collect(choices)
        finally:
            choices.cancel()
        decode = self.tokenizer.decode
        texts, segments = [], []
        for spec, f, events in zip(req.specs, finished, tokens):
            texts.append(decode(list(spec.prompt)) + f.text)
            segments.append([decode([t]) for t in spec.prompt] + [e.token_text for e in events])
        answer: dict = {"text": texts, "segments": segments}
        if req.logprobs:
            answer["logprobs"] = [[e.logprob for e in events] for events in tokens]
        return web.json_response(answer)
