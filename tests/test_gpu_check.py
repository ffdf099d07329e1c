"""bench/gpu_check.sh, the prepared GPU check, dry-run end to end on this CPU: the install
step (nothing to install where DeepSpeed is there), every config's row measured through
the project's engine and the HF loop, the tables written, the gpu-marked tests run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, load_bench


def test_gpu_check_dry_run(tmp_path):
    gc = load_bench("gpu_check")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WR_GPU_SITE": str(tmp_path / "site"),
           # a busy 2-core box: let every row run however slow it is
           "WR_GPU_BUDGET": "1500", "WR_GPU_TIMEOUT": "1800"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2000)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "nothing to install" in proc.stdout

    record = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    assert (out / "gpu_check.log").stat().st_size > 0
    assert record["dry_run"] is True and "DRY RUN" in table
    expected = [(name, loop, zero) for name, *_ in gc.CONFIGS
                for loop, zero in [("wr-train", z) for z in gc.ZERO_STAGES] + [("hf", None)]]
    rows = record["rows"]
    assert [(r["config"], r["loop"], r["zero_asked"]) for r in rows] == expected
    for r in rows:
        assert not r.get("error"), r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["vs_hf"] > 0
        if r["loop"] == "wr-train":
            assert r["zero"] == r["zero_asked"]  # bf16 keeps its ZeRO stage at one worker
    data_lines = [line for line in table.splitlines()
                  if line.startswith("| ") and not line.startswith("| config")]
    assert len(data_lines) == len(expected)
    # the masking thread's own rate, against each config's step
    assert set(record["masking_tok_s"]) == {name for name, *_ in gc.CONFIGS}
    assert all(rate > 0 for rate in record["masking_tok_s"].values())
    assert sum(line.startswith("- masking thread, ") for line in table.splitlines()) == len(gc.CONFIGS)
    tests = record["tests"]
    assert tests["exit_code"] == 0 and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert tests["deselected_need_ray"]  # the Ray-cluster GPU tests are left out, by name
