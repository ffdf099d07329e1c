"""What a checkpoint costs per rank: bytes each rank fetches to resume, and seconds a save
stalls training, for W workers at ZeRO-2 and ZeRO-3 (real pretraining runs, 2 CPU cores).

    python bench/checkpoint_io.py --shards demo_out/shards128 [--size mini] [--workers 2,4]

"before" is what every rank copied until 1da2b70 (the whole checkpoint: every rank's
optimizer partition and RNG file); "after" is each rank's share (`checkpoint.rank_files`),
fetched for real here and measured on disk; "bound" is issue 28's 1.1 × (files of no
rank + optimizer state / W). Save stall: `save_s` of the run's metrics rows (the step's
wait for writing, hashing and uploading its checkpoint), split into writing and upload.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2 ** 20


def measure(shards: str, size: str, workers: int, zero: int, work: str) -> dict:
    import json

    from wr_train import checkpoint, pretrain, storage
    from wr_train.config import load_config
    cfg = load_config(None, [f"model.size={size}", f"workers={workers}", f"zero_stage={zero}",
                             f"stages.0.shards={shards}", "stages.0.steps=30", "stages.0.global_batch=32",
                             f"stages.0.micro_batch={32 // workers}", "checkpoint_every=10", "report_every=10",
                             "cpus_per_worker=0.5", "eval_rows=0", f"storage={work}", f"name=w{workers}z{zero}"])
    last = pretrain.run(cfg.validate(), log=lambda *a: None)
    state = checkpoint.verify_complete(last)
    total = sum(m["size"] for m in state["files"].values())
    shares = []
    for rank in range(workers):
        with tempfile.TemporaryDirectory() as dest:
            shares.append(checkpoint.fetch_rank_files(last, state, rank, dest))
    rows = [json.loads(x) for x in storage.read_text(storage.join(pretrain.run_dir_of(cfg), "metrics.jsonl")).split("\n") if x]
    saves = [r for r in rows if "save_s" in r]
    shared = sum(m["size"] for rel, m in state["files"].items() if checkpoint._RANK_FILE.search(rel) is None)
    optim = sum(m["size"] for rel, m in state["files"].items() if rel.endswith("optim_states.pt"))
    return {"workers": workers, "zero": zero, "total": total, "before": total, "after": max(shares),
            "bound": 1.1 * (shared + optim / workers), "moved_before": total * workers, "moved_after": sum(shares),
            "save_s": statistics.median(r["save_s"] for r in saves),
            "write_s": statistics.median(r["save_write_s"] for r in saves)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--size", default="mini")
    ap.add_argument("--workers", default="2,4")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="wr-bench-ckpt-") as work:
        for w in map(int, args.workers.split(",")):
            for zero in (2, 3):
                rows.append(measure(os.path.abspath(args.shards), args.size, w, zero, work))
                print(rows[-1], file=sys.stderr)
    print(f"model {args.size}, load before {load:.2f}")
    print("| W | ZeRO | checkpoint MB | per rank before MB | per rank after MB (max) | bound MB | "
          "moved in all before → after MB | save stall s (writing + upload) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['zero']} | {r['total'] / MB:.1f} | {r['before'] / MB:.1f} | "
              f"{r['after'] / MB:.1f} | {r['bound'] / MB:.1f} | {r['moved_before'] / MB:.1f} → "
              f"{r['moved_after'] / MB:.1f} | {r['save_s']:.2f} ({r['write_s']:.2f} + "
              f"{r['save_s'] - r['write_s']:.2f}) |")


if __name__ == "__main__":
    main()
