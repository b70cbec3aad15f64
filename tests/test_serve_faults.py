"""The server under the faults real clients bring (issue 24): hang-ups, huge prompts, stalled readers, SIGTERM.

Every connection is to 127.0.0.1. Clients are raw sockets where a well-behaved HTTP client could not
misbehave the way editors and dead peers do: close mid-body, close mid-stream, stop reading, never finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from codegen2.loading import load_checkpoint
from codegen2.request_checks import RequestError, check_text_size
from codegen2.serve import app as app_module
from codegen2.serve.app import create_app
from codegen2.serve.engine import BatchEngine
from codegen2.serve.protocol import token_byte_bound
from conftest import make_random_run  # noqa: E402
from test_serve import ThreadServer, wait_until  # noqa: E402

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

N_CTX = 256
LONG_CTX = 4096


@pytest.fixture(scope="module")
def long_run_dir(tmp_path_factory, small_tokenizer) -> Path:
    """A model whose completions never end early, so a request lasts as long as max_tokens says."""
    return make_random_run(tmp_path_factory.mktemp("faults_long"), small_tokenizer, LONG_CTX, never_ends=True)


@pytest.fixture(scope="module")
def long_loaded(long_run_dir):
    return load_checkpoint(long_run_dir)


@pytest.fixture()
def served(long_loaded):
    engine = BatchEngine(long_loaded.model, long_loaded.tokenizer, max_batch_size=8, max_queue=64)
    app = create_app(engine, "m")
    with ThreadServer(app) as srv:
        srv.engine, srv.app = engine, app
        yield srv


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data)


def hang_up(port: int, kind: str) -> socket.socket:
    """Open a connection that misbehaves as `kind`; closed at once unless it is one that is held."""
    s = socket.create_connection(("127.0.0.1", port))
    long = {"prompt": "y", "max_tokens": LONG_CTX - 8, "temperature": 1.0}
    if kind == "mid-body":  # sends half of its body, then goes
        s.sendall(raw_request(long)[:-10])
    elif kind == "mid-stream":  # reads the first event of a stream, then goes
        s.sendall(raw_request({**long, "stream": True}))
        s.recv(64)
    elif kind == "waiting":  # gives up on a whole completion
        s.sendall(raw_request(long))
    elif kind == "headers":  # never finishes its headers (held open)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
    return s


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


# --------------------------------------------------------------------------------- hang-ups
def test_hang_ups_are_counted_cancelled_and_logged_in_one_line_never_a_traceback(served, caplog):
    port = port_of(served.url)
    caplog.set_level(logging.INFO)
    for kind in ["mid-body", "mid-stream", "waiting"] * 3:
        s = hang_up(port, kind)
        time.sleep(0.1)
        s.close()
    wait_until(lambda: health(served.url)["clients_hung_up"] == 9)
    # Every row of a client that left stops using the model; only its first tokens were made.
    wait_until(lambda: served.engine.snapshot()["active"] == 0 and served.engine.snapshot()["waiting"] == 0)
    assert served.engine.snapshot()["rows_cancelled"] == 6
    assert served.engine.snapshot()["tokens_generated"] < 6 * 400  # not 6 * 4088
    served.app.state.hang_ups.flush()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["9 client(s) hung up mid-request in the last 5 s (9 since start)"], lines
    assert not any(r.exc_info for r in caplog.records)
    assert httpx.post(served.url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}).status_code == 200


def test_a_client_that_stops_reading_is_cancelled_not_served_to_max_tokens(long_loaded, monkeypatch):
    """A dead peer never closes, and its socket stops taking data: once its unread events pile up, its rows
    are cancelled like a hang-up's. Driven over ASGI, where a send that never returns is exact."""
    monkeypatch.setattr(app_module, "MAX_UNREAD_EVENTS", 32)
    engine = BatchEngine(long_loaded.model, long_loaded.tokenizer)
    app = create_app(engine, "m")
    body = json.dumps({"prompt": "y", "max_tokens": LONG_CTX - 8, "temperature": 1.0, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def scenario() -> None:
        sent: list[dict] = []
        blocked = asyncio.Event()

        async def receive() -> dict:
            if not sent:
                sent.append({})
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never a disconnect: the peer is silent

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                blocked.set()
                await asyncio.Event().wait()  # the socket never drains

        engine.start()
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(blocked.wait(), 30)
        deadline = time.monotonic() + 30
        while engine.snapshot()["rows_cancelled"] != 1:
            assert time.monotonic() < deadline, engine.snapshot()
            await asyncio.sleep(0.05)
        task.cancel()

    try:
        asyncio.run(scenario())
        assert engine.snapshot()["tokens_generated"] < 200  # cancelled after about 32 tokens, not 4088
        assert app.state.hang_ups.total == 1
    finally:
        engine.stop()


# ----------------------------------------------------------------------------- prompt size
def test_a_prompt_too_long_by_its_size_alone_is_refused_before_tokenizing(served, monkeypatch):
    def no_tokenizing(*_args, **_kwargs):
        raise AssertionError("tokenized a prompt that its size already refuses")

    monkeypatch.setattr(app_module, "plan_request", no_tokenizing)
    huge = "def f(x):\n    return x\n" * 200_000  # 4.6 MB
    for body, param in [({"prompt": huge}, "prompt"), ({"prompt": ["ok", huge]}, "prompt"),
                        ({"prompt": "x", "suffix": huge}, "suffix")]:
        began = time.perf_counter()
        r = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - began < 2.0


def test_the_size_bound_never_refuses_a_prompt_that_fits(served, long_loaded):
    """Text made of the vocabulary's longest tokens: bytes / longest token is exactly its token count."""
    tok = long_loaded.tokenizer
    longest = token_byte_bound(tok)
    assert longest == 31  # the run of 31 spaces (an added token)
    prompt = "x" + (" " * 31 + "x") * 1000  # 33 kB, about 2000 tokens: fits the 4096 context
    assert len(tok.encode(prompt)) < LONG_CTX - 4
    r = httpx.post(served.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


def test_the_size_bound_is_a_lower_bound_of_the_token_count(long_loaded):
    tok = long_loaded.tokenizer
    longest = token_byte_bound(tok)
    rng = random.Random(0)
    pieces = ["    ", "\t\t", " " * 31, "<|endoftext|>", "é", "日本", "🙂", "def", "\n", "x", "return None"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
        assert len(tok.encode(text)) >= math.ceil(len(text.encode()) / longest)
        n_ctx = len(tok.encode(text)) + 1  # the smallest context it fits: never refused by size
        check_text_size({"prompt": text}, longest, n_ctx, "prompt")
    with pytest.raises(RequestError, match="too long") as info:
        check_text_size({"prompt": "a" * 62, "suffix": "b" * 100}, 31, 6, "the prompt with the suffix")
    assert info.value.param == "suffix"


# -------------------------------------------------------------------------- half-open, SIGTERM
def start_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """`codegen2 serve` as users run it (model in a child process), on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "codegen2.cli", "serve", "--checkpoint", str(run_dir),
                             "--port", str(port), "--threads", "1", "--max-batch-size", "4", "--max-queue", "64",
                             "--decoder", "fast"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            httpx.get(url + "/health", timeout=30)
            return proc, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)


def refuses_new_work(url: str, within: float) -> bool:
    """True once a new request is refused (connection refused or closed, or a 503), polled for `within` seconds:
    how soon the server sees the signal depends on the machine's load, so no fixed sleep."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 1}, timeout=5).status_code == 503:
                return True
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def test_half_open_connections_then_sigterm_with_work_in_flight_exits_within_10_s(long_run_dir):
    proc, url = start_server(long_run_dir)
    port = port_of(url)
    held: list[socket.socket] = []
    try:
        # 100 half-open connections (never finished headers, bodies cut short, streams left) come and go.
        for i in range(100):
            held.append(hang_up(port, ["headers", "mid-body", "mid-stream", "waiting"][i % 4]))
        for s in held:
            s.close()
        held.clear()
        began = time.monotonic()
        assert httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 4}, timeout=30).status_code == 200
        assert time.monotonic() - began < 5.0
        wait_until(lambda: health(url)["in_flight"] == 0 and health(url)["clients_hung_up"] == 75, timeout=30)

        # Work in flight, and half-open connections held, when SIGTERM comes.
        held += [hang_up(port, kind) for kind in ["headers", "mid-body"] * 10 + ["idle"] * 10]
        stream = httpx.Client(base_url=url, timeout=30)
        response = stream.send(stream.build_request("POST", "/v1/completions", json={
            "prompt": "y", "max_tokens": LONG_CTX - 8, "temperature": 1.0, "stream": True}), stream=True)
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        waiting = hang_up(port, "waiting")
        time.sleep(0.2)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert refuses_new_work(url, within=5.0)
        rest = "\n".join(lines)
        # the stream is finished within the grace period (a fast machine) or ends with a 503 error event
        finished = '"finish_reason": "length"' in rest and rest.rstrip().endswith("data: [DONE]")
        assert finished or ('"server_overloaded"' in rest and "shutting down" in rest), rest[-500:]
        waiting.settimeout(15)
        assert waiting.recv(64).startswith(b"HTTP/1.1 503")
        proc.wait(15)
        exit_seconds = time.monotonic() - began
        assert exit_seconds < 10.0, exit_seconds
        output = proc.stdout.read()
        assert "Traceback" not in output, output
        print(f"SIGTERM to exit: {exit_seconds:.1f} s")
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
