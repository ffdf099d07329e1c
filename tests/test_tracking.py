"""--report-to: pretraining's metrics, recipe and plots in MLflow (a local file store, read
back with MlflowClient) and W&B (offline mode, its run file read back), and export's
model card added to the same MLflow run."""
from __future__ import annotations

import glob
import struct
import sys

import pytest

from tests.conftest import pretrain_cfg
from wr_train import pretrain
from wr_train.config import ConfigError
from wr_train.tracking import TrackingError, check_installed, parse_report_to

pytestmark = pytest.mark.integration


def wandb_records(path: str):
    """The records of a W&B run file (.wandb: LevelDB's log format, 32 KiB blocks, after a
    7-byte header), as wandb_internal_pb2.Record-s."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    i, block, parts = 7, 32768, b""
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:
            i += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if length == 0 and kind == 0:
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + length], i + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(parts + chunk if kind == 4 else chunk)
            yield record
        parts = chunk if kind == 2 else parts + chunk if kind == 3 else b""


def test_pretrain_reports_to_mlflow_and_wandb(pretrained_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    cfg, _ = pretrained_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "wr-tests")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = pretrain_cfg(cfg.stages[0].shards, tmp_path / "runs", "tracked", steps=10,
                       report_to="tensorboard,mlflow,wandb")
    last = pretrain.run(run)
    m = {r["step"]: r for r in map(__import__("json").loads,
                                   (tmp_path / "runs" / "tracked" / "metrics.jsonl").read_text().splitlines())}

    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")  # (an earlier test's global URI may linger)
    exp = client.get_experiment_by_name("wr-tests")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "tracked" and mrun.info.status == "FINISHED"
    assert mrun.data.params["stages.0.lr"] == "0.001" and mrun.data.params["model.size"] == "tiny"
    loss = client.get_metric_history(mrun.info.run_id, "pretrain/loss")
    assert [(x.step, x.value) for x in loss] == [(5, pytest.approx(m[5]["loss"])), (10, pytest.approx(m[10]["loss"]))]
    evals = client.get_metric_history(mrun.info.run_id, "pretrain/eval_loss")
    assert [x.step for x in evals] == [10]
    floor = client.get_metric_history(mrun.info.run_id, "pretrain/unigram_floor")
    assert floor[0].value == pytest.approx(m[10]["unigram_floor"])
    assert [a.path for a in client.list_artifacts(mrun.info.run_id)] == ["loss.png"]

    (run_file,) = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    assert [(int(h["_step"]), float(h["pretrain/loss"])) for h in history] == [
        (5, pytest.approx(m[5]["loss"])), (10, pytest.approx(m[10]["loss"]))]
    assert glob.glob(f"{tmp_path}/wandb/offline-run-*/files/loss.png")

    # export adds the model card (and plot) to the same MLflow run
    from wr_train.export import export_checkpoint
    export_checkpoint(last, str(tmp_path / "hf"))
    exported = [a.path for a in client.list_artifacts(mrun.info.run_id, "export")]
    assert exported == ["export/README.md", "export/loss.png"]


def test_report_to_names_known_trackers_and_their_extras(monkeypatch):
    assert parse_report_to("tensorboard, MLflow,mlflow") == ("tensorboard", "mlflow")
    assert parse_report_to("none") == ()
    with pytest.raises(TrackingError, match=r"--report-to 'tb': unknown tracker 'tb'; expected a comma list "
                                            r"of tensorboard, mlflow, wandb \(or none\)"):
        parse_report_to("tb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(TrackingError, match=r"--report-to wandb: wandb is not installed; "
                                            r"pip install 'wr-train\[wandb\]'"):
        check_installed(("tensorboard", "wandb"))


def test_bad_report_to_fails_before_any_worker(shards128, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"report_to \(--report-to\) 'mlfow': unknown tracker 'mlfow'"):
        pretrain_cfg(shards128, tmp_path, "x", report_to="mlfow")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = pretrain_cfg(shards128, tmp_path, "x", report_to="mlflow")
    with pytest.raises(ConfigError, match=r"mlflow is not installed; pip install 'wr-train\[mlflow\]'"):
        pretrain.preflight(cfg)
