"""The playground page of ``tools/serve.py`` (``serving/page.html``) in headless Chromium.

A tiny GPT2 is trained once per module (context 1024, so that a long generation can be stopped
midway) and served by the real ``tools/serve.py`` in a subprocess on a free port. Chromium, driven by
selenium through Debian's chromedriver, types a prompt and generates greedily through a proxy that
hands the answer over in 11-byte slices: the page must join the split events and show exactly the text
of a direct POST to /v1/completions, with as many tokens as the server counts. Stop must cancel a
long generation (the server's step count shows that its row stopped) and leave the server serving; a
400 must be shown with its message and field; a stream that ends without ``[DONE]`` is an error.
Skipped without selenium, /usr/bin/chromium or /usr/bin/chromedriver.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import threading
import time

import pytest

from tests.helpers import REPO, gpt2_args, train_gpt2
from tests.servers import ServerProcess, request

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1100,900"]
TRAIN_FLAGS = {"--train-iters": 40, "--lr": 1e-2, "--seq-length": 32, "--max-position-embeddings": 1024,
               "--eval-iters": 0, "--log-interval": 10}
PROMPT = "the cat sat on"
SCREENSHOT = os.path.join(REPO, "test-artifacts", "serve_page.png")
WAIT_S = 120  # generous: the machine may be busy


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.isfile(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder holding vocab.json/merges.txt, checkpoint of a tiny GPT2 trained on a repetitive corpus)."""
    import torch.distributed as dist

    import mpu

    folder = tmp_path_factory.mktemp("serve_page")
    save = str(folder / "tiny-gpt2")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train_gpt2(gpt2_args(folder, **TRAIN_FLAGS, **{"--save": save}))
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()
    return folder, save


@pytest.fixture(scope="module")
def server(trained):
    """The URL of ``tools/serve.py`` serving the trained checkpoint (stopped with Ctrl-C afterwards)."""
    folder, ckpt = trained
    proc = ServerProcess(["--load", ckpt, "--vocab-file", folder / "vocab.json", "--merge-file", folder / "merges.txt",
                          "--device", "cpu", "--port", 0, "--max-batch-size", 2], start_timeout=WAIT_S)
    try:
        yield proc.url
    finally:
        proc.stop(signal.SIGINT)


DONE, NOT_DONE = b"data: [DONE]\n\n", b": [DONE] cut\n\n"  # an SSE comment of the same length


class SlicingProxy:
    """A TCP proxy on 127.0.0.1 that passes requests through as they come and answers in slices of ``piece``
    bytes, ``pause`` seconds apart, so that the page's reads end inside server-sent events (and inside
    UTF-8 characters), as they may on a real network. With ``cut_done`` set it turns the ``[DONE]`` event
    into a comment, so that a stream ends cleanly but unfinished. Runs its own event loop in a thread."""

    def __init__(self, target: str, piece: int = 11, pause: float = 0.002) -> None:
        host, port = target.split("//")[1].rstrip("/").split(":")
        self.target, self.piece, self.pause = (host, int(port)), piece, pause
        self.cut_done = False
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader, writer, piece: int | None) -> None:
        try:
            while data := await reader.read(65536):
                if piece and self.cut_done:  # aiohttp writes each event in one chunk: it arrives whole
                    data = data.replace(DONE, NOT_DONE)
                for start in range(0, len(data), piece or len(data)):
                    writer.write(data[start:start + (piece or len(data))])
                    await writer.drain()
                    if piece:
                        await asyncio.sleep(self.pause)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(client_reader, server_writer, None),
                             self._pipe(server_reader, client_writer, self.piece))

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def proxy(server):
    """A SlicingProxy in front of the server."""
    sliced = SlicingProxy(server)
    try:
        yield sliced
    finally:
        sliced.close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile.name}")
    options.binary_location = CHROMIUM
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        profile.cleanup()


def _open_page(driver, url: str) -> None:
    """Load the page afresh and wait for its header to show the served model."""
    from selenium.webdriver.support.ui import WebDriverWait

    _, models = request(url + "v1/models")
    name = models["data"][0]["id"]
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element("id", "model-name").text == name)


def _fill(driver, **fields) -> None:
    """Set the page's inputs by id (underscores for dashes); an empty string clears one."""
    for key, value in fields.items():
        element = driver.find_element("id", key.replace("_", "-"))
        element.clear()
        if value != "":
            element.send_keys(str(value))


def _state(driver) -> str:
    return driver.find_element("tag name", "body").get_attribute("data-state")


def _wait_state(driver, *states: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: _state(d) in states)
    return _state(driver)


def _stats(driver) -> tuple[int, float]:
    """(tokens, tokens/s) as the stats line shows them."""
    text = driver.find_element("id", "stats").text
    match = re.search(r"(\d+) tokens? \u00b7 (\d+(?:\.\d+)?) tokens/s", text)
    assert match, f"no token count and tokens/s in the stats line {text!r}"
    return int(match.group(1)), float(match.group(2))


def test_page_streams_the_greedy_completion(server, proxy, driver):
    _open_page(driver, proxy.url)  # events reach the page in slices: it must join them
    _fill(driver, prompt=PROMPT, max_tokens=12, temperature=0, top_p=1, top_k=0, seed="", stop="")
    driver.find_element("id", "generate").click()
    state = _wait_state(driver, "done", "error")
    assert state == "done", driver.find_element("id", "error").text

    status, expected = request(server + "v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert status == 200, expected
    shown = driver.find_element("id", "output").get_property("textContent")
    assert shown == expected["choices"][0]["text"]
    assert shown.strip(), "the greedy completion is empty: the comparison would prove nothing"
    tokens, rate = _stats(driver)
    assert tokens == expected["usage"]["completion_tokens"]
    assert rate > 0
    assert driver.find_element("id", "error").text == ""

    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    assert driver.save_screenshot(SCREENSHOT)
    with open(SCREENSHOT, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def _idle_health(url: str) -> dict:
    """/health once no row is decoding (a finished row leaves at the engine's next plan, within a second)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status, health = request(url + "health")
        if status == 200 and health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server still decodes after {WAIT_S}s: {health}"
        time.sleep(0.2)


def test_stop_cancels_a_long_generation(server, driver):
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(driver, server)
    steps_before = _idle_health(server)["steps"]
    # Greedy: this model's greedy continuation runs to max_tokens (sampled ones soon end at <|endoftext|>,
    # and then a server that never cancels would pass the step count below).
    _fill(driver, prompt=PROMPT, max_tokens=1000, temperature=0, top_p=1, top_k=0, seed="", stop="")
    driver.find_element("id", "generate").click()
    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: _state(d) != "running" or _stats(d)[0] >= 1)
    assert _state(driver) == "running", "the generation ended before Stop could be clicked"
    assert driver.find_element("id", "generate").get_attribute("disabled") is not None
    driver.find_element("id", "stop-button").click()

    assert _wait_state(driver, "stopped", "done", "error") == "stopped"
    tokens, _ = _stats(driver)
    assert 1 <= tokens < 1000
    assert driver.find_element("id", "generate").get_attribute("disabled") is None
    assert driver.find_element("id", "stop-button").get_attribute("disabled") is not None
    assert driver.find_element("id", "error").text == ""
    # The server freed the row: it stopped decoding long before the 1000 steps the request asked for.
    # A step decodes one token; the row's tokens after the click are the few the server made before
    # its next write found the client gone. Without cancellation this row makes 999 steps.
    steps = _idle_health(server)["steps"] - steps_before
    assert tokens <= steps < tokens + 300
    status, body = request(server + "v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")


def test_page_shows_the_servers_400(server, driver):
    _open_page(driver, server)
    _fill(driver, prompt=PROMPT, max_tokens=-1, temperature=0, top_p=1, top_k=0, seed="", stop="")
    driver.find_element("id", "generate").click()
    assert _wait_state(driver, "done", "error") == "error"
    status, expected = request(server + "v1/completions", {"prompt": PROMPT, "max_tokens": -1})
    assert status == 400
    assert expected["error"]["param"] == "max_tokens"
    assert driver.find_element("id", "error").text == f"HTTP 400: {expected['error']['message']} (param: max_tokens)"
    assert driver.find_element("id", "output").get_property("textContent") == ""
    assert driver.find_element("id", "stats").text == ""  # nothing was generated: no figures to show


def test_a_stream_ending_without_done_is_an_error(proxy, driver):
    _open_page(driver, proxy.url)
    _fill(driver, prompt=PROMPT, max_tokens=5, temperature=0, top_p=1, top_k=0, seed="", stop="")
    proxy.cut_done = True
    try:
        driver.find_element("id", "generate").click()
        assert _wait_state(driver, "done", "error") == "error"
    finally:
        proxy.cut_done = False
    assert "ended before [DONE]" in driver.find_element("id", "error").text
    assert _stats(driver)[0] == 5  # what came is kept
