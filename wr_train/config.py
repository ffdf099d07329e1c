"""Plain dataclass configs: model presets, pretraining stages, optimizer and run settings.

A recipe is a YAML/JSON file that fills `PretrainConfig`; `key=value` overrides use dotted
paths (`model.size=mini`, `stages.0.steps=200`, `optim.lr=3e-4`). Every value, from a file or
an override, is coerced to its field's type (int, float, bool, str, tuple); that and
validation raise `ConfigError` with one line that names the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key/file and what was expected."""


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_plain_name(value: str, key: str) -> str:
    """`value` if it is a plain name (letters, digits, `._-`, not starting with `.`, not
    empty): a run's or a task's name becomes a folder name, so `../x`, `/etc/x`, `a b` or
    `.hidden` would put it elsewhere or hide it. Else a one-line ConfigError naming `key`."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value):
        raise ConfigError(f"{key} {value!r}: expected a plain name: letters, digits and . _ - "
                          f"only, not starting with '.'")
    return value


# UER's BERT configs for the "miniature" Chinese RoBERTa family:
# name -> (layers, hidden, heads, ffn)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "medium": (8, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
}


@dataclass
class ModelConfig:
    size: str = "tiny"  # a preset name, or "custom" with the four numbers below
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    ffn: int = 0
    max_positions: int = 512
    dropout: float = 0.1
    init_std: float = 0.02  # std of the initial weights (BERT's initializer_range)
    position_init: str = "normal"  # "normal" (BERT's) or "sinusoidal" (the learned table starts
                                   # as the Transformer's sin/cos, scaled to init_std)
    output_bias: str = "zero"  # the MLM head's bias at the start of pretraining: "zero" (BERT's)
                               # or "unigram" (log frequencies of the shards' train tokens)
    vocab_size: int = 0  # 0 = taken from the spm model

    def resolved(self) -> "ModelConfig":
        """Fill layers/hidden/heads/ffn from the preset (explicit non-zero values win)."""
        if self.size != "custom":
            if self.size not in PRESETS:
                raise ConfigError(
                    f"model.size: unknown preset {self.size!r}; expected one of "
                    f"{', '.join(PRESETS)} or 'custom'")
            numbers = dict(zip(("layers", "hidden", "heads", "ffn"), PRESETS[self.size]))
            numbers = {k: getattr(self, k) or v for k, v in numbers.items()}
            out = dataclasses.replace(self, **numbers)
        else:
            out = self
        for key in ("layers", "hidden", "heads", "ffn"):
            if getattr(out, key) <= 0:
                raise ConfigError(f"model.{key}: expected a positive integer for size 'custom'")
        if out.position_init not in ("normal", "sinusoidal"):
            raise ConfigError(f"model.position_init: expected 'normal' or 'sinusoidal', got {out.position_init!r}")
        if out.output_bias not in ("zero", "unigram"):
            raise ConfigError(f"model.output_bias: expected 'zero' or 'unigram', got {out.output_bias!r}")
        if out.hidden % out.heads:
            raise ConfigError(f"model.hidden={out.hidden} is not divisible by model.heads={out.heads}")
        return out


@dataclass
class StageConfig:
    """One pretraining stage: its shards, its length and its batch/lr schedule."""
    name: str = "stage1"
    shards: str = ""          # dir or s3:// made by `wr-train preprocess`
    steps: int = 1000         # optimizer steps in this stage
    global_batch: int = 512   # sequences per optimizer step over all workers
    micro_batch: int = 64     # sequences per worker per forward pass
    lr: float = 1e-4
    warmup: float = 0.1       # fraction of the stage's steps
    decay: float = 1.0        # the lr falls linearly to 0 over this last fraction of the steps
                              # (1.0: from the end of warmup on, BERT's; less: constant between)


@dataclass
class OptimConfig:
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    clip: float = 1.0


@dataclass
class MaskConfig:
    prob: float = 0.15
    span: bool = False        # geometric span masking (UER's span_masking)
    span_p: float = 0.2
    span_max: int = 10
    mask_share: float = 0.8   # of the targets, shown as [MASK]; BERT's 80/10/10
    random_share: float = 0.1  # shown as a random token; the rest stay unchanged


@dataclass
class ProbeConfig:
    """A downstream probe at every checkpoint (wr_train.probe): a short fine-tuning of the
    checkpoint's weights on a capped task, run beside training; its dev accuracy is
    `probe_acc` in metrics.jsonl, the task's majority share `probe_floor`. Off while
    `task` is empty. Not a training setting: a resume may switch it on, off or change it."""
    task: str = ""            # a built-in task (chnsenticorp, ...) or a user task's folder under `data`
    data: str = ""            # the local folder holding TASK/train.* and dev.* (read by the driver)
    train_examples: int = 1000  # a fixed random subset of the train split (the same at every checkpoint)
    eval_examples: int = 500  # the first N dev rows
    epochs: int = 2
    batch_size: int = 32
    lrs: str = "1e-4,3e-4"    # the grid: one fine-tuning per lr, the best dev accuracy is probe_acc
    seq_length: int = 128
    cpus: float = 0.0         # CPUs Ray reserves for a probe (0: it shares the workers' cores; its
                              # torch threads: max(1, cpus)); on a cluster with spare cores, more
    gpus: float = 0.0         # GPUs Ray reserves for a probe (the workers hold theirs)
    timeout_s: float = 1800.0  # a probe running longer is cancelled, its checkpoint left unprobed

    def validate(self, max_positions: int = 512) -> "ProbeConfig":
        if not self.task:
            return self
        check_plain_name(self.task, "probe.task (--probe)")
        if not self.data:
            raise ConfigError(f"probe.data (--probe-data): expected the folder holding "
                              f"{self.task}/train.* and dev.* for probe.task {self.task!r}")
        if "://" in self.data:
            raise ConfigError(f"probe.data {self.data}: expected a local folder (the driver reads the "
                              f"task and hands the probes its examples)")
        for key in ("train_examples", "eval_examples", "epochs", "batch_size"):
            _in_range(f"probe.{key}", getattr(self, key), ">= 1 (a probe is short and capped)",
                      getattr(self, key) >= 1)
        _in_range("probe.seq_length", self.seq_length, f"8..model.max_positions ({max_positions})",
                  8 <= self.seq_length <= max_positions)
        self.learning_rates()
        _in_range("probe.cpus", self.cpus, ">= 0", self.cpus >= 0)
        _in_range("probe.gpus", self.gpus, ">= 0", self.gpus >= 0)
        _in_range("probe.timeout_s", self.timeout_s, "> 0 seconds", self.timeout_s > 0)
        return self

    def learning_rates(self) -> list[float]:
        """`lrs` as numbers: a comma list of positive learning rates."""
        from wr_train.tune_trials import SweepError, parse_list
        try:
            return parse_list(self.lrs, float, "probe.lrs")
        except SweepError as e:
            raise ConfigError(str(e)) from None


@dataclass
class PretrainConfig:
    name: str = "wr-run"
    storage: str = "runs"     # dir or s3://bucket/prefix; the run lives in STORAGE/NAME
    workers: int = 2          # Ray Train workers (the most, with min_workers)
    min_workers: int = 0      # elastic: keep training on min_workers..workers (0 = always `workers`)
    gpu: bool = False
    cpus_per_worker: float = 1.0
    seed: int = 42
    precision: str = "auto"   # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    zero_stage: int = 2
    ds_config: str = ""       # a DeepSpeed JSON (file or a name in ds_configs/); "" = from zero_stage/precision
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0
    report_every: int = 10
    fail_at_step: int = 0     # fault-injection for tests/drills: rank 0 raises once at this global step
    shuffle_window: int = 16  # row groups (of ~1k rows each) whose rows are mixed at a time, over all partitions
    partitions: int = 16      # fixed streams of row groups that every global batch draws from equally (the
                              # batches do not depend on the worker count); >= workers reads each group once
    eval_rows: int = 1024     # held-out rows evaluated at every checkpoint (0 = no evaluation)
    budget: str = ""          # train to a budget: wall-clock (30m, 8h) or tokens (2e9tok); sets the stages'
                              # steps and schedules to end there ("" = the stages' steps)
    report_to: str = "tensorboard"  # trackers, a comma list of tensorboard, mlflow, wandb (or none)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self, need_shards: bool = True) -> "PretrainConfig":
        """Every setting in its range, each bad one a one-line ConfigError naming the key
        and the range: what Ray, DeepSpeed or numpy would refuse only inside a worker (or,
        worse, accept and train nothing) fails here, before anything starts.
        need_shards=False: a stage may lack its shards (a recipe printed, not run)."""
        self.model = self.model.resolved()
        check_plain_name(self.name, "name (--name)")
        if self.workers < 1:
            raise ConfigError(f"workers: expected >= 1, got {self.workers}")
        _in_range("min_workers", self.min_workers, f"0 (a fixed worker count) or 1..workers ({self.workers})",
                  0 <= self.min_workers <= self.workers)
        _in_range("partitions", self.partitions, ">= 1 (fixed streams of row groups; at most one per "
                  "row group is used)", self.partitions >= 1)
        _in_range("seed", self.seed, ">= 0 (numpy seeds are non-negative)", self.seed >= 0)
        _in_range("cpus_per_worker", self.cpus_per_worker, "> 0", self.cpus_per_worker > 0)
        _in_range("keep_checkpoints", self.keep_checkpoints, ">= 1 (checkpoints kept in the run folder)",
                  self.keep_checkpoints >= 1)
        _in_range("max_failures", self.max_failures, ">= 0 restarts after a worker failure, or -1 for "
                  "unlimited", self.max_failures >= -1)
        _in_range("fail_at_step", self.fail_at_step, ">= 0 (0 = no injected failure)", self.fail_at_step >= 0)
        model = self.model
        _in_range("model.dropout", model.dropout, "0 <= dropout < 1", 0 <= model.dropout < 1)
        _in_range("model.init_std", model.init_std, "> 0", model.init_std > 0)
        _in_range("model.vocab_size", model.vocab_size, ">= 0 (0 = the spm model's)", model.vocab_size >= 0)
        o = self.optim
        for i, beta in enumerate(o.betas):
            _in_range(f"optim.betas.{i}", beta, "0 <= beta < 1 (Adam's betas)", 0 <= beta < 1)
        _in_range("optim.eps", o.eps, "> 0", o.eps > 0)
        _in_range("optim.weight_decay", o.weight_decay, ">= 0", o.weight_decay >= 0)
        _in_range("optim.clip", o.clip, ">= 0 (0 = no clipping)", o.clip >= 0)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: expected auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: expected 0-3, got {self.zero_stage}")
        if not self.stages:
            raise ConfigError("stages: expected at least one stage")
        for i, st in enumerate(self.stages):
            key = f"stages.{i}"
            if st.steps <= 0:
                raise ConfigError(f"{key}.steps: expected a positive step count, got {st.steps}")
            _in_range(f"{key}.lr", st.lr, "> 0", st.lr > 0)
            if need_shards and not st.shards:
                raise ConfigError(f"{key}.shards: expected a shard directory (made by `wr-train preprocess`)")
            if st.micro_batch <= 0 or st.global_batch < self.workers:
                raise ConfigError(f"{key}: expected micro_batch >= 1 and global_batch >= workers (each "
                                  f"worker takes at least one row), got micro_batch {st.micro_batch}, "
                                  f"global_batch {st.global_batch}, workers {self.workers}")
            if not 0 <= st.warmup < 1 or not 0 < st.decay <= 1:
                raise ConfigError(f"{key}.warmup / {key}.decay: expected fractions of the steps, "
                                  f"0 <= warmup < 1 and 0 < decay <= 1 (got {st.warmup}, {st.decay})")
        if self.checkpoint_every <= 0 or self.report_every <= 0:
            raise ConfigError("checkpoint_every/report_every: expected positive step counts")
        if self.shuffle_window < 1:
            raise ConfigError(f"shuffle_window: expected >= 1 row group, got {self.shuffle_window}")
        from wr_train.tracking import TrackingError, parse_report_to
        try:
            parse_report_to(self.report_to, "report_to (--report-to)")
        except TrackingError as e:
            raise ConfigError(str(e)) from None
        if self.eval_rows < 0:
            raise ConfigError(f"eval_rows: expected >= 0, got {self.eval_rows}")
        from wr_train.budget import parse_budget
        parse_budget(self.budget)
        m = self.mask
        if not (0 < m.prob < 1 and m.mask_share >= 0 and m.random_share >= 0
                and m.mask_share + m.random_share <= 1):
            raise ConfigError(f"mask: expected 0 < prob < 1 and shares >= 0 with mask_share + "
                              f"random_share <= 1 (got prob {m.prob}, mask_share {m.mask_share}, "
                              f"random_share {m.random_share})")
        _in_range("mask.span_p", m.span_p, "0 < span_p <= 1 (the geometric span length's p)",
                  0 < m.span_p <= 1)
        _in_range("mask.span_max", m.span_max, ">= 1 token", m.span_max >= 1)
        self.probe.validate(self.model.max_positions)
        return self


def _in_range(key: str, value, expected: str, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value}")


def grad_accum(global_batch: int, micro_batch: int, workers: int) -> int:
    """Micro-batches per optimizer step on each worker: enough for its share of the global
    batch at `micro_batch` rows at most (exactly micro_batch rows when the counts divide)."""
    rows = -(-global_batch // workers)
    return -(-rows // micro_batch)


def worker_rows(global_batch: int, rank: int, workers: int) -> tuple[int, int]:
    """Worker `rank`'s rows [start, stop) of each global batch: an even split, the
    global batch the same whatever the worker count."""
    return rank * global_batch // workers, (rank + 1) * global_batch // workers


def _from_dict(cls, data: dict, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys by name and coercing each
    value to its field's type (YAML reads `1e-4` as a string, `2.0` as a float)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown key; expected one of {', '.join(fields)}")
        sub = _NESTED.get((cls, key))
        if sub is list:
            if not isinstance(value, list):
                raise ConfigError(f"{where}{key}: expected a list of stages, got {type(value).__name__}")
            kwargs[key] = [_from_dict(StageConfig, v, f"{where}{key}.{i}.") for i, v in enumerate(value)]
        elif sub is not None:
            kwargs[key] = _from_dict(sub, value, f"{where}{key}.")
        else:
            kwargs[key] = coerce(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def _field_types(cls) -> dict[str, Any]:
    """Field name -> its real type (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as a field of type `hint` (str, int, float, bool or a tuple of them), or a
    one-line ConfigError naming `key` and the type expected."""
    if typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
            raise ConfigError(f"{key}: expected a list of {len(kinds)} numbers, got {value!r}")
        return tuple(coerce(v, kind, f"{key}.{i}") for i, (v, kind) in enumerate(zip(value, kinds)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        return _as_int(value, key)
    if hint is float:
        return _as_float(value, key, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` is meant as a name
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _as_float(value: Any, key: str, expected: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    # nan/inf parse as floats, but no setting means them (an lr of nan trains nothing)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return number


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass  # maybe `1e3` or `100.0`
    number = _as_float(value, key, "an integer")
    if not number.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(number)


_NESTED = {
    (PretrainConfig, "model"): ModelConfig,
    (PretrainConfig, "stages"): list,
    (PretrainConfig, "optim"): OptimConfig,
    (PretrainConfig, "mask"): MaskConfig,
    (PretrainConfig, "probe"): ProbeConfig,
}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of one shipped in wr_train/recipes (e.g. 'demo-tiny')."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = resources.files("wr_train") / "recipes" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name[:-5] for p in (resources.files("wr_train") / "recipes").iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"--config {name_or_path}: no such file or shipped recipe ({', '.join(names)})")


def load_config(path: str | None = None, overrides: list[str] = ()) -> PretrainConfig:
    data: dict = {}
    if path:
        p = recipe_path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    try:
        cfg = _from_dict(PretrainConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    for item in overrides:
        apply_override(cfg, item)
    return cfg


# Short keys for a one-stage recipe's stage settings: `lr=1e-3` is `stages.0.lr=1e-3`.
STAGE_ALIASES = ("lr", "steps", "warmup", "decay", "global_batch", "micro_batch")


def apply_override(cfg: Any, item: str) -> None:
    """Apply one `dotted.key=value`, the value coerced to the field's type as a recipe's
    is (a string field takes the text as typed: `name=007` stays "007"). On a one-stage
    PretrainConfig a STAGE_ALIASES key stands for its `stages.0.` key; an unknown key's
    error names the keys it may have meant."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    where = f"override {key}"
    if isinstance(cfg, PretrainConfig) and key in STAGE_ALIASES and len(cfg.stages) == 1:
        key = f"stages.0.{key}"
    hint = _did_you_mean(cfg, key)
    target, parts = cfg, key.split(".")
    for part in parts[:-1]:
        target = _child(target, part, where, hint)
    last = parts[-1]
    if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"{where}: unknown key {last!r}{hint}")
    hint = _field_types(type(target))[last]
    if dataclasses.is_dataclass(getattr(target, last)) or isinstance(getattr(target, last), list):
        raise ConfigError(f"{where}: a group of settings, not one; set one of its keys "
                          f"(e.g. {key}.{_first_key(getattr(target, last))}=…)")
    if typing.get_origin(hint) is tuple:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{where}: expected a list like [0.9, 0.999], got {raw!r}") from None
    else:
        value = raw
    setattr(target, last, coerce(value, hint, where))


def _child(target: Any, part: str, where: str, hint: str = "") -> Any:
    """One step down a dotted key: a stage by its number, or a group by its name."""
    if isinstance(target, list):
        if not part.isdigit() or int(part) >= len(target):
            raise ConfigError(f"{where}: no stage {part!r}; the recipe has {len(target)} "
                              f"stage(s), stages.0 to stages.{len(target) - 1}")
        return target[int(part)]
    if not dataclasses.is_dataclass(target) or not hasattr(target, part):
        raise ConfigError(f"{where}: unknown key {part!r}{hint}")
    child = getattr(target, part)
    if not (dataclasses.is_dataclass(child) or isinstance(child, list)):
        raise ConfigError(f"{where}: {part} is a single setting, it has no sub-keys")
    return child


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key an override can set on `cfg` (stages by number)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                keys += _leaf_keys(item, f"{prefix}{f.name}.{i}.")
        elif dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _did_you_mean(cfg: Any, key: str) -> str:
    """"" for a key an override can set, else "; did you mean …?" naming the keys that end
    in the same name (every stage's, for a stage key) or, failing those, look alike."""
    if not dataclasses.is_dataclass(cfg):
        return ""
    keys = _leaf_keys(cfg)
    if key in keys:
        return ""
    name = key.rsplit(".", 1)[-1]
    found = ([k for k in keys if k.rsplit(".", 1)[-1] == name]
             or difflib.get_close_matches(key, keys, n=2, cutoff=0.8))
    if not found:
        return ""
    return f"; did you mean {', '.join(found[:-1]) + ' or ' if len(found) > 1 else ''}{found[-1]}?"


def _first_key(group: Any) -> str:
    return "0.steps" if isinstance(group, list) else dataclasses.fields(group)[0].name


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict) -> PretrainConfig:
    return _from_dict(PretrainConfig, data, "")


# Settings that shape training: a resumed run must keep them (wr_train.checkpoint refuses a
# change, naming the key and both values). The data order and masks are pure functions of
# the top-level keys and mask.*, the saved weights and optimizer states fit only model.*,
# precision and zero_stage, and each begun stage's schedule is fixed by its batch and lr
# keys. A begun stage's `steps` may grow (the schedule stretches, said in one line).
RESUME_TOP = ("seed", "shuffle_window", "partitions", "precision", "zero_stage", "eval_rows")
RESUME_GROUPS = ("model", "mask", "optim")
RESUME_STAGE = ("name", "global_batch", "micro_batch", "lr", "warmup", "decay")
# The value a checkpoint saved before a key existed stands for (else the key is skipped).
RESUME_DEFAULTS = {"shuffle_window": 1}


def training_settings(config: dict, stages: int) -> dict[str, Any]:
    """{dotted key: value} of every setting a resume must keep, for the first `stages`
    stages of a resolved config dict (as `to_dict` writes it into state.json)."""
    out = {key: config.get(key, RESUME_DEFAULTS.get(key)) for key in RESUME_TOP}
    for group in RESUME_GROUPS:
        out.update({f"{group}.{k}": v for k, v in (config.get(group) or {}).items()})
    for i, stage in enumerate((config.get("stages") or [])[:stages]):
        out.update({f"stages.{i}.{k}": stage.get(k) for k in RESUME_STAGE})
    return {k: v for k, v in out.items() if v is not None}
