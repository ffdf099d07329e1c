"""Ray Tune sweep of the seed's CLUE fine-tuning grid for one exported model.

Argument plumbing only; the work is wr_train.tune.run_sweep. Runs on a local Ray, or on a
cluster when RAY_ADDRESS is set / when submitted with `ray job submit`.
"""
from __future__ import annotations

import argparse
import os
import sys

EXAMPLE = """examples:
  python ray_jobs/tune_clue.py --model demo_out/hf --tasks chnsenticorp,lcqmc --data demo_out/tasks \\
      --storage results --name tiny-clue
  # a reduced grid on a train subset, results to S3, early stopping on:
  python ray_jobs/tune_clue.py --model demo_out/hf --tasks all --data demo_out/tasks \\
      --storage s3://bucket/sweeps --epochs 3 --batch-sizes 32 --lrs 1e-4,3e-4 \\
      --max-train-examples 2000 --asha
  # on a cluster, one GPU per trial (the autoscaler starts GPU nodes for them):
  ray job submit --working-dir . -- python ray_jobs/tune_clue.py --model /shared/hf --tasks all --data /shared/tasks \\
      --storage s3://bucket/sweeps --gpu

The same command with the same --name resumes: finished trials are not run again.
Results: STORAGE/NAME/{scores.md,scores.json,scores.png,trials/,checkpoints/}; Ray Tune's own
experiment directory (per-trial results, TensorBoard events, errors): STORAGE/NAME/tune/."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tune_clue.py",
        description="Fine-tune an exported model over a grid (default: the seed's 18 configurations "
                    "epochs 3,5,8 × batch 32,64 × lr 3e-5,1e-4,3e-4, seq 128) on CLUE-style tasks with "
                    "Ray Tune; report the best dev score per task (the seed's table) and the test "
                    "score of each best configuration.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HuggingFace model directory (wr-train export)")
    p.add_argument("--tasks", default="all",
                   help="comma-separated task names (douban, chnsenticorp, lcqmc, tnews, iflytek, ocnli, "
                        "or a user task dir under --data); 'all' = the six (default)")
    p.add_argument("--data", required=True, help="directory holding one directory per task")
    p.add_argument("--storage", default="results", help="where sweeps go: dir or s3://bucket/prefix (default results)")
    p.add_argument("--name", default=None, help="sweep name (default clue-<model>); the same name resumes")
    p.add_argument("--epochs", default="3,5,8", help="grid of epoch counts (default 3,5,8)")
    p.add_argument("--batch-sizes", default="32,64", help="grid of batch sizes (default 32,64)")
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="grid of learning rates (default 3e-5,1e-4,3e-4)")
    p.add_argument("--seeds", type=int, default=1, help="repeat each configuration with N seeds (mean reported)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--max-train-examples", type=int, default=0, help="train on a fixed subset of N rows (0 = all)")
    p.add_argument("--max-eval-examples", type=int, default=0, help="score the first N dev/test rows (0 = all)")
    p.add_argument("--asha", action="store_true", help="early-stop weak trials with ASHA (off: the seed's protocol)")
    p.add_argument("--no-save-best", action="store_true", help="do not keep the best model of each task")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default 1)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per trial (= --gpus-per-trial 1): on a cluster that scales from zero, "
                        "the trials' requests make the autoscaler start GPU nodes")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs each trial asks Ray for (default 0: CPU trials; 1 with --gpu); asked for "
                        "whatever the cluster has at the moment")
    p.add_argument("--max-failures", type=int, default=3,
                   help="run a failed trial (a lost spot node, a crashed worker) again up to N times "
                        "(default 3; 0: no retries)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once (default: what fits)")
    p.add_argument("--model-name", default=None, help="the model's name in the score table")
    p.add_argument("--verbose", action="store_true", help="also print every epoch of every trial")
    p.add_argument("overrides", nargs="*", help="further fine-tuning settings key=value (warmup, weight_decay, clip)")
    return p


def gpus_per_trial(args) -> float:
    """--gpus-per-trial as given, else 1 with --gpu, else 0."""
    if args.gpus_per_trial is not None:
        return args.gpus_per_trial
    return 1.0 if args.gpu else 0.0


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from wr_train.cli import parse_with_overrides
    args = parse_with_overrides(parser(), argv)
    try:
        from wr_train.config import check_plain_name
        if args.name is not None:  # the sweep's folder: STORAGE/NAME
            check_plain_name(args.name, "--name")
        from wr_train.tune import run_sweep
        from wr_train.tune_trials import parse_list
        report = run_sweep(
            args.model, args.tasks, args.data, args.storage, args.name,
            epochs=parse_list(args.epochs, int, "--epochs"),
            batch_sizes=parse_list(args.batch_sizes, int, "--batch-sizes"),
            lrs=parse_list(args.lrs, float, "--lrs"), seeds=args.seeds,
            max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
            seq_length=args.seq_length, asha=args.asha, save_best=not args.no_save_best,
            cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus_per_trial(args),
            max_failures=args.max_failures,
            max_concurrent=args.max_concurrent, model_name=args.model_name, verbose=args.verbose,
            overrides=args.overrides)
    except KeyboardInterrupt:
        print("tune_clue: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; WR_TRAIN_DEBUG=1 shows the trace
        if os.environ.get("WR_TRAIN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tune_clue: error: {msg}", file=sys.stderr)
        return 2
    if report["missing"]:
        print(report["scores_md"])
        why = f"{len(report['failed'])} failed" if report["failed"] else "interrupted"
        print(f"tune_clue: {len(report['missing'])} trial(s) without a result ({why}: "
              f"{', '.join(report['missing'][:3])}{', …' if len(report['missing']) > 3 else ''}); "
              f"run the same command again to finish them", file=sys.stderr)
        return 1
    print(report["scores_md"])
    print(report["sweep_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
