"""The downstream probe at every checkpoint (wr_train.probe, `probe.*`): its settings, the
queue rank 0 keeps, the card and plot, and (integration) a pretraining run whose
checkpoints are probed beside training on a demo stand-in task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from wr_train.config import ConfigError, ProbeConfig, load_config, to_dict, training_settings

PROBED = ["probe.task=chnsenticorp", "probe.data=/data/tasks"]


# ---------------------------------------------------------------- settings (no Ray)

def test_probe_is_off_by_default_and_not_a_training_setting():
    cfg = load_config("demo-tiny", ["stages.0.shards=x"]).validate()
    assert cfg.probe.task == ""
    probed = load_config("demo-tiny", ["stages.0.shards=x", *PROBED, "probe.lrs=1e-4,3e-4"]).validate()
    assert probed.probe.learning_rates() == [1e-4, 3e-4]
    # a resume may switch the probe on, off or change it
    assert not [k for k in training_settings(to_dict(probed), 1) if k.startswith("probe")]
    assert training_settings(to_dict(probed), 1) == training_settings(to_dict(cfg), 1)


@pytest.mark.parametrize("item, says", [
    ("probe.task=../x", r"^probe\.task \(--probe\) '\.\./x': expected a plain name"),
    ("probe.data=", r"^probe\.data \(--probe-data\): expected the folder holding chnsenticorp/train"),
    ("probe.data=s3://b/tasks", r"^probe\.data s3://b/tasks: expected a local folder"),
    ("probe.train_examples=0", r"^probe\.train_examples: expected >= 1 .*, got 0$"),
    ("probe.eval_examples=-1", r"^probe\.eval_examples: expected >= 1 .*, got -1$"),
    ("probe.epochs=0", r"^probe\.epochs: expected >= 1"),
    ("probe.batch_size=0", r"^probe\.batch_size: expected >= 1"),
    ("probe.seq_length=4", r"^probe\.seq_length: expected 8\.\.model\.max_positions \(512\), got 4$"),
    ("probe.lrs=1e-4,fast", r"^probe\.lrs 1e-4,fast: expected comma-separated numbers$"),
    ("probe.lrs=-1e-4", r"^probe\.lrs: -0\.0001 is not a positive number$"),
    ("probe.cpus=-1", r"^probe\.cpus: expected >= 0, got -1"),
    ("probe.timeout_s=0", r"^probe\.timeout_s: expected > 0 seconds, got 0"),
])
def test_bad_probe_settings_are_one_line_errors_naming_the_key(item, says):
    cfg = load_config("demo-tiny", ["stages.0.shards=x", *PROBED, item])
    with pytest.raises(ConfigError, match=says) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_unknown_probe_key_names_the_group():
    with pytest.raises(ConfigError, match=r"^override probe\.lr: unknown key 'lr'"):
        load_config("demo-tiny", ["probe.lr=1e-3"])
    from wr_train.config import from_dict
    with pytest.raises(ConfigError, match=r"^probe: expected a mapping, got str$"):
        from_dict({"probe": "chnsenticorp"})


def test_cli_probe_flags_set_the_probe(tmp_path, capsys):
    from wr_train.cli import _parser, main, parse_with_overrides, pretrain_config
    args = parse_with_overrides(_parser(), ["pretrain", "--config", "demo-tiny", "--shards", "x",
                                            "--probe", "chnsenticorp", "--probe-data", str(tmp_path),
                                            "probe.epochs=1"])
    cfg = pretrain_config(args)
    assert (cfg.probe.task, cfg.probe.data, cfg.probe.epochs) == ("chnsenticorp", str(tmp_path), 1)
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--probe TASK" in help_text and "--probe-data DIR" in help_text and "probe_acc" in help_text


def write_task(root: Path, name: str = "chnsenticorp", train: int = 40, dev: int = 20) -> Path:
    """A tiny UER TSV task: label 1 on 3 of 4 rows (majority share 75%)."""
    folder = root / name
    folder.mkdir(parents=True)
    for split, n in (("train", train), ("dev", dev)):
        rows = [f"{int(i % 4 != 0)}\t这家店第{i}次很好" for i in range(n)]
        (folder / f"{split}.tsv").write_text("label\ttext_a\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_capped_task_and_its_floor(tmp_path):
    from wr_train.probe import capped_task, task_floor
    data = write_task(tmp_path)
    cfg = ProbeConfig(task="chnsenticorp", data=str(data), train_examples=12, eval_examples=8)
    task = capped_task(cfg)
    assert len(task.train) == 12 and len(task.dev) == 8 and task.test == []
    assert [e.text_a for e in capped_task(cfg).train] == [e.text_a for e in task.train]  # the same subset
    assert task_floor(task) == pytest.approx(sum(e.label == 1 for e in task.dev) / 8)


def test_bad_probe_task_fails_on_the_driver(tmp_path):
    from wr_train import pretrain
    cfg = load_config("demo-tiny", ["stages.0.shards=x", "probe.task=nosuch", f"probe.data={tmp_path}"]).validate()
    with pytest.raises(ConfigError, match=r"^probe\.task nosuch \(probe\.data .*\): task 'nosuch'"):
        pretrain._probe_task(cfg, log=lambda *_: None)


def test_late_keys_reach_a_checkpoints_rows_from_its_run(tmp_path):
    """A checkpoint's own metrics.jsonl is sealed before its probe lands: export and a
    resume see the run's later keys for its steps; a copy outside its run folder does not."""
    from wr_train.checkpoint import checkpoint_name, with_late_keys
    own = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0, "eval_loss": 4.1}]
    run = [{"step": 10, "loss": 5.0, "probe_acc": 0.6}, {"step": 20, "loss": 4.0, "eval_loss": 4.1,
           "probe_acc": 0.7, "probe_floor": 0.5}, {"step": 30, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run))
    ckpt = str(tmp_path / checkpoint_name(20))
    merged = with_late_keys(ckpt, own, 20)
    assert [r.get("probe_acc") for r in merged] == [0.6, 0.7] and merged[1]["probe_floor"] == 0.5
    assert [r["step"] for r in merged] == [10, 20]  # no rows of later steps
    assert with_late_keys(str(tmp_path / "pulled"), own, 20) == own
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "lo')  # torn: the checkpoint's rows stand
    assert with_late_keys(ckpt, own, 20) == own


def test_card_and_plot_show_the_probe(tmp_path):
    from wr_train.config import PretrainConfig
    from wr_train.export import model_card
    from wr_train.tracking import loss_plot
    history = [{"step": 10, "loss": 6.0, "mlm_acc": 0.05},
               {"step": 20, "loss": 5.0, "mlm_acc": 0.08, "eval_loss": 5.1, "eval_acc": 0.1,
                "probe_task": "chnsenticorp", "probe_acc": 0.712, "probe_floor": 0.506, "probe_lr": 1e-3,
                "probe_train_examples": 1000}]
    plot = loss_plot(history, tmp_path / "loss.png")
    assert plot == "loss.png" and (tmp_path / "loss.png").stat().st_size > 0
    state = {"vocab_size": 8000, "step": 20, "stage": 0, "stage_name": "seq128", "stage_step": 20,
             "stage_steps": 20, "world_size": 2}
    card = model_card(PretrainConfig(), state, {}, history, plot)
    assert ("| downstream probe (chnsenticorp) | dev accuracy 71.2% at step 20 (majority class 50.6%; "
            "fine-tuned on 1,000 examples, lr 0.001) |") in card
    assert "Right axis: the downstream probe's dev accuracy" in card


def test_demo_summary_names_the_probe():
    from wr_train.demo.run import DEMO_PROBE, pretrain_summary
    final = {"step": 2400, "eval_loss": 6.9, "eval_acc": 0.07, "unigram_floor": 7.42, "unigram_acc": 0.061,
             "probe_task": DEMO_PROBE, "probe_acc": 0.712, "probe_floor": 0.506, "probe_train_examples": 1000}
    assert ("downstream probe of its last checkpoint (chnsenticorp, fine-tuned on 1,000 examples): "
            "dev accuracy 71.2%, against 50.6%") in pretrain_summary(final, 240)


class FakeRay:
    """ray.wait / ray.get / ray.cancel over refs that are ready when the test says."""

    def __init__(self):
        self.ready, self.cancelled = {}, []

    def wait(self, refs, timeout=None):
        done = [r for r in refs if r in self.ready]
        return done, [r for r in refs if r not in done]

    def get(self, ref):
        return self.ready[ref]

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


def fake_probes(monkeypatch, timeout_s: float = 60.0):
    """A pretrain._Probes with its Ray calls faked: launches are recorded as (ckpt, step)."""
    import ray

    from wr_train import pretrain
    fake, lines, launched = FakeRay(), [], []
    for name in ("wait", "get", "cancel"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    probes = object.__new__(pretrain._Probes)
    probes.cfg, probes.log, probes.task = ProbeConfig(timeout_s=timeout_s), lines.append, None
    probes.running = probes.waiting = None

    class Launch:
        def remote(self, ckpt, task, cfg):
            launched.append(ckpt)
            return ckpt
    probes.launch = Launch()
    return probes, fake, lines, launched


def test_one_probe_runs_and_only_the_newest_checkpoint_waits(monkeypatch):
    probes, fake, lines, launched = fake_probes(monkeypatch)
    probes.add("c10", 10)
    probes.add("c20", 20)
    probes.add("c30", 30)  # c20 never started: c30 is newer
    assert launched == ["c10"] and lines == ["probe: step 20 skipped (step 10's probe was still running "
                                             "when step 30 was saved)"]
    assert probes.poll() == []  # nothing landed: no waiting
    fake.ready["c10"] = {"step": 10}
    assert probes.poll() == [{"step": 10}] and launched == ["c10", "c30"]
    fake.ready["c30"] = {"step": 30}
    assert probes.poll(wait=True) == [{"step": 30}] and probes.running is None


def test_a_probe_past_its_timeout_is_cancelled(monkeypatch):
    probes, fake, lines, _ = fake_probes(monkeypatch, timeout_s=1e-9)
    probes.add("c10", 10)
    assert probes.poll() == [] and fake.cancelled == ["c10"] and probes.running is None
    assert "probe: step 10 gave no result within probe.timeout_s=1e-09: cancelled" in lines[-1]


# ---------------------------------------------------------------- on Ray (integration)

SMALL_PROBE = dict(task="chnsenticorp", train_examples=200, eval_examples=100, epochs=1, lrs="1e-3",
                   seq_length=32)


@pytest.mark.integration
def test_probe_of_the_shared_runs_checkpoint(pretrained_run, demo_dir):
    from wr_train.probe import capped_task, probe_checkpoint, task_floor
    _, last = pretrained_run
    cfg = ProbeConfig(data=str(demo_dir / "tasks"), **SMALL_PROBE)
    task = capped_task(cfg)
    result = probe_checkpoint(last, task, cfg)
    assert result["step"] == 30 and result["probe_task"] == "chnsenticorp"
    assert result["probe_floor"] == pytest.approx(task_floor(task))
    assert 0.3 < result["probe_floor"] < 0.8 and 0.25 < result["probe_acc"] <= 1.0
    assert result["probe_train_examples"] == 200 and result["probe_lr"] == 1e-3


@pytest.mark.integration
def test_pretraining_probes_every_checkpoint(ray_local, shards128, demo_dir, tmp_path):
    """Both checkpoints of a 20-step run are probed beside training; the results sit in
    their rows of metrics.jsonl next to eval_loss, in TensorBoard and in the exported card
    (the last checkpoint's own metrics.jsonl was sealed before its probe landed); the same
    command again re-probes a final checkpoint whose result was lost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import pretrain_cfg
    from tests.test_pretrain import metrics_of
    from wr_train import pretrain
    from wr_train.export import export_checkpoint
    from wr_train.probe import capped_task, task_floor
    probe = ProbeConfig(data=str(demo_dir / "tasks"), **SMALL_PROBE)
    cfg = pretrain_cfg(shards128, tmp_path, "probed", steps=20, probe=probe)
    last = pretrain.run(cfg)
    run_dir = tmp_path / "probed"
    m = metrics_of(run_dir)
    assert [s for s in sorted(m) if "probe_acc" in m[s]] == [10, 20]
    assert [s for s in sorted(m) if "eval_loss" in m[s]] == [10, 20]  # the same rows
    floor = task_floor(capped_task(probe))
    for s in (10, 20):
        assert m[s]["probe_floor"] == pytest.approx(floor) and 0.25 < m[s]["probe_acc"] <= 1.0
        assert m[s]["probe_task"] == "chnsenticorp" and m[s]["probe_train_examples"] == 200

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("pretrain/probe_acc")] == [10, 20]
    assert [e.step for e in events.Scalars("pretrain/probe_floor")] == [10, 20]

    hf = export_checkpoint(last, str(tmp_path / "hf"), log=lambda *_: None)
    card = (hf / "README.md").read_text(encoding="utf-8")
    assert f"| downstream probe (chnsenticorp) | dev accuracy {m[20]['probe_acc']:.1%} at step 20 " in card

    # a lost result (the run stopped before it landed): the same command probes it again
    rows = [{k: v for k, v in m[s].items() if not (s == 20 and k.startswith("probe_"))} for s in sorted(m)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pretrain.run(cfg) == last
    again = metrics_of(run_dir)
    assert "probe_acc" in again[20] and again[10]["probe_acc"] == m[10]["probe_acc"]
