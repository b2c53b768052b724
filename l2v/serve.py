"""An OpenAI-compatible embedding server: ``POST /v1/embeddings``, ``GET /v1/models[/{id}]``, ``GET /health``;
and Hugging Face text-embeddings-inference's (TEI) ``POST /embed``, ``POST /``, ``POST /embed_all`` (per-token
states), ``POST /tokenize``, ``POST /decode`` and ``GET /info``.

Requests are tokenised in the request handler (so per-input limits are answered at once) and handed to one
:class:`MicroBatcher` thread that owns the model: it collects work from concurrent requests for up to
``batch_wait_ms`` or until ``max_batch_tokens`` padded tokens are queued, sorts it by length, runs the forward
passes and wakes each request. Under concurrency the model therefore sees large length-sorted batches, as in an
offline ``Encoder.encode``. ``/embed_all``'s per-token work goes through it too.

Instructions (LLM2Vec puts one on queries, none on documents): a request picks one with the extra body field
``prompt_name`` (a name from ``ServeConfig.prompts``, as in sentence-transformers and TEI) or ``instruction`` (the
text), not both; otherwise ``ServeConfig.instruction`` applies. An empty one means none. Only the text's tokens are
pooled; ``usage.prompt_tokens`` counts every token the model ran (special tokens and the instruction included).

Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` and OpenAI's status for an invalid
request, 400 (the openai client's ``BadRequestError``); a limit that is exceeded is a 413 named in the message
(``max_body_bytes``, ``max_inputs``, ``max_input_tokens``). The TEI routes answer the same errors in TEI's shape
and statuses, ``{"error": "...", "error_type": "Validation"}`` (see :func:`tei_error`), so TEI clients
(huggingface_hub's ``InferenceClient.feature_extraction``, LangChain's ``HuggingFaceEndpointEmbeddings``) work
unchanged; both APIs share the auth, limits, tokenisation and micro-batcher.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' string annotations here
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import __version__
from .encoder import Encoder, Tokenized

API_KEY_ENV = "L2V_API_KEY"


@dataclass
class ServeConfig:
    """Server settings; every limit is reported by name when a request exceeds it."""

    model_name: str = "l2v"
    api_key: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    max_inputs: int = 2048
    max_input_tokens: int | None = None  # default: the encoder's max_length budget
    max_batch_tokens: int = 16384  # padded tokens per forward pass
    max_batch_size: int = 128
    batch_wait_ms: float = 5.0
    max_queued_inputs: int = 16384  # beyond this the server answers 503 instead of queueing without bound
    normalize: bool = True  # OpenAI embeddings are unit length
    instruction: str | None = None  # for requests that choose none (LLM2Vec: the query instruction)
    prompts: dict[str, str] = field(default_factory=dict)  # name -> instruction, chosen by a request's prompt_name

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_batch_tokens", "max_batch_size", "max_queued_inputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_input_tokens is not None and (not isinstance(self.max_input_tokens, int)
                                                  or self.max_input_tokens < 1):
            raise ValueError(f"max_input_tokens must be a positive integer, got {self.max_input_tokens!r}.")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}.")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None.")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction):
            raise ValueError(f"instruction must be a non-empty string or None, got {self.instruction!r}.")
        if not isinstance(self.prompts, dict):
            raise ValueError(f"prompts must be a dict of name -> instruction, got {type(self.prompts).__name__}.")
        for name, text in self.prompts.items():
            if not isinstance(name, str) or not name or not isinstance(text, str):
                raise ValueError(f"prompts: expected a non-empty name and a string instruction (empty: none), got "
                                 f"{name!r}: {text!r}.")


class APIError(Exception):
    """An error answered to the client as ``{"error": ...}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def tei_error(exc: APIError) -> tuple[int, dict[str, str]]:
    """TEI's status and body for an error: ``ErrorType`` and its status as TEI's router maps them (Empty 400,
    Validation 422, Overloaded 429, Backend 424, Unhealthy 503), a body over the limit 413 as TEI's body limit.
    TEI answers a bad API key with a bare 401; here it keeps its message, with error_type "Unauthorized"."""
    if exc.status == 401:
        status, kind = 401, "Unauthorized"
    elif exc.code == "overloaded":
        status, kind = 429, "Overloaded"
    elif exc.code in ("shutting_down", "starting"):
        status, kind = 503, "Unhealthy"
    elif exc.status >= 500:  # the model failed (non-finite output, an exception in the forward pass)
        status, kind = 424, "Backend"
    elif exc.code == "max_body_bytes":
        status, kind = 413, "Validation"
    elif exc.code == "empty":
        status, kind = 400, "Empty"
    elif exc.status in (404, 405):  # routing: no such path or method
        status, kind = exc.status, "Validation"
    else:  # invalid requests and per-request limits (max_inputs, max_input_tokens): TEI's Validation
        status, kind = 422, "Validation"
    return status, {"error": exc.message, "error_type": kind}


# ---------------------------------------------------------------------------------------------- batching
def _shutting_down() -> APIError:
    return APIError(503, "server is shutting down; retry.", code="shutting_down", type_="server_error")


@dataclass
class _Job:
    items: list[Tokenized]
    loop: asyncio.AbstractEventLoop | None
    future: Any  # asyncio.Future (server) or concurrent.futures.Future (direct use)
    per_token: bool = False  # the last hidden state of every token (TEI's /embed_all), not the pooled vector
    result: torch.Tensor | list[torch.Tensor] | None = None
    tokens: int = 0
    error: BaseException | None = None  # one of its inputs failed; the other jobs of the batch still succeed


class MicroBatcher:
    """One worker thread that owns the encoder and batches tokenised inputs across concurrent requests."""

    def __init__(self, encoder: Encoder, max_batch_tokens: int = 16384, max_batch_size: int = 128,
                 batch_wait_ms: float = 5.0, max_queued_inputs: int = 16384) -> None:
        self.encoder = encoder.eval()  # the server owns it: no dropout, whatever mode it was handed in
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_ms / 1000.0
        self.max_queued_inputs = max_queued_inputs
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="l2v-batcher", daemon=True)
        self._stopped = False
        self.batches = 0  # forward passes run (for tests and /health)
        self.inputs = 0
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, items: list[Tokenized], loop: asyncio.AbstractEventLoop,
               per_token: bool = False) -> asyncio.Future:
        """Queue tokenised inputs; the returned future resolves to a float32 (n, dim) CPU tensor, or with
        ``per_token`` to a list of float32 (len(ids), dim) tensors: the hidden state of each of an input's tokens."""
        future = loop.create_future()
        self._put(_Job(items=items, loop=loop, future=future, per_token=per_token))
        return future

    def encode_sync(self, items: list[Tokenized], timeout: float | None = None,
                    per_token: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Blocking variant of :meth:`submit` for callers without an event loop."""
        import concurrent.futures

        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(_Job(items=items, loop=None, future=future, per_token=per_token))
        return future.result(timeout)

    def _put(self, job: _Job) -> None:
        job.tokens = sum(len(t.ids) for t in job.items)
        # Checked and queued under one lock: a stop() in between would queue the job behind the stop marker,
        # where the exited worker never answers it.
        with self._lock:
            if self._stopped:
                raise _shutting_down()
            if self._queued + len(job.items) > self.max_queued_inputs:
                raise APIError(503, f"server busy: more than max_queued_inputs={self.max_queued_inputs} inputs "
                                    "are waiting; retry later.", code="overloaded", type_="server_error")
            self._queued += len(job.items)
            self._queue.put(job)  # unbounded: never blocks while holding the lock

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work (503), let the worker finish what is queued, then fail anything it left behind."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():  # else the worker is mid-batch and still owns the queue
            self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                with self._lock:
                    self._queued -= len(job.items)
                self._finish(job, _shutting_down())

    # --------------------------------------------------------------------------------- worker thread
    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, tokens = [first], first.tokens
        deadline = time.monotonic() + self.wait_s
        while tokens < self.max_batch_tokens:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            tokens += job.tokens
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            try:
                self._process(jobs)
            except BaseException as exc:  # noqa: BLE001 - every waiting request must be woken
                for job in jobs:
                    self._finish(job, exc)
            finally:
                with self._lock:
                    self._queued -= sum(len(j.items) for j in jobs)

    def _process(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.result = ([torch.empty(0)] * len(job.items) if job.per_token
                          else torch.empty((len(job.items), self.encoder.dim), dtype=torch.float32))
        # Pooled and per-token inputs take separate forward passes: Encoder.forward pools inside, so sharing one
        # would mean re-implementing it here; a collection holding both kinds costs at most one more pass.
        for per_token in (False, True):
            flat = [(j, i, t) for j in jobs if j.per_token == per_token for i, t in enumerate(j.items)]
            flat.sort(key=lambda x: -len(x[2].ids))
            self._run_chunks(flat, per_token)
        for job in jobs:
            self._finish(job, job.error)

    def _run_chunks(self, flat: list[tuple[_Job, int, Tokenized]], per_token: bool) -> None:
        """Forward passes over length-sorted inputs, at most ``max_batch_tokens`` padded tokens each."""
        start = 0
        left = self.encoder.padding_side == "left"
        with torch.inference_mode():
            while start < len(flat):
                longest = len(flat[start][2].ids)
                n = max(1, min(self.max_batch_size, self.max_batch_tokens // max(longest, 1)))
                chunk = flat[start:start + n]
                batch = self.encoder.collate([t for _, _, t in chunk])
                if per_token:
                    hidden = self.encoder.token_states(batch).float().cpu()
                    for row, (job, i, t) in enumerate(chunk):  # each input's own tokens, without the padding
                        offset = hidden.shape[1] - len(t.ids) if left else 0
                        self._store(job, i, hidden[row, offset:offset + len(t.ids)].clone())
                else:
                    emb = self.encoder.forward(batch).float().cpu()
                    for row, (job, i, _) in enumerate(chunk):
                        self._store(job, i, emb[row])
                self.batches += 1
                self.inputs += len(chunk)
                start += n

    def _store(self, job: _Job, i: int, value: torch.Tensor) -> None:
        """Input ``i``'s result; checked on its own, so a NaN fails its own request only, not the batch's others."""
        if bool(torch.isfinite(value).all()):
            job.result[i] = value
        elif job.error is None:
            try:
                self.encoder.checked(value)
            except FloatingPointError as exc:
                job.error = exc

    @staticmethod
    def _finish(job: _Job, exc: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(job.result)

        if job.loop is None:
            settle()
        elif not job.loop.is_closed():
            job.loop.call_soon_threadsafe(settle)


# ------------------------------------------------------------------------------------------ validation
def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{where} must be a string, got {_json_type(value)}.", param=where)
    if not value:  # as OpenAI and TEI refuse it: its vector would be the special tokens', the same for every ""
        raise APIError(400, f"{where} is an empty string; every input must contain text.", param=where,
                       code="empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{where} is not valid Unicode (lone surrogate at character {exc.start}).",
                       param=where) from exc
    return value


def _resolve_instruction(data: dict[str, Any], cfg: ServeConfig) -> str | None:
    """The request's ``prompt_name`` or ``instruction`` (one of them), else the server's default; ``""`` is none,
    so a request can opt out of a default (documents, when the default is a query instruction)."""
    name, text = data.get("prompt_name"), data.get("instruction")
    if name is not None and text is not None:
        raise APIError(400, "send 'prompt_name' or 'instruction', not both.", param="prompt_name")
    if name is not None:
        if not isinstance(name, str):
            raise APIError(400, f"prompt_name must be a string, got {_json_type(name)}.", param="prompt_name")
        if name not in cfg.prompts:
            known = (", ".join(repr(n) for n in cfg.prompts) if cfg.prompts
                     else "none (start it with --prompt NAME=TEXT, or send 'instruction')")
            raise APIError(400, f"unknown prompt_name {name[:60]!r}; this server's prompts: {known}.",
                           param="prompt_name", code="unknown_prompt_name")
        return cfg.prompts[name] or None
    if text is not None:
        if not isinstance(text, str):
            raise APIError(400, f"instruction must be a string, got {_json_type(text)}.", param="instruction")
        if text:
            _check_text(text, "instruction")
        return text or None
    return cfg.instruction


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past Python's digit limit
        raise APIError(400, f"request body is not valid JSON ({exc}).", code="invalid_json") from exc
    except RecursionError as exc:  # json parses nesting recursively: '[[[[...' within the body limit
        raise APIError(400, "request body is not valid JSON (nested too deeply).", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_type(data)}.")
    return data


def _parse_texts(data: dict[str, Any], key: str, cfg: ServeConfig, ids_hint: str) -> list[str]:
    """``data[key]``: a string or a non-empty array of at most ``max_inputs`` strings. Token ids are refused:
    OpenAI clients send tiktoken ids (OpenAI's vocabulary, meaningless here), and the instruction is tokenised
    with the text, so ids could not carry one."""
    if key not in data:
        raise APIError(400, f"missing required field '{key}' (a string or an array of strings).", param=key)
    raw = data[key]
    if isinstance(raw, str):
        return [_check_text(raw, key)]
    if not isinstance(raw, list):
        raise APIError(400, f"{key} must be a string or an array of strings, got {_json_type(raw)}.", param=key)
    if not raw:
        raise APIError(400, f"{key} must not be an empty array.", param=key, code="empty")
    if len(raw) > cfg.max_inputs:
        raise APIError(413, f"{key} has {len(raw)} items; the limit is max_inputs={cfg.max_inputs}.",
                       param=key, code="max_inputs")
    pair = next((i for i, x in enumerate(raw) if isinstance(x, list) and x and all(isinstance(y, str) for y in x)),
                None)
    if pair is not None:  # the library's (instruction, text) pairs: say how the API takes an instruction instead
        raise APIError(400, f"{key}[{pair}] is an array of strings; {key} takes strings only. For an "
                       "(instruction, text) pair send the text and put the instruction in the request's "
                       "'instruction' field (or name a server prompt with 'prompt_name').", param=key)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or any(isinstance(x, list) for x in raw):
        raise APIError(400, f"token-id input is not supported; send a string or an array of strings{ids_hint}.",
                       param=key)
    return [_check_text(x, f"{key}[{i}]") for i, x in enumerate(raw)]


def _parse_dimensions(data: dict[str, Any], dim: int) -> int | None:
    dims = data.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= dim):
        raise APIError(400, f"dimensions must be an integer in [1, {dim}], got {dims!r}.", param="dimensions")
    return dims


def parse_request(body: bytes, cfg: ServeConfig, dim: int) -> dict[str, Any]:
    """Validate an embeddings request body into ``texts``, ``instruction``, ``encoding_format``, ``dimensions``."""
    data = _load_object(body)
    # LangChain's OpenAIEmbeddings sends tiktoken ids by default
    texts = _parse_texts(data, "input", cfg, " (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False) "
                                             "sends the texts)")
    fmt = data.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}.", param="encoding_format")
    dims = _parse_dimensions(data, dim)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {_json_type(model)}.", param="model")
    if model not in (None, cfg.model_name):
        raise APIError(404, f"model {model!r} is not served here; this server serves {cfg.model_name!r}.",
                       param="model", code="model_not_found")
    return {"texts": texts, "instruction": _resolve_instruction(data, cfg), "encoding_format": fmt,
            "dimensions": dims}


def _parse_bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"{name} must be a boolean, got {_json_type(value)}.", param=name)
    return default if value is None else value


def parse_tei_request(body: bytes, cfg: ServeConfig, dim: int | None) -> dict[str, Any]:
    """Validate a TEI ``/embed`` body (``inputs``, ``normalize``, ``truncate``, ``truncation_direction``,
    ``prompt_name``, ``dimensions``; l2v's ``instruction`` too) into ``texts``, ``instruction``, ``normalize``,
    ``truncate`` (None: an over-long input is an error; else the side that is cut) and ``dimensions``. Fields
    TEI does not read are ignored, as TEI does (huggingface_hub may send ``encoding_format``). ``dim=None``:
    ``/embed_all``, which has neither ``normalize`` nor ``dimensions`` in TEI (its token states are raw)."""
    data = _load_object(body)
    texts = _parse_texts(data, "inputs", cfg, "")
    truncate = _parse_bool(data, "truncate", False)
    side = data.get("truncation_direction")
    if side is None:
        side = "right"
    if side not in ("right", "left", "Right", "Left"):  # TEI's spellings
        raise APIError(400, f"truncation_direction must be 'right' or 'left', got {side!r}.",
                       param="truncation_direction")
    req = {"texts": texts, "instruction": _resolve_instruction(data, cfg),
           "truncate": side.lower() if truncate else None}
    if dim is not None:
        req.update(normalize=_parse_bool(data, "normalize", cfg.normalize), dimensions=_parse_dimensions(data, dim))
    return req


def parse_tokenize_request(body: bytes, cfg: ServeConfig) -> dict[str, Any]:
    """Validate a TEI ``/tokenize`` body (``inputs``, ``add_special_tokens``, ``prompt_name``; l2v's
    ``instruction`` too) into ``texts``, ``add_special_tokens`` and ``instruction``."""
    data = _load_object(body)
    return {"texts": _parse_texts(data, "inputs", cfg, ""), "instruction": _resolve_instruction(data, cfg),
            "add_special_tokens": _parse_bool(data, "add_special_tokens", True)}


def parse_decode_request(body: bytes, cfg: ServeConfig, vocab_size: int) -> dict[str, Any]:
    """Validate a TEI ``/decode`` body (``ids``: one array of token ids or an array of them, at most
    ``max_inputs``; ``skip_special_tokens``) into ``ids`` (always a list of sequences) and ``skip_special_tokens``.
    An id outside the vocabulary is refused by name: the tokenizer would silently drop it (or fail, if negative)."""
    data = _load_object(body)
    what = "an array of token ids or an array of such arrays"
    if "ids" not in data:
        raise APIError(400, f"missing required field 'ids' ({what}).", param="ids")
    raw = data["ids"]
    if not isinstance(raw, list):
        raise APIError(400, f"ids must be {what}, got {_json_type(raw)}.", param="ids")
    if not raw:
        raise APIError(400, "ids must not be an empty array.", param="ids", code="empty")
    nested = all(isinstance(x, list) for x in raw)
    if nested and len(raw) > cfg.max_inputs:
        raise APIError(413, f"ids has {len(raw)} arrays; the limit is max_inputs={cfg.max_inputs}.", param="ids",
                       code="max_inputs")
    seqs = raw if nested else [raw]
    for i, seq in enumerate(seqs):
        where = f"ids[{i}]" if nested else "ids"
        if not seq:
            raise APIError(400, f"{where} must not be an empty array.", param=where, code="empty")
        for j, x in enumerate(seq):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < vocab_size:
                got = f"{x}" if isinstance(x, int) and not isinstance(x, bool) else _json_type(x)
                raise APIError(400, f"{where}[{j}] must be a token id, an integer in [0, {vocab_size}), got {got}.",
                               param=where)
    return {"ids": seqs, "skip_special_tokens": _parse_bool(data, "skip_special_tokens", True)}


def _utf8_offsets(text: str) -> np.ndarray:
    """The UTF-8 byte offset of each character index of ``text`` (one more entry than characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    sizes = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)])


def tei_tokens(tokenizer: Any, texts: list[str], instruction: str | None, prefix: list[int], suffix: list[int],
               ) -> list[list[dict[str, Any]]]:
    """TEI's ``/tokenize`` answer: per text, ``[prefix] instruction text [suffix]`` as the encoder assembles them
    (the instruction and the text tokenised apart), each token ``{id, text, special, start, stop}``. As in TEI,
    where the prompt is prepended to the input, ``start``/``stop`` are UTF-8 byte offsets into the instruction
    followed by the text (into the text alone without one) and ``text`` is that span; the special tokens the
    encoder adds have their token string and null offsets. A slow (Python) tokenizer has no offsets: every token
    then gets its token string and null offsets."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    pieces = [instruction, *texts] if instruction else texts
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=fast)
    all_ids: list[list[int]] = enc["input_ids"]
    spans = enc["offset_mapping"] if fast else [None] * len(pieces)
    instr_ids, instr_spans = (all_ids[0], spans[0]) if instruction else ([], [])
    shift = len(instruction or "")
    names = {}
    for ids in (prefix, suffix, *([] if fast else all_ids)):
        names.update(zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True))

    def special(ids: list[int]) -> list[dict[str, Any]]:
        return [{"id": i, "text": names[i], "special": True, "start": None, "stop": None} for i in ids]

    out = []
    for ids, span, text in zip(all_ids[len(all_ids) - len(texts):], spans[len(spans) - len(texts):], texts,
                               strict=True):
        source = (instruction or "") + text
        tokens = special(prefix)
        if span is None:
            tokens += [{"id": i, "text": names[i], "special": False, "start": None, "stop": None}
                       for i in instr_ids + ids]
        else:
            at = range(len(source) + 1) if source.isascii() else _utf8_offsets(source).tolist()
            for i, (a, b) in zip(instr_ids + ids, instr_spans + [(a + shift, b + shift) for a, b in span],
                                 strict=True):
                tokens.append({"id": i, "text": source[a:b], "special": False, "start": at[a], "stop": at[b]})
        out.append(tokens + special(suffix))
    return out


def format_embeddings(vectors: torch.Tensor, fmt: str, dimensions: int | None, normalize: bool) -> list[Any]:
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    arr = np.ascontiguousarray(vectors.numpy(), dtype="<f4")
    if fmt == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in arr]
    return arr.tolist()


# ------------------------------------------------------------------------------------------------- app
def create_app(encoder: Encoder, config: ServeConfig | None = None):
    """The FastAPI app serving ``encoder``; the micro-batcher starts and stops with the app's lifespan."""
    cfg = config or ServeConfig()
    budget = encoder.max_length
    max_tokens = min(cfg.max_input_tokens or budget, budget)
    # Compare fixed-length digests so neither the key's content nor its length shows in the timing.
    expected_key = hashlib.sha256(cfg.api_key.encode("utf-8")).digest() if cfg.api_key else None
    for name, text in [("--instruction", cfg.instruction), *((f"prompt {n!r}", t) for n, t in cfg.prompts.items())]:
        try:  # a configured instruction that fills max_length would fail every request that uses it
            encoder.tokenize_one("x", text)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    tokenize_lock = threading.Lock()  # HF fast tokenizers are not safe to call from several threads at once
    probe = encoder.tokenize_one("a")  # the special tokens the encoder puts around every text (for /tokenize)
    added = (probe.ids[:probe.start], probe.ids[probe.end:]) if probe.start >= 0 else (probe.ids, [])
    vocab_size = len(encoder.tokenizer)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = MicroBatcher(encoder, cfg.max_batch_tokens, cfg.max_batch_size, cfg.batch_wait_ms,
                                        cfg.max_queued_inputs)
        try:
            yield
        finally:
            state["stopping"] = True
            state.pop("batcher").stop()

    app = FastAPI(title="l2v embeddings", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.l2v = state
    # their errors take TEI's shape and statuses
    tei_paths = {"/embed", "/embed_all", "/tokenize", "/decode", "/info", "/"}

    def error_response(request: Request, exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
        if request.url.path in tei_paths:
            status, body = tei_error(exc)
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Unknown paths (404) and methods (405) in OpenAI's error shape too, not FastAPI's ``{"detail": ...}``."""
        err = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        return error_response(request, err, exc.headers)

    def authorize(request: Request) -> None:
        if expected_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(hashlib.sha256(given).digest(), expected_key):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>').",
                           code="invalid_api_key", type_="authentication_error")

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"invalid Content-Length header {declared[:40]!r}.")
            if int(declared) > limit:
                raise APIError(413, f"request body is {declared} bytes; the limit is max_body_bytes={limit}.",
                               code="max_body_bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds max_body_bytes={limit}.", code="max_body_bytes")
        return bytes(body)

    def tokenize(texts: list[str], instruction: str | None, key: str = "input",
                 truncate: str | None = None) -> list[Tokenized]:
        """Token ids of each text; one longer than ``max_tokens`` is a 413, or with ``truncate`` ("right",
        "left": TEI's truncation_direction) loses that side's tokens beyond it."""
        with tokenize_lock:
            try:  # one batched tokenizer call, the instruction tokenised once (Encoder.tokenize_many)
                items = encoder.tokenize_many(texts, [instruction] * len(texts),
                                              max_text_tokens=max_tokens if truncate is not None else None,
                                              truncation_side=truncate or "right")
            except ValueError as exc:  # a request's instruction that alone fills max_length
                raise APIError(400, str(exc), param="instruction", code="instruction_too_long") from None
            if truncate is not None:
                return items
            for i, (text, item) in enumerate(zip(texts, items, strict=True)):
                n_text = max(item.end - item.start, 0)
                if item.truncated or n_text > max_tokens:
                    where = key if len(texts) == 1 else f"{key}[{i}]"
                    alone = encoder.tokenize_one(text) if instruction and item.truncated else None
                    if alone is not None and not alone.truncated and alone.end - alone.start <= max_tokens:
                        # within max_input_tokens: the instruction took the room it needed
                        raise APIError(413, f"{where} does not fit in max_length={budget} tokens with the "
                                            "instruction; shorten one of them.", param=where,
                                       code="max_input_tokens")
                    raise APIError(413, f"{where} is longer than max_input_tokens={max_tokens} tokens.",
                                   param=where, code="max_input_tokens")
        return items

    async def json_off_loop(make: Callable[[], Any]) -> Response:
        """``make()`` serialised to JSON in the thread pool: a large answer (token states, long token lists)
        would otherwise hold the event loop that every other request waits on."""
        body = await run_in_threadpool(lambda: json.dumps(make(), ensure_ascii=False, separators=(",", ":")))
        return Response(body.encode("utf-8"), media_type="application/json")

    async def encode(items: list[Tokenized], per_token: bool = False) -> Any:
        """The float32 (n, dim) vectors of ``items`` (``per_token``: a (len(ids), dim) tensor per item), from the
        micro-batcher shared by every route."""
        batcher: MicroBatcher | None = state.get("batcher")
        if batcher is None:
            if state.get("stopping"):
                raise _shutting_down()
            raise APIError(503, "server is starting; retry.", code="starting", type_="server_error")
        try:
            return await batcher.submit(items, asyncio.get_running_loop(), per_token)
        except APIError:
            raise
        except Exception as exc:  # a model failure: report it, keep serving
            raise APIError(500, f"encoding failed: {type(exc).__name__}: {exc}"[:500], type_="server_error") from exc

    @app.get("/health")
    @app.get("/")  # TEI's (and the Inference API's) health route
    async def health():
        batcher = state.get("batcher")
        return {"status": "ok" if batcher is not None else "starting", "model": cfg.model_name,
                "dim": encoder.dim, "max_input_tokens": max_tokens, "queued_inputs": batcher.queued if batcher else 0,
                "forward_passes": batcher.batches if batcher else 0, "prompts": list(cfg.prompts),
                "default_instruction": cfg.instruction is not None}

    card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "l2v"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        """OpenAI's retrieve-model call (``client.models.retrieve``), which clients use to check a model exists."""
        authorize(request)
        if model_id != cfg.model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {cfg.model_name!r}.",
                           param="model", code="model_not_found")
        return card

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        body = await read_body(request)
        req = parse_request(body, cfg, encoder.dim)
        items = await run_in_threadpool(tokenize, req["texts"], req["instruction"])
        vectors = await encode(items)
        data = format_embeddings(vectors, req["encoding_format"], req["dimensions"], cfg.normalize)
        n_tokens = sum(len(t.ids) for t in items)  # what the model ran: special tokens and instruction included
        # A JSONResponse, not a dict: FastAPI would first walk every float through jsonable_encoder in Python
        # (about as long again as json.dumps), on the event loop that every other request waits on.
        return JSONResponse({"object": "list", "model": cfg.model_name,
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # ------------------------------------------------------------------------- text-embeddings-inference
    @app.post("/embed")
    @app.post("/")  # TEI's route for an embedding model: huggingface_hub's InferenceClient(url) posts here
    async def tei_embed(request: Request):
        """TEI's ``/embed``: one array of floats per input, even for a single string."""
        authorize(request)
        body = await read_body(request)
        req = parse_tei_request(body, cfg, encoder.dim)
        items = await run_in_threadpool(tokenize, req["texts"], req["instruction"], "inputs", req["truncate"])
        vectors = await encode(items)
        return JSONResponse(format_embeddings(vectors, "float", req["dimensions"], req["normalize"]))

    @app.post("/embed_all")
    async def tei_embed_all(request: Request):
        """TEI's ``/embed_all``: per input, the last hidden state of each token the model ran (special tokens and
        the instruction included, as ``/tokenize`` lists them), unpooled and unnormalised."""
        authorize(request)
        body = await read_body(request)
        req = parse_tei_request(body, cfg, None)
        items = await run_in_threadpool(tokenize, req["texts"], req["instruction"], "inputs", req["truncate"])
        states = await encode(items, per_token=True)
        # tokens x dim floats per input: serialised off the event loop, which every other request waits on
        return await json_off_loop(lambda: [s.numpy().tolist() for s in states])

    @app.post("/tokenize")
    async def tei_tokenize(request: Request):
        """TEI's ``/tokenize``: per input (a single string too), the tokens the model would run, with no length
        limit or truncation (clients use it to count tokens before they embed)."""
        authorize(request)
        req = parse_tokenize_request(await read_body(request), cfg)
        prefix, suffix = added if req["add_special_tokens"] else ([], [])

        def run() -> list[list[dict[str, Any]]]:
            with tokenize_lock:
                return tei_tokens(encoder.tokenizer, req["texts"], req["instruction"], prefix, suffix)

        return await json_off_loop(run)

    @app.post("/decode")
    async def tei_decode(request: Request):
        """TEI's ``/decode``: one string per array of ids (a list even for a single array, as TEI answers)."""
        authorize(request)
        req = parse_decode_request(await read_body(request), cfg, vocab_size)

        def run() -> list[str]:
            with tokenize_lock:
                return encoder.tokenizer.batch_decode(req["ids"], skip_special_tokens=req["skip_special_tokens"])

        return await json_off_loop(run)

    @app.get("/info")
    async def tei_info(request: Request):
        """TEI's ``/info``: its fields that have a meaning here, under TEI's names."""
        authorize(request)
        return {"model_id": cfg.model_name, "model_sha": None, "model_dtype": str(encoder.dtype).removeprefix("torch."),
                "served_model_name": cfg.model_name, "model_type": {"embedding": {"pooling": encoder.pooling}},
                "max_concurrent_requests": cfg.max_queued_inputs,  # TEI's permits are per input too
                "max_input_length": max_tokens, "max_batch_tokens": cfg.max_batch_tokens,
                "max_batch_requests": cfg.max_batch_size, "max_client_batch_size": cfg.max_inputs,
                "auto_truncate": False, "tokenization_workers": 1, "version": __version__, "sha": None,
                "docker_label": None}

    return app


# ------------------------------------------------------------------------------------- running it
def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def serve(encoder: Encoder, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until interrupted (used by ``l2v serve``)."""
    import uvicorn

    uvicorn.run(create_app(encoder, config), host=host, port=port, log_level=log_level, access_log=False)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


__all__ = ["APIError", "MicroBatcher", "ServeConfig", "create_app", "running_server", "serve"]
