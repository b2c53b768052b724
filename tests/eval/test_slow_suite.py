"""The suite runner on the real default model (slow): a slice of two WordNet tasks that share glosses."""

from __future__ import annotations

import pytest

from l2v.data.offline import DataSourceMissing


@pytest.mark.slow
def test_default_model_on_wordnet_tasks(default_encoder):
    from l2v.eval import ClusteringTask, RerankingTask, get_task, run_suite

    try:
        senses, lexnames = get_task("wordnet-senses"), get_task("wordnet-lexnames")
    except DataSourceMissing as exc:
        pytest.skip(str(exc).splitlines()[0])
    rerank = RerankingTask(name="senses-slice", samples=senses.samples[:30], instruction=senses.instruction)
    glosses = {g for s in rerank.samples for g in [*s["positive"], *s["negative"]]}
    pairs = [(t, lab) for t, lab in zip(lexnames.texts, lexnames.labels, strict=True) if t in glosses]
    cluster = ClusteringTask(name="lexnames-slice", texts=[t for t, _ in pairs], labels=[lab for _, lab in pairs])
    assert len(set(cluster.labels)) >= 2

    out = run_suite(default_encoder, tasks=[rerank, cluster])
    assert set(out["tasks"]) == {"senses-slice", "lexnames-slice"} and not out["skipped"]
    for name in out["tasks"]:
        score = out["tasks"][name]["main_score"]
        assert score is not None and 0.0 <= score <= 1.0
    # every distinct (instruction, text) embedded exactly once; the clustering glosses all come from the cache
    distinct = {x for t in (rerank, cluster) for x in t.inputs()}
    assert out["texts_encoded"] == len(distinct)
    assert out["tasks"]["lexnames-slice"]["texts_encoded"] == 0
    assert out["config"]["kind"] == "l2v" and out["config"]["bidirectional"] is True
