"""``l2v train``: options map onto the config, a tiny run end to end, bad input gives one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from l2v.cli import main  # noqa: E402

COMMON = ["--steps", "2", "--batch-size", "4", "--val-size", "4", "--dtype", "float32", "--device", "cpu",
          "--progress", "false", "--threads", "1"]


def test_print_config_merges_file_and_options(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 11\nlora_r: 4\n", encoding="utf-8")
    assert main(["train", "mntp", "--config", str(tmp_path / "c.yaml"), "--lora-r", "8", "--mask-token", "eos",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["objective"], cfg["steps"], cfg["lora_r"], cfg["mask_token"]) == ("mntp", 11, 8, "eos")
    assert cfg["compile"] is False
    assert main(["train", "simcse", "--compile", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] is True
    assert main(["train", "simcse", "--compile", "--gradient-checkpointing", "--print-config"]) == 2
    assert "compile and gradient_checkpointing cannot be combined" in capsys.readouterr().err


def test_mntp_then_simcse_from_the_command_line(tiny_dir, corpus, tmp_path, capsys):
    assert main(["train", "mntp", "--model", tiny_dir, "--data", corpus, "--output-dir", str(tmp_path / "m"),
                 *COMMON]) == 0
    assert json.loads(capsys.readouterr().out)["objective"] == "mntp"
    assert main(["train", "simcse", "--model", str(tmp_path / "m"), "--data", corpus,
                 "--output-dir", str(tmp_path / "s"), *COMMON]) == 0
    assert (tmp_path / "s" / "l2v_config.json").is_file()


def test_bad_inputs_are_one_line_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [(str(tmp_path / "nope.txt"), "no such corpus file"), (str(bad), "latin1.txt:2: line is not valid UTF-8"),
             (str(empty), "corpus is empty")]
    for data, message in cases:
        rc = main(["train", "mntp", "--model", tiny_dir, "--data", data, "--output-dir", str(tmp_path / "o"),
                   *COMMON])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err


def test_config_file_values_are_type_checked(tmp_path, capsys):
    """A config file's value of the wrong type is a one-line error naming file and field (a JSON "false" used to
    pass as a truthy bool); broken YAML is a one-line error, not a yaml traceback; YAML's 3e-5 (a string to
    PyYAML) is read as the number it means; pooling and lora_alpha are checked before any model loads."""
    cases = {"c1.json": ('{"bidirectional": "false"}', "c1.json: bidirectional must be true or false, got 'false'"),
             "c2.json": ('{"lora_alpha": "32"}', "c2.json: lora_alpha must be an integer, got '32'"),
             "c3.yaml": ("lr: fast\n", "c3.yaml: lr must be a number, got 'fast'"),
             "c4.yaml": (": :\n  - x\n", "c4.yaml: invalid YAML"),
             "c5.yaml": ("pooling: cls\n", "pooling='cls' is not supported"),
             "c6.yaml": ("lora_alpha: 0\n", "lora_alpha must be an integer >= 1")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert main(["train", "simcse", "--config", str(tmp_path / name), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "ok.yaml").write_text("lr: 3e-5\nscale: 20\nmax_texts: null\nmerge: true\n", encoding="utf-8")
    assert main(["train", "simcse", "--config", str(tmp_path / "ok.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["scale"], cfg["max_texts"], cfg["merge"]) == (3e-5, 20.0, None, True)


def test_help_names_the_real_mask_token_and_hub_corpora(capsys):
    from l2v.train.mntp import NEW_MASK_TOKEN

    try:
        main(["train", "mntp", "--help"])
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    assert f"adds a {NEW_MASK_TOKEN} token" in out
    assert "hub:wiki1m_for_simcse" in out
    assert "'bert': 80% mask token, 10% random token" in out  # a literal % in a field's doc (argparse %-formats)
