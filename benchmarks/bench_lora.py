"""LoRA fine-tuning on the CPU: codegen2 against transformers + PEFT, and LoRA against full fine-tuning.

Two measurements (issue 23's targets), each engine in a process of its own so that its peak RSS
(`ru_maxrss`) is its own:

- `1b`: CodeGen2-1B's shape (the `1b` preset: 16 layers, d 2048, vocab 51,200; qkv in transformers' 4 groups so
  that transformers loads it), random weights written once as a Hugging Face directory, LoRA rank 16 / alpha 32
  on every linear layer of the blocks, dropout 0, sequence 512, micro-batch 1, float32. Both engines load that
  directory and the same initial adapters (PEFT's layout, written by codegen2: A drawn, B zero) and train on the
  same 10 token batches with AdamW (lr 1e-4, betas 0.9 / 0.95, fused, no weight decay) and clipping at 1.0:
  codegen2 with `codegen2.train.train_step` over `loading.load_checkpoint` + `adapters.load_adapter`; transformers'
  CodeGenForCausalLM wrapped by `peft.PeftModel.from_pretrained(..., is_trainable=True)`, its loss taken the
  same way (cross-entropy of the logits against the next tokens). Targets: peak RSS <= 8 GB, tokens/s >= 1.2x
  PEFT's, peak <= PEFT's, the 10 losses equal within 1e-4.
- `125m`: the ~125M CodeGen shape, the same step, LoRA rank 16 against full fine-tuning (every weight trained,
  AdamW state for all), without and then with activation checkpointing (the same setting for both). Target:
  LoRA's peak RSS <= 45% of full fine-tuning's.

tokens/s is the median over steps 2..10 (step 1 warms up); the range is printed beside it.

    python benchmarks/bench_lora.py                  # both
    python benchmarks/bench_lora.py --only 125m --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

import common

RANK, ALPHA, LR, SEQ = 16, 32.0, 1e-4, 512
TARGET_RATIO, TARGET_PEAK_GB, TARGET_LORA_SHARE, LOSS_TOLERANCE = 1.2, 8.0, 0.45, 1e-4


def cpu_line() -> str:
    """lscpu's model name and which of the flags that change CPU kernels this machine has."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return common.cpu_model()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    have = {flag: flag in flags for flag in ("avx2", "avx512_vnni", "amx_int8")}
    return f"{name}; {os.cpu_count()} cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())


# ------------------------------------------------------------------------------------- the inputs
def prepare(shape: str, out: Path, steps: int) -> None:
    """Random weights as a HF directory, the initial adapters in PEFT's layout, and the token batches."""
    from codegen2.adapters import write_adapter
    from codegen2.hf.config import CONFIG_FILE
    from codegen2.lora import LoraSettings, attach_lora
    from codegen2.models import architecture, build_model
    from codegen2.safetensors_io import write_file

    cfg = common.model_config(shape)
    torch.manual_seed(0)
    model = build_model(cfg)
    mapping = architecture(cfg).hf
    hf_dir = out / "base"
    hf_dir.mkdir(parents=True)
    write_file({k: v.contiguous() for k, v in mapping.state_to_hf(model.state_dict(), cfg).items()},
               hf_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = mapping.config_to_hf(cfg, 0, "float32")
    (hf_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    attach_lora(model, LoraSettings(rank=RANK, alpha=ALPHA, dropout=0.0),
                generator=torch.Generator().manual_seed(1))
    write_adapter(model, out / "adapter", base_model=str(hf_dir))
    ids = torch.randint(0, cfg.vocab_size, (steps, 1, SEQ + 1), generator=torch.Generator().manual_seed(2))
    torch.save(ids, out / "batches.pt")


# ------------------------------------------------------------------------------------- the engines
def ours(work: Path, lora: bool, checkpointing: bool = False) -> tuple:
    """codegen2: the HF directory through its loader, the adapters attached unmerged, `train_step` per step."""
    from codegen2.adapters import load_adapter
    from codegen2.config import TrainConfig
    from codegen2.data.loader import Batch
    from codegen2.loading import load_checkpoint
    from codegen2.train import StepSettings, build_optimizer, train_step

    model = load_checkpoint(work / "base", inference=False, load_tokenizer=False).model.train()
    model.activation_checkpointing = checkpointing
    if lora:
        load_adapter(model, work / "adapter")
    optimizer = build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))

    def step(ids: torch.Tensor) -> float:
        inputs, labels = ids[:, :-1], ids[:, 1:]
        batch = Batch(input_ids=inputs, labels=labels, doc_ids=torch.zeros_like(inputs),
                      prefix_len=torch.zeros(1, dtype=torch.int64), objective=torch.zeros(1, dtype=torch.int64),
                      sample_index=torch.arange(1))
        targets = torch.tensor(float(labels.numel()))
        _, loss_sum, _ = train_step(model, optimizer, [batch], targets, StepSettings(grad_clip=1.0))
        return float(loss_sum.sum() / targets)

    return model, step


def peft_engine(work: Path, lora: bool) -> tuple:
    """transformers + PEFT as their users run them: from_pretrained, PeftModel.from_pretrained(is_trainable)."""
    import peft
    import torch.nn.functional as F
    import transformers

    from codegen2.config import TrainConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, work / "adapter", is_trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = TrainConfig()  # codegen2's AdamW betas (0.9, 0.95) and eps, so that the two runs are one recipe
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, weight_decay=0.0,
                                  fused=True)

    def step(ids: torch.Tensor) -> float:
        inputs, labels = ids[:, :-1], ids[:, 1:]
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def engine_main(engine: str, work: Path, lora: bool, out: Path, checkpointing: bool = False) -> None:
    """One engine in this process: load, train on the batches, write losses, step times and peak RSS."""
    started = time.perf_counter()
    model, step = ours(work, lora, checkpointing) if engine == "codegen2" else peft_engine(work, lora)
    loaded_s = time.perf_counter() - started
    loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = torch.load(work / "batches.pt")
    saved = saved_bytes(model, batches[0][:, :-1]) if engine == "codegen2" else 0
    losses, times = [], []
    for ids in batches:
        begin = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - begin)
        print(f"  {engine} step {len(losses)}: loss {losses[-1]:.6f}, {times[-1]:.1f} s", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps({"losses": losses, "times": times, "peak": peak, "trained": trained,
                               "load_s": loaded_s, "threads": torch.get_num_threads(), "loaded_peak": loaded_peak,
                               "saved": saved}))


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors a training forward keeps for backward (distinct storages, parameters left out), as
    saved-tensor hooks see them once the forward has returned the final hidden states; the loss keeps only their
    gradient ([tokens, d]) beyond them. Run before training, in a forward whose graph is then dropped."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[tuple[weakref.ref, int, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        alias = tensor.detach()  # the tensor itself (with its grad_fn) would make a cycle that keeps the graph alive
        storage = alias.untyped_storage()
        if storage.data_ptr() not in params:
            kept.append((weakref.ref(alias), storage.data_ptr(), storage.nbytes()))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model(ids, return_hidden=True)
    alive = {ptr: nbytes for ref, ptr, nbytes in kept if ref() is not None}
    del hidden
    return sum(alive.values())


def run_engine(engine: str, work: Path, lora: bool, checkpointing: bool = False) -> dict:
    """`engine_main` in a fresh process (its own peak RSS)."""
    out = work / f"{engine}-{'lora' if lora else 'full'}{'-ckpt' if checkpointing else ''}.json"
    command = [sys.executable, __file__, "--engine", engine, "--work", str(work), "--out", str(out)]
    subprocess.run(command + ([] if lora else ["--full"]) + (["--checkpointing"] if checkpointing else []),
                   check=True)
    return json.loads(out.read_text())


def rate(result: dict) -> tuple[float, float, float]:
    """tokens/s: the median over steps 2.. and the range."""
    times = result["times"][1:] or result["times"]
    return SEQ / statistics.median(times), SEQ / max(times), SEQ / min(times)


def describe(name: str, result: dict) -> str:
    median, low, high = rate(result)
    saved = f", {result['saved'] / 1e9:.2f} GB saved by the forward" if result.get("saved") else ""
    return (f"  {name:28} {median:7.1f} tokens/s ({low:.1f}..{high:.1f}), peak RSS {result['peak'] / 1e9:.2f} GB "
            f"({result['loaded_peak'] / 1e9:.2f} once loaded{saved}), {result['trained']:,} trained, loaded in "
            f"{result['load_s']:.0f} s")


# ------------------------------------------------------------------------------------- the two targets
def against_peft(root: Path, steps: int) -> None:
    work = root / "1b"
    prepare_in_child("1b", work, steps)
    theirs = run_engine("peft", work, lora=True)
    mine = run_engine("codegen2", work, lora=True)
    print(f"1b shape, LoRA rank {RANK} all-linear, sequence {SEQ}, micro-batch 1, float32, {steps} steps "
          f"(threads {mine['threads']}):")
    print(describe("transformers + PEFT", theirs))
    print(describe("codegen2", mine))
    gap = max(abs(a - b) for a, b in zip(mine["losses"], theirs["losses"]))
    ratio = rate(mine)[0] / rate(theirs)[0]
    print(f"  tokens/s codegen2 / PEFT: {ratio:.2f}x (target >= {TARGET_RATIO}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'missed'})")
    print(f"  peak RSS: codegen2 {mine['peak'] / 1e9:.2f} GB <= {TARGET_PEAK_GB} GB: "
          f"{'met' if mine['peak'] <= TARGET_PEAK_GB * 1e9 else 'missed'}; <= PEFT's {theirs['peak'] / 1e9:.2f} GB: "
          f"{'met' if mine['peak'] <= theirs['peak'] else 'missed'}")
    print(f"  losses of the {len(mine['losses'])} steps: largest difference {gap:.2e} (target <= {LOSS_TOLERANCE}: "
          f"{'met' if gap <= LOSS_TOLERANCE else 'missed'}); codegen2 {[round(x, 5) for x in mine['losses']]}")


def lora_against_full(root: Path, steps: int) -> None:
    """LoRA's peak RSS against full fine-tuning's, without and with activation checkpointing (both engines alike)."""
    work = root / "125m"
    prepare_in_child("125m", work, steps)
    for checkpointing in (False, True):
        full = run_engine("codegen2", work, lora=False, checkpointing=checkpointing)
        lora = run_engine("codegen2", work, lora=True, checkpointing=checkpointing)
        share = lora["peak"] / full["peak"]
        print(f"125m shape, sequence {SEQ}, micro-batch 1, float32, {steps} steps, activation checkpointing "
              f"{'on' if checkpointing else 'off'}:")
        print(describe("codegen2 full fine-tuning", full))
        print(describe(f"codegen2 LoRA rank {RANK}", lora))
        print(f"  LoRA peak / full peak: {100 * share:.0f}% (target <= {100 * TARGET_LORA_SHARE:.0f}%: "
              f"{'met' if share <= TARGET_LORA_SHARE else 'missed'})")


def prepare_in_child(shape: str, work: Path, steps: int) -> None:
    """`prepare` in a child process, so that its memory is gone before the engines start."""
    subprocess.run([sys.executable, __file__, "--prepare", shape, "--work", str(work), "--steps", str(steps)],
                   check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["1b", "125m"], help="one of the two measurements")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--engine", choices=["codegen2", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=["1b", "125m"], help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.work, args.steps)
        return 0
    if args.engine:
        engine_main(args.engine, args.work, not args.full, args.out, args.checkpointing)
        return 0
    print(cpu_line())
    print(common.machine_line())
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        if args.only in (None, "1b"):
            against_peft(root, args.steps)
        if args.only in (None, "125m"):
            lora_against_full(root, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
