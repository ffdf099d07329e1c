"""Training to a budget: `budget: 30m` (wall-clock) or `budget: 2e9tok` (tokens) sets each
stage's steps, and with them its schedule, so that training ends at the budget.

The stages share a budget as the recipe's steps share its tokens (steps × global batch ×
seq length). Tokens: each stage's steps follow on the driver, before anything starts.
Wall-clock: a stage starts on its recipe's steps, measures its own step time after
`WARM_STEPS` steps, sets its steps to end at its share of the deadline, and re-fits once at
`REFIT_AT` of that plan, when evaluations and saves are in the measured time; the schedule
(warmup, constant, decay) is re-shaped to the new end each time. The seconds trained are
saved with each checkpoint (TrainState.trained_s) and a fitted stage's steps with its
config, so a resumed run keeps the deadline and the plan.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from wr_train.config import ConfigError, PretrainConfig, StageConfig

WARM_STEPS = 10   # steps before the first fit (the first ones are slower: allocation, caches)
SKIP_STEPS = 2    # the first steps of a stage are not measured
REFIT_AT = 0.5    # the one re-fit, at this share of the first plan (saves and evaluations measured)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Budget:
    seconds: float = 0.0
    tokens: float = 0.0

    def __str__(self) -> str:
        return f"{self.tokens:.3g} tokens" if self.tokens else _clock(self.seconds)


def parse_budget(text: str, key: str = "budget") -> Budget | None:
    """'30m', '8h', '90s', '1h30m' -> seconds; '2e9tok', '500Mtok' -> tokens; '' -> None."""
    text = (text or "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e\d+)?)\s*([kMGB]?)\s*tok(?:ens)?", text)
    if m:
        scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}[m.group(2)]
        tokens = float(m.group(1)) * scale
        if tokens >= 1:
            return Budget(tokens=tokens)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if parts and re.fullmatch(r"(?:\s*\d+(?:\.\d+)?\s*[smhd])+\s*", text):
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        if seconds > 0:
            return Budget(seconds=seconds)
    raise ConfigError(f"{key}: expected a wall-clock time (90s, 30m, 8h, 1h30m) or a token count "
                      f"(2e9tok, 500Mtok), got {text!r}")


def _clock(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 60:g}m" if seconds >= 60 else f"{seconds:g}s"


def stage_shares(stages: list[StageConfig], seq_lengths: list[int]) -> list[float]:
    """Each stage's share of the budget: its share of the recipe's tokens."""
    tokens = [st.steps * st.global_batch * seq for st, seq in zip(stages, seq_lengths)]
    return [t / sum(tokens) for t in tokens]


def token_steps(cfg: PretrainConfig, budget: Budget, seq_lengths: list[int]) -> list[int]:
    """Each stage's steps for a token budget."""
    shares = stage_shares(cfg.stages, seq_lengths)
    return [max(1, round(budget.tokens * share / (st.global_batch * seq)))
            for st, share, seq in zip(cfg.stages, shares, seq_lengths)]


class ClockPlan:
    """A wall-clock budget's plan for one stage, in the run's trained seconds: it ends at
    `deadline` (this stage's share of the budget added to the earlier stages'). `fit`
    says when to re-plan and the new step count."""

    def __init__(self, budget: Budget, shares: list[float], stage: int, fits_done: int = 0):
        self.budget = budget
        self.deadline = budget.seconds * sum(shares[:stage + 1])
        self.fits_done = fits_done
        self.mark: tuple[int, float] | None = None  # (stage step, trained s) where measuring began
        self.next_fit = WARM_STEPS

    def observe(self, stage_step: int, trained_s: float) -> None:
        if self.mark is None and stage_step >= SKIP_STEPS:  # (a resumed stage: its first step)
            self.mark = (stage_step, trained_s)
            self.next_fit = max(self.next_fit, stage_step + WARM_STEPS - SKIP_STEPS)

    def due(self, stage_step: int) -> bool:
        return self.fits_done < 2 and self.mark is not None and stage_step >= self.next_fit

    def fit(self, stage_step: int, trained_s: float) -> tuple[int, float]:
        """(the stage's new steps, seconds per step measured since the mark). Only measures:
        a distributed run takes rank 0's fit and every rank `adopt`s it."""
        start, t0 = self.mark
        per_step = (trained_s - t0) / max(1, stage_step - start)
        steps = stage_step + max(1, int((self.deadline - trained_s) / max(per_step, 1e-9)))
        return steps, per_step

    def adopt(self, stage_step: int, steps: int) -> None:
        """Take a fit's steps as the plan: the re-fit's step follows from them, so ranks that
        adopt the same steps stay due at the same step (each rank's own clock would not)."""
        self.fits_done += 1
        self.next_fit = stage_step + max(1, int(REFIT_AT * (steps - stage_step)))


def reshape_schedule(scheduler, stage: StageConfig) -> None:
    """Give a live LambdaLR the stage's schedule for its (new) steps: transformers' lambda
    for the new end, and the optimizer's lr at the current step under it."""
    import torch

    from wr_train.optim import stage_schedule
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fn = stage_schedule(probe, stage).lr_lambdas[0]  # a throwaway optimizer: no lr is touched
    scheduler.lr_lambdas = [fn] * len(scheduler.lr_lambdas)
    lrs = [base * fn(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
