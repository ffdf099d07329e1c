"""Fine-tuning (wr_train.finetune) and the Ray Tune grid (wr_train.tune, ray_jobs/tune_clue.py)
on the stand-in tasks with a tiny exported model, on CPU."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wr_train import storage
from wr_train.config import ConfigError
from wr_train.finetune import FinetuneConfig, accuracy_f1, encode, finetune, finetune_main
from wr_train.hf import ExportError
from wr_train.tasks import Example, TaskError, load_task
from wr_train.tune import SweepConfig, run_sweep, trial_resources
from wr_train.tune_report import aggregate, scores_markdown
from wr_train.tune_trials import SweepError, TrialSpec, build_grid, parse_list

REPO = Path(__file__).resolve().parents[1]
# Small and fast on 2 CPU cores; still enough signal to beat the majority class.
SMALL = dict(seq_length=32, max_train_examples=200, max_eval_examples=100)


@pytest.fixture(scope="session")
def tiny_model(demo_dir, tmp_path_factory) -> str:
    """A tiny word-based spm (4000 pieces) + a randomly initialised tiny BERT, exported."""
    from wr_train.config import ModelConfig
    from wr_train.export import save_hf_model
    from wr_train.model import build_mlm
    from wr_train.tokenizer import train_spm
    root = tmp_path_factory.mktemp("tiny_model")
    train_spm([str(demo_dir / "corpus" / "reviews.txt")], str(root / "spm"), 4000,
              input_sentence_size=5000, log=lambda *_: None)
    mlm = build_mlm(ModelConfig(size="tiny"), 4000)
    save_hf_model(mlm, str(root / "spm" / "spm.model"), str(root / "hf"))
    return str(root / "hf")


# ---------------------------------------------------------------- one run

def test_accuracy_and_macro_f1():
    acc, f1 = accuracy_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert acc == pytest.approx(0.6)
    # class 0: tp1 fp1 fn1 -> .5; class 1: tp2 fp1 fn0 -> .8; class 2: tp0 -> 0
    assert f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_pairs_get_token_types(tiny_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode(tok, [Example("终于发货了", "今天到的新货呢", 1)], 12)
    ids, types = enc.input_ids[0], enc.token_type_ids[0]
    assert len(ids) <= 12 and ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2  # [CLS] a [SEP] b [SEP]
    first_sep = ids.index(3)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    single = encode(tok, [Example("终于发货了", None, 0)], 12)
    assert single.input_ids[0][0] == 2 and single.input_ids[0][-1] == 3 and set(single.token_type_ids[0]) == {0}


def test_finetune_beats_majority(demo_dir, tiny_model, tmp_path):
    """Even from random weights the tiny model learns the sentiment stand-in task."""
    out = tmp_path / "chn.json"
    lines = []
    result = finetune_main(tiny_model, "chnsenticorp", str(demo_dir / "tasks"), str(out),
                           ["epochs=3", "lr=1e-3", "seq_length=64", "max_train_examples=1000",
                            "max_eval_examples=300", "threads=1"], log=lines.append)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [row["epoch"] for row in result["epochs"]] == [1, 2, 3]
    assert result["dev_acc"] == max(row["dev_acc"] for row in result["epochs"])
    dev = load_task("chnsenticorp", str(demo_dir / "tasks")).dev[:300]
    largest_class = max(sum(e.label == c for e in dev) for c in (0, 1)) / len(dev)
    assert result["dev_acc"] > max(largest_class, result["majority_dev"]) + 0.05, result
    assert result["test_acc"] is not None and result["test_f1"] is not None
    assert result["train_examples"] == 1000 and result["dev_examples"] == 300
    assert [line.split(" loss")[0][-3:] for line in lines if "dev acc" in line and "/3 " in line] == \
        ["1/3", "2/3", "3/3"]  # progress per epoch
    assert lines[-1] == str(out)


def test_finetune_pair_task_saves_best_and_reports(demo_dir, tiny_model, tmp_path):
    task = load_task("lcqmc", str(demo_dir / "tasks"))
    reports = []
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=1e-3, threads=1, **SMALL)
    result = finetune(tiny_model, task, cfg, report=reports.append, save_dir=str(tmp_path / "best"))
    assert [r["epoch"] for r in reports] == [1, 2]
    assert reports[-1]["best_dev_acc"] == result["dev_acc"] and reports[-1]["test_acc"] == result["test_acc"]
    saved = json.loads((tmp_path / "best" / "finetune.json").read_text())
    assert saved["best_epoch"] == result["best_epoch"] and saved["labels"] == ["0", "1"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "best"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "best"))
    logits = model(**tok(["终于发货了"], ["今天到的新货呢"], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 2) and (tmp_path / "best" / "spiece.model").is_file()


def test_finetune_main_default_path_and_bad_input(demo_dir, tiny_model, tmp_path):
    data = str(demo_dir / "tasks")
    with pytest.raises(ExportError, match="not an exported model directory"):
        finetune_main(str(tmp_path), "douban", data, None, [])
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        finetune_main(tiny_model, "douban", data, None, ["epoch=3"])
    with pytest.raises(ConfigError, match="lr: expected a positive"):
        finetune_main(tiny_model, "douban", data, None, ["lr=0"])
    with pytest.raises(TaskError, match="not a built-in task"):
        finetune_main(tiny_model, "cmnli", data, None, [])


def test_cli_finetune(demo_dir, tiny_model, tmp_path, capsys):
    """`wr-train finetune` -> <model>/finetune/<task>.json by default; errors in one line."""
    import shutil

    from wr_train.cli import main
    model = tmp_path / "hf"
    shutil.copytree(tiny_model, model)
    args = ["finetune", "--model", str(model), "--task", "douban", "--data", str(demo_dir / "tasks"),
            "epochs=1", "max_train_examples=64", "max_eval_examples=64", "seq_length=32", "threads=1"]
    assert main(args) == 0
    assert (model / "finetune" / "douban.json").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model / "finetune" / "douban.json")
    assert main(args[:-5] + ["batch_size=x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "wr-train finetune: error: override batch_size: expected an integer, got 'x'"


def test_cli_finetune_out_keeps_the_model(demo_dir, tiny_model, tmp_path, capsys):
    """`wr-train finetune --out DIR`: DIR is a HuggingFace classifier (its best-dev epoch)
    that AutoModelForSequenceClassification loads and that predicts the dev set as the run
    scored it; `--result` says where the JSON goes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from wr_train.cli import main
    from wr_train.finetune import predict
    out, result_path = tmp_path / "chn-model", tmp_path / "chn.json"
    assert main(["finetune", "--model", tiny_model, "--task", "chnsenticorp", "--data", str(demo_dir / "tasks"),
                 "--out", str(out), "--result", str(result_path), "epochs=2", "lr=1e-3",
                 "max_train_examples=300", "max_eval_examples=200", "seq_length=48", "threads=1"]) == 0
    result = json.loads(result_path.read_text())
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(result_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    task = load_task("chnsenticorp", str(demo_dir / "tasks"))
    assert model.config.id2label == dict(enumerate(task.labels))
    dev = encode(tok, task.dev[:200], 48)
    import torch
    pred = predict(model, dev, torch.device("cpu"), None, 64, tok.pad_token_id)
    assert accuracy_f1(dev.labels, pred) == (result["dev_acc"], result["dev_f1"])
    assert json.loads((out / "finetune.json").read_text())["best_epoch"] == result["best_epoch"]


# ---------------------------------------------------------------- grid + report (no Ray)

def test_grid_and_parsing():
    specs = build_grid(["douban", "lcqmc"], [3, 5, 8], [32, 64], [3e-5, 1e-4, 3e-4])
    assert len(specs) == 36 and len({s.key for s in specs}) == 36
    assert specs[0].key == "douban-e3-b32-lr3e-05-s0" and specs[-1].index == 35
    assert len(build_grid(["douban"], [3], [32], [1e-4], seeds=3)) == 3
    assert parse_list("3e-5,1e-4", float, "--lrs") == [3e-5, 1e-4]
    for bad, kind in [("3,x", int), ("0", int), ("2.5", int), ("1e-4,1e-4", float), ("", float)]:
        with pytest.raises(SweepError):
            parse_list(bad, kind, "--flag")
    # CPU trials: as many at once as the cluster's CPUs hold now, whatever GPUs it has
    assert trial_resources({"CPU": 2.0}, None, 0) == ({"cpu": 1.0}, 2)
    assert trial_resources({"CPU": 8.0}, 0.5, 0) == ({"cpu": 0.5}, 16)
    assert trial_resources({"CPU": 16.0, "GPU": 2.0}, None, 0) == ({"cpu": 1.0}, 16)
    # GPU trials ask for their GPU whatever the cluster has now (an autoscaler from zero
    # starts GPU nodes for the pending requests), without a cap from the present nodes
    assert trial_resources({"CPU": 2.0}, None, 1) == ({"cpu": 1.0, "gpu": 1}, None)
    assert trial_resources({"CPU": 16.0, "GPU": 2.0}, 4, 0.5) == ({"cpu": 4, "gpu": 0.5}, None)


def _rec(spec: TrialSpec, dev, test=None, f1=None):
    return {"key": spec.key, "spec": spec.__dict__, "status": "done", "checkpoint": None,
            "dev_acc": dev, "dev_f1": f1 if f1 is not None else dev, "test_acc": test,
            "test_f1": test, "best_epoch": 1, "majority_dev": 0.5}


def test_progress_callback_survives_tuner_pickling():
    """Tuner pickles its callbacks; a logger that cannot be pickled must not matter."""
    import threading

    from ray import cloudpickle

    from wr_train.tune import _Progress
    cb = _Progress("/tmp/x", {}, 0, {}, threading.Lock().acquire, False)
    assert cloudpickle.loads(cloudpickle.dumps(cb)).total == 0


def test_best_of_grid_and_table_layout():
    specs = build_grid(["douban", "tnews"], [3], [32], [1e-4, 3e-4], seeds=2)
    vals = {  # douban: lr 3e-4 wins on the mean of its two seeds; tnews: tie -> earlier config
        "douban-e3-b32-lr0.0001-s0": (0.80, 0.70), "douban-e3-b32-lr0.0001-s1": (0.70, 0.70),
        "douban-e3-b32-lr0.0003-s0": (0.76, 0.90), "douban-e3-b32-lr0.0003-s1": (0.76, 0.80),
        "tnews-e3-b32-lr0.0001-s0": (0.50, None), "tnews-e3-b32-lr0.0001-s1": (0.50, None),
        "tnews-e3-b32-lr0.0003-s0": (0.50, None), "tnews-e3-b32-lr0.0003-s1": (0.50, None)}
    records = {s.key: _rec(s, *vals[s.key]) for s in specs}
    best = aggregate(specs, records)
    assert best["douban"]["lr"] == 3e-4 and best["douban"]["dev_acc"] == pytest.approx(0.76)
    assert best["douban"]["test_acc"] == pytest.approx(0.85) and best["douban"]["seeds"] == 2
    assert best["tnews"]["lr"] == 1e-4 and best["tnews"]["test_acc"] is None
    grid = {"epochs": [3], "batch_sizes": [32], "lrs": [1e-4, 3e-4], "seeds": 2, "seq_length": 128}
    md = scores_markdown("tiny", ["douban", "tnews"], best, grid, {"douban": (4, 4), "tnews": (4, 4)})
    lines = md.splitlines()
    assert "| Model | Score | douban | tnews |" in lines
    assert "| tiny | 63.00 | 76.00 | 50.00 |" in lines          # dev: the seed's layout
    assert "| tiny | 85.00* | 85.00 | – |" in lines             # test of the best-dev configs
    assert "(mean of 2 seeds)" in md


# ---------------------------------------------------------------- the sweep through Ray Tune

def _sweep(model, demo_dir, storage_dir, name, tasks=("chnsenticorp",), lrs=(1e-3,), epochs=(1,), **kw):
    log = kw.pop("log", lambda *_: None)
    return run_sweep(SweepConfig(model, list(tasks), str(demo_dir / "tasks"), str(storage_dir), name,
                                 epochs=list(epochs), batch_sizes=[32], lrs=list(lrs),
                                 seq_length=SMALL["seq_length"], max_train_examples=SMALL["max_train_examples"],
                                 max_eval_examples=SMALL["max_eval_examples"], model_name="tiny",
                                 max_concurrent=2, **kw), log=log)  # 2 real cores, whatever the session's Ray claims


def test_sweep_reduced_grid(ray_local, demo_dir, tiny_model, tmp_path):
    """2 tasks × 2 learning rates through Ray Tune: the seed's table, every trial, a chart,
    and the model of each task's best trial."""
    lines: list[str] = []
    rep = _sweep(tiny_model, demo_dir, tmp_path, "grid", tasks=("chnsenticorp", "lcqmc"),
                 lrs=(1e-3, 3e-4), log=lines.append)
    sweep = tmp_path / "grid"
    assert rep["trials_run"] == 4 and rep["trials_skipped"] == 0 and not rep["missing"]
    scores = json.loads((sweep / "scores.json").read_text())
    assert len(scores["trials"]) == 4 and set(scores["best"]) == {"chnsenticorp", "lcqmc"}
    for trial in scores["trials"]:
        assert trial["status"] == "done" and len(trial["epochs"]) == 1 and trial["test_acc"] is not None
        assert trial["config"]["seq_length"] == 32 and trial["train_examples"] == 200
    for task, best in scores["best"].items():
        assert best["dev_acc"] == max(t["dev_acc"] for t in scores["trials"] if t["spec"]["task"] == task)
    assert scores["score"] == pytest.approx(sum(b["dev_acc"] for b in scores["best"].values()) / 2)
    md = (sweep / "scores.md").read_text()
    assert "| Model | Score | chnsenticorp | lcqmc |" in md and md.count("| tiny |") == 2
    assert rep["scores_md"] in md and (sweep / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # exactly the best trial of each task keeps its model
    kept = sorted(p.name for p in (sweep / "checkpoints").iterdir())
    assert kept == sorted(Path(b["checkpoint"]).name for b in scores["best"].values())
    assert all((sweep / "checkpoints" / k / "model.safetensors").is_file() for k in kept)
    assert any(line.startswith("[tune] 4/4 trials done") and "best: " in line for line in lines)


def test_interrupted_sweep_resumes(ray_local, demo_dir, tiny_model, tmp_path):
    """Ctrl-C a `tune_clue.py` run (on this cluster, as `ray job submit` would) after its first
    trial (1 epoch; the second runs 4); the same command resumes without rerunning it."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(REPO / "ray_jobs" / "tune_clue.py"), "--model", tiny_model,
           "--tasks", "chnsenticorp", "--data", str(demo_dir / "tasks"), "--storage", str(tmp_path),
           "--name", "cut", "--epochs", "1,4", "--batch-sizes", "32", "--lrs", "1e-3",
           "--seq-length", "32", "--max-train-examples", "200", "--max-eval-examples", "100",
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "cut" / "trials"
    try:
        deadline = time.monotonic() + 240
        while not (trials.is_dir() and any(trials.iterdir())):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave the driver behind
            proc.kill()
            proc.wait()
    done_first = {p.name: json.loads(p.read_text()) for p in trials.iterdir()}
    assert proc.returncode in (1, 130), out
    assert len(done_first) == 1, out
    assert "trial(s) without a result" in out or "interrupted" in out
    rep = _sweep(tiny_model, demo_dir, tmp_path, "cut", epochs=(1, 4))
    assert (rep["trials_skipped"], rep["trials_run"]) == (1, 1)
    assert not rep["missing"]
    for name, rec in done_first.items():  # finished trials were not run again
        now = json.loads((trials / name).read_text())
        assert now["epochs"] == rec["epochs"] and now["dev_acc"] == rec["dev_acc"]


def test_sweep_to_s3(ray_local, s3, demo_dir, tiny_model):
    root = storage.join(s3.bucket("wr-tune-tests"), "sweeps")
    rep = _sweep(tiny_model, demo_dir, root, "s3run")
    sweep = storage.join(root, "s3run")
    assert rep["sweep_dir"] == sweep and rep["trials_run"] == 1
    files = storage.list_files(sweep)
    key = "chnsenticorp-e1-b32-lr0.001-s0"
    for rel in ("scores.md", "scores.json", "scores.png", "sweep.json", f"trials/{key}.json",
                f"checkpoints/{key}/model.safetensors", f"checkpoints/{key}/config.json"):
        assert rel in files, rel
    assert "| tiny |" in storage.read_text(storage.join(sweep, "scores.md"))
    # resuming a finished sweep from S3 runs nothing and rebuilds the report
    rep2 = _sweep(tiny_model, demo_dir, root, "s3run")
    assert (rep2["trials_run"], rep2["trials_skipped"]) == (0, 1)
    assert rep2["scores"]["best"]["chnsenticorp"]["checkpoint"] == storage.join(sweep, "checkpoints", key)


def test_sweep_reports_every_trial_to_mlflow_and_wandb(ray_local, demo_dir, tiny_model, tmp_path, monkeypatch):
    """`--report-to mlflow,wandb`: Tune's logger callbacks give each trial a tracked run with
    its dev scores (MLflow: a local file store read back; W&B: offline run folders)."""
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "wr-sweeps")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    rep = _sweep(tiny_model, demo_dir, tmp_path / "results", "tracked", lrs=(1e-3, 3e-4),
                 report_to="mlflow,wandb")
    assert rep["trials_run"] == 2 and not rep["missing"]
    # the store by name: Tune's MLflow callback set the driver's tracking URI globally, and a
    # later test's client would read this one instead of its own
    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("wr-sweeps").experiment_id])
    assert len(runs) == 2 and {r.data.tags["wr_train.sweep"] for r in runs} == {"tracked"}
    devs = sorted(r.data.metrics["dev_acc"] for r in runs)
    assert devs == sorted(t["dev_acc"] for t in rep["scores"]["trials"])
    assert len(glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")) == 2


def test_sweep_bad_input_fails_before_any_trial(demo_dir, tiny_model, tmp_path):
    data = str(demo_dir / "tasks")
    with pytest.raises(ExportError, match="not an exported model directory"):
        run_sweep(SweepConfig(str(tmp_path), ["douban"], data, str(tmp_path), "x"))
    with pytest.raises(TaskError, match="not a built-in task"):
        run_sweep(SweepConfig(tiny_model, ["douban", "cmnli"], data, str(tmp_path), "x"))
    with pytest.raises(SweepError, match="learning rates: -1"):
        run_sweep(SweepConfig(tiny_model, ["douban"], data, str(tmp_path), "x", lrs=[-1]))
    with pytest.raises(SweepError, match="--name 'a/b'"):
        run_sweep(SweepConfig(tiny_model, ["douban"], data, str(tmp_path), "a/b"))
    with pytest.raises(SweepError, match="--cpus-per-trial 0: expected a positive number"):
        run_sweep(SweepConfig(tiny_model, ["douban"], data, str(tmp_path), "x", cpus_per_trial=0))
    assert not (tmp_path / "x").exists()
    # a sweep name belongs to one model and one set of settings
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sweep.json").write_text(json.dumps({"model": "m", "model_sha256": "0" * 64}))
    with pytest.raises(SweepError, match="run with another model .*use a new --name"):
        run_sweep(SweepConfig(tiny_model, ["douban"], data, str(tmp_path), "old"))
    assert not (tmp_path / "old" / "trials").exists()


def test_tune_clue_cli_help_and_errors(tiny_model, tmp_path):
    script = str(REPO / "ray_jobs" / "tune_clue.py")
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--batch-sizes" in helped.stdout and "example" in helped.stdout
    bad = subprocess.run([sys.executable, script, "--model", tiny_model, "--data", str(tmp_path),
                          "--tasks", "douban", "--lrs", "1e-4,abc"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "tune_clue: error: --lrs 1e-4,abc: expected comma-separated numbers"


def test_sweep_retries_a_lost_trial_and_keeps_tunes_dir(ray_local, demo_dir, tiny_model, tmp_path):
    """A trial whose worker process dies (as on a reclaimed spot node) runs again by default
    and the sweep ends complete; Tune's experiment directory, TensorBoard events and the
    attempt's error included, stays under STORAGE/NAME/tune/."""
    from ray.util.state import list_actors
    lines: list[str] = []
    killed: list[int] = []

    def log(line: str) -> None:
        lines.append(line)
        if "epoch 1/2" in line and not killed:  # the trial is mid-way: kill its process
            (actor,) = [a for a in list_actors(filters=[("class_name", "=", "ImplicitFunc"),
                                                        ("state", "=", "ALIVE")], detail=True)]
            os.kill(actor.pid, signal.SIGKILL)
            killed.append(actor.pid)

    rep = _sweep(tiny_model, demo_dir, tmp_path, "spot", epochs=(2,), log=log, verbose=True)
    assert killed, lines
    assert rep["trials_run"] == 1 and not rep["missing"] and not rep["failed"], lines
    key = "chnsenticorp-e2-b32-lr0.001-s0"
    retried = [line for line in lines if line.startswith(f"[tune] trial {key} failed (")]
    assert len(retried) == 1 and retried[0].endswith("running it again (retry 1 of 3)"), lines
    rec = json.loads((tmp_path / "spot" / "trials" / f"{key}.json").read_text())
    assert rec["status"] == "done" and len(rec["epochs"]) == 2
    tune_dir = tmp_path / "spot" / "tune"
    (trial_dir,) = [p for p in tune_dir.iterdir() if p.is_dir() and p.name.startswith(key)]
    assert list(trial_dir.glob("events.out.tfevents*")), sorted(p.name for p in trial_dir.iterdir())
    # the killed attempt's epoch 1, then the retry's epochs 1 and 2
    results = (trial_dir / "result.json").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in results] == [1, 1, 2]
    assert "Failure # 1" in (trial_dir / "error.txt").read_text()
