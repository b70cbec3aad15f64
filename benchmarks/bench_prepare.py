"""`codegen2 data prepare` on a corpus no one here wrote: the `.py` files of the installed site-packages.

What it measures, in one command of a few minutes:

1. Quality, with planted copies (a second source, so dedup works across sources): exact copies of
   original files, near copies (a few lines edited; exact 5-gram Jaccard >= 0.8 checked), HumanEval
   canonical solutions (under their `def` header, no docstring) and HumanEval-infilling middles pasted
   into other files. Reports the share removed of each, and the exact 5-gram Jaccard between a sample of
   removed near-duplicates and the document kept in their place (false positive: Jaccard < 0.6).
2. Throughput: the same prepare with 1 worker and with 2 workers (same --tasks, so the output is the
   same; checked), wall time per stage, MB/s of raw text and tokens/s per worker, and the ratio. The
   tokenizer is trained once beforehand and given to both (its training is one task either way; its
   time is reported on its own). The control: tokenization alone (what the per-run token cache of
   codegen2 before the one data path did: read, `encode_batch`, write; no filters, no dedup) of the
   same sources with the same tokenizer in the same run, one core.
   Tokenizers' own thread pool is off (TOKENIZERS_PARALLELISM=false) so that one worker is one core.
3. The secrets stage's cost (target <= 25% of prepare time): the 1-worker prepare again with
   `data.secrets = false`, and, as a control less sensitive to the machine's load, the scanner alone over every
   document in this process (CPU seconds, against the 1-worker prepare's stages). What it redacted, by kind.

    python benchmarks/bench_prepare.py [--target-mb 150] [--tasks 4] [--out /tmp/bench-prepare] [--json FILE]
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core (set before tokenizers loads)

import argparse
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codegen2.config import SourceConfig, load_config
from codegen2.data.prepare.decontaminate import BENCHMARKS, Decontaminator, benchmark_patterns, humaneval_problems
from codegen2.data.prepare.filters import CodeFilter
from codegen2.data.prepare.minhash import code_tokens, jaccard
from codegen2.data.prepare.pipeline import prepare
from codegen2.data.prepare.secrets import SecretScanner
from codegen2.data.sources import data_sources
from codegen2.tokenizer import train_tokenizer


def pick_packages(root: Path, target_mb: float) -> tuple[list[str], float]:
    """The largest top-level packages until their .py files reach target_mb."""
    sizes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))):
        sizes.append((sum(f.stat().st_size for f in d.rglob("*.py") if f.is_file()), d.name))
    chosen, total = [], 0
    for size, name in sorted(sizes, reverse=True):
        if total >= target_mb * 1e6:
            break
        chosen.append(name)
        total += size
    return sorted(chosen), total / 1e6


def edit_lines(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    for _ in range(max(1, int(len(lines) * rng.uniform(0.02, 0.12)))):  # Jaccard from about 0.95 down to 0.8
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + f"  # changed {rng.randrange(1000)}"
    return "\n".join(lines)


def plant(root: Path, packages: list[str], out: Path, rng: random.Random, n_exact: int, n_near: int,
          n_middles: int) -> dict:
    """Write the planted copies under out/planted; return what was planted where."""
    planted_dir = out / "planted"
    shutil.rmtree(planted_dir, ignore_errors=True)
    planted_dir.mkdir(parents=True)
    files = sorted(f for pkg in packages for f in (root / pkg).rglob("*.py") if f.is_file())
    rng.shuffle(files)
    code_filter, decontaminator = CodeFilter(), Decontaminator(benchmark_patterns(BENCHMARKS))
    eligible = []
    for f in files:
        if len(eligible) >= n_exact + 2 * n_near + 600:
            break
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if 2000 <= len(text) <= 100_000 and code_filter.reason(text) is None and \
                decontaminator.match(text) is None and len(code_tokens(text)) >= 200:
            eligible.append((f, text))
    record: dict = {"exact": [], "near": [], "leaks": []}
    for i, (f, text) in enumerate(eligible[:n_exact]):
        copy = planted_dir / f"exact_{i:04d}.py"
        copy.write_text(text, encoding="utf-8")
        record["exact"].append((str(copy), str(f)))
    for i, (f, text) in enumerate(eligible[n_exact:n_exact + 2 * n_near]):
        if len(record["near"]) == n_near:
            break
        near = edit_lines(text, rng)
        similarity = jaccard(near, text)
        if not 0.8 <= similarity < 1.0:
            continue
        copy = planted_dir / f"near_{i:04d}.py"
        copy.write_text(near, encoding="utf-8")
        record["near"].append((str(copy), str(f), similarity))
    hosts = eligible[n_exact + 2 * n_near:]
    problems = humaneval_problems()
    leaks = []
    for task_id, problem in problems.items():
        header = next(line.strip() for line in problem["prompt"].split("\n")
                      if line.lstrip().startswith(f"def {problem['entry_point']}("))
        if not header.endswith(":"):  # a header over several lines: take the prompt up to the docstring
            header = problem["prompt"].split('"""')[0].split("'''")[0].rstrip()
        leaks.append((f"{task_id}:solution", header + "\n" + problem["canonical_solution"]))
    patterns = benchmark_patterns(["humaneval-infilling"])
    middles = sorted(patterns.items(), key=lambda kv: kv[1])
    for pattern, label in rng.sample(middles, min(n_middles, len(middles))):
        leaks.append((label, pattern))
    for i, (label, leak) in enumerate(leaks):
        host_file, host = hosts[i % len(hosts)]
        lines = host.split("\n")
        cut = rng.randrange(len(lines))
        copy = planted_dir / f"leak_{i:04d}.py"
        copy.write_text("\n".join(lines[:cut] + ["", leak, ""] + lines[cut:]), encoding="utf-8")
        record["leaks"].append((str(copy), label))
    return record


def config_for(root: Path, packages: list[str], out: Path, tokenizer_path: str):
    config = load_config(None, preset="tiny")
    config.data.sources = [
        SourceConfig(path=str(root), kind="code", include=[f"{p}/**/*.py" for p in packages], name="site-packages"),
        SourceConfig(path=str(out / "planted"), kind="code", include=["*.py"], name="planted"),
    ]
    config.data.heldout_fraction = 0.01
    config.tokenizer.path = tokenizer_path
    config.tokenizer.vocab_size = 8192
    config.model.vocab_size = 8192
    return config.validate()


def quality(out: Path, record: dict, sample: int, rng: random.Random) -> dict:
    removed = {}
    for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        removed[row["path"]] = row
    dup_reasons = ("exact_duplicate", "near_duplicate")

    def pair_deduped(a: str, b: str) -> bool:
        return any(p in removed and removed[p]["reason"] in dup_reasons for p in (a, b))

    exact = sum(pair_deduped(a, b) for a, b in record["exact"])
    near = sum(pair_deduped(a, b) for a, b, _ in record["near"])
    leaks = sum(removed.get(p, {}).get("reason") == "decontaminated" for p, _ in record["leaks"])
    near_rows = [r for r in removed.values() if r["reason"] == "near_duplicate"]
    checked = rng.sample(near_rows, min(sample, len(near_rows)))
    similarities = [jaccard(Path(r["path"]).read_text(encoding="utf-8"),
                            Path(r["duplicate_of"]).read_text(encoding="utf-8")) for r in checked]
    false_positives = sum(s < 0.6 for s in similarities)
    reasons: dict[str, int] = {}
    for r in removed.values():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "planted_exact": len(record["exact"]), "exact_removed": exact,
        "planted_near": len(record["near"]), "near_removed": near,
        "planted_near_min_jaccard": min(s for _, _, s in record["near"]),
        "planted_leaks": len(record["leaks"]), "leaks_removed": leaks,
        "removed_by_reason": reasons, "near_checked": len(checked), "near_false_positives": false_positives,
        "near_checked_min_jaccard": min(similarities) if similarities else None,
    }


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_capacity(n: int = 20_000_000) -> float:
    """Control: how much faster two CPU-bound processes finish two units of work than one process does
    (2.0 on two free cores; about 1.0 when the machine's other users leave one core)."""
    import multiprocessing

    started = time.perf_counter()
    _spin(n)
    _spin(n)
    one = time.perf_counter() - started
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_spin, [n, n])
    return one / (time.perf_counter() - started)


def run_prepare(config, out: Path, tasks: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    manifest = prepare(config, out, tasks=tasks, workers=workers, log=lambda m: None)
    wall = time.perf_counter() - started
    timings = json.loads((out / "logs" / "timings.json").read_text())
    return {"wall": wall, "stages": {k: v["seconds"] for k, v in timings.items()}, "manifest": manifest}


def tokenize_only(config, tokenizer, path: Path, batch_chars: int = 4_000_000) -> int:
    """Read every training document, tokenize it in batches and append the tokens (+ eot) to `path`, as the
    per-run token cache did; returns the number of tokens."""
    import numpy as np

    total = 0
    with open(path, "wb") as out:
        for source in data_sources(config.data, "train"):
            batch, chars = [], 0
            for doc in [*source.documents(), None]:
                if doc is not None:
                    batch.append(doc.text)
                    chars += len(doc.text)
                if batch and (doc is None or chars >= batch_chars):
                    for ids in tokenizer.encode_batch(batch, literal_specials=True):
                        ids.append(tokenizer.eot_id)
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                        total += len(ids)
                    batch, chars = [], 0
    path.unlink()
    return total


def secrets_cost(config, out: Path, tasks: int, with_secrets: dict) -> dict:
    """The 1-worker prepare without the secrets stage, and the scanner alone over every document (one core)."""
    config.data.secrets = False
    try:
        without = run_prepare(config, out, tasks, 1)
    finally:
        config.data.secrets = True
    scanner, cpu, docs = SecretScanner(), 0.0, 0
    for split in ("train", "heldout"):
        for source in data_sources(config.data, split):
            for doc in source.documents():
                started = time.process_time()
                scanner.redact(doc.text)
                cpu += time.process_time() - started
                docs += 1
    redacted: dict[str, int] = {}
    for source in with_secrets["manifest"]["sources"]:
        for split in source["splits"].values():
            for kind, n in split.get("redacted", {}).items():
                redacted[kind] = redacted.get(kind, 0) + n
    removed = sum(s["removed"].get("secrets", 0) for src in with_secrets["manifest"]["sources"]
                  for s in src["splits"].values())
    return {"with_wall": with_secrets["wall"], "without_wall": without["wall"],
            "with_stages": sum(with_secrets["stages"].values()), "without_stages": sum(without["stages"].values()),
            "scanner_cpu_seconds": cpu, "documents": docs, "redacted": redacted, "files_removed": removed}


def print_secrets(cost: dict) -> None:
    extra, share = cost["with_stages"] - cost["without_stages"], cost["scanner_cpu_seconds"] / cost["with_stages"]
    print(f"secrets stage, 1 worker: prepare {cost['with_stages']:.1f} s with, {cost['without_stages']:.1f} s without "
          f"({extra / cost['with_stages']:+.1%} of the prepare); the scanner alone over {cost['documents']:,} "
          f"documents: {cost['scanner_cpu_seconds']:.1f} CPU s ({share:.1%} of the prepare); "
          f"redacted {json.dumps(cost['redacted'], sort_keys=True)}, files removed {cost['files_removed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-mb", type=float, default=150.0)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--exact", type=int, default=300)
    parser.add_argument("--near", type=int, default=300)
    parser.add_argument("--middles", type=int, default=300)
    parser.add_argument("--sample", type=int, default=500, help="removed near-duplicates checked by exact Jaccard")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-prepare"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    root = Path(sysconfig.get_paths()["purelib"])
    packages, corpus_mb = pick_packages(root, args.target_mb)
    print(f"corpus: {corpus_mb:.1f} MB of .py in {root} ({', '.join(packages)})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = plant(root, packages, args.out, rng, args.exact, args.near, args.middles)
    print(f"planted: {len(record['exact'])} exact, {len(record['near'])} near, {len(record['leaks'])} leaks",
          flush=True)

    # the tokenizer, once: 5 M characters of the corpus
    config = config_for(root, packages, args.out, "")
    started = time.perf_counter()
    texts, chars = [], 0
    for doc in data_sources(config.data, "train")[0].documents():
        if rng.random() < 0.05:
            texts.append(doc.text)
            chars += len(doc.text)
            if chars > 5_000_000:
                break
    tokenizer = train_tokenizer(texts, config.tokenizer.vocab_size, config.tokenizer.num_masks)
    tokenizer.save(args.out / "tokenizer")
    tokenizer_seconds = time.perf_counter() - started
    config = config_for(root, packages, args.out, str(args.out / "tokenizer" / "tokenizer.json"))

    capacity_before = parallel_capacity()
    one = run_prepare(config, args.out / "prepared-1w", args.tasks, 1)
    print(f"1 worker: {one['wall']:.1f} s", flush=True)
    two = run_prepare(config, args.out / "prepared-2w", args.tasks, 2)
    print(f"2 workers: {two['wall']:.1f} s", flush=True)
    secrets = secrets_cost(config, args.out / "prepared-1w-no-secrets", args.tasks, one)
    print(f"1 worker, no secrets stage: {secrets['without_wall']:.1f} s", flush=True)
    capacity_after = parallel_capacity()
    identical = all((args.out / "prepared-1w" / p.relative_to(args.out / "prepared-2w")).read_bytes() == p.read_bytes()
                    for p in sorted((args.out / "prepared-2w" / "shards").rglob("*.bin")))

    # tokenization alone (the old per-run token cache's work), same sources and tokenizer, one core
    started = time.perf_counter()
    cache_tokens = tokenize_only(config, tokenizer, args.out / "tokenize-only.bin")
    cache_seconds = time.perf_counter() - started

    manifest = two["manifest"]
    raw_mb = sum(s["chars_in"] for src in manifest["sources"] for s in src["splits"].values()) / 1e6
    tokens_out = manifest["totals"]["tokens"]
    q = quality(args.out / "prepared-2w", record, args.sample, rng)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"corpus_mb": corpus_mb, "raw_text_mchars": raw_mb, "packages": packages, "tasks": args.tasks,
              "tokens_out": tokens_out, "tokenizer_seconds": tokenizer_seconds, "one_worker": one["stages"],
              "two_workers": two["stages"], "one_worker_wall": one["wall"], "two_workers_wall": two["wall"],
              "identical_shards_1w_2w": identical, "cache_seconds": cache_seconds, "cache_tokens": cache_tokens,
              "quality": q, "secrets": secrets, "uptime": uptime,
              "parallel_capacity": [capacity_before, capacity_after]}

    print(f"\n{uptime}")
    print(f"raw text {raw_mb:.1f} M characters (~MB), {tokens_out:,} tokens kept; tasks {args.tasks}; "
          f"shards identical for 1 and 2 workers: {identical}")
    print(f"{'stage':<12}{'1 worker s':>12}{'MB/s/core':>12}{'2 workers s':>13}{'speed-up':>10}")
    for stage in ("read", "bands", "cluster", "tokenizer", "tokenize", "merge"):
        a, b = one["stages"][stage], two["stages"][stage]
        rate = f"{raw_mb / a:.2f}" if stage in ("read", "tokenize") else "-"
        print(f"{stage:<12}{a:>12.1f}{rate:>12}{b:>13.1f}{a / max(b, 1e-9):>9.2f}x")
    e1 = sum(one["stages"].values())
    e2 = sum(two["stages"].values())
    print(f"{'end to end':<12}{e1:>12.1f}{raw_mb / e1:>12.2f}{e2:>13.1f}{e1 / e2:>9.2f}x  "
          f"({tokens_out / e1:,.0f} tokens/s with 1 worker)")
    print(f"control: 2 busy processes vs 1 on this machine, before / after the runs: {capacity_before:.2f}x / "
          f"{capacity_after:.2f}x (2.0 = two free cores)")
    print(f"tokenizer training (once, 5 M chars, vocab {config.tokenizer.vocab_size}): {tokenizer_seconds:.1f} s")
    print(f"tokenization alone (the old token cache's work, no filters or dedup, 1 core): {cache_seconds:.1f} s, "
          f"{raw_mb / cache_seconds:.2f} MB/s, {cache_tokens / cache_seconds:,.0f} tokens/s")
    print(f"planted exact duplicates removed: {q['exact_removed']}/{q['planted_exact']}; near "
          f"(Jaccard >= {q['planted_near_min_jaccard']:.2f}): {q['near_removed']}/{q['planted_near']}; "
          f"HumanEval solutions + infilling middles: {q['leaks_removed']}/{q['planted_leaks']}")
    print(f"removed near-duplicates checked by exact 5-gram Jaccard: {q['near_checked']}, below 0.6: "
          f"{q['near_false_positives']} (lowest {q['near_checked_min_jaccard']})")
    print(f"removed by reason: {json.dumps(q['removed_by_reason'])}")
    print_secrets(secrets)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
