"""The l2v command: encode, similarity, info, convert, and its error handling."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from tiny import save_tiny

from l2v.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("encode", "similarity", "info", "convert"):
        assert cmd in out


def test_encode_args_to_npy(model_dir, tmp_path):
    out = tmp_path / "v.npy"
    assert main(["encode", "hello world", "second text", "-m", model_dir, "-o", str(out), "-q",
                 "--dtype", "float32", "--normalize"]) == 0
    v = np.load(out)
    assert v.shape[0] == 2 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)



@pytest.mark.parametrize("command", ["encode", "encode-corpus"])
def test_compile_flag_opts_in(model_dir, command):
    from l2v.commands.inference import load_from_args

    extra = ["x"] if command == "encode" else ["in.txt", "outdir"]
    args = build_parser().parse_args([command, *extra, "-m", model_dir, "--dtype", "float32", "--compile"])
    enc = load_from_args(args)
    assert enc._compiled is not None and enc.packing is False  # compiled lazily, on the first encode
    args = build_parser().parse_args([command, *extra, "-m", model_dir, "--dtype", "float32"])
    assert load_from_args(args)._compiled is None

def test_no_cpu_kernel_flag(model_dir):
    """bf16 on CPU uses l2v's kernel unless --no-cpu-kernel; export always writes plain layers."""
    from l2v.commands.inference import load_from_args
    from l2v.kernels import kernel_status

    args = build_parser().parse_args(["encode", "x", "-m", model_dir, "--dtype", "bfloat16", "--device", "cpu"])
    assert load_from_args(args).cpu_kernel == kernel_status()[0]
    args = build_parser().parse_args(["encode", "x", "-m", model_dir, "--dtype", "bfloat16", "--device", "cpu",
                                      "--no-cpu-kernel"])
    assert not load_from_args(args).cpu_kernel
    args = build_parser().parse_args(["encode", "x", "-m", model_dir, "--dtype", "bfloat16", "--device", "cpu",
                                      "--cpu-kernel", "off"])
    assert not load_from_args(args).cpu_kernel
    if kernel_status()[0]:
        args = build_parser().parse_args(["encode", "x", "-m", model_dir, "--dtype", "bfloat16", "--device",
                                          "cpu", "--fp32-layers", "1"])
        enc = load_from_args(args)
        assert (enc.fp32_layers, enc.kernel_format) == (1, "int16")
        args.fp32_layers = None
        enc = load_from_args(args)
        assert (enc.fp32_layers, enc.kernel_format) == (0, "int16")  # the default: int16 everywhere
        args.cpu_kernel = "bf16"
        enc = load_from_args(args)
        assert (enc.fp32_layers, enc.kernel_format) == (1, "bf16")  # bf16 weights: 40% of 2 layers, rounded up
    assert main(["encode", "x", "-m", model_dir, "--dtype", "bfloat16", "--no-cpu-kernel", "--fp32-layers", "1",
                 "-q"]) == 2
    args = build_parser().parse_args(["export", model_dir, "out", "--dtype", "bfloat16"])
    assert args.no_cpu_kernel


def test_encode_file_and_stdin_jsonl(model_dir, tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b c"}\n\n')
    out = tmp_path / "v.jsonl"
    assert main(["encode", "-i", str(src), "-m", model_dir, "-o", str(out), "-q", "--dtype", "float32"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a", "b c"] and len(rows[0]["embedding"]) == 32
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\nthree\n"))
    out2 = tmp_path / "s.npy"
    assert main(["encode", "-m", model_dir, "-o", str(out2), "-q", "--dtype", "float32"]) == 0
    assert np.load(out2).shape == (3, 32)


def test_encode_rows_are_lines(model_dir, tmp_path, monkeypatch):
    """One row per line: U+2028 / form feeds inside a text do not split it (valid jsonl keeps them unescaped),
    and a byte-order mark is not part of the first text."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\ufeff" + json.dumps({"text": "one\u2028still one"}, ensure_ascii=False) + "\n"
                     + json.dumps({"text": "two"}) + "\n").encode())
    out = tmp_path / "v.jsonl"
    assert main(["encode", "-i", str(src), "-m", model_dir, "-o", str(out), "-q", "--dtype", "float32"]) == 0
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["one\u2028still one", "two"]
    txt = tmp_path / "in.txt"
    txt.write_bytes("\ufeffpage\x0cbreak\r\nsecond\n".encode())
    assert main(["encode", "-i", str(txt), "-m", model_dir, "-o", str(out), "-q", "--dtype", "float32"]) == 0
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["page\x0cbreak", "second"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a\u2028b\nc\n"))
    assert main(["encode", "-m", model_dir, "-o", str(out), "-q", "--dtype", "float32"]) == 0
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["a\u2028b", "c"]


def test_encode_errors_are_one_line(model_dir, tmp_path, capsys):
    assert main(["encode", "-i", str(tmp_path / "nope.txt"), "-m", model_dir]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert main(["encode", "-i", str(bad), "-m", model_dir, "-o", str(tmp_path / "x.npy")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert main(["encode", "-i", str(latin), "-m", model_dir, "-o", str(tmp_path / "x.npy")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["encode", "x", "-m", model_dir, "-o", str(tmp_path / "x.csv")]) == 2
    assert ".npy or .jsonl" in capsys.readouterr().err
    assert main(["encode", "x", "-m", str(tmp_path / "no-model")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_encode_refuses_empty_input_and_texts_with_input(model_dir, tmp_path, capsys, monkeypatch):
    """An empty file / stdin was 'wrote 0 embeddings' (exit 0); texts plus --input silently ignored the file."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "x.npy"
    assert main(["encode", "-i", str(empty), "-m", model_dir, "-o", str(out), "-q"]) == 2
    assert "empty.txt: no texts" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["encode", "-m", model_dir, "-o", str(out), "-q"]) == 2
    assert "<stdin>: no texts" in capsys.readouterr().err
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    assert main(["encode", "x", "-i", str(src), "-m", model_dir, "-o", str(out), "-q"]) == 2
    assert "not both" in capsys.readouterr().err and not out.exists()


def test_similarity_json(model_dir, capsys):
    assert main(["similarity", "a cat", "a dog", "stocks", "-m", model_dir, "--json", "--dtype", "float32"]) == 0
    data = json.loads(capsys.readouterr().out)
    sim = np.array(data["similarity"])
    assert sim.shape == (3, 3) and np.allclose(np.diag(sim), 1, atol=1e-5)
    assert main(["similarity", "only one", "-m", model_dir]) == 2


def test_similarity_table(model_dir, capsys):
    assert main(["similarity", "a cat", "a dog", "-m", model_dir, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "1.000" in out


def test_info_reports_bidirectional_support(model_dir, capsys):
    assert main(["info", model_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["hidden_size"] == 32
    assert info["bidirectional_supported"] is True and info["parameters"] > 0
    from l2v.kernels import kernel_status

    ok, reason = kernel_status()
    expected = ("available: 14 linear layers in int16 fixed point, 2 fused SiLU-gated MLPs; with --cpu-kernel bf16 "
                "the first 1 of 2 decoder layers stay fp32" if ok else f"unavailable ({reason})")
    assert info["cpu_kernel"].startswith(expected), info["cpu_kernel"]
    assert "glibc thresholds set" in info["cpu_allocator"] or info["cpu_allocator"].startswith("left alone (")


def test_info_embedding_dim_follows_opts_output_projection(tmp_path, capsys):
    import transformers as tf
    from tiny import VOCAB, tiny_tokenizer

    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                       word_embed_proj_dim=16, max_position_embeddings=64)
    tf.OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    tiny_tokenizer().save_pretrained(tmp_path / "opt")
    assert main(["info", str(tmp_path / "opt"), "--json", "--no-check"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hidden_size"] == 32 and info["embedding_dim"] == 16


@pytest.mark.slow
def test_info_default_model(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "llama" and info["layers"] == 30 and info["hidden_size"] == 576
    assert info["embedding_dim"] == 576
    assert info["bidirectional_supported"] is True


@pytest.mark.parametrize("argv, message", [
    (["encode", "x", "--max-length", "0"], "argument --max-length: must be >= 4, got 0"),  # was: silently 512
    (["eval", "--max-length", "-3"], "argument --max-length: must be >= 4, got -3"),
    (["encode", "x", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),  # was: after loading
    (["encode", "x", "--fp32-layers", "-1"], "argument --fp32-layers: must be >= 0, got -1"),  # was: '... or None'
    (["eval", "--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
    (["encode-corpus", "in.txt", "out", "--num-workers", "0"], "argument --num-workers: must be >= 1, got 0"),
    (["encode-corpus", "in.txt", "out", "--worker", "-1"], "argument --worker: must be >= 0, got -1"),
    (["serve", "--port", "99999"], "argument --port: must be in [0, 65535], got 99999"),  # was: socket traceback
    (["serve", "--port", "http"], "argument --port: expected an integer, got 'http'"),
])
def test_bad_numbers_rejected_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_encode_output_directory_fails_early_and_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "v.npy").mkdir()
    assert main(["encode", "x", "-m", model_dir, "-o", str(tmp_path / "v.npy"), "-q"]) == 2
    assert "v.npy: is a directory" in capsys.readouterr().err
    out = tmp_path / "w.npy"
    out.write_bytes(b"keep")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("numpy.save", full_disk)
    assert main(["encode", "x", "-m", model_dir, "-o", str(out), "-q", "--dtype", "float32"]) == 2
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", "w.npy"]


def test_corrupt_weights_file_is_one_line(model_dir, tmp_path, capsys):
    import shutil
    from pathlib import Path

    bad = tmp_path / "truncated"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(Path(model_dir, "model.safetensors").read_bytes()[:5])
    assert main(["encode", "x", "-m", str(bad), "-o", str(tmp_path / "v.npy"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "safetensors weights file is corrupt or truncated" in err and "Traceback" not in err


def test_output_directories_that_are_files_fail_before_loading(tmp_path, capsys, monkeypatch):
    import l2v.commands.inference as inference

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(inference, "load_from_args", no_load)
    monkeypatch.setattr("l2v.commands.corpus.load_from_args", no_load)
    monkeypatch.setattr("l2v.commands.serve.load_from_args", no_load)
    taken = tmp_path / "taken"
    taken.write_text("mine", encoding="utf-8")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a\n", encoding="utf-8")
    for argv in (["encode-corpus", str(corpus), str(taken)], ["encode-corpus", str(corpus), str(taken / "sub")],
                 ["export", "m", str(taken)], ["eval", "m", "-o", str(taken)], ["report", "r.json", "-o", str(taken)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{taken} is a file, not a directory" in err and "Errno" not in err, (argv, err)
    assert taken.read_text(encoding="utf-8") == "mine"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x", encoding="utf-8")
    assert main(["export", "m", str(full)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (full / "keep.txt").is_file()
    monkeypatch.chdir(full)
    assert main(["export", "m", ".", "--overwrite"]) == 2
    assert "is the current directory" in capsys.readouterr().err and (full / "keep.txt").is_file()


def test_non_finite_embeddings_are_one_line_and_write_nothing(tmp_path, capsys):
    """A model whose output is NaN (broken weights, fp16 overflow): a named error, no traceback, no output file."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(save_tiny("llama", tmp_path / "nan-model"))
    state = load_file(path / "model.safetensors")
    key = next(k for k in state if k.endswith("norm.weight") and "layers" not in k)
    state[key] = state[key] * float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "x.npy"
    assert main(["encode", "a text", "-m", str(path), "--dtype", "float32", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-finite (NaN/inf) embeddings" in err and "Traceback" not in err
    assert not out.exists()


def _command_paths(parser, prefix=()):
    """Every command path of the parser tree: ('encode',), ('train', 'mntp'), ..."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


def test_every_command_help_renders(capsys):
    """argparse formats help lazily: a stray '%' in one option's help crashed that command's --help only."""
    paths = list(_command_paths(build_parser()))
    assert ("train", "mntp") in paths and ("serve",) in paths and len(paths) >= 12
    for path in paths:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*path, "--help"])
        assert info.value.code == 0, path
        assert "usage: l2v " + " ".join(path) in capsys.readouterr().out, path
