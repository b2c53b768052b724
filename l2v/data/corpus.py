"""Unlabelled text for MNTP and SimCSE: a plain-text file, a jsonl file, the built-in offline corpus, or a hub
dataset (wikitext-103, wiki1m_for_simcse) for users with network access.

``load_corpus(spec)`` is the one entry point; ``spec`` is a path, ``"builtin"`` or ``"hub:<name>"``.
Errors name the input and what would be right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .offline import DataSourceMissing, gensim_file

BUILTIN = "builtin"
HUB_DATASETS = {
    # name: (dataset id, config, split, text field)
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text"),
    "wiki1m_for_simcse": ("princeton-nlp/datasets-for-simcse", None, "train", "text"),
}
_WIKI1M_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/wiki1m_for_simcse.txt"


class CorpusError(ValueError):
    """The corpus cannot be used for training; the message names the input and the fix."""


def read_text_file(path: str | Path, field: str = "text", min_chars: int = 1) -> list[str]:
    """Lines of a UTF-8 text file (one sentence or paragraph per line, blank lines skipped), or the ``field`` of
    each object in a ``.jsonl`` file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such corpus file (give a .txt file with one text per line, a .jsonl "
                                f"file with a {field!r} field, or 'builtin').")
    if p.is_dir():
        raise CorpusError(f"{path}: is a directory; give a .txt or .jsonl file.")
    raw = p.read_bytes()
    out: list[str] = []
    is_jsonl = p.name.endswith((".jsonl", ".jsonl.txt", ".ndjson"))
    for n, line_bytes in enumerate(raw.splitlines(), 1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}:{n}: line is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                              "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from exc
        if n == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        if is_jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n}: invalid JSON ({exc.msg}).") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise CorpusError(f"{path}:{n}: expected a JSON object with a string field {field!r} "
                                  "(choose the field with --text-field).")
            line = rec[field]
        line = line.strip()
        if len(line) >= min_chars:
            out.append(line)
    return out


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _lee_sentences() -> list[str]:
    """Sentences of the Lee news corpus shipped in gensim's test data (fallback built-in corpus)."""
    path = gensim_file("lee_background.cor")
    out = []
    for para in path.read_text(encoding="utf-8", errors="replace").splitlines():
        for s in _SENT_SPLIT.split(para.strip()):
            s = s.strip()
            if len(s.split()) >= 5:
                out.append(s)
    return out


def builtin_corpus(limit: int | None = None) -> list[str]:
    """Real English sentences that ship with installed packages (no network).

    Uses ``l2v.data.sources.wiki_sentences`` (the Wikipedia excerpt in gensim's test data) when available, and
    otherwise the Lee news corpus from the same wheel. Raises :class:`DataSourceMissing` naming the package.
    """
    texts: list[str] = []
    try:
        from .sources import wiki_sentences  # built by the data module, when present
    except ImportError:
        wiki_sentences = None
    if wiki_sentences is not None:
        try:
            texts = list(wiki_sentences())
        except DataSourceMissing:
            raise
        except Exception:  # noqa: BLE001 - a broken optional source falls back to the Lee corpus
            texts = []
    if not texts:
        texts = _lee_sentences()
    return texts[:limit] if limit is not None else texts


def hub_corpus(name: str, limit: int | None = None) -> list[str]:
    """A hub dataset by its short name (needs network on first use, then the HF cache)."""
    if name not in HUB_DATASETS:
        raise CorpusError(f"hub:{name}: unknown dataset; choose one of {', '.join(sorted(HUB_DATASETS))}.")
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("hub corpora need the 'datasets' package: pip install datasets") from exc
    repo, config, split, field = HUB_DATASETS[name]
    try:
        if name == "wiki1m_for_simcse":
            ds = datasets.load_dataset("text", data_files={"train": _WIKI1M_URL}, split=split)
        else:
            ds = datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # noqa: BLE001 - network / hub errors become one clear message
        raise CorpusError(f"hub:{name}: could not load {repo} ({type(exc).__name__}: {exc}). It needs network "
                          "access on first use; offline, use 'builtin' or a local file.") from exc
    out = []
    for rec in ds:
        text = rec[field].strip()
        # wikitext has headings (" = Title = ") and empty lines; keep real paragraphs
        if not text or (text.startswith("=") and text.endswith("=")):
            continue
        out.append(text)
        if limit is not None and len(out) >= limit:
            break
    return out


def load_corpus(spec: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from ``spec``: a file path, ``"builtin"``, or ``"hub:wikitext-103"`` / ``"hub:wiki1m_for_simcse"``.

    Raises :class:`CorpusError` for an empty corpus.
    """
    spec = str(spec)
    if spec == BUILTIN:
        texts, name = builtin_corpus(), "the built-in corpus"
    elif spec.startswith("hub:"):
        texts, name = hub_corpus(spec[4:], limit), spec
    else:
        texts, name = read_text_file(spec, field=field), spec
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise CorpusError(f"{name}: corpus is empty (no non-blank lines); training needs text, one per line.")
    return texts
