"""`codegen2 serve`: an OpenAI-compatible completions server (with `suffix` infill) over any loadable checkpoint.

Layout: `engine` batches requests on the model (torch only), `text` tracks streamed text and stop
strings, `protocol` validates requests and shapes responses, `app` is the FastAPI layer. FastAPI,
uvicorn and pydantic are imported only when serving, so other commands work without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..options import add_decoder_flag, add_device_flag, add_dtype_flag, resolve_device

log = logging.getLogger("codegen2.serve")

API_KEY_ENV = "CODEGEN2_API_KEY"
# After SIGTERM: requests get `lifecycle.DRAIN_GRACE_SECONDS` to finish, then are cancelled; whatever is still open
# (a client that never sent its whole body) is cut at this bound, and the engine gets `app.ENGINE_STOP_SECONDS`.
SHUTDOWN_BACKSTOP_SECONDS = 5.0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve completions and infills over an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="codegen2 run directory or Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every request (or set {API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="model id reported and accepted (default: checkpoint name)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences allowed to wait; beyond it requests get 429 at once")
    add_device_flag(p)
    add_dtype_flag(p, default="auto", extra="; auto: bfloat16 on CUDA, as stored on the CPU")
    add_decoder_flag(p)
    p.add_argument("--mp-num", type=int, default=None, help="qkv grouping of a HF checkpoint (default: detect)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the newest)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapters merged in at load (a LoRA run or a PEFT directory)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch default; 1 is fastest for small models on busy machines)")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in the HTTP process (simpler to debug; slower under load, as model and "
                        "HTTP work then share one GIL)")
    p.set_defaults(func=cmd_serve)
    return p


def _dtype(name: str, device: str) -> str | None:
    from ..int8 import parse_dtype

    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else None
    return parse_dtype(name)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise UserError(f"serving needs the 'serve' extra ({exc.name} is missing): "
                        f"pip install 'codegen2[serve]'") from None
    from ..loading import load_checkpoint
    from .app import create_app
    from .engine import BatchEngine
    from .process import ProcessEngine

    if args.max_batch_size < 1 or args.max_queue < 1:
        raise UserError("--max-batch-size and --max-queue must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads} must be 0 (torch default) or more")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not Path(args.checkpoint).exists():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    name = args.model_name or Path(args.adapter or args.checkpoint).resolve().name  # the tuned model, when adapted
    device = str(resolve_device(args.device))
    dtype = _dtype(args.dtype, device)
    if args.in_process:
        loaded = load_checkpoint(args.checkpoint, device=device, dtype=dtype, mp_num=args.mp_num,
                                 step=args.step, adapter=args.adapter)
        engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=args.max_batch_size,
                             max_queue=args.max_queue, bidirectional_prompt=loaded.prefix_lm, decoder=args.decoder)
        source = loaded.source
    else:
        engine = ProcessEngine(args.checkpoint, device=device, dtype=dtype, mp_num=args.mp_num, step=args.step,
                               adapter=args.adapter, threads=args.threads, max_batch_size=args.max_batch_size,
                               max_queue=args.max_queue, decoder=args.decoder)
        source = engine.source
    app = create_app(engine, name, api_key=api_key)
    compiled = (f", decode step compiled at start-up in {engine.compile_seconds:.1f} s"
                if engine.compile_seconds else "")
    print(f"serving {name} ({source}) on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, queue {args.max_queue}, decoder {args.decoder}{compiled}, "
          f"auth {'on' if api_key else 'off'})", file=sys.stderr, flush=True)
    verbose = bool(getattr(args, "verbose", False))
    _serve(app, uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if verbose else "warning",
                               access_log=verbose, timeout_graceful_shutdown=int(SHUTDOWN_BACKSTOP_SECONDS)))
    return 0


def _serve(app, config) -> None:
    """Run uvicorn; its exit signal (SIGTERM, Ctrl-C) also starts the app's drain, so in-flight work ends in time.

    uvicorn alone closes the listening socket and then waits for every connection, forever by default:
    a stream with a long max_tokens, or a client that never finishes its body, kept it alive past 30 s.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.drain.begin()
            super().handle_exit(sig, frame)

    Server(config).run()
