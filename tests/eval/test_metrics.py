"""Each metric against small hand-computed examples (ties and empty cases included), cross-checked against the
implementations MTEB uses (scipy, scikit-learn, pytrec_eval) where those are installed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l2v.eval import metrics as M


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol


# ------------------------------------------------------------------------------------------- correlation
def test_rankdata_averages_ties():
    assert M.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; Pearson of ranks = 0.948683...
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    rx = np.array([1, 2.5, 2.5, 4]) - 2.5
    ry = np.array([1, 2, 3, 4]) - 2.5
    expected = float((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum()))
    assert close(expected, 0.9486832980505138)
    assert close(M.spearman(x, y), expected)


def test_spearman_perfect_and_inverse():
    assert close(M.spearman([1, 2, 3], [10, 20, 30]), 1.0)
    assert close(M.spearman([1, 2, 3], [3, 2, 1]), -1.0)


def test_pearson_hand_computed():
    # x - mean = [-1, 0, 1], y - mean = [-2, 1, 1]: r = 3 / sqrt(2 * 6)
    assert close(M.pearson([1, 2, 3], [0, 3, 3]), 3 / math.sqrt(12))


def test_correlation_undefined_cases_are_nan():
    assert math.isnan(M.spearman([], []))
    assert math.isnan(M.pearson([1.0], [2.0]))
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))  # constant input
    with pytest.raises(ValueError, match="same length"):
        M.pearson([1, 2], [1, 2, 3])


def test_constant_input_is_nan_even_when_its_mean_is_inexact():
    # mean([0.1] * 3) != 0.1 in floating point: centring left ~1e-17 residuals and a spurious r ~ 1e-16 where
    # scipy (and so MTEB) reports nan, e.g. cosine_pearson of a collapsed model whose cosines are all equal
    assert math.isnan(M.pearson([0.1, 0.1, 0.1], [3.0, 0.3, 3.0]))
    assert math.isnan(M.pearson([3.0, 0.3, 3.0], [0.1, 0.1, 0.1]))
    assert math.isnan(M.pearson([0.123456] * 10, list(range(10))))


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.normal(size=40)
    assert close(M.spearman(x, y), scipy_stats.spearmanr(x, y)[0], 1e-12)
    assert close(M.pearson(x, y), scipy_stats.pearsonr(x, y)[0], 1e-12)


# --------------------------------------------------------------------------------------------- retrieval
def test_ndcg_map_mrr_recall_hand_computed():
    qrels = {"q": {"a": 1, "c": 1}}
    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}}  # ranking a, b, c, d
    m = M.retrieval_metrics(qrels, run, k_values=(1, 2, 10))
    dcg = 1 / math.log2(2) + 1 / math.log2(4)  # hits at ranks 1 and 3
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert close(m["ndcg_at_10"], dcg / idcg)  # 0.9197...
    assert close(m["ndcg_at_10"], 0.9197207891481876)
    assert close(m["ndcg_at_1"], 1.0)
    assert close(m["ndcg_at_2"], 1 / idcg)
    assert close(m["map_at_10"], (1 / 1 + 2 / 3) / 2)
    assert close(m["map_at_2"], (1 / 1) / 2)  # divided by all relevant, not by min(k, R)
    assert close(m["mrr_at_10"], 1.0)
    assert close(m["recall_at_1"], 0.5) and close(m["recall_at_10"], 1.0)
    assert close(m["precision_at_2"], 0.5)


def test_graded_relevance_uses_linear_gain():
    qrels = {"q": {"a": 1, "b": 2}}
    run = {"q": {"a": 0.9, "b": 0.5}}
    m = M.retrieval_metrics(qrels, run, k_values=(10,))
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert close(m["ndcg_at_10"], dcg / idcg)


def test_ties_are_broken_by_doc_id_descending():
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5, "b": 0.5}}  # tie: "b" > "a" so b ranks first
    m = M.retrieval_metrics(qrels, run, k_values=(1, 10))
    assert m["mrr_at_10"] == 0.5
    assert m["ndcg_at_1"] == 0.0
    assert M.rank_documents({"a": 0.5, "b": 0.5, "c": 0.9}) == ["c", "b", "a"]


def test_mrr_beyond_k_is_zero_and_queries_are_averaged():
    qrels = {"q1": {"x": 1}, "q2": {"y": 1}}
    run = {"q1": {"x": 1.0, "z": 0.0}, "q2": {"z": 1.0, "w": 0.9, "y": 0.1}}
    m = M.retrieval_metrics(qrels, run, k_values=(2, 3))
    assert close(m["mrr_at_2"], (1.0 + 0.0) / 2)
    assert close(m["mrr_at_3"], (1.0 + 1 / 3) / 2)


def test_retrieval_empty_cases():
    assert all(math.isnan(v) for v in M.retrieval_metrics({}, {}, (10,)).values())
    m = M.retrieval_metrics({"q": {"a": 1}}, {}, (10,))  # query ranked nothing
    assert m["ndcg_at_10"] == 0.0 and m["mrr_at_10"] == 0.0
    m = M.retrieval_metrics({"q": {"a": 0}}, {"q": {"a": 1.0}}, (10,))  # no relevant document
    assert m["ndcg_at_10"] == 0.0 and m["map_at_10"] == 0.0 and m["recall_at_10"] == 0.0
    with pytest.raises(ValueError):
        M.retrieval_metrics({"q": {"a": 1}}, {}, (0,))


def test_retrieval_matches_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(1)
    qrels, run = {}, {}
    for q in range(8):
        docs = [f"d{i}" for i in range(30)]
        qrels[f"q{q}"] = {d: int(rng.integers(1, 3)) for d in rng.choice(docs, 3, replace=False)}
        run[f"q{q}"] = {d: float(np.round(rng.random(), 1)) for d in docs}  # rounding makes ties
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map_cut.10", "recall.10"})
    ref = ev.evaluate(run)
    ours = M.retrieval_metrics(qrels, run, (10,))
    for ours_key, ref_key in (("ndcg_at_10", "ndcg_cut_10"), ("map_at_10", "map_cut_10"),
                              ("recall_at_10", "recall_10")):
        expected = sum(v[ref_key] for v in ref.values()) / len(ref)
        assert close(ours[ours_key], expected, 1e-6), ours_key


def test_retrieval_matches_mteb():
    """Every metric under mteb's names, incl. MRR (mteb's own code), P@k past the run's end, grades 2-3, negative
    grades and queries whose judgements are all <= 0 (kept by mteb, they score 0)."""
    mteb_metrics = pytest.importorskip("mteb._evaluators.retrieval_metrics")
    rng = np.random.default_rng(2)
    qrels, run = {}, {}
    for q in range(40):
        docs = [f"d{i}" for i in rng.choice(20, int(rng.integers(1, 15)), replace=False)]
        judged = rng.choice(docs, int(rng.integers(1, len(docs) + 1)), replace=False)
        qrels[f"q{q}"] = {d: int(rng.choice([-1, 0, 0, 1, 2, 3])) for d in judged}
        run[f"q{q}"] = {d: float(np.round(rng.random(), 1)) for d in docs}
    ks = (1, 3, 5, 10, 20)
    r = mteb_metrics.calculate_retrieval_scores(run, qrels, ks)
    ref = mteb_metrics.make_score_dict(ndcg=r.ndcg, _map=r.map, recall=r.recall, precision=r.precision, mrr=r.mrr,
                                       naucs={}, naucs_mrr={}, hit_rate=r.hit_rate, task_scores={})
    for key, value in M.retrieval_metrics(qrels, run, ks).items():
        assert close(value, ref[key], 1e-5), key  # mteb rounds to 5 decimals


# ------------------------------------------------------------------------------------- average precision
def test_average_precision_hand_computed():
    # ranking by score: 1, 0, 1, 0 -> AP = (1/1 + 2/3) / 2
    assert close(M.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]), (1 + 2 / 3) / 2)


def test_average_precision_ties_form_one_threshold():
    # scores tie for the first two (one pos, one neg): P = 1/2 at R = 1/2; then the last positive: P = 2/3 at R=1
    assert close(M.average_precision([1, 0, 1], [0.5, 0.5, 0.1]), 0.5 * 0.5 + 0.5 * (2 / 3))
    # all tied: AP = prevalence
    assert close(M.average_precision([1, 0, 0, 1], [0.3, 0.3, 0.3, 0.3]), 0.5)


def test_average_precision_edge_cases():
    assert math.isnan(M.average_precision([0, 0], [0.1, 0.2]))
    assert math.isnan(M.average_precision([], []))
    assert M.average_precision([1, 1], [0.1, 0.2]) == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        M.average_precision([2, 0], [0.1, 0.2])


def test_average_precision_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)
    assert close(M.average_precision(y, s), sk.average_precision_score(y, s), 1e-12)


# ------------------------------------------------------------------------------------------- v-measure
def test_v_measure_hand_computed():
    assert M.v_measure([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0  # a relabelling is perfect
    # true [a,a,b,b], pred [x,x,x,y]: H(C)=ln2, H(C|K)=3/4*H(2/3,1/3); H(K)=H(3/4,1/4), H(K|C)=1/2*ln2
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    homogeneity = 1 - 0.75 * h(2 / 3, 1 / 3) / math.log(2)
    completeness = 1 - 0.5 * math.log(2) / h(0.75, 0.25)
    expected = 2 * homogeneity * completeness / (homogeneity + completeness)
    assert close(M.v_measure(["a", "a", "b", "b"], ["x", "x", "x", "y"]), expected)


def test_v_measure_edge_cases():
    assert M.v_measure([], []) == 1.0
    # one class split into three clusters: homogeneity 1, completeness 0 -> V = 0
    assert M.v_measure([0, 0, 0], [1, 2, 3]) == 0.0
    assert M.v_measure([0, 1, 2], [0, 0, 0]) == 0.0  # one cluster for three classes
    with pytest.raises(ValueError):
        M.v_measure([0, 1], [0])


def test_v_measure_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    t, p = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    assert close(M.v_measure(t, p), sk.v_measure_score(t, p), 1e-12)
    assert close(M.v_measure([0, 0, 0], [1, 2, 3]), sk.v_measure_score([0, 0, 0], [1, 2, 3]), 1e-12)


# ------------------------------------------------------------------------------------- classification
def test_accuracy_and_macro_f1_hand_computed():
    y, p = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert M.accuracy(y, p) == 0.5
    # F1(a) = 2/3, F1(b) = 2*1/(2+2+0) = 1/2, F1(c) = 0
    assert close(M.macro_f1(y, p), (2 / 3 + 1 / 2 + 0) / 3)


def test_classification_edge_cases():
    assert math.isnan(M.accuracy([], []))
    assert math.isnan(M.macro_f1([], []))
    assert M.macro_f1(["x"], ["x"]) == 1.0
    with pytest.raises(ValueError):
        M.accuracy([1], [1, 2])


def test_macro_f1_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
    assert close(M.macro_f1(y.tolist(), p.tolist()), sk.f1_score(y, p, average="macro"), 1e-12)


def test_cosine_helpers_handle_zero_vectors():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert M.cosine_pairs(a, b).tolist() == [1.0, 0.0]
    assert np.allclose(M.cosine_matrix(a, b), [[1.0, 0.0], [0.0, 0.0]])
