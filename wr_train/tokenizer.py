"""The SentencePiece word segmenter (UER's recipe) and its HuggingFace export.

Ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [unused1..10]=5..14, then the pieces.
Chinese-specific choices:
- `add_dummy_prefix=False`: no `▁` is glued to the first piece of a line, so `[MASK]`
  predictions and fill-mask sequences carry no stray spaces.
- normalization `nmt_nfkc` (spm's default, as the seed used): full-width ASCII letters,
  digits and punctuation fold to half-width (`，` -> `,`, `１` -> `1`), which merges
  pieces that differ only in width. The exported HF tokenizer applies the same charsmap.
- spm's `max_sentence_length` counts bytes and silently drops longer lines, so training
  input is split into sentences first (`split_sentences`), and the drop count is reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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


def iter_corpus_lines(paths: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of local text files (undecodable bytes replaced)."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def expand_local_paths(patterns: Iterable[str]) -> list[str]:
    """Files named by paths, directories (all *.txt inside, recursively) or globs."""
    import glob
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(str(p) for p in Path(pat).rglob("*.txt"))
        else:
            found = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.isfile(pat) else [])
        if not found:
            raise TokenizerError(f"--corpus {pat}: no such file, or no *.txt files in it")
        files.extend(found)
    return files


def train_spm(corpus: list[str], out_dir: str, vocab_size: int = 100_000, *,
              char: bool = False, input_sentence_size: int = 2_000_000, seed: int = 0,
              threads: int | None = None, log=print) -> SpmReport:
    """Train the segmenter on local text files; write spm.model, spm.vocab, meta.json.

    char=True builds a character vocabulary (every character one token, same specials),
    for char-based baselines.
    """
    import time

    import sentencepiece as spm

    t0 = time.time()
    files = expand_local_paths(corpus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    n_sent = skipped = 0
    with tempfile.TemporaryDirectory() as tmp:
        sent_file = os.path.join(tmp, "sentences.txt")
        with open(sent_file, "w", encoding="utf-8") as f:
            for line in iter_corpus_lines(files):
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
            msg = str(e)
            m = re.search(r"value <= (\d+)", msg)
            if m:
                most = int(m.group(1))
                raise TokenizerError(
                    f"--vocab-size {vocab_size}: this corpus supports at most {most:,} pieces; "
                    f"use --vocab-size {most // 1000 * 1000 or most} or a larger corpus") from None
            raise TokenizerError(f"spm training failed: {msg.splitlines()[-1]}") from None
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


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """Write an AlbertTokenizer (ids equal the spm ids) + spiece.model into out_dir."""
    from transformers import AlbertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_model, out / "spiece.model")
    tok = AlbertTokenizer.from_pretrained(
        str(out), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]",
        do_lower_case=False, keep_accents=True, add_prefix_space=False)
    tok.save_pretrained(str(out))
    # save_pretrained writes tokenizer.json + config but not the spm file: keep ours.
    if not (out / "spiece.model").exists():
        shutil.copy(spm_model, out / "spiece.model")
    return tok


def sample_lines(paths: list[str], k: int, seed: int = 0) -> list[str]:
    """Reservoir sample of k non-empty lines (for tests and reports)."""
    rng = random.Random(seed)
    out: list[str] = []
    for i, line in enumerate(iter_corpus_lines(paths)):
        if i < k:
            out.append(line)
        else:
            j = rng.randint(0, i)
            if j < k:
                out[j] = line
    return out
