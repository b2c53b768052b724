"""Pair data: formats, instruction map, one-dataset batches, and errors that name file and line."""

from __future__ import annotations

import json

import pytest

from l2v.data import pairs as P
from l2v.data.pairs import (
    PairBatchSampler,
    PairDataError,
    build_wordnet_pairs,
    default_pair_dir,
    load_pairs,
)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_formats_and_dataset_names(tmp_path):
    _write(tmp_path / "msmarco.jsonl", [
        {"query": "q1", "positive": "p1", "negative": "n1"},
        {"query": "q2", "pos": ["p2", "p2b"], "neg": ["n2"]},
        "",
        {"query": ["Find it", "q3"], "positive": "p3"},
        {"query": "q4", "positive": "p4", "dataset": "nli"},
    ])
    data = load_pairs(tmp_path)
    assert [e.query for e in data.examples] == ["q1", "q2", "q3", "q4"]
    assert data.examples[1].positive == "p2" and data.examples[1].negative == "n2"
    assert data.examples[2].negative is None and data.examples[2].query_instruction == "Find it"
    assert [e.dataset for e in data.examples] == ["msmarco"] * 3 + ["nli"]
    assert data.examples[3].source.endswith("msmarco.jsonl:5")


@pytest.mark.parametrize("line, message", [
    ({"positive": "p"}, "missing 'query'"),
    ({"query": "q"}, "missing 'positive'"),
    ({"query": "  ", "positive": "p"}, "'query' is an empty string"),
    ({"query": "q", "positive": ""}, "'positive' is an empty string"),
    ({"query": "q", "positive": "p", "negative": 3}, "'negative' must be a string"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [{"query": "a", "positive": "b"}, line, {"query": "c", "positive": "d"}])
    with pytest.raises(PairDataError, match=rf"d\.jsonl:2: .*{message}" if "'" not in message else
                       rf"d\.jsonl:2: .*{message.replace(chr(39), '.')}"):
        load_pairs(path)
    data = load_pairs(path, skip_bad_lines=True)
    assert len(data.examples) == 2 and len(data.skipped) == 1 and "d.jsonl:2" in data.skipped[0]
    assert "skipped 1 bad line" in data.summary()


def test_instruction_map_asymmetric_symmetric_and_unknown(tmp_path):
    _write(tmp_path / "retrieval.jsonl", [{"query": "q", "positive": "p"}])
    _write(tmp_path / "sts.jsonl", [{"query": "a", "positive": "b"}])
    imap = tmp_path / "instr.json"
    imap.write_text(json.dumps({"retrieval": "Retrieve passages",
                                "sts": {"instruction": "Find similar sentences", "symmetric": True}}, indent=1))
    data = load_pairs([tmp_path / "retrieval.jsonl", tmp_path / "sts.jsonl"], instructions=imap)
    r, s = data.examples
    assert (r.query_instruction, r.doc_instruction) == ("Retrieve passages", None)
    assert (s.query_instruction, s.doc_instruction) == ("Find similar sentences", "Find similar sentences")
    imap.write_text('{\n  "retrieval": "x",\n  "nope": "y"\n}\n')
    with pytest.raises(PairDataError, match=r"instr\.json:3: unknown dataset 'nope'.*retrieval, sts"):
        load_pairs(tmp_path, instructions=imap)
    imap.write_text('{"retrieval": 5}')
    with pytest.raises(PairDataError, match=r"instr\.json:1: entry 'retrieval' must be"):
        load_pairs(tmp_path, instructions=imap)


def test_one_dataset_per_batch_and_mixing(tmp_path):
    _write(tmp_path / "a.jsonl", [{"query": f"a{i}", "positive": "p"} for i in range(10)])
    _write(tmp_path / "b.jsonl", [{"query": f"b{i}", "positive": "p"} for i in range(7)])
    data = load_pairs(tmp_path)
    sampler = PairBatchSampler(data, batch_size=3, seed=1)
    batches = sampler.batches(0)
    assert len(batches) == 3 + 2
    for b in batches:
        assert len({data.examples[i].dataset for i in b}) == 1
    assert batches == PairBatchSampler(data, batch_size=3, seed=1).batches(0)  # same on every rank
    assert batches != sampler.batches(1)
    mixed = PairBatchSampler(data, batch_size=4, seed=1, mix=True).batches(0)
    assert len(mixed) == 4 and any(len({data.examples[i].dataset for i in b}) == 2 for b in mixed)
    first = next(iter(sampler))
    assert len(first) == 3


def test_batch_size_larger_than_data(tmp_path):
    _write(tmp_path / "a.jsonl", [{"query": f"a{i}", "positive": "p"} for i in range(10)])
    _write(tmp_path / "b.jsonl", [{"query": f"b{i}", "positive": "p"} for i in range(4)])
    data = load_pairs(tmp_path)
    with pytest.raises(PairDataError, match=r"b\.jsonl:1-4: dataset 'b' has 4 pairs .*batch size 8.*--mix-datasets"):
        PairBatchSampler(data, batch_size=8)
    PairBatchSampler(data, batch_size=8, mix=True)
    with pytest.raises(PairDataError, match=r"14 pairs in all, fewer than the batch size 20"):
        PairBatchSampler(data, batch_size=20, mix=True)


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such pair file"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl"):
        load_pairs(tmp_path)
    _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(PairDataError, match="no usable pairs"):
        load_pairs(tmp_path / "e.jsonl")


def test_wordnet_pairs_have_hard_negatives_from_other_senses():
    entries = [
        {"word": "bank", "pos": "n", "synonyms": ["depository"], "gloss": "a financial institution",
         "examples": ["he cashed a check at the bank"], "lexname": "noun.group"},
        {"word": "bank", "pos": "n", "synonyms": ["riverside"], "gloss": "sloping land beside water",
         "examples": ["they pulled the canoe up on the bank"], "lexname": "noun.object"},
        {"word": "tree", "pos": "n", "synonyms": [], "gloss": "a tall woody plant", "examples": [],
         "lexname": "noun.plant"},
    ]
    out = build_wordnet_pairs(entries)
    usage = out["wordnet_usage"]
    assert usage[0] == {"query": "he cashed a check at the bank", "positive": "a financial institution",
                        "negative": "sloping land beside water"}
    assert out["wordnet_define"][1]["query"] == "bank, riverside"
    for row in out["wordnet_synonyms"]:
        assert row["negative"].lower() not in {row["query"].lower(), row["positive"].lower()}


DOG = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the genus "
       'Canis; "the dog barked all night"')
CAT = '02121620 05 n 02 cat 0 true_cat 0 000 | a feline mammal with soft fur; "the cat sat on the mat"'


@pytest.fixture
def wordnet(tmp_path, monkeypatch):
    """A two-synset WordNet ``dict`` folder and an empty cache; returns a function that rewrites data.noun."""
    monkeypatch.setenv("L2V_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "dict"
    folder.mkdir()
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text("")
    monkeypatch.setenv("L2V_WORDNET_DIR", str(folder))

    def set_nouns(*lines):
        (folder / "data.noun").write_text("".join(line + "\n" for line in lines))

    set_nouns(DOG)
    return set_nouns


def _define_queries(folder):
    return [json.loads(line)["query"] for line in (folder / "wordnet_define.jsonl").read_text().splitlines()]


def test_wordnet_pair_cache_follows_its_source_and_format(wordnet, monkeypatch):
    """The pair folder is rebuilt when WordNet changes or the pair format does (it used to be reused for ever,
    keyed only by per_dataset); unchanged, it is reused."""
    out = default_pair_dir(per_dataset=5)
    assert _define_queries(out) == ["dog, domestic dog, Canis familiaris"]
    assert json.loads((out / "instructions.json").read_text()) == P.WORDNET_INSTRUCTIONS
    wordnet(DOG, CAT)
    assert default_pair_dir(per_dataset=5) == out
    assert _define_queries(out) == ["dog, domestic dog, Canis familiaris", "cat, true cat"]
    builds = []
    real_build = P.build_wordnet_pairs
    monkeypatch.setattr(P, "build_wordnet_pairs", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    default_pair_dir(per_dataset=5)
    assert builds == []  # current: reused
    monkeypatch.setattr(P, "PAIRS_FORMAT", P.PAIRS_FORMAT + 1)
    default_pair_dir(per_dataset=5)
    assert builds == [1]
    default_pair_dir(per_dataset=5)
    assert builds == [1]


def test_wordnet_pair_rebuild_is_all_or_nothing(wordnet, monkeypatch):
    """A rebuild killed part way leaves the previous complete folder (not new files beside old ones under the old
    completion marker), and the next call builds it whole; a folder from before build stamps is rebuilt once."""
    out = default_pair_dir(per_dataset=5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wordnet(DOG, CAT)
    real_write = P.write_pairs
    calls = []

    def dies_on_second_file(path, rows):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, rows)

    monkeypatch.setattr(P, "write_pairs", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        default_pair_dir(per_dataset=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, "wordnet.jsonl"]  # no temp folder left
    monkeypatch.setattr(P, "write_pairs", real_write)
    assert _define_queries(default_pair_dir(per_dataset=5)) == ["dog, domestic dog, Canis familiaris", "cat, true cat"]
    # a folder written by an older l2v: complete by its old marker, but its source is unknown
    legacy = out.parent / "pairs-wordnet-7"
    legacy.mkdir()
    (legacy / "wordnet_define.jsonl").write_text(json.dumps({"query": "old", "positive": "stale"}) + "\n")
    (legacy / "instructions.json").write_text(json.dumps(P.WORDNET_INSTRUCTIONS))
    assert _define_queries(default_pair_dir(per_dataset=7)) == ["dog, domestic dog, Canis familiaris",
                                                                "cat, true cat"]
