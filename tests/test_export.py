"""Export to a HuggingFace directory, UER import, pull — parity at each format boundary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import pretrain_cfg, segmentation_tie
from wr_train import pretrain, storage
from wr_train.export import export_checkpoint, fill_mask_table, import_uer
from wr_train.hf import ExportError
from wr_train.masking import IGNORE, mask_batch
from wr_train.pull import pull

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(pretrained_run, tmp_path_factory) -> Path:
    _, last = pretrained_run
    out = tmp_path_factory.mktemp("hf") / "tiny"
    export_checkpoint(last, str(out))
    return out


def masked_rows(shards, n=8):
    from wr_train.shards import load_manifest, read_rows
    m = load_manifest(str(shards))
    row_ids, ids = read_rows(str(shards), sorted(m["files"])[0])
    ids, labels = mask_batch(ids[:n], row_ids[:n], epoch=0, seed=0, vocab_size=m["vocab_size"])
    return torch.from_numpy(ids), torch.from_numpy(labels)


def test_export_layout_and_card(exported):
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "loss.png"):
        assert (exported / name).is_file(), name
    card = (exported / "README.md").read_text()
    assert "fill-mask" in card and "L2/H128" in card and "non-pad tokens" in card and "loss.png" in card
    assert "| held-out eval loss |" in card and "unigram floor" in card and " nats " in card
    import json
    config = json.loads((exported / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.1  # fine-tuning's dropout, whatever pretraining used


def card_parts(model_dir: Path) -> tuple[dict, str]:
    """(the front matter as YAML data, the rest) of an exported README.md."""
    import yaml
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_is_hub_ready(exported, pretrained_run):
    """The Hub's front matter (license, library, pipeline tag, the corpus files as datasets,
    a fill-mask widget), code that loads the folder by its real name and runs as written,
    one tokenizer class that is what AutoTokenizer loads, and no local paths."""
    import subprocess
    import sys

    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    meta, body = card_parts(exported)
    assert meta == {"language": "zh", "license": "apache-2.0", "library_name": "transformers",
                    "pipeline_tag": "fill-mask", "datasets": ["peoples_daily", "reviews"],
                    "tags": ["bert", "roberta", "word-based", "chinese", "wr-train"],
                    "widget": [{"text": "最近一趟去北京的[MASK]几点发车"}]}
    assert "THIS_DIR" not in body and f"from_pretrained('{exported.name}')" in body
    assert "huggingface-cli upload" in body and "peoples_daily.txt (txt)" in body
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", code + "print(len(unmasker('最近一趟去北京的[MASK]几点发车')))"],
                         cwd=exported.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[-1] == "5", run.stderr[-2000:]
    config = json.loads((exported / "config.json").read_text())
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(AutoTokenizer.from_pretrained(str(exported)), PreTrainedTokenizerFast)
    cfg, _ = pretrained_run
    text = (exported / "training_state.json").read_text()
    state = json.loads(text)
    assert state["config"]["storage"] == Path(cfg.storage).name
    assert state["config"]["stages"][0]["shards"] == "s128"
    assert state["step"] == 30 and '"/' not in text and str(Path(cfg.storage).parent) not in text


def test_export_cli_sets_license_and_widget(pretrained_run, tmp_path, capsys):
    from wr_train.cli import main
    _, last = pretrained_run
    out = tmp_path / "zh-tiny"
    assert main(["export", last, "--out", str(out), "--license", "mit", "--widget", "北京是中国的[MASK]。"]) == 0
    meta, body = card_parts(out)
    assert meta["license"] == "mit" and meta["widget"] == [{"text": "北京是中国的[MASK]。"}]
    assert "unmasker('北京是中国的[MASK]。')" in body and "from_pretrained('zh-tiny')" in body
    capsys.readouterr()
    assert main(["export", last, "--out", str(tmp_path / "o"), "--widget", "no mask"]) == 2
    assert capsys.readouterr().err.strip() == \
        "wr-train export: error: --widget 'no mask': expected a [MASK] in it"
    assert not (tmp_path / "o").exists()


def test_exported_logits_equal_training_model(exported, pretrained_run, shards128):
    """HF's full-vocab logits at the masked positions == the sparse training head's logits,
    with the training module's weights read from DeepSpeed's own model-states file."""
    from transformers import AutoModelForMaskedLM
    from wr_train.model import SparseMLM, build_mlm
    cfg, last = pretrained_run
    states = torch.load(Path(last) / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    train = build_mlm(cfg.model, 8000)
    train.load_state_dict({k[len("mlm."):]: v for k, v in states["module"].items()}, strict=False)
    train.tie_weights()
    sparse = SparseMLM(train).eval()
    hf = AutoModelForMaskedLM.from_pretrained(str(exported)).eval()
    ids, labels = masked_rows(shards128)
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits[labels != IGNORE]
        hidden = sparse.mlm.bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        head = sparse.mlm.cls.predictions
        mine = head.decoder(head.transform(hidden[labels != IGNORE]))
        loss, correct, n = sparse(ids, labels)
    assert torch.allclose(full, mine, atol=1e-4, rtol=1e-4)
    ref = torch.nn.functional.cross_entropy(full, labels[labels != IGNORE])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_tokenizer_ids_equal_spm_on_real_text(exported, small_corpus):
    from transformers import AlbertTokenizer, AutoTokenizer
    import sentencepiece as spm

    from tests.conftest import sample_lines
    sp = spm.SentencePieceProcessor(model_file=str(exported / "spiece.model"))
    tok = AutoTokenizer.from_pretrained(str(exported))      # exact spm ids, spaces included
    albert = AlbertTokenizer.from_pretrained(str(exported))  # the model cards' way
    lines = [l[:200] for l in sample_lines(small_corpus, 200, seed=3)]
    assert len(lines) > 100
    ties, albert_differs = 0, []
    for line in lines:
        ties += segmentation_tie(sp, tok(line, add_special_tokens=False)["input_ids"], sp.encode(line), line)
        if " " not in line and albert(line, add_special_tokens=False)["input_ids"] != sp.encode(line):
            albert_differs.append(line)  # its own pipeline drops spaces, and normalizes some symbols
    assert ties <= len(lines) // 20
    assert len(albert_differs) <= len(lines) // 50, albert_differs
    assert tok("你好")["input_ids"][0] == 2 and tok("你好")["input_ids"][-1] == 3
    assert tok.mask_token_id == 4 and tok.pad_token_id == 0


def test_fill_mask_pipeline_and_features(exported):
    from transformers import AlbertTokenizer, BertModel, pipeline
    unmasker = pipeline("fill-mask", model=str(exported))
    out = unmasker("[MASK]的首都是北京。", top_k=5)
    assert len(out) == 5
    for r in out:
        assert r["token_str"] and " " not in r["token_str"] and "▁" not in r["token_str"]
        assert r["sequence"].endswith("的首都是北京。") and " " not in r["sequence"] and "▁" not in r["sequence"]
    tok = AlbertTokenizer.from_pretrained(str(exported))
    model = BertModel.from_pretrained(str(exported))
    feats = model(**tok("用你喜欢的任何文本替换我。", return_tensors="pt")).last_hidden_state
    assert feats.shape[-1] == 128
    table = fill_mask_table(str(exported), "最近一趟去北京的[MASK]几点发车", top_k=3)
    assert len(table.splitlines()) == 4


def test_export_from_zero3_two_workers(pretrained_run, shards128, tmp_path):
    from transformers import AutoModelForMaskedLM
    cfg, _ = pretrained_run
    run = pretrain_cfg(shards128, tmp_path, "z3", steps=10, zero_stage=3)
    last = pretrain.run(run)
    out = export_checkpoint(last, str(tmp_path / "hf"))
    hf = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    fresh = AutoModelForMaskedLM.from_config(hf.config).eval()
    ids, labels = masked_rows(shards128, 16)
    with torch.no_grad():
        trained = hf(input_ids=ids, labels=labels).loss.item()
        untrained = fresh(input_ids=ids, labels=labels).loss.item()
    metrics = [json.loads(l) for l in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert trained < untrained - 0.3
    assert abs(trained - metrics[-1]["loss"]) < 0.6   # the gathered weights are the trained ones


def test_pull_from_s3_then_export(pretrained_run, s3, tmp_path):
    _, last = pretrained_run
    remote = s3.bucket("wr-pull") + "/runs/ckpt"
    storage.copy_tree(last, remote, progress=False)
    dest = tmp_path / "pulled"
    pull(remote, str(dest))
    assert (dest / "state.json").exists()
    with pytest.raises(storage.StorageError, match="not empty"):
        pull(remote, str(dest))
    out = export_checkpoint(remote, str(tmp_path / "hf"))   # export straight from s3:// too
    assert (out / "model.safetensors").exists()


def test_export_refuses_non_checkpoint(tmp_path, capsys):
    from wr_train.cli import main
    (tmp_path / "junk").mkdir()
    rc = main(["export", str(tmp_path / "junk"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a wr-train checkpoint (no state.json)" in err and "\n" not in err
    with pytest.raises(ExportError, match="not an exported model directory"):
        fill_mask_table(str(tmp_path / "junk"), "[MASK]")


# ---------------------------------------------------------------- UER import

def uer_state_dict(hf, version: str) -> dict:
    """A UER-py BERT MLM state dict with the literal key names of each UER version."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    old = version == "old"
    ln = ("gamma", "beta") if old else ("weight", "bias")
    emb = "embedding.word_embedding" if old else "embedding.word.embedding"
    out = {
        f"{emb}.weight": sd["bert.embeddings.word_embeddings.weight"],
        ("embedding.position_embedding.weight" if old else "embedding.pos.embedding.weight"):
            sd["bert.embeddings.position_embeddings.weight"],
        f"embedding.layer_norm.{ln[0]}": sd["bert.embeddings.LayerNorm.weight"],
        f"embedding.layer_norm.{ln[1]}": sd["bert.embeddings.LayerNorm.bias"],
    }
    # UER's 3-row segment table: row 0 is padding and must NOT become HF's type 0.
    seg = torch.cat([torch.full((1, hf.config.hidden_size), 9.0), sd["bert.embeddings.token_type_embeddings.weight"]])
    out["embedding.segment_embedding.weight" if old else "embedding.seg.embedding.weight"] = seg
    names = {"attention.self.query": "self_attn.linear_layers.0", "attention.self.key": "self_attn.linear_layers.1",
             "attention.self.value": "self_attn.linear_layers.2", "attention.output.dense": "self_attn.final_linear",
             "intermediate.dense": "feed_forward.linear_1", "output.dense": "feed_forward.linear_2"}
    for i in range(hf.config.num_hidden_layers):
        for h, u in names.items():
            for p in ("weight", "bias"):
                out[f"encoder.transformer.{i}.{u}.{p}"] = sd[f"bert.encoder.layer.{i}.{h}.{p}"]
        for h, u in (("attention.output.LayerNorm", "layer_norm_1"), ("output.LayerNorm", "layer_norm_2")):
            out[f"encoder.transformer.{i}.{u}.{ln[0]}"] = sd[f"bert.encoder.layer.{i}.{h}.weight"]
            out[f"encoder.transformer.{i}.{u}.{ln[1]}"] = sd[f"bert.encoder.layer.{i}.{h}.bias"]
    t1, tln, t2 = (("target.mlm_linear_1", "target.layer_norm", "target.mlm_linear_2") if old else
                   ("target.mlm.linear_1", "target.mlm.layer_norm", "target.mlm.linear_2"))
    out[f"{t1}.weight"] = sd["cls.predictions.transform.dense.weight"]
    out[f"{t1}.bias"] = sd["cls.predictions.transform.dense.bias"]
    out[f"{tln}.{ln[0]}"] = sd["cls.predictions.transform.LayerNorm.weight"]
    out[f"{tln}.{ln[1]}"] = sd["cls.predictions.transform.LayerNorm.bias"]
    out[f"{t2}.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    out[f"{t2}.bias"] = sd["cls.predictions.bias"]
    return out


@pytest.mark.parametrize("version", ["old", "new"])
def test_import_uer_logits_match(version, tiny_spm, tmp_path):
    from transformers import AutoModelForMaskedLM
    from wr_train.config import ModelConfig
    from wr_train.model import build_mlm
    ref = build_mlm(ModelConfig(size="tiny"), 8000, seed=5).eval()
    with torch.no_grad():  # distinct segment rows so a wrong slice shows
        ref.bert.embeddings.token_type_embeddings.weight.normal_()
        ref.cls.predictions.bias.normal_()
    path = tmp_path / "uer.bin"
    torch.save(uer_state_dict(ref, version), path)
    out = import_uer(str(path), str(tiny_spm), "tiny", str(tmp_path / "hf"))
    hf = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    ids = torch.randint(15, 8000, (2, 24))
    tt = torch.zeros_like(ids)
    tt[:, 12:] = 1
    with torch.no_grad():
        a = hf(input_ids=ids, token_type_ids=tt).logits
        b = ref(input_ids=ids, token_type_ids=tt).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_import_uer_of_another_size_is_refused(tiny_spm, tmp_path):
    from wr_train.config import ModelConfig
    from wr_train.model import build_mlm
    path = tmp_path / "uer.bin"
    torch.save(uer_state_dict(build_mlm(ModelConfig(size="tiny"), 8000), "new"), path)
    with pytest.raises(ExportError, match="embedding.*shape|has shape"):
        import_uer(str(path), str(tiny_spm), "mini", str(tmp_path / "hf"))
    path.write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="not a PyTorch state dict"):
        import_uer(str(path), str(tiny_spm), "tiny", str(tmp_path / "hf2"))


def test_score_table_goes_into_the_card(exported, tmp_path):
    import shutil

    from wr_train.tune_report import add_scores_to_card
    model = tmp_path / "m"
    shutil.copytree(exported, model)
    before = (model / "README.md").read_text()
    assert add_scores_to_card(str(model), "| Model | Score |\n|---|---|\n| x | 50.0 |\n")
    assert add_scores_to_card(str(model), "| Model | Score |\n|---|---|\n| x | 61.5 |\n")  # a later sweep
    card = (model / "README.md").read_text()
    assert card.startswith(before.rstrip("\n")) and card.count("## Fine-tuning") == 1
    assert "61.5" in card and "50.0" not in card
    assert not add_scores_to_card(str(tmp_path / "nowhere"), "x")
