"""l2v.io: line-numbered text input and crash-safe outputs."""

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


def test_atomic_outputs_get_the_umask_mode_not_mkstemps_private_one(tmp_path, monkeypatch):
    import stat

    from l2v import io as l2v_io

    monkeypatch.setattr(l2v_io, "_UMASK", 0o022)
    l2v_io.atomic_write_text(tmp_path / "a.json", "{}")
    with l2v_io.atomic_directory(tmp_path / "export") as d:
        (d / "x.txt").write_text("x", encoding="utf-8")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # was 0o600
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755  # was 0o700: others could not even list it
