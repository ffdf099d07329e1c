"""The SentencePiece word segmenter (UER's recipe) and its HuggingFace export.

Ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [unused1..10]=5..14, then the pieces.
Chinese-specific choices:
- `add_dummy_prefix=False`: no `▁` is glued to the first piece of a line, so `[MASK]`
  predictions and fill-mask sequences carry no stray spaces.
- normalization `nmt_nfkc` (spm's default, as the seed used): full-width ASCII letters,
  digits and punctuation fold to half-width (`，` -> `,`, `１` -> `1`), which merges
  pieces that differ only in width; spaces are stripped at the ends, runs of them become
  one, and a space inside text is a `▁` piece of its own. No lowercasing, accents kept.
  The exported HF tokenizer (`save_hf_tokenizer`) replays exactly this, so its ids equal
  spm's on real text, spaces included.
- a vocab the corpus cannot fill, or one smaller than its distinct characters, is a
  one-line error suggesting a size that works.
- spm's `max_sentence_length` counts bytes and silently drops longer lines, so training
  input is split into sentences first (`split_sentences`), and the drop count is reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from wr_train.storage import sha256_file as file_sha256  # noqa: F401 (the one sha256 helper; corpus uses it from here)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(1, 11)]
NUM_SPECIAL = len(SPECIAL_PIECES)  # ids below this are never masked targets or random replacements
MAX_SENTENCE_BYTES = 4096
MAX_SENTENCE_CHARS = 300  # split point for long sentences: 300 CJK chars = 900 bytes

_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")


class TokenizerError(ValueError):
    pass


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> Iterator[str]:
    """Split a document at sentence ends; hard-split pieces longer than max_chars."""
    for sent in _SENTENCE_END.split(text):
        sent = sent.strip()
        for start in range(0, len(sent), max_chars):
            piece = sent[start:start + max_chars]
            if piece:
                yield piece


@dataclass
class SpmReport:
    sentences: int
    sampled: int
    skipped_too_long: int
    vocab_size: int
    seconds: float


def iter_corpus_lines(paths: Iterable[str], text_field: str = "text",
                      text_column: str = "text") -> Iterator[str]:
    """The documents of the corpus files named by paths, dirs or globs (any format
    wr_train.text reads, local or s3://), non-empty and stripped, as preprocess reads them."""
    from wr_train.text import read_documents  # here: it brings pyarrow, which the id constants' users do not need
    yield from read_documents(corpus_sources(list(paths), text_field, text_column))


def corpus_sources(corpus: list[str], text_field: str = "text", text_column: str = "text") -> list:
    """The corpus's files (wr_train.text.Source), each checked to be readable in its
    format: a binary or GBK file would otherwise train a vocab of U+FFFD."""
    from wr_train.text import CorpusError, check_source, list_sources
    try:
        return [check_source(s, text_field, text_column) if s.bytes > 0 else s
                for s in list_sources(list(corpus))]
    except CorpusError as e:
        raise TokenizerError(str(e)) from None


def train_spm(corpus: list[str], out_dir: str, vocab_size: int = 100_000, *,
              char: bool = False, input_sentence_size: int = 2_000_000, seed: int = 0,
              threads: int | None = None, log=print, text_field: str = "text",
              text_column: str = "text") -> SpmReport:
    """Train the segmenter on a corpus (files, dirs or globs; local or s3://; the formats
    preprocess reads, jsonl records' text in `text_field`, Parquet's in `text_column`);
    write spm.model, spm.vocab, meta.json.

    char=True builds a character vocabulary (every character one token, same specials),
    for char-based baselines.
    """
    import time

    import sentencepiece as spm

    from wr_train.text import read_documents  # here: it brings pyarrow, which the id constants' users do not need
    t0 = time.time()
    files = corpus_sources(corpus, text_field, text_column)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out_dir}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    n_sent = skipped = 0
    with tempfile.TemporaryDirectory() as tmp:
        sent_file = os.path.join(tmp, "sentences.txt")
        with open(sent_file, "w", encoding="utf-8") as f:
            for line in read_documents(files):
                digest.update(line.encode("utf-8"))
                for sent in split_sentences(line):
                    if len(sent.encode("utf-8")) > MAX_SENTENCE_BYTES:
                        skipped += 1  # only possible for exotic 4-byte text; spm would drop it silently
                        continue
                    f.write(sent + "\n")
                    n_sent += 1
        if n_sent == 0:
            raise TokenizerError(f"--corpus {' '.join(corpus)}: no text found (empty files?)")
        log(f"spm: {n_sent:,} sentences from {len(files)} file(s); training "
            f"{'char' if char else 'unigram'} vocab {vocab_size:,} "
            f"(sampling {min(n_sent, input_sentence_size):,} sentences)")
        prefix = os.path.join(tmp, "spm")
        kwargs = dict(
            input=sent_file, model_prefix=prefix, vocab_size=vocab_size,
            model_type="char" if char else "unigram",
            max_sentencepiece_length=6, max_sentence_length=MAX_SENTENCE_BYTES,
            pad_id=PAD, unk_id=UNK, bos_id=CLS, eos_id=SEP,
            pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
            user_defined_symbols=SPECIAL_PIECES[MASK:],
            add_dummy_prefix=False, normalization_rule_name="nmt_nfkc",
            character_coverage=0.9995, byte_fallback=False,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=min(1_000_000, max(vocab_size * 10, 100_000)),
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        if char:
            kwargs["hard_vocab_limit"] = False
        spm.set_random_generator_seed(seed)  # the sentence sample is reproducible
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as e:
            raise _training_error(str(e), vocab_size, corpus) from None
        shutil.copy(prefix + ".model", out / "spm.model")
        shutil.copy(prefix + ".vocab", out / "spm.vocab")
    sp = load_spm(str(out))
    meta = {
        "vocab_size": sp.get_piece_size(),
        "model_type": "char" if char else "unigram",
        "special_ids": {p: sp.piece_to_id(p) for p in SPECIAL_PIECES},
        "normalization": "nmt_nfkc",
        "add_dummy_prefix": False,
        "max_sentencepiece_length": 6,
        "corpus_sha256": digest.hexdigest(),
        "corpus_files": len(files),
        "sentences": n_sent,
        "sampled_sentences": min(n_sent, input_sentence_size),
        "skipped_too_long": skipped,
        "spm_sha256": file_sha256(out / "spm.model"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    report = SpmReport(n_sent, meta["sampled_sentences"], skipped, meta["vocab_size"], time.time() - t0)
    log(f"spm: wrote {out}/spm.model (vocab {meta['vocab_size']:,}, {skipped} sentences skipped "
        f"as > {MAX_SENTENCE_BYTES} bytes) in {report.seconds:.1f}s")
    return report


def _training_error(msg: str, vocab_size: int, corpus: list[str]) -> TokenizerError:
    """spm's multi-line CHECK failure -> one line saying what to change."""
    m = re.search(r"value <= (\d+)", msg)
    if m:  # "Vocabulary size too high (N). Please set it to a value <= M."
        most = int(m.group(1))
        suggest = most // 1000 * 1000 or most
        return TokenizerError(
            f"--vocab-size {vocab_size}: corpus {' '.join(corpus)} supports at most {most:,} "
            f"pieces; use --vocab-size {suggest} (or a larger corpus / --sample)")
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:  # every character kept by character_coverage needs its own piece (+ the specials)
        need = int(m.group(2))
        suggest = (need // 1000 + 1) * 1000
        return TokenizerError(
            f"--vocab-size {vocab_size}: too small, corpus {' '.join(corpus)} needs {need:,} "
            f"pieces for its characters and the {NUM_SPECIAL} specials alone; use "
            f"--vocab-size {suggest} or more")
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    return TokenizerError(f"spm training on {' '.join(corpus)} failed: {lines[-1] if lines else msg}")




def check_spm_dir(spm_dir: str) -> Path:
    """The spm.model inside an spm directory, or a one-line error saying what is missing."""
    p = Path(spm_dir)
    model = p / "spm.model" if p.is_dir() else p
    if not model.is_file() or model.suffix != ".model":
        raise TokenizerError(f"--spm {spm_dir}: not an spm directory (expected spm.model inside, "
                             f"made by `wr-train spm`)")
    return model


def load_spm(spm_dir: str):
    import sentencepiece as spm
    model = check_spm_dir(spm_dir)
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model))
    except (OSError, RuntimeError):
        raise TokenizerError(f"--spm {spm_dir}: {model} is not a sentencepiece model") from None
    if sp.piece_to_id("[MASK]") != MASK or sp.pad_id() != PAD or sp.bos_id() != CLS:
        raise TokenizerError(f"--spm {spm_dir}: special ids differ from wr-train's "
                             f"([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)")
    return sp


def save_hf_tokenizer(spm_model: str, out_dir: str):
    """Write a tokenizers-backed HF tokenizer whose ids equal the spm ids, + spiece.model,
    into out_dir; returns it (loads back with AutoTokenizer.from_pretrained(out_dir)).

    Built from the spm model itself, not through AlbertTokenizer (whose pipeline drops
    every space and rewrites `` and '' to ", so text with spaces got other ids than
    pretraining saw). The pipeline replays spm's: the model's precompiled nmt_nfkc
    charsmap, strip, runs of spaces -> one, then Metaspace("▁", prepend never, split):
    a space becomes a `▁` piece exactly where spm puts one. Unigram over the spm pieces
    and scores. [PAD] [UNK] [CLS] [SEP] [MASK] [unused1..10] are special tokens (ids
    0..14); encode(text) gives `[CLS] ids [SEP]`, a pair `[CLS] a [SEP] b [SEP]`.
    Loading the dir with AlbertTokenizer instead still works (the config carries
    do_lower_case=False, keep_accents=True, add_prefix_space=False) but gives ALBERT's
    pipeline: equal ids only for text without spaces, `` or ''.
    Known differences from spm (tests/test_tokenizer.py pins them):
    - a special token written in the text is matched by HF for all fifteen; spm matches
      only its user symbols ([MASK], [unusedN]) and spells "[CLS]" etc. out in pieces;
    - whitespace right next to a special token in the text: spm emits a `▁` piece
      ("中国 [MASK]" -> 中国 ▁ [MASK]), HF drops it (中国 [MASK]), since HF normalizes
      the text on either side of a special token on its own.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    if [p for p, _ in vocab[:NUM_SPECIAL]] != SPECIAL_PIECES:
        raise TokenizerError(f"{spm_model}: the first {NUM_SPECIAL} pieces are not "
                             f"{' '.join(SPECIAL_PIECES[:5])} [unused1..10]")
    norm = proto.normalizer_spec
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK, byte_fallback=False))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    scheme = "always" if norm.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]",
        additional_special_tokens=SPECIAL_PIECES[MASK + 1:],
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # BERT: segments
    hf.save_pretrained(str(out))
    # The generic class name loads with AutoTokenizer in transformers 4.x and 5.x alike.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # For code that still loads the dir with AlbertTokenizer (its pipeline drops spaces):
    # without these it would lowercase, strip accents and put a "▁" in front.
    config.update(do_lower_case=False, keep_accents=True, add_prefix_space=False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    # save_pretrained writes tokenizer.json + config but not the spm file: keep ours.
    shutil.copy(spm_model, out / "spiece.model")
    return hf
