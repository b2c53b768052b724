"""Read tasks from local files in the layouts users already have (downloaded MTEB / BEIR data).

``load_task(path, type=None, name=None)`` understands:

* **BEIR retrieval folder**: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
  ``text``) and ``qrels/<split>.tsv`` (or ``qrels.tsv``): ``query-id<TAB>corpus-id<TAB>score`` with a header.
  Corpus texts are ``title + " " + text`` as in MTEB.
* **pairs** (``.jsonl`` or ``.tsv`` with a header): ``sentence1``, ``sentence2`` and ``score`` -> STS, or
  ``label`` (0/1) -> pair classification.
* **labelled texts** (``.jsonl``/``.tsv``): ``text`` + ``label`` -> classification (k-fold), or clustering with
  ``type="clustering"``; a folder with ``train.*`` and ``test.*`` -> classification on that split.
* **reranking** (``.jsonl``): ``query``, ``positive`` (list), ``negative`` (list).

An optional ``task.json`` next to the data sets ``type``, ``name``, ``instruction``, ``split`` and
``description``. Errors name the file, line and field at fault.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..io import split_lines
from .tasks import (
    ClassificationTask,
    ClusteringTask,
    PairClassificationTask,
    RerankingTask,
    RetrievalTask,
    STSTask,
    Task,
)

_TYPE_ALIASES = {
    "sts": "STS", "retrieval": "Retrieval", "reranking": "Reranking", "classification": "Classification",
    "clustering": "Clustering", "pairclassification": "PairClassification", "pair_classification":
    "PairClassification", "pair-classification": "PairClassification", "pairs": "PairClassification",
}


def normalize_type(kind: str | None) -> str | None:
    if kind is None:
        return None
    key = str(kind).strip().lower()
    if key not in _TYPE_ALIASES:
        raise ValueError(f"unknown task type {kind!r}; use one of: sts, retrieval, reranking, classification, "
                         "clustering, pairclassification.")
    return _TYPE_ALIASES[key]


def read_records(path: Path) -> list[dict]:
    """Rows of a ``.jsonl`` (one JSON object per line) or ``.tsv``/``.csv`` file with a header line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(split_lines(text), 1):
            if not line.strip():
                continue
            # a JSON array (a common .json export) fails on its first line: say which format is read instead
            hint = " The file is read as JSON Lines: one JSON object per line, not a JSON array." \
                if line.lstrip().startswith("[") else ""
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}).{hint}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.{hint}")
            row["__line__"] = lineno
            rows.append(row)
        return rows
    if suffix in (".tsv", ".csv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        # Lines keep their "\n" so a quoted CSV field may span lines (RFC 4180) and keep its line breaks.
        reader = csv.reader([line + "\n" for line in split_lines(text)], delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header: list[str] | None = None
        next_line = 1
        for fields in reader:  # a record starts on the line after the previous one ended (reader.line_num)
            lineno, next_line = next_line, reader.line_num + 1
            if not fields or not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(fields)} fields, but the header has {len(header)} "
                                 f"({', '.join(header)}).")
            row = dict(zip(header, fields, strict=True))
            row["__line__"] = lineno
            rows.append(row)
        return rows
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .tsv or .csv.")


def _field(row: dict, name: str, path: Path, kind: type = str) -> Any:
    if name not in row:
        raise ValueError(f"{path}:{row.get('__line__', '?')}: missing field {name!r} "
                         f"(has: {', '.join(k for k in row if k != '__line__')}).")
    value = row[name]
    try:
        if kind in (float, int):  # a score or label that is nan / inf / 0.7 would be misread, not rejected
            number = float(value)
            if not math.isfinite(number) or (kind is int and not number.is_integer()):
                raise ValueError
            return int(number) if kind is int else number
        if kind is str:
            if not isinstance(value, str | int | float):
                raise TypeError
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}:{row.get('__line__', '?')}: field {name!r} must be {kind.__name__}, got "
                         f"{value!r}.") from exc
    return value


def _meta(folder: Path) -> dict:
    meta_path = folder / "task.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}:{exc.lineno}: invalid JSON ({exc.msg}).") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object.")
    return meta


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".jsonl", ".tsv", ".csv"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def load_beir(folder: Path, split: str = "test", name: str | None = None, instruction: str | None = None,
              description: str = "") -> RetrievalTask:
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        qrels_path = folder / "qrels.tsv"
    for p in (corpus_path, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; a BEIR folder needs corpus.jsonl, queries.jsonl and "
                                    f"qrels/{split}.tsv.")
    corpus: dict[str, str] = {}
    corpus_rows = read_records(corpus_path)
    for row in corpus_rows:
        doc_id = _field(row, "_id", corpus_path)
        title = str(row.get("title") or "")
        text = _field(row, "text", corpus_path)
        corpus[doc_id] = f"{title} {text}".strip()  # MTEB's (title + " " + text).strip(); text.strip() untitled
    query_rows = read_records(queries_path)
    queries = {_field(r, "_id", queries_path): _field(r, "text", queries_path) for r in query_rows}
    for path, rows, kept in ((corpus_path, corpus_rows, corpus), (queries_path, query_rows, queries)):
        if len(rows) != len(kept):  # as in BEIR/MTEB the last record of an id wins; say so rather than silently
            warnings.warn(f"{path}: {len(rows) - len(kept)} records repeat an earlier _id; the last one of each "
                          "id is used.", stacklevel=2)
    qrels: dict[str, dict[str, int]] = {}
    qrel_rows = read_records(qrels_path)
    if not qrel_rows:  # else a task of 0 queries: every metric nan, a null score rather than an error
        raise ValueError(f"{qrels_path}: no relevance judgements; expected a header line (query-id, corpus-id, "
                         "score, tab-separated), then one line per judged query-document pair.")
    for row in qrel_rows:
        qid = _field(row, "query-id", qrels_path)
        did = _field(row, "corpus-id", qrels_path)
        qrels.setdefault(qid, {})[did] = _field(row, "score", qrels_path, int)
    try:
        return RetrievalTask(name=name or folder.name, corpus=corpus, queries=queries, qrels=qrels,
                             instruction=instruction, description=description, source=str(folder))
    except ValueError as exc:
        raise ValueError(f"{qrels_path}: {exc}") from exc


def _labelled(path: Path) -> tuple[list[str], list[str]]:
    rows = read_records(path)
    return [_field(r, "text", path) for r in rows], [_field(r, "label", path) for r in rows]


def load_task(path: str | Path, type: str | None = None, name: str | None = None,
              instruction: str | None = None) -> Task:
    """A :class:`Task` from a local folder or file (see the module docstring for the layouts)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such task file or folder.")
    folder = p if p.is_dir() else p.parent
    meta = _meta(folder) if p.is_dir() else {}
    kind = normalize_type(type or meta.get("type"))
    name = name or meta.get("name") or (p.name if p.is_dir() else p.stem)
    instruction = instruction if instruction is not None else meta.get("instruction")
    description = str(meta.get("description", ""))
    common = {"name": name, "instruction": instruction, "description": description, "source": str(p)}

    if p.is_dir():
        if (p / "corpus.jsonl").is_file():
            if kind not in (None, "Retrieval"):
                raise ValueError(f"{p}: a BEIR folder is a retrieval task, not {kind}.")
            return load_beir(p, split=str(meta.get("split", "test")), name=name, instruction=instruction,
                             description=description)
        train, test = _find(p, "train"), _find(p, "test")
        if train and test and kind in (None, "Classification"):
            xtr, ytr = _labelled(train)
            xte, yte = _labelled(test)
            return ClassificationTask(texts=xtr, labels=ytr, test_texts=xte, test_labels=yte, **common)
        data = _find(p, "data") or _find(p, "test") or _find(p, "pairs")
        if data is None:
            raise ValueError(f"{p}: no task data found: expected corpus.jsonl + queries.jsonl + qrels/ (BEIR), "
                             "train.* + test.* (classification), or data.jsonl / test.jsonl / pairs.tsv.")
        p = data
    rows = read_records(p)
    if not rows:
        raise ValueError(f"{p}: no rows.")
    keys = set(rows[0])
    if kind is None:
        if {"sentence1", "sentence2", "score"} <= keys:
            kind = "STS"
        elif {"sentence1", "sentence2", "label"} <= keys:
            kind = "PairClassification"
        elif {"query", "positive", "negative"} <= keys:
            kind = "Reranking"
        elif {"text", "label"} <= keys:
            kind = "Classification"
        else:
            raise ValueError(f"{p}: cannot tell the task type from the fields {sorted(keys - {'__line__'})}; "
                             "expected sentence1/sentence2/score (STS), sentence1/sentence2/label (pairs), "
                             "query/positive/negative (reranking) or text/label (classification, clustering).")
    if kind == "STS":
        return STSTask(sentences1=[_field(r, "sentence1", p) for r in rows],
                       sentences2=[_field(r, "sentence2", p) for r in rows],
                       scores=[_field(r, "score", p, float) for r in rows], **common)
    if kind == "PairClassification":
        labels = [_field(r, "label", p, int) for r in rows]
        for r, v in zip(rows, labels, strict=True):
            if v not in (0, 1):
                raise ValueError(f"{p}:{r['__line__']}: field 'label' must be 0 or 1, got {r['label']!r}.")
        return PairClassificationTask(sentences1=[_field(r, "sentence1", p) for r in rows],
                                      sentences2=[_field(r, "sentence2", p) for r in rows], labels=labels, **common)
    if kind == "Reranking":
        samples = []
        for r in rows:
            pos, neg = _field(r, "positive", p, list), _field(r, "negative", p, list)
            if not isinstance(pos, list) or not isinstance(neg, list):
                raise ValueError(f"{p}:{r['__line__']}: 'positive' and 'negative' must be JSON lists of texts.")
            samples.append({"query": _field(r, "query", p), "positive": [str(x) for x in pos],
                            "negative": [str(x) for x in neg]})
        return RerankingTask(samples=samples, **common)
    texts, labels = [_field(r, "text", p) for r in rows], [_field(r, "label", p) for r in rows]
    if kind == "Clustering":
        return ClusteringTask(texts=texts, labels=labels, **common)
    if kind == "Classification":
        return ClassificationTask(texts=texts, labels=labels, **common)
    raise ValueError(f"{p}: a {kind} task needs a BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
