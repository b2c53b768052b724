"""The standard embedding-evaluation metrics, written to match MTEB's definitions (mteb 2.x).

* STS: Spearman / Pearson correlation of cosine similarity with gold scores (``mteb.abstasks.sts``: scipy's
  ``spearmanr``/``pearsonr``; ties get average ranks).
* Retrieval / reranking: trec_eval definitions as computed by ``pytrec_eval`` in
  ``mteb._evaluators.retrieval_metrics``: a document is relevant when its qrel is > 0; nDCG@k uses the graded qrel
  as linear gain and ``log2(rank + 1)`` discount, the ideal ranking built from the qrels; MAP@k divides the sum of
  precision at each relevant rank <= k by the number of relevant documents; Recall@k = relevant in top k / relevant;
  MRR@k = 1 / rank of the first relevant document within k. Tied scores are ordered by document id, descending
  (as pytrec_eval and MTEB's MRR do). Scores are averaged over the queries that have qrels; a query with no
  relevant document scores 0. MTEB's reranking main score is MAP@1000 over each query's candidates.
* Pair classification: average precision of the similarity (``sklearn.metrics.average_precision_score`` as used in
  ``mteb.abstasks.pair_classification``): sum over distinct thresholds of (R_n - R_{n-1}) * P_n; tied scores form
  one threshold.
* Clustering: V-measure (``sklearn.metrics.v_measure_score``, beta = 1) of mini-batch k-means clusters.
* Classification: accuracy and macro-F1 (``f1_score(average="macro")``, per-class F1 = 0 when undefined).

Undefined cases return ``nan`` (e.g. a correlation of fewer than two points or of a constant, AP without a
positive, where scikit-learn warns and returns 0) -- except V-measure of nothing, which is 1.0 as in scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

NAN = float("nan")


# ------------------------------------------------------------------------------------------- correlation
def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; nan for fewer than 2 points or a constant input."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson: x and y must have the same length, got {a.shape} and {b.shape}.")
    if len(a) < 2:
        return NAN
    # tested before centring, as scipy does: a - a.mean() of a constant can leave ~1e-17 residuals (the mean
    # of [0.1] * 3 is not 0.1) and a spurious r near 0 instead of nan
    if (a == a[0]).all() or (b == b[0]).all():
        return NAN
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denom == 0.0:
        return NAN
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation = Pearson correlation of average ranks."""
    if len(x) != len(y):
        raise ValueError(f"spearman: x and y must have the same length, got {len(x)} and {len(y)}.")
    return pearson(rankdata(x), rankdata(y))


# --------------------------------------------------------------------------------------------- ranking
def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score descending, ties by id descending (trec_eval's order)."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _query_metrics(qrel: Mapping[str, int], ranking: list[str], k_values: Sequence[int]) -> dict[str, float]:
    relevant = {d for d, r in qrel.items() if r > 0}
    n_rel = len(relevant)
    ideal = sorted((r for r in qrel.values() if r > 0), reverse=True)
    out: dict[str, float] = {}
    for k in k_values:
        top = ranking[:k]
        dcg = sum(qrel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if qrel.get(d, 0) > 0)
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
        out[f"ndcg_at_{k}"] = dcg / idcg if idcg > 0 else 0.0
        hits, precision_sum, first = 0, 0.0, 0.0
        for i, d in enumerate(top):
            if d in relevant:
                hits += 1
                precision_sum += hits / (i + 1)
                if first == 0.0:
                    first = 1.0 / (i + 1)
        out[f"map_at_{k}"] = precision_sum / n_rel if n_rel else 0.0
        out[f"recall_at_{k}"] = hits / n_rel if n_rel else 0.0
        out[f"precision_at_{k}"] = hits / k
        out[f"mrr_at_{k}"] = first
    return out


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000),
) -> dict[str, float]:
    """nDCG@k, MAP@k, Recall@k, Precision@k and MRR@k averaged over the queries in ``qrels``.

    ``qrels[qid][docid]`` = graded relevance (> 0 is relevant); ``run[qid][docid]`` = the model's score.
    A query absent from ``run`` ranks nothing and scores 0. With no queries every metric is nan.
    """
    if any(int(k) < 1 for k in k_values):
        raise ValueError(f"k_values must be positive integers, got {list(k_values)}.")
    names = [f"{m}_at_{k}" for k in k_values for m in ("ndcg", "map", "recall", "precision", "mrr")]
    if not qrels:
        return dict.fromkeys(names, NAN)
    totals = dict.fromkeys(names, 0.0)
    for qid, qrel in qrels.items():
        ranking = rank_documents(run.get(qid, {}))
        for name, value in _query_metrics(qrel, ranking, k_values).items():
            totals[name] += value
    return {name: totals[name] / len(qrels) for name in names}


# ----------------------------------------------------------------------------------- pair classification
def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Non-interpolated AP: sum over distinct score thresholds (high to low) of (R_n - R_{n-1}) * P_n.

    Tied scores are one threshold (scikit-learn's ``average_precision_score``). nan without positives.
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"average_precision: labels and scores must have the same length, got {y.shape} "
                         f"and {s.shape}.")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError("average_precision: labels must be 0 or 1.")
    n_pos = int(y.sum())
    if n_pos == 0:
        return NAN
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ap, tp, prev_recall = 0.0, 0, 0.0
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        tp += int(y[i:j + 1].sum())
        precision, recall = tp / (j + 1), tp / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        i = j + 1
    return float(ap)


# -------------------------------------------------------------------------------------------- clustering
def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def v_measure(labels_true: Sequence, labels_pred: Sequence) -> float:
    """Harmonic mean of homogeneity and completeness (beta = 1), as ``sklearn.metrics.v_measure_score``."""
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"v_measure: {len(labels_true)} true labels but {len(labels_pred)} predicted.")
    if len(labels_true) == 0:
        return 1.0
    classes, ci = np.unique(np.asarray(labels_true, dtype=object).astype(str), return_inverse=True)
    clusters, ki = np.unique(np.asarray(labels_pred, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((len(classes), len(clusters)), dtype=np.float64)
    np.add.at(table, (ci, ki), 1)
    n = table.sum()
    h_c, h_k = _entropy(table.sum(1)), _entropy(table.sum(0))
    nz = table > 0
    joint = table[nz] / n
    # conditional entropies H(C|K) and H(K|C) from the contingency table
    col = np.broadcast_to(table.sum(0, keepdims=True), table.shape)[nz]
    row = np.broadcast_to(table.sum(1, keepdims=True), table.shape)[nz]
    h_c_given_k = float(-(joint * np.log(table[nz] / col)).sum())
    h_k_given_c = float(-(joint * np.log(table[nz] / row)).sum())
    homogeneity = 1.0 if h_c == 0 else 1.0 - h_c_given_k / h_c
    completeness = 1.0 if h_k == 0 else 1.0 - h_k_given_c / h_k
    if homogeneity + completeness == 0:
        return 0.0
    return float(2 * homogeneity * completeness / (homogeneity + completeness))


# ---------------------------------------------------------------------------------------- classification
def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    if len(y_true) != len(y_pred):
        raise ValueError(f"accuracy: {len(y_true)} true labels but {len(y_pred)} predicted.")
    if len(y_true) == 0:
        return NAN
    return float(np.mean([a == b for a, b in zip(y_true, y_pred, strict=True)]))


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted mean of per-class F1 over every label seen in ``y_true`` or ``y_pred`` (undefined F1 = 0)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"macro_f1: {len(y_true)} true labels but {len(y_pred)} predicted.")
    if len(y_true) == 0:
        return NAN
    labels = sorted(set(map(str, y_true)) | set(map(str, y_pred)))
    t, p = [str(v) for v in y_true], [str(v) for v in y_pred]
    f1s = []
    for c in labels:
        tp = sum(a == c and b == c for a, b in zip(t, p, strict=True))
        fp = sum(a != c and b == c for a, b in zip(t, p, strict=True))
        fn = sum(a == c and b != c for a, b in zip(t, p, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between rows of ``a`` and rows of ``b`` (zero vectors give 0)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na == 0, 1, na)) @ (b / np.where(nb == 0, 1, nb)).T


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    return np.where(denom == 0, 0.0, (a * b).sum(1) / np.where(denom == 0, 1, denom))
