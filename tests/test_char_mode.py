"""Char mode end to end on a small real corpus: char tokenizer -> Ray Data packing ->
Ray Train/DeepSpeed pretraining -> export -> fill-mask -> fine-tuning, all unchanged."""
from __future__ import annotations

import sentencepiece as spm

from wr_train.tokenizer import CLS, MASK, PAD, SEP, UNK, train_spm


def test_char_pipeline_end_to_end(tmp_path, ray_local, small_corpus, demo_dir):
    from wr_train import pretrain
    from wr_train.preprocess import preprocess
    from wr_train.shards import load_manifest
    from wr_train.export import export_checkpoint, fill_mask_table
    from wr_train.finetune import FinetuneConfig, finetune
    from wr_train.tasks import load_task

    from tests.conftest import pretrain_cfg

    spm_dir = tmp_path / "spm-char"
    train_spm(small_corpus, str(spm_dir), 12_000, char=True, input_sentence_size=100_000, log=lambda *a: None)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spm.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.piece_to_id("[MASK]")) == (PAD, UNK, CLS, SEP, MASK)
    text = "最近一趟去北京的车几点发车"
    pieces = sp.encode(text, out_type=str)
    assert pieces == list(text)            # every character one token
    assert sp.get_piece_size() < 12_000    # the vocabulary is the corpus's characters, not the limit

    shards = tmp_path / "shards"
    manifest = preprocess(small_corpus, str(spm_dir), str(shards), seq_length=64)
    assert manifest["vocab_size"] == sp.get_piece_size()
    assert load_manifest(str(shards))["rows"] == manifest["rows"] > 0

    cfg = pretrain_cfg(shards, tmp_path / "runs", "char", steps=10, workers=1)
    last = pretrain.run(cfg)
    hf = tmp_path / "hf"
    export_checkpoint(last, str(hf))
    from transformers import AutoTokenizer, pipeline
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert tok(text)["input_ids"] == [CLS, *sp.encode(text), SEP]
    out = pipeline("fill-mask", model=str(hf))("[MASK]的首都是北京。", top_k=3)
    assert len(out) == 3
    for o in out:
        if o["token"] > MASK + 10:         # a character, not one of the 15 specials
            assert len(o["token_str"]) == 1 and o["sequence"] == o["token_str"] + "的首都是北京。"
    assert len(fill_mask_table(str(hf), "中国的首都是[MASK]京", top_k=2).splitlines()) == 3

    task = load_task("chnsenticorp", str(demo_dir / "tasks"))
    result = finetune(str(hf), task, FinetuneConfig(epochs=1, batch_size=32, lr=1e-3, threads=1,
                                                   seq_length=64, max_train_examples=64,
                                                   max_eval_examples=64))
    assert 0.0 <= result["dev_acc"] <= 1.0 and result["dev_examples"] == 64
