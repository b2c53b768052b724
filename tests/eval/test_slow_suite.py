"""The offline suite on the real default model (slow): two WordNet tasks sharing glosses."""

from __future__ import annotations

import pytest

from l2v.data.offline import DataSourceMissing


@pytest.mark.slow
def test_default_model_on_wordnet_tasks(default_encoder):
    from l2v.eval import get_task, run_suite

    names = ["wordnet-senses", "wordnet-lexnames"]
    try:
        tasks = [get_task(n) for n in names]
    except DataSourceMissing as exc:
        pytest.skip(str(exc).splitlines()[0])
    out = run_suite(default_encoder, tasks=names)
    assert set(out["tasks"]) == set(names) and not out["skipped"]
    for name in names:
        score = out["tasks"][name]["main_score"]
        assert score is not None and 0.0 <= score <= 1.0
    # every distinct (instruction, text) embedded exactly once although the tasks share glosses
    distinct = {x for t in tasks for x in t.inputs()}
    assert out["texts_encoded"] == len(distinct) < sum(len(t.inputs()) for t in tasks)
    assert out["tasks"]["wordnet-lexnames"]["texts_encoded"] == 0  # all its glosses came from the cache
    assert out["config"]["kind"] == "l2v" and out["config"]["bidirectional"] is True
