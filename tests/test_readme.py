"""The README's pipeline block, run as written (at test sizes) from a fresh folder with
relative paths, each command a new process joining the session's Ray as a user's shell
would with RAY_ADDRESS; and pretraining's console holds only wr-train's own lines."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The same commands at test sizes: (pattern, replacement), each must match once.
SMALLER = [
    (r"--vocab-size 32000", "--vocab-size 8000 --sample 20000"),
    (r"(wr-train pretrain [^)]*)\)",
     r"\1 --steps 10 stages.0.global_batch=16 stages.0.micro_batch=8 checkpoint_every=10"
     r" report_every=5 eval_rows=64)"),
    (r"epochs=3 lr=1e-4", "epochs=1 lr=1e-4 max_train_examples=200 max_eval_examples=100"),
    (r"--tasks douban,chnsenticorp,lcqmc,tnews,iflytek,ocnli",
     "--tasks chnsenticorp --epochs 1 --batch-sizes 32 --lrs 1e-4 "
     "--max-train-examples 200 --max-eval-examples 100"),
]
# wr-train's own console lines (Ray's "(RayTrainWorker pid=N)" prefix stripped)
OWN_LINE = re.compile(r"^(pretrain: |stage \d+/\d+ |\[[\w.-]+\] step \d+/\d+ |resuming |checkpoint: |probe: )")
CHATTER = re.compile(r"PlacementGroupCleaner|TrainingReport\(|Warning|Traceback|built successfully"
                     r"|core_worker|TrainController|raylet")
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\([^)]*pid=\d+[^)]*\)(\x1b\[0m)? ?")


def readme_pipeline() -> list[str]:
    """The commands of README's "## The pipeline" bash block, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The pipeline"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("\n```", start)]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def smaller(commands: list[str]) -> list[str]:
    text = "\n".join(commands)
    for pattern, repl in SMALLER:
        text, n = re.subn(pattern, repl, text)
        assert n == 1, f"README pipeline: {pattern!r} matched {n} times (the test's sizes need it once)"
    return text.splitlines()


def test_readme_pipeline_as_written(tmp_path, ray_local, demo_dir):
    # demo_dir: the package archives are cached, so `wr-train data demo` needs no network
    commands = smaller(readme_pipeline())
    assert [c.split()[0] for c in commands][:3] == ["wr-train"] * 3
    # one marker line on stderr before each command, to split the console per command
    script = "set -euo pipefail\n" + "".join(
        f"echo '### {i}' >&2\n{c}\n" for i, c in enumerate(commands))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop("WR_TRAIN_DEBUG", None)
    (tmp_path / "ray_jobs").symlink_to(ROOT / "ray_jobs")  # `python ray_jobs/…` from the README's folder
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"README pipeline failed:\n{proc.stderr[-4000:]}"

    parts = re.split(r"^### (\d+)\n", proc.stderr, flags=re.M)
    console = {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
    pretrain_i = next(i for i, c in enumerate(commands) if "wr-train pretrain" in c)
    lines = [RAY_PREFIX.sub("", line) for line in console[pretrain_i].splitlines() if line.strip()]
    chatter = [line for line in lines if CHATTER.search(line) or not OWN_LINE.match(line)]
    assert not chatter, "pretraining's console holds lines that are not wr-train's:\n" + "\n".join(chatter[:20])
    assert any("eval loss" in line and "unigram floor" in line for line in lines)
    assert any("checkpoint saved" in line for line in lines)

    # relative paths meant the shell's folder: everything landed under it
    ckpts = sorted(p for p in (tmp_path / "runs" / "tiny1").glob("checkpoint_*") if p.is_dir())
    assert ckpts and (ckpts[-1] / "state.json").exists()
    assert (tmp_path / "demo_out" / "hf" / "config.json").exists()
    assert (tmp_path / "ckpt" / "state.json").exists()  # pulled "$ck": stdout held just the path
    assert (tmp_path / "demo_out" / "hf" / "finetune" / "chnsenticorp.json").exists()
    assert (tmp_path / "results" / "sweep1" / "scores.md").exists()
