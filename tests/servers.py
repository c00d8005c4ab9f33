"""A ``tools/serve.py`` started as real processes (one per model-parallel rank), and small HTTP clients.

``ServerProcess`` waits for rank 0's "serving ... at URL" line (generous timeouts: the machine is
shared), ``stop`` signals rank 0 only, as a user would, and returns every rank's exit status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.distributed import free_port
from tests.helpers import REPO

URL = re.compile(r"http://[^\s/]+:\d+/")


class ServerProcess:
    def __init__(self, argv: list[str], world: int = 1, start_timeout: float = 240) -> None:
        self.lines: list[str] = []
        self.url: str | None = None
        self._found = threading.Event()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
        self.procs = []
        for rank in range(world):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if world > 1 else env
            self.procs.append(subprocess.Popen([sys.executable, "tools/serve.py", *map(str, argv)], cwd=REPO,
                                               env=rank_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                               text=True))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while not self._found.wait(0.2):
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                self._reader.join(timeout=10)
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.procs[0].stderr:
            self.lines.append(line)
            match = URL.search(line)
            if match and self.url is None:
                self.url = match.group(0)
                self._found.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> list[int]:
        """Signal rank 0; every rank's exit status."""
        if self.procs[0].poll() is None:
            self.procs[0].send_signal(sig)
        try:
            codes = [proc.wait(timeout=timeout) for proc in self.procs]
        finally:
            self.kill()
        self._reader.join(timeout=10)
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def request(url: str, body=None, method: str | None = None, raw: bytes | None = None,
            timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON body) of one request; ``body`` is sent as JSON (``raw`` as it is)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(url: str, body: dict, timeout: float = 120) -> list:
    """The parsed ``data:`` events of a server-sent event stream (``"[DONE]"`` kept as a string)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
            else:
                assert line == "", line
    return events


def streamed_texts(events: list) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's concatenated text and finish reason from a completions stream."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons
