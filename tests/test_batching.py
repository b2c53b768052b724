"""Token-budget length-bucketed batching and streaming chunks."""

from __future__ import annotations

import random

import pytest

from l2v.batching import batch_cost, chunk_ranges, plan_batches


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("batch_size", "budget"), [(1, None), (4, None), (100, 50), (7, 120), (1000, 1)])
def test_plan_covers_each_index_once_within_limits(packed, batch_size, budget):
    rng = random.Random(batch_size)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    batches = plan_batches(lengths, batch_size, budget, packed)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= batch_size
        if budget is not None and len(b) > 1:
            assert batch_cost([lengths[i] for i in b], packed) <= budget
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first; equal lengths adjacent


def test_budget_fills_batches_greedily():
    assert plan_batches([10] * 10, 100, 30, packed=True) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # padded: cost is n * longest, so one long text limits its batch
    assert plan_batches([25, 5, 5, 5], 100, 30, packed=False) == [[0], [1, 2, 3]]
    assert plan_batches([25, 5, 5, 5], 100, 30, packed=True) == [[0, 1], [2, 3]]


def test_oversized_text_gets_own_batch_and_bad_args_raise():
    assert plan_batches([50, 3], 8, 10, packed=True) == [[0], [1]]
    assert plan_batches([], 8, 10) == []
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([1], 0)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        plan_batches([1], 1, 0)


def test_chunk_ranges():
    assert [list(r) for r in chunk_ranges(5, 2)] == [[0, 1], [2, 3], [4]]
    assert list(chunk_ranges(0, 3)) == []
    with pytest.raises(ValueError):
        list(chunk_ranges(3, 0))
