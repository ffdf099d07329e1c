"""A small measured sweep of CPU pretraining recipes on the demo shards, with the real
trainer (`pretrain.run`: Ray Train, DeepSpeed, the stream, held-out evaluation).

Each point is the demo-tiny recipe plus overrides; the table reports the held-out eval
loss at the end against the shards' unigram floor, the wall time of the whole run
(Ray Train + DeepSpeed start-up included) and of the steps alone.

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


def run_point(shards: str, overrides: list[str], work: str, name: str) -> dict:
    from wr_train import pretrain
    from wr_train.config import load_config
    cfg = load_config("demo-tiny", [f"storage={work}", f"name={name}", *overrides])
    cfg.stages[0].shards = shards
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--point", nargs="+", action="append", required=True,
                    help="NAME key=value ...: one recipe point (demo-tiny + these overrides)")
    ap.add_argument("--out", default="bench/out/pretrain_recipes.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load {load:.2f}", flush=True)
    for point in args.point:
        name, overrides = point[0], point[1:]
        work = tempfile.mkdtemp(prefix="wr-recipe-")
        try:
            r = run_point(os.path.abspath(args.shards), overrides, work, name)
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
