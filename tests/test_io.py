"""l2v.io: line-numbered text input."""

from __future__ import annotations

from l2v.io import iter_lines


def test_iter_lines_drops_a_leading_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\r\n\ufeffkept\n'.encode())
    assert list(iter_lines(path)) == [(1, '{"text": "a"}'), (2, "\ufeffkept")]  # only the file's first BOM goes


def test_iter_lines_splits_on_line_endings_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\u2028still one\x0cand this\nsecond\n", encoding="utf-8")
    assert [t for _, t in iter_lines(path)] == ["one\u2028still one\x0cand this", "second"]
