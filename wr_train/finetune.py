"""One fine-tuning run: an exported model + one task -> dev scores per epoch, test of the best.

The seed's protocol (UER run_classifier): BertForSequenceClassification on [CLS], sequences
`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with token types, AdamW with linear warmup and
decay, dev accuracy after every epoch, and the test score of the epoch with the best dev
accuracy. Macro-F1 is reported beside accuracy. bf16 autocast on GPU, fp32 on CPU (faster
there, see NOTES.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from wr_train.config import ConfigError, apply_override
from wr_train.hf import check_hf_dir, quiet_transformers
from wr_train.machine import keep_freed_memory
from wr_train.optim import adamw, linear_schedule
from wr_train.tasks import Example, Task, majority_share

SUBSET_SEED = 0  # max_train_examples picks the same subset for every config and seed


@dataclass
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    seq_length: int = 128
    warmup: float = 0.1           # fraction of all optimizer steps
    weight_decay: float = 0.01
    clip: float = 1.0             # gradient norm clip (0 = off)
    seed: int = 7
    max_train_examples: int = 0   # 0 = all; else a fixed random subset
    max_eval_examples: int = 0    # 0 = all dev/test rows; else the first N
    precision: str = "auto"       # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 0              # CPU torch threads; 0 = torch's default

    def validate(self) -> "FinetuneConfig":
        for key in ("epochs", "batch_size", "seq_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        if self.seq_length < 8:
            raise ConfigError(f"seq_length: expected at least 8, got {self.seq_length}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive learning rate, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup: expected a fraction in [0, 1), got {self.warmup}")
        if self.max_train_examples < 0 or self.max_eval_examples < 0 or self.threads < 0:
            raise ConfigError("max_train_examples/max_eval_examples/threads: expected >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: expected auto|fp32|bf16, got {self.precision!r}")
        return self


def config_from_overrides(overrides=(), **base) -> FinetuneConfig:
    """FinetuneConfig from keyword values, then `key=value` strings (CLI overrides)."""
    cfg = FinetuneConfig(**base)
    for item in overrides:
        apply_override(cfg, item)
    return cfg.validate()


# ---------------------------------------------------------------- metrics

def accuracy_f1(gold: list[int], pred: list[int]) -> tuple[float, float]:
    """Accuracy and macro-F1 over the classes that occur in gold or pred (sklearn's default)."""
    if not gold:
        return float("nan"), float("nan")
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return acc, sum(f1s) / len(f1s)


# ---------------------------------------------------------------- data

@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int | None]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: list[Example], seq_length: int) -> Encoded:
    """Token ids ([CLS] a [SEP] (b [SEP])) truncated to seq_length, no padding yet."""
    if not examples:
        return Encoded([], [], [])
    a = [ex.text_a for ex in examples]
    kwargs = dict(truncation=True, max_length=seq_length, return_token_type_ids=True,
                  return_attention_mask=False)
    if examples[0].text_b is not None:
        enc = tokenizer(a, [ex.text_b for ex in examples], **kwargs)
    else:
        enc = tokenizer(a, **kwargs)
    return Encoded(enc["input_ids"], enc["token_type_ids"], [ex.label for ex in examples])


def collate(data: Encoded, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row."""
    width = max(len(data.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        types[row, :n] = torch.tensor(data.token_type_ids[i])
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": (ids != pad_id).long()}


def subset(examples: list[Example], k: int) -> list[Example]:
    if not k or k >= len(examples):
        return examples
    keep = sorted(random.Random(SUBSET_SEED).sample(range(len(examples)), k))
    return [examples[i] for i in keep]


# ---------------------------------------------------------------- the run

def pick_device(cfg: FinetuneConfig) -> tuple[torch.device, torch.dtype | None]:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}: no CUDA device here")
    device = torch.device(name)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, (torch.bfloat16 if precision == "bf16" else None)


@torch.no_grad()
def predict(model, data: Encoded, device, amp_dtype, batch_size: int, pad_id: int) -> list[int]:
    """Argmax predictions in the data's order; batches of similar length (less padding)."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    pred = [0] * len(data)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(data, idx, pad_id).items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(**batch).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            pred[i] = p
    return pred


def load_classifier(model_dir: str, task: Task):
    from transformers import AutoTokenizer, BertForSequenceClassification
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(task.labels),
            id2label=dict(enumerate(task.labels)), label2id={l: i for i, l in enumerate(task.labels)})
    return tokenizer, model


def finetune(model_dir: str, task: Task, cfg: FinetuneConfig,
             report: Callable[[dict], None] | None = None, save_dir: str | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune `model_dir` on `task`. Returns {task, model, config, labels, device,
    precision, threads, train/dev/test_examples, majority_dev, epochs: [{epoch, train_loss,
    dev_acc, dev_f1, train_seconds, examples_per_s, seconds}], best_epoch, dev_acc, dev_f1
    (of the best-dev epoch), test_acc, test_f1 (that epoch's; None without test labels),
    seconds}; accuracies and F1 are fractions.

    After every epoch `report(metrics)` gets that epoch's scores plus the best so far and
    the test score of the best-dev epoch so far (the last call holds the final result).
    `save_dir`: the best-dev epoch's model + tokenizer are saved there.
    """
    check_hf_dir(model_dir)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, amp_dtype = pick_device(cfg)
    keep_freed_memory()  # big per-step CPU tensors reuse memory instead of fresh pages
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    tokenizer, model = load_classifier(model_dir, task)
    max_len = model.config.max_position_embeddings
    if cfg.seq_length > max_len:
        raise ConfigError(f"seq_length={cfg.seq_length}: the model has {max_len} positions")
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train, dev, test = _encode_splits(tokenizer, task, cfg)

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)  # pretraining's groups, fused
    run = _Steps(model, cfg, device, amp_dtype, pad_id, optimizer,
                 linear_schedule(optimizer, int(cfg.warmup * total_steps), total_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    labels_all = torch.tensor(train.labels, dtype=torch.long)
    result = _new_result(model_dir, task, cfg, device, amp_dtype, train, dev, test)
    best = -1.0
    ticker = _Every(30.0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=gen).tolist()
        loss_sum, n_seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            loss_sum += run.train_step(train, labels_all, idx) * len(idx)
            n_seen += len(idx)
            if log and ticker.due():
                log(f"finetune {task.name}: epoch {epoch}/{cfg.epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {loss_sum / n_seen:.4f}")
        train_s = time.perf_counter() - t0
        dev_acc, dev_f1 = run.scores(dev)
        row = {"epoch": epoch, "train_loss": round(loss_sum / max(n_seen, 1), 5),
               "dev_acc": dev_acc, "dev_f1": dev_f1, "train_seconds": round(train_s, 2),
               "examples_per_s": round(n_seen / max(train_s, 1e-9), 1)}
        improved = dev_acc > best
        if improved:
            best = dev_acc
            result.update(best_epoch=epoch, dev_acc=dev_acc, dev_f1=dev_f1)
            if test is not None:
                result["test_acc"], result["test_f1"] = run.scores(test)
            if save_dir:
                _save(model, tokenizer, model_dir, save_dir, task, cfg, result)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        result["epochs"].append(row)
        if log:
            log(f"finetune {task.name}: epoch {epoch}/{cfg.epochs} loss {row['train_loss']:.4f} "
                f"dev acc {100 * dev_acc:.2f} F1 {100 * dev_f1:.2f}{' (best)' if improved else ''} "
                f"[{row['seconds']:.1f}s, {row['examples_per_s']:.0f} ex/s]")
        if report:
            report({**row, "epochs_total": cfg.epochs, "best_epoch": result["best_epoch"],
                    "best_dev_acc": result["dev_acc"], "best_dev_f1": result["dev_f1"],
                    "test_acc": result["test_acc"], "test_f1": result["test_f1"],
                    "majority_dev": result["majority_dev"]})
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    return result


@dataclass
class _Steps:
    """One run's model and what its training steps and evaluations use."""
    model: object
    cfg: FinetuneConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    pad_id: int
    optimizer: object
    scheduler: object

    def train_step(self, data: Encoded, labels_all: torch.Tensor, idx: list[int]) -> float:
        """One optimizer step on the rows `idx`; returns their mean loss."""
        batch = {k: v.to(self.device) for k, v in collate(data, idx, self.pad_id).items()}
        labels = labels_all[idx].to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def scores(self, data: Encoded) -> tuple[float, float]:
        """(accuracy, macro-F1) of the model's predictions on `data`."""
        pred = predict(self.model, data, self.device, self.amp_dtype, max(64, self.cfg.batch_size),
                       self.pad_id)
        return accuracy_f1(data.labels, pred)


class _Every:
    """due() is True at most once every `seconds` (progress lines inside a long epoch)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.perf_counter()

    def due(self) -> bool:
        if time.perf_counter() - self.last > self.seconds:
            self.last = time.perf_counter()
            return True
        return False


def _encode_splits(tokenizer, task: Task, cfg: FinetuneConfig) -> tuple[Encoded, Encoded, Encoded | None]:
    """train (a fixed subset when max_train_examples), dev and test (the first
    max_eval_examples; no test without test labels), encoded."""
    train_rows = subset(task.train, cfg.max_train_examples)
    cap = cfg.max_eval_examples or None
    train = encode(tokenizer, train_rows, cfg.seq_length)
    dev = encode(tokenizer, task.dev[:cap], cfg.seq_length)
    test = encode(tokenizer, task.test[:cap], cfg.seq_length) if task.test_labelled else None
    return train, dev, test


def _new_result(model_dir: str, task: Task, cfg: FinetuneConfig, device, amp_dtype,
                train: Encoded, dev: Encoded, test: Encoded | None) -> dict:
    return {
        "task": task.name, "model": str(model_dir), "config": dataclasses.asdict(cfg),
        "labels": task.labels, "device": str(device),
        "precision": "bf16" if amp_dtype is not None else "fp32",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "train_examples": len(train), "dev_examples": len(dev),
        "test_examples": len(test) if test is not None else 0,
        "majority_dev": majority_share(train.labels, dev.labels),
        "epochs": [], "best_epoch": None, "dev_acc": None, "dev_f1": None,
        "test_acc": None, "test_f1": None,
    }


def _save(model, tokenizer, model_dir: str, save_dir: str, task: Task, cfg: FinetuneConfig,
          result: dict) -> None:
    """The fine-tuned classifier as an HF dir (+ the export's spiece.model, which
    tokenizer.save_pretrained does not write) and finetune.json."""
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    if (Path(model_dir) / "spiece.model").is_file():
        shutil.copy(Path(model_dir) / "spiece.model", out / "spiece.model")
    (out / "finetune.json").write_text(json.dumps(
        {"task": task.name, "labels": task.labels, "config": dataclasses.asdict(cfg),
         "best_epoch": result["best_epoch"], "dev_acc": result["dev_acc"], "dev_f1": result["dev_f1"]},
        indent=1))


# ---------------------------------------------------------------- `wr-train finetune`

def default_result_path(model_dir: str, task_name: str) -> str:
    return os.path.join(model_dir, "finetune", f"{task_name}.json")


def finetune_main(model: str, task_name: str, data_dir: str, out: str | None = None,
                  overrides=(), log=print, save_dir: str | None = None) -> dict:
    """`wr-train finetune`: check inputs, run, print per-epoch progress, write the JSON
    (to `out`, default MODEL/finetune/TASK.json); `save_dir`: keep the fine-tuned model
    (the best-dev epoch's, whose test score the JSON gives) there as an HF directory."""
    from wr_train import storage
    from wr_train.tasks import load_task
    cfg = config_from_overrides(overrides)
    check_hf_dir(model)
    task = load_task(task_name, data_dir)
    path = out or default_result_path(model, task.name)
    log(f"finetune: {task.summary()}; epochs {cfg.epochs}, batch {cfg.batch_size}, lr {cfg.lr:g}, "
        f"seq {cfg.seq_length}")
    result = finetune(model, task, cfg, log=log, save_dir=save_dir)
    storage.write_text(path, json.dumps(result, indent=1, ensure_ascii=False))
    if save_dir:
        log(f"finetune {task.name}: the model of epoch {result['best_epoch']} is in {save_dir}")
    test = (f", test acc {100 * result['test_acc']:.2f} F1 {100 * result['test_f1']:.2f}"
            if result["test_acc"] is not None else " (test unlabelled)")
    log(f"finetune {task.name}: best dev acc {100 * result['dev_acc']:.2f} F1 {100 * result['dev_f1']:.2f} "
        f"at epoch {result['best_epoch']}{test}; majority {100 * result['majority_dev']:.2f}; "
        f"{result['seconds']:.0f}s")
    log(path)
    return result
