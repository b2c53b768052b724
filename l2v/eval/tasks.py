"""Task types: a task is data + a metric; the model only has to embed texts (MTEB's design).

Every task's ``evaluate(embed)`` takes ``embed(texts, instruction=None) -> (n, dim) float array`` (usually an
:class:`~l2v.eval.cache.EmbeddingCache`) and returns ``{metric: value}``; ``main_score`` names the headline metric.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from . import metrics as M

Embed = Callable[..., np.ndarray]

TASK_TYPES = ("STS", "Retrieval", "Reranking", "Classification", "Clustering", "PairClassification")


@dataclass
class Task:
    """Common fields. ``instruction`` is prepended (not pooled) to queries / inputs of instruction-aware models."""

    name: str
    description: str = ""
    source: str = ""
    license: str = ""
    instruction: str | None = None

    type: ClassVar[str] = ""
    main_score: ClassVar[str] = ""

    def evaluate(self, embed: Embed) -> dict[str, float]:
        raise NotImplementedError

    def size(self) -> dict[str, int]:
        raise NotImplementedError

    def inputs(self) -> list[tuple[str | None, str]]:
        """Every (instruction, text) the task embeds: lets a runner embed them in one pass."""
        raise NotImplementedError

    def info(self) -> dict:
        return {"name": self.name, "type": self.type, "main_score": self.main_score,
                "description": self.description, "source": self.source, "license": self.license,
                "size": self.size()}


def _check_lengths(task: str, **columns: Sequence) -> None:
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"task {task!r}: columns differ in length: {lengths}.")


@dataclass
class STSTask(Task):
    """Pairs of texts with a gold similarity: Spearman (main) and Pearson of their cosine similarity, and of
    negative Manhattan and Euclidean distances (MTEB reports all six under these names)."""

    sentences1: list[str] = field(default_factory=list)
    sentences2: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    type: ClassVar[str] = "STS"
    main_score: ClassVar[str] = "cosine_spearman"

    def __post_init__(self) -> None:
        _check_lengths(self.name, sentences1=self.sentences1, sentences2=self.sentences2, scores=self.scores)

    def size(self) -> dict[str, int]:
        return {"pairs": len(self.scores)}

    def inputs(self) -> list[tuple[str | None, str]]:
        return [(self.instruction, t) for t in [*self.sentences1, *self.sentences2]]

    def evaluate(self, embed: Embed) -> dict[str, float]:
        a = embed(self.sentences1, instruction=self.instruction)
        b = embed(self.sentences2, instruction=self.instruction)
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        out = {}
        for fn, sims in (("cosine", M.cosine_pairs(a, b)), ("manhattan", -np.abs(a - b).sum(1)),
                         ("euclidean", -np.linalg.norm(a - b, axis=1))):
            out[f"{fn}_spearman"], out[f"{fn}_pearson"] = M.spearman(sims, self.scores), M.pearson(sims, self.scores)
        return out


@dataclass
class RetrievalTask(Task):
    """Queries (with ``instruction``) against a corpus; qrels give graded relevance (> 0 = relevant).

    ``corpus``: ``{doc_id: text}``; ``queries``: ``{query_id: text}``; ``qrels``: ``{query_id: {doc_id: rel}}``.
    Documents are embedded without instruction (LLM2Vec/E5 convention: instructions on queries only).
    Main score nDCG@10; also MRR@10, Recall@100, MAP@k, ...
    """

    corpus: dict[str, str] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    k_values: tuple[int, ...] = (1, 3, 5, 10, 100)
    top_k: int = 1000

    type: ClassVar[str] = "Retrieval"
    main_score: ClassVar[str] = "ndcg_at_10"

    def __post_init__(self) -> None:
        if 10 not in self.k_values or any(not isinstance(k, int) or k < 1 for k in self.k_values):
            raise ValueError(f"task {self.name!r}: k_values must be positive integers including 10 (the main "
                             f"score is nDCG@10), got {self.k_values!r}.")
        # MTEB drops a query with no qrels at all (one whose qrels are all 0 stays and scores 0)
        self.qrels = {q: rels for q, rels in self.qrels.items() if rels}
        missing_q = [q for q in self.qrels if q not in self.queries]
        if missing_q:
            raise ValueError(f"task {self.name!r}: qrels name {len(missing_q)} unknown query ids, e.g. "
                             f"{missing_q[0]!r}.")
        missing_d = {d for rels in self.qrels.values() for d in rels if d not in self.corpus}
        if missing_d:
            raise ValueError(f"task {self.name!r}: qrels name {len(missing_d)} document ids absent from the "
                             f"corpus, e.g. {sorted(missing_d)[0]!r}.")

    def size(self) -> dict[str, int]:
        return {"queries": len(self.qrels), "corpus": len(self.corpus)}

    def inputs(self) -> list[tuple[str | None, str]]:
        return ([(self.instruction, self.queries[q]) for q in self.qrels]
                + [(None, t) for t in self.corpus.values()])

    def evaluate(self, embed: Embed) -> dict[str, float]:
        qids = list(self.qrels)
        dids = list(self.corpus)
        if not qids or not dids:
            return M.retrieval_metrics(self.qrels if dids else {}, {}, self.k_values)
        q = embed([self.queries[x] for x in qids], instruction=self.instruction)
        d = embed([self.corpus[x] for x in dids], instruction=None)
        run: dict[str, dict[str, float]] = {}
        k = min(self.top_k, len(dids))
        for start in range(0, len(qids), 256):
            sims = M.cosine_matrix(q[start:start + 256], d)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(dids) else \
                np.tile(np.arange(len(dids)), (len(sims), 1))
            for row, qid in enumerate(qids[start:start + 256]):
                run[qid] = {dids[j]: float(sims[row, j]) for j in top[row]}
        return M.retrieval_metrics(self.qrels, run, self.k_values)


@dataclass
class RerankingTask(Task):
    """Each query ranks its own candidates: MAP (main; MTEB's map_at_1000) and MRR@10.

    Tied candidates rank negatives first, as the ``apositive_*`` / ``negative_*`` ids MTEB gives them do.

    ``samples``: ``[{"query": str, "positive": [str, ...], "negative": [str, ...]}, ...]`` (MTEB's format).
    As in MTEB, a sample without a positive or without a negative is not scored (its AP would be 0 or 1 whatever
    the model does); ``size()`` still counts it.
    """

    samples: list[dict] = field(default_factory=list)

    type: ClassVar[str] = "Reranking"
    main_score: ClassVar[str] = "map"

    def __post_init__(self) -> None:
        for i, s in enumerate(self.samples):
            for key in ("query", "positive", "negative"):
                if key not in s:
                    raise ValueError(f"task {self.name!r}: sample {i} has no {key!r} field.")
            if isinstance(s["positive"], str) or isinstance(s["negative"], str):
                raise ValueError(f"task {self.name!r}: sample {i}: 'positive'/'negative' must be lists of texts.")

    def size(self) -> dict[str, int]:
        return {"queries": len(self.samples),
                "candidates": sum(len(s["positive"]) + len(s["negative"]) for s in self.samples)}

    def scored_samples(self) -> list[dict]:
        """The samples that are scored: those with at least one positive and one negative (MTEB drops the rest)."""
        return [s for s in self.samples if s["positive"] and s["negative"]]

    def inputs(self) -> list[tuple[str | None, str]]:
        samples = self.scored_samples()
        out = [(self.instruction, s["query"]) for s in samples]
        for s in samples:
            out += [(None, t) for t in [*s["positive"], *s["negative"]]]
        return out

    def evaluate(self, embed: Embed) -> dict[str, float]:
        samples = self.scored_samples()
        if not samples:
            return {"map": M.NAN, "mrr_at_10": M.NAN}
        q = embed([s["query"] for s in samples], instruction=self.instruction)
        docs = [t for s in samples for t in [*s["positive"], *s["negative"]]]
        d = embed(docs, instruction=None)
        qrels, run, offset = {}, {}, 0
        for i, s in enumerate(samples):
            cands = [*s["positive"], *s["negative"]]
            sims = M.cosine_matrix(q[i:i + 1], d[offset:offset + len(cands)])[0]
            offset += len(cands)
            ids = [f"{j:06d}" for j in range(len(cands))]
            qrels[str(i)] = {ids[j]: 1 for j in range(len(s["positive"]))}
            run[str(i)] = {ids[j]: float(sims[j]) for j in range(len(cands))}
        scores = M.retrieval_metrics(qrels, run, (1, 10, 1000))
        return {"map": scores["map_at_1000"], "mrr_at_10": scores["mrr_at_10"],
                "ndcg_at_10": scores["ndcg_at_10"], "precision_at_1": scores["precision_at_1"],
                "random_map": self.random_map()}

    def random_map(self) -> float:
        """Expected MAP of a uniformly random ranking (the chance level to compare with)."""
        vals = []
        for s in self.scored_samples():
            n, r = len(s["positive"]) + len(s["negative"]), len(s["positive"])
            # E[AP] = sum over ranks k of P(relevant at k) * E[precision at k | relevant at k] / r
            total = 0.0
            for k in range(1, n + 1):
                # given a relevant doc at rank k, the other k-1 slots hold Hypergeom(n-1, r-1, k-1) relevant
                exp_prec = (1 + (k - 1) * (r - 1) / (n - 1)) / k if n > 1 else 1.0
                total += (r / n) * exp_prec
            vals.append(total / r)
        return float(sum(vals) / len(vals)) if vals else M.NAN


@dataclass
class ClassificationTask(Task):
    """Logistic regression on frozen embeddings: accuracy (main) and macro-F1.

    With ``test_texts`` given: train on the train split, score on test. Otherwise stratified ``n_folds``-fold
    cross-validation (shuffled, fixed seed), metrics averaged over folds. The classifier is MTEB's,
    ``LogisticRegression(max_iter=100)`` on the raw embeddings, but it is trained on *every* training example:
    MTEB averages ``n_experiments`` (10) classifiers, each trained on ``samples_per_label`` random examples per
    class (8 by default, 16 or 32 on many tasks; plain KFold with that undersampling for its cross-validated
    tasks). Fewer training examples usually mean lower accuracy, so these scores are not MTEB leaderboard numbers
    even on the same data; run MTEB's tasks through :mod:`l2v.eval.mteb_adapter` for those.
    """

    texts: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)
    test_texts: list[str] | None = None
    test_labels: list | None = None
    n_folds: int = 5
    seed: int = 42
    max_iter: int = 100

    type: ClassVar[str] = "Classification"
    main_score: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        _check_lengths(self.name, texts=self.texts, labels=self.labels)
        if (self.test_texts is None) != (self.test_labels is None):
            raise ValueError(f"task {self.name!r}: give both test_texts and test_labels, or neither.")
        if self.test_texts is not None:
            _check_lengths(self.name, test_texts=self.test_texts, test_labels=self.test_labels)

    def size(self) -> dict[str, int]:
        out = {"texts": len(self.texts), "classes": len(set(map(str, self.labels)))}
        if self.test_texts is not None:
            out["test_texts"] = len(self.test_texts)
        return out

    def inputs(self) -> list[tuple[str | None, str]]:
        return [(self.instruction, t) for t in [*self.texts, *(self.test_texts or [])]]

    def _fit_score(self, xtr, ytr, xte, yte) -> tuple[float, float]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=self.max_iter, random_state=self.seed)
            clf.fit(xtr, ytr)
            pred = clf.predict(xte)
        return M.accuracy(list(yte), list(pred)), M.macro_f1(list(yte), list(pred))

    def evaluate(self, embed: Embed) -> dict[str, float]:
        y = np.asarray([str(v) for v in self.labels])
        if len(set(y.tolist())) < 2:
            raise ValueError(f"task {self.name!r}: classification needs at least 2 classes, got "
                             f"{sorted(set(y.tolist()))}.")
        x = embed(self.texts, instruction=self.instruction)
        if self.test_texts is not None:
            xte = embed(self.test_texts, instruction=self.instruction)
            acc, f1 = self._fit_score(x, y, xte, np.asarray([str(v) for v in self.test_labels]))
            return {"accuracy": acc, "f1": f1}
        from sklearn.model_selection import StratifiedKFold

        min_class = min(np.unique(y, return_counts=True)[1])
        folds = min(self.n_folds, int(min_class))
        if folds < 2:
            raise ValueError(f"task {self.name!r}: a class has only {min_class} example(s); k-fold needs >= 2.")
        accs, f1s = [], []
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(x, y):
            acc, f1 = self._fit_score(x[tr], y[tr], x[te], y[te])
            accs.append(acc)
            f1s.append(f1)
        return {"accuracy": float(np.mean(accs)), "f1": float(np.mean(f1s)),
                "accuracy_stderr": float(np.std(accs) / np.sqrt(len(accs)))}


@dataclass
class ClusteringTask(Task):
    """Mini-batch k-means (k = number of gold labels) on all the embeddings: V-measure (main), mean and std over
    ``n_runs`` k-means seeds.

    The clusterer is MTEB's, ``MiniBatchKMeans(batch_size=512, n_init=1)``, the sampling is not: MTEB's clustering
    tasks score 10 bootstrap resamples (with replacement, up to 16,384 texts each) with one k-means seed, its
    legacy ones each set once (``batch_size=500``), so the two averages differ by more than rounding.
    """

    texts: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)
    n_runs: int = 5
    batch_size: int = 512

    type: ClassVar[str] = "Clustering"
    main_score: ClassVar[str] = "v_measure"

    def __post_init__(self) -> None:
        _check_lengths(self.name, texts=self.texts, labels=self.labels)

    def size(self) -> dict[str, int]:
        return {"texts": len(self.texts), "clusters": len(set(map(str, self.labels)))}

    def inputs(self) -> list[tuple[str | None, str]]:
        return [(self.instruction, t) for t in self.texts]

    def evaluate(self, embed: Embed) -> dict[str, float]:
        from sklearn.cluster import MiniBatchKMeans

        labels = [str(v) for v in self.labels]
        k = len(set(labels))
        if k < 2 or len(labels) <= k:
            raise ValueError(f"task {self.name!r}: clustering needs >= 2 labels and more texts than labels.")
        x = embed(self.texts, instruction=self.instruction).astype(np.float64)
        scores = []
        for seed in range(self.n_runs):
            km = MiniBatchKMeans(n_clusters=k, batch_size=self.batch_size, n_init=1, random_state=seed)
            scores.append(M.v_measure(labels, km.fit_predict(x).tolist()))
        return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}


@dataclass
class PairClassificationTask(Task):
    """Pairs labelled 1 (same meaning / match) or 0: average precision of cosine similarity (main), plus AP of
    dot product, negative Euclidean and Manhattan distances and their max.

    MTEB's main score for most pair-classification tasks is that max, ``max_ap``: compare it, not ``cosine_ap``,
    with a leaderboard. (MTEB's best-threshold accuracy / F1 are not computed.)
    """

    sentences1: list[str] = field(default_factory=list)
    sentences2: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    type: ClassVar[str] = "PairClassification"
    main_score: ClassVar[str] = "cosine_ap"

    def __post_init__(self) -> None:
        _check_lengths(self.name, sentences1=self.sentences1, sentences2=self.sentences2, labels=self.labels)
        bad = [v for v in self.labels if v not in (0, 1, True, False)]
        if bad:
            raise ValueError(f"task {self.name!r}: pair labels must be 0 or 1, got {bad[0]!r}.")

    def size(self) -> dict[str, int]:
        return {"pairs": len(self.labels), "positives": int(sum(self.labels))}

    def inputs(self) -> list[tuple[str | None, str]]:
        return [(self.instruction, t) for t in [*self.sentences1, *self.sentences2]]

    def evaluate(self, embed: Embed) -> dict[str, float]:
        a = embed(self.sentences1, instruction=self.instruction).astype(np.float64)
        b = embed(self.sentences2, instruction=self.instruction).astype(np.float64)
        y = np.asarray(self.labels, dtype=np.int64)
        out = {
            "cosine_ap": M.average_precision(y, M.cosine_pairs(a, b)) if len(y) else M.NAN,
            "dot_ap": M.average_precision(y, (a * b).sum(1)) if len(y) else M.NAN,
            "euclidean_ap": M.average_precision(y, -np.linalg.norm(a - b, axis=1)) if len(y) else M.NAN,
            "manhattan_ap": M.average_precision(y, -np.abs(a - b).sum(1)) if len(y) else M.NAN,
        }
        finite = [v for v in out.values() if v == v]
        out["max_ap"] = max(finite) if finite else M.NAN
        return out
