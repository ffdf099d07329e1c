"""`ray job submit` entry point for the CLUE sweep: the same flags as `wr-train sweep`
(argument plumbing only; the work is wr_train.tune.run_sweep). Runs on a local Ray, or on a
cluster when RAY_ADDRESS is set / when submitted with `ray job submit`.
"""
from __future__ import annotations

import argparse
import os
import sys

from wr_train.cli import SWEEP_DESCRIPTION, SWEEP_EXAMPLES_TEXT, add_sweep_args, parse_with_overrides, sweep_main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune_clue.py", description=SWEEP_DESCRIPTION,
                                epilog=SWEEP_EXAMPLES_TEXT.replace("wr-train sweep", "python ray_jobs/tune_clue.py"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_with_overrides(parser(), argv)
    try:
        return sweep_main(args, prog="tune_clue")
    except Exception as e:  # one line for the user; WR_TRAIN_DEBUG=1 shows the trace
        if os.environ.get("WR_TRAIN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tune_clue: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
