"""The mteb adapter satisfies mteb 2.x's encoder protocol: mteb evaluates a tiny l2v Encoder on tasks defined
here (no hub access), and its scores agree with l2v's own task implementation on the same embeddings."""

from __future__ import annotations

import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from mteb.abstasks.pair_classification import AbsTaskPairClassification  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from l2v.eval import EmbeddingCache, PairClassificationTask, STSTask  # noqa: E402
from l2v.eval.mteb_adapter import MTEBEncoder  # noqa: E402

S1 = ["a cat sits on the mat", "the dog runs in the park", "rain falls on the city", "he reads a long book",
      "children play football"]
S2 = ["a cat is sitting on a mat", "stock prices fell today", "it is raining in town", "she cooks dinner",
      "kids are playing soccer"]
SCORES = [5.0, 0.0, 4.5, 1.0, 4.0]

META = dict(description="Local STS task for testing the l2v adapter", reference="https://example.org",
            dataset={"path": "local/none", "revision": "1"}, category="t2t", eval_splits=["test"],
            eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-02"), dialect=[], domains=[], task_subtypes=[],
            license="cc-by-4.0", annotations_creators="derived", modalities=["text"], sample_creation="found",
            bibtex_citation="")


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="L2VLocalSTS", main_score="cosine_spearman", **META)
    min_score = 0
    max_score = 5

    def load_data(self, **kwargs):
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"sentence1": S1, "sentence2": S2, "score": SCORES})})
        self.data_loaded = True


class LocalPairs(AbsTaskPairClassification):
    metadata = TaskMetadata(type="PairClassification", name="L2VLocalPairs", main_score="max_ap", **META)

    def load_data(self, **kwargs):
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"sentence1": S1, "sentence2": S2, "labels": [1, 0, 1, 0, 1]})})
        self.data_loaded = True


def test_adapter_satisfies_protocol(tiny_encoder):
    model = MTEBEncoder(tiny_encoder)
    assert isinstance(model, EncoderProtocol)
    assert model.mteb_model_meta.embed_dim == tiny_encoder.dim
    assert model.model_name.startswith("l2v/") and model.model_name.count("/") == 1


def test_mteb_scores_match_l2v_tasks(tiny_encoder):
    model = MTEBEncoder(tiny_encoder, use_instructions=False)
    result = mteb.evaluate(model, [LocalSTS(), LocalPairs()], cache=None, show_progress_bar=False)
    assert not result.exceptions
    by_name = {r.task_name: r.scores["test"][0] for r in result.task_results}
    ours_sts = STSTask(name="s", sentences1=S1, sentences2=S2, scores=SCORES).evaluate(EmbeddingCache(tiny_encoder))
    # every similarity mteb correlates with the gold scores, under mteb's names
    for fn in ("cosine", "manhattan", "euclidean"):
        assert by_name["L2VLocalSTS"][f"{fn}_spearman"] == pytest.approx(ours_sts[f"{fn}_spearman"], abs=1e-6)
        assert by_name["L2VLocalSTS"][f"{fn}_pearson"] == pytest.approx(ours_sts[f"{fn}_pearson"], abs=1e-5)
    ours_pairs = PairClassificationTask(name="p", sentences1=S1, sentences2=S2, labels=[1, 0, 1, 0, 1]).evaluate(
        EmbeddingCache(tiny_encoder))
    assert by_name["L2VLocalPairs"]["similarity_ap"] == pytest.approx(ours_pairs["cosine_ap"], abs=1e-6)
    for key in ("cosine_ap", "dot_ap", "euclidean_ap", "manhattan_ap", "max_ap"):
        assert by_name["L2VLocalPairs"][key] == pytest.approx(ours_pairs[key], abs=1e-6)


def test_instructions_go_to_queries_not_documents(tiny_encoder):
    model = MTEBEncoder(tiny_encoder, instructions={"L2VLocalSTS": "Find a paraphrase: "})
    meta = LocalSTS.metadata
    assert model.instruction_for(meta, PromptType.query) == "Find a paraphrase: "
    assert model.instruction_for(meta, None) == "Find a paraphrase: "
    assert model.instruction_for(meta, PromptType.document) is None
    generic = MTEBEncoder(tiny_encoder)
    default = generic.instruction_for(meta, PromptType.query)  # mteb's prompt for the task (type)
    assert default and default.endswith(" ") and "similar" in default
    assert MTEBEncoder(tiny_encoder, use_instructions=False).instruction_for(meta, PromptType.query) is None


def test_batch_without_text_column_is_a_clear_error(tiny_encoder):
    model = MTEBEncoder(tiny_encoder)
    with pytest.raises(ValueError, match="without a 'text' column"):
        model.encode([{"image": [1]}], task_metadata=LocalSTS.metadata, hf_split="test", hf_subset="default")


@pytest.mark.parametrize("fn", ["cosine", "dot", "euclidean", "manhattan"])
def test_adapter_scores_with_the_encoders_similarity(tiny_encoder, fn):
    """mteb ranks by the model's declared similarity: the adapter declares (and computes) the encoder's own."""
    import numpy as np
    from mteb.models.model_meta import ScoringFunction

    before = tiny_encoder.similarity_fn_name
    tiny_encoder.similarity_fn_name = fn
    try:
        model = MTEBEncoder(tiny_encoder)
        a = tiny_encoder.encode(["a cat sat", "stock prices fell", "hello"])
        b = tiny_encoder.encode(["a dog ran", "markets dropped", "bye"])
        want = tiny_encoder.similarity(a, b)
    finally:
        tiny_encoder.similarity_fn_name = before
    assert model.mteb_model_meta.similarity_fn_name is ScoringFunction(fn)
    np.testing.assert_allclose(np.asarray(model.similarity(a, b)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.similarity_pairwise(a, b)), np.diag(want), rtol=1e-5, atol=1e-5)
