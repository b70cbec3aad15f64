"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP.

References: `generation.sampling.generate_ids` / `codegen2 infill` run on the same checkpoint (what a request must
reproduce with the same seed), `tokenizer.decode` of the whole sequence (what streamed text must add
up to), and the OpenAI error shape. The model is a tiny random CodeGen, so texts are gibberish but
exactly reproducible.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from codegen2 import cli
from codegen2.generation.decoder import FastDecoder
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.infill import Specials, infill_prompt
from codegen2.int8 import int8_format
from codegen2.loading import load_checkpoint
from codegen2.serve.app import create_app
from codegen2.serve.engine import BatchEngine, QueueFull, RowRequest
from codegen2.serve.text import IncrementalText
from conftest import make_random_run  # noqa: E402

uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key-123"
MODEL = "tiny-test"
N_CTX = 256
LONG_CTX = 4096


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    return make_random_run(tmp_path_factory.mktemp("serve_run"), tokenizer, N_CTX)


@pytest.fixture(scope="module")
def long_run_dir(tmp_path_factory, tokenizer) -> Path:
    """Same model with a long context, so that one stream lasts seconds: disconnect and 429 tests need it."""
    return make_random_run(tmp_path_factory.mktemp("serve_long_run"), tokenizer, LONG_CTX, never_ends=True)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_checkpoint(run_dir)


class ThreadServer:
    """uvicorn in a background thread on an ephemeral loopback port; stopped on exit."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=16, max_queue=64)
    with ThreadServer(create_app(engine, MODEL, api_key=KEY)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def reference(loaded, prompt_ids, max_tokens, temperature=0.0, top_p=1.0, seeds=(0,), stop=(), stop_ids=None):
    tok = loaded.tokenizer
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop))
    stop_ids = [tok.eot_id] if stop_ids is None else stop_ids
    return generate_ids(loaded.model, tok, [prompt_ids] * len(seeds), params, stop_ids=stop_ids, seeds=list(seeds))


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- openai client
def test_completion_with_the_openai_client_matches_sampling(client, loaded):
    prompt = "def add(a, b):\n    return"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.7, seed=11)
    ids = loaded.tokenizer.encode(prompt)
    ref = reference(loaded, ids, 12, temperature=0.7, seeds=[11])[0]
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_infill_with_suffix_equals_the_cli(client, run_dir, loaded, capsys):
    prefix, suffix = "def area(r):\n    ", "\n    return result\n"
    out = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=24, temperature=0.8,
                                    seed=3)
    assert cli.main(["infill", "--checkpoint", str(run_dir), "--prefix", prefix, "--suffix", suffix, "--seed", "3",
                     "--temperature", "0.8", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert printed == out.choices[0].text + "\n"
    tok = loaded.tokenizer
    assert out.usage.prompt_tokens == len(infill_prompt(Specials.of(tok), tok.encode(prefix), tok.encode(suffix)))


def test_streamed_text_adds_up_to_the_plain_completion(client):
    args = dict(model=MODEL, prompt="import os\n", max_tokens=40, temperature=1.0, seed=5, stop=["e", "\n"])
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    texts = [c.choices[0].text for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert "".join(texts) == plain.choices[0].text
    assert finishes[-1] == plain.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # Long unstopped stream: several chunks arrive, each a piece of the final text.
    long = list(client.completions.create(model=MODEL, prompt="x = ", max_tokens=30, temperature=0.0, stream=True))
    assert len(long) > 3
    ref = client.completions.create(model=MODEL, prompt="x = ", max_tokens=30, temperature=0.0)
    assert "".join(c.choices[0].text for c in long) == ref.choices[0].text


def test_n_choices_and_prompt_lists_use_consecutive_seeds(client, loaded):
    out = client.completions.create(model=MODEL, prompt="class A:", n=3, max_tokens=10, temperature=1.0, seed=21)
    ids = loaded.tokenizer.encode("class A:")
    ref = reference(loaded, ids, 10, temperature=1.0, seeds=[21, 22, 23])
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.text for r in ref]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.prompt_tokens == len(ids)  # a prompt counts once, whatever n is

    prompts = ["a = 1", "b = [2"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=40)
    for index, c in enumerate(out.choices):
        p = index // 2
        expected = reference(loaded, loaded.tokenizer.encode(prompts[p]), 6, temperature=1.0, seeds=[40 + index])[0]
        assert (c.index, c.text) == (index, expected.text)


def test_echo_and_token_id_prompts(client, loaded):
    ids = loaded.tokenizer.encode("for i in range(3):")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    ref = reference(loaded, ids, 5)[0]
    assert out.choices[0].text == "for i in range(3):" + ref.text


def test_concurrent_requests_are_batched_and_each_matches_its_solo_run(server, client, loaded):
    rng = random.Random(0)
    jobs = [dict(prompt=f"def f{i}(x):\n    return " + "x" * rng.randint(0, 20), max_tokens=rng.randint(3, 30),
                 temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]), seed=i,
                 stop=rng.choice([None, ["\n"], ["e", "("]])) for i in range(24)]
    before = server.engine.snapshot()["steps"]
    results: dict[int, str] = {}

    def call(i):
        results[i] = client.completions.create(model=MODEL, **jobs[i]).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(jobs)
    for i, job in enumerate(jobs):
        ref = reference(loaded, loaded.tokenizer.encode(job["prompt"]), job["max_tokens"], job["temperature"],
                        job["top_p"], seeds=[job["seed"]], stop=job["stop"] or ())[0]
        assert results[i] == ref.text, i
    stats = server.engine.snapshot()
    assert stats["max_batch_seen"] > 1
    assert stats["steps"] - before < sum(j["max_tokens"] for j in jobs)  # steps were shared


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["model"] == MODEL


# ------------------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (json.dumps(["a list"]).encode(), 400, None),
    ({"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "stream": 1}, 400, "stream"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "temperature": 3.5}, 400, "temperature"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "max_tokens": N_CTX}, 400, "max_tokens"),
    ({"prompt": "x " * (2 * N_CTX)}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["ok", 3]}, 400, "prompt"),
    ({"prompt": [1, 2, 100000]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "stop": ""}, 400, "stop"),
    ({"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"prompt": "x", "suffix": "y", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "n": 100}, 400, "n"),  # more sequences than the queue (64) could ever hold
]


def test_each_bad_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        for body, status, param in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post("/v1/completions", content=content)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"], body
            assert error["param"] == param, (body, error)
        assert http.post("/v1/nowhere", content=b"{}").status_code == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason


def test_a_wrong_or_missing_key_gets_401(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health")):
                response = http.request(method, path, headers=headers, json={"prompt": "x"})
                assert response.status_code == 401, (headers, path)
                assert response.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
    ok = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------ back-pressure
def test_a_full_queue_answers_429_at_once_and_a_vanished_client_leaves_the_queue(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=1, max_queue=1)
    real_start = engine.start
    engine.start = lambda: None  # hold the engine so that requests stay queued
    with ThreadServer(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url) as http:
        body = {"prompt": "x", "max_tokens": 3}
        # This client gives up while queued: its row must leave the queue.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: engine.snapshot()["waiting"] == 0 and engine.snapshot()["rows_cancelled"] == 1)

        waiter: dict = {}
        blocked = threading.Thread(target=lambda: waiter.update(r=http.post("/v1/completions", json=body, timeout=30)))
        blocked.start()
        wait_until(lambda: engine.snapshot()["waiting"] == 1)
        began = time.monotonic()
        refused = http.post("/v1/completions", json=body, timeout=30)
        assert refused.status_code == 429 and time.monotonic() - began < 2.0
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]
        real_start()
        blocked.join(30)
        assert waiter["r"].status_code == 200
        assert http.post("/v1/completions", json=body, timeout=30).status_code == 200


def test_a_client_leaving_mid_stream_frees_its_slot(long_run_dir):
    loaded_long = load_checkpoint(long_run_dir)
    engine = BatchEngine(loaded_long.model, loaded_long.tokenizer)
    body = {"prompt": "y", "max_tokens": LONG_CTX - 8, "temperature": 1.0, "stream": True}
    with ThreadServer(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")
        wait_until(lambda: engine.snapshot()["rows_cancelled"] == 1 and engine.snapshot()["active"] == 0)
        assert engine.snapshot()["tokens_generated"] < LONG_CTX - 8  # stopped early, not run to the end
        again = http.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
        assert again.status_code == 200


@pytest.mark.parametrize("dtype,decoder", [("float32", "model"), ("float32", "fast"),
                                           pytest.param("float32", "compiled", marks=pytest.mark.slow),
                                           ("int8", "fast"), ("int8-dynamic", "fast"),
                                           pytest.param("int8-dynamic", "compiled", marks=pytest.mark.slow)])
def test_rows_joining_and_leaving_at_any_step_each_match_their_solo_run(loaded, run_dir, dtype, decoder):
    """Drive the engine step by step: dead slots reused in place, growth and compaction rebuilds, mixed params.

    With the fused decode step ("fast", or "compiled": one graph for every batch and cache length, compiled
    when the engine is built) rows live in a batch of slots and join or leave through the slot mask; the
    reference is always the model's own decoder, in the same weight format. int8 rows match exactly too: the
    int8 kernels compute every row on its own (its result never depends on the other rows of the batch).
    """
    tok = loaded.tokenizer
    model = loaded.model if dtype == "float32" else load_checkpoint(run_dir, dtype=dtype).model
    assert int8_format(model) == (None if dtype == "float32" else dtype)
    events_before = len(FastDecoder.compile_events)
    engine = BatchEngine(model, tok, max_batch_size=6, max_queue=100, decoder=decoder)
    calls = {"in_place": 0, "rebuild_with_new_rows": 0, "compaction": 0}
    place, rebuild = engine._place_in_dead_slots, engine._rebuild

    def counting_place(new, *args):
        leftover = place(new, *args)
        calls["in_place"] += len(new) - len(leftover)
        return leftover

    def counting_rebuild(keep, new_rows=None, *args):
        calls["rebuild_with_new_rows" if new_rows else "compaction"] += 1
        return rebuild(keep, new_rows, *args)

    engine._place_in_dead_slots, engine._rebuild = counting_place, counting_rebuild
    rng = random.Random(3)
    schedule: dict[int, list[RowRequest]] = {}
    specs = []
    for i in range(40):
        prompt = tok.encode("def g(x):\n" + "  y = x\n" * rng.randint(0, 12))[: rng.randint(1, 60)]
        spec = RowRequest(prompt, max_tokens=rng.randint(1, 25), temperature=rng.choice([0.0, 0.6, 1.0]),
                          top_p=rng.choice([1.0, 0.8]), seed=100 + i, stop=rng.choice([(), ("e",), ("x", "\n")]),
                          stop_ids=(tok.eot_id,), stream=bool(i % 3))
        specs.append(spec)
        schedule.setdefault(rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 21, 34, 40, 55]), []).append(spec)
    results: dict[int, list] = {}

    def sink_for(i):
        parts = []

        def sink(event):
            parts.append(event.text)
            if event.finish_reason:
                results[i] = ["".join(parts), event.finish_reason]
        return sink

    with torch.inference_mode():
        for step in range(2000):
            for spec in schedule.get(step, []):
                engine.submit([spec], sink_for(specs.index(spec)))
            engine._step()
            if len(results) == len(specs):
                break
    assert len(results) == len(specs)
    for i, spec in enumerate(specs):
        params = SamplingParams(max_new_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                                stop=spec.stop)
        ref = generate_ids(model, tok, [spec.prompt_ids], params, stop_ids=spec.stop_ids, seeds=[spec.seed],
                           decoder="model")[0]
        assert results[i] == [ref.text, ref.finish_reason], i
    assert calls["in_place"] >= 5 and calls["rebuild_with_new_rows"] >= 2 and calls["compaction"] >= 1, calls
    assert engine.snapshot()["max_batch_seen"] == 6
    if decoder == "compiled":  # compiled once, before the first row; every batch and length reused that graph
        assert engine.compile_seconds > 0
        assert [e[0] for e in FastDecoder.compile_events[events_before:]] == ["any"]


def test_engine_refuses_rows_beyond_its_queue_without_queueing_any(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=2, max_queue=3)
    row = RowRequest(prompt_ids=[1, 2], max_tokens=2)
    engine.submit([row, row], lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit([row, row], lambda e: None)
    assert engine.snapshot()["waiting"] == 2


# --------------------------------------------------------------------------- streamed text
def test_incremental_text_equals_decoding_everything_and_never_streams_past_a_stop(loaded):
    tok = loaded.tokenizer
    rng = random.Random(1)
    pieces = ["é", "€", "😀", "abc", " x", "\n", "def", "ab", "()", "<sep>"]
    for trial in range(200):
        ids = [t for _ in range(rng.randint(1, 12)) for t in tok.encode(rng.choice(pieces))]
        ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 3))]
        stops = rng.choice([(), ("b",), ("😀",), ("ab", "\nd"), ("€x",)])
        text = IncrementalText(tok.decode, stops)
        streamed = ""
        for token in ids:
            hit = text.add(token)
            streamed += text.take()
            if hit:
                break
        streamed += text.take(final=True)
        full = tok.decode(text.ids)
        cut = min([full.find(s) for s in stops if s in full], default=-1)
        expected = full if cut == -1 else full[:cut]
        assert text.text == expected == streamed, (trial, ids, stops)
        assert text.stopped == (cut != -1)


# --------------------------------------------------------------------------------- the CLI
def test_serve_command_defaults_to_loopback():
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert (args.host, args.port, args.api_key, args.func.__name__) == ("127.0.0.1", 8000, None, "cmd_serve")


def test_codegen2_serve_runs_the_model_in_a_child_process(long_run_dir):
    """The command as users run it: engine in a child process, queue bound, disconnects, clean exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "codegen2.cli", "serve", "--checkpoint", str(long_run_dir),
                             "--port", str(port), "--api-key", KEY, "--model-name", MODEL, "--threads", "1",
                             "--max-batch-size", "1", "--max-queue", "1",
                             "--decoder", "fast"],  # the fused step uncompiled: no compile time in CI
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                out = client.completions.create(model=MODEL, prompt="def", max_tokens=4, temperature=0)
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert len(out.choices) == 1 and out.usage.completion_tokens >= 1

        def health():
            return httpx.get(url + "/health", headers=headers, timeout=30).json()

        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            too_many = http.post("/v1/completions", json={"prompt": "y", "n": 3, "max_tokens": 2})
            assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
            long = {"prompt": "y", "max_tokens": LONG_CTX - 8, "temperature": 1.0, "stream": True}
            with http.stream("POST", "/v1/completions", json=long) as response:
                lines = response.iter_lines()  # kept referenced: dropping it would close the stream
                assert next(lines).startswith("data: ")
                # One sequence runs; two more would exceed batch 1 + queue 1: refused at once.
                busy = http.post("/v1/completions", json={"prompt": "y", "n": 2, "max_tokens": 2})
                assert busy.status_code == 429, busy.text
            wait_until(lambda: health()["rows_cancelled"] == 1 and health()["in_flight"] == 0)
            # /health reports the bounds given on the command line (not the child's internal safety net).
            assert (health()["max_batch_size"], health()["max_queue"]) == (1, 1)
            assert health()["tokens_generated"] < LONG_CTX - 8  # stopped early, not run to the end
            assert http.post("/v1/completions", json={"prompt": "y", "n": 2, "max_tokens": 2}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
