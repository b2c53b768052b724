"""Local task data in the layouts users have: BEIR folders, pair files, labelled texts, reranking jsonl."""

from __future__ import annotations

import json

import pytest

from l2v.eval import EmbeddingCache
from l2v.eval.formats import load_task, read_records


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def make_beir(folder):
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "Cats", "text": "the cat eats fish"},
                                          {"_id": "d2", "title": "", "text": "stock prices fell"}])
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "what do cats eat"},
                                           {"_id": "q2", "text": "market news"}])
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return folder


def test_beir_folder(tmp_path, trigram):
    folder = make_beir(tmp_path / "scifact")
    (folder / "task.json").write_text(json.dumps({"instruction": "Retrieve: "}))
    task = load_task(folder)
    assert task.type == "Retrieval" and task.name == "scifact" and task.instruction == "Retrieve: "
    assert task.corpus["d1"] == "Cats the cat eats fish" and task.corpus["d2"] == "stock prices fell"
    assert task.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert 0.0 <= task.evaluate(EmbeddingCache(trigram))["ndcg_at_10"] <= 1.0


def test_beir_errors_name_the_file(tmp_path):
    folder = make_beir(tmp_path / "b")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmissing-doc\t1\n")
    with pytest.raises(ValueError, match=r"test\.tsv.*missing-doc"):
        load_task(folder)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(ValueError, match=r"test\.tsv:2: field 'score' must be int"):
        load_task(folder)
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2" "text": 1}\n')
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: invalid JSON"):
        load_task(folder)


def test_beir_qrels_without_judgements_is_an_error(tmp_path):
    # a qrels file without its header line (its first judgement read as the header) or with the header only
    # loaded as a task of 0 queries: every metric nan, reported as a null score instead of an error
    folder = make_beir(tmp_path / "b")
    for text in ("q1\td1\t1\n", "query-id\tcorpus-id\tscore\n"):
        (folder / "qrels" / "test.tsv").write_text(text)
        with pytest.raises(ValueError, match=r"test\.tsv: no relevance judgements.*header line"):
            load_task(folder)


def test_pairs_tsv_sts_and_pair_classification(tmp_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta kitten\t4.5\na cat\tstocks\t0\n")
    task = load_task(sts)
    assert task.type == "STS" and task.scores == [4.5, 0.0] and task.name == "sts"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1},
                                                   {"sentence1": "a", "sentence2": "c", "label": 0}])
    task = load_task(pairs)
    assert task.type == "PairClassification" and task.labels == [1, 0]
    write_jsonl(pairs, [{"sentence1": "a", "sentence2": "b", "label": 3}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field 'label' must be 0 or 1"):
        load_task(pairs)


def test_labelled_texts_classification_clustering_and_split(tmp_path):
    data = write_jsonl(tmp_path / "topics.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(6)])
    assert load_task(data).type == "Classification"
    assert load_task(data, type="clustering").type == "Clustering"
    folder = tmp_path / "split"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    write_jsonl(folder / "test.jsonl", [{"text": "c", "label": "x"}])
    task = load_task(folder)
    assert task.type == "Classification" and task.test_texts == ["c"]
    write_jsonl(data, [{"text": "only text"}])
    with pytest.raises(ValueError, match="cannot tell the task type"):
        load_task(data)
    with pytest.raises(ValueError, match=r"missing field 'label'"):
        load_task(data, type="classification")


def test_reranking_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "rr.jsonl", [{"query": "q", "positive": ["p"], "negative": ["n1", "n2"]}])
    task = load_task(f)
    assert task.type == "Reranking" and task.samples[0]["negative"] == ["n1", "n2"]
    write_jsonl(f, [{"query": "q", "positive": "p", "negative": []}])
    with pytest.raises(ValueError, match="JSON lists"):
        load_task(f)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such task"):
        load_task(tmp_path / "nothing")
    bad = tmp_path / "x.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\n")
    with pytest.raises(ValueError, match=r"x\.tsv:2: 2 fields, but the header has 3"):
        read_records(bad)
    with pytest.raises(ValueError, match="unknown task type"):
        load_task(bad, type="translation")
    (tmp_path / "d.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_records(tmp_path / "d.xml")
    array = tmp_path / "a.json"  # a JSON array, pretty-printed or on one line: say that JSON Lines is read
    for text in ('[\n  {"text": "a", "label": 1}\n]\n', '[{"text": "a", "label": 1}]\n'):
        array.write_text(text)
        with pytest.raises(ValueError, match=r"a\.json:1: .*one JSON object per line, not a JSON array"):
            read_records(array)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no task data found"):
        load_task(empty)


def test_records_are_lines(tmp_path):
    """U+2028 (legal unescaped in JSON) and form feeds stay inside their row; a BOM does not break line 1."""
    src = tmp_path / "sts.jsonl"
    src.write_bytes(("\ufeff" + json.dumps({"sentence1": "a\u2028b", "sentence2": "c\x0cd", "score": 1},
                                           ensure_ascii=False) + "\n").encode())
    assert [(r["sentence1"], r["sentence2"], r["__line__"]) for r in read_records(src)] == [("a\u2028b", "c\x0cd", 1)]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_bytes("\ufeffsentence1\tsentence2\tscore\r\nx\u2028y\tz\t2\r\n".encode())
    assert [(r["sentence1"], r["score"]) for r in read_records(tsv)] == [("x\u2028y", "2")]


def test_csv_quoted_field_spans_lines(tmp_path):
    """A quoted CSV field may hold line breaks (RFC 4180): they stay in the text, and line numbers stay true."""
    src = tmp_path / "data.csv"
    src.write_text('text,label\n"first line\nsecond line",pos\n"a, b",neg\r\n\nplain,pos\n', encoding="utf-8")
    rows = read_records(src)
    assert [(r["text"], r["label"], r["__line__"]) for r in rows] == [
        ("first line\nsecond line", "pos", 2), ("a, b", "neg", 4), ("plain", "pos", 6)]
    src.write_text('text,label\n"multi\nline",pos\nbroken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv:4: 1 fields"):
        read_records(src)


def test_numbers_are_not_rounded_or_nan(tmp_path):
    """A 0.7 pair label or a 1.5 qrel was truncated to 0 / 1, and a nan gold score made Spearman nan: rejected."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0.7},
                                                   {"sentence1": "a", "sentence2": "c", "label": 1}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field 'label' must be int, got 0\.7"):
        load_task(pairs)
    write_jsonl(pairs, [{"sentence1": "a", "sentence2": "b", "label": 1.0}, {"sentence1": "a", "sentence2": "c",
                                                                            "label": "0"}])
    assert load_task(pairs).labels == [1, 0]
    sts = tmp_path / "sts.tsv"
    for bad in ("nan", "inf"):
        sts.write_text(f"sentence1\tsentence2\tscore\na\tb\t4.5\na\tc\t{bad}\n")
        with pytest.raises(ValueError, match=rf"sts\.tsv:3: field 'score' must be float, got '{bad}'"):
            load_task(sts)
    folder = make_beir(tmp_path / "b")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1.5\n")
    with pytest.raises(ValueError, match=r"test\.tsv:2: field 'score' must be int, got '1\.5'"):
        load_task(folder)


def test_beir_document_text_is_stripped_as_mteb(tmp_path):
    """MTEB embeds (title + " " + text).strip(), or text.strip() without a title: no stray whitespace tokens."""
    folder = make_beir(tmp_path / "ws")
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "Cats ", "text": " the cat eats fish\n"},
                                          {"_id": "d2", "text": "  stock prices fell\n"},
                                          {"_id": "d3", "title": None, "text": "x "}])
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert load_task(folder).corpus == {"d1": "Cats   the cat eats fish", "d2": "stock prices fell", "d3": "x"}


def test_beir_repeated_ids_warn_and_the_last_wins(tmp_path):
    folder = make_beir(tmp_path / "b")
    with open(folder / "corpus.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": "d1", "title": "", "text": "a second d1"}) + "\n")
    with pytest.warns(UserWarning, match=r"corpus\.jsonl: 1 records repeat an earlier _id"):
        task = load_task(folder)
    assert task.corpus["d1"] == "a second d1" and len(task.corpus) == 2
