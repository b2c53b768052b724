"""Encoder: tokenisation with instructions, padding invariance, ordering, bad input, dtype."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

from l2v import Encoder, make_bidirectional
from l2v.pooling import POOLING_MODES

TEXTS = [
    "short one",
    "a much longer text that has many more tokens than the first one does, by a wide margin",
    "mid length text here",
    "cats",
]


def tiny_encoder(arch: str = "llama", pooling: str = "mean", side: str = "right", bidirectional: bool = True,
                 **kw) -> Encoder:
    net = tiny_model(arch, "sdpa").base_model
    if bidirectional:
        make_bidirectional(net)
    return Encoder(net, tiny_tokenizer(side), pooling=pooling, **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token", "bos"])
def test_padding_invariance_alone_batched_left_right(arch, pooling):
    """A text's vector is the same alone, in a batch with longer texts, and with left or right padding."""
    right = tiny_encoder(arch, pooling, "right")
    left = Encoder(right.model, tiny_tokenizer("left"), pooling=pooling)
    alone = right.encode([TEXTS[0]])[0]
    batched_r = right.encode(TEXTS)
    batched_l = left.encode(TEXTS)
    assert np.abs(alone - batched_r[0]).max() <= 1e-4
    assert np.abs(alone - batched_l[0]).max() <= 1e-4
    assert np.abs(batched_r - batched_l).max() <= 1e-4


def test_output_projection_sets_the_dimension():
    """OPT-350m projects its 1024-wide states to 512 (word_embed_proj_dim): dim is the output's width (it was
    hidden_size, and encode failed with a shape mismatch)."""
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, ffn_dim=64,
                       num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    net = make_bidirectional(tf.AutoModel.from_config(cfg, attn_implementation="sdpa").eval())
    enc = Encoder(net, tiny_tokenizer())
    assert enc.dim == 16
    out = enc.encode(TEXTS)
    assert out.shape == (4, 16)
    enc.packing = False
    np.testing.assert_allclose(enc.encode(TEXTS), out, atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS[1]), out[1], atol=1e-5)


def test_batch_order_and_sizes_do_not_matter():
    enc = tiny_encoder()
    ref = enc.encode(TEXTS, batch_size=len(TEXTS))
    for bs in (1, 3):
        np.testing.assert_allclose(enc.encode(TEXTS, batch_size=bs), ref, atol=1e-5)
    perm = [2, 0, 3, 1]
    np.testing.assert_allclose(enc.encode([TEXTS[i] for i in perm]), ref[perm], atol=1e-5)


def test_output_types_and_shapes():
    enc = tiny_encoder()
    out = enc.encode(TEXTS)
    assert isinstance(out, np.ndarray) and out.shape == (4, enc.dim) and out.dtype == np.float32
    t = enc.encode(TEXTS, convert_to="torch")
    assert isinstance(t, torch.Tensor) and t.shape == (4, enc.dim)
    single = enc.encode("just one")
    assert single.shape == (enc.dim,)
    assert enc.encode(("a tuple", "of two texts")).shape == (2, enc.dim)  # README: a bare tuple is a sequence
    empty = enc.encode([])
    assert empty.shape == (0, enc.dim)
    normed = enc.encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)


def test_pooled_positions_are_exactly_the_text_tokens():
    enc = tiny_encoder()
    tok = enc.tokenizer
    instr, text = "Represent this sentence for searching:", "The quick brown fox."
    item = enc.tokenize_one(text, instr)
    assert item.ids[item.start:item.end] == tok(text, add_special_tokens=False)["input_ids"]
    assert item.ids[:item.start] == enc._prefix + tok(instr, add_special_tokens=False)["input_ids"]
    batch = enc.collate([item, enc.tokenize_one("x")])
    row = batch["pool_mask"][0]
    assert batch["input_ids"][0][row].tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_instruction_is_not_pooled_and_acts_only_through_attention():
    enc = tiny_encoder("llama")
    text, instr = "The quick brown fox.", "Represent this sentence for searching:"
    plain, with_instr = enc.encode([text])[0], enc.encode([(instr, text)])[0]
    assert np.abs(plain - with_instr).max() > 1e-4, "instruction must change the vector (via attention)"
    # The vector is the mean of the text positions' states: the instruction tokens are not pooled.
    batch = enc.collate([enc.tokenize_one(text, instr)])
    with torch.no_grad():
        states = enc.token_states(batch)[0]
    manual = states[batch["pool_mask"][0]].mean(0).numpy()
    np.testing.assert_allclose(with_instr, manual, atol=1e-5)
    # Block attention to the instruction's keys and give the text the positions it has alone: the vector then
    # equals the instruction-free one, so the instruction influences the result only through attention.
    ids = batch["input_ids"]
    item = enc.tokenize_one(text, instr)
    n_prefix = len(enc._prefix)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[n_prefix:item.start] = False
    mask = torch.zeros((1, 1, ids.shape[1], ids.shape[1]))
    mask[..., ~keep] = torch.finfo(mask.dtype).min
    positions = torch.zeros_like(ids)
    positions[0, keep] = torch.arange(int(keep.sum()))
    with torch.no_grad():
        blocked = enc.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[0]
    np.testing.assert_allclose(blocked[batch["pool_mask"][0]].mean(0).numpy(), plain, atol=1e-5)


def test_any_iterable_of_texts_is_accepted():
    """Iterables that are neither sequences nor iterators (a pandas Series, dict.values()) used to be rejected."""
    enc = tiny_encoder()
    ref = enc.encode(TEXTS)

    class Column:  # iterable only, like a pandas Series
        def __iter__(self):
            return iter(TEXTS)

    np.testing.assert_allclose(enc.encode(Column()), ref, atol=1e-6)
    np.testing.assert_allclose(enc.encode(dict(enumerate(TEXTS)).values()), ref, atol=1e-6)


def test_instruction_argument_and_pairs_agree():
    enc = tiny_encoder()
    a = enc.encode(["cats", "dogs"], instruction="Find pets:")
    b = enc.encode([("Find pets:", "cats"), ["Find pets:", "dogs"]])
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = enc.encode(np.array([["Find pets:", "cats"], ["Find pets:", "dogs"]]))  # rows of a 2-D array are pairs
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_bidirectional_vs_causal_differ():
    bi, causal = tiny_encoder(bidirectional=True), tiny_encoder(bidirectional=False)
    assert bi.bidirectional and not causal.bidirectional
    assert np.abs(bi.encode(TEXTS) - causal.encode(TEXTS)).max() > 1e-4


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (None, TypeError, "got None"),
        (["ok", 3], TypeError, r"sentences\[1\]"),
        (["ok", None], TypeError, r"sentences\[1\]"),
        ([("a", "b", "c")], ValueError, r"sentences\[0\].*2 strings"),
        ([["instr", 5]], TypeError, r"sentences\[0\]"),
        ([["a", ["b"]]], TypeError, r"sentences\[0\]"),
        (42, TypeError, "int"),
        ({"a": 1}, TypeError, "dict"),
    ],
)
def test_bad_input_names_the_problem(bad, exc, match):
    enc = tiny_encoder()
    with pytest.raises(exc, match=match):
        enc.encode(bad)


def test_bad_arguments():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="convert_to"):
        enc.encode(TEXTS, convert_to="list")
    with pytest.raises(TypeError, match="instruction"):
        enc.encode(TEXTS, instruction=3)
    with pytest.raises(ValueError, match="pooling"):
        tiny_encoder(pooling="max")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(TEXTS, batch_size=True)
    # A model with an LM head returns logits: a clear error, not a shape mismatch at the first encode.
    with pytest.raises(TypeError, match="LlamaForCausalLM with a language-model head.*base_model"):
        Encoder(tiny_model("llama"), tiny_tokenizer())


def test_numpy_integer_arguments_are_accepted():
    """Sizes computed with numpy are integers too (they used to be rejected as 'not a positive integer')."""
    enc = tiny_encoder()
    ref = enc.encode(TEXTS, dimensions=8)
    out = enc.encode(TEXTS, batch_size=np.int64(2), max_tokens_per_batch=np.int32(64), dimensions=np.int64(8))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_setting_pooling_after_construction():
    """enc.pooling = ... is validated and behaves like passing it to the constructor (EOS appended for
    last-token pooling); it used to keep the old special tokens and pool the last text token instead."""
    enc = tiny_encoder(pooling="mean")
    enc.pooling = "last_token"
    fresh = Encoder(enc.model, enc.tokenizer, pooling="last_token")
    assert enc._suffix == fresh._suffix == [enc.tokenizer.eos_token_id]
    np.testing.assert_allclose(enc.encode(TEXTS), fresh.encode(TEXTS), atol=1e-6)
    enc.pooling = "mean"
    assert enc._suffix == []
    with pytest.raises(ValueError, match="pooling='max'"):
        enc.pooling = "max"
    assert enc.pooling == "mean"


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_empty_strings_are_encoded(pooling):
    enc = tiny_encoder(pooling=pooling)
    out = enc.encode(["", "not empty", ""])
    assert out.shape == (3, enc.dim) and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)


def test_empty_string_without_special_tokens():
    """A tokenizer that adds no BOS/EOS still yields a defined vector for ''."""
    enc = tiny_encoder("gpt2")
    enc._prefix, enc._suffix = [], []
    out = enc.encode(["", "x"])
    assert np.isfinite(out).all()
    assert np.abs(out[0]).max() > 1e-3  # not the (zeroed) padding embedding
    assert enc.tokenize_one("").ids == [enc.tokenizer.eos_token_id]


def test_overlong_texts_truncated_with_one_warning():
    enc = tiny_encoder(max_length=16)
    long = " ".join(["word"] * 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = enc.encode([long, long + " more", "short"])
    trunc = [w for w in caught if "truncated" in str(w.message)]
    assert len(trunc) == 1 and "2 of 3" in str(trunc[0].message)
    assert all(len(enc.tokenize_one(t).ids) <= 16 for t in (long, long + " more"))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("call", ["encode", "encode_query", "encode_document"])
def test_truncation_warning_points_at_the_callers_line(call):
    """Each entry point warns at the user's line (encode_query's and encode_document's pointed into encoder.py)."""
    enc = tiny_encoder(max_length=16, prompts={"query": "Find:", "document": "Doc:"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        getattr(enc, call)([" ".join(["word"] * 200), "short"])
    [w] = [w for w in caught if "truncated" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line)


def test_tokenize_one_text_cap_and_left_truncation():
    """``max_text_tokens`` caps the text below max_length and ``truncation_side="left"`` keeps its end; the
    instruction is kept whole either way (a server's truncate=true / truncation_direction)."""
    enc = tiny_encoder(max_length=64)
    text, instr = "The quick brown fox jumps over the lazy dog. " * 5, "Represent this sentence:"
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    full = enc.tokenize_one(text, instr)
    for side, kept in [("right", ids[:10]), ("left", ids[-10:])]:
        item = enc.tokenize_one(text, instr, max_text_tokens=10, truncation_side=side)
        assert item.truncated and item.ids[item.start:item.end] == kept
        assert item.ids[:item.start] == full.ids[:full.start]  # specials and instruction untouched
    short = enc.tokenize_one("cats", max_text_tokens=10, truncation_side="left")
    assert not short.truncated and short.ids == enc.tokenize_one("cats").ids
    with pytest.raises(ValueError, match="truncation_side"):
        enc.tokenize_one("cats", truncation_side="middle")
    with pytest.raises(ValueError, match="max_text_tokens"):
        enc.tokenize_one("cats", max_text_tokens=0)


def test_instruction_longer_than_max_length_is_an_error():
    enc = tiny_encoder(max_length=8)
    with pytest.raises(ValueError, match="instruction"):
        enc.encode([("word " * 50, "text")])


def test_non_finite_embeddings_are_an_error_naming_the_dtype():
    enc = tiny_encoder().half()
    with torch.no_grad():  # an fp16 overflow in the MLP, as some models hit in fp16
        for proj in (enc.model.layers[0].mlp.up_proj, enc.model.layers[0].mlp.down_proj):
            proj.weight.fill_(6e4)
    with pytest.raises(FloatingPointError, match=r"non-finite.*torch.float16.*dtype='float32'"):
        enc.encode(TEXTS)
    enc = tiny_encoder()
    with torch.no_grad():
        enc.model.norm.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite.*float32.*weights"):
        enc.encode(TEXTS)
    from l2v.serve import MicroBatcher

    batcher = MicroBatcher(enc, batch_wait_ms=1)
    try:
        with pytest.raises(FloatingPointError, match="non-finite"):
            batcher.encode_sync([enc.tokenize_one(t) for t in TEXTS], timeout=30)
    finally:
        batcher.stop()


def test_similarity_matrix():
    enc = tiny_encoder()
    v = enc.encode(TEXTS)
    sim = enc.similarity(v)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)


def test_similarity_accepts_any_tensor_and_checks_shapes():
    """Tensors that need grad or are bf16 work (they used to fail inside numpy); mismatched sizes are named."""
    enc = tiny_encoder()
    v = enc.encode(TEXTS, convert_to="torch")
    ref = enc.similarity(v)
    np.testing.assert_allclose(enc.similarity(v.clone().requires_grad_()), ref, atol=1e-6)
    np.testing.assert_allclose(enc.similarity(v.bfloat16(), v), ref, atol=2e-2)
    assert enc.similarity(v[0], v).shape == (1, 4)
    with pytest.raises(ValueError, match="dimension 32 but b has 8"):
        enc.similarity(v, v[:, :8])
    with pytest.raises(ValueError, match="shape"):
        enc.similarity(v[None])


def test_save_and_reload_roundtrip(tmp_path):
    enc = tiny_encoder("qwen3", pooling="weighted_mean", max_length=64)
    enc.base_model = "tiny-qwen3"
    enc.save_pretrained(tmp_path / "enc")
    back = Encoder.from_pretrained(tmp_path / "enc", dtype="float32", device="cpu")
    assert back.pooling == "weighted_mean" and back.max_length == 64 and back.bidirectional
    np.testing.assert_allclose(back.encode(TEXTS), enc.encode(TEXTS), atol=1e-5)


def test_sliding_window_text_packed_equals_padded_and_window_saved(tmp_path):
    """A text longer than Mistral's sliding window (64 in the tiny config) gets full attention on both paths: the
    padded path kept the window (transformers' bidirectional sliding mask) while packing did not, so CPU and GPU
    vectors differed. The saved config keeps the model's own window."""
    import json

    enc = tiny_encoder("mistral")
    texts = [TEXTS[1] * 3, TEXTS[0]]
    assert len(enc.tokenize_one(texts[0]).ids) > 2 * 64
    enc.packing = True
    packed = enc.encode(texts)
    enc.packing = False
    np.testing.assert_allclose(enc.encode(texts), packed, atol=1e-5)
    enc.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["sliding_window"] == 64
    assert enc.model.config.is_causal is False and enc.bidirectional


def test_from_pretrained_local_dir_and_causal_flag(tmp_path):
    from tiny import save_tiny

    path = save_tiny("mistral", tmp_path / "m")
    enc = Encoder.from_pretrained(path, dtype="float32", device="cpu")
    assert enc.bidirectional and enc.dtype == torch.float32
    causal = Encoder.from_pretrained(path, dtype="float32", device="cpu", bidirectional=False)
    assert not causal.bidirectional
    assert np.abs(enc.encode(TEXTS) - causal.encode(TEXTS)).max() > 1e-4


def test_from_pretrained_bad_arguments_fail_before_loading(tmp_path, monkeypatch):
    """pooling / max_length / device are checked before any weights load; 0 and "" are errors, not defaults."""
    import transformers
    from tiny import save_tiny

    path = save_tiny("llama", tmp_path / "m")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_loading)
    for kwargs, match in [({"pooling": "cls"}, "pooling='cls'"), ({"pooling": ""}, "pooling=''"),
                          ({"pooling": ["mean"]}, "pooling="), ({"max_length": 0}, "max_length"),
                          ({"max_length": 2.5}, "max_length"), ({"device": "gpu"}, "device='gpu'")]:
        with pytest.raises(ValueError, match=match):
            Encoder.from_pretrained(path, dtype="float32", **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Encoder.from_pretrained(path, device="cuda")


def test_dtype_resolution():
    from l2v.encoder import cpu_supports_bf16, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype(None, cpu) == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", cpu)


def test_auto_dtype_on_cuda_is_bf16_only_where_native(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a T4/V100 (emulated bf16); 'auto' must pick fp16 there, and ask
    about the device given (cuda:1), not the current one. Simulated: no GPU is needed."""
    from l2v.encoder import resolve_dtype

    capability = {0: (7, 5), 1: (8, 0)}  # a T4 as cuda:0, an A100 as cuda:1
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device])
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16  # the current device, cuda:0
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cuda:0")) == torch.bfloat16  # asked for explicitly


# ---------------------------------------------------------------- the bf16 CPU kernel (l2v.kernels)
def _kernel_available() -> bool:
    from l2v.kernels import kernel_status

    return kernel_status()[0]


needs_kernel = pytest.mark.skipif(not _kernel_available(), reason="l2v's bf16 CPU kernel is unavailable here")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@needs_kernel
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cpu_kernel_encoder_tracks_fp32(arch, tmp_path):
    """bf16 on CPU runs every linear layer through the kernel (fp32 activations) and stays close to fp32."""
    from tiny import save_tiny

    path = save_tiny(arch, tmp_path / arch)
    fast = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")
    full = Encoder.from_pretrained(path, dtype="float32", device="cpu")
    assert fast.cpu_kernel and fast.dtype == torch.bfloat16 and not full.cpu_kernel
    texts = [t for t in TEXTS if t]
    assert _cos(fast.encode(texts), full.encode(texts)).min() >= 0.999


@needs_kernel
def test_cpu_kernel_packed_padded_save_and_reload(tmp_path):
    from tiny import save_tiny

    path = save_tiny("llama", tmp_path / "m")
    enc = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")
    assert enc.uses_packing()  # the packing probe accepts the kernel's bf16 rounding of matmul inputs
    packed = enc.encode(TEXTS)
    enc.packing = False
    padded = enc.encode(TEXTS)
    assert _cos(packed, padded).min() >= 0.9999
    out = enc.save_pretrained(tmp_path / "saved")
    again = Encoder.from_pretrained(out, dtype="bfloat16", device="cpu")
    assert enc.kernel_format == again.kernel_format == "int16"
    # the saved weights are the int16 rows dequantized; loading quantizes them again (a second rounding ~2^-15)
    assert _cos(again.encode(TEXTS), packed).min() >= 0.99999
    enc = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel="bf16")
    packed = enc.encode(TEXTS)
    out = enc.save_pretrained(tmp_path / "saved-bf16")
    again = Encoder.from_pretrained(out, dtype="bfloat16", device="cpu", cpu_kernel="bf16")
    np.testing.assert_array_equal(again.encode(TEXTS), packed)  # the same bf16 weights came back
    plain = Encoder.from_pretrained(out, dtype="float32", device="cpu")  # a normal checkpoint
    assert not plain.cpu_kernel and _cos(plain.encode(TEXTS[:4]), packed[:4]).min() >= 0.999


@needs_kernel
def test_cpu_kernel_loads_16bit_checkpoints_in_16_bits(tmp_path, monkeypatch):
    """A bf16 checkpoint is loaded in bf16 (peak memory 2 bytes per weight) and upcast after packing; an fp32 one
    in fp32. Either way the kernel model's remaining parameters are fp32 and its vectors are the same."""
    import transformers
    from tiny import save_tiny

    path = save_tiny("llama", tmp_path / "fp32")
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "bf16")
    seen = []
    real = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    enc16 = Encoder.from_pretrained(str(tmp_path / "bf16"), dtype="bfloat16", device="cpu")
    enc32 = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")
    assert seen == [torch.bfloat16, torch.float32]
    for enc in (enc16, enc32):
        assert enc.cpu_kernel and {p.dtype for p in enc.model.parameters()} == {torch.float32}
    # the fp32 checkpoint's norms/embeddings are not bf16-rounded, so the two differ only slightly
    assert _cos(enc16.encode(TEXTS[:4]), enc32.encode(TEXTS[:4])).min() >= 0.999


def test_cpu_kernel_choice_and_errors(tmp_path, monkeypatch):
    from tiny import save_tiny

    import l2v.encoder as encoder_mod

    path = save_tiny("llama", tmp_path / "m")
    plain = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel=False)
    assert not plain.cpu_kernel and next(plain.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cpu_kernel=True needs dtype bfloat16 on CPU"):
        Encoder.from_pretrained(path, dtype="float32", device="cpu", cpu_kernel=True)
    with pytest.raises(ValueError, match="cpu_kernel must be None, True, False, 'int16' or 'bf16', got 'int8'"):
        Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel="int8")
    if _kernel_available():
        for choice, fmt in ((None, "int16"), (True, "int16"), ("int16", "int16"), ("bf16", "bf16")):
            assert Encoder.from_pretrained(path, dtype="bfloat16", device="cpu",
                                           cpu_kernel=choice).kernel_format == fmt
    assert plain.kernel_format is None
    monkeypatch.setattr(encoder_mod, "kernel_status", lambda: (False, "no C compiler found"))
    monkeypatch.setattr(encoder_mod, "_FALLBACK_WARNED", [])
    for insist in (True, "int16", "bf16"):
        with pytest.raises(RuntimeError, match="unavailable: no C compiler found"):
            Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel=insist)
    with pytest.warns(UserWarning, match=r"kernel is unavailable \(no C compiler found\); bf16 runs on torch"):
        fallback = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")  # automatic: torch's bf16
    assert not fallback.cpu_kernel and fallback.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process; an explicit cpu_kernel=False never warns
        Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")
        monkeypatch.setattr(encoder_mod, "_FALLBACK_WARNED", [])
        Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel=False)
    assert fallback.encode(TEXTS[:2]).shape == (2, fallback.dim)


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "opt"])
def test_fp32_layers_run_exactly_in_fp32(arch, tmp_path):
    """The first ``fp32_layers`` decoder layers compute what the fp32 model computes (fp32 weights and math on the
    kernel's fp32 path; only the summation order differs); the rest round matmul inputs and weights to bf16."""
    from tiny import save_tiny

    path = save_tiny(arch, tmp_path / arch)
    full = Encoder.from_pretrained(path, dtype="float32", device="cpu")
    # bf16 weights: by default ceil(0.4 * 2) = 1 layer in fp32
    mixed = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel="bf16")
    zero = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel="bf16", fp32_layers=0)
    int16 = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu")  # the default: int16, no fp32 layer
    int16_mixed = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", fp32_layers=1)
    assert ((mixed.fp32_layers, zero.fp32_layers, full.fp32_layers, int16.fp32_layers, int16_mixed.fp32_layers)
            == (1, 0, 0, 0, 1))
    assert (mixed.kernel_format, int16.kernel_format, int16_mixed.kernel_format, full.kernel_format) == (
        "bf16", "int16", "int16", None)
    assert mixed.cpu_kernel and zero.cpu_kernel and int16.cpu_kernel
    ids = torch.randint(3, 300, (2, 9))

    def hidden(enc):
        with torch.inference_mode():
            return enc.model(input_ids=ids, output_hidden_states=True).hidden_states

    f, m, z, i, im = hidden(full), hidden(mixed), hidden(zero), hidden(int16), hidden(int16_mixed)
    scale0 = float(f[1].abs().max())
    for kept in (m, im):
        assert (kept[1] - f[1]).abs().max() <= 1e-5 * scale0  # layer 0: fp32 weights, fp32 math (own sum order)
    assert (z[1] - f[1]).abs().max() > 1e-4 * scale0  # with bf16 weights, layer 0 rounds
    assert 0 < (i[1] - f[1]).abs().max() < (z[1] - f[1]).abs().max() / 4  # int16 rounds far less
    assert (m[2] - f[2]).abs().max() > 1e-4 * f[2].abs().max()  # layer 1 has bf16 weights
    assert _cos(mixed.encode(TEXTS), full.encode(TEXTS)).min() >= 0.999


@needs_kernel
def test_fp32_layers_everywhere_matches_the_fp32_model(tmp_path):
    from tiny import save_tiny

    path = save_tiny("llama", tmp_path / "m")
    every = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", fp32_layers=2)
    full = Encoder.from_pretrained(path, dtype="float32", device="cpu")
    assert every.cpu_kernel and every.fp32_layers == 2 and every.dtype == torch.float32  # the kernel's fp32 path
    assert every.uses_packing()  # and the packing probe holds it to the exact-fp32 bound (no bf16 weights)
    out, ref = every.encode(TEXTS), full.encode(TEXTS)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fp32_layers_errors(tmp_path, monkeypatch):
    from tiny import save_tiny

    import l2v.encoder as encoder_mod

    path = save_tiny("llama", tmp_path / "m")
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="fp32_layers must be a non-negative integer"):
            Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", fp32_layers=bad)
    with pytest.raises(ValueError, match="cannot be combined with cpu_kernel=False"):
        Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", cpu_kernel=False, fp32_layers=1)
    if _kernel_available():
        with pytest.raises(ValueError, match="fp32_layers=3, but the model has only 2 decoder layers"):
            Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", fp32_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Encoder.from_pretrained(path, dtype="float32", device="cpu", fp32_layers=1)  # already all fp32: no-op
    monkeypatch.setattr(encoder_mod, "kernel_status", lambda: (False, "no C compiler found"))
    monkeypatch.setattr(encoder_mod, "_FALLBACK_WARNED", ["already warned"])
    with pytest.warns(UserWarning, match="fp32_layers=1 is ignored"):
        enc = Encoder.from_pretrained(path, dtype="bfloat16", device="cpu", fp32_layers=1)
    assert not enc.cpu_kernel and enc.fp32_layers == 0


# ---------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_default_model_bf16_matches_fp32(default_encoder):
    """bf16 (the CPU default) against fp32 on the default model: every text >= 0.99.

    Texts: hand-picked, 128 news sentences (Lee corpus), 194 movie-review snippets (pang_lee, with their label
    prefix) and 11 Russian sentences (the opening of *Crime and Punishment*) from gensim's test data, and 100
    WordNet noun glosses. Bidirectionally a few texts in a hundred are hypersensitive to rounding made before
    the model forms its massive activations (benchmarks/RESULTS.md, "bf16 against fp32", "fp32 leading layers"
    and "int16 fixed point"). The default, l2v's CPU kernel with int16 fixed-point weights and matmul inputs,
    keeps every text >= 0.99, as does its bf16-weight variant with the first 40% of the layers in fp32. With bf16
    weights in every layer (``cpu_kernel="bf16", fp32_layers=0``) or with torch's plain bf16
    (``cpu_kernel=False``) a few land in 0.9-0.99 (about 1 in 100 on WordNet glosses); those paths are held to
    their measured typical error. Causal: every text >= 0.99 either way. A broken bf16 path (pooling, masks,
    dtype, kernel, kept layers) fails every bound.
    """
    import re

    from l2v import causal_attention
    from l2v.data.offline import DataSourceMissing, gensim_file
    from l2v.data.sources import wordnet_entries
    from l2v.encoder import cpu_supports_bf16
    from l2v.kernels import kernel_status

    sentences = ["A man is playing a guitar.", "The stock market fell sharply today.", "",
                 "Cats sleep most of the day.", "Quantum computers use qubits to perform calculations."]
    lee = gensim_file("lee_background.cor").read_text(encoding="utf-8").splitlines()
    news = [s for d in lee for s in re.split(r"(?<=[.!?])\s+", d.strip()) if 60 <= len(s) <= 220][:128]
    reviews = [line.strip() for line in gensim_file("pang_lee_polarity.cor").read_text(
        encoding="utf-8", errors="replace").splitlines() if 40 <= len(line.strip()) <= 250]
    novel = [s.replace("\n", " ").strip() for s in re.split(r"(?<=[.!?])\s+", gensim_file(
        "crime-and-punishment.txt").read_text(encoding="utf-8"))]  # its Russian opening
    novel = [s for s in novel if 80 <= len(s) <= 300]
    try:
        glosses = [e["gloss"] for e in wordnet_entries("n") if len(e["gloss"]) > 20][::97][:100]
    except DataSourceMissing:  # WordNet is a system package; the gensim texts still run
        glosses = []
    assert len(news) == 128 and len(reviews) == 194 and len(novel) == 11 and len(glosses) in (0, 100)
    texts = sentences + news + reviews + novel + glosses
    fp32 = Encoder.from_pretrained("smollm2-135m", dtype="float32")
    if cpu_supports_bf16():
        assert default_encoder.dtype == torch.bfloat16  # bf16 by default on capable CPUs
        assert default_encoder.cpu_kernel == kernel_status()[0]
    kernel = Encoder.from_pretrained("smollm2-135m", dtype="bfloat16")
    plain = Encoder.from_pretrained("smollm2-135m", dtype="bfloat16", cpu_kernel=False)
    ref = fp32.encode(texts, normalize=True)

    def cosines(bf16, texts=texts, ref=ref):
        return (ref * bf16.encode(texts, normalize=True)).sum(1)

    bi = cosines(plain)
    assert cosines(plain, sentences, ref[:len(sentences)]).min() >= 0.99
    assert np.median(bi) >= 0.999 and (bi >= 0.99).mean() >= 0.95 and bi.min() >= 0.8, np.sort(bi)[:8]
    if kernel.cpu_kernel:
        assert (kernel.kernel_format, kernel.fp32_layers) == ("int16", 0)
        default = cosines(kernel)
        assert default.min() >= 0.99, np.sort(default)[:8]  # the bound, for every text
        assert np.median(1 - default) <= 0.02 * np.median(1 - bi), (np.median(default), np.median(bi))
        bf16 = Encoder.from_pretrained("smollm2-135m", dtype="bfloat16", cpu_kernel="bf16")
        assert bf16.fp32_layers == 12  # 40% of 30
        precise = cosines(bf16)
        assert precise.min() >= 0.99, np.sort(precise)[:8]
        assert np.median(1 - precise) <= 0.25 * np.median(1 - bi), (np.median(precise), np.median(bi))
        fast = cosines(Encoder.from_pretrained("smollm2-135m", dtype="bfloat16", cpu_kernel="bf16", fp32_layers=0))
        assert np.median(1 - fast) <= 0.5 * np.median(1 - bi), (np.median(fast), np.median(bi))
        assert (fast >= 0.99).mean() >= 0.97 and fast.min() >= 0.8, np.sort(fast)[:8]
    with causal_attention(fp32.model), causal_attention(kernel.model), causal_attention(plain.model):
        for bf16 in (kernel, plain):
            causal = cosines(bf16, news, fp32.encode(news, normalize=True))
            assert causal.min() >= 0.99, np.sort(causal)[:8]


@pytest.mark.slow
def test_default_model_is_bidirectional(default_encoder):
    """The real model passes the probe, and its vectors differ from the causal model's.

    (No semantic-ranking assertion here: untrained bidirectional attention is expected to hurt; see README.)
    """
    from l2v import causal_attention, check_bidirectional

    assert default_encoder.bidirectional and default_encoder.dim == 576
    assert check_bidirectional(default_encoder.model)
    texts = ["A man is playing a guitar.", "The central bank raised interest rates."]
    bi = default_encoder.encode(texts, normalize=True)
    with causal_attention(default_encoder.model):
        causal = default_encoder.encode(texts, normalize=True)
    assert default_encoder.bidirectional  # restored after the context manager
    assert (bi * causal).sum(1).max() < 0.999


def test_compile_matches_eager_and_training_stays_eager():
    torch.manual_seed(0)
    enc = tiny_encoder("llama")
    texts = ["a b c", "the quick brown fox jumps", "", "mid length text here", "cats"] * 3
    ref = enc.encode(texts, normalize=False)
    assert enc.compile() is enc and enc.packing is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile failure would fall back with a warning
        out = enc.encode(texts, normalize=False)
        again = enc.encode(texts[:4] + ["one more text of another length"], normalize=False)  # new shapes
    assert np.allclose(out, ref, atol=1e-4)
    assert np.allclose(again[:4], ref[:4], atol=1e-4)
    assert enc._compile_checked and "_compiled" not in dict(enc.named_modules())
    assert not any(k.startswith("_compiled") for k in enc.state_dict())
    batch = enc.collate([enc.tokenize_one(t) for t in texts[:2]])
    emb = enc.forward(batch)  # gradients on: the eager model
    assert emb.requires_grad


def test_compile_failure_falls_back_to_eager(monkeypatch):
    enc = tiny_encoder("llama")
    ref = enc.encode(["a b c", "cats"])
    enc.compile()

    def broken(**kwargs):
        raise RuntimeError("no C++ compiler")

    object.__setattr__(enc, "_compiled", broken)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler") as caught:
        out = enc.encode_query(["a b c", "cats"])
    assert [w.filename for w in caught if "compile" in str(w.message)] == [__file__]  # not encoder.py
    assert np.allclose(out, ref, atol=1e-5) and enc._compiled is None and enc.packing is None


def test_training_compile_uses_the_compiled_model_with_gradients_and_falls_back():
    enc = tiny_encoder("llama")
    batch = enc.collate([enc.tokenize_one(t) for t in ["a b c", "the quick brown fox"]])
    ref = enc.forward(batch).detach()
    assert enc.compile(training=True) is enc and enc.packing is None  # inference layout untouched
    calls = []

    def broken(**kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    object.__setattr__(enc, "_compiled_train", broken)
    with torch.no_grad():
        enc.forward(batch)  # no gradients: not the training graph
    assert not calls
    with pytest.warns(UserWarning, match="torch.compile failed.*training without compilation") as caught:
        out = enc(batch)  # through nn.Module.__call__, as training calls it
    assert [w.filename for w in caught if "compile" in str(w.message)] == [__file__]
    assert calls and out.requires_grad and torch.allclose(out, ref, atol=1e-5) and enc._compiled_train is None


def test_loading_on_cpu_tunes_the_allocator(monkeypatch, tmp_path):
    """Activation memory is reused across batches (l2v.kernels.malloc): set up once a CPU encoder is loaded."""
    from tiny import save_tiny

    import l2v.encoder

    calls = []
    monkeypatch.setattr(l2v.encoder, "tune_malloc", lambda: calls.append(1) or True)
    l2v.encoder.Encoder.from_pretrained(save_tiny("llama", tmp_path / "m"), device="cpu")
    assert calls == [1]


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_tokenize_many_equals_tokenize_one(pooling):
    """encode tokenizes a chunk in one batched call; every item must equal the per-text path (empty texts,
    truncation, several instructions, none and '')."""
    enc = tiny_encoder("llama", pooling, max_length=12)
    texts = ["", "cats", TEXTS[1], "mid length text here", " ", "cats"]
    instructions = [None, "Query: ", "Query: ", "", "Represent this:", None]
    many = enc.tokenize_many(texts, instructions)
    assert many == [enc.tokenize_one(t, i) for t, i in zip(texts, instructions, strict=True)]
    assert any(t.truncated for t in many)  # the truncation path is exercised
    for cap, side in ((3, "left"), (5, "right")):  # the server's cap and TEI's truncation_direction
        assert enc.tokenize_many(texts, instructions, max_text_tokens=cap, truncation_side=side) == [
            enc.tokenize_one(t, i, max_text_tokens=cap, truncation_side=side)
            for t, i in zip(texts, instructions, strict=True)]
    with pytest.raises(ValueError, match="leaving no room for text"):
        enc.tokenize_many(["x"], ["word " * 40])


# ------------------------------------------------- sentence-transformers call patterns on Encoder.encode
MANY = [f"text number {i} about {w}" for i, w in enumerate(["cats", "dogs", "stocks", "rain", "music", "maths"] * 3)]


def test_st_convert_to_numpy_and_tensor():
    """ST's flags: convert_to_tensor wins over convert_to_numpy; convert_to_numpy=False alone is a list of 1-D
    tensors; a flag that contradicts l2v's convert_to is an error naming both."""
    enc = tiny_encoder()
    ref = enc.encode(TEXTS)
    assert isinstance(enc.encode(TEXTS, convert_to_numpy=True), np.ndarray)
    for kw in ({"convert_to_tensor": True}, {"convert_to_tensor": True, "convert_to_numpy": True},
               {"convert_to_tensor": True, "convert_to": "torch"}):
        t = enc.encode(TEXTS, **kw)
        assert isinstance(t, torch.Tensor) and t.shape == (4, enc.dim)
        np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)
    rows = enc.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 4 and all(isinstance(r, torch.Tensor) and r.shape == (enc.dim,)
                                                             for r in rows)
    np.testing.assert_allclose(torch.stack(rows).numpy(), ref, atol=1e-6)
    one = enc.encode(TEXTS[0], convert_to_numpy=False)
    assert isinstance(one, torch.Tensor) and one.shape == (enc.dim,)
    assert enc.encode([], convert_to_numpy=False) == []
    with pytest.raises(ValueError, match="convert_to='numpy' contradicts convert_to_tensor=True"):
        enc.encode(TEXTS, convert_to="numpy", convert_to_tensor=True)
    with pytest.raises(ValueError, match="convert_to='torch' contradicts convert_to_numpy=False"):
        enc.encode(TEXTS, convert_to="torch", convert_to_numpy=False)


def test_st_truncate_dim_and_normalize_embeddings_are_l2v_synonyms():
    enc = tiny_encoder()
    ref = enc.encode(TEXTS, dimensions=8, normalize=True)
    np.testing.assert_allclose(enc.encode(TEXTS, truncate_dim=8, normalize_embeddings=True), ref, atol=1e-6)
    np.testing.assert_allclose(enc.encode(TEXTS, truncate_dim=8, dimensions=8, normalize=True), ref, atol=1e-6)
    with pytest.raises(ValueError, match="dimensions=8 and truncate_dim=16"):
        enc.encode(TEXTS, dimensions=8, truncate_dim=16)
    with pytest.raises(ValueError, match="normalize=False and normalize_embeddings=True"):
        enc.encode(TEXTS, normalize=False, normalize_embeddings=True)
    with pytest.raises(ValueError, match=r"truncate_dim must be an integer in \[1, 32\]"):
        enc.encode(TEXTS, truncate_dim=64)


def test_st_prompt_and_prompt_name_are_instructions():
    """prompt = instruction (not pooled); prompt_name picks from Encoder.prompts; default_prompt_name applies
    when nothing is given and "" opts out; conflicting values are errors naming both."""
    enc = tiny_encoder(prompts={"query": "Retrieve passages:", "plain": ""}, default_prompt_name="query")
    plain = tiny_encoder().encode(TEXTS)
    instructed = tiny_encoder().encode(TEXTS, instruction="Retrieve passages:")
    assert not np.allclose(plain, instructed, atol=1e-4)
    for kw in ({}, {"prompt": "Retrieve passages:"}, {"prompt_name": "query"},
               {"prompt_name": "query", "instruction": "Retrieve passages:"}):
        np.testing.assert_allclose(enc.encode(TEXTS, **kw), instructed, atol=1e-5)
    for kw in ({"prompt": ""}, {"instruction": ""}, {"prompt_name": "plain"}):
        np.testing.assert_allclose(enc.encode(TEXTS, **kw), plain, atol=1e-5)
    # an (instruction, text) pair keeps its own instruction whatever the prompt
    np.testing.assert_allclose(enc.encode([("", TEXTS[0])], prompt="")[0], plain[0], atol=1e-5)
    with pytest.raises(ValueError, match="instruction='a' and prompt='b'"):
        enc.encode(TEXTS, instruction="a", prompt="b")
    with pytest.raises(ValueError, match="prompt='b' and prompt_name='query'"):
        enc.encode(TEXTS, prompt="b", prompt_name="query")
    with pytest.raises(ValueError, match="prompt_name='nope' is not one of this encoder's prompts: 'query', 'plain'"):
        enc.encode(TEXTS, prompt_name="nope")
    with pytest.raises(TypeError, match="prompt must be a string"):
        enc.encode(TEXTS, prompt=3)
    with pytest.raises(ValueError, match="default_prompt_name='x' is not one of the prompts"):
        tiny_encoder(prompts={"query": "q"}, default_prompt_name="x")
    enc.default_prompt_name = "gone"
    with pytest.raises(ValueError, match="default_prompt_name='gone'"):
        enc.encode(TEXTS)


def test_st_encode_query_and_encode_document():
    """ST v5: the prompts named "query" / "document" (else "passage", "corpus") unless the call names one."""
    enc = tiny_encoder(prompts={"query": "Find:", "passage": "Passage:"})
    np.testing.assert_allclose(enc.encode_query(TEXTS), enc.encode(TEXTS, prompt="Find:"), atol=1e-5)
    np.testing.assert_allclose(enc.encode_document(TEXTS), enc.encode(TEXTS, prompt="Passage:"), atol=1e-5)
    np.testing.assert_allclose(enc.encode_query(TEXTS, prompt="Other:"), enc.encode(TEXTS, instruction="Other:"),
                               atol=1e-5)
    t = enc.encode_query(TEXTS, convert_to_tensor=True, truncate_dim=8)
    assert isinstance(t, torch.Tensor) and t.shape == (4, 8)
    bare = tiny_encoder()
    np.testing.assert_allclose(bare.encode_document(TEXTS), bare.encode(TEXTS), atol=1e-6)
    # an empty "query" prompt overrides default_prompt_name, as in ST
    dflt = tiny_encoder(prompts={"query": "", "document": "Doc:"}, default_prompt_name="document")
    np.testing.assert_allclose(dflt.encode_query(TEXTS), bare.encode(TEXTS), atol=1e-5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pool'"):
        enc.encode_query(TEXTS, pool=None)


def test_prompts_saved_and_loaded(tmp_path):
    enc = tiny_encoder(prompts={"query": "Find:", "document": ""}, default_prompt_name="query")
    enc.base_model = "tiny-llama"
    enc.save_pretrained(tmp_path / "enc")
    back = Encoder.from_pretrained(tmp_path / "enc", dtype="float32", device="cpu")
    assert back.prompts == {"query": "Find:", "document": ""} and back.default_prompt_name == "query"
    np.testing.assert_allclose(back.encode(TEXTS), enc.encode(TEXTS, instruction="Find:"), atol=1e-5)
    over = Encoder.from_pretrained(tmp_path / "enc", dtype="float32", device="cpu",
                                   prompts={"query": "Q:", "extra": "E:"}, default_prompt_name="extra")
    assert over.prompts == {"query": "Q:", "document": "", "extra": "E:"} and over.default_prompt_name == "extra"
    with pytest.raises(ValueError, match="default_prompt_name='nope'"):
        Encoder.from_pretrained(tmp_path / "enc", dtype="float32", device="cpu", default_prompt_name="nope")


def test_similarity_fn_name_saved_and_loaded(tmp_path):
    """Kept in l2v_config.json as sentence-transformers keeps it (a reloaded encoder used to score by cosine)."""
    enc = tiny_encoder()
    enc.similarity_fn_name = "manhattan"
    enc.base_model = "tiny-llama"
    enc.save_pretrained(tmp_path / "enc")
    back = Encoder.from_pretrained(tmp_path / "enc", dtype="float32", device="cpu")
    assert back.similarity_fn_name == "manhattan"
    emb = enc.encode(TEXTS)
    np.testing.assert_allclose(back.similarity(emb), enc.similarity(emb), atol=1e-5)
    config = tmp_path / "enc" / "l2v_config.json"
    data = json.loads(config.read_text())
    del data["similarity_fn_name"]  # saved before the field existed: the default
    config.write_text(json.dumps(data))
    assert Encoder.from_pretrained(tmp_path / "enc", device="cpu").similarity_fn_name == "cosine"
    config.write_text(json.dumps({**data, "similarity_fn_name": "maxsim"}))
    with pytest.raises(ValueError, match="similarity_fn_name must be one of"):
        Encoder.from_pretrained(tmp_path / "enc", device="cpu")


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_st_precision_equals_quantize_embeddings(precision):
    """encode(precision=...) equals sentence-transformers' quantize_embeddings on the same float embeddings
    (int8 ranges from the call's own embeddings; bits packed 8 to a byte), after truncation and normalisation."""
    st_quant = pytest.importorskip("sentence_transformers.quantization")
    enc = tiny_encoder()
    for kw in ({}, {"truncate_dim": 12, "normalize_embeddings": True}):
        floats = enc.encode(MANY, **kw)
        want = st_quant.quantize_embeddings(floats, precision=precision)
        got = enc.encode(MANY, precision=precision, **kw)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    t = enc.encode(MANY, precision=precision, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.from_numpy(want[:0]).dtype
    assert len(enc.encode(MANY, precision=precision, convert_to_numpy=False)) == len(MANY)
    assert enc.encode([], precision=precision).shape[0] == 0


def test_precision_errors():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="precision must be one of"):
        enc.encode(TEXTS, precision="float16")
    with pytest.raises(ValueError, match="at least 2 texts"):
        enc.encode(TEXTS[0], precision="int8")
    assert enc.encode(TEXTS[0], precision="ubinary").shape == (enc.dim // 8,)


def test_st_device_and_output_value():
    """device: the encoder's own is accepted, any other refused (ST would move the model); output_value: only
    sentence embeddings; ST keywords l2v does not implement still fail as unknown."""
    enc = tiny_encoder()
    ref = enc.encode(TEXTS)
    for dev in ("cpu", "cpu:0", torch.device("cpu")):
        np.testing.assert_allclose(enc.encode(TEXTS, device=dev), ref, atol=1e-6)
    with pytest.raises(ValueError, match="device='meta', but this encoder is on cpu; encode does not move"):
        enc.encode(TEXTS, device="meta")
    with pytest.raises(ValueError, match="multi-process"):
        enc.encode(TEXTS, device=["cpu", "cpu"])
    np.testing.assert_allclose(enc.encode(TEXTS, output_value="sentence_embedding"), ref, atol=1e-6)
    for value in ("token_embeddings", None):
        with pytest.raises(ValueError, match="output_value=.*sentence embeddings only"):
            enc.encode(TEXTS, output_value=value)
    for kw in ({"chunk_size": 10}, {"task": "query"}, {"prompt_nam": "query"}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            enc.encode(TEXTS, **kw)


@pytest.mark.parametrize("fn", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_fn_name_matches_sentence_transformers(fn):
    util = pytest.importorskip("sentence_transformers.util")
    enc = tiny_encoder()
    a, b = enc.encode(TEXTS), enc.encode(MANY)
    enc.similarity_fn_name = fn
    st_fn = {"cosine": util.cos_sim, "dot": util.dot_score, "euclidean": util.euclidean_sim,
             "manhattan": util.manhattan_sim}[fn]
    np.testing.assert_allclose(enc.similarity(a, b), st_fn(a, b).numpy(), rtol=1e-4, atol=1e-4)
    rows = enc.encode(TEXTS, convert_to_numpy=False)  # a list of tensors, as ST's similarity takes
    np.testing.assert_allclose(enc.similarity(rows, b), enc.similarity(a, b), atol=1e-5)


def test_similarity_fn_name_and_st_aliases():
    enc = tiny_encoder()
    assert enc.similarity_fn_name == "cosine"
    with pytest.raises(ValueError, match="similarity_fn_name must be one of"):
        enc.similarity_fn_name = "maxsim"
    assert enc.get_embedding_dimension() == enc.dim == 32
    enc.max_seq_length = 16
    assert enc.max_length == 16 == enc.max_seq_length
    with pytest.raises(ValueError, match="max_length"):
        enc.max_seq_length = 0


def test_export_carries_prompts_to_sentence_transformers(tmp_path):
    """The same call on both sides gives the same vectors: an exported encoder's prompts and default_prompt_name
    become sentence-transformers' (they used to be replaced by empty "query"/"document" prompts)."""
    st = pytest.importorskip("sentence_transformers")
    from tiny import save_tiny

    from l2v.export import export

    base = save_tiny("llama", tmp_path / "base")
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu", max_length=24,
                                  prompts={"query": "Retrieve passages:", "document": ""}, default_prompt_name="query")
    model = st.SentenceTransformer(str(export(enc, tmp_path / "exp")), device="cpu")
    assert model.prompts == enc.prompts and model.default_prompt_name == "query"
    for call in ("encode", "encode_query", "encode_document"):
        np.testing.assert_allclose(getattr(model, call)(TEXTS, convert_to_numpy=True), getattr(enc, call)(TEXTS),
                                   atol=1e-5)
