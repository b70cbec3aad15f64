"""docs/lessons.md from the study's finished runs: the table (mean and spread over seeds), the plots of held-out
loss against training tokens, and for each of the paper's four lessons a sentence, with its numbers, on
whether this scale reproduces its direction.

A difference between two arms counts as *clear* only when it is larger than the spread between seeds
(max - min) of either arm; otherwise it is reported as within seed noise. The verdict rules are written next
to each lesson in the report, so a rerun with different numbers gets the verdict its numbers support.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

METRICS = {  # key: (label, lower is better)
    "code": ("held-out code loss", True),
    "code_completion": ("code completion loss (2nd half given 1st)", True),
    "nl": ("held-out prose loss", True),
    "infill_loss": ("infill loss (line + <eom>)", True),
    "infill_em": ("infill exact match", False),
}


@dataclass
class ArmResult:
    name: str
    description: str
    runs: list[dict] = field(default_factory=list)  # one per seed: metric -> value, plus "curve" and "seed"

    def values(self, metric: str) -> list[float]:
        return [r[metric] for r in self.runs if r.get(metric) is not None]

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return statistics.fmean(values) if values else float("nan")

    def spread(self, metric: str) -> float:
        values = self.values(metric)
        return max(values) - min(values) if len(values) > 1 else 0.0


def read_curve(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """(tokens, held-out code loss, held-out prose loss) at every in-training evaluation."""
    curve = []
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return curve
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval_code_loss" in record or "eval_nl_loss" in record:
            curve.append((record["tokens"], record.get("eval_code_loss"), record.get("eval_nl_loss")))
    by_tokens = dict((t, (t, c, n)) for t, c, n in curve)  # a resumed run may log a step twice: keep the last
    return [by_tokens[t] for t in sorted(by_tokens)]


ORDER = ["causal_decoder", "prefix_lm", "causal_only", "span_only", "fim", "code_only", "prose_only", "llama"]


def collect(root: Path, arms: list[tuple[str, str]], seeds: list[int]) -> list[ArmResult]:
    """Finished runs per arm, arms in the order of the lessons (unknown arms last)."""
    results = []
    arms = sorted(arms, key=lambda a: ORDER.index(a[0]) if a[0] in ORDER else len(ORDER))
    for name, description in arms:
        arm = ArmResult(name, description)
        for seed in seeds:
            run_dir = root / f"{name}-seed{seed}"
            path = run_dir / "eval.json"
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            arm.runs.append({
                "seed": seed,
                "code": data.get("code", {}).get("loss"),
                "code_completion": data.get("code_completion", {}).get("loss"),
                "nl": data.get("nl", {}).get("loss"),
                "infill_loss": data.get("infill_loss", {}).get("loss"),
                "infill_em": data.get("infill", {}).get("exact_match"),
                "infill_format": data.get("infill", {}).get("format", "codegen2"),
                "infill_tasks": data.get("infill", {}).get("tasks", 0),
                "code_tokens": data.get("code", {}).get("tokens", 0),
                "nl_tokens": data.get("nl", {}).get("tokens", 0),
                "curve": read_curve(run_dir),
                "timing": data.get("timing", {}),
            })
        if arm.runs:
            results.append(arm)
    return results


def fmt_cell(arm: ArmResult, metric: str) -> str:
    values = arm.values(metric)
    if not values:
        return "–"
    if metric == "infill_em":
        text = f"{100 * arm.mean(metric):.1f}%"
        return text + (f" ({100 * min(values):.1f}–{100 * max(values):.1f})" if len(values) > 1 else "")
    text = f"{arm.mean(metric):.3f}"
    return text + (f" ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 else "")


def table(results: list[ArmResult]) -> str:
    head = "| arm | what it trains | seeds | " + " | ".join(label for label, _ in METRICS.values()) + " |"
    rows = [head, "|" + "---|" * (3 + len(METRICS))]
    for arm in results:
        formats = sorted({r["infill_format"] for r in arm.runs})
        cells = [fmt_cell(arm, m) for m in METRICS]
        cells[list(METRICS).index("infill_loss")] += f" [{'/'.join(formats)}]"
        rows.append(f"| `{arm.name}` | {arm.description} | {len(arm.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def compare(a: ArmResult, b: ArmResult, metric: str) -> tuple[float, bool]:
    """(mean of a - mean of b, whether the difference is larger than either arm's seed spread)."""
    diff = a.mean(metric) - b.mean(metric)
    return diff, abs(diff) > max(a.spread(metric), b.spread(metric))


def describe(a: ArmResult, b: ArmResult, metric: str) -> str:
    diff, clear = compare(a, b, metric)
    label = METRICS[metric][0]
    if metric == "infill_em":
        numbers = f"{100 * a.mean(metric):.1f}% vs {100 * b.mean(metric):.1f}%"
    else:
        numbers = f"{a.mean(metric):.3f} vs {b.mean(metric):.3f} (difference {diff:+.3f})"
    noise = max(a.spread(metric), b.spread(metric))
    noise_text = f"{100 * noise:.1f} points" if metric == "infill_em" else f"{noise:.3f}"
    return (f"{label} `{a.name}` {numbers}, {'clear' if clear else 'within seed noise'} "
            f"(largest seed spread {noise_text})")


def lesson_sentences(by_name: dict[str, ArmResult]) -> dict[int, str]:
    """One verdict per lesson whose arms all finished, from the rules stated in the report."""
    verdicts = (_lesson_1(by_name), _lesson_2(by_name), _lesson_3(by_name), _lesson_4(by_name),
                _architecture_check(by_name))
    return {number: text for number, text in enumerate(verdicts, start=1) if text is not None}


def _lesson_1(by_name: dict[str, ArmResult]) -> str | None:
    """Lesson 1: a prefix-LM against the causal decoder, on every held-out code metric."""
    base, prefix = by_name.get("causal_decoder"), by_name.get("prefix_lm")
    if not (base and prefix):
        return None
    metrics = [m for m in ("code", "code_completion", "nl", "infill_loss") if prefix.values(m) and base.values(m)]
    clear = {m: compare(prefix, base, m) for m in metrics if m != "nl"}  # metric -> (difference, clear?)
    better = [m for m, (diff, is_clear) in clear.items() if is_clear and diff < 0]
    worse = [m for m, (diff, is_clear) in clear.items() if is_clear and diff > 0]
    if better:
        names = " and ".join(METRICS[m][0] for m in better)
        verdict = "does not reproduce: the prefix-LM is clearly better on " + names
    elif len(worse) == len(clear):
        verdict = ("reproduces, more strongly than the paper puts it: the prefix-LM is clearly worse on every "
                   "held-out code metric")
    else:
        verdict = "reproduces: the prefix-LM shows no clear gain over the causal decoder"
    return (f"**Lesson 1 {verdict}.** " + "; ".join(describe(prefix, base, m) + " vs `causal_decoder`"
                                                  for m in metrics) + ".")


def _lesson_2(by_name: dict[str, ArmResult]) -> str | None:
    """Lesson 2: what span corruption costs left to right, and what it buys for infilling."""
    base, causal = by_name.get("causal_decoder"), by_name.get("causal_only")
    if not (base and causal):
        return None
    diff, clear = compare(base, causal, "code")
    infill_diff, infill_clear = compare(base, causal, "infill_loss")
    costs = diff > 0 and clear
    verdict = ("reproduces: adding span corruption clearly costs left-to-right loss" if costs else
               "does not reproduce clearly: the left-to-right cost of span corruption is within seed noise"
               if diff > 0 else "does not reproduce: the 50/50 mixture is no worse left to right")
    extra = ""
    fim = by_name.get("fim")
    if fim:
        extra = "; with FIM instead, " + describe(fim, causal, "code") + " vs `causal_only`"
    return (f"**Lesson 2 {verdict}.** " + describe(base, causal, "code") + " vs `causal_only`" + extra
            + f"; what it buys: {describe(base, causal, 'infill_loss')} vs `causal_only`"
            + f" and infill exact match {100 * base.mean('infill_em'):.1f}% vs "
            f"{100 * causal.mean('infill_em'):.1f}%.")


def _lesson_3(by_name: dict[str, ArmResult]) -> str | None:
    """Lesson 3: how much of each single-objective arm's skill the 50/50 mixture keeps."""
    base, causal, span = by_name.get("causal_decoder"), by_name.get("causal_only"), by_name.get("span_only")
    if not (base and causal and span):
        return None
    left = _recovered(span, causal, base, "code")  # span-only is the worst left to right, causal-only the best
    infill = _recovered(causal, span, base, "infill_loss")  # and the other way round for infilling
    enough = left >= 0.5 and infill >= 0.5
    verdict = ("reproduces: the 50/50 mixture keeps most of both skills" if enough else
               "does not reproduce: the 50/50 mixture gives up more than half of one skill")
    text = (f"**Lesson 3 {verdict}.** Of the gap between the single-objective arms, `causal_decoder` keeps "
            f"{100 * left:.0f}% of `causal_only`'s advantage in left-to-right code loss "
            f"({causal.mean('code'):.3f} / {base.mean('code'):.3f} / {span.mean('code'):.3f} for causal-only / "
            f"50-50 / span-only) and {100 * infill:.0f}% of `span_only`'s advantage in infill loss "
            f"({causal.mean('infill_loss'):.3f} / {base.mean('infill_loss'):.3f} / {span.mean('infill_loss'):.3f})")
    fim = by_name.get("fim")
    if fim:
        text += (f"; 50% FIM, scored in its own PSM format: code loss {fim.mean('code'):.3f}, infill loss "
                 f"{fim.mean('infill_loss'):.3f}, exact match {100 * fim.mean('infill_em'):.1f}% "
                 f"(50/50 span: {100 * base.mean('infill_em'):.1f}%)")
    return text + "."


def _lesson_4(by_name: dict[str, ArmResult]) -> str | None:
    """Lesson 4: the code + prose mixture against code-only and prose-only data."""
    base, code, prose = by_name.get("causal_decoder"), by_name.get("code_only"), by_name.get("prose_only")
    if not (base and code and prose):
        return None
    close = _recovered(prose, code, base, "code")
    diff, clear = compare(base, code, "code")
    prose_gain = code.mean("nl") - base.mean("nl")
    reproduces = close >= 0.75 and prose_gain > 0
    verdict = ("reproduces: the code + prose mixture is " + ("even better than" if close > 1 and clear else
                                                               "close to")
               + " code-only on code and far better than the mismatched prose-only model"
               if reproduces else "does not reproduce")
    return (f"**Lesson 4 {verdict}.** Held-out code loss: code-only {code.mean('code'):.3f}, mixture "
            f"{base.mean('code'):.3f}, prose-only {prose.mean('code'):.3f}: the mixture closes "
            f"{100 * close:.0f}% of the gap from prose-only to code-only (mixture vs code-only "
            f"{diff:+.3f}, {'clear' if clear else 'within seed noise'}); on prose, the mixture scores "
            f"{base.mean('nl'):.3f} vs code-only {code.mean('nl'):.3f} and prose-only {prose.mean('nl'):.3f}.")


def _architecture_check(by_name: dict[str, ArmResult]) -> str | None:
    """The architecture check: the LLaMA block against the CodeGen block on the same recipe."""
    base, llama = by_name.get("causal_decoder"), by_name.get("llama")
    if not (base and llama):
        return None
    metrics = [m for m in ("code", "nl", "infill_loss") if llama.values(m) and base.values(m)]
    worse = [m for m in metrics if compare(llama, base, m)[1] and compare(llama, base, m)[0] > 0]
    verdict = ("holds: the LLaMA block learns the recipe no worse than the CodeGen block" if not worse else
               "does not hold: the LLaMA block is clearly worse on " + " and ".join(METRICS[m][0] for m in worse))
    return (f"**The architecture check {verdict}.** "
            + "; ".join(describe(llama, base, m) + " vs `causal_decoder`" for m in metrics) + ".")


def _recovered(worst: ArmResult, best: ArmResult, middle: ArmResult, metric: str) -> float:
    """How much of the gap from `worst` to `best` `middle` closes (1 = as good as best, 0 = as bad as worst)."""
    gap = worst.mean(metric) - best.mean(metric)
    return (worst.mean(metric) - middle.mean(metric)) / gap if gap else 1.0


def mean_curve(arm: ArmResult, index: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """Tokens, mean, min and max over seeds of curve column `index` (1 = code, 2 = prose)."""
    per_tokens: dict[int, list[float]] = {}
    for run in arm.runs:
        for point in run["curve"]:
            if point[index] is not None:
                per_tokens.setdefault(point[0], []).append(point[index])
    tokens = sorted(t for t, v in per_tokens.items() if len(v) == len(arm.runs))
    return (tokens, [statistics.fmean(per_tokens[t]) for t in tokens], [min(per_tokens[t]) for t in tokens],
            [max(per_tokens[t]) for t in tokens])


PLOTS = [  # file, title, arms, curve columns
    ("lesson1_architecture.png", "Lesson 1: causal decoder vs prefix-LM", ["causal_decoder", "prefix_lm"], [1]),
    ("lesson2_3_objectives.png", "Lessons 2 and 3: objectives",
     ["causal_only", "causal_decoder", "span_only", "fim"], [1]),
    ("lesson4_data.png", "Lesson 4: data mixture", ["code_only", "causal_decoder", "prose_only"], [1, 2]),
    ("architecture.png", "Architecture: CodeGen vs LLaMA block", ["causal_decoder", "llama"], [1, 2]),
]


def write_plots(results: list[ArmResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {a.name: a for a in results}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, names, columns in PLOTS:
        arms = [by_name[n] for n in names if n in by_name]
        if not arms:
            continue
        fig, axes = plt.subplots(1, len(columns), figsize=(6.5 * len(columns), 4.2), squeeze=False)
        for ax, column in zip(axes[0], columns):
            for arm in arms:
                tokens, mean, low, high = mean_curve(arm, column)
                if not tokens:
                    continue
                millions = [t / 1e6 for t in tokens]
                ax.plot(millions, mean, marker="o", markersize=3, label=arm.name)
                ax.fill_between(millions, low, high, alpha=0.2)
            kind = "code" if column == 1 else "prose"
            ax.set(xlabel="training tokens (millions)", ylabel=f"held-out {kind} loss (nats/token)",
                   title=f"{title}: {kind}" if len(columns) > 1 else title)
            ax.grid(alpha=0.3)
            ax.legend()
            # The first evaluations sit far above the rest; start the axis where the arms separate.
            tail = [v for arm in arms for v in mean_curve(arm, column)[1][1:]]
            if tail:
                ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    arms = [a for a in results if a.values("infill_loss")]
    if arms:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        means = [a.mean("infill_loss") for a in arms]
        errors = [[m - min(a.values("infill_loss")) for a, m in zip(arms, means)],
                  [max(a.values("infill_loss")) - m for a, m in zip(arms, means)]]
        ax.bar(range(len(arms)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(arms)), [a.name for a in arms], rotation=20)
        ax.set(ylabel="infill loss, nats/token (lower is better)",
               title="Single-line infill loss on held-out code (bars: mean; whiskers: seed min-max)")
        ax.set_ylim(min(means) - 0.5, max(means) + 0.3)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = out_dir / "infill_loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _run_shape(config_path: Path) -> str:
    """The model and budget of a finished run, in words, from its saved config."""
    import tomllib

    c = tomllib.loads(config_path.read_text(encoding="utf-8"))
    m, t = c["model"], c["train"]
    tokens = t["max_steps"] * t["micro_batch_size"] * t.get("grad_accum", 1) * t["seq_len"]
    return (f"{m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads, vocabulary {m['vocab_size']}; "
            f"sequences of {t['seq_len']} tokens, batch {t['micro_batch_size'] * t.get('grad_accum', 1)}, "
            f"{t['max_steps']} steps = {tokens:,} training tokens per run, peak lr {t['lr']:g} after "
            f"{t['warmup_steps']} warm-up steps, cosine decay")


RULES = {  # lesson -> the claim and the rule that decides it
    1: "(1) A prefix-LM brings no clear gain over a causal decoder. Rule: reproduces unless `prefix_lm` is "
       "clearly better on left-to-right code loss, code completion loss (where it reads the first half of each "
       "window bidirectionally, as it was trained to) or infill loss.",
    2: "(2) Infilling is not a free lunch. Rule: reproduces if the 50/50 arm's left-to-right code loss is "
       "clearly worse than `causal_only`'s.",
    3: "(3) A 50/50 mix of causal LM and span corruption is enough. Rule: reproduces if `causal_decoder` keeps "
       "at least half of `causal_only`'s advantage in code loss and half of `span_only`'s in infill loss.",
    4: "(4) Mixing natural language with code is promising. Rule: reproduces if the mixture closes at least "
       "75% of the code-loss gap from prose-only to code-only while beating code-only on prose.",
    5: "(5) Not a paper lesson: the recipe does not depend on the CodeGen block. Rule: holds unless the `llama` "
       "arm (llama-tiny's block, the same number of weights and tokens) is clearly worse than `causal_decoder` "
       "on held-out code loss, prose loss or infill loss.",
}
IMAGES = {1: "lesson1_architecture.png", 2: "lesson2_3_objectives.png", 3: "infill_loss.png",  # lesson -> plot
          4: "lesson4_data.png", 5: "architecture.png"}


def write_report(root: Path, arms: list[tuple[str, str]], seeds: list[int], doc: Path, plots_dir: Path,
                 command: str) -> str:
    """docs/lessons.md from the finished runs in `root`: setup, table, one verdict per lesson and the plots."""
    results = collect(root, arms, seeds)
    if not results:
        raise SystemExit(f"error: no finished runs in {root} (run the study first)")
    plots = write_plots(results, plots_dir)
    lines = _setup_lines(root, results, seeds, command)
    sentences = lesson_sentences({a.name: a for a in results})
    for number in (1, 2, 3, 4, 5):
        lines += [RULES[number], "", sentences.get(number, "_Not all arms of this lesson have finished._"), ""]
        image = plots_dir / IMAGES.get(number, "")
        if number in IMAGES and any(p.name == image.name for p in plots):
            rel = Path(os.path.relpath(image.resolve(), doc.resolve().parent))
            what = "single-line infill loss per arm" if number == 3 else "held-out loss against training tokens"
            lines += [f"![{RULES[number][:3]} {what}]({rel.as_posix()})", ""]
    notes_path = Path(__file__).resolve().parent / "notes.md"
    if notes_path.is_file():
        lines += ["## Reading the results", "", notes_path.read_text(encoding="utf-8").strip(), ""]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    return text


def _setup_lines(root: Path, results: list[ArmResult], seeds: list[int], command: str) -> list[str]:
    """The report up to the lessons: what was run, on what machine, and the results table."""
    study = json.loads((root / "study.json").read_text()) if (root / "study.json").is_file() else {}
    sessions = study.get("sessions", [study] if "wall_s" in study else [])  # (one-session layout of earlier versions)
    run = results[0].runs[0]
    shape = _run_shape(root / f"{results[0].name}-seed{run['seed']}" / "config.toml")
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "?"
    return [
        "# The CodeGen2 lessons at small scale",
        "",
        "The paper's four lessons, each tested by training small models that differ in one thing only, at equal",
        "token budgets, on the embedded corpus (Python standard library code + prose shipped with Python). This",
        "page is written by the study's command; rerunning it reproduces the runs, the table and the plots.",
        "",
        "```",
        command,
        "```",
        "",
        f"Setup: `experiments/lessons/common.toml` ({shape}), one arm file per row in `experiments/lessons/arms/`. "
        f"Seeds {', '.join(map(str, seeds))} "
        f"(the seed sets initialisation, data order and objective draws). One shared tokenizer, so every loss is "
        f"in nats per token of the same vocabulary. Held-out metrics on the 5% of files never trained on: "
        f"left-to-right loss on {run['code_tokens']:,} code and {run['nl_tokens']:,} prose tokens; "
        f"{run['infill_tasks']} single lines masked in held-out code, filled greedily (exact match) and scored "
        f"as the cross-entropy of the line and its end-of-middle token (infill loss). Each arm is scored in the "
        f"infill format it trained (`[codegen2]` sentinels, or `[fim]` PSM); `causal_only` never saw either.",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, one thread per run, "
        f"{sessions[-1]['jobs'] if sessions else '?'} runs side by side; torch {torch_version}; "
        f"{date.today().isoformat()}."
        + (f" Wall time of the whole study: {sum(s['wall_s'] for s in sessions) / 60:.0f} minutes"
           f"{f' (in {len(sessions)} sessions)' if len(sessions) > 1 else ''}." if sessions else ""),
        "",
        "## Results (mean over seeds, min–max in brackets)",
        "",
        table(results),
        "",
        "A difference counts as *clear* when it is larger than the spread between seeds of either arm.",
        "",
        "## The lessons",
        "",
    ]
