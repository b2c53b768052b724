"""sentence-transformers 6.x loads an l2v export with stock modules and reproduces ``Encoder.encode``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from tiny import save_tiny

from l2v import Encoder, check_bidirectional
from l2v.export import export
from l2v.st import st_compatibility

sentence_transformers = pytest.importorskip("sentence_transformers")
SentenceTransformer = sentence_transformers.SentenceTransformer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "a", "Cats and dogs.",
         "Machine learning models turn text into vectors. " * 4]


def cos(a, b):
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny("llama", tmp_path_factory.mktemp("st") / "base")


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean"])
def test_sentence_transformer_matches_encoder(base, tmp_path, pooling):
    enc = Encoder.from_pretrained(base, pooling=pooling, dtype="float32", device="cpu", max_length=24)
    assert st_compatibility(enc) == (True, "exact")
    out = export(enc, tmp_path / "exp")
    st = SentenceTransformer(str(out), device="cpu")  # no trust_remote_code: stock modules only
    assert json.loads((out / "modules.json").read_text())[0]["type"].startswith("sentence_transformers.")
    # Bidirectional inside sentence-transformers, proved on its own model.
    assert check_bidirectional(st[0].model)
    expected = enc.encode(TEXTS)  # includes a text longer than max_length (truncated the same way)
    assert cos(st.encode(TEXTS, batch_size=4), expected).min() >= 0.9999
    for text, vec in zip(TEXTS, expected, strict=True):  # unpadded batches of one: the SDPA-skip trap
        assert cos(st.encode([text]), vec).min() >= 0.9999
    np.testing.assert_allclose(st.encode(TEXTS, normalize_embeddings=True), enc.encode(TEXTS, normalize=True),
                               atol=1e-5)
    # An instruction = a sentence-transformers prompt, excluded from pooling.
    if pooling == "mean":
        inst = enc.encode([("Retrieve passages:", t) for t in TEXTS[:3]])
        assert cos(st.encode(TEXTS[:3], prompt="Retrieve passages:"), inst).min() >= 0.9999
        assert cos(inst, expected[:3]).min() < 0.9999  # the instruction did change the vectors


@pytest.mark.parametrize("fn", ["dot", "manhattan"])
def test_export_keeps_the_similarity_function(base, tmp_path, fn):
    """sentence-transformers scores with the encoder's own similarity_fn_name (the export always wrote cosine)."""
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu", max_length=24)
    enc.similarity_fn_name = fn
    out = export(enc, tmp_path / "exp")
    assert json.loads((out / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == fn
    st = SentenceTransformer(str(out), device="cpu")
    assert st.similarity_fn_name == fn
    a, b = enc.encode(TEXTS[:2]), enc.encode(TEXTS[1:3])
    np.testing.assert_allclose(st.similarity(a, b).numpy(), enc.similarity(a, b), rtol=1e-4, atol=1e-4)


def test_sliding_window_model_exports_full_attention(tmp_path):
    enc = Encoder.from_pretrained(save_tiny("mistral", tmp_path / "mistral"), dtype="float32", device="cpu",
                                  max_length=200)  # tiny Mistral: sliding_window 64
    long = ["Sliding windows cut attention between distant tokens of long texts. " * 7, "short text"]
    assert len(enc.tokenizer(long[0])["input_ids"]) > 100
    out = export(enc, tmp_path / "exp")
    assert json.loads((out / "config.json").read_text())["sliding_window"] > 10**9
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(long), enc.encode(long), atol=1e-5)  # windowed: off by ~7e-3
    assert json.loads((tmp_path / "mistral" / "config.json").read_text())["sliding_window"] == 64


def test_causal_export_stays_causal(base, tmp_path):
    enc = Encoder.from_pretrained(base, bidirectional=False, dtype="float32", device="cpu")
    out = export(enc, tmp_path / "causal")
    st = SentenceTransformer(str(out), device="cpu")
    assert not check_bidirectional(st[0].model)
    assert cos(st.encode(TEXTS), enc.encode(TEXTS)).min() >= 0.9999
    bi = Encoder.from_pretrained(base, dtype="float32", device="cpu")
    assert cos(bi.encode(TEXTS), enc.encode(TEXTS)).min() < 0.999  # the two modes really differ here


def test_inexact_pooling_warns(base, tmp_path):
    enc = Encoder.from_pretrained(base, pooling="last_token", dtype="float32", device="cpu")
    exact, reason = st_compatibility(enc)
    assert not exact and "EOS" in reason
    with pytest.warns(UserWarning, match="will differ"):
        export(enc, tmp_path / "lt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(Encoder.from_pretrained(base, pooling="bos", dtype="float32", device="cpu"), tmp_path / "bos")


@pytest.mark.slow
def test_default_model_in_sentence_transformers(tmp_path):
    """The real embedded default (SmolLM2-135M), exported in fp32, loads in sentence-transformers unchanged."""
    enc = Encoder.from_pretrained("smollm2-135m", dtype="float32", device="cpu", max_length=64)
    assert st_compatibility(enc)[0]
    out = export(enc, tmp_path / "smol")
    st = SentenceTransformer(str(out), device="cpu")
    texts = ["A man is playing a guitar.", "Stocks fell sharply on Monday after the report.", "cat"]
    assert cos(st.encode(texts), enc.encode(texts)).min() >= 0.9999
    assert cos(st.encode(texts[:1]), enc.encode(texts[:1])).min() >= 0.9999


def test_last_token_without_eos_is_exact(base, tmp_path):
    """A tokenizer with no EOS token: l2v appends nothing and pools the last text token, exactly what
    sentence-transformers' last-token Pooling does, so the export is exact (it used to warn 'will differ')."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-eos"
    shutil.copytree(base, folder)
    tok = AutoTokenizer.from_pretrained(base)
    tok.eos_token = None
    tok.save_pretrained(folder)
    enc = Encoder.from_pretrained(str(folder), pooling="last_token", dtype="float32", device="cpu")
    assert enc.tokenizer.eos_token_id is None
    assert st_compatibility(enc) == (True, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export(enc, tmp_path / "exp")
    st = SentenceTransformer(str(out), device="cpu")
    assert cos(st.encode(TEXTS, batch_size=4), enc.encode(TEXTS)).min() >= 0.9999


def test_tokenizer_without_pad_token(base, tmp_path):
    """Llama-3 and Mistral tokenizers have no pad token: sentence-transformers failed on any batch of two texts
    ("Asking to pad but the tokenizer does not have a padding token"). The export names EOS for it, as l2v pads."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-pad"
    shutil.copytree(base, folder)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    tok.save_pretrained(folder)
    enc = Encoder.from_pretrained(str(folder), dtype="float32", device="cpu", max_length=24)
    assert enc.tokenizer.pad_token is None
    out = export(enc, tmp_path / "exp")
    st = SentenceTransformer(str(out), device="cpu")
    assert cos(st.encode(TEXTS, batch_size=4), enc.encode(TEXTS)).min() >= 0.9999
    assert AutoTokenizer.from_pretrained(out).pad_token is None  # l2v's own reload is unchanged
