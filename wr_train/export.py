"""Checkpoint -> HuggingFace directory; UER checkpoint import; fill-mask.

The exported directory loads offline as the published UER word-based model cards show:
    pipeline('fill-mask', model=DIR)("[MASK]的首都是北京。")
    AutoTokenizer.from_pretrained(DIR) + BertModel.from_pretrained(DIR)
and is ready for `huggingface-cli upload`: its README.md carries the Hub's front matter
(language, license, library, pipeline tag, datasets, tags, a fill-mask widget).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from wr_train.checkpoint import Opened, open_checkpoint
from wr_train.config import ModelConfig, from_dict
from wr_train.hf import ExportError, check_hf_dir, quiet_transformers
from wr_train.storage import is_s3
from wr_train.text import FORMATS
from wr_train.tokenizer import load_spm, save_hf_tokenizer
from wr_train.tracking import add_to_tracked_run, loss_plot, probed_rows


# The exported config's dropout: what fine-tuning starts from (BERT's and UER's 0.1),
# whatever the pretraining recipe used (short CPU recipes pretrain without dropout).
FINETUNE_DROPOUT = 0.1
LICENSE = "apache-2.0"                 # the card's license unless `wr-train export --license`
WIDGET = "最近一趟去北京的[MASK]几点发车"   # the card's fill-mask example unless `--widget`
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # what AutoTokenizer loads (tokenizer.save_hf_tokenizer)


def save_hf_model(mlm, spm_model: str, out_dir: str, card: str | None = None) -> Path:
    """Write config.json + model.safetensors + the tokenizer (+ README.md model card)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mlm.config.architectures = ["BertForMaskedLM"]
    mlm.config.tokenizer_class = TOKENIZER_CLASS  # as tokenizer_config.json says
    mlm.save_pretrained(str(out), safe_serialization=True)
    save_hf_tokenizer(spm_model, str(out))
    if card:
        (out / "README.md").write_text(card, encoding="utf-8")
    return out


def load_checkpoint_weights(opened: Opened):
    """BertForMaskedLM with a verified checkpoint's full fp32 weights (any ZeRO stage)."""
    from wr_train.model import build_mlm
    cfg = from_dict(opened.state["config"])
    mlm = build_mlm(cfg.model, opened.state["vocab_size"])
    missing, unexpected = mlm.load_state_dict(opened.weights(), strict=False)
    missing = [k for k in missing if not k.endswith("decoder.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ExportError(f"{opened.path}: weights do not fit the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    mlm.tie_weights()
    return mlm.eval(), cfg


def write_hf_weights(opened: Opened, out: Path):
    """The opened checkpoint's model as a HuggingFace directory without a card (weights
    with fine-tuning's dropout, the tokenizer): what `export_checkpoint` writes first and
    what a downstream probe fine-tunes (wr_train.probe). Returns the checkpoint's config."""
    mlm, cfg = load_checkpoint_weights(opened)
    mlm.config.hidden_dropout_prob = mlm.config.attention_probs_dropout_prob = FINETUNE_DROPOUT
    save_hf_model(mlm, opened.spm_model(), str(out))
    return cfg


def export_checkpoint(checkpoint: str, out_dir: str, log=print, license: str | None = None,
                      widget: str | None = None) -> Path:
    """Export a complete checkpoint (local dir or s3://, every file's sha256 checked) to a
    HuggingFace directory; the model card names `license` (a Hub license id, default
    LICENSE) and shows `widget` (a sentence with [MASK], default WIDGET) in its fill-mask
    widget."""
    license = LICENSE if license is None else license
    widget = WIDGET if widget is None else widget
    if "[MASK]" not in widget:
        raise ExportError(f"--widget {widget!r}: expected a [MASK] in it")
    with open_checkpoint(checkpoint, log=log) as opened:
        state = opened.state
        out = Path(out_dir)
        cfg = write_hf_weights(opened, out)
        history = opened.history()
        plot = loss_plot(history, out / "loss.png")
        card = model_card(cfg, state, opened.manifests(), history, plot, name=out.resolve().name,
                          license=license, widget=widget)
        (out / "README.md").write_text(card, encoding="utf-8")
        kept = {k: state[k] for k in ("step", "stage", "stage_name", "stage_step", "world_size")}
        (out / "training_state.json").write_text(json.dumps(
            {**kept, "config": _without_local_paths(state["config"])}, indent=1, ensure_ascii=False))
    add_to_tracked_run(checkpoint.rstrip("/").rsplit("/", 1)[0],
                       [str(out / "README.md")] + ([str(out / plot)] if plot else []), log=log)
    log(f"export: {checkpoint} (step {state['step']}) -> {out}")
    return out


def _without_local_paths(config: dict) -> dict:
    """The resolved config with each local path (run storage, stage shards, a DeepSpeed
    JSON file) cut to its last component: this machine's folders are not the model's
    business. s3:// URIs stay."""
    def cut(path: str) -> str:
        return path if not path or is_s3(path) else os.path.basename(os.path.normpath(path))
    out = json.loads(json.dumps(config))
    for key in ("storage", "ds_config"):
        if isinstance(out.get(key), str) and (os.sep in out[key] or os.path.isabs(out[key])):
            out[key] = cut(out[key])
    for stage in out.get("stages") or []:
        if isinstance(stage.get("shards"), str):
            stage["shards"] = cut(stage["shards"])
    probe = out.get("probe") or {}
    if isinstance(probe.get("data"), str):
        probe["data"] = cut(probe["data"])
    return out


def source_names(manifests: dict) -> list[str]:
    """The corpus files' names (no folder, no format ending) of every stage's shards, in
    order, once each: the card's `datasets`."""
    names: list[str] = []
    for man in manifests.values():
        for src in man.get("sources", []):
            name = src["path"].rstrip("/").rsplit("/", 1)[-1]
            for ending in (*FORMATS, ".gz"):
                if name.lower().endswith(ending):
                    name = name[:-len(ending)]
                    break
            if name and name not in names:
                names.append(name)
    return names


def front_matter(manifests: dict, license: str, widget: str) -> str:
    """The Hub's metadata block of the card (https://huggingface.co/docs/hub/model-cards)."""
    meta = {"language": "zh", "license": license, "library_name": "transformers",
            "pipeline_tag": "fill-mask"}
    datasets = source_names(manifests)
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = ["bert", "roberta", "word-based", "chinese", "wr-train"]
    meta["widget"] = [{"text": widget}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def model_card(cfg, state: dict, manifests: dict, history: list[dict], plot: str | None,
               name: str = "MODEL_DIR", license: str = LICENSE, widget: str = WIDGET) -> str:
    """The exported directory's README.md; `name`: the directory's name, as the card's
    code loads it."""
    m = cfg.model.resolved()
    lines = [
        front_matter(manifests, license, widget), "",
        f"# Chinese word-based RoBERTa — {m.size} (L{m.layers}/H{m.hidden})", "",
        "Pretrained with wr-train (Ray Train + DeepSpeed ZeRO) with a sentencepiece word segmenter.", "",
        "## How to use", "",
        "```python",
        "from transformers import pipeline, AutoTokenizer, BertModel",
        f"unmasker = pipeline('fill-mask', model='{name}')",
        f"unmasker('{widget}')",
        f"tokenizer = AutoTokenizer.from_pretrained('{name}')",
        f"model = BertModel.from_pretrained('{name}')",
        "output = model(**tokenizer('用你喜欢的任何文本替换我。', return_tensors='pt'))",
        "```", "",
        f"`'{name}'` is this folder; once uploaded (`huggingface-cli upload USER/{name} {name}`) "
        f"use its Hub id, `USER/{name}`.",
        f"`AutoTokenizer` loads a `{TOKENIZER_CLASS}` whose ids equal the sentencepiece ids the "
        "model was trained on for any text (up to segmentations that tie in score, which the two "
        "libraries break differently). `AlbertTokenizer`, as the UER model cards use, loads the "
        "folder too, with transformers' own ALBERT pipeline: the same ids on text without "
        "spaces, but it drops the spaces otherwise.", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| layers / hidden / heads / FFN | {m.layers} / {m.hidden} / {m.heads} / {m.ffn} |",
        f"| vocabulary | {state['vocab_size']:,} sentencepiece pieces |",
        f"| steps | {state['step']:,} (stopped in stage {state['stage'] + 1}: {state['stage_name']}, "
        f"step {state['stage_step']:,}/{state['stage_steps']:,}) |",
        f"| workers | {state['world_size']} |",
    ]
    for st in cfg.stages:
        lines.append(f"| stage {st.name} | {st.steps:,} steps, global batch {st.global_batch}, lr {st.lr:g} |")
    if history:
        lines.append(f"| final MLM loss / accuracy | {history[-1]['loss']:.4f} / {history[-1]['mlm_acc']:.3f} |")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        e = evals[-1]
        gap = e.get("unigram_floor", 0) - e["eval_loss"]
        floor = (f" (unigram floor {e['unigram_floor']:.4f}: {abs(gap):.3f} nats {'below' if gap >= 0 else 'above'} it)"
                 if "unigram_floor" in e else "")
        acc_floor = f" (commonest token {e['unigram_acc']:.1%})" if "unigram_acc" in e else ""
        lines.append(f"| held-out eval loss | {e['eval_loss']:.4f}{floor} |")
        lines.append(f"| held-out eval accuracy | {e['eval_acc']:.1%}{acc_floor} |")
    probed = probed_rows(history)
    if probed:
        p = probed[-1]
        lines.append(f"| downstream probe ({p['probe_task']}) | dev accuracy {p['probe_acc']:.1%} at step "
                     f"{p['step']:,} (majority class {p['probe_floor']:.1%}; fine-tuned on "
                     f"{p['probe_train_examples']:,} examples, lr {p['probe_lr']:g}) |")
    lines += ["", "## Corpus", "", "| stage | rows | seq | non-pad tokens | documents | pad |", "|---|---|---|---|---|---|"]
    for stage, man in manifests.items():
        lines.append(f"| {stage} | {man['rows']:,} | {man['seq_length']} | {man['non_pad_tokens']:,} | "
                     f"{man['documents']:,} | {man['pad_fraction']:.2%} |")
    sources = [f"{src['path'].rstrip('/').rsplit('/', 1)[-1]} ({src.get('format', 'txt')})"
               for man in manifests.values() for src in man.get("sources", [])]
    if sources:
        lines += ["", f"Sources: {', '.join(dict.fromkeys(sources))}."]
    if plot:
        lines += ["", "## Loss", "", "Train loss per report; held-out eval loss at each checkpoint; the "
                  "unigram floor is the loss of predicting every masked token from its frequency alone." +
                  (" Right axis: the downstream probe's dev accuracy at each checkpoint (a short "
                   "fine-tuning of that checkpoint), above its floor, the task's majority class."
                   if probed else ""),
                  "", f"![MLM loss]({plot})"]
    return "\n".join(lines) + "\n"


def fill_mask_table(model_dir: str, text: str, top_k: int = 5) -> str:
    check_hf_dir(model_dir)
    if "[MASK]" not in text:
        raise ExportError(f"text {text!r}: expected a [MASK] in it")
    # after the checks: importing transformers' pipelines takes seconds
    from transformers import pipeline
    with quiet_transformers():  # no weight-loading progress bar inside the table's output
        unmasker = pipeline("fill-mask", model=model_dir, tokenizer=model_dir)
    results = unmasker(text, top_k=top_k)
    if results and isinstance(results[0], list):
        results = results[0]
    rows = ["rank  score   token  sequence"]
    for i, r in enumerate(results, 1):
        rows.append(f"{i:>4}  {r['score']:.4f}  {r['token_str']:<5}  {r['sequence']}")
    return "\n".join(rows)


# ---------------------------------------------------------------- UER import

# UER-py key names (old -> current) onto HF BertForMaskedLM names.
_UER_EMBED = {
    ("embedding.word_embedding.weight", "embedding.word.embedding.weight"): "bert.embeddings.word_embeddings.weight",
    ("embedding.position_embedding.weight", "embedding.pos.embedding.weight"): "bert.embeddings.position_embeddings.weight",
    ("embedding.layer_norm.gamma", "embedding.layer_norm.weight"): "bert.embeddings.LayerNorm.weight",
    ("embedding.layer_norm.beta", "embedding.layer_norm.bias"): "bert.embeddings.LayerNorm.bias",
}
_UER_LAYER = {
    "self_attn.linear_layers.0": "attention.self.query",
    "self_attn.linear_layers.1": "attention.self.key",
    "self_attn.linear_layers.2": "attention.self.value",
    "self_attn.final_linear": "attention.output.dense",
    "layer_norm_1": "attention.output.LayerNorm",
    "feed_forward.linear_1": "intermediate.dense",
    "feed_forward.linear_2": "output.dense",
    "layer_norm_2": "output.LayerNorm",
}
_UER_TARGET = {
    ("target.mlm_linear_1", "target.mlm.linear_1"): "cls.predictions.transform.dense",
    ("target.layer_norm", "target.mlm.layer_norm"): "cls.predictions.transform.LayerNorm",
    ("target.mlm_linear_2", "target.mlm.linear_2"): "cls.predictions.decoder",
}


def _pick(sd: dict, names, path: str, suffix: str = ""):
    for n in names:
        for s in ([suffix] if suffix not in ("weight", "bias") else
                  ([suffix, "gamma" if suffix == "weight" else "beta"] if "layer_norm" in n else [suffix])):
            key = f"{n}.{s}" if s else n
            if key in sd:
                return sd[key]
    raise ExportError(f"{path}: missing key {names[-1]}{'.' + suffix if suffix else ''} "
                      f"(not a UER BERT/RoBERTa MLM checkpoint?)")


def uer_to_hf(sd: dict, layers: int, path: str = "UER checkpoint") -> dict:
    """Map a UER state dict onto HF BertForMaskedLM names."""
    out = {}
    for names, hf in _UER_EMBED.items():
        out[hf] = _pick(sd, names, path)
    seg = _pick(sd, ("embedding.segment_embedding.weight", "embedding.seg.embedding.weight"), path)
    # UER's segment table has 3 rows: row 0 is padding, rows 1-2 are segments A and B.
    out["bert.embeddings.token_type_embeddings.weight"] = seg[1:, :]
    for i in range(layers):
        for uer, hf in _UER_LAYER.items():
            for part in ("weight", "bias"):
                out[f"bert.encoder.layer.{i}.{hf}.{part}"] = _pick(
                    sd, (f"encoder.transformer.{i}.{uer}",), path, part)
    for names, hf in _UER_TARGET.items():
        for part in ("weight", "bias"):
            out[f"{hf}.{part}"] = _pick(sd, names, path, part)
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    return out


def import_uer(uer_bin: str, spm_dir: str, size: str, out_dir: str, log=print) -> Path:
    from wr_train.config import ConfigError
    from wr_train.model import build_mlm
    try:  # the cheapest check first: before reading a large checkpoint
        cfg = ModelConfig(size=size).resolved()
    except ConfigError as e:
        raise ExportError(f"--size {size}: {e}") from None
    if not os.path.isfile(uer_bin):
        raise ExportError(f"{uer_bin}: no such file")
    try:
        sd = torch.load(uer_bin, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{uer_bin}: not a PyTorch state dict ({type(e).__name__})") from None
    sp = load_spm(spm_dir)
    mlm = build_mlm(cfg, sp.get_piece_size())
    emb = _pick(sd, ("embedding.word_embedding.weight", "embedding.word.embedding.weight"), uer_bin)
    if tuple(emb.shape) != (sp.get_piece_size(), cfg.hidden):
        raise ExportError(f"{uer_bin}: word embedding has shape {tuple(emb.shape)}, the {size} model with "
                          f"vocab {sp.get_piece_size()} expects {(sp.get_piece_size(), cfg.hidden)}")
    mapped = uer_to_hf(sd, cfg.layers, uer_bin)
    expected = mlm.state_dict()
    for key, tensor in mapped.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise ExportError(f"{uer_bin}: {key} has shape {tuple(tensor.shape)}, the {size} model with "
                              f"vocab {sp.get_piece_size()} expects {tuple(expected[key].shape)}")
    extra_layers = [k for k in sd if k.startswith(f"encoder.transformer.{cfg.layers}.")]
    if extra_layers:
        raise ExportError(f"{uer_bin}: has more than {cfg.layers} layers ({extra_layers[0]}); not a {size} model")
    missing, _ = mlm.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k not in ("bert.embeddings.position_ids",) and "decoder.weight" not in k]
    if missing:
        raise ExportError(f"{uer_bin}: nothing maps onto {missing[0]}")
    mlm.tie_weights()
    spm_model = str(Path(spm_dir) / "spm.model")
    out = save_hf_model(mlm.eval(), spm_model, out_dir)
    shutil.copy(spm_model, out / "spiece.model")
    log(f"import-uer: {uer_bin} ({size}) -> {out}")
    return out
