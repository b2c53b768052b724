"""The OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP on a loopback port."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from tiny import save_tiny, tiny_tokenizer

from l2v import Encoder
from l2v.serve import ServeConfig, create_app, free_port, running_server

KEY = "s3cret-key"
NAME = "tiny-l2v"
QUERY = "Represent this sentence:"
OTHER = "Find the answer:"  # as many tokens as QUERY (the one-forward-pass test needs it)
PROMPTS = {"query": QUERY, "document": ""}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny("llama", tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> Encoder:
    return Encoder.from_pretrained(tiny_dir, dtype="float32", device="cpu", max_length=64)


@pytest.fixture(scope="module")
def server(encoder):
    cfg = ServeConfig(model_name=NAME, api_key=KEY, max_body_bytes=20_000, max_inputs=8, max_input_tokens=32,
                      batch_wait_ms=30, prompts=PROMPTS)
    app = create_app(encoder, cfg)
    with running_server(app) as url:
        yield url, app


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def post(url: str, body: bytes | str, key: str | None = KEY, **headers) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/embeddings", content=body, headers=h, timeout=30)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_openai_client_float_and_base64_match_encode(client, encoder):
    texts = ["The quick brown fox", "a", "Machine learning models turn text into vectors."]
    expected = encoder.encode(texts, normalize=True)
    for fmt in ("float", "base64"):
        res = client.embeddings.create(model=NAME, input=texts, encoding_format=fmt)
        got = np.array([d.embedding if fmt == "float" else np.frombuffer(base64.b64decode(d.embedding), "<f4")
                        for d in res.data], dtype=np.float32)
        assert [d.index for d in res.data] == [0, 1, 2]
        assert got.shape == (3, encoder.dim)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        n_tokens = sum(len(encoder.tokenize_one(t).ids) for t in texts)
        assert res.usage.prompt_tokens == n_tokens == res.usage.total_tokens
        assert res.model == NAME
    # The client's default (no encoding_format) asks for base64 and decodes it.
    res = client.embeddings.create(model=NAME, input="The quick brown fox")
    np.testing.assert_allclose(np.array(res.data[0].embedding), expected[0], atol=1e-5)


def test_dimensions_truncate_and_renormalise(client, encoder):
    full = encoder.encode(["The quick brown fox"])
    res = client.embeddings.create(model=NAME, input=["The quick brown fox"], dimensions=8, encoding_format="float")
    got = np.array(res.data[0].embedding)
    assert got.shape == (8,)
    assert abs(np.linalg.norm(got) - 1) < 1e-5
    np.testing.assert_allclose(got, unit(full[0, :8]), atol=1e-5)
    np.testing.assert_allclose(got, encoder.encode(["The quick brown fox"], dimensions=8, normalize=True)[0],
                               atol=1e-5)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["dim"] == 32 and health["max_input_tokens"] == 32
    assert health["prompts"] == ["query", "document"] and health["default_instruction"] is False


def test_wrong_or_missing_key(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=NAME, input="hi")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = post(server[0], json.dumps({"input": "hi"}), key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(server[0], json.dumps({"input": "hi"}), key=KEY + "x")
    assert r.status_code == 401
    r = post(server[0], json.dumps({"input": "hi"}), key=None, authorization=f"Basic {KEY}")
    assert r.status_code == 401


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),  # json's RecursionError: was a plain-text 500
    (b'{"input": "a", "dimensions": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),  # int digit limit: was a 500
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 400, "'input'"),
    (b'{"input": []}', 400, "empty"),
    (b'{"input": ""}', 400, "input is an empty string"),
    (b'{"input": [""]}', 400, "input[0] is an empty string"),
    (b'{"input": ["ok", ""]}', 400, "input[1] is an empty string"),
    (b'{"input": 5}', 400, "string or an array"),
    (b'{"input": null}', 400, "string or an array"),
    (b'{"input": {"a": 1}}', 400, "string or an array"),
    (b'{"input": ["ok", 3]}', 400, "input[1]"),
    (b'{"input": ["ok", null]}', 400, "input[1]"),
    (b'{"input": [1, 2, 3]}', 400, "token-id"),
    (b'{"input": [[1, 2]]}', 400, "token-id"),
    (b'{"input": [[1, 2]]}', 400, "check_embedding_ctx_length=False"),  # what LangChain sends by default
    # the library's (instruction, text) pairs: named, with the request field that carries an instruction
    (b'{"input": ["ok", ["Retrieve: ", "a text"]]}', 400, "input[1] is an array of strings"),
    (b'{"input": [["Retrieve: ", "a text"]]}', 400, "'instruction' field"),
    (b'{"input": "\\ud800x"}', 400, "lone surrogate"),
    (b'{"input": "a", "encoding_format": "int8"}', 400, "encoding_format"),
    (b'{"input": "a", "dimensions": 0}', 400, "dimensions"),
    (b'{"input": "a", "dimensions": 33}', 400, "dimensions"),
    (b'{"input": "a", "dimensions": "8"}', 400, "dimensions"),
    (b'{"input": "a", "dimensions": true}', 400, "dimensions"),
    (b'{"input": "a", "model": 3}', 400, "model"),
    (b'{"input": "a", "model": "gpt-4"}', 404, "tiny-l2v"),
    (json.dumps({"input": ["x"] * 9}).encode(), 413, "max_inputs=8"),
    (json.dumps({"input": "word " * 200}).encode(), 413, "max_input_tokens=32"),
    (json.dumps({"input": ["ok", "word " * 200]}).encode(), 413, "input[1] is longer than max_input_tokens"),
    (json.dumps({"input": "x" * 30_000}).encode(), 413, "max_body_bytes=20000"),
    (b'{"input": "a", "prompt_name": "passage"}', 400, "unknown prompt_name 'passage'; this server's prompts: "
                                                       "'query', 'document'"),
    (b'{"input": "a", "prompt_name": ""}', 400, "unknown prompt_name ''"),
    (b'{"input": "a", "prompt_name": 3}', 400, "prompt_name must be a string, got a number"),
    (b'{"input": "a", "prompt_name": ["query"]}', 400, "prompt_name must be a string, got an array"),
    (b'{"input": "a", "instruction": 3}', 400, "instruction must be a string, got a number"),
    (b'{"input": "a", "instruction": {"a": 1}}', 400, "instruction must be a string, got an object"),
    (b'{"input": "a", "instruction": "\\ud800x"}', 400, "instruction is not valid Unicode"),
    (b'{"input": "a", "prompt_name": "query", "instruction": "x"}', 400, "not both"),
    (json.dumps({"input": "a", "instruction": "word " * 100}).encode(), 400, "leaving no room for text"),
    # fits max_input_tokens=32 alone, not max_length=64 with the instruction
    (json.dumps({"input": "y" * 30, "instruction": "z" * 40}).encode(), 413, "does not fit in max_length=64"),
    (json.dumps({"input": "word " * 200, "prompt_name": "query"}).encode(), 413, "max_input_tokens=32"),
    (b'{"input": [1, 2, 3], "prompt_name": "query"}', 400, "token-id"),  # ids are refused with or without one
])
def test_bad_requests_are_named(server, body, status, needle):
    r = post(server[0], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert err["type"] in ("invalid_request_error", "server_error")


def test_body_limit_without_content_length(server):
    """A chunked upload with no Content-Length is cut off at the limit too."""
    def chunks():
        yield b'{"input": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(server[0] + "/v1/embeddings", content=chunks(),
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]


def test_openai_client_surfaces_limit_errors(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model=NAME, input=["x"] * 9)
    assert info.value.status_code == 413 and "max_inputs" in str(info.value)
    # invalid requests are 400 as on OpenAI, so code written for it (except openai.BadRequestError) catches them
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=NAME, input=[])
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model=NAME, input="")


def test_concurrent_requests_are_micro_batched(server, encoder):
    """16 clients at once: every answer is right, and the model ran fewer forward passes than requests."""
    url, app = server
    batcher = app.state.l2v["batcher"]
    texts = [f"text number {i} " + "word " * (i % 5) for i in range(16)]
    expected = encoder.encode(texts, normalize=True)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
            barrier.wait()
            res = c.embeddings.create(model=NAME, input=[texts[i]], encoding_format="float")
            results[i] = np.array(res.data[0].embedding)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    before = batcher.batches
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(len(texts)):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
    assert batcher.batches - before < len(texts)
    assert batcher.queued == 0


def test_cli_serve_subprocess(tiny_dir):
    """`l2v serve` binds to 127.0.0.1, answers /health, /v1/embeddings and TEI's /embed, and stops on SIGTERM."""
    port = free_port()
    env = {**os.environ, "L2V_API_KEY": "env-key", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "l2v", "serve", tiny_dir, "--port", str(port), "--dtype",
                             "float32", "--device", "cpu", "--served-name", "t", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/embeddings", json={"input": ["hello"], "model": "t"},
                       headers={"authorization": "Bearer env-key"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
        assert httpx.post(url + "/v1/embeddings", json={"input": "x"}, timeout=30).status_code == 401
        r = httpx.post(url + "/embed", json={"inputs": "hello"}, headers={"authorization": "Bearer env-key"},
                       timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1 and len(r.json()[0]) == 32
    finally:
        proc.terminate()
        proc.wait(30)


def test_base64_is_little_endian_float32(server, encoder):
    r = post(server[0], json.dumps({"input": "abc", "encoding_format": "base64"}))
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, encoder.encode("abc", normalize=True), atol=1e-5)


def test_batcher_direct_use_and_backpressure(encoder):
    from l2v.serve import APIError, MicroBatcher

    batcher = MicroBatcher(encoder, max_batch_tokens=64, max_batch_size=2, batch_wait_ms=1, max_queued_inputs=4)
    try:
        texts = ["one", "two words", "three words here", "a much longer text " * 3]
        got = batcher.encode_sync([encoder.tokenize_one(t) for t in texts], timeout=30)
        np.testing.assert_allclose(got.numpy(), encoder.encode(texts), atol=1e-5)
        assert batcher.batches >= 2  # max_batch_size=2 split the work
        with pytest.raises(APIError, match="max_queued_inputs=4") as info:
            batcher.encode_sync([encoder.tokenize_one("x")] * 5, timeout=30)
        assert info.value.status == 503
    finally:
        batcher.stop()
    with pytest.raises(APIError, match="shutting down") as info:  # was a RuntimeError: a 500 in the server
        batcher.encode_sync([encoder.tokenize_one("x")])
    assert info.value.status == 503


def test_batcher_serves_a_training_mode_encoder_without_dropout(tiny_dir):
    from l2v.serve import MicroBatcher

    enc = Encoder.from_pretrained(tiny_dir, dtype="float32")
    for m in enc.model.modules():  # heavy attention dropout, then hand the batcher an encoder in training mode
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    enc.train()
    batcher = MicroBatcher(enc, batch_wait_ms=1)
    try:
        items = [enc.tokenize_one(t) for t in ["same text twice", "same text twice", "another one"]]
        got = batcher.encode_sync(items, timeout=30).numpy()
    finally:
        batcher.stop()
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got, enc.encode(["same text twice", "same text twice", "another one"]), atol=1e-5)


def test_unknown_path_or_method_answers_openai_error_shape(server):
    """A 404 / 405 from routing is ``{"error": {...}}`` like every other error (was FastAPI's ``{"detail": ...}``)."""
    r = httpx.get(server[0] + "/v1/embedding", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Not Found: GET /v1/embedding"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server[0] + "/v1/embeddings", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["message"] == "Method Not Allowed: GET /v1/embeddings"


def test_models_retrieve(client, server):
    """``client.models.retrieve`` (GET /v1/models/{id}) answers the served model, or OpenAI's model_not_found."""
    m = client.models.retrieve(NAME)
    assert (m.id, m.object, m.owned_by) == (NAME, "model", "l2v")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.retrieve(NAME)


def _bad_beside_good(batcher, good: list, bad, **kwargs) -> dict[str, object]:
    """Two concurrent requests that share one collection window: "bad" (a good input and the poisoned one) and
    "good"; each entry is the request's result or the exception it raised. Stops the batcher."""
    results: dict[str, object] = {}

    def one(name: str, items) -> None:
        try:
            results[name] = batcher.encode_sync(items, timeout=30, **kwargs)
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    try:
        threads = [threading.Thread(target=one, args=("bad", [good[0], bad])),
                   threading.Thread(target=one, args=("good", good))]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
    finally:
        batcher.stop()
    return results


def test_batcher_non_finite_row_fails_only_its_own_request(tiny_dir):
    """A text whose embedding is NaN (fp16 overflow on one input) fails its own request, not every other client's
    request that shared the forward pass with it."""
    from l2v.serve import MicroBatcher

    enc = Encoder.from_pretrained(tiny_dir, dtype="float32")
    good = [enc.tokenize_one(t) for t in ["fine text", "another fine one"]]
    sentinel = max(max(t.ids) for t in good) + 1
    bad = enc.tokenize_one("poisoned text")
    bad.ids[bad.start] = sentinel
    forward = enc.forward

    def nan_where_sentinel(batch):
        out = forward(batch)
        return out.masked_fill((batch["input_ids"] == sentinel).any(-1, keepdim=True).to(out.device), float("nan"))

    enc.forward = nan_where_sentinel
    batcher = MicroBatcher(enc, batch_wait_ms=500)
    results = _bad_beside_good(batcher, good, bad)
    assert isinstance(results["bad"], FloatingPointError), results["bad"]
    assert not isinstance(results["good"], Exception), results["good"]
    np.testing.assert_allclose(results["good"].numpy(), enc.encode(["fine text", "another fine one"]), atol=1e-5)
    assert batcher.batches == 1  # the two requests did share the forward pass


def test_embeddings_response_skips_fastapis_per_element_encoder(server, monkeypatch):
    """The float response is serialised straight to JSON: FastAPI's jsonable_encoder walks every float in Python
    (1.4 s for 2048 x 576 floats, on the event loop, stalling every other client) before json.dumps does it again."""
    import fastapi.routing
    from fastapi.encoders import jsonable_encoder

    calls = []

    def spy(obj, *args, **kwargs):
        calls.append(obj)
        return jsonable_encoder(obj, *args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "jsonable_encoder", spy)
    r = post(server[0], json.dumps({"input": ["a", "b"], "encoding_format": "float"}))
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert calls == []


class _HookedLock:
    """A lock that runs ``hook`` once, in ``thread``, just before it is first acquired there."""

    def __init__(self, lock, hook, thread: threading.Thread) -> None:
        self.lock, self.hook, self.thread = lock, hook, thread

    def __enter__(self):
        if self.hook is not None and threading.current_thread() is self.thread:
            hook, self.hook = self.hook, None
            hook()
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def test_batcher_request_racing_stop_is_refused_not_lost(encoder):
    """stop() landing between a request's "not stopped?" check and its enqueue queued the request behind the
    stop marker: the worker had exited, so it was never answered. The check and the enqueue are now atomic."""
    from l2v.serve import APIError, MicroBatcher

    batcher = MicroBatcher(encoder, batch_wait_ms=1)
    batcher._lock = _HookedLock(batcher._lock, batcher.stop, threading.current_thread())
    with pytest.raises(APIError, match="shutting down") as info:
        batcher.encode_sync([encoder.tokenize_one("x")], timeout=5)  # was: TimeoutError (never answered)
    assert info.value.status == 503 and batcher.queued == 0


def test_batcher_stop_fails_requests_left_in_the_queue(encoder):
    """A request still queued when the worker has exited is answered 503 by stop(), not left waiting forever."""
    from l2v.serve import APIError, MicroBatcher

    batcher = MicroBatcher(encoder, batch_wait_ms=1)
    batcher._queue.put(None)  # the worker exits, as after a stop marker, but the batcher is not marked stopped
    batcher._thread.join(10)
    assert not batcher._thread.is_alive()
    result: dict[str, object] = {}

    def one() -> None:
        try:
            result["r"] = batcher.encode_sync([encoder.tokenize_one("x")], timeout=5)
        except Exception as exc:  # noqa: BLE001
            result["r"] = exc

    t = threading.Thread(target=one)
    t.start()
    deadline = time.monotonic() + 10
    while batcher.queued == 0 and t.is_alive():  # queued behind the marker, nobody to serve it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    batcher.stop()
    t.join(10)
    assert isinstance(result["r"], APIError) and result["r"].status == 503, result["r"]
    assert batcher.queued == 0


def test_request_after_batcher_stop_is_503_not_500(encoder):
    """A request reaching a stopped batcher (shutdown under way) is a 503 'shutting down', not a 500."""
    app = create_app(encoder, ServeConfig(model_name=NAME, batch_wait_ms=1))
    with running_server(app) as url:
        app.state.l2v["batcher"].stop()
        r = httpx.post(url + "/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert r.status_code == 503, r.text
    assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"


# ------------------------------------------------------------------------------------------ instructions
def test_prompt_name_and_instruction_match_encode(client, encoder):
    """``prompt_name`` (openai SDK: extra_body) and ``instruction`` embed like ``Encoder.encode(instruction=...)``;
    usage counts the tokens the model ran, the instruction's included."""
    texts = ["how much protein should I eat", "a"]
    plain = encoder.encode(texts, normalize=True)
    for extra, instruction in [({"prompt_name": "query"}, QUERY), ({"instruction": OTHER}, OTHER),
                               ({"prompt_name": "document"}, None), ({"instruction": ""}, None),
                               ({"prompt_name": None, "instruction": None}, None)]:
        res = client.embeddings.create(model=NAME, input=texts, encoding_format="float", extra_body=extra)
        got = np.array([d.embedding for d in res.data])
        np.testing.assert_allclose(got, encoder.encode(texts, instruction=instruction, normalize=True), atol=1e-5)
        if instruction is not None:
            assert np.abs(got - plain).max() > 1e-3, extra  # the instruction did change the vectors
        n_tokens = sum(len(encoder.tokenize_one(t, instruction).ids) for t in texts)
        assert res.usage.prompt_tokens == n_tokens == res.usage.total_tokens, extra


def test_default_instruction_and_what_overrides_it(encoder):
    """``ServeConfig.instruction`` applies to requests that choose none; a request's prompt_name or instruction
    replaces it, and an empty one (``"instruction": ""`` or a prompt with empty text) means none."""
    app = create_app(encoder, ServeConfig(model_name=NAME, batch_wait_ms=1, instruction=OTHER, prompts=PROMPTS))
    text = "protein intake for athletes"
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        for extra, instruction in [({}, OTHER), ({"prompt_name": "query"}, QUERY), ({"instruction": QUERY}, QUERY),
                                   ({"instruction": ""}, None), ({"prompt_name": "document"}, None)]:
            res = c.embeddings.create(model=NAME, input=text, encoding_format="float", extra_body=extra)
            np.testing.assert_allclose(res.data[0].embedding, encoder.encode(text, instruction=instruction,
                                                                             normalize=True), atol=1e-5)
        assert httpx.get(url + "/health").json()["default_instruction"] is True


def test_requests_with_different_instructions_share_a_forward_pass(encoder):
    """Two concurrent requests, same text, different instructions, batched into one forward pass: each gets its
    own instruction's vector (the instruction travels with each input's tokens, not with the batch)."""
    text = "shared text here"
    a, b = encoder.tokenize_one(text, QUERY), encoder.tokenize_one(text, OTHER)
    assert len(a.ids) == len(b.ids)  # so the budget below closes the batch at both requests, in one pass
    # max_batch_tokens = both requests: the batcher stops waiting (10 s) as soon as the second arrives
    app = create_app(encoder, ServeConfig(model_name=NAME, batch_wait_ms=10_000, max_batch_tokens=2 * len(a.ids),
                                          prompts=PROMPTS))
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def one(key: str, extra: dict) -> None:
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            barrier.wait()
            res = c.embeddings.create(model=NAME, input=text, encoding_format="float", extra_body=extra)
            results[key] = np.array(res.data[0].embedding)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with running_server(app) as url:
        batcher = app.state.l2v["batcher"]
        threads = [threading.Thread(target=one, args=("query", {"prompt_name": "query"})),
                   threading.Thread(target=one, args=("other", {"instruction": OTHER}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert batcher.batches == 1 and batcher.inputs == 2  # one forward pass held both
    np.testing.assert_allclose(results["query"], encoder.encode(text, instruction=QUERY, normalize=True), atol=1e-5)
    np.testing.assert_allclose(results["other"], encoder.encode(text, instruction=OTHER, normalize=True), atol=1e-5)
    assert np.abs(results["query"] - results["other"]).max() > 1e-3


def test_prompt_name_without_configured_prompts_says_how_to_add_them():
    from l2v.serve import APIError, parse_request

    with pytest.raises(APIError, match=r"unknown prompt_name 'query'; this server's prompts: none \(start it with "
                                       r"--prompt NAME=TEXT") as info:
        parse_request(b'{"input": "a", "prompt_name": "query"}', ServeConfig(), 32)
    assert info.value.status == 400 and info.value.param == "prompt_name"


def test_configured_instructions_are_checked(encoder):
    with pytest.raises(ValueError, match="instruction must be a non-empty string"):
        ServeConfig(instruction="")
    with pytest.raises(ValueError, match="prompts: expected a non-empty name"):
        ServeConfig(prompts={"": "x"})
    with pytest.raises(ValueError, match="prompts: expected a non-empty name"):
        ServeConfig(prompts={"q": None})
    # one that leaves no room for text within max_length fails at startup, not on every request that uses it
    with pytest.raises(ValueError, match="prompt 'long': instruction is .* leaving no room"):
        create_app(encoder, ServeConfig(prompts={"long": "word " * 100}))
    with pytest.raises(ValueError, match="--instruction: instruction is .* leaving no room"):
        create_app(encoder, ServeConfig(instruction="word " * 100))


def test_cli_serve_instruction_and_prompts(monkeypatch, capsys):
    from l2v.cli import main

    seen = {}
    monkeypatch.setattr("l2v.commands.serve.load_from_args", lambda args: type("E", (), {"dim": 8, "device": "cpu"}))
    monkeypatch.setattr("l2v.serve.serve", lambda encoder, config, **kw: seen.setdefault("config", config))
    assert main(["serve", "--instruction", "Given a query:", "--prompt", "query=Given a web search query: ",
                 "--prompt", "document=", "--prompt", "qa=a=b"]) == 0
    cfg = seen["config"]
    assert cfg.instruction == "Given a query:"
    assert cfg.prompts == {"query": "Given a web search query: ", "document": "", "qa": "a=b"}
    assert "prompts: query, document, qa" in capsys.readouterr().err
    monkeypatch.setattr("l2v.commands.serve.load_from_args", lambda args: pytest.fail("model loaded"))
    for argv, message in [(["--prompt", "query"], "argument --prompt: expected NAME=TEXT, got 'query'"),
                          (["--prompt", "=x"], "expected NAME=TEXT"),
                          (["--prompt", "q=a", "--prompt", "q=b"], "--prompt q=... is given twice"),
                          (["--instruction", ""], "--instruction is empty")]:
        try:
            code = main(["serve", *argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_cli_serve_uses_the_encoders_saved_prompts(monkeypatch, capsys):
    """An encoder saved with prompts (Encoder.prompts / default_prompt_name) is served with them: --prompt wins
    per name, and default_prompt_name is the default instruction unless --instruction is given."""
    from l2v.cli import main

    seen = {}
    saved = type("E", (), {"dim": 8, "device": "cpu", "default_prompt_name": "query",
                           "prompts": {"query": "Given a web search query: ", "document": ""}})
    monkeypatch.setattr("l2v.commands.serve.load_from_args", lambda args: saved)
    monkeypatch.setattr("l2v.serve.serve", lambda encoder, config, **kw: seen.__setitem__("config", config))
    assert main(["serve"]) == 0
    assert seen["config"].prompts == saved.prompts and seen["config"].instruction == "Given a web search query: "
    assert "prompts: query, document; default instruction set" in capsys.readouterr().err
    assert main(["serve", "--prompt", "query=Q: ", "--prompt", "qa=A: ", "--instruction", "I: "]) == 0
    assert seen["config"].prompts == {"query": "Q: ", "document": "", "qa": "A: "}
    assert seen["config"].instruction == "I: "


# ------------------------------------------------------------------------------- text-embeddings-inference
TEI_PATHS = ["/embed", "/"]  # "/" is TEI's route for an embedding model (huggingface_hub's InferenceClient)


def tei(url: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize("path", TEI_PATHS)
def test_tei_embed_matches_encode(server, encoder, path):
    """TEI's /embed: an array of float arrays (one per input, a single string too), unit length unless
    ``normalize: false``, ``dimensions`` cut before normalising, as ``Encoder.encode`` computes them."""
    texts = ["The quick brown fox", "a", "Machine learning models turn text into vectors."]
    raw = encoder.encode(texts)
    for body, expected in [({"inputs": texts}, unit(raw)), ({"inputs": texts, "normalize": True}, unit(raw)),
                           ({"inputs": texts, "normalize": False}, raw),
                           ({"inputs": texts[0]}, unit(raw[:1])),
                           ({"inputs": texts, "dimensions": 8}, unit(raw[:, :8])),
                           ({"inputs": texts, "dimensions": 8, "normalize": False}, raw[:, :8]),
                           ({"inputs": texts, "truncate": None, "prompt_name": None, "normalize": None}, unit(raw)),
                           ({"inputs": texts, "encoding_format": "base64", "model": "x"}, unit(raw))]:  # ignored
        r = tei(server[0], path, body)
        assert r.status_code == 200, (body, r.text)
        got = np.array(r.json(), dtype=np.float32)
        assert got.shape == expected.shape, body
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(body))
    np.testing.assert_allclose(np.array(tei(server[0], path, {"inputs": texts[:2]}).json()),
                               encoder.encode(texts[:2], normalize=True), atol=1e-5)


@pytest.mark.parametrize("path", TEI_PATHS)
def test_tei_truncate_and_direction(server, encoder, path):
    """``truncate: false`` (TEI's default): an input over max_input_tokens is a 422; ``true`` keeps its first
    max_input_tokens tokens, or its last with ``truncation_direction: "left"``; an instruction is kept whole."""
    long = "x" * 80 + "y" * 40  # one token per character in the tiny tokenizer: 120 tokens, limit 32
    ids = encoder.tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(ids) == 120 and len(set(ids[:32])) == len(set(ids[-32:])) == 1
    for body in [{"inputs": long}, {"inputs": long, "truncate": False}]:
        r = tei(server[0], path, body)
        assert r.status_code == 422 and r.json() == {"error": "inputs is longer than max_input_tokens=32 tokens.",
                                                     "error_type": "Validation"}
    r = tei(server[0], path, {"inputs": ["ok", long]})
    assert r.status_code == 422 and r.json()["error"].startswith("inputs[1] is longer")
    for extra, text, instruction in [({}, "x" * 32, None), ({"truncation_direction": "right"}, "x" * 32, None),
                                     ({"truncation_direction": "Right"}, "x" * 32, None),
                                     ({"truncation_direction": "left"}, "y" * 32, None),
                                     ({"truncation_direction": "Left"}, "y" * 32, None),
                                     ({"truncation_direction": "left", "prompt_name": "query"}, "y" * 32, QUERY)]:
        r = tei(server[0], path, {"inputs": [long, "short"], "truncate": True, **extra})
        assert r.status_code == 200, (extra, r.text)
        np.testing.assert_allclose(np.array(r.json()), encoder.encode([text, "short"], instruction=instruction,
                                                                      normalize=True), atol=1e-5, err_msg=str(extra))


@pytest.mark.parametrize("path", TEI_PATHS)
def test_tei_prompt_name_and_instruction(server, encoder, path):
    """``prompt_name`` picks one of the server's prompts as in TEI (and l2v's ``instruction`` field works too)."""
    texts = ["how much protein should I eat", "a"]
    plain = encoder.encode(texts, normalize=True)
    for extra, instruction in [({"prompt_name": "query"}, QUERY), ({"prompt_name": "document"}, None),
                               ({"instruction": OTHER}, OTHER), ({}, None)]:
        r = tei(server[0], path, {"inputs": texts, **extra})
        assert r.status_code == 200, r.text
        got = np.array(r.json())
        np.testing.assert_allclose(got, encoder.encode(texts, instruction=instruction, normalize=True), atol=1e-5)
        if instruction is not None:
            assert np.abs(got - plain).max() > 1e-3, extra


@pytest.mark.parametrize("path", TEI_PATHS)
@pytest.mark.parametrize("body,status,error_type,needle", [
    (b"{not json", 422, "Validation", "not valid JSON"),
    (b"[1, 2]", 422, "Validation", "JSON object"),
    (b"{}", 422, "Validation", "missing required field 'inputs'"),
    (b'{"input": "a"}', 422, "Validation", "missing required field 'inputs'"),  # an OpenAI body
    (b'{"inputs": []}', 400, "Empty", "inputs must not be an empty array"),
    (b'{"inputs": ""}', 400, "Empty", "inputs is an empty string"),
    (b'{"inputs": ["ok", ""]}', 400, "Empty", "inputs[1] is an empty string"),
    (b'{"inputs": 5}', 422, "Validation", "inputs must be a string or an array"),
    (b'{"inputs": ["ok", 3]}', 422, "Validation", "inputs[1] must be a string"),
    (b'{"inputs": [1, 2, 3]}', 422, "Validation", "token-id input is not supported"),
    (b'{"inputs": [[1, 2]]}', 422, "Validation", "token-id input is not supported"),
    (b'{"inputs": "a", "normalize": "yes"}', 422, "Validation", "normalize must be a boolean"),
    (b'{"inputs": "a", "truncate": 1}', 422, "Validation", "truncate must be a boolean"),
    (b'{"inputs": "a", "truncation_direction": "middle"}', 422, "Validation", "truncation_direction"),
    (b'{"inputs": "a", "dimensions": 0}', 422, "Validation", "dimensions must be an integer in [1, 32]"),
    (b'{"inputs": "a", "dimensions": 33}', 422, "Validation", "dimensions must be an integer in [1, 32]"),
    (b'{"inputs": "a", "prompt_name": "passage"}', 422, "Validation", "unknown prompt_name 'passage'"),
    (json.dumps({"inputs": ["x"] * 9}).encode(), 422, "Validation", "max_inputs=8"),
    (json.dumps({"inputs": "word " * 200}).encode(), 422, "Validation", "max_input_tokens=32"),
    (json.dumps({"inputs": "x" * 30_000}).encode(), 413, "Validation", "max_body_bytes=20000"),
    (json.dumps({"inputs": "a", "instruction": "word " * 100}).encode(), 422, "Validation", "leaving no room"),
])
def test_tei_errors_have_tei_shape_and_status(server, path, body, status, error_type, needle):
    """Errors on TEI routes are TEI's ``{"error", "error_type"}`` with TEI's statuses: Empty 400, Validation 422
    (limits on inputs included, as TEI's max_client_batch_size), a body over the limit 413."""
    r = tei(server[0], path, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == error_type, r.json()
    assert needle in r.json()["error"], r.json()


def test_tei_auth_and_public_routes(server):
    """/embed, / (POST), /embed_all, /tokenize, /decode and /info need the API key as /v1/embeddings does; GET /
    is TEI's health route."""
    url = server[0]
    for key in (None, "wrong"):
        for r in [tei(url, "/embed", {"inputs": "hi"}, key=key), tei(url, "/", {"inputs": "hi"}, key=key),
                  tei(url, "/embed_all", {"inputs": "hi"}, key=key), tei(url, "/tokenize", {"inputs": "hi"}, key=key),
                  tei(url, "/decode", {"ids": [68]}, key=key),
                  httpx.get(url + "/info", headers={} if key is None else {"authorization": f"Bearer {key}"})]:
            assert r.status_code == 401, r.text
            assert r.json() == {"error": "missing or invalid API key (send 'Authorization: Bearer <key>').",
                                "error_type": "Unauthorized"}
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(url + "/embed", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed: GET /embed", "error_type": "Validation"}


def test_tei_info(server, encoder):
    r = httpx.get(server[0] + "/info", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    info = r.json()
    assert info["model_id"] == info["served_model_name"] == NAME
    assert info["model_dtype"] == "float32" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 32 and info["max_client_batch_size"] == 8
    assert info["max_batch_tokens"] == 16384 and info["max_batch_requests"] == 128
    assert info["auto_truncate"] is False and info["version"] == __import__("l2v").__version__


def test_tei_overloaded_backend_and_unhealthy_statuses(tiny_dir):
    """The batcher's refusals and failures in TEI's terms: a full queue is 429 Overloaded, a non-finite vector
    (or any model failure) 424 Backend, a stopped server 503 Unhealthy; /v1/embeddings keeps 503/500."""
    enc = Encoder.from_pretrained(tiny_dir, dtype="float32", device="cpu")
    forward = enc.forward
    app = create_app(enc, ServeConfig(model_name=NAME, batch_wait_ms=1, max_queued_inputs=2))
    with running_server(app) as url:
        r = tei(url, "/embed", {"inputs": ["a", "b", "c"]}, key=None)
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
        assert "max_queued_inputs=2" in r.json()["error"]
        enc.forward = lambda batch: forward(batch) * float("nan")
        r = tei(url, "/embed", {"inputs": "a"}, key=None)
        assert r.status_code == 424 and r.json()["error_type"] == "Backend", r.text
        assert post(url, json.dumps({"input": "a"}), key=None).status_code == 500
        enc.forward = forward
        assert tei(url, "/embed", {"inputs": "a"}, key=None).status_code == 200
        app.state.l2v["batcher"].stop()
        r = tei(url, "/", {"inputs": "a"}, key=None)
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy", r.text
        assert post(url, json.dumps({"input": "a"}), key=None).status_code == 503


def test_tei_and_openai_requests_share_a_forward_pass(encoder):
    """/embed and /v1/embeddings feed the one micro-batcher: concurrent requests on both share a forward pass."""
    text = "shared text here"
    n = len(encoder.tokenize_one(text).ids)
    app = create_app(encoder, ServeConfig(model_name=NAME, batch_wait_ms=10_000, max_batch_tokens=2 * n))
    results: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(2)

    def one(key: str) -> None:
        barrier.wait()
        if key == "tei":
            results[key] = np.array(tei(url, "/embed", {"inputs": text, "normalize": False}, key=None).json()[0])
        else:
            r = post(url, json.dumps({"input": text, "encoding_format": "float"}), key=None)
            results[key] = np.array(r.json()["data"][0]["embedding"])

    with running_server(app) as url:
        threads = [threading.Thread(target=one, args=(k,)) for k in ("tei", "openai")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        batcher = app.state.l2v["batcher"]
        assert batcher.batches == 1 and batcher.inputs == 2
    np.testing.assert_allclose(results["tei"], encoder.encode(text), atol=1e-5)
    np.testing.assert_allclose(results["openai"], encoder.encode(text, normalize=True), atol=1e-5)


def test_huggingface_hub_inference_client(server, encoder):
    """huggingface_hub's ``InferenceClient(base_url).feature_extraction`` (it posts to ``/``) works unchanged."""
    hf = pytest.importorskip("huggingface_hub")
    client = hf.InferenceClient(base_url=server[0], api_key=KEY, timeout=30)
    texts = ["The quick brown fox", "a"]
    got = client.feature_extraction(texts)
    assert got.dtype == np.float32 and got.shape == (2, encoder.dim)
    np.testing.assert_allclose(got, encoder.encode(texts, normalize=True), atol=1e-5)
    got = client.feature_extraction("x" * 80 + "y" * 40, normalize=False, prompt_name="query", truncate=True,
                                    truncation_direction="left", dimensions=8)
    np.testing.assert_allclose(got, encoder.encode(["y" * 32], instruction=QUERY)[:, :8], atol=1e-5)
    with pytest.raises(hf.errors.HfHubHTTPError, match="max_input_tokens=32") as info:
        client.feature_extraction("word " * 200)
    assert info.value.response.status_code == 422
    with pytest.raises(hf.errors.HfHubHTTPError) as info:
        hf.InferenceClient(base_url=server[0], api_key="wrong").feature_extraction("hi")
    assert info.value.response.status_code == 401


# ----------------------------------------------------------------------------------- TEI: token embeddings
def token_states(enc: Encoder, text: str, instruction: str | None = None) -> np.ndarray:
    """The last hidden states of ``text``'s tokens, run alone (no padding): what /embed_all must answer."""
    with torch.inference_mode():
        return enc.token_states(enc.collate([enc.tokenize_one(text, instruction)]))[0].float().numpy()


def test_tei_embed_all_matches_token_states(server, encoder):
    """/embed_all: per input, one raw (unnormalised) vector per token the model ran, instruction tokens included;
    the mean over the text's tokens is the pooled /embed vector (mean pooling, no special tokens here)."""
    url = server[0]
    texts = ["The quick brown fox", "a", "Machine learning models turn text into vectors."]
    r = tei(url, "/embed_all", {"inputs": texts})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == 3
    for text, states in zip(texts, got, strict=True):
        states = np.array(states, dtype=np.float32)
        assert states.shape == (len(encoder.tokenize_one(text).ids), encoder.dim)
        np.testing.assert_allclose(states, token_states(encoder, text), atol=1e-5)
        np.testing.assert_allclose(states.mean(0), encoder.encode(text), atol=1e-5)
    assert abs(np.linalg.norm(got[0][0]) - 1) > 1e-3  # not normalised
    one = tei(url, "/embed_all", {"inputs": texts[0], "normalize": True, "dimensions": 8}).json()  # both ignored
    np.testing.assert_allclose(np.array(one[0]), token_states(encoder, texts[0]), atol=1e-5)
    r = tei(url, "/embed_all", {"inputs": texts[:1], "prompt_name": "query"})
    np.testing.assert_allclose(np.array(r.json()[0]), token_states(encoder, texts[0], QUERY), atol=1e-5)
    item = encoder.tokenize_one(texts[0], QUERY)
    np.testing.assert_allclose(np.array(r.json()[0])[item.start:item.end].mean(0),
                               encoder.encode(texts[0], instruction=QUERY), atol=1e-5)


def test_tei_embed_all_truncates_like_embed(server, encoder):
    long = "x" * 80 + "y" * 40
    r = tei(server[0], "/embed_all", {"inputs": ["ok", long]})
    assert r.status_code == 422 and r.json()["error"] == "inputs[1] is longer than max_input_tokens=32 tokens."
    for extra, kept in [({}, "x" * 32), ({"truncation_direction": "left"}, "y" * 32)]:
        r = tei(server[0], "/embed_all", {"inputs": long, "truncate": True, **extra})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()[0]), token_states(encoder, kept), atol=1e-5)


@pytest.mark.parametrize("body,status,error_type,needle", [
    (b"{}", 422, "Validation", "missing required field 'inputs'"),
    (b'{"inputs": []}', 400, "Empty", "inputs must not be an empty array"),
    (b'{"inputs": ["ok", ""]}', 400, "Empty", "inputs[1] is an empty string"),
    (b'{"inputs": [1, 2, 3]}', 422, "Validation", "token-id input is not supported"),
    (b'{"inputs": "a", "truncate": "yes"}', 422, "Validation", "truncate must be a boolean"),
    (b'{"inputs": "a", "truncation_direction": "up"}', 422, "Validation", "truncation_direction"),
    (b'{"inputs": "a", "prompt_name": "passage"}', 422, "Validation", "unknown prompt_name 'passage'"),
    (json.dumps({"inputs": ["x"] * 9}).encode(), 422, "Validation", "max_inputs=8"),
    (json.dumps({"inputs": "a", "instruction": "word " * 100}).encode(), 422, "Validation", "leaving no room"),
    (json.dumps({"inputs": "x" * 30_000}).encode(), 413, "Validation", "max_body_bytes=20000"),
])
def test_tei_embed_all_errors(server, body, status, error_type, needle):
    r = tei(server[0], "/embed_all", body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == error_type, r.json()
    assert needle in r.json()["error"], r.json()


def test_tei_embed_all_backend_failure_and_shutdown(tiny_dir):
    """Non-finite token states are a 424 Backend, a stopped batcher a 503 Unhealthy, as on /embed."""
    enc = Encoder.from_pretrained(tiny_dir, dtype="float32", device="cpu")
    states = enc.token_states
    app = create_app(enc, ServeConfig(model_name=NAME, batch_wait_ms=1))
    with running_server(app) as url:
        enc.token_states = lambda batch: states(batch) * float("nan")
        r = tei(url, "/embed_all", {"inputs": "a"}, key=None)
        assert r.status_code == 424 and r.json()["error_type"] == "Backend", r.text
        assert "non-finite" in r.json()["error"]
        del enc.token_states
        assert tei(url, "/embed_all", {"inputs": "a"}, key=None).status_code == 200
        app.state.l2v["batcher"].stop()
        r = tei(url, "/embed_all", {"inputs": "a"}, key=None)
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy", r.text


def test_tei_embed_all_is_micro_batched(encoder):
    """Concurrent /embed_all requests share one forward pass; an /embed request collected with them gets its own
    (the pooled pass), and every answer is right."""
    text = "shared text here"
    n = len(encoder.tokenize_one(text).ids)
    app = create_app(encoder, ServeConfig(model_name=NAME, batch_wait_ms=10_000, max_batch_tokens=3 * n))
    results: dict[str, list] = {}
    barrier = threading.Barrier(3)

    def one(key: str) -> None:
        barrier.wait()
        path = "/embed" if key == "embed" else "/embed_all"
        results[key] = tei(url, path, {"inputs": text, "normalize": False}, key=None).json()

    with running_server(app) as url:
        threads = [threading.Thread(target=one, args=(k,)) for k in ("all-1", "all-2", "embed")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        batcher = app.state.l2v["batcher"]
        assert batcher.batches == 2 and batcher.inputs == 3
    for key in ("all-1", "all-2"):
        np.testing.assert_allclose(np.array(results[key][0]), token_states(encoder, text), atol=1e-5)
    np.testing.assert_allclose(np.array(results["embed"][0]), encoder.encode(text), atol=1e-5)


def test_batcher_per_token_strips_padding_on_either_side(tiny_dir):
    """Per-token results are each input's own tokens, whichever side the batch was padded on (left: a
    last-token encoder), equal to the input run alone; a non-finite one fails its own request only."""
    from l2v.serve import MicroBatcher

    base = Encoder.from_pretrained(tiny_dir, dtype="float32", device="cpu")
    texts = ["one", "a much longer text than the others", "two words"]
    for enc in (base, Encoder(base.model, tiny_tokenizer("left"), pooling="last_token")):
        batcher = MicroBatcher(enc, batch_wait_ms=1)
        try:
            got = batcher.encode_sync([enc.tokenize_one(t) for t in texts], timeout=30, per_token=True)
        finally:
            batcher.stop()
        assert batcher.batches == 1
        for text, states in zip(texts, got, strict=True):
            np.testing.assert_allclose(states.numpy(), token_states(enc, text), atol=1e-5, err_msg=enc.padding_side)
    assert enc.padding_side == "left"

    good = [base.tokenize_one(t) for t in texts[:2]]
    sentinel = max(max(t.ids) for t in good) + 1
    bad = base.tokenize_one("poisoned text")
    bad.ids[0] = sentinel
    states = base.token_states
    base.token_states = lambda batch: states(batch).masked_fill(
        (batch["input_ids"] == sentinel).any(-1)[:, None, None], float("nan"))
    batcher = MicroBatcher(base, batch_wait_ms=500)
    try:
        results = _bad_beside_good(batcher, good, bad, per_token=True)
    finally:
        del base.token_states
    assert isinstance(results["bad"], FloatingPointError), results["bad"]
    assert batcher.batches == 1 and not isinstance(results["good"], Exception), results["good"]
    for text, states in zip(texts[:2], results["good"], strict=True):
        np.testing.assert_allclose(states.numpy(), token_states(base, text), atol=1e-5)


# ------------------------------------------------------------------------------ TEI: tokenize and decode
def spans_of(source: str, tokens: list[dict]) -> list[str]:
    """Each non-special token's [start, stop) as UTF-8 byte offsets into ``source``, decoded."""
    raw = source.encode("utf-8")
    return [raw[t["start"]:t["stop"]].decode("utf-8") for t in tokens if not t["special"]]


def test_tei_tokenize(server, encoder):
    """/tokenize lists the ids the encoder runs, each with its text and UTF-8 byte offsets into the input (as
    TEI), one list per input (a single string too), with no length limit: it is how clients count tokens."""
    url = server[0]
    texts = ["The quick brown fox", "café au lait ☕!"]
    r = tei(url, "/tokenize", {"inputs": texts})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == 2
    for text, tokens in zip(texts, got, strict=True):
        assert [t["id"] for t in tokens] == encoder.tokenize_one(text).ids
        assert all(set(t) == {"id", "text", "special", "start", "stop"} and not t["special"] for t in tokens)
        assert spans_of(text, tokens) == [t["text"] for t in tokens]
        assert tokens[-1]["stop"] == len(text.encode("utf-8"))
    assert got[1][-1]["start"] == len("café au lait ☕".encode()) == 17  # bytes, not the 14 characters
    assert tei(url, "/tokenize", {"inputs": texts[0]}).json() == got[:1]
    long = "word " * 50  # beyond max_input_tokens=32: counted, not refused or truncated
    r = tei(url, "/tokenize", {"inputs": long, "truncate": True})
    assert r.status_code == 200 and len(r.json()[0]) == len(encoder.tokenizer(long)["input_ids"]) > 32


def test_tei_tokenize_with_an_instruction(server, encoder):
    """With prompt_name (or instruction) the instruction's tokens come first, as the model runs them, and offsets
    index the instruction followed by the input, as TEI's index the prompt followed by the input."""
    text = "how much protein"
    for extra, instruction in [({"prompt_name": "query"}, QUERY), ({"instruction": OTHER}, OTHER),
                               ({"prompt_name": "document"}, None)]:
        tokens = tei(server[0], "/tokenize", {"inputs": [text], **extra}).json()[0]
        assert [t["id"] for t in tokens] == encoder.tokenize_one(text, instruction).ids, extra
        source = (instruction or "") + text
        assert spans_of(source, tokens) == [t["text"] for t in tokens]
        assert "".join(t["text"] for t in tokens) == source


def test_tei_tokenize_special_tokens_and_embed_all_agree(tiny_dir):
    """The special tokens the encoder adds (here the EOS of last-token pooling) are listed with special: true and
    null offsets, left out with add_special_tokens: false; /embed_all answers one vector per listed token."""
    base = Encoder.from_pretrained(tiny_dir, dtype="float32", device="cpu")
    enc = Encoder(base.model, tiny_tokenizer("left"), pooling="last_token")
    text = "The quick brown fox"
    with running_server(create_app(enc, ServeConfig(model_name=NAME, batch_wait_ms=1))) as url:
        tokens = tei(url, "/tokenize", {"inputs": text}, key=None).json()[0]
        plain = tei(url, "/tokenize", {"inputs": text, "add_special_tokens": False}, key=None).json()[0]
        states = tei(url, "/embed_all", {"inputs": text}, key=None).json()[0]
    assert tokens[-1] == {"id": enc.tokenizer.eos_token_id, "text": "</s>", "special": True, "start": None,
                          "stop": None}
    assert plain == tokens[:-1] and not any(t["special"] for t in plain)
    assert len(states) == len(tokens)
    np.testing.assert_allclose(np.array(states), token_states(enc, text), atol=1e-5)


def test_tei_decode(server, encoder):
    """/decode: one string per array of ids, a list even for a single array (TEI's answer); special tokens are
    skipped unless skip_special_tokens is false."""
    url = server[0]
    texts = ["The quick brown fox", "café au lait ☕!"]
    ids = [encoder.tokenize_one(t).ids for t in texts]
    r = tei(url, "/decode", {"ids": ids})
    assert r.status_code == 200 and r.json() == texts, r.text
    assert tei(url, "/decode", {"ids": ids[0]}).json() == texts[:1]
    bos, eos = encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id
    assert tei(url, "/decode", {"ids": [bos, *ids[0], eos]}).json() == texts[:1]
    assert tei(url, "/decode", {"ids": [bos, *ids[0], eos], "skip_special_tokens": False}).json() == [
        f"<s>{texts[0]}</s>"]


@pytest.mark.parametrize("path,body,status,error_type,needle", [
    ("/tokenize", b"{}", 422, "Validation", "missing required field 'inputs'"),
    ("/tokenize", b'{"inputs": []}', 400, "Empty", "inputs must not be an empty array"),
    ("/tokenize", b'{"inputs": ""}', 400, "Empty", "inputs is an empty string"),
    ("/tokenize", b'{"inputs": ["ok", 3]}', 422, "Validation", "inputs[1] must be a string"),
    ("/tokenize", b'{"inputs": "a", "add_special_tokens": "no"}', 422, "Validation",
     "add_special_tokens must be a boolean, got a string"),
    ("/tokenize", b'{"inputs": "a", "prompt_name": "passage"}', 422, "Validation", "unknown prompt_name 'passage'"),
    ("/tokenize", json.dumps({"inputs": ["x"] * 9}).encode(), 422, "Validation", "max_inputs=8"),
    ("/tokenize", json.dumps({"inputs": "x" * 30_000}).encode(), 413, "Validation", "max_body_bytes=20000"),
    ("/decode", b"{not json", 422, "Validation", "not valid JSON"),
    ("/decode", b"{}", 422, "Validation", "missing required field 'ids'"),
    ("/decode", b'{"inputs": "a"}', 422, "Validation", "missing required field 'ids'"),
    ("/decode", b'{"ids": "abc"}', 422, "Validation", "ids must be an array of token ids or an array of such"),
    ("/decode", b'{"ids": []}', 400, "Empty", "ids must not be an empty array"),
    ("/decode", b'{"ids": [[1], []]}', 400, "Empty", "ids[1] must not be an empty array"),
    ("/decode", b'{"ids": [68, -1]}', 422, "Validation", "ids[1] must be a token id, an integer in [0, 320), got -1"),
    ("/decode", b'{"ids": [68, 320]}', 422, "Validation", "ids[1] must be a token id, an integer in [0, 320), got 320"),
    ("/decode", b'{"ids": [[68], [68, "x"]]}', 422, "Validation", "ids[1][1] must be a token id, an integer in "
                                                                "[0, 320), got a string"),
    ("/decode", b'{"ids": [68, true]}', 422, "Validation", "ids[1] must be a token id, an integer in [0, 320), got "
                                                         "a boolean"),
    ("/decode", b'{"ids": [68, 2.5]}', 422, "Validation", "got a number"),
    ("/decode", b'{"ids": [68, [69]]}', 422, "Validation", "ids[1] must be a token id, an integer in [0, 320), got "
                                                         "an array"),
    ("/decode", b'{"ids": [68], "skip_special_tokens": 1}', 422, "Validation", "skip_special_tokens must be a boolean"),
    ("/decode", json.dumps({"ids": [[68]] * 9}).encode(), 422, "Validation", "max_inputs=8"),
])
def test_tei_tokenize_and_decode_errors(server, path, body, status, error_type, needle):
    r = tei(server[0], path, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == error_type, r.json()
    assert needle in r.json()["error"], r.json()
