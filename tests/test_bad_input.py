"""Bad input, every command: exit code 2, one line on stderr naming the input, no
traceback, and nothing already written changed or left half-written.

One table, run in-process (`wr_train.cli.main`, `tune_clue.main`) on tiny inputs built
here: a char spm trained on a few KB of text, and shard / model / checkpoint directories
that hold just what the checks read. Every case must fail in preflight: Ray is stubbed
out, so a case that would start it fails with the stub's message instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from wr_train import cli

REPO = Path(__file__).resolve().parents[1]
BUCKET = "wr-bad-input"   # the denied-S3 cases' bucket on the session's S3 server
CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
         "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体")


# ---------------------------------------------------------------- the shared inputs

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """Valid inputs the cases break one thing of: corpus, spm, shards, HF dir, a task."""
    from wr_train.tokenizer import file_sha256, load_spm, train_spm
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("".join("".join(rng.choices(CHARS, k=rng.randint(8, 30))) + "。\n"
                              for _ in range(400)), encoding="utf-8")
    spm = root / "spm"
    train_spm([str(corpus)], str(spm), vocab_size=200, char=True, log=lambda *_: None)
    vocab = load_spm(str(spm)).get_piece_size()
    shards = root / "shards"      # what preflight reads of a shard directory
    shards.mkdir()
    shutil.copy(spm / "spm.model", shards / "spm.model")
    write_json(shards / "manifest.json", {
        "seq_length": 128, "packing": "full", "vocab_size": vocab, "rows": 1000,
        "spm_sha256": file_sha256(spm / "spm.model"), "files": {}, "eval": {"files": {}}})
    hf = root / "hf"              # what check_hf_dir reads of an exported model
    hf.mkdir()
    write_json(hf / "config.json", {"model_type": "bert"})
    shutil.copy(spm / "spm.model", hf / "spiece.model")
    tasks = root / "tasks"
    user_task(tasks / "mine", [{"sentence": "好", "label": "1"}, {"sentence": "差", "label": "0"}],
              [{"sentence": "好", "label": "1"}])
    return SimpleNamespace(root=root, corpus=str(corpus), spm=str(spm), vocab=vocab,
                           shards=str(shards), hf=str(hf), tasks=str(tasks))


@pytest.fixture(scope="module")
def tune_clue():
    spec = importlib.util.spec_from_file_location("tune_clue_job", REPO / "ray_jobs" / "tune_clue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Bad input never reaches Ray: if a case would start (or use) it, the stub's
    message replaces the expected one and the case fails in a second, not minutes."""
    import ray

    def refuse(*_, **__):
        raise RuntimeError("bad-input test: the command got past its checks and started Ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


# ---------------------------------------------------------------- small builders (each returns a path)

def write(directory: Path, name: str, data: bytes | str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def dir_with(directory: Path, name: str) -> str:
    """A directory already holding one file (what a command must leave as it is)."""
    write(directory, name, "already here")
    return str(directory)


def write_json(path: Path, obj) -> str:
    return write(path.parent, path.name, json.dumps(obj, ensure_ascii=False))


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def user_task(directory: Path, train: list[dict], dev: list[dict]) -> str:
    write(directory, "train.json", jsonl(train))
    write(directory, "dev.json", jsonl(dev))
    return str(directory)


def tsv_task(directory: Path, train: str) -> str:
    """A UER TSV user task with this train file (and a good dev); returns the data dir."""
    write(directory, "train.tsv", train)
    write(directory, "dev.tsv", "label\ttext_a\n1\t好\n")
    return str(directory.parent)


def partial_checkpoint(t: Path) -> str:
    """A checkpoint whose state.json lists a rank file that never arrived."""
    ck = t / "partial-ck"
    write_json(ck / "state.json", {"step": 10, "stage": 0, "stage_step": 10, "world_size": 1, "config": {},
                                   "files": {"ds/mp_rank_00_model_states.pt": {"size": 100}}})
    return str(ck)


def uer_bin(t: Path, rows: int, hidden: int = 128) -> str:
    import torch
    path = t / "uer.bin"
    torch.save({"embedding.word_embedding.weight": torch.zeros(rows, hidden)}, path)
    return str(path)


def shards_with_truncated_part(t: Path, ws) -> str:
    out = t / "shards"
    shutil.copytree(ws.shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = {"part-00000.parquet": {"size": 100}}
    write_json(out / "manifest.json", manifest)
    write(out, "part-00000.parquet", b"PAR1")
    return str(out)


def shards_with_swapped_spm(t: Path, ws) -> tuple[str, str]:
    """A copy of the shards whose spm.model is another file; (folder, the line's start:
    the file and both hashes, short)."""
    out = t / "swapped"
    shutil.copytree(ws.shards, out)
    write(out, "spm.model", b"another segmenter's bytes")
    found = hashlib.sha256((out / "spm.model").read_bytes()).hexdigest()
    expected = json.loads((out / "manifest.json").read_text())["spm_sha256"]
    return str(out), (f"{out}/spm.model: sha256 {found[:12]}… is not the manifest's spm_sha256 "
                      f"{expected[:12]}…")


def swapped_spm_case(ws, t: Path) -> tuple[list[str], str]:
    shards, named = shards_with_swapped_spm(t, ws)
    return pretrain_argv(ws, t, "--shards", shards), named


def pretrain_argv(ws, t: Path, *extra: str) -> list[str]:
    return ["pretrain", "--shards", ws.shards, "--storage", str(t / "runs"), "--name", "x",
            "--steps", "20", "--workers", "2", *extra]


def unnamed(argv: list[str]) -> list[str]:
    """argv without its `--name x` (the flag would win over a recipe's or an override's name)."""
    i = argv.index("--name")
    return argv[:i] + argv[i + 2:]


def resumable(ws, t: Path, saved=(), world: int = 2, rows: int | None = None, streams=None) -> list[str]:
    """A complete checkpoint of run x saved with overrides `saved` (by `world` workers,
    from shards of `rows` rows); returns the argv of the same run *without* them."""
    from wr_train.config import to_dict
    from wr_train.shards import load_manifest
    argv = pretrain_argv(ws, t)
    cfg = cli.pretrain_config(cli.parse_with_overrides(cli._parser(), argv + list(saved)))
    manifest = load_manifest(ws.shards)
    manifest["rows"] = rows or manifest["rows"]
    ck = t / "runs" / "x" / "checkpoint_000001"
    manifests = write_json(ck / "manifests.json", {cfg.stages[0].name: manifest})
    write_json(ck / "state.json", {
        "step": 10, "stage": 0, "stage_name": cfg.stages[0].name, "stage_step": 10, "stage_steps": 20,
        "world_size": world, "streams": streams or [{"batches": 10}] * world, "config": to_dict(cfg),
        "files": {"manifests.json": {"size": Path(manifests).stat().st_size}}})
    return argv


def sweep_of_another_model(ws, t: Path) -> str:
    sweep = t / "results" / "s1"
    write_json(sweep / "sweep.json", {"model": "/elsewhere/hf", "model_sha256": "0" * 64})
    return str(sweep)


# ---------------------------------------------------------------- the table
# (id, setup(ws, tmp) -> (argv, the input the line must name), what the line says[, needs])
# needs: "unreachable" = S3 endpoint on a closed port; "denied" = the real S3 server, wrong secret.

def case(id_, setup, expect, needs=None):
    return pytest.param(setup, expect, needs, id=id_)


RECIPE = "stages:\n- name: s\n  lr: {lr}\n  global_batch: 64\n  micro_batch: 32\n"

CASES = [
    # -- data
    case("data-out-is-a-file", lambda ws, t: (["data", "demo", "--out", write(t, "demo-out.file", "x")],
                                               "demo-out.file"), "exists and is not a directory"),
    # -- spm
    case("spm-empty-corpus", lambda ws, t: (["spm", "--corpus", write(t, "e.txt", b""), "--vocab-size", "100",
                                             "--out", str(t / "spm")], "e.txt"), "no text found"),
    case("spm-undecodable-corpus", lambda ws, t: (["spm", "--corpus", write(t, "gbk.txt", "中文的文本\n".encode("gbk") * 50),
                                                   "--out", str(t / "spm")], "gbk.txt"), "not UTF-8 text"),
    case("spm-missing-corpus", lambda ws, t: (["spm", "--corpus", str(t / "nope.txt"), "--out", str(t / "spm")],
                                              "nope.txt"), "no such file"),
    case("spm-vocab-too-large", lambda ws, t: (["spm", "--corpus", ws.corpus, "--vocab-size", "100000",
                                                "--out", str(t / "spm")], "--vocab-size 100000"), "supports at most"),
    case("spm-out-is-a-file", lambda ws, t: (["spm", "--corpus", ws.corpus, "--out", write(t, "spm-out.file", "x")],
                                              "spm-out.file"), "exists and is not a directory"),
    # -- preprocess
    case("preprocess-empty-corpus", lambda ws, t: (["preprocess", "--corpus", write(t, "e.txt", b""), "--spm", ws.spm,
                                                    "--out", str(t / "sh")], "e.txt"), "empty corpus"),
    case("preprocess-undecodable-corpus", lambda ws, t: (
        ["preprocess", "--corpus", write(t, "gbk.txt", "中文的文本\n".encode("gbk") * 50), "--spm", ws.spm,
         "--out", str(t / "sh")], "gbk.txt"), "not UTF-8 text"),
    case("preprocess-binary-corpus", lambda ws, t: (["preprocess", "--corpus", write(t, "b.txt", bytes(range(256))),
                                                     "--spm", ws.spm, "--out", str(t / "sh")], "b.txt"), "binary file"),
    case("preprocess-missing-spm", lambda ws, t: (["preprocess", "--corpus", ws.corpus, "--spm", str(t / "nospm"),
                                                   "--out", str(t / "sh")], "nospm"), "not an spm directory"),
    case("preprocess-spm-not-a-model", lambda ws, t: (
        ["preprocess", "--corpus", ws.corpus, "--spm", str(Path(write(t, "bad-spm/spm.model", "junk")).parent),
         "--out", str(t / "sh")], "bad-spm"), "is not a sentencepiece model"),
    case("preprocess-seq-length", lambda ws, t: (["preprocess", "--corpus", ws.corpus, "--spm", ws.spm,
                                                  "--seq-length", "4", "--out", str(t / "sh")], "--seq-length 4"),
         "expected 8..512"),
    case("preprocess-heldout", lambda ws, t: (["preprocess", "--corpus", ws.corpus, "--spm", ws.spm,
                                               "--heldout", "0.7", "--out", str(t / "sh")], "--heldout 0.7"),
         "expected a share"),
    case("preprocess-out-not-empty", lambda ws, t: (
        ["preprocess", "--corpus", ws.corpus, "--spm", ws.spm, "--out", dir_with(t / "shards-out", "keep.txt")],
        "shards-out"), "not empty"),
    case("preprocess-unreachable-s3", lambda ws, t: (["preprocess", "--corpus", f"s3://{BUCKET}/c.txt", "--spm", ws.spm,
                                                      "--out", str(t / "sh")], f"s3://{BUCKET}/c.txt"),
         "cannot reach the S3 endpoint", "unreachable"),
    case("preprocess-denied-s3", lambda ws, t: (["preprocess", "--corpus", ws.corpus, "--spm", ws.spm,
                                                 "--out", f"s3://{BUCKET}/shards"], f"s3://{BUCKET}/shards"),
         "access denied", "denied"),
    # -- pretrain: recipe and overrides
    case("pretrain-unknown-preset", lambda ws, t: (pretrain_argv(ws, t, "--size", "huge"), "model.size"),
         "unknown preset 'huge'"),
    case("pretrain-recipe-lr-not-a-number", lambda ws, t: (
        pretrain_argv(ws, t, "--config", write(t, "r.yaml", RECIPE.format(lr="abc"))), "stages.0.lr"),
        "r.yaml: stages.0.lr: expected a number, got 'abc'"),
    case("pretrain-recipe-workers-fraction", lambda ws, t: (
        pretrain_argv(ws, t, "--config", write(t, "r.yaml", "workers: 2.5\n")), "workers"),
        "r.yaml: workers: expected an integer, got 2.5"),
    case("pretrain-recipe-gpu-not-bool", lambda ws, t: (
        pretrain_argv(ws, t, "--config", write(t, "r.yaml", "gpu: maybe\n")), "gpu"), "expected true/false"),
    case("pretrain-recipe-betas", lambda ws, t: (
        pretrain_argv(ws, t, "--config", write(t, "r.yaml", "optim:\n  betas: [0.9]\n")), "optim.betas"),
        "expected a list of 2 numbers"),
    case("pretrain-recipe-not-yaml", lambda ws, t: (
        pretrain_argv(ws, t, "--config", write(t, "r.yaml", "stages: [\n")), "r.yaml"), "not valid YAML"),
    case("pretrain-override-type", lambda ws, t: (pretrain_argv(ws, t, "seed=abc"), "override seed"),
         "expected an integer, got 'abc'"),
    case("pretrain-override-unknown-key", lambda ws, t: (pretrain_argv(ws, t, "colour=red"), "override colour"),
         "unknown key"),
    case("pretrain-override-no-such-stage", lambda ws, t: (pretrain_argv(ws, t, "stages.3.lr=1e-4"),
                                                           "override stages.3.lr"), "no stage '3'"),
    # -- pretrain: settings out of range (each passed the old checks and failed in a worker)
    *[case(f"pretrain-range-{key}={value}", lambda ws, t, kv=f"{key}={value}", n=named: (pretrain_argv(ws, t, kv), n),
           expect) for key, value, named, expect in [
        ("seed", "-1", "seed", "expected >= 0"),
        ("keep_checkpoints", "0", "keep_checkpoints", "expected >= 1"),
        ("mask.span_p", "0", "mask.span_p", "expected 0 < span_p <= 1"),
        ("mask.span_max", "0", "mask.span_max", "expected >= 1"),
        ("stages.0.lr", "-1", "stages.0.lr", "expected > 0"),
        ("optim.betas", "[1.5,0.9]", "optim.betas.0", "expected 0 <= beta < 1"),
        ("optim.betas", "[0.9,-0.1]", "optim.betas.1", "expected 0 <= beta < 1"),
        ("optim.eps", "0", "optim.eps", "expected > 0"),
        ("optim.weight_decay", "-0.01", "optim.weight_decay", "expected >= 0"),
        ("optim.clip", "-1", "optim.clip", "expected >= 0"),
        ("cpus_per_worker", "-1", "cpus_per_worker", "expected > 0"),
        ("max_failures", "-5", "max_failures", "or -1 for unlimited"),
        ("fail_at_step", "-3", "fail_at_step", "expected >= 0"),
        ("model.dropout", "1", "model.dropout", "expected 0 <= dropout < 1"),
        ("model.init_std", "0", "model.init_std", "expected > 0"),
    ]],
    # -- pretrain: the run's name is a folder name
    *[case(f"pretrain-name-{i}", lambda ws, t, n=bad: (pretrain_argv(ws, t, "--name", n), f"name (--name) {n!r}"),
           "expected a plain name") for i, bad in enumerate(["", "../../x", "/etc/x", "a b", ".hidden"])],
    case("pretrain-name-override", lambda ws, t: (unnamed(pretrain_argv(ws, t, "name=a/b")), "name (--name) 'a/b'"),
         "expected a plain name"),
    case("pretrain-name-in-recipe", lambda ws, t: (
        unnamed(pretrain_argv(ws, t, "--config", write(t, "r.yaml", "name: ../up\n"))), "name (--name) '../up'"),
        "expected a plain name"),
    # -- pretrain: DeepSpeed config
    case("pretrain-ds-config-bad-json", lambda ws, t: (pretrain_argv(ws, t, f"ds_config={write(t, 'ds.json', '{x')}"),
                                                       "ds.json"), "not valid JSON"),
    case("pretrain-ds-fp16-with-auto-on-gpu", lambda ws, t: (pretrain_argv(ws, t, "--gpu", "ds_config=zero2_fp16"),
                                                             "ds_config zero2_fp16"),
         "enables fp16, but precision=auto (auto: bf16 on GPU) trains bf16"),
    case("pretrain-ds-fp16-with-bf16", lambda ws, t: (pretrain_argv(ws, t, "precision=bf16", "ds_config=zero2_fp16"),
                                                      "ds_config zero2_fp16"), "set precision=fp16"),
    case("pretrain-bf16-without-zero", lambda ws, t: (pretrain_argv(ws, t, "precision=bf16", "zero_stage=0"),
                                                      "zero_stage 0"), "use zero_stage 1-3"),
    # -- pretrain: shards
    case("pretrain-seq-length-over-positions", lambda ws, t: (pretrain_argv(ws, t, "model.max_positions=64"),
                                                              "model.max_positions"), "seq_length 128 exceeds"),
    case("pretrain-wrong-vocab", lambda ws, t: (pretrain_argv(ws, t, "model.vocab_size=999"), "model.vocab_size"),
         "does not match"),
    case("pretrain-not-a-shard-dir", lambda ws, t: (
        pretrain_argv(ws, t, "--shards", dir_with(t / "half-shards", "part-00000.parquet")), "half-shards"),
        "not a complete shard directory"),
    case("pretrain-truncated-shard", lambda ws, t: (pretrain_argv(ws, t, "--shards", shards_with_truncated_part(t, ws)),
                                                    "part-00000.parquet"), "missing or truncated shard"),
    case("pretrain-swapped-spm", swapped_spm_case, "not the segmenter that made these shards"),
    case("pretrain-unwritable-storage", lambda ws, t: (
        pretrain_argv(ws, t, "--storage", write(t, "blocker", "x") + "/runs"), "--storage"), "not writable"),
    case("pretrain-unigram-bias-without-counts", lambda ws, t: (  # ws.shards has no token_counts.npy
        pretrain_argv(ws, t, "model.output_bias=unigram"), "token_counts.npy"), "model.output_bias=unigram"),
    case("pretrain-output-bias-unknown", lambda ws, t: (pretrain_argv(ws, t, "model.output_bias=log"), "model.output_bias"),
         "expected 'zero' or 'unigram'"),
    # -- pretrain: the downstream probe's task (read on the driver, before anything starts)
    case("pretrain-probe-without-data", lambda ws, t: (pretrain_argv(ws, t, "--probe", "chnsenticorp"),
                                                       "probe.data (--probe-data)"), "expected the folder"),
    case("pretrain-probe-no-such-task", lambda ws, t: (pretrain_argv(ws, t, "--probe", "nosuch", "--probe-data", str(t)),
                                                       "probe.task nosuch"), "not a built-in task"),
    # -- pretrain: resuming with other settings
    case("pretrain-resume-before-partitions", lambda ws, t: (resumable(ws, t, streams=[{"rows": 80}] * 2),
                                                             "checkpoint_000001"), "before partitions"),
    case("pretrain-resume-other-seed", lambda ws, t: (resumable(ws, t, saved=["seed=7"]), "seed"),
         "saved with seed 7, this run has 42"),
    case("pretrain-resume-other-mask", lambda ws, t: (resumable(ws, t, saved=["mask.prob=0.2"]), "mask.prob"),
         "saved with mask.prob 0.2, this run has 0.15"),
    case("pretrain-resume-other-model", lambda ws, t: (resumable(ws, t, saved=["model.size=mini"]), "model.size"),
         "saved with model.size 'mini', this run has 'tiny'"),
    case("pretrain-resume-other-window", lambda ws, t: (resumable(ws, t, saved=["shuffle_window=4"]),
                                                        "shuffle_window"), "saved with shuffle_window 4"),
    case("pretrain-resume-other-precision", lambda ws, t: (resumable(ws, t, saved=["precision=bf16"]), "precision"),
         "resume with precision=bf16"),
    case("pretrain-resume-other-shards", lambda ws, t: (resumable(ws, t, rows=999), "stages.0.shards"),
         "has rows 1000, the run was trained on shards with rows 999"),
    # -- export
    case("export-partial-checkpoint", lambda ws, t: (["export", partial_checkpoint(t), "--out", str(t / "hf")],
                                                      "partial-ck"), "incomplete checkpoint"),
    case("export-not-a-checkpoint", lambda ws, t: (["export", str(t), "--out", str(t / "hf")], str(t)),
         "not a wr-train checkpoint"),
    # -- pull
    case("pull-dest-not-empty", lambda ws, t: (["pull", ws.hf, dir_with(t / "pull-dest", "mine.txt")], "pull-dest"),
         "not empty; pass --overwrite"),
    case("pull-partial-checkpoint", lambda ws, t: (["pull", partial_checkpoint(t), str(t / "dest")], "partial-ck"),
         "incomplete checkpoint"),
    case("pull-unreachable-s3", lambda ws, t: (["pull", f"s3://{BUCKET}/ck", str(t / "dest")], f"s3://{BUCKET}/ck"),
         "cannot reach the S3 endpoint", "unreachable"),
    case("pull-denied-s3", lambda ws, t: (["pull", f"s3://{BUCKET}/ck", str(t / "dest")], f"s3://{BUCKET}/ck"),
         "access denied", "denied"),
    # -- fill-mask
    case("fill-mask-not-a-model", lambda ws, t: (["fill-mask", str(t), "北京[MASK]"], str(t)),
         "not an exported model directory"),
    case("fill-mask-no-mask", lambda ws, t: (["fill-mask", ws.hf, "北京是首都"], "北京是首都"), "expected a [MASK]"),
    # -- finetune
    case("finetune-unknown-task", lambda ws, t: (["finetune", "--model", ws.hf, "--task", "nosuch", "--data", ws.tasks],
                                                 "nosuch"), "not a built-in task"),
    case("finetune-row-without-label", lambda ws, t: (
        ["finetune", "--model", ws.hf, "--task", "mine", "--data",
         str(Path(user_task(t / "tasks" / "mine", [{"sentence": "好", "label": "1"}, {"sentence": "差"}],
                            [{"sentence": "好", "label": "1"}])).parent)], "train.json:2"), "no 'label' key"),
    case("finetune-label-outside-the-set", lambda ws, t: (
        ["finetune", "--model", ws.hf, "--task", "mine", "--data",
         str(Path(user_task(t / "tasks" / "mine", [{"sentence": "好", "label": "1"}, {"sentence": "差", "label": "0"}],
                            [{"sentence": "好", "label": "z"}])).parent)], "dev.json:1"),
        "label 'z' does not occur in train.json"),
    case("finetune-tsv-without-label-column", lambda ws, t: (
        ["finetune", "--model", ws.hf, "--task", "mine", "--data",
         tsv_task(t / "tasks" / "mine", "text_a\n好\n")], "train.tsv:1"),
        "missing column 'label'"),
    case("finetune-override-type", lambda ws, t: (["finetune", "--model", ws.hf, "--task", "mine", "--data", ws.tasks,
                                                   "batch_size=x"], "override batch_size"), "expected an integer"),
    case("finetune-not-a-model", lambda ws, t: (["finetune", "--model", str(t), "--task", "mine", "--data", ws.tasks],
                                                str(t)), "not an exported model directory"),
    # -- import-uer
    case("import-uer-missing-file", lambda ws, t: (["import-uer", str(t / "no.bin"), "--spm", ws.spm, "--size", "tiny",
                                                    "--out", str(t / "hf")], "no.bin"), "no such file"),
    case("import-uer-not-torch", lambda ws, t: (["import-uer", write(t, "junk.bin", b"junk"), "--spm", ws.spm,
                                                 "--size", "tiny", "--out", str(t / "hf")], "junk.bin"),
         "not a PyTorch state dict"),
    case("import-uer-unknown-size", lambda ws, t: (["import-uer", write(t, "u.bin", b"x"), "--spm", ws.spm,
                                                    "--size", "huge", "--out", str(t / "hf")], "--size huge"),
         "unknown preset"),
    case("import-uer-wrong-vocab", lambda ws, t: (["import-uer", uer_bin(t, rows=ws.vocab + 1), "--spm", ws.spm,
                                                   "--size", "tiny", "--out", str(t / "hf")], "uer.bin"),
         "word embedding has shape"),
    # -- ray_jobs/tune_clue.py
    case("tune-unknown-task", lambda ws, t: (["tune_clue", "--model", ws.hf, "--tasks", "nosuch", "--data", ws.tasks,
                                              "--storage", str(t / "results")], "nosuch"), "not a built-in task"),
    case("tune-bad-grid", lambda ws, t: (["tune_clue", "--model", ws.hf, "--tasks", "mine", "--data", ws.tasks,
                                          "--epochs", "3,x"], "--epochs 3,x"), "expected comma-separated"),
    *[case(f"tune-name-{i}", lambda ws, t, n=bad: (["tune_clue", "--model", ws.hf, "--tasks", "mine", "--data",
                                                  ws.tasks, "--storage", str(t / "results"), "--name", n],
                                                 f"--name {n!r}"), "expected a plain name")
      for i, bad in enumerate(["", "../../x", "/etc/x", "a b", ".hidden"])],
    *[case(f"tune-task-name-{i}", lambda ws, t, n=bad: (["tune_clue", "--model", ws.hf, "--tasks", f"mine,{n}",
                                                       "--data", ws.tasks, "--storage", str(t / "results")],
                                                      f"--tasks {n!r}"), "expected a plain name")
      for i, bad in enumerate(["../../x", "/etc/x", "a b", ".hidden"])],
    case("tune-resume-other-model", lambda ws, t: (
        ["tune_clue", "--model", ws.hf, "--tasks", "mine", "--data", ws.tasks, "--storage", str(t / "results"),
         "--name", "s1", "--epochs", "1", "--batch-sizes", "8", "--lrs", "1e-4"], sweep_of_another_model(ws, t)),
        "this sweep was run with another model"),
]


# ---------------------------------------------------------------- the test

@pytest.mark.parametrize("setup, expect, needs", CASES)
def test_bad_input_is_one_line_naming_it(setup, expect, needs, ws, tune_clue, tmp_path, capfd,
                                         monkeypatch, request):
    if needs:
        s3_env(needs, monkeypatch, request)
    argv, named = setup(ws, tmp_path)
    before = snapshot(ws.root, tmp_path)
    capfd.readouterr()
    if argv[0] == "tune_clue":
        rc = tune_clue.main(argv[1:])
    else:
        rc = cli.main(argv)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "Traceback" not in err and named in lines[0] and expect in lines[0], lines[0]
    assert snapshot(ws.root, tmp_path) == before, "files were written, changed or removed"


def s3_env(needs: str, monkeypatch, request) -> None:
    if needs == "unreachable":
        # Bound but not listening: connections are refused at once.
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        request.addfinalizer(closed.close)
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{closed.getsockname()[1]}")
        for var, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"),
                           ("AWS_EC2_METADATA_DISABLED", "true")):
            monkeypatch.setenv(var, value)
    else:  # denied: a real bucket with a real object, asked for with the wrong secret
        from wr_train import storage
        server = request.getfixturevalue("s3")
        storage.write_text(storage.join(server.bucket(BUCKET), "ck", "a.txt"), "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` -> its sha256 (new, changed and lost files all show)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_range_edges_and_plain_names_pass():
    """The ranges' edges are settings, not errors: Ray's -1 (unlimited restarts), no
    clipping, span_p 1, a beta of 0, no dropout; names with dots, dashes, digits."""
    from wr_train.config import ConfigError, check_plain_name, load_config
    edges = ["stages.0.shards=x", "max_failures=-1", "optim.clip=0", "mask.span_p=1", "mask.span_max=1",
             "optim.betas=[0,0.999]", "model.dropout=0", "fail_at_step=0", "seed=0", "optim.weight_decay=0",
             "keep_checkpoints=1", "cpus_per_worker=0.5", "name=run-2.v_1"]
    cfg = load_config(None, edges).validate()
    assert (cfg.max_failures, cfg.optim.clip, cfg.name) == (-1, 0.0, "run-2.v_1")
    for name in ("007", "a", "A.b-c_d", "_x", "-x", "x."):
        assert check_plain_name(name, "--name") == name
    for name in ("", ".", "..", "a/b", "a\\b", "a b", "é", "a\n", ".x", "x:y", None):
        with pytest.raises(ConfigError, match="expected a plain name"):
            check_plain_name(name, "--name")
