"""Wall time of a reduced CLUE grid through Ray Tune vs the same trials run serially in one
process, in the same run.

    python bench/tune_grid.py                       # tiny random model + demo data in a temp dir
    python bench/tune_grid.py --model demo_out/hf --data demo_out/tasks --tasks all --lrs 1e-4,3e-4

Serial: one process, trials one after another with torch's threads (all cores, or each
count in --serial-threads). Tune: wr_train.tune.run_sweep on a local Ray with every CPU, one CPU
and one torch thread per trial, `max_concurrent_trials` = CPUs. Ray's start-up is timed
apart from the sweep. On a shared machine the load average is printed beside the numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def tiny_model(data_root: str, out: str) -> str:
    from wr_train.config import ModelConfig
    from wr_train.export import save_hf_model
    from wr_train.model import build_mlm
    from wr_train.tokenizer import train_spm
    corpus = os.path.join(data_root, "corpus", "reviews.txt")
    train_spm([corpus], os.path.join(out, "spm"), 4000, input_sentence_size=5000, log=lambda *_: None)
    save_hf_model(build_mlm(ModelConfig(size="tiny"), 4000), os.path.join(out, "spm", "spm.model"),
                  os.path.join(out, "hf"))
    return os.path.join(out, "hf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported HF dir (default: a tiny random model, its spm trained on "
                                    "DATA/../corpus/reviews.txt of the demo layout)")
    p.add_argument("--data", help="task dir (default: the demo data, built into a temp dir)")
    p.add_argument("--tasks", default="chnsenticorp,lcqmc")
    p.add_argument("--epochs", default="1")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--lrs", default="1e-3,3e-4")
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--max-train-examples", type=int, default=1000)
    p.add_argument("--max-eval-examples", type=int, default=300)
    p.add_argument("--serial-threads", default="0",
                   help="torch threads of the serial run; a list (e.g. 2,1) runs it once per value (0 = default)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="wr-bench-tune-") as tmp:
        return bench(args, tmp)


def bench(args, tmp: str) -> int:
    import torch

    from wr_train.finetune import FinetuneConfig, finetune
    from wr_train.tasks import load_tasks, parse_task_list
    from wr_train.tune import SweepConfig, run_sweep
    from wr_train.tune_trials import build_grid, parse_list

    data = args.data
    if data is None:
        from wr_train.demo.data import build_demo
        build_demo(os.path.join(tmp, "demo"), log=lambda *_: None)
        data = os.path.join(tmp, "demo", "tasks")
    model = args.model or tiny_model(os.path.dirname(data.rstrip("/")), os.path.join(tmp, "model"))
    epochs = parse_list(args.epochs, int, "--epochs")
    batch_sizes = parse_list(args.batch_sizes, int, "--batch-sizes")
    lrs = parse_list(args.lrs, float, "--lrs")
    tasks = load_tasks(parse_task_list(args.tasks), data)
    specs = build_grid(list(tasks), epochs, batch_sizes, lrs)
    small = dict(seq_length=args.seq_length, max_train_examples=args.max_train_examples,
                 max_eval_examples=args.max_eval_examples)
    load0 = os.getloadavg()[0]
    print(f"bench: {len(specs)} trials ({', '.join(tasks)} × epochs {epochs} × batch {batch_sizes} × "
          f"lr {lrs}), seq {args.seq_length}, {args.max_train_examples or 'all'} train rows; "
          f"{os.cpu_count()} CPUs, load average {load0:.1f}", flush=True)

    # -- serial, one process (once per thread count asked for)
    serial_runs = []
    serial = {}
    for n_threads in [int(t) for t in args.serial_threads.split(",")]:
        torch.set_num_threads(n_threads or os.cpu_count())
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        for s in specs:
            cfg = FinetuneConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed, **small)
            serial[s.key] = finetune(model, tasks[s.task], cfg)["dev_acc"]
            print(f"  serial ({threads} threads) {s.key}: dev {100 * serial[s.key]:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        serial_runs.append((threads, time.perf_counter() - t0))

    # -- Ray Tune, every CPU
    import ray
    t0 = time.perf_counter()
    # address="local": a fresh cluster even if another one runs on this machine
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = run_sweep(SweepConfig(model, list(tasks), data, os.path.join(tmp, "sweeps"), "bench", epochs=epochs,
                                batch_sizes=batch_sizes, lrs=lrs, save_best=False, **small), log=lambda *_: None)
    tune_s = time.perf_counter() - t0
    ray.shutdown()
    tuned = {t["key"]: t["dev_acc"] for t in rep["scores"]["trials"]}
    load1 = os.getloadavg()[0]

    n = len(specs)
    rows = [("serial, one process", f"{threads} torch thread{'s' * (threads > 1)}", secs)
            for threads, secs in serial_runs]
    rows += [("Ray Tune sweep", f"{min(n, args.cpus)} at a time × 1 thread", tune_s),
            ("Ray Tune incl. ray.init", "", tune_s + ray_s)]
    print()
    print("| mode | parallelism | trials | wall s | s / trial |")
    print("|---|---|---|---|---|")
    for mode, par, secs in rows:
        print(f"| {mode} | {par} | {n} | {secs:.1f} | {secs / n:.1f} |")
    print()
    for threads, serial_s in serial_runs:
        print(f"serial ({threads} threads) / Tune = {serial_s / tune_s:.2f}x "
              f"(with Ray start-up {serial_s / (tune_s + ray_s):.2f}x)")
    print(f"ray.init {ray_s:.1f}s; load average {load0:.1f} -> {load1:.1f}")
    diff = max(abs(serial[k] - tuned[k]) for k in serial)
    print(f"largest dev accuracy difference between the modes: {100 * diff:.2f} points "
          f"(thread counts differ, so float sums may too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
