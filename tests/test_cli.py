"""The command line as a user meets it (issue 31): `--version`, help on every argument,
examples that parse, `pretrain --print-config`, and one override style: short stage keys
on a one-stage recipe, a hint naming the full key otherwise. No Ray is started here."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from wr_train.cli import EXAMPLES, _parser, main, parse_with_overrides
from wr_train.config import ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"wr-train {version('wr-train')}"


def test_every_argument_has_help():
    top = [a for a in _parser()._actions if not isinstance(a, argparse._SubParsersAction)]
    assert all(a.help for a in top)
    for name, parser in subcommands().items():
        bare = [a.dest for a in parser._actions if not a.help]
        assert not bare, f"wr-train {name}: no help text for {bare}"
        assert parser.description and parser.epilog.startswith("example:"), name


def test_every_example_parses():
    """Each `--help` example is a command line the parser takes as written."""
    assert set(EXAMPLES) == set(subcommands())
    for name, line in EXAMPLES.items():
        argv = shlex.split(line, comments=True)
        assert argv[0] == "wr-train", line
        args = parse_with_overrides(_parser(), argv[1:])
        assert args.cmd == name, line
    finetune = parse_with_overrides(_parser(), shlex.split(EXAMPLES["finetune"])[1:])
    assert finetune.overrides == ["epochs=3", "lr=1e-4"]


def test_ray_job_help_keeps_the_examples_line_breaks():
    out = subprocess.run([sys.executable, "ray_jobs/pretrain.py", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("    ray job submit --working-dir . -- python ray_jobs/pretrain.py \\\n"
            "        --config seed-base stages.0.shards=s3://b/shards128 stages.1.shards=s3://b/shards512 \\\n"
            "        --storage s3://b/runs --name base1\n") in out
    assert "--print-config" in out


def test_print_config_prints_the_resolved_recipe_without_ray(tmp_path):
    """`pretrain … --print-config` (also through ray_jobs/pretrain.py): the resolved recipe
    as YAML, flags and overrides applied, a recipe --config takes back; neither Ray nor
    DeepSpeed is imported, and no shards are needed."""
    probe = ("import sys\nfrom wr_train.cli import main\n"
             "rc = main(['pretrain', '--config', 'demo-tiny', '--workers', '1', 'lr=3e-3', "
             "'--print-config', 'model.size=mini'])\n"
             "assert rc == 0 and 'ray' not in sys.modules and 'deepspeed' not in sys.modules, rc\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    printed = yaml.safe_load(out)
    assert printed["workers"] == 1 and printed["stages"][0]["lr"] == 0.003
    assert printed["model"]["size"] == "mini" and printed["model"]["layers"] == 4  # resolved preset
    recipe = tmp_path / "printed.yaml"
    recipe.write_text(out)
    assert to_dict(load_config(str(recipe))) == printed
    job = subprocess.run([sys.executable, "ray_jobs/pretrain.py", "--config", "seed-base", "--print-config",
                          "stages.1.steps=7"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert [s["steps"] for s in yaml.safe_load(job.stdout)["stages"]] == [1_000_000, 7]


def test_one_stage_recipes_take_short_stage_keys():
    cfg = load_config("demo-tiny", ["lr=3e-3", "steps=50", "warmup=0.2", "decay=0.5",
                                    "global_batch=64", "micro_batch=16"])
    stage = cfg.stages[0]
    assert (stage.lr, stage.steps, stage.warmup, stage.decay, stage.global_batch, stage.micro_batch) == \
        (3e-3, 50, 0.2, 0.5, 64, 16)
    with pytest.raises(ConfigError, match=r"^override lr: expected a number, got 'fast'$"):
        load_config("demo-tiny", ["lr=fast"])


@pytest.mark.parametrize("recipe, item, says", [
    ("seed-base", "lr=1e-3", "override lr: unknown key 'lr'; did you mean stages.0.lr or stages.1.lr?"),
    ("seed-base", "steps=10", "override steps: unknown key 'steps'; did you mean stages.0.steps or stages.1.steps?"),
    ("demo-tiny", "weight_decay=0.1", "override weight_decay: unknown key 'weight_decay'; "
                                      "did you mean optim.weight_decay?"),
    ("demo-tiny", "zero_stag=3", "override zero_stag: unknown key 'zero_stag'; did you mean zero_stage?"),
    ("demo-tiny", "optimizer.clip=1", "override optimizer.clip: unknown key 'optimizer'; did you mean optim.clip?"),
    ("demo-tiny", "nonsense=1", "override nonsense: unknown key 'nonsense'"),
])
def test_unknown_keys_name_the_full_key(recipe, item, says, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(recipe, [item])
    assert str(e.value) == says
    assert main(["pretrain", "--config", recipe, item]) == 2
    assert capsys.readouterr().err.strip() == f"wr-train pretrain: error: {says}"


def test_finetune_keys_get_hints_too():
    from wr_train.finetune import config_from_overrides
    with pytest.raises(ConfigError, match=r"^override epoch: unknown key 'epoch'; did you mean epochs\?$"):
        config_from_overrides(["epoch=3"])
    assert json.loads(json.dumps(config_from_overrides(["lr=3e-5"]).lr)) == 3e-5
