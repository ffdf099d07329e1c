"""What export, fine-tuning, fill-mask and the sweep know about an exported HuggingFace
directory: whether a directory is one, and loading it without transformers' notices."""
from __future__ import annotations

import contextlib
from pathlib import Path


class ExportError(ValueError):
    """Not an exported model (or a bad export/import input); one line naming it."""


def check_hf_dir(model_dir: str) -> Path:
    p = Path(model_dir)
    missing = [f for f in ("config.json", "spiece.model") if not (p / f).is_file()]
    if not p.is_dir() or missing:
        raise ExportError(f"{model_dir}: not an exported model directory (missing {', '.join(missing) or 'dir'}; "
                          f"make one with `wr-train export`)")
    return p


@contextlib.contextmanager
def quiet_transformers():
    """No "newly initialized classifier weights" notices or load/save progress bars."""
    from transformers.utils import logging as hf_logging
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
