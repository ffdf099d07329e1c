"""A small measured sweep of CPU pretraining recipes on the demo shards.

Each point is the demo-tiny recipe plus overrides; the table reports the held-out eval
loss at the end against the shards' unigram floor. Two ways to run a point:
- `--loop real`: the real trainer (`pretrain.run`: Ray Train, DeepSpeed, the stream,
  held-out evaluation), with the wall time of the whole run (start-up included) and of
  the steps alone;
- `--loop plain` (default): the same math in one process per point (SparseMLM, the
  recipe's AdamW groups and schedule, every rank's stream and masks, the same eval rows
  and masks; tests/test_parity.py shows the worker loop equals such a loop step for step),
  `--parallel` points at a time with one thread each: a sweep in half the time.

    python bench/pretrain_recipes.py --shards demo_out/shards128 \\
        --point "lr=1e-3" "stages.0.lr=1e-3" --point "drop0" "model.dropout=0" ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def recipe_config(recipe: str, shards: str, overrides: list[str]):
    """The recipe plus overrides, `shards` in every stage that names none (a recipe with a
    short-sequence first phase names its own seq-64 shards)."""
    from wr_train.config import load_config
    cfg = load_config(recipe, overrides)
    for stage in cfg.stages:
        stage.shards = stage.shards or shards
    return cfg


def run_point(shards: str, overrides: list[str], work: str, name: str, recipe: str = "demo-tiny") -> dict:
    from wr_train import pretrain
    cfg = recipe_config(recipe, shards, [f"storage={work}", f"name={name}", *overrides])
    t0 = time.time()
    pretrain.run(cfg.validate(), log=lambda *a: None)
    wall = time.time() - t0
    rows = [json.loads(x) for x in open(os.path.join(work, name, "metrics.jsonl"))]
    last = [r for r in rows if "eval_loss" in r][-1]
    evals = {r["step"]: round(r["eval_loss"], 3) for r in rows if "eval_loss" in r}
    steps_time = rows[-1]["time"] - rows[0]["time"]
    return {"name": name, "overrides": overrides, "wall_s": round(wall, 1), "steps_s": round(steps_time, 1),
            "steps": last["step"], "eval_loss": last["eval_loss"], "eval_acc": last["eval_acc"],
            "floor": last.get("unigram_floor"), "floor_acc": last.get("unigram_acc"),
            "below_floor": last.get("unigram_floor", 0) - last["eval_loss"], "evals": evals,
            "train_loss": rows[-1]["loss"], "tok_s": rows[-1]["tokens_per_s"]}


def plain_point(shards: str, overrides: list[str], name: str, threads: int = 1) -> dict:
    """The real loop's math without Ray/DeepSpeed: the global batch (the same whatever the
    worker count) in micro-batches, the gradient the mean over all its targets as
    engine.train_step makes it."""
    import numpy as np
    import torch

    from wr_train.config import grad_accum
    from wr_train.engine import eval_set
    from wr_train.optim import param_groups, stage_schedule as lr_schedule
    from wr_train.model import SparseMLM, fresh_mlm
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream, masked_batches
    torch.set_num_threads(threads)
    cfg = recipe_config("demo-tiny", shards, overrides)
    cfg.validate()
    stage, world = cfg.stages[0], cfg.workers
    manifest = load_manifest(shards)
    vocab = manifest["vocab_size"]
    mlm = fresh_mlm(cfg.model, vocab, cfg.seed, shards)  # as the worker starts a fresh model
    model = SparseMLM(mlm).train()
    opt = torch.optim.AdamW(param_groups(mlm, cfg.optim.weight_decay), lr=stage.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = lr_schedule(opt, stage)
    stream = masked_batches(RowStream(shards, manifest, seed=cfg.seed, stage=0, rank=0, world=1,
                                      global_batch=stage.global_batch, micro_batch=stage.micro_batch,
                                      partitions=cfg.partitions, window=cfg.shuffle_window),
                            seed=cfg.seed, vocab_size=vocab, mask_cfg=cfg.mask)
    parts = [eval_set(cfg, shards, manifest, r, world) for r in range(world)]
    held = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    accum = grad_accum(stage.global_batch, stage.micro_batch, 1)
    floor = manifest["unigram"]

    def evaluate():
        model.eval()
        loss_sum = correct = n_sum = 0.0
        with torch.no_grad():
            for i in range(0, len(held[0]), 64):
                loss, c, n = model(torch.from_numpy(held[0][i:i + 64]), torch.from_numpy(held[1][i:i + 64]))
                loss_sum, correct, n_sum = loss_sum + float(loss) * n, correct + float(c), n_sum + n
        model.train()
        return loss_sum / n_sum, correct / n_sum

    evals, t0 = {}, time.time()
    for step in range(1, stage.steps + 1):
        batches = [next(stream) for _ in range(accum)]
        total = sum(b.layout.n for b in batches)
        for batch in batches:
            loss, _, n = model(batch.ids, None, batch.layout.to("cpu"))
            (loss * n / total).backward()
        torch.nn.utils.clip_grad_norm_(mlm.parameters(), cfg.optim.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.checkpoint_every == 0 or step == stage.steps:
            evals[step] = evaluate()
    stream.close()
    last = evals[stage.steps]
    return {"name": name, "overrides": overrides, "loop": "plain", "steps": stage.steps,
            "steps_s": round(time.time() - t0, 1), "threads": threads,
            "rows": stage.steps * stage.global_batch, "eval_loss": last[0], "eval_acc": last[1],
            "floor": floor["entropy"], "floor_acc": floor["top_fraction"],
            "below_floor": floor["entropy"] - last[0],
            "evals": {k: round(v[0], 3) for k, v in evals.items()}}


def _plain_child(shards: str, overrides: list[str], name: str, out: str) -> None:
    r = plain_point(shards, overrides, name)
    with open(out, "w") as f:
        json.dump(r, f)


def run_plain(shards: str, points: list[list[str]], parallel: int):
    """Yields each plain point's result as it finishes, `parallel` child processes at a time."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    pending, running = list(points), []
    while pending or running:
        while pending and len(running) < parallel:
            point = pending.pop(0)
            out = tempfile.mktemp(prefix="wr-recipe-", suffix=".json")
            p = ctx.Process(target=_plain_child, args=(shards, point[1:], point[0], out))
            p.start()
            running.append((p, out, point[0]))
        time.sleep(1)
        for p, out, name in list(running):
            if p.is_alive():
                continue
            running.remove((p, out, name))
            if p.exitcode != 0:
                print(f"{name}: failed (exit code {p.exitcode})", flush=True)
                continue
            with open(out) as f:
                result = json.load(f)
            os.remove(out)
            yield result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--point", nargs="+", action="append", required=True,
                    help="NAME key=value ...: one recipe point (demo-tiny + these overrides)")
    ap.add_argument("--out", default="bench/out/pretrain_recipes.jsonl")
    ap.add_argument("--loop", choices=["plain", "real"], default="plain")
    ap.add_argument("--recipe", default="demo-tiny",
                    help="the base recipe of every point (--loop real; a name or a YAML path)")
    ap.add_argument("--parallel", type=int, default=2, help="plain points run at once (one thread each)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.loop == "plain":
        print(f"load {os.getloadavg()[0]:.2f}", flush=True)
        for r in run_plain(os.path.abspath(args.shards), args.point, args.parallel):
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['name']:<18} eval {r['eval_loss']:.3f} floor {r['floor']:.3f} below "
                  f"{r['below_floor']:+.3f} acc {r['eval_acc']:.1%} steps {r['steps_s']:.0f}s "
                  f"evals {r['evals']}", flush=True)
        return
    from wr_train.local_ray import ensure_ray
    ensure_ray(local=True, num_cpus=4)  # as `wr-train` starts it (worker environment, dashboard)
    load = os.getloadavg()[0]
    print(f"load {load:.2f}", flush=True)
    for point in args.point:
        name, overrides = point[0], point[1:]
        work = tempfile.mkdtemp(prefix="wr-recipe-")
        try:
            r = run_point(os.path.abspath(args.shards), overrides, work, name, args.recipe)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r["load_before"] = round(load, 2)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name:<14} eval {r['eval_loss']:.3f} floor {r['floor']:.3f} below {r['below_floor']:+.3f} "
              f"acc {r['eval_acc']:.1%} train {r['train_loss']:.3f} wall {r['wall_s']:.0f}s "
              f"steps {r['steps_s']:.0f}s {r['tok_s']:,.0f} tok/s evals {r['evals']}", flush=True)
        load = os.getloadavg()[0]


if __name__ == "__main__":
    main()
