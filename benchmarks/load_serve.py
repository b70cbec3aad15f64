"""Load test of `codegen2 serve`: 1,000 requests from 64 concurrent clients, then the same requests one at a time.

    .venv/bin/python benchmarks/load_serve.py [--checkpoint RUN | --shape 125m] [--requests 1000] [--concurrency 64]
        [--dtype int8] [--decoder model|fast|compiled]
    .venv/bin/python benchmarks/load_serve.py --soak [--half-open 500] [--hang-ups 1000]

Starts the server as a separate process on loopback (on a small random-weight model unless --checkpoint
is given; --shape picks a CodeGen shape of benchmarks/common.py instead, random weights), sends a fixed mix
of requests (completions and `suffix` infills, greedy and seeded sampling, a quarter streamed) and reports
p50/p99 latency, throughput, the server's RSS after the first 100 and after the last 100 requests, the
speed-up of batched over one-at-a-time serving, and how many seeded/greedy requests gave identical text
both ways. Exits 1 on any failure other than a deliberate 429/503 refusal.

--soak (issue 24) instead measures the server under misbehaving clients: p95 latency of normal requests
alone, then again while `--half-open` connections are held open (headers or body never finished, idle)
and `--hang-ups` clients hang up mid-body, mid-stream or while waiting; the server's RSS growth over the
hang-ups; and the time from SIGTERM to exit with all of that still open. Loopback only, bounded in count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_small_run(directory: Path, shape: str | None = None) -> Path:
    """A random-weight CodeGen (4 layers, width 128, 1.1M parameters, or the benchmarks' `shape`: common.SHAPES),
    BPE trained on a few standard-library files."""
    import argparse as src_a
    import json as src_b
    import textwrap as src_c

    import torch

    from codegen2.checkpoint import write_checkpoint
    from codegen2.config import Config, ModelConfig, TokenizerConfig, TrainConfig, save_config
    from codegen2.models.codegen.model import CodeGenModel
    from codegen2.tokenizer import train_tokenizer

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (src_a, src_b, src_c)]
    tokenizer = train_tokenizer(texts, vocab_size=1024, num_masks=8)
    config = Config(model=ModelConfig(vocab_size=1024, n_layer=4, n_embd=128, n_head=4, rotary_dim=16, n_ctx=512,
                                      mp_num=4),
                    tokenizer=TokenizerConfig(vocab_size=1024, num_masks=8), train=TrainConfig(seq_len=256))
    if shape:
        from common import model_config

        config.model = model_config(shape)
    torch.manual_seed(0)
    model = CodeGenModel(config.model)
    save_config(config, directory / "config.toml")
    tokenizer.save(directory)
    write_checkpoint(directory, 0, model.state_dict(), {"tokens_seen": 0})
    return directory


def make_requests(count: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """A fixed mix: 1/8 infills, half greedy and half seeded sampling, 1/4 streamed."""
    rng = random.Random(seed)
    heads = ["def fib(n):\n    ", "import os\n\n", "class Stack:\n    def __init__(self):\n        ",
             "for i in range(10):\n    ", "# parse the arguments\nparser = ", "x = [1, 2, 3]\ny = ",
             "def read(path):\n    with open(path) as f:\n        ", "if __name__ == '__main__':\n    "]
    requests = []
    for i in range(count):
        body = {"model": "bench", "prompt": rng.choice(heads) + "v" * rng.randint(0, 40), "max_tokens": max_tokens,
                "temperature": 0.0 if i % 2 else 0.8, "seed": i}
        if i % 8 == 3:
            body["suffix"] = "\n    return result\n"
        if i % 4 == 1:
            body["stream"] = True
        requests.append(body)
    return requests


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its children (the model runs in a child process)."""
    total_kib = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if entry == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total_kib += int(fields.get("VmRSS", "0 kB").split()[0])
    return total_kib / 1024


class Client:
    """One persistent HTTP/1.1 connection (stdlib http.client: far less CPU per request than an async client)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def send(self, body: dict) -> tuple[int, str, float]:
        """POST one request; returns (status, completion text, latency in seconds); status 0: transport error."""
        began = time.perf_counter()
        try:
            status, text = self._send(body)
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            status, text = 0, f"{type(exc).__name__}: {exc}"
        return status, text, time.perf_counter() - began

    def _send(self, body: dict) -> tuple[int, str]:
        self.conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        if response.status != 200 or not body.get("stream"):
            payload = response.read().decode()
            if response.status != 200:
                return response.status, payload
            return 200, json.loads(payload)["choices"][0]["text"]
        parts = []
        while True:
            line = response.readline().decode()
            if not line:
                break
            if not line.startswith("data: "):
                continue
            if line.strip() == "data: [DONE]":
                response.read()
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, chunk["error"]["message"]
            parts.extend(c["text"] for c in chunk["choices"])
        return 200, "".join(parts)

    def close(self) -> None:
        self.conn.close()


def run_load(port: int, requests: list[dict], concurrency: int, server_pid: int) -> dict:
    """`concurrency` clients, each sending its next request as soon as the previous one is answered."""
    results: list = [None] * len(requests)
    rss: dict[str, float] = {}
    lock = threading.Lock()
    state = {"next": 0, "done": 0}

    def worker() -> None:
        client = Client(port)
        try:
            while True:
                with lock:
                    i = state["next"]
                    if i >= len(requests):
                        return
                    state["next"] += 1
                results[i] = client.send(requests[i])
                with lock:
                    state["done"] += 1
                    if state["done"] % 100 == 0 or state["done"] == len(requests):
                        rss[state["done"]] = rss_mib(server_pid)
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall": time.perf_counter() - began, "rss": rss}


def summarize(name: str, run: dict) -> dict:
    statuses = [r[0] for r in run["results"]]
    latencies = sorted(r[2] for r in run["results"] if r[0] == 200)
    ok = len(latencies)
    out = {
        "phase": name, "requests": len(statuses), "ok": ok,
        "refused_429_503": sum(s in (429, 503) for s in statuses),
        "failed": sum(s not in (200, 429, 503) for s in statuses),
        "failures": sorted({f"{r[0]} {r[1][:80]}" for r in run["results"] if r[0] not in (200, 429, 503)})[:5],
        "wall_s": round(run["wall"], 2), "throughput_rps": round(ok / run["wall"], 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[min(ok - 1, int(0.99 * ok))], 1) if latencies else None,
    }
    return out


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return {**json.loads(response.read()), "http_status": response.status}
    finally:
        conn.close()


def wait_for_server(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            if get_json(port, "/health")["http_status"] == 200:
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit("server did not start in time")


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data)


def open_half_open(port: int, count: int) -> list[socket.socket]:
    """Connections that never finish: headers cut short, a body cut short, or nothing sent at all."""
    held = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 3 == 0:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: b\r\n")
        elif i % 3 == 1:
            s.sendall(raw_request({"model": "bench", "prompt": "def f():", "max_tokens": 64})[:-8])
        held.append(s)
    return held


def hang_up_clients(port: int, count: int, max_tokens: int, per_second: float) -> int:
    """`count` clients, `per_second` at most, that each send a request and close mid-body, mid-stream or waiting."""
    done = 0
    began = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, began + i / per_second - time.monotonic()))
        body = {"model": "bench", "prompt": "def f():", "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                if i % 3 == 0:
                    s.sendall(raw_request(body)[:-8])
                elif i % 3 == 1:
                    s.sendall(raw_request({**body, "stream": True}))
                    s.recv(64)
                else:
                    s.sendall(raw_request(body))
                    time.sleep(0.005)
            done += 1
        except OSError:
            pass
    return done


def p95_ms(run: dict) -> float | None:
    latencies = sorted(r[2] for r in run["results"] if r[0] == 200)
    return round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None


def run_soak(port: int, proc: subprocess.Popen, args: argparse.Namespace) -> dict:
    """Baseline p95, then p95 with half-open connections held and clients hanging up; RSS; SIGTERM to exit."""
    requests = make_requests(args.requests, args.max_tokens)
    run_load(port, make_requests(2 * args.concurrency, args.max_tokens, seed=1), args.concurrency, proc.pid)
    baseline = run_load(port, requests, args.concurrency, proc.pid)
    rss_before = rss_mib(proc.pid)
    held = open_half_open(port, args.half_open)
    # In a process of its own, so that its sockets do not compete with the load's clients for one GIL.
    hanger = multiprocessing.get_context("spawn").Process(
        target=hang_up_clients, args=(port, args.hang_ups, 4 * args.max_tokens, args.hang_ups_per_second))
    hanger.start()
    loaded = run_load(port, requests, args.concurrency, proc.pid)
    hanger.join()
    time.sleep(1.0)
    rss_after = rss_mib(proc.pid)
    health = get_json(port, "/health")
    began = time.monotonic()
    proc.terminate()
    try:
        proc.wait(30)
        exit_s: float | None = round(time.monotonic() - began, 2)
    except subprocess.TimeoutExpired:
        exit_s = None
    for s in held:
        s.close()
    base, soak = p95_ms(baseline), p95_ms(loaded)
    return {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "baseline": summarize("baseline", baseline), "soak": summarize("soak", loaded),
            "p95_ms": {"baseline": base, "soak": soak, "ratio": round(soak / base, 2) if base and soak else None},
            "half_open_held": len(held), "hang_ups_sent": args.hang_ups,
            "clients_hung_up_at_server": health.get("clients_hung_up"),
            "rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1),
                        "growth": round(rss_after - rss_before, 1)},
            "sigterm_to_exit_s": exit_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model to serve (default: a small random-weight model)")
    parser.add_argument("--shape", help="a random-weight CodeGen of this shape (benchmarks/common.py SHAPES: tiny, "
                                        "93m, 125m, 1b) instead of the small model")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--dtype", default="auto", help="server --dtype: float32, bfloat16, int8 (auto: as stored)")
    parser.add_argument("--decoder", default=None, help="server --decoder: model, fast, compiled (default: its own)")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds the server may take to start "
                        "(a large --shape on a busy machine needs more)")
    parser.add_argument("--soak", action="store_true", help="hang-ups and half-open connections (see above)")
    parser.add_argument("--half-open", type=int, default=500, help="--soak: connections held half-open")
    parser.add_argument("--hang-ups", type=int, default=1000, help="--soak: clients that hang up mid-request")
    parser.add_argument("--hang-ups-per-second", type=float, default=100.0, help="--soak: their pace")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_small_run(Path(tmp), args.shape))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "codegen2.cli", "serve", "--checkpoint", checkpoint,
                                 "--port", str(port), "--model-name", "bench", "--max-batch-size",
                                 str(args.max_batch_size), "--max-queue", str(args.max_queue),
                                 "--threads", str(args.threads), "--dtype", args.dtype]
                                + (["--decoder", args.decoder] if args.decoder else []), env=env)
        try:
            wait_for_server(port, proc, args.start_timeout)
            if args.soak:
                summary = run_soak(port, proc, args)
                print(json.dumps(summary, indent=2))
                ok = (summary["soak"]["failed"] == 0 and summary["sigterm_to_exit_s"] is not None
                      and summary["sigterm_to_exit_s"] < 10)
                return 0 if ok else 1
            requests = make_requests(args.requests, args.max_tokens)
            run_load(port, make_requests(2 * args.concurrency, args.max_tokens, seed=1), args.concurrency,
                     proc.pid)  # warm-up
            rss_start = rss_mib(proc.pid)
            before = get_json(port, "/health")
            batched = run_load(port, requests, args.concurrency, proc.pid)
            after = get_json(port, "/health")
            small = f"random {args.shape} CodeGen" if args.shape else "random 4-layer d=128 (1.1M params)"
            summary = {"model": checkpoint if args.checkpoint else small,
                       "dtype": args.dtype, "decoder": args.decoder or "the server's default",
                       "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                       "max_batch_size": args.max_batch_size, "batched": summarize("batched", batched),
                       "rss_mib": {"after_warmup": round(rss_start, 1),
                                   "after_first_100": round(batched["rss"][min(100, len(requests))], 1),
                                   "after_last_100": round(batched["rss"][len(requests)], 1),
                                   "every_100": [round(v, 1) for _, v in sorted(batched["rss"].items())]}}
            summary["load_average_1min_after_batched"] = round(os.getloadavg()[0], 1)
            delta = {k: after[k] - before[k] for k in ("steps", "tokens_generated", "rows_failed")}
            summary["server_during_batched"] = {
                **delta, "max_batch_seen": after["max_batch_seen"],
                "mean_batch": round(delta["tokens_generated"] / max(1, delta["steps"]), 1),
                "tokens_per_s": round(delta["tokens_generated"] / batched["wall"], 1)}
            if not args.skip_sequential:
                sequential = run_load(port, requests, 1, proc.pid)
                summary["sequential"] = summarize("sequential", sequential)
                summary["speedup"] = round(summary["batched"]["throughput_rps"]
                                           / summary["sequential"]["throughput_rps"], 2)
                same = sum(a[0] == b[0] == 200 and a[1] == b[1]
                           for a, b in zip(batched["results"], sequential["results"]))
                summary["identical_texts"] = f"{same}/{len(requests)}"
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    failed = summary["batched"]["failed"] + summary.get("sequential", {}).get("failed", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
