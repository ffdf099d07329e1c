"""The sweep's report: best-of-grid per task (seeds of a configuration averaged), the
seed's score table, the plot, the model card's score section; and per-seed scores of the
best configurations (bench/reproduce.py). Reads the trial records; runs nothing.

    scores.json           every trial of the grid + the best configuration per task
    scores.md             the seed's table layout (dev), test of each best-dev config
    scores.png            best dev/test per task and every trial's dev score
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from wr_train import storage
from wr_train.tune_trials import TrialSpec, best_by_task, read_trials, trial_path

CARD_SCORES = "\n## Fine-tuning\n"


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def aggregate(specs: list[TrialSpec], records: dict[str, dict]) -> dict[str, dict]:
    """task -> best configuration (seeds of a configuration averaged), by dev accuracy."""
    groups: dict[tuple[str, str], list[dict]] = {}
    first_index: dict[tuple[str, str], int] = {}
    for s in specs:
        rec = records.get(s.key)
        if rec is None or rec.get("dev_acc") is None:
            continue
        g = (s.task, s.config_key)
        groups.setdefault(g, []).append(rec)
        first_index.setdefault(g, s.index)
    best: dict[str, dict] = {}
    for (task, ckey), recs in groups.items():
        row = {"config": ckey, "epochs": recs[0]["spec"]["epochs"],
               "batch_size": recs[0]["spec"]["batch_size"], "lr": recs[0]["spec"]["lr"],
               "seeds": len(recs), "index": first_index[(task, ckey)]}
        for m in ("dev_acc", "dev_f1", "test_acc", "test_f1"):
            vals = [r[m] for r in recs if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals and len(vals) == len(recs) else None
        row["majority_dev"] = recs[0].get("majority_dev")
        row["best_epoch"] = [r.get("best_epoch") for r in recs]
        row["checkpoint"] = row["checkpoint_trial"] = None  # set by write_report
        cur = best.get(task)
        if cur is None or (row["dev_acc"], row["dev_f1"] or 0, -row["index"]) > \
                (cur["dev_acc"], cur["dev_f1"] or 0, -cur["index"]):
            best[task] = row
    return best


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def scores_markdown(model_name: str, task_names: list[str], best: dict[str, dict], grid: dict,
                    totals: dict[str, tuple[int, int]]) -> str:
    def table(metric: str) -> list[str]:
        vals = [best.get(t, {}).get(metric) for t in task_names]
        score = _mean(vals)
        star = "*" if score is not None and None in vals else ""
        return ["| Model | Score | " + " | ".join(task_names) + " |",
                "|---|---|" + "---|" * len(task_names),
                f"| {model_name} | {pct(score)}{star} | " + " | ".join(pct(v) for v in vals) + " |"]

    def fmt(values) -> str:
        return "{" + ",".join(f"{v:g}" for v in values) + "}"

    seeds = grid["seeds"]
    lines = [f"Best dev accuracy (%) per task over the grid epochs {fmt(grid['epochs'])} × batch "
             f"{fmt(grid['batch_sizes'])} × lr {fmt(grid['lrs'])}"
             f"{f' (mean of {seeds} seeds)' if seeds > 1 else ''}, seq {grid['seq_length']}"
             f"{', train subset ' + str(grid['max_train_examples']) if grid.get('max_train_examples') else ''}"
             f"; Score = mean over tasks.", ""]
    lines += table("dev_acc")
    lines += ["", "Test accuracy (%) of each task's best-dev configuration (– = unlabelled test):", ""]
    lines += table("test_acc")
    lines += ["", "| Task | epochs | batch | lr | best epoch | dev acc | dev F1 | test acc | test F1 | "
                  "majority (dev) | trials |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in task_names:
        b = best.get(t)
        done, total = totals.get(t, (0, 0))
        if b is None:
            lines.append(f"| {t} | | | | | – | – | – | – | | {done}/{total} |")
            continue
        epochs = ",".join(str(e) for e in b["best_epoch"])
        lines.append(f"| {t} | {b['epochs']} | {b['batch_size']} | {b['lr']:g} | {epochs} | "
                     f"{pct(b['dev_acc'])} | {pct(b['dev_f1'])} | {pct(b['test_acc'])} | "
                     f"{pct(b['test_f1'])} | {pct(b['majority_dev'])} | {done}/{total} |")
    if any(done < total for done, total in totals.values()):
        lines += ["", "Some trials have not finished: run the same sweep again to complete it."]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str, specs: list[TrialSpec], records: dict[str, dict], loaded: dict,
                 meta: dict, model_name: str, log=print) -> dict:
    task_names = list(dict.fromkeys(s.task for s in specs))
    best = aggregate(specs, records)
    totals = {t: (sum(1 for s in specs if s.task == t and s.key in records),
                  sum(1 for s in specs if s.task == t)) for t in task_names}
    # Only the best trial per task keeps its model (the best configuration's, unless with
    # several seeds another configuration had the single best run); prune what is left over.
    keep = {}
    for task, rec in best_by_task(r for r in records.values() if r.get("checkpoint")).items():
        if rec.get("checkpoint") and task in best:
            keep[rec["checkpoint"]] = task
            best[task]["checkpoint"], best[task]["checkpoint_trial"] = rec["checkpoint"], rec["key"]
    for rec in records.values():
        if rec.get("checkpoint") and rec["checkpoint"] not in keep:
            storage.remove_tree(rec["checkpoint"])
            rec["checkpoint"] = None
            storage.write_text(trial_path(sweep_dir, rec["key"]), json.dumps(rec, indent=1))
    grid = {**meta["grid"], "seq_length": meta["finetune"]["seq_length"],
            "max_train_examples": meta["finetune"]["max_train_examples"]}
    md = scores_markdown(model_name, task_names, best, grid, totals)
    score = _mean(best.get(t, {}).get("dev_acc") for t in task_names)
    scores = {
        "model": meta["model"], "model_name": model_name, "model_sha256": meta["model_sha256"],
        "data": meta["data"], "grid": grid, "finetune": meta["finetune"], "asha": meta.get("asha"),
        "score": score, "test_score": _mean(best.get(t, {}).get("test_acc") for t in task_names),
        "best": best,
        "tasks": {t: {"labels": loaded[t].labels, "train": len(loaded[t].train), "dev": len(loaded[t].dev),
                      "test": len(loaded[t].test), "test_labelled": loaded[t].test_labelled}
                  for t in task_names if t in loaded},
        "trials": [records[s.key] for s in specs if s.key in records],
        "missing": [s.key for s in specs if s.key not in records],
    }
    storage.write_text(storage.join(sweep_dir, "scores.json"), json.dumps(scores, indent=1))
    storage.write_text(storage.join(sweep_dir, "scores.md"), f"# CLUE fine-tuning: {model_name}\n\n" + md)
    png = _plot(model_name, task_names, best, scores["trials"])
    if png is not None:
        storage.write_bytes(storage.join(sweep_dir, "scores.png"), png)
    log(f"[tune] wrote {storage.join(sweep_dir, 'scores.md')}, scores.json, scores.png; "
        f"Score (mean best dev) {pct(score)}")
    return {"sweep_dir": sweep_dir, "scores_md": md, "table": md, "scores": scores, "best": best,
            "score": score}


def _plot(model_name: str, task_names: list[str], best: dict, trials: list[dict]) -> bytes | None:
    if not best:
        return None
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(task_names) + 4), 3.8))
    xs = range(len(task_names))
    dev = [100 * (best.get(t, {}).get("dev_acc") or 0) for t in task_names]
    test = [100 * (best.get(t, {}).get("test_acc") or 0) for t in task_names]
    maj = [100 * (best.get(t, {}).get("majority_dev") or 0) for t in task_names]
    ax1.bar([x - 0.2 for x in xs], dev, 0.4, label="dev (best config)")
    ax1.bar([x + 0.2 for x in xs], test, 0.4, label="test of that config")
    ax1.scatter(list(xs), maj, marker="_", s=400, color="k", label="majority class (dev)", zorder=3)
    ax1.set_xticks(list(xs), task_names, rotation=20)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title(f"{model_name}: best of grid")
    ax1.set_ylim(0, 125)
    ax1.legend(fontsize=7, loc="upper left", ncol=3)
    lrs = sorted({r["spec"]["lr"] for r in trials})
    for i, lr in enumerate(lrs):
        pts = [(task_names.index(r["spec"]["task"]) + (i - (len(lrs) - 1) / 2) * 0.15,
                100 * r["dev_acc"]) for r in trials
               if r["spec"]["lr"] == lr and r.get("dev_acc") is not None and r["spec"]["task"] in task_names]
        if pts:
            ax2.scatter(*zip(*pts), s=14, label=f"lr {lr:g}")
    ax2.set_xticks(list(xs), task_names, rotation=20)
    ax2.set_title("every trial (dev)")
    ax2.legend(fontsize=7, ncol=max(1, len(lrs)))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def per_seed_scores(sweep_dir: str, best: dict[str, dict], tasks) -> dict[str, dict]:
    """task -> {"config", "dev": [per seed], "test": [per seed, where labelled],
    "majority"} of each task's best configuration (`best` as aggregate gives it)."""
    records = read_trials(sweep_dir)
    out = {}
    for task in tasks:
        b = best.get(task)
        if b is None:
            continue
        recs = [r for r in records.values() if r["spec"]["task"] == task
                and TrialSpec(**r["spec"]).config_key == b["config"]]
        out[task] = {"config": b["config"], "dev": [r["dev_acc"] for r in recs],
                     "test": [r["test_acc"] for r in recs if r.get("test_acc") is not None],
                     "majority": b.get("majority_dev")}
    return out


def add_scores_to_card(model_dir: str, scores_md: str) -> bool:
    """Put (or replace) the fine-tuning score table as the model card's last section."""
    card = Path(model_dir, "README.md")
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8")
    text = text.split(CARD_SCORES)[0].rstrip("\n") + "\n" + CARD_SCORES + "\n" + scores_md.rstrip("\n") + "\n"
    card.write_text(text, encoding="utf-8")
    return True
