"""Hardening: property-based tests (hypothesis) that throw arbitrary input at ``encode`` and the server, and the
pickle policy for model loading (refused unless opted in, then only with ``weights_only=True``)."""

from __future__ import annotations

import json
import pickle
import shutil
import string
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tiny import save_tiny, tiny_model, tiny_tokenizer

from l2v import Encoder
from l2v.serve import ServeConfig, create_app

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# Arbitrary Unicode (no lone surrogates: those are not text), with control/format/separator characters favoured,
# plus very long repetitions that must be truncated.
weird_chars = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "So", "Lo", "Co"])
texts = st.one_of(
    st.text(max_size=80),
    st.text(weird_chars, max_size=40),
    st.text(alphabet=string.whitespace + "\x00\x1b\u200b\ufeff\u202e", max_size=20),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(20, 120)),
)
instructions = st.text(max_size=6)  # short enough to leave room for text within max_length=32
items = st.one_of(texts, st.tuples(instructions, texts))
bad_values = st.one_of(st.integers(), st.none(), st.binary(max_size=8), st.floats(allow_nan=True),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    path = save_tiny("llama", tmp_path_factory.mktemp("hard") / "tiny")
    return Encoder.from_pretrained(path, dtype="float32", device="cpu", max_length=32)


@settings(FAST, max_examples=20)
@given(batch=st.lists(items, min_size=1, max_size=5), normalize=st.booleans())
def test_encode_any_text_is_finite_and_shaped(encoder, batch, normalize):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # truncation of the long strings is expected
        out = encoder.encode(batch, normalize=normalize, batch_size=4)
        alone = encoder.encode([batch[0]], normalize=normalize)
    assert out.shape == (len(batch), encoder.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    if normalize:
        norms = np.linalg.norm(out, axis=1)
        # An empty text is pooled over one pad token; the tiny model's pad embedding is zero (padding_idx),
        # so that vector is 0 and stays 0 after normalisation. Everything else is unit length.
        empty = np.array([item == "" for item in batch])
        np.testing.assert_allclose(norms[~empty], 1.0, atol=1e-4)
        assert np.all((np.abs(norms[empty] - 1) < 1e-4) | (norms[empty] == 0))
    # Batching never changes a vector: the first item alone gives the same one.
    np.testing.assert_allclose(alone[0], out[0], atol=2e-4)


@FAST
@given(data=st.data())
def test_encode_mixed_types_raise_type_error_naming_the_index(encoder, data):
    good = data.draw(st.lists(texts.filter(lambda t: len(t) < 100), max_size=3))
    bad = data.draw(bad_values)
    pos = data.draw(st.integers(0, len(good)))
    batch = good[:pos] + [bad] + good[pos:]
    with pytest.raises(TypeError, match=rf"sentences\[{pos}\]"):
        encoder.encode(batch)


@pytest.mark.parametrize("value,error", [
    (None, TypeError), (b"bytes", TypeError), (42, TypeError), ({"a": "b"}, TypeError),
    ([("only-one",)], ValueError), ([("a", "b", "c")], ValueError), ([("a", 3)], TypeError),
])
def test_encode_bad_containers(encoder, value, error):
    with pytest.raises(error):
        encoder.encode(value)


def test_encode_lone_surrogate_is_an_error_not_a_crash(encoder):
    with pytest.raises((TypeError, ValueError)):
        encoder.encode(["fine", "bad \ud800 text"])
    assert encoder.encode([""]).shape == (1, encoder.dim)  # empty text is valid


# ------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def http(encoder):
    app = create_app(encoder, ServeConfig(model_name="m", max_inputs=6, max_body_bytes=8000, batch_wait_ms=1))
    with TestClient(app) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts.filter(lambda t: len(t) < 300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"input": st.one_of(json_values, st.lists(texts.filter(lambda t: len(t) < 600), min_size=1, max_size=8),
                        texts)},
    optional={"encoding_format": st.sampled_from(["float", "base64", "int8", None, 3]),
              "dimensions": st.one_of(st.integers(-2, 40), st.none(), st.text(max_size=2)),
              "model": st.sampled_from(["m", "other", None, 1])},
)


@FAST
@given(req=requests)
def test_server_answers_any_json_without_500(http, encoder, req):
    r = http.post("/v1/embeddings", content=json.dumps(req))
    assert r.status_code in (200, 400, 404, 413), r.text
    event(f"status {r.status_code}")
    body = r.json()
    if r.status_code != 200:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        return
    n = 1 if isinstance(req["input"], str) else len(req["input"])
    assert len(body["data"]) == n and [d["index"] for d in body["data"]] == list(range(n))
    dims = req.get("dimensions") or encoder.dim
    if req.get("encoding_format") == "base64":
        vecs = [np.frombuffer(__import__("base64").b64decode(d["embedding"]), "<f4") for d in body["data"]]
    else:
        vecs = [np.array(d["embedding"], dtype=np.float32) for d in body["data"]]
    for v in vecs:
        assert v.shape == (dims,) and np.isfinite(v).all()
    assert body["usage"]["prompt_tokens"] >= n


@FAST
@given(raw=st.binary(max_size=300))
def test_server_answers_any_bytes_without_500(http, raw):
    r = http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413), r.text


def test_server_keeps_serving_after_garbage(http, encoder):
    for junk in (b"\x00" * 100, b"{" * 5000, b'{"input": "' + b"\xc3" * 10 + b'"}'):
        assert http.post("/v1/embeddings", content=junk).status_code in (400, 413)
    r = http.post("/v1/embeddings", json={"input": ["still alive"]})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], encoder.encode("still alive", normalize=True),
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------- pickle
@pytest.fixture(scope="module")
def pickled_dir(tmp_path_factory):
    """A model directory whose only weights are a pickle (pytorch_model.bin), and the same as safetensors."""
    root = tmp_path_factory.mktemp("pickle")
    safe = save_tiny("llama", root / "safe")
    model = tiny_model("llama")
    (root / "pkl").mkdir()
    model.config.save_pretrained(root / "pkl")
    tiny_tokenizer().save_pretrained(root / "pkl")
    torch.save(model.state_dict(), root / "pkl" / "pytorch_model.bin")
    return root, safe


def test_pickle_weights_refused_by_default(pickled_dir):
    root, _ = pickled_dir
    with pytest.raises(ValueError, match="allow_pickle"):
        Encoder.from_pretrained(str(root / "pkl"), device="cpu")


def test_pickle_weights_opt_in_loads_the_same_model(pickled_dir):
    root, safe = pickled_dir
    enc = Encoder.from_pretrained(str(root / "pkl"), allow_pickle=True, dtype="float32", device="cpu")
    ref = Encoder.from_pretrained(safe, dtype="float32", device="cpu")
    np.testing.assert_allclose(enc.encode(["a test", "b"]), ref.encode(["a test", "b"]), atol=1e-6)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))  # would write a file if ever unpickled


def test_opt_in_still_never_runs_pickled_code(pickled_dir, tmp_path):
    root, _ = pickled_dir
    evil = tmp_path / "evil"
    shutil.copytree(root / "pkl", evil)
    marker = tmp_path / "pwned"
    with open(evil / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Evil(str(marker))}, fh)
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers wraps the UnpicklingError in
        Encoder.from_pretrained(str(evil), allow_pickle=True, device="cpu")
    assert not marker.exists()


def test_pickle_only_adapter_refused(pickled_dir, tmp_path):
    _, safe = pickled_dir
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": safe}))
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        Encoder.from_pretrained(safe, adapter=str(adapter), device="cpu")
