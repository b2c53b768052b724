"""Task types, the embedding cache and the suite runner, on a deterministic trigram model (fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l2v.data.offline import DataSourceMissing
from l2v.eval import (
    ClassificationTask,
    ClusteringTask,
    EmbeddingCache,
    PairClassificationTask,
    RerankingTask,
    RetrievalTask,
    STSTask,
    run_tasks,
)
from l2v.eval import suite as suite_mod

ANIMALS = ["the cat sat on the mat", "a kitten sleeps on the mat", "cats chase mice at night",
           "my cat purrs on the sofa", "the cat eats fish", "kittens play with yarn"]
MONEY = ["stock prices fell sharply", "the bank raised interest rates", "investors sold their shares",
         "bond markets rallied today", "the stock market crashed", "quarterly earnings beat forecasts"]


def test_sts_spearman_follows_similarity(trigram):
    task = STSTask(name="t", sentences1=["the cat sat", "the cat sat", "the cat sat"],
                   sentences2=["the cat sat", "the cat sits", "stock markets fell"], scores=[5.0, 4.0, 0.0])
    scores = task.evaluate(EmbeddingCache(trigram))
    assert scores["cosine_spearman"] == pytest.approx(1.0)
    reversed_task = STSTask(name="r", sentences1=task.sentences1, sentences2=task.sentences2, scores=[0, 4, 5])
    assert reversed_task.evaluate(EmbeddingCache(trigram))["cosine_spearman"] == pytest.approx(-1.0)


def test_sts_rejects_ragged_columns():
    with pytest.raises(ValueError, match="differ in length"):
        STSTask(name="bad", sentences1=["a"], sentences2=["b", "c"], scores=[1.0])


def test_retrieval_perfect_when_queries_match_documents(trigram):
    corpus = {f"d{i}": t for i, t in enumerate(ANIMALS + MONEY)}
    queries = {"q1": "the cat eats fish", "q2": "the stock market crashed"}
    qrels = {"q1": {"d4": 1}, "q2": {"d10": 1}}
    task = RetrievalTask(name="r", corpus=corpus, queries=queries, qrels=qrels, instruction="Find: ")
    scores = task.evaluate(EmbeddingCache(trigram))
    assert scores["ndcg_at_10"] == pytest.approx(1.0)
    assert scores["mrr_at_10"] == pytest.approx(1.0)
    assert task.main_score == "ndcg_at_10"
    # queries carry the instruction, documents none
    calls = {instr for instr, _ in trigram.calls}
    assert calls == {"Find: ", None}


def test_retrieval_top_k_truncation_keeps_best(trigram):
    corpus = {f"d{i}": t for i, t in enumerate(ANIMALS + MONEY)}
    task = RetrievalTask(name="r", corpus=corpus, queries={"q": "the cat eats fish"}, qrels={"q": {"d4": 1}},
                         top_k=3)
    assert task.evaluate(EmbeddingCache(trigram))["recall_at_3"] == 1.0


def test_retrieval_rejects_unknown_ids():
    with pytest.raises(ValueError, match="absent from the corpus"):
        RetrievalTask(name="r", corpus={"d": "x"}, queries={"q": "y"}, qrels={"q": {"nope": 1}})
    with pytest.raises(ValueError, match="unknown query"):
        RetrievalTask(name="r", corpus={"d": "x"}, queries={}, qrels={"q": {"d": 1}})


def test_reranking_map_and_mrr(trigram):
    samples = [{"query": "the cat eats fish", "positive": ["the cat eats fish"], "negative": MONEY[:3]},
               {"query": "bond markets rallied", "positive": ["bond markets rallied today"],
                "negative": ANIMALS[:3]}]
    scores = RerankingTask(name="rr", samples=samples).evaluate(EmbeddingCache(trigram))
    assert scores["map"] == pytest.approx(1.0) and scores["mrr_at_10"] == pytest.approx(1.0)
    # positives that are unrelated rank last: MAP = 1/4 for each query
    worse = [{"query": s["query"], "positive": [n for n in s["negative"][:1]], "negative": s["positive"]}
             for s in samples]
    assert RerankingTask(name="w", samples=worse).evaluate(EmbeddingCache(trigram))["map"] < 1.0
    with pytest.raises(ValueError, match="lists of texts"):
        RerankingTask(name="bad", samples=[{"query": "q", "positive": "p", "negative": []}])


def test_classification_kfold_and_split(trigram):
    texts = ANIMALS + MONEY
    labels = ["animal"] * 6 + ["money"] * 6
    task = ClassificationTask(name="c", texts=texts, labels=labels, n_folds=3, max_iter=500)
    scores = task.evaluate(EmbeddingCache(trigram))
    assert scores["accuracy"] >= 0.8 and 0 <= scores["f1"] <= 1
    split = ClassificationTask(name="s", texts=texts, labels=labels, test_texts=["the kitten purrs on the mat"],
                               test_labels=["animal"], max_iter=500)
    assert split.evaluate(EmbeddingCache(trigram))["accuracy"] == 1.0
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassificationTask(name="one", texts=["a", "b"], labels=["x", "x"]).evaluate(EmbeddingCache(trigram))


def test_clustering_separates_topics(trigram):
    task = ClusteringTask(name="k", texts=ANIMALS + MONEY, labels=[0] * 6 + [1] * 6, n_runs=3)
    scores = task.evaluate(EmbeddingCache(trigram))
    assert 0.0 <= scores["v_measure"] <= 1.0
    shuffled = ClusteringTask(name="k2", texts=ANIMALS + MONEY, labels=[0, 1] * 6, n_runs=3)
    assert scores["v_measure"] > shuffled.evaluate(EmbeddingCache(trigram))["v_measure"]


def test_pair_classification_ap(trigram):
    task = PairClassificationTask(name="p", sentences1=["the cat eats fish", "the cat eats fish"],
                                  sentences2=["the cat eats fish", "stock prices fell"], labels=[1, 0])
    scores = task.evaluate(EmbeddingCache(trigram))
    assert scores["cosine_ap"] == 1.0 and scores["max_ap"] == 1.0
    flipped = PairClassificationTask(name="f", sentences1=task.sentences1, sentences2=task.sentences2,
                                     labels=[0, 1])
    assert flipped.evaluate(EmbeddingCache(trigram))["cosine_ap"] == 0.5
    with pytest.raises(ValueError, match="0 or 1"):
        PairClassificationTask(name="bad", sentences1=["a"], sentences2=["b"], labels=[2])


def test_cache_embeds_each_text_once(trigram):
    cache = EmbeddingCache(trigram)
    a = cache(["x y", "z", "x y"])
    b = cache(["z", "x y"])
    assert np.array_equal(a[0], b[1]) and np.array_equal(a[1], b[0])
    assert cache.encoded == 2 and len(trigram.calls) == 1
    cache(["z"], instruction="Q: ")  # another instruction is another key
    assert cache.encoded == 3
    off = EmbeddingCache(trigram, enabled=False)
    off(["z"])
    off(["z"])
    assert off.encoded == 2
    assert cache([]).shape == (0, trigram.dim)


def test_cache_rejects_bad_model_output():
    class Broken:
        name, dim = "broken", 4

        def encode(self, texts, **_):
            return np.zeros((len(texts) + 1, 4))

    with pytest.raises(ValueError, match="returned shape"):
        EmbeddingCache(Broken())(["a"])


def test_cache_rejects_non_finite_embeddings():
    # NaN similarities do not fail loudly downstream: a NaN cosine got a rank in Spearman and sorted first in
    # retrieval, so a custom or sentence-transformers model overflowing in fp16 scored as if it worked (scipy
    # and scikit-learn, which MTEB uses, give nan or refuse the input)
    class Overflowing:
        name, dim = "overflowing", 2

        def encode(self, texts, **_):
            out = np.ones((len(texts), 2), dtype=np.float32)
            out[0, 0] = np.nan
            return out

    with pytest.raises(ValueError, match="non-finite"):
        EmbeddingCache(Overflowing())(["a", "b"])
    task = STSTask(name="sts", sentences1=["a", "b", "c"], sentences2=["d", "e", "f"], scores=[1, 2, 3])
    with pytest.raises(ValueError, match="'overflowing'.*non-finite"):
        run_tasks(Overflowing(), [task])


def test_run_tasks_structure_and_skips(trigram, monkeypatch):
    def missing():
        raise DataSourceMissing("needs the 'frobnicate' package")

    monkeypatch.setitem(suite_mod.SUITE, "fake-missing", missing)
    suite_mod.get_task.cache_clear()
    sts = STSTask(name="mini-sts", sentences1=["a cat", "a dog"], sentences2=["a cat", "stocks"], scores=[1, 0])
    try:
        out = run_tasks(trigram, [sts, "fake-missing"])
    finally:
        suite_mod.get_task.cache_clear()
    assert set(out["tasks"]) == {"mini-sts"}
    assert "frobnicate" in out["skipped"]["fake-missing"]
    r = out["tasks"]["mini-sts"]
    assert r["main_metric"] == "cosine_spearman" and r["main_score"] == 1.0
    assert r["texts_encoded"] == 3 and out["average"] == 1.0
    assert out["model"] == "trigram" and out["seconds"] >= 0


def test_select_tasks_names_types_and_errors():
    assert suite_mod.select_tasks(["Retrieval"]) == ["wordnet-synonyms"]
    assert suite_mod.select_tasks(["all"]) == list(suite_mod.SUITE)
    assert set(suite_mod.select_tasks(["clustering"])) == {"wordnet-lexnames", "newsgroups-topics"}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        suite_mod.select_tasks(["nope"])
    task = STSTask(name="mine", sentences1=["a"], sentences2=["b"], scores=[1.0])
    assert suite_mod.select_tasks([task, "simlex999", "STS"]) == [task, "simlex999"]


def test_suite_has_enough_real_tasks():
    types = {suite_mod._TYPES[n] for n in suite_mod.SUITE}
    assert len(suite_mod.SUITE) >= 5 and len(types) >= 4


def test_truncate_cuts_at_word_boundary():
    assert suite_mod.truncate("one  two three four", 12) == "one two"
    assert suite_mod.truncate("short", 100) == "short"


def test_nan_scores_become_null(trigram):
    task = STSTask(name="const", sentences1=["a", "b"], sentences2=["a", "b"], scores=[1.0, 1.0])
    out = run_tasks(trigram, [task])
    assert out["tasks"]["const"]["main_score"] is None and out["average"] is None
    assert math.isnan(task.evaluate(EmbeddingCache(trigram))["cosine_spearman"])


def test_reranking_random_map_matches_enumeration():
    one = RerankingTask(name="x", samples=[{"query": "q", "positive": ["a"], "negative": ["b", "c"]}])
    assert one.random_map() == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # two relevant of three: the irrelevant one is at rank 1, 2 or 3 with AP (1/2+2/3)/2, (1+2/3)/2, 1
    two = RerankingTask(name="y", samples=[{"query": "q", "positive": ["a", "b"], "negative": ["c"]}])
    assert two.random_map() == pytest.approx(((1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2 + 1) / 3)


def test_reranking_skips_samples_without_positives_or_negatives(trigram):
    """MTEB drops reranking samples lacking a positive or a negative: they would add AP 0 or 1 whatever the model."""
    good = {"query": "the cat eats fish", "positive": ["bond markets rallied today"],
            "negative": ["the cat eats fish", "kittens play with yarn"]}
    alone = RerankingTask(name="a", samples=[good]).evaluate(EmbeddingCache(trigram))
    padded = RerankingTask(name="p", samples=[
        good, {"query": "q", "positive": [], "negative": ["x", "y"]},
        {"query": "r", "positive": ["z"], "negative": []}])
    scores = padded.evaluate(EmbeddingCache(trigram))
    assert scores["map"] == pytest.approx(alone["map"]) and scores["mrr_at_10"] == pytest.approx(alone["mrr_at_10"])
    assert padded.random_map() == pytest.approx(RerankingTask(name="g", samples=[good]).random_map())
    assert padded.size() == {"queries": 3, "candidates": 6}
    assert math.isnan(RerankingTask(name="n", samples=[{"query": "q", "positive": ["z"], "negative": []}])
                      .evaluate(EmbeddingCache(trigram))["map"])


def test_retrieval_drops_queries_without_qrels(trigram):
    """As MTEB: a query with an empty qrels dict is not scored (it counted as 0); all-zero qrels still score 0."""
    corpus = {f"d{i}": t for i, t in enumerate(ANIMALS + MONEY)}
    queries = {"q": "the cat eats fish", "empty": "bond markets", "zero": "stock prices"}
    task = RetrievalTask(name="r", corpus=corpus, queries=queries, qrels={"q": {"d4": 1}, "empty": {}})
    assert task.size()["queries"] == 1 and task.evaluate(EmbeddingCache(trigram))["ndcg_at_10"] == pytest.approx(1.0)
    zero = RetrievalTask(name="z", corpus=corpus, queries=queries, qrels={"q": {"d4": 1}, "zero": {"d1": 0}})
    assert zero.evaluate(EmbeddingCache(trigram))["ndcg_at_10"] == pytest.approx(0.5)


def test_retrieval_k_values_must_include_the_main_score_cutoff():
    # the main score is nDCG@10: k_values without 10 failed at the end of the evaluation with a KeyError
    with pytest.raises(ValueError, match=r"k_values must .* including 10"):
        RetrievalTask(name="r", corpus={"d": "x"}, queries={"q": "y"}, qrels={"q": {"d": 1}}, k_values=(1, 5))
    with pytest.raises(ValueError, match="k_values"):
        RetrievalTask(name="r", corpus={"d": "x"}, queries={"q": "y"}, qrels={"q": {"d": 1}}, k_values=(0, 10))
    assert RetrievalTask(name="r", corpus={"d": "x"}, queries={"q": "y"}, qrels={"q": {"d": 1}},
                         k_values=(10, 20)).k_values == (10, 20)
