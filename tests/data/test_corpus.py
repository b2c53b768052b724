"""Corpora for unsupervised training: text and jsonl files, the built-in offline corpus, clear errors."""

from __future__ import annotations

import json

import pytest

from l2v.data.corpus import CorpusError, builtin_corpus, hub_corpus, load_corpus, read_text_file


def test_plain_text_skips_blank_lines_and_bom(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\ufefffirst line\n\n  second line  \n", encoding="utf-8")
    assert read_text_file(p) == ["first line", "second line"]


def test_jsonl_reads_the_named_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b", "text": "c"}) + "\n", encoding="utf-8")
    assert load_corpus(p) == ["a", "c"]
    with pytest.raises(CorpusError, match=r"c.jsonl:1: .*'body'"):
        load_corpus(p, field="body")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="bad.jsonl:1: invalid JSON"):
        load_corpus(tmp_path / "bad.jsonl")


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "l1.txt").write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(CorpusError, match=r"l1.txt:2: line is not valid UTF-8"):
        load_corpus(tmp_path / "l1.txt")
    with pytest.raises(CorpusError, match="directory"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="unknown dataset"):
        hub_corpus("nope")


def test_limit(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("".join(f"line {i}\n" for i in range(10)), encoding="utf-8")
    assert load_corpus(p, limit=3) == ["line 0", "line 1", "line 2"]


def test_builtin_corpus_is_real_english_sentences():
    texts = builtin_corpus()
    assert len(texts) >= 1000
    assert len(set(texts)) > 0.9 * len(texts)
    words = [w.lower().strip(".,") for t in texts[:500] for w in t.split()]
    assert {"the", "of", "and"} <= set(words)
    assert 3 <= sum(len(t.split()) for t in texts[:500]) / 500 <= 60
    assert builtin_corpus(limit=5) == texts[:5]


def test_hub_wikitext_drops_headings_and_blank_lines(monkeypatch):
    import datasets

    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"text": ""}, {"text": " = Valkyria Chronicles III = \n"}, {"text": " Senjō no Valkyria 3 is a game .\n"},
                {"text": " = = Gameplay = = \n"}, {"text": " The game plays like its predecessors .\n"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_corpus("hub:wikitext-103") == ["Senjō no Valkyria 3 is a game .", "The game plays like its predecessors ."]
    assert calls[0][0][:2] == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert load_corpus("hub:wiki1m_for_simcse", limit=1) == ["Senjō no Valkyria 3 is a game ."]
    assert calls[1][0][0] == "text" and "wiki1m_for_simcse.txt" in str(calls[1][1]["data_files"])


def test_hub_errors_are_clear_offline(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="network access"):
        load_corpus("hub:wikitext-103")
