"""Calibration and evaluation text: the embedded Wikipedia sample, or the user's own files.

The default text is the ~100-article English Wikipedia sample that ships inside the gensim wheel. Texts are split
deterministically, the embedded articles and a user's file alike: every fourth text (article, paragraph or JSONL
record) is held out for evaluation and never used for calibration.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

_WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HELD_OUT_EVERY = 4
_MIN_PARAGRAPH_CHARS = 200


class DataError(ValueError):
    """Text that cannot be read or holds nothing to calibrate on."""


def _wiki_sample_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default text needs the 'gensim' package (pip install gensim)")
    return Path(next(iter(spec.submodule_search_locations))) / _WIKI_SAMPLE


def _clean_wiki_markup(text: str) -> str:
    """Prose paragraphs of one article, without the markup gensim's filter leaves (bold/italic quotes, headings)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text).replace("'''", "").replace("''", "")
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n")]
    return "\n\n".join(p for p in paragraphs if len(p) >= _MIN_PARAGRAPH_CHARS and not p.startswith("=="))


@lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(_wiki_sample_path()) as f:
        articles = (_clean_wiki_markup(text) for _title, text, _pageid in extract_pages(f))
        return tuple(a for a in articles if a)


def _split(texts: list[str] | tuple[str, ...], split: str) -> list[str]:
    """One of two disjoint splits: 'calibration' or 'evaluation' (every fourth text)."""
    if split == "calibration":
        return [t for i, t in enumerate(texts) if i % _HELD_OUT_EVERY != _HELD_OUT_EVERY - 1]
    if split == "evaluation":
        return [t for i, t in enumerate(texts) if i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1]
    raise ValueError(f"unknown split {split!r}; expected 'calibration' or 'evaluation'")


def default_texts(split: str) -> list[str]:
    """The embedded Wikipedia articles of one split."""
    return _split(_wiki_articles(), split)


def _jsonl_record_text(record: object, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        contents = [m.get("content") for m in record["messages"] if isinstance(m, dict)]
        if contents and all(isinstance(c, str) for c in contents):
            return "\n\n".join(contents)
    raise DataError(f"{where}: expected an object with a 'text' string or a 'messages' list of {{role, content}}")


def read_texts(path: str | Path) -> list[str]:
    """Texts from a user file: .txt (paragraphs split on blank lines) or .jsonl (`text`, or chat `messages`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file does not exist: {path}")
    if path.suffix == ".txt":
        texts = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
    elif path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            texts.append(_jsonl_record_text(record, f"{path}:{number}"))
    else:
        raise DataError(f"data file {path} must be .txt or .jsonl")
    if not texts:
        raise DataError(f"data file {path} holds no text")
    return texts


def load_texts(path: str | Path | None, split: str) -> list[str]:
    """One split of the user's texts when a path is given, else of the embedded articles."""
    if not path:
        return default_texts(split)
    texts = read_texts(path)
    if len(texts) < _HELD_OUT_EVERY:
        raise DataError(f"data file {path} holds {len(texts)} text(s); at least {_HELD_OUT_EVERY} are needed, since "
                        f"every {_HELD_OUT_EVERY}th is held out for evaluation")
    return _split(texts, split)


def token_windows(texts: list[str], tokenizer, window: int, max_tokens: int, offset: int = 0) -> Iterator[list[int]]:
    """Consecutive windows of `window` tokens over the concatenated texts (BOS-free, EOS between texts), starting
    `offset` tokens in, stopping once `max_tokens` tokens have been yielded; a final partial window is dropped."""
    buffer: list[int] = []
    emitted = 0
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
        skipped = min(offset, len(buffer))
        buffer, offset = buffer[skipped:], offset - skipped
        while len(buffer) >= window:
            if emitted + window > max_tokens:
                return
            yield buffer[:window]
            emitted += window
            buffer = buffer[window:]
