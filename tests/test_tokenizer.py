"""wr_train.tokenizer: the spm word segmenter (special ids, round trip, Chinese choices),
the exported HF tokenizer (same ids as spm on real text), and the training errors."""
from __future__ import annotations

import json
import unicodedata

import pytest

from tests.conftest import sample_lines, segmentation_tie
from wr_train.tokenizer import (CLS, MASK, NUM_SPECIAL, PAD, SEP, SPECIAL_PIECES, UNK,
                                TokenizerError, check_spm_dir, load_spm,
                                save_hf_tokenizer, split_sentences, train_spm)

# Edge cases beside the real lines: spaces of every kind, full-width forms (nmt_nfkc folds
# them), quotes that ALBERT's own pipeline rewrites, unknown characters, [MASK] and
# [unused3] inside text.
EDGE_TEXTS = [
    "红星美凯龙 三伏天已到，比天气更热的是",
    "  前后和中间  多个   空格  ",
    "PC卡插槽1 x Express扩展卡",
    "全角，１２３ＡＢＣ！",
    "制表\t换行\n全角空格\u3000不间断\u00a0空格",
    "``引号'' \"双引号\" 「书名号」",
    "é è ê café naïve",
    "😀 表情 😀😀 emoji",
    "ﾊﾝｶｸ半角片假名",
    "零宽\u200b字符",
    "中国[MASK]京",
    "[MASK]是首都",
    "x[unused3]y",
    "1998年1月1日，中共中央总书记江泽民发表新年讲话。",
]


@pytest.fixture(scope="module")
def sp(tiny_spm):
    return load_spm(str(tiny_spm))


@pytest.fixture(scope="module")
def real_lines(small_corpus) -> list[str]:
    """500 real lines (reviews, news), cut to 200 characters to keep the tests quick."""
    return [line[:200] for line in sample_lines(small_corpus, 500, seed=1)]


@pytest.fixture(scope="module")
def hf(tiny_spm, tmp_path_factory):
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("hf_tok")
    save_hf_tokenizer(str(tiny_spm / "spm.model"), str(out))
    return AutoTokenizer.from_pretrained(str(out))


# ---------------------------------------------------------------- special ids, meta

def test_special_ids(sp, tiny_spm):
    assert (PAD, UNK, CLS, SEP, MASK) == (0, 1, 2, 3, 4)
    assert SPECIAL_PIECES == (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                              + [f"[unused{i}]" for i in range(1, 11)])
    assert NUM_SPECIAL == 15
    assert [sp.id_to_piece(i) for i in range(NUM_SPECIAL)] == SPECIAL_PIECES
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("[unused1]") == 5 and sp.piece_to_id("[unused10]") == 14
    # no ordinary piece shadows a special one
    assert all(sp.id_to_piece(i) not in SPECIAL_PIECES for i in range(NUM_SPECIAL, sp.get_piece_size()))
    vocab_lines = (tiny_spm / "spm.vocab").read_text(encoding="utf-8").splitlines()
    assert [ln.split("\t")[0] for ln in vocab_lines[:NUM_SPECIAL]] == SPECIAL_PIECES
    assert len(vocab_lines) == sp.get_piece_size() == 8000


def test_meta_json(tiny_spm, sp):
    meta = json.loads((tiny_spm / "meta.json").read_text())
    assert meta["vocab_size"] == 8000
    assert meta["special_ids"] == {p: i for i, p in enumerate(SPECIAL_PIECES)}
    assert meta["add_dummy_prefix"] is False and meta["normalization"] == "nmt_nfkc"
    assert meta["max_sentencepiece_length"] == 6
    assert meta["sentences"] > 30_000 and meta["sampled_sentences"] == 30_000
    assert meta["skipped_too_long"] == 0
    assert len(meta["corpus_sha256"]) == 64
    assert max(len(sp.id_to_piece(i)) for i in range(NUM_SPECIAL, sp.get_piece_size())) <= 6


# ---------------------------------------------------------------- encode / decode

def test_round_trip_real_text(sp, real_lines):
    """decode(encode(x)) is x as spm normalizes it (nmt_nfkc, spaces collapsed), for every
    line without unknown characters; unknowns are rare on the training text."""
    unknown = 0
    for line in real_lines:
        ids = sp.encode(line)
        assert ids and all(NUM_SPECIAL <= i or i == UNK for i in ids), line
        if UNK in ids:
            unknown += 1
            continue
        assert sp.decode(ids) == sp.normalize(line).replace("▁", " "), line
    assert unknown <= len(real_lines) // 10  # character_coverage 0.9995 on a 30k sample


def test_chinese_choices(sp):
    # no dummy prefix: nothing glued in front of the first piece, no "▁" after [MASK]
    ids = sp.encode("[MASK]是首都")
    assert ids[0] == MASK and not sp.id_to_piece(ids[1]).startswith("▁")
    assert not sp.id_to_piece(sp.encode("中国")[0]).startswith("▁")
    # nmt_nfkc: full-width punctuation, digits and letters fold to half-width
    assert sp.normalize("，１２３ＡＢＣ！") == ",123ABC!"
    # a space inside text is a piece of its own
    assert "▁" in sp.encode("红星 三伏", out_type=str)
    # user symbols inside text keep their ids
    assert sp.encode("x[unused3]y")[1] == 7
    # words: most pieces of real Chinese are longer than one character
    pieces = sp.encode("中华人民共和国国务院总理今天在北京会见了来访的外国代表团", out_type=str)
    assert len(pieces) < 20


def test_split_sentences():
    text = "第一句。第二句！第三句？" + "长" * 700 + "。尾巴"
    parts = list(split_sentences(text, max_chars=300))
    assert parts[:3] == ["第一句。", "第二句！", "第三句？"]
    assert all(0 < len(p) <= 300 for p in parts)
    assert "".join(parts) == text


# ---------------------------------------------------------------- HF export

def test_hf_ids_equal_spm_ids_on_real_text(sp, hf, real_lines):
    ties = sum(segmentation_tie(sp, hf(text, add_special_tokens=False)["input_ids"], sp.encode(text), text)
               for text in real_lines + EDGE_TEXTS)
    assert ties <= len(real_lines) // 20
    line = real_lines[0]
    assert hf(line)["input_ids"] == [CLS] + sp.encode(line) + [SEP]
    pair = hf("今天", "天气很好")
    assert pair["input_ids"] == [CLS] + sp.encode("今天") + [SEP] + sp.encode("天气很好") + [SEP]
    assert pair["token_type_ids"] == [0] * (len(sp.encode("今天")) + 2) + [1] * (len(sp.encode("天气很好")) + 1)


def test_hf_special_tokens_and_files(hf, sp, tiny_spm, tmp_path):
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert hf.convert_tokens_to_ids([f"[unused{i}]" for i in range(1, 11)]) == list(range(5, 15))
    assert len(hf) == 8000
    assert hf.decode(hf("中国 是 个[MASK]")["input_ids"], skip_special_tokens=True) == "中国 是 个"
    out = tmp_path / "hf"
    save_hf_tokenizer(str(tiny_spm / "spm.model"), str(out))
    assert (out / "spiece.model").read_bytes() == (tiny_spm / "spm.model").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # loaded as an AlbertTokenizer (older exports' way) it agrees on text without spaces
    from transformers import AlbertTokenizer
    albert = AlbertTokenizer.from_pretrained(str(out))
    text = "最近一趟去北京的[MASK]几点发车，ＡＢＣ"
    assert albert(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_hf_documented_differences(sp, hf):
    """The two places where the HF tokenizer and spm differ (save_hf_tokenizer's doc):
    whitespace next to a special token written in the text, and [CLS]/[SEP]/[PAD]/[UNK]
    written in the text (spm spells them out, HF takes them as the token)."""
    assert sp.encode("中国 [MASK] 京", out_type=str) == ["中国", "▁", "[MASK]", "▁", "京"]
    assert hf.convert_ids_to_tokens(hf("中国 [MASK] 京", add_special_tokens=False)["input_ids"]) == ["中国", "[MASK]", "京"]
    assert sp.encode("[CLS]")[0] != CLS
    assert hf("[CLS]", add_special_tokens=False)["input_ids"] == [CLS]


# ---------------------------------------------------------------- training errors

@pytest.mark.parametrize("vocab, says, better", [
    (200_000, "--vocab-size 200000", lambda v: 1000 <= v < 200_000),   # the corpus cannot fill it
    (500, "too small", lambda v: v > 500),                             # fewer than its characters
])
def test_vocab_size_errors_are_one_line_with_a_suggestion(small_corpus, tmp_path, vocab, says, better):
    with pytest.raises(TokenizerError) as info:
        train_spm(small_corpus[1:], str(tmp_path / "spm"), vocab, input_sentence_size=5_000,
                  log=lambda *a: None)
    msg = str(info.value)
    assert "\n" not in msg and says in msg and small_corpus[1] in msg
    assert better(int(msg.split("use --vocab-size ")[1].split()[0]))


def test_bad_training_input(tmp_path):
    with pytest.raises(TokenizerError, match=r"--corpus .*nope: no such file"):
        train_spm([str(tmp_path / "nope")], str(tmp_path / "spm"), 8000)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(TokenizerError, match=r"empty\.txt: no text found"):
        train_spm([str(empty)], str(tmp_path / "spm"), 8000)


def test_not_an_spm_dir(tmp_path):
    with pytest.raises(TokenizerError, match=r"--spm .*: not an spm directory \(expected spm.model"):
        check_spm_dir(str(tmp_path))
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"is not a sentencepiece model"):
        load_spm(str(tmp_path))


def test_nfkc_is_close_to_spm_normalization(sp, real_lines):
    """nmt_nfkc is NFKC plus whitespace/control clean-up: documents what the choice means."""
    same = sum(sp.normalize(t).replace("▁", " ") == " ".join(unicodedata.normalize("NFKC", t).split())
               for t in real_lines)
    assert same >= 0.95 * len(real_lines)
