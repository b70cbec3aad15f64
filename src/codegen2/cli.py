"""`codegen2 <command>`: a thin layer that parses arguments and calls the library.

Errors the user can fix (UserError, ConfigError) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, config_from_dict, load_config, preset_dict
from .errors import EXIT_FIX_INPUT, RetryLater, StorageError, UserError
from .infill import add_infill_format_arg
from .options import add_decoder_flag, add_device_flag, add_dtype_flag


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="codegen2 run directory or Hugging Face directory")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mp-num", type=int, default=None, help="qkv grouping of a HF checkpoint (default: detect)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the newest)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapters merged in at load (a LoRA run or a PEFT directory)")
    add_device_flag(parser)
    add_dtype_flag(parser)
    add_decoder_flag(parser)


def cmd_info(args: argparse.Namespace) -> int:
    from .models import architecture

    config = config_from_dict(preset_dict(args.preset)).validate()
    m = config.model
    layout = f"mp_num={m.mp_num}" if m.arch == "codegen" else \
        f"n_kv_head={m.kv_heads} n_inner={m.inner_dim} rope_theta={m.rope_theta:g} tied={m.tie_word_embeddings}"
    print(f"preset {args.preset}: arch={m.arch} n_layer={m.n_layer} n_embd={m.n_embd} n_head={m.n_head} "
          f"head_dim={m.head_dim} rotary_dim={m.rotary_dim} vocab_size={m.vocab_size} n_ctx={m.n_ctx} {layout}")
    print(f"parameters: {architecture(m).count_parameters(m):,}")
    if args.lora is not None:
        _print_memory_plans(config, args.lora, args.gpus, args.seq_len)
    return 0


def _print_memory_plans(config, rank: int, gpus: int, seq_len: int | None) -> None:
    """What full and LoRA fine-tuning of this shape need per GPU (micro-batch 1, bf16 base for LoRA): the
    numbers the training memory-fit check uses (metrics.plan_training_memory)."""
    from .lora import LoraSettings
    from .metrics import plan_training_memory

    m = config.model
    seq = seq_len or min(2048, m.n_ctx)
    if gpus < 1 or seq < 1 or rank < 1:
        raise UserError(f"--gpus, --seq-len and --lora must be positive (got {gpus}, {seq}, {rank})")
    settings = LoraSettings(rank=rank).check()
    plans = {f"full ({'FSDP over ' + str(gpus) + ' GPUs' if gpus > 1 else '1 GPU'}, fp32 weights + AdamW)":
             plan_training_memory(m, seq, 1, world_size=gpus, parallel="fsdp"),
             f"LoRA rank {rank} (bf16 base, fp32 adapters + AdamW)":
             plan_training_memory(m, seq, 1, lora=settings, base_bytes=2)}
    gib = 2**30
    print(f"fine-tuning memory per GPU at sequence {seq}, micro-batch 1 (GiB; a floor: add allocator slack):")
    for name, plan in plans.items():
        fixed = plan.weights + plan.gradients + plan.optimizer
        print(f"  {name}: trained parameters {plan.trained:,}")
        print(f"    weights {plan.weights / gib:.2f}, gradients {plan.gradients / gib:.2f}, optimizer "
              f"{plan.optimizer / gib:.2f}; activations {plan.activations_plain / gib:.2f} "
              f"({plan.activations_checkpointed / gib:.2f} with checkpointing)")
        print(f"    total {(fixed + plan.activations_plain) / gib:.2f} "
              f"({(fixed + plan.activations_checkpointed) / gib:.2f} with activation checkpointing)")


def cmd_train(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .config import save_config
    from .data.arguments import data_with_paths, resume_data
    from .distributed import is_main_process
    from .train import train

    run_dir = Path(args.out)
    ckpt.check_run_directory(run_dir, args.resume, args.overwrite)  # before any work: refuse another run's files
    if args.lora is not None and args.lora < 1:
        raise UserError(f"--lora {args.lora}: the rank must be at least 1 (leave --lora out for full fine-tuning)")
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("seed", "train.seed"),
                      ("checkpoint_every", "train.checkpoint_every"), ("parallel", "train.parallel"),
                      ("init_from", "train.init_from"), ("lora", "train.lora.rank")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.resume:
        if args.config or args.preset:
            print("note: --resume uses the run's own config.toml; --config/--preset are ignored", file=sys.stderr)
        config = load_config(run_dir / "config.toml", overrides=overrides)
        new_data = resume_data(config.data, args.data, run_dir) if args.data else None
        if new_data is not None:  # a run that has not trained yet takes other data
            config.data = new_data
            if is_main_process():
                save_config(config, run_dir / "config.toml")  # the run's data from now on
    elif args.init_from and not args.preset and not args.config:
        config = _finetune_config(args.init_from, bool(args.lora), overrides)
    else:
        default_preset = not args.preset and not args.config
        config = load_config(args.config, preset="tiny" if default_preset else args.preset, overrides=overrides)
        if default_preset:
            print("note: no --preset or --config given: using the tiny preset (codegen2 info --preset NAME "
                  "lists the others)", file=sys.stderr)
    if not args.resume:
        config.data = data_with_paths(config.data, args.data)
    result = train(config, run_dir, resume=args.resume, overwrite=args.overwrite)
    if result.interrupted:
        return 130 if result.interrupted == "SIGINT" else 143
    if is_main_process():
        print(f"done: {result.final_step} steps, {result.tokens_seen:,} tokens, loss {result.last_loss:.4f}, "
              f"run directory {run_dir}")
    return 0


def _finetune_config(init_from: str, lora: bool, overrides: list[str]):
    """`--init-from DIR` alone: DIR's shapes with the documented fine-tuning recipe (config.FINETUNE_TRAIN)."""
    from .config import finetune_values
    from .loading import model_config_of

    values = finetune_values(model_config_of(init_from), lora)
    config = load_config(None, overrides=overrides, defaults=values)
    print(f"note: no --preset or --config given: the model's shapes come from {init_from}, the recipe is the "
          f"fine-tuning default ({config.train.max_steps} steps, lr {config.train.lr:g}; see docs/finetuning.md)",
          file=sys.stderr)
    return config


def _load(args):
    from .loading import load_checkpoint
    from .options import resolve_device

    return load_checkpoint(args.checkpoint, device=resolve_device(args.device), dtype=args.dtype, mp_num=args.mp_num,
                           step=args.step, adapter=args.adapter)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .loading import export_run

    out = export_run(args.run_dir, args.out_dir, step=args.step, adapter_only=args.adapter_only)
    if args.adapter_only:
        print(f"wrote the LoRA adapters to {out} (PEFT's layout: peft.PeftModel.from_pretrained(base, \"{out}\"))")
    else:
        print(f"exported to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .loading import write_quantized_checkpoint

    out = write_quantized_checkpoint(args.checkpoint, args.out, mp_num=args.mp_num)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote int8 weights ({size / 2**20:.1f} MiB in all) to {out}; load it with --checkpoint {out}")
    return 0


def _report_compile() -> None:
    from .generation.decoder import compile_report

    line = compile_report()
    if line:
        print(line, file=sys.stderr)


def _params(args):
    """Sampling parameters, checked by the rules the server applies too (before any model is loaded)."""
    from .generation.sampling import SamplingParams
    from .request_checks import check_sampling, check_stops

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop=check_stops(args.stop), seed=args.seed)


def read_prompt_file(path: str | Path) -> list[str]:
    """The "prompt" of each non-blank line of a JSONL file; a bad line is a UserError naming file:line."""
    from .eval.tasks import read_jsonl

    prompts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{number}: each line needs a string \"prompt\" field, "
                            f"e.g. {{\"prompt\": \"def f(\"}}")
        prompts.append(row["prompt"])
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    from .generation.sampling import generate
    from .request_checks import check_context, check_prompt

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompt-file FILE.jsonl")
    params = _params(args)
    loaded = _load(args)
    for i, prompt in enumerate(prompts):
        where = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        ids = loaded.tokenizer.encode(prompt)
        check_prompt(ids, where)
        check_context(len(ids), params.max_new_tokens, loaded.config.n_ctx, where)
    outputs = generate(loaded.model, loaded.tokenizer, prompts, params, bidirectional_prompt=loaded.prefix_lm,
                       decoder=args.decoder)
    _report_compile()
    for prompt, text in zip(prompts, outputs):
        if len(prompts) > 1:
            print(json.dumps({"prompt": prompt, "completion": text}))
        else:
            print(prompt + text)
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from .generation.sampling import infill
    from .infill import Specials, build_infill, resolve_format
    from .request_checks import check_context, check_infill

    params = _params(args)
    check_infill(args.prefix, args.suffix)
    loaded = _load(args)
    tok = loaded.tokenizer
    fmt = resolve_format(args.infill_format, loaded.config.arch, Specials.of(tok))
    ids = build_infill(tok, args.prefix, args.suffix, fmt)
    check_context(len(ids), params.max_new_tokens, loaded.config.n_ctx,
                  f"the prefix and suffix in the {fmt.name} infill format")
    middle = infill(loaded.model, loaded.tokenizer, [args.prefix], [args.suffix], params,
                    bidirectional_prompt=loaded.prefix_lm, decoder=args.decoder, fmt=fmt)[0]
    _report_compile()
    if args.show_full:
        print(args.prefix + middle + args.suffix)
    else:
        print(middle)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegen2", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="shapes and exact parameter count of a preset")
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--lora", type=int, metavar="RANK", help="also print the memory of full and LoRA fine-tuning")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the full fine-tuning is sharded over (with --lora)")
    p.add_argument("--seq-len", type=int, dest="seq_len", help="sequence length (with --lora; default 2048 or n_ctx)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train or continue training a model")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--preset", choices=list(PRESETS), help="model shape and recipe (default: tiny)")
    p.add_argument("--data", action="append", default=[],
                   help="directory, .jsonl or .parquet, optionally :FIELD for the text field (repeatable)")
    p.add_argument("--out", default="runs/default", help="run directory")
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"])
    p.add_argument("--init-from", dest="init_from",
                   help="start from these weights (run or HF directory); alone, its shapes and the fine-tuning recipe")
    p.add_argument("--lora", type=int, metavar="RANK",
                   help="train LoRA adapters of this rank over the frozen --init-from weights ([train.lora] sets "
                        "alpha, dropout, targets)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint (the run must exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, log and config are deleted)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="left-to-right sampling")
    _sampling_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-file", help="JSONL file with a 'prompt' field per line")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix (the model's format)")
    _sampling_args(p)
    p.add_argument("--prefix", required=True)
    p.add_argument("--suffix", required=True)
    add_infill_format_arg(p)
    p.add_argument("--show-full", action="store_true", help="print prefix + middle + suffix")
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("export-hf", help="write a run's weights as a transformers directory (LoRA runs: merged)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="codegen2 run directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--adapter-only", action="store_true", dest="adapter_only",
                   help="LoRA runs: write only the adapters, in PEFT's layout (adapter_config.json, "
                        "adapter_model.safetensors)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("quantize", help="write an int8 (weight-only) copy of a checkpoint for inference")
    p.add_argument("--checkpoint", required=True, help="codegen2 run directory or Hugging Face directory")
    p.add_argument("--out", required=True, help="new directory for the int8 checkpoint")
    p.add_argument("--mp-num", type=int, default=None, help="qkv grouping of a HF checkpoint (default: detect)")
    p.set_defaults(func=cmd_quantize)

    # Commands contributed by other modules: each has register(subparsers).
    eval_sub = None
    for module in ("codegen2.eval.cli", "codegen2.hf", "codegen2.serve", "codegen2.plot", "codegen2.data.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("codegen2"):
                continue
            raise
        result = mod.register(sub)
        if module == "codegen2.eval.cli":
            eval_sub = result
    if eval_sub is None:
        eval_sub = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    from .eval import heldout

    heldout.register(eval_sub)
    _accept_verbose_everywhere(parser)
    return parser


def _accept_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` works after the subcommand too (`codegen2 train ... -v`), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("-v" in a.option_strings for a in sub._actions):
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log progress and details")
                _accept_verbose_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, RetryLater, StorageError) as exc:  # one line, and the code a requeue reads
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_FIX_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
