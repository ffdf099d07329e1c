"""The CLUE grid as a Ray Tune sweep: best-of-grid per task, the seed's score table.

The seed reports, per model, the best **dev** accuracy of an 18-configuration grid
(epochs {3,5,8} × batch {32,64} × lr {3e-5,1e-4,3e-4}, seq 128) on each task, and their
mean as "Score". Here every (task, epochs, batch, lr, seed) is one Tune trial: a plain
function trainable that fine-tunes on one GPU (or one CPU here) — no TorchTrainer start-up
per trial (NOTES.md: `Tuner(TorchTrainer)` fails in Ray 2.60 anyway).

A sweep lives in STORAGE/NAME/ (the layout and the trial records: wr_train.tune_trials;
scores.json/.md/.png: wr_train.tune_report). Running the same sweep again (same NAME)
skips the trials whose file exists, so an interrupted sweep resumes where it stopped and
a finished one only rebuilds the report. Trials write their files themselves, so on a
multi-node cluster STORAGE must be s3:// or a shared filesystem; the model and task data
travel to the trials via Ray's object store (the model is written once per node under
$TMPDIR/wr-train-models/<sha>/ and reused).

Entry point: `run_sweep(...)` (ray_jobs/tune_clue.py, the demo, bench/reproduce.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from ray import tune

from wr_train import storage as store
from wr_train.local_ray import ensure_ray
from wr_train.tune_report import add_scores_to_card, pct, write_report
from wr_train.tune_trials import (SEED_BATCH_SIZES, SEED_EPOCHS, SEED_LRS, SweepError, TrialSpec,
                                  best_by_task, build_grid, checkpoint_path, dev_key, read_trials,
                                  trial_path)

MODEL_SKIP = (".png", ".md")  # export extras trials do not need
# Storage settings (wr_train.storage reads these) passed on to trials whose worker
# processes lack them, as Ray's runtime_env env_vars would: trials write their own files.
STORAGE_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


# ---------------------------------------------------------------- fingerprints

def model_files(model_dir: str) -> dict[str, bytes]:
    """The files a trial needs to load the export (top level, no plots/cards)."""
    files = {}
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix not in MODEL_SKIP:
            files[p.name] = p.read_bytes()
    return files


def fingerprint(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def task_fingerprint(task) -> str:
    h = hashlib.sha256()
    for split in ("train", "dev", "test"):
        path = task.files.get(split)
        if path:
            h.update(split.encode() + Path(path).read_bytes())
    return h.hexdigest()


def materialize_model(files: dict[str, bytes], sha: str) -> str:
    """Write the shipped model files once per node (keyed by content) and return the dir."""
    root = Path(tempfile.gettempdir()) / "wr-train-models"
    final = root / sha[:24]
    if (final / ".complete").is_file():
        return str(final)
    staging = root / f".{sha[:24]}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    (staging / ".complete").write_text(sha)
    try:
        os.replace(staging, final)  # atomic; loses to a concurrent winner harmlessly
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


# ---------------------------------------------------------------- sweep files

def _record(spec: TrialSpec, result: dict | None, status: str) -> dict:
    rec = {"key": spec.key, "spec": dataclasses.asdict(spec), "status": status, "checkpoint": None}
    if result is not None:
        rec.update({k: result.get(k) for k in (
            "dev_acc", "dev_f1", "test_acc", "test_f1", "best_epoch", "majority_dev", "seconds",
            "train_examples", "dev_examples", "test_examples", "device", "precision", "threads")})
        rec["epochs"] = result.get("epochs", [])
        rec["config"] = result.get("config")
    return rec


# ---------------------------------------------------------------- the trainable

def _trial(config: dict, payload: dict) -> None:
    """One Tune trial: fine-tune, report each epoch, upload the model if it is the task's
    best so far, write trials/<key>.json (its presence marks the trial done). The last
    epoch is reported only after that: a scheduler may stop the trial on that report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in payload["env"].items():
        os.environ.setdefault(key, value)
    from wr_train.finetune import FinetuneConfig, finetune
    spec = TrialSpec(**config["trial"])
    model_dir = materialize_model(payload["model_files"], payload["model_sha"])
    task = payload["tasks"][spec.task]
    cfg = FinetuneConfig(**{**payload["base_config"], "epochs": spec.epochs,
                            "batch_size": spec.batch_size, "lr": spec.lr, "seed": spec.seed})
    sweep_dir = payload["sweep_dir"]
    last: list[dict] = []

    def report(metrics: dict) -> None:
        if metrics["epoch"] < spec.epochs:
            tune.report(metrics)
        else:
            last.append(metrics)

    with tempfile.TemporaryDirectory(prefix="wr-trial-") as tmp:
        save_dir = os.path.join(tmp, "best") if payload["save_best"] else None
        result = finetune(model_dir, task, cfg, report=report, save_dir=save_dir)
        rec = _record(spec, result, "done")
        if save_dir and _beats_finished(sweep_dir, rec):
            dest = checkpoint_path(sweep_dir, spec.key)
            store.copy_tree(save_dir, dest, progress=False)
            rec["checkpoint"] = dest
    store.write_text(trial_path(sweep_dir, spec.key), json.dumps(rec, indent=1))
    tune.report(last[-1])


def _beats_finished(sweep_dir: str, rec: dict) -> bool:
    """Is `rec` better than every finished trial of its task that kept its model (only then
    is its model uploaded)?"""
    others = [r for r in read_trials(sweep_dir, rec["spec"]["task"]).values()
              if r["key"] != rec["key"] and r.get("checkpoint")]
    return all(dev_key(rec) > dev_key(r) for r in others)


# ---------------------------------------------------------------- the driver

class _Progress(tune.Callback):
    """Logs trial ends with done/total and the best dev score so far per task; writes the
    record of a trial that ASHA stopped early; prunes the models of trials that are not
    their task's best."""

    def __init__(self, sweep_dir, specs_by_key, total, finished, log, verbose):
        self.sweep_dir, self.specs, self.total = sweep_dir, specs_by_key, total
        self.records = dict(finished)
        self.log, self.verbose = log, verbose
        self.history: dict[str, list] = {}   # key -> epoch rows
        self.last: dict[str, dict] = {}       # key -> last reported metrics
        self.failed: list[str] = []
        self.started = time.monotonic()

    def __getstate__(self) -> dict:
        # Tuner pickles its callbacks into the experiment state; `log` (print, a logger
        # method) need not survive that: this sweep resumes from its trial files instead.
        return {**self.__dict__, "log": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.log = self.log or (lambda *_: None)

    def _spec(self, trial) -> TrialSpec:
        return TrialSpec(**trial.config["trial"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        spec = self._spec(trial)
        row = {k: result.get(k) for k in ("epoch", "train_loss", "dev_acc", "dev_f1",
                                          "train_seconds", "examples_per_s", "seconds")}
        self.history.setdefault(spec.key, []).append(row)
        self.last[spec.key] = dict(result)
        if self.verbose:
            self.log(f"[tune] {spec.task} {spec.label()} s{spec.seed}: epoch "
                     f"{row['epoch']}/{spec.epochs} dev acc {100 * (row['dev_acc'] or 0):.2f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            self._complete(trial)
        except Exception as e:  # never let reporting kill the sweep
            self.log(f"[tune] warning: bookkeeping of {trial} failed: {e}")

    def _complete(self, trial):
        spec = self._spec(trial)
        path = trial_path(self.sweep_dir, spec.key)
        if store.exists(path):
            rec = json.loads(store.read_text(path))
        else:  # stopped by the scheduler before it could write its record
            last = self.last.get(spec.key, {})
            result = {"dev_acc": last.get("best_dev_acc"), "dev_f1": last.get("best_dev_f1"),
                      "test_acc": last.get("test_acc"), "test_f1": last.get("test_f1"),
                      "best_epoch": last.get("best_epoch"), "majority_dev": last.get("majority_dev"),
                      "epochs": self.history.get(spec.key, [])}
            rec = _record(spec, result, "stopped_early")
            store.write_text(path, json.dumps(rec, indent=1))
        self.records[spec.key] = rec
        self._prune(spec.task)
        done = sum(1 for k in self.specs if k in self.records)
        self.log(f"[tune] {done}/{self.total} trials done ({_elapsed(self.started)}): "
                 f"{spec.task} {spec.label()} s{spec.seed} dev {pct(rec.get('dev_acc'))}"
                 f"{' (stopped early)' if rec['status'] == 'stopped_early' else ''} | best: "
                 + ", ".join(f"{t} {pct(r['dev_acc'])} ({TrialSpec(**r['spec']).label()})"
                             for t, r in best_by_task(self.records.values()).items()))

    def _prune(self, task):
        recs = [r for r in self.records.values() if r["spec"]["task"] == task and r.get("checkpoint")]
        if not recs:
            return
        best = max(recs, key=dev_key)
        for r in recs:
            if r is not best and r.get("checkpoint"):
                store.remove_tree(r["checkpoint"])
                r["checkpoint"] = None
                store.write_text(trial_path(self.sweep_dir, r["key"]), json.dumps(r, indent=1))

    def on_trial_error(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        self.failed.append(spec.key)
        err = getattr(trial, "error_file", None) or ""
        self.log(f"[tune] trial {spec.key} failed (rerun by running the same sweep again) {err}")


def _elapsed(start: float) -> str:
    s = int(time.monotonic() - start)
    return f"{s // 60}m{s % 60:02d}s"


def trial_resources(cluster: dict, cpus_per_trial: float | None, gpus_per_trial: float) -> tuple[dict, int]:
    """Per-trial resources and how many trials fit at once on this cluster."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if gpus >= gpus_per_trial > 0:
        n = int(gpus // gpus_per_trial)
        cpu = cpus_per_trial or max(1.0, math.floor(cpus / n))
        return {"cpu": cpu, "gpu": gpus_per_trial}, max(1, min(n, int(cpus // cpu) or 1))
    cpu = cpus_per_trial or 1.0
    return {"cpu": cpu}, max(1, int(cpus // cpu))


def default_model_name(model_dir: str) -> str:
    p = Path(model_dir).resolve()
    return f"{p.parent.name}/{p.name}" if p.name in ("hf", "model", "export", "out") else p.name


def _default_name(model_dir: str) -> str:
    return "clue-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", default_model_name(model_dir)).strip("-")


def run_sweep(model_dir: str, tasks, data_dir: str, storage: str | None = None,
              name: str | None = None, epochs=SEED_EPOCHS, batch_sizes=SEED_BATCH_SIZES,
              lrs=SEED_LRS, seeds: int = 1, max_train_examples: int = 0,
              log: Callable[[str], None] = print, *, seq_length: int = 128,
              max_eval_examples: int = 0, asha: bool = False, save_best: bool = True,
              cpus_per_trial: float | None = None, gpus_per_trial: float = 1.0,
              max_concurrent: int | None = None, model_name: str | None = None,
              verbose: bool = False, overrides=()) -> dict:
    """Run (or resume) the grid; return {"sweep_dir", "scores_md" (= "table"), "scores", "best",
    "score", "trials_run", "trials_skipped", "failed", "missing"} (missing: keys of grid
    trials without a result, e.g. after a failure or Ctrl-C; running again completes them).

    `tasks`: names or "a,b,c"; `storage`: local dir or s3:// (default ./results);
    `name`: the sweep's name (default clue-<model>); `overrides`: further FinetuneConfig
    `key=value`s (e.g. warmup=0.1). Everything is checked before any trial starts.
    """
    from wr_train.hf import check_hf_dir
    from wr_train.finetune import config_from_overrides
    from wr_train.tasks import load_tasks, parse_task_list
    # local paths as the user's shell means them: trials run in Ray's directories
    storage = store.absolute(storage or "results")
    model_dir, data_dir = store.absolute(str(model_dir)), store.absolute(str(data_dir))

    # -- everything that can be wrong with the input fails here, before Ray starts
    check_hf_dir(model_dir)
    names = parse_task_list(tasks) if isinstance(tasks, str) else list(tasks)
    loaded = load_tasks(names, data_dir)
    specs = build_grid(list(loaded), list(epochs), list(batch_sizes), list(lrs), seeds)
    base = dataclasses.asdict(config_from_overrides(
        overrides, seq_length=seq_length, max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples))
    if cpus_per_trial is not None and not cpus_per_trial > 0:
        raise SweepError(f"--cpus-per-trial {cpus_per_trial}: expected a positive number (Ray refuses 0)")
    if gpus_per_trial < 0 or (max_concurrent is not None and max_concurrent < 1):
        raise SweepError("--gpus-per-trial must be >= 0 and --max-concurrent >= 1")
    name = name or _default_name(model_dir)
    if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", name):
        raise SweepError(f"--name {name!r}: use letters, digits and _ . = + - only")
    sweep_dir = store.join(storage, name)
    store.check_writable(sweep_dir)
    files = model_files(model_dir)
    model_sha = fingerprint(files)
    meta = {"model": str(model_dir), "model_sha256": model_sha, "data": str(data_dir),
            "task_sha256": {t: task_fingerprint(task) for t, task in loaded.items()},
            "finetune": {k: base[k] for k in ("seq_length", "max_train_examples", "max_eval_examples",
                                              "warmup", "weight_decay", "clip")},
            "grid": {"epochs": list(epochs), "batch_sizes": list(batch_sizes), "lrs": list(lrs),
                     "seeds": seeds}, "asha": asha}
    meta = _check_resume(sweep_dir, meta)

    finished = {k: r for k, r in read_trials(sweep_dir).items()
                if k in {s.key for s in specs}}
    pending = [s for s in specs if s.key not in finished]
    log(f"[tune] sweep {sweep_dir}: {len(loaded)} task(s) × "
        f"{len(specs) // len(loaded)} configuration(s) = {len(specs)} trials; "
        f"{len(finished)} already done, {len(pending)} to run")
    for task in loaded.values():
        log(f"[tune]   {task.summary()}")

    failed: list[str] = []
    if pending:
        failed = _run_tune(pending, specs, finished, loaded, files, model_sha, base, sweep_dir,
                           save_best, asha, cpus_per_trial, gpus_per_trial, max_concurrent,
                           log, verbose, model_dir)
    records = {k: r for k, r in read_trials(sweep_dir).items() if k in {s.key for s in specs}}
    report = write_report(sweep_dir, specs, records, loaded, meta,
                          model_name or default_model_name(model_dir), log)
    missing = report["scores"]["missing"]
    if add_scores_to_card(str(model_dir), report["scores_md"]):  # model_dir is local (check_hf_dir)
        log(f"[tune] added the score table to the model card {Path(model_dir, 'README.md')}")
    report.update(trials_run=len(pending) - len(missing), trials_skipped=len(finished),
                  failed=failed, missing=missing)
    return report


def _check_resume(sweep_dir: str, meta: dict) -> dict:
    path = store.join(sweep_dir, "sweep.json")
    if store.exists(path):
        old = json.loads(store.read_text(path))
        if old.get("model_sha256") != meta["model_sha256"]:
            raise SweepError(f"{sweep_dir}: this sweep was run with another model ({old.get('model')}); "
                             f"use a new --name")
        if old.get("finetune") != meta["finetune"]:
            raise SweepError(f"{sweep_dir}: this sweep was run with other settings ({old.get('finetune')}); "
                             f"use a new --name")
        for t, sha in meta["task_sha256"].items():
            if old.get("task_sha256", {}).get(t, sha) != sha:
                raise SweepError(f"{sweep_dir}: task {t}'s data changed since this sweep ran; "
                                 f"use a new --name")
        meta["task_sha256"] = {**old.get("task_sha256", {}), **meta["task_sha256"]}
        meta["created"] = old.get("created")
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    store.write_text(path, json.dumps(meta, indent=1))
    return meta


def _run_tune(pending, specs, finished, loaded, files, model_sha, base, sweep_dir, save_best,
              asha, cpus_per_trial, gpus_per_trial, max_concurrent, log, verbose, model_dir) -> list[str]:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints no tables
    ensure_ray(verbose=verbose)  # attaches to the cluster when RAY_ADDRESS is set
    resources, fits = trial_resources(ray.cluster_resources(), cpus_per_trial, gpus_per_trial)
    concurrent = max(1, min(len(pending), fits, max_concurrent or fits))
    # torch threads = the trial's whole CPUs: oversubscribed threads spin and crawl (NOTES.md)
    base = {**base, "threads": base.get("threads") or max(1, int(resources["cpu"]))}
    log(f"[tune] {len(pending)} trials, {concurrent} at a time, each "
        + ", ".join(f"{v:g} {k.upper()}" for k, v in resources.items())
        + f" ({base['threads']} torch thread{'s' * (base['threads'] > 1)})")
    payload = {"model_files": files, "model_sha": model_sha, "tasks": {t: loaded[t] for t in
               {s.task for s in pending}}, "base_config": base, "sweep_dir": sweep_dir,
               "save_best": save_best, "model_dir": str(model_dir),
               "env": {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
               if store.is_s3(sweep_dir) else {}}
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload), resources)
    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="epoch", metric="dev_acc", mode="max",
                                  max_t=max(s.epochs for s in pending), grace_period=1,
                                  reduction_factor=3)
    progress = _Progress(sweep_dir, {s.key: s for s in specs}, len(specs), finished, log, verbose)
    scratch = tempfile.mkdtemp(prefix="wr-tune-")
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([dataclasses.asdict(s) for s in pending])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler,
                                        reuse_actors=True,
                                        trial_name_creator=lambda t: t.config["trial"]["task"],
                                        trial_dirname_creator=lambda t: f"{t.trial_id}"),
            run_config=tune.RunConfig(name="sweep", storage_path=scratch, verbose=0,
                                      callbacks=[progress],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return progress.failed
