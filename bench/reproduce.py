"""Reproduce the seed's findings in miniature: word vs char, pretrained vs scratch.

On the demo corpus and the six stand-in tasks, for each size asked (tiny by default):
1. a word tokenizer (spm unigram) and a char tokenizer (every character a token, same
   special ids), both packed into seq-128 rows by the same Ray Data pipeline: chars per
   token and rows per corpus (the seed's "faster" claim: fewer, fuller rows);
2. a word model and a char model pretrained with equal compute (same steps × global batch
   × seq length) through the same Ray Train + DeepSpeed job, every checkpoint kept (~6);
3. each fine-tuned on all six tasks by the same Ray Tune sweep (a reduced grid, the same
   for every row, stated in the report) with several seeds, beside a from-scratch model of
   the same size (word vocabulary, random weights) as the floor; mean ± sd over seeds of
   the best-dev config. Twice: on --max-train examples per task, and on --low-data (a few
   hundred, where pretraining should matter most);
4. per task, word vs char and pretrained vs scratch: 'better' / 'worse' only beyond the
   seeds' spread (the means differ by more than the two sds together), else 'tie';
5. where word pretraining does not beat scratch (full data), the downstream probe
   (wr_train.probe, demo-tiny's sizing) of every kept word checkpoint on that task, with
   scratch as step 0: the curve says whether more pretraining would likely help;
6. writes bench/REPRODUCE.md (+ bench/reproduce_loss.png): the seed's table layout with
   our rows, the chars/token lines, the loss curves and every setting, so anyone can rerun it.

    python bench/reproduce.py                      # tiny, ~4 h on a 2-core CPU (see below)
    python bench/reproduce.py --sizes tiny,mini    # adds mini (about 3x tiny's pretraining)
    python bench/reproduce.py --quick              # a few-minute smoke run (not a result)

Time, measured for tiny on 2 cores without AMX (fp32, 2026-12-07, `--steps 7200 --max-train
1000 --max-eval 500`: 132 min): pretraining word ~3.2 steps/s (7,200 steps 38 min), char
~5 steps/s (24 min); the full-data sweeps (3 lrs × 3 seeds × 6 tasks) 14-16 min per model,
the 300-example ones ~6.5, the probes 4 min for two tasks. The defaults (14,400 steps, 2,000
train and 1,000 dev examples; the first sweep ran at ~35 s a trial) come to ~4 h; bf16 on
an AMX CPU pretrains ~1.3x faster.

Every stage is skipped when its output exists under --work (default ~/.cache/wr-train/
reproduce), so an interrupted run resumes. Findings are computed from the numbers, not
written in advance: the report says where word does not beat char or pretraining does not
beat scratch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUILT: set[str] = set()  # stages that did their work in this invocation (not reused)
TASKS = ["douban", "chnsenticorp", "lcqmc", "tnews", "iflytek", "ocnli"]
HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_chars(corpus_dir: Path) -> int:
    """Characters of text (stripped non-empty lines), what both tokenizers segment."""
    n = 0
    for path in sorted(corpus_dir.glob("*.txt")):
        with open(path, encoding="utf-8") as f:
            n += sum(len(s) for s in map(str.strip, f) if s)
    return n


def build_tokenizers(work: Path, corpus: str, word_vocab: int) -> dict[str, Path]:
    from wr_train.tokenizer import train_spm
    out = {}
    for kind in ("word", "char"):
        d = work / f"spm-{kind}"
        if not (d / "meta.json").exists():
            log(f"training the {kind} tokenizer")
            # char: a soft limit; the vocabulary is every character kept by the coverage
            train_spm([corpus], str(d), word_vocab if kind == "word" else 12_000,
                      char=kind == "char", input_sentence_size=300_000, log=log)
            BUILT.add("tokenizers")
        out[kind] = d
    return out


def build_shards(work: Path, corpus: str, spms: dict[str, Path], seq: int) -> dict[str, dict]:
    from wr_train.preprocess import preprocess
    from wr_train.shards import load_manifest
    out = {}
    for kind, spm_dir in spms.items():
        d = work / f"shards-{kind}-{seq}"
        if not (d / "manifest.json").exists():
            log(f"packing the corpus with the {kind} tokenizer (seq {seq})")
            preprocess([corpus], str(spm_dir), str(d), seq_length=seq, log=log)
            BUILT.add("preprocess")
        out[kind] = {"dir": d, "manifest": load_manifest(str(d))}
    return out


INITS = {  # how a model starts: BERT's, or demo-tiny's (head bias at the log frequencies, sin/cos positions)
    "bert": ["model.output_bias=zero", "model.position_init=normal"],
    "demo": ["model.output_bias=unigram", "model.position_init=sinusoidal"],
}


def pretrain_model(work: Path, kind: str, size: str, shards: Path, steps: int, batch: int,
                   lr: float, workers: int, precision: str, init: str,
                   mask_prob: float) -> tuple[Path, list[dict]]:
    """Pretrain through wr-train's Ray Train job and export; (HF dir, metrics rows)."""
    from wr_train import pretrain
    from wr_train.checkpoint import read_history
    from wr_train.config import load_config
    from wr_train.export import export_checkpoint
    hf = work / f"hf-{kind}-{size}"
    run_name = f"{kind}-{size}"
    every = max(1, steps // 6)  # ~6 checkpoints, all kept: the probe's curve reads them
    if not (hf / "model.safetensors").exists():
        log(f"pretraining {run_name}: {steps} steps × batch {batch} on {shards.name}")
        cfg = load_config("demo-tiny", [
            f"storage={work / 'runs'}", f"name={run_name}", f"model.size={size}",
            f"workers={workers}", f"checkpoint_every={every}", f"keep_checkpoints={steps // every + 1}",
            f"report_every={max(25, steps // 240)}",
            f"stages.0.shards={shards}", f"stages.0.steps={steps}",
            f"stages.0.global_batch={batch}", f"stages.0.micro_batch={batch // workers}",
            f"stages.0.lr={lr}", f"mask.prob={mask_prob}", f"precision={precision}", *INITS[init]])
        last = pretrain.run(cfg.validate(), log=log)
        export_checkpoint(last, str(hf), log=log)
        BUILT.add(f"pretrain-{kind}-{size}")
    return hf, read_history(str(work / "runs" / run_name))


def scratch_model(work: Path, size: str, spm_dir: Path) -> Path:
    """Random weights of the same size with the word tokenizer: the no-pretraining floor."""
    from wr_train.config import ModelConfig
    from wr_train.export import save_hf_model
    from wr_train.model import build_mlm
    from wr_train.tokenizer import load_spm
    hf = work / f"hf-scratch-{size}"
    if not (hf / "model.safetensors").exists():
        vocab = load_spm(str(spm_dir)).get_piece_size()
        save_hf_model(build_mlm(ModelConfig(size=size), vocab, seed=0), str(spm_dir / "spm.model"), str(hf))
    return hf


def sweep(work: Path, stage: str, name: str, model: Path, data: str, grid: dict, seeds: int) -> dict:
    """Tune sweep `name` over the six tasks; task -> per-seed dev/test of the best-dev
    configuration. A sweep found under `work` runs only its missing trials."""
    from wr_train.tune import SweepConfig, run_sweep
    from wr_train.tune_report import per_seed_scores
    log(f"fine-tuning {name} on {len(TASKS)} tasks × {seeds} seeds, {grid['max_train']:,} train examples (Ray Tune)")
    report = run_sweep(SweepConfig(str(model), TASKS, data, storage=str(work / "sweeps"), name=name,
                                   epochs=grid["epochs"], batch_sizes=grid["batch_sizes"], lrs=grid["lrs"],
                                   seeds=seeds, max_train_examples=grid["max_train"],
                                   max_eval_examples=grid["max_eval"], save_best=False,
                                   cpus_per_trial=1.0, model_name=name), log=log)
    if report["trials_run"]:
        BUILT.add(stage)
    return per_seed_scores(report["sweep_dir"], report["best"], TASKS)


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, sd = mean_sd(values)
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def loss_plot(curves: dict[str, list[dict]], path: Path, floors: dict[str, float] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        evals = [r for r in rows if "eval_loss" in r]
        line, = ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=f"{label} held-out")
        if floors and label in floors:
            ax.axhline(floors[label], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{label} unigram floor")
    ax.set_xlabel("step (equal compute: same steps × batch × seq 128)")
    ax.set_ylabel("held-out MLM loss (nats)")
    ax.set_title("Pretraining loss on the demo corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VERDICT_RULE = ("'better' / 'worse' only when the means differ by more than the seeds' spread, "
                "sd(a) + sd(b) (and at least 0.5 points); otherwise 'tie'")


def compare(a: list[float], b: list[float]) -> str:
    """a vs b by VERDICT_RULE; 'n/a' when either has no scores."""
    if not a or not b:
        return "n/a"
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    if abs(ma - mb) <= max(sa + sb, 0.005):
        return "tie"
    return "better" if ma > mb else "worse"


def dev_scores(results: dict, kind: str, size: str, task: str) -> list[float]:
    """The per-seed dev accuracies of kind-size's best configuration on `task` ([] if none)."""
    return results.get((kind, size), {}).get(task, {}).get("dev", [])


def verdict(results: dict, size: str, task: str, a: str, b: str) -> str:
    return compare(dev_scores(results, a, size, task), dev_scores(results, b, size, task))


def score(r: dict) -> float:
    means = [mean_sd(r[t]["dev"])[0] for t in TASKS if t in r]
    return 100 * statistics.fmean(means) if means else float("nan")


# ---------------------------------------------------------------- the probe's curve

# demo-tiny's probe (wr_train/recipes/demo-tiny.yaml): a tiny model needs lr 1e-3, 3 epochs
PROBE_SIZING = {"train_examples": 1000, "eval_examples": 500, "epochs": 3, "lrs": "1e-3"}
QUICK_PROBE_SIZING = {"train_examples": 100, "eval_examples": 100, "epochs": 1, "lrs": "1e-3"}
SHORT_TEXT_CHARS = 90  # fits seq 64: ~60 word tokens at ~1.5 characters each, beside [CLS] [SEP]


def probe_seq(task) -> int:
    """64 for a single-text task whose texts are short (90% at most SHORT_TEXT_CHARS
    characters), as the demo's probe; 128 (the sweep's) for sentence pairs and long texts."""
    lengths = sorted(len(ex.text_a) for ex in task.train)
    short = bool(lengths) and lengths[int(0.9 * (len(lengths) - 1))] <= SHORT_TEXT_CHARS
    return 64 if task.kind == "single" and short else 128


def probe_curves(work: Path, size: str, tasks: list[str], data: str, sizing: dict,
                 scratch_hf: Path) -> dict[str, list[dict]]:
    """task -> the probe's points, oldest first: scratch as step 0, then every kept checkpoint
    of word-{size}. Each point is probed once and kept in work/probes-word-{size}.json
    (dropped when the sizing changes)."""
    from wr_train.checkpoint import complete_checkpoints
    from wr_train.config import ProbeConfig
    from wr_train.probe import capped_task, probe_checkpoint, probe_hf
    path = work / f"probes-word-{size}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("sizing") != sizing:
        cached = {"sizing": sizing, "tasks": {}}
    ckpts = sorted(complete_checkpoints(str(work / "runs" / f"word-{size}"), log=log), key=lambda c: c[1]["step"])
    sources = [(0, str(scratch_hf))] + [(state["step"], ckpt) for ckpt, state in ckpts]
    log(f"probe: scratch and {len(ckpts)} kept checkpoint(s) of word-{size} on {', '.join(tasks) or 'no task'}")
    out = {}
    for name in tasks:
        cfg = ProbeConfig(task=name, data=data, cpus=float(os.cpu_count() or 1), **sizing)  # cpus: its threads
        task = capped_task(cfg)
        cfg = dataclasses.replace(cfg, seq_length=probe_seq(task))
        points = cached["tasks"].setdefault(name, {})
        for step, source in sources:
            if str(step) not in points:
                log(f"probing word-{size} at step {step} on {name} (seq {cfg.seq_length})")
                result = probe_checkpoint(source, task, cfg) if step else {"step": 0, **probe_hf(source, task, cfg)}
                points[str(step)] = {**result, "probe_seq": cfg.seq_length, "probe_dev_examples": len(task.dev)}
                path.write_text(json.dumps(cached, indent=1))
                BUILT.add(f"probe-word-{size}")
        out[name] = [points[str(step)] for step, _ in sources]
    return out


def noise_margin(points: list[dict]) -> float:
    """A probe's change that counts: 1/sqrt(n), two standard errors of an accuracy near 50%
    on its n dev examples (4.5 points at 500)."""
    return 1 / math.sqrt(points[0]["probe_dev_examples"])


def curve_reading(points: list[dict]) -> str:
    """What a probe's curve (scratch = step 0, then the checkpoints) says, from its numbers."""
    steps, accs = [p["step"] for p in points], [p["probe_acc"] for p in points]
    floor, margin, best = points[0]["probe_floor"], noise_margin(points), max(accs)
    if best <= floor + margin:
        return (f"at the majority share throughout (best {100 * best:.1f} vs {100 * floor:.1f}): the task "
                "is beyond a model this size at this data size")
    if len(accs) > 1 and accs[-1] > max(accs[:-1]) + margin:
        return (f"rising at the last checkpoint ({100 * accs[-1]:.1f} vs at most {100 * max(accs[:-1]):.1f} "
                "before): more pretraining would likely help")
    if accs[-1] < best - margin:
        return (f"peaked at step {steps[accs.index(best)]:,} ({100 * best:.1f}), {100 * accs[-1]:.1f} at the "
                "last checkpoint: later pretraining moved away from what this task needs")
    flat = next(i for i in range(len(accs)) if all(abs(a - accs[-1]) <= margin for a in accs[i:]))
    return (f"flat from step {steps[flat]:,} ({100 * accs[flat]:.1f}, the last {100 * accs[-1]:.1f}): the "
            "model's pretraining " + ("after that " if flat else "") + "does not reach this task")


def probe_section(probes: dict[str, dict], sizing: dict) -> list[str]:
    """Per size, the probed tasks × checkpoint step table with each curve's reading."""
    lines = ["## 4. Where word pretraining does not beat scratch: the probe's curve", ""]
    if not any(probes.values()):
        return lines + ["Word pretraining beat scratch on every task with full data (or no size "
                        "ran): nothing to probe.", ""]
    lines += [f"For each task where the word model does not beat scratch with full data (section 3's "
              f"rule), each of its kept checkpoints fine-tuned briefly (wr_train.probe, demo-tiny's "
              f"sizing): a fixed random {sizing['train_examples']:,} train examples, the first "
              f"{sizing['eval_examples']:,} dev examples, {sizing['epochs']} epoch(s), lr {sizing['lrs']}, "
              f"one seed; seq 64 for single-text tasks whose texts are short (90% at most "
              f"{SHORT_TEXT_CHARS} characters), 128 for pairs and long texts. Step 0 is the scratch "
              "model (random weights of the same size). Cells: dev accuracy (%). A change counts "
              "when larger than 1/√n, two standard errors of an accuracy near 50% on the n dev examples.", ""]
    for size, curves in probes.items():
        if not curves:
            continue
        steps = [p["step"] for p in next(iter(curves.values()))]
        lines += [f"### {size}", "", "| task | seq | majority | " + " | ".join(
                      "0 (scratch)" if s == 0 else f"{s:,}" for s in steps) + " | reading |",
                  "|---|---|---|" + "---|" * len(steps) + "---|"]
        for task, points in curves.items():
            lines.append(f"| {task} | {points[0]['probe_seq']} | {100 * points[0]['probe_floor']:.1f} | " +
                         " | ".join(f"{100 * p['probe_acc']:.1f}" for p in points) +
                         f" | {curve_reading(points)} |")
        lines.append("")
    return lines


def pretraining_findings(args, size: str, results: dict, low_results: dict, curves: dict) -> list[str]:
    """Per task, whether word pretraining beats scratch (full data, low data), and where it
    does not with full data, what the probe's curve says."""
    lines = []
    for label, res in ((f"{args.max_train:,}", results), (f"{args.low_data:,}", low_results)):
        verdicts = {t: verdict(res, size, t, "word", "scratch") for t in TASKS}
        if all(v == "n/a" for v in verdicts.values()):
            continue
        lines.append(f"- {size}, {label} train examples: word pretraining beats scratch on "
                     f"{sum(v == 'better' for v in verdicts.values())} of {len(TASKS)} tasks — " +
                     ", ".join(f"{t} **{v}**" for t, v in verdicts.items()) + ".")
    if curves:
        lines.append(f"- {size}, where word does not beat scratch on {args.max_train:,} train examples, "
                     "the probe's curve (section 4):")
        lines += [f"  - {t}: {curve_reading(points)}." for t, points in curves.items()]
    return lines


def findings(args, results: dict, low_results: dict, probes: dict, pretrain_info: dict,
             vocab_ratio: float) -> list[str]:
    """The verdicts, computed from this run's numbers."""
    lines = ["## 5. Findings (computed from the tables above)", "",
             f"Per task, word vs scratch by the rule of section 3 ({VERDICT_RULE}):", ""]
    for size in args.sizes:
        lines += pretraining_findings(args, size, results, low_results, probes.get(size, {}))
    lines.append("")
    for size in args.sizes:
        w, c, s = (results.get((k, size)) for k in ("word", "char", "scratch"))
        if not (w and c and s):
            continue
        sw, sc, ss = score(w), score(c), score(s)
        lines.append(f"- {size}, {args.max_train:,} train examples: word {sw:.1f} vs char {sc:.1f} — word **{'beats' if sw > sc else 'does not beat'}** "
                     f"char here; pretrained word {sw:.1f} / char {sc:.1f} vs scratch {ss:.1f} — "
                     f"pretraining **{'helps' if min(sw, sc) > ss else 'does not clearly help' if max(sw, sc) > ss else 'does not help'}** "
                     "on the mean (per task: the comparison table).")
        for kind in ("word", "char"):
            info = pretrain_info[f"{kind}-{size}"]
            gap = info["floor_entropy"] - info["loss"]
            lines.append(f"- {kind}-{size} pretraining ended {gap:.2f} nats below its unigram floor "
                         f"(MLM acc {100 * info['acc']:.1f}% vs {100 * info['floor_top1']:.1f}% for always "
                         "guessing the commonest token)" +
                         (": it learned little beyond token frequencies, so fine-tuning starts from "
                          "nearly what scratch has." if gap < 0.5 else "."))
    near_floor = any(info["floor_entropy"] - info["loss"] < 0.5 for info in pretrain_info.values())
    lines += [] if not near_floor else [f"- Why, and what it would take: at equal compute the word model must learn a {vocab_ratio:.1f}× larger "
              "output vocabulary from fewer occurrences per type (each word type is seen far less "
              "often than each character), so in a budget this short it stays nearer its floor "
              "than the char model. The seed pretrains 1M steps × 512 rows on a corpus far larger "
              "than this ~9M-character demo corpus; its claims are about models that left the "
              "frequency floor long ago. To test them here, raise `--steps` (and the corpus) until "
              "the word model's loss is well below its floor. The word model's speed advantage "
              "(more text per row, section 1) holds regardless."]
    return lines + [""]


def eval_curve_table(curves: dict[str, list[dict]], pretrain_info: dict) -> list[str]:
    """The held-out evaluations along each run (the plot's points), as nats below its floor."""
    evals = {k: {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r} for k, rows in curves.items()}
    steps = sorted({s for e in evals.values() for s in e})
    lines = ["", "Along the way (held-out eval loss, nats below the model's floor in brackets):", "",
             "| model | " + " | ".join(f"{s:,}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for key, e in evals.items():
        floor = pretrain_info[key]["floor_entropy"]
        lines.append(f"| {key} | " + " | ".join(f"{e[s]:.3f} ({floor - e[s]:.2f})" if s in e else "–"
                                               for s in steps) + " |")
    return lines


KINDS = ("word", "char", "scratch")
PAIRS = (("word", "char"), ("word", "scratch"), ("char", "scratch"))


def dev_table(results: dict, size: str) -> list[str]:
    """The seed's layout: a row per model, a column per task, dev mean ± sd; the majority row."""
    lines = ["| Model | Score | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
    for kind in KINDS:
        r = results.get((kind, size))
        if r is not None:
            lines.append(f"| {kind}-{size} | {score(r):.1f} | " +
                         " | ".join(fmt(r[t]["dev"]) if t in r else "–" for t in TASKS) + " |")
    maj = results.get(("word", size), {})
    lines.append("| majority class | " + (f"{100 * statistics.fmean([maj[t]['majority'] for t in TASKS if t in maj]):.1f}"
                                        if maj else "–") + " | " +
                 " | ".join(f"{100 * maj[t]['majority']:.1f}" if t in maj else "–" for t in TASKS) + " |")
    return lines


def comparison_table(args, size: str, results: dict, low_results: dict) -> list[str]:
    """A row per task: each pair's verdict with full data, then with the low-data sweep."""
    sets = [("", results)] + ([(f" ({args.low_data:,} ex.)", low_results)] if args.low_data else [])
    heads = [f"{a} vs {b}{label}" for label, _ in sets for a, b in PAIRS]
    lines = ["| task | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for t in TASKS:
        lines.append(f"| {t} | " + " | ".join(verdict(res, size, t, a, b) for _, res in sets for a, b in PAIRS) + " |")
    return lines


def write_report(path: Path, args, grid: dict, tok_stats: dict, results: dict, low_results: dict,
                 probes: dict, probe_sizing: dict, curves: dict, curves_png: str, timings: dict,
                 pretrain_info: dict) -> None:
    command = " ".join(["python bench/reproduce.py", *sys.argv[1:]])  # as run, so it reruns as run
    lines = ["# Word vs char, pretrained vs scratch, in miniature", "",
             f"Written by `{command}`" +
             f" on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs, no GPU), in "
             f"{timings['total'] / 60:.0f} min of stage time (each stage's time from the run that "
             "built it; stages found under --work are reused). Every number below comes from that run.", "",
             "## 1. Tokens and rows (the \"faster\" claim)", "",
             "| tokenizer | vocab | corpus chars | text tokens | chars / token | seq-128 rows | pad fraction |",
             "|---|---|---|---|---|---|---|"]
    for kind, s in tok_stats.items():
        lines.append(f"| {kind} | {s['vocab']:,} | {s['chars']:,} | {s['tokens']:,} | "
                     f"{s['chars'] / s['tokens']:.2f} | {s['rows']:,} | {s['pad']:.4f} |")
    w, c = tok_stats["word"], tok_stats["char"]
    lines += ["", f"The word tokenizer needs **{c['rows'] / w['rows']:.2f}× fewer rows** for the same "
              f"text ({w['chars'] / w['tokens']:.2f} chars per token vs {c['chars'] / c['tokens']:.2f}): "
              "a step over the same number of rows covers that much more text, and a fine-tuning "
              "example of a given length needs that many fewer positions.", ""]
    lines += ["## 2. Pretraining at equal compute", "",
              f"Each model: {args.steps} steps × global batch {args.batch} × seq 128 rows "
              f"({args.steps * args.batch:,} rows), lr {args.lr:g}, {args.mask_prob:.0%} of the tokens masked (demo-tiny's recipe otherwise: 5% warmup, constant, linear decay over the last 20%; no dropout; Adam beta2 0.98), "
              f"AdamW, {args.workers} Ray Train worker(s) under DeepSpeed, {args.precision} on CPU, "
              f"{args.init!r} initialisation. The char "
              "model sees the same number of positions, hence less text.", "",
              "| model | held-out eval loss | unigram floor (nats) | below the floor | eval MLM acc | "
              "most-frequent-token acc | final train loss | text seen (chars, approx.) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, info in pretrain_info.items():
        lines.append(f"| {key} | {info['loss']:.3f} | {info['floor_entropy']:.3f} | "
                     f"{info['floor_entropy'] - info['loss']:.2f} | {100 * info['acc']:.1f}% | "
                     f"{100 * info['floor_top1']:.1f}% | {info['train_loss']:.3f} | {info['chars_seen']:,.0f} |")
    lines += ["", "Eval loss: the held-out documents (1% of the corpus, never trained on) with fixed "
              "masks, at the end of pretraining. The unigram floor is the loss of a model that ignores the context and predicts "
              "token frequencies; the most-frequent-token accuracy is the accuracy of always "
              "guessing the commonest token. A model near both has learned little beyond frequencies."]
    lines += eval_curve_table(curves, pretrain_info)
    lines += ["", f"![pretraining loss]({curves_png})", "",
              "Loss values of word and char models are not comparable with each other (different "
              "vocabularies and targets: a masked word vs a masked character).", ""]
    lines += ["## 3. Fine-tuning (the seed's table layout)", "",
              f"Reduced grid (the seed's is epochs {{3,5,8}} × batch {{32,64}} × lr {{3e-5,1e-4,3e-4}}), "
              f"the same for every row (word, char and scratch alike; each row's best-dev "
              f"configuration per task): epochs {grid['epochs']} × batch {grid['batch_sizes']} × "
              f"lr {grid['lrs']}, seq 128, a fixed random {grid['max_train']:,} train examples per task "
              f"(the same for every model and seed), dev/test capped at {grid['max_eval']:,}, "
              f"{args.seeds} seeds per configuration. Cells: best-dev configuration's dev accuracy, "
              "mean ± sd over seeds (%). Score = mean over tasks." +
              (f" The low-data tables: the same sweep with {args.low_data:,} train examples per task."
               if args.low_data else ""), ""]
    for size in args.sizes:
        lines += [f"### {size}", ""] + dev_table(results, size)
        lines += ["", "Test accuracy of the same configurations (– = the task's test split is unlabelled):", "",
                  "| Model | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for kind in KINDS:
            r = results.get((kind, size))
            if r is not None:
                lines.append(f"| {kind}-{size} | " + " | ".join(fmt(r[t]["test"]) if t in r else "–"
                                                                for t in TASKS) + " |")
        if args.low_data:
            lines += ["", f"#### {size}, {args.low_data:,} train examples per task (dev accuracy)", ""]
            lines += dev_table(low_results, size)
        lines += ["", f"Per task (dev): {VERDICT_RULE}.", ""] + comparison_table(args, size, results, low_results)
        lines.append("")
    lines += probe_section(probes, probe_sizing)
    lines += findings(args, results, low_results, probes, pretrain_info,
                      tok_stats["word"]["vocab"] / tok_stats["char"]["vocab"])
    lines += ["## Settings and timings", "", "```", json.dumps({
        "args": vars(args), "grid": grid, "probe": probe_sizing, "timings_s": timings}, indent=1,
        default=str), "```", "",
        f"Rerun: `{command}` (stages found under --work are reused; delete it for a fresh run).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/wr-train/reproduce"),
                    help="where data, tokenizers, shards, runs, sweeps and probes go (reused when present)")
    ap.add_argument("--sizes", default="tiny", help="comma list of presets (tiny, mini)")
    ap.add_argument("--word-vocab", type=int, default=20_000)
    # demo-tiny's recipe (batch 32, lr 1e-3, beta2 0.98, no dropout, decay over the last 20%;
    # bench/RESULTS.md); the time per step on 2 cores: the docstring's "Time". At 12,000 steps
    # word-tiny ended 1.29 nats below its floor, still taking off (RESULTS.md, "The
    # reproduction, rerun"); at 7,200 (REPRODUCE.md of 2026-12-07) only 0.62.
    ap.add_argument("--steps", type=int, default=14400, help="pretraining steps per model")
    ap.add_argument("--batch", type=int, default=32, help="global pretraining batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mask-prob", type=float, default=0.15,
                    help="share of tokens masked while pretraining (REPRODUCE.md's runs: BERT's 15%%; "
                         "demo-tiny now trains with 40%% at lr 2e-3, ~1.45x the step's cost)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers per pretraining run")
    ap.add_argument("--init", default="bert", choices=sorted(INITS),
                    help="bert: BERT's start (zero head bias, random position table), as REPRODUCE.md's "
                         "run; demo: demo-tiny's (head bias at the log token frequencies, sin/cos "
                         "position table; 0.15-0.2 nats lower at 2,400 demo steps)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="pretraining precision; auto: bf16 on a CPU with AMX (~1.3x faster, same "
                         "losses), fp32 elsewhere")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per configuration")
    ap.add_argument("--epochs", default="3", help="fine-tuning grid: epochs (comma list)")
    ap.add_argument("--batch-sizes", default="32", help="fine-tuning grid: batch sizes (comma list)")
    ap.add_argument("--lrs", default=None, help="fine-tuning grid: learning rates (comma list), the same "
                    "for every model, scratch included (default 1e-4,3e-4,1e-3; --quick: 1e-3)")
    ap.add_argument("--max-train", type=int, default=2000, help="train examples per task (a fixed random subset)")
    ap.add_argument("--max-eval", type=int, default=1000, help="dev/test examples per task (the first)")
    ap.add_argument("--low-data", type=int, default=None,
                    help="the low-data column: every model also fine-tuned by the same sweep on this "
                         "many train examples per task (default 300; --quick: 100; 0: off)")
    ap.add_argument("--report", default=str(HERE / "REPRODUCE.md"))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 30 steps, 1 seed, lr 1e-3, 200 examples (100 low-data), probes of 100 examples, 1 epoch")
    args = ap.parse_args(argv)
    if args.precision == "auto":
        from wr_train.machine import cpu_precision
        args.precision = cpu_precision("bf16")
    if args.quick:
        args.steps, args.seeds, args.max_train, args.max_eval = 30, 1, 200, 200
    args.lrs = args.lrs or ("1e-3" if args.quick else "1e-4,3e-4,1e-3")
    args.low_data = (100 if args.quick else 300) if args.low_data is None else args.low_data
    if args.low_data < 0 or (args.max_train and args.low_data >= args.max_train):
        ap.error(f"--low-data {args.low_data}: expected 0 (off) or fewer than --max-train ({args.max_train})")
    probe_sizing = QUICK_PROBE_SIZING if args.quick else PROBE_SIZING
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    grid = {"epochs": [int(x) for x in args.epochs.split(",")],
            "batch_sizes": [int(x) for x in args.batch_sizes.split(",")],
            "lrs": [float(x) for x in args.lrs.split(",")],
            "max_train": args.max_train, "max_eval": args.max_eval}
    work = Path(args.work).resolve() / ("quick" if args.quick else "")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    # Each stage's time from the run that actually built it (a reused stage takes ~0 s).
    saved_path = work / "stage_timings.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}

    def timed(name, fn):
        t = time.time()
        BUILT.discard(name)
        out = fn()
        took = round(time.time() - t, 1)
        if name in BUILT or name not in saved:
            saved[name] = took
            saved_path.write_text(json.dumps(saved, indent=1))
        timings[name] = saved[name]
        log(f"{name} done in {took:.0f}s (total {(time.time() - t0) / 60:.1f} min)")
        return out

    from wr_train.demo.data import build_demo
    from wr_train.local_ray import ensure_ray
    timed("data", lambda: build_demo(str(work / "demo"), log=log))
    corpus = str(work / "demo" / "corpus")
    spms = timed("tokenizers", lambda: build_tokenizers(work, corpus, args.word_vocab))
    # Ray started as `wr-train` starts it: the CPU workers' environment (OpenMP, huge pages,
    # one malloc arena; bench/RESULTS.md) and the dashboard Ray Train's cleaner asks
    ensure_ray(local=True, num_cpus=max(2, os.cpu_count() or 1))
    shards = timed("preprocess", lambda: build_shards(work, corpus, spms, 128))
    chars = corpus_chars(Path(corpus))
    tok_stats = {}
    for kind, s in shards.items():
        m = s["manifest"]
        tok_stats[kind] = {"vocab": m["vocab_size"], "chars": chars, "tokens": m["text_tokens"],
                           "rows": m["rows"], "pad": m["pad_fraction"]}
        log(f"{kind}: {chars / m['text_tokens']:.2f} chars/token, {m['rows']:,} rows")

    # preprocess records the floor: the loss / accuracy of predicting from token frequencies
    floors = {kind: {"entropy": s["manifest"]["unigram"]["entropy"],
                     "top1": s["manifest"]["unigram"]["top_fraction"]} for kind, s in shards.items()}
    results, low_results, probes, curves, pretrain_info = {}, {}, {}, {}, {}
    low_grid = {**grid, "max_train": args.low_data}
    tasks_dir = str(work / "demo" / "tasks")
    quick = "-quick" if args.quick else ""
    for size in args.sizes:
        models = {}
        for kind in ("word", "char"):
            hf, rows = timed(f"pretrain-{kind}-{size}", lambda: pretrain_model(
                work, kind, size, shards[kind]["dir"], args.steps, args.batch, args.lr, args.workers,
                args.precision, args.init, args.mask_prob))
            models[kind] = hf
            curves[f"{kind}-{size}"] = rows
            last = [r for r in rows if "eval_loss" in r][-1]
            per_row = tok_stats[kind]["chars"] / tok_stats[kind]["rows"]
            pretrain_info[f"{kind}-{size}"] = {"loss": last["eval_loss"], "acc": last["eval_acc"],
                                               "train_loss": last["loss"],
                                               "chars_seen": args.steps * args.batch * per_row,
                                               **{f"floor_{k}": v for k, v in floors[kind].items()}}
        models["scratch"] = scratch_model(work, size, spms["word"])
        for kind, hf in models.items():
            stage = f"finetune-{kind}-{size}"
            results[(kind, size)] = timed(stage, lambda: sweep(
                work, stage, f"{kind}-{size}{quick}", hf, tasks_dir, grid, args.seeds))
        if args.low_data:
            for kind, hf in models.items():
                stage = f"finetune-low-{kind}-{size}"
                low_results[(kind, size)] = timed(stage, lambda: sweep(
                    work, stage, f"{kind}-{size}-low{args.low_data}{quick}", hf, tasks_dir, low_grid, args.seeds))
        unbeaten = [t for t in TASKS if verdict(results, size, t, "word", "scratch") != "better"]
        probes[size] = timed(f"probe-word-{size}", lambda: probe_curves(
            work, size, unbeaten, tasks_dir, probe_sizing, models["scratch"]))
    png = Path(args.report).with_name("reproduce_loss.png")
    loss_plot(curves, png, {k: v["floor_entropy"] for k, v in pretrain_info.items()})
    timings["this_invocation"] = round(time.time() - t0, 1)
    timings["total"] = round(sum(v for k, v in timings.items() if k != "this_invocation"), 1)
    write_report(Path(args.report), args, grid, tok_stats, results, low_results, probes, probe_sizing,
                 curves, png.name, timings, pretrain_info)
    log(f"wrote {args.report} and {png} in {timings['this_invocation'] / 60:.1f} min")
    print(Path(args.report).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
