"""Official LLM2Vec checkpoint layout (MNTP base dir + supervised PEFT dir with llm2vec_config.json) and the
``l2v.compat.LLM2Vec`` shim, on a layout built here from a tiny model with peft."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import save_tiny, tiny_tokenizer
from transformers import AutoModel

from l2v import Encoder, make_bidirectional
from l2v.compat import LLM2Vec

TEXTS = ["The quick brown fox jumps.", "a", "Machine learning models turn text into vectors, many of them."]
PAIRS = [["Retrieve passages:", "The quick brown fox jumps."], ["", "a"], ["Classify:  ", "Cats and dogs."]]


def _lora(model, seed: int):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """base/ (full weights), mntp/ (config.json + tokenizer + LoRA adapter, as on the hub),
    mntp-merged/ (MNTP merged into full weights), sup/ (LoRA adapter + llm2vec_config.json)."""
    root = tmp_path_factory.mktemp("official")
    base = save_tiny("llama", root / "base")
    # MNTP adapter: the official MNTP repos hold config.json + tokenizer next to adapter_config.json/weights.
    mntp = _lora(AutoModel.from_pretrained(base, dtype=torch.float32), seed=1)
    mntp.save_pretrained(root / "mntp")
    shutil.copy(root / "base" / "config.json", root / "mntp" / "config.json")
    tiny_tokenizer().save_pretrained(root / "mntp")
    merged = mntp.merge_and_unload()
    merged.save_pretrained(root / "mntp-merged")
    tiny_tokenizer().save_pretrained(root / "mntp-merged")
    # Supervised adapter trained on top of the MNTP-merged model.
    sup = _lora(AutoModel.from_pretrained(root / "mntp-merged", dtype=torch.float32), seed=2)
    sup.save_pretrained(root / "sup")
    (root / "sup" / "llm2vec_config.json").write_text(json.dumps(
        {"pooling_mode": "weighted_mean", "max_length": 48, "doc_max_length": 400, "skip_instruction": True}))
    return root


def reference(root, pooling="weighted_mean", max_length=48) -> Encoder:
    """Built by hand: base -> merge MNTP -> merge supervised -> bidirectional."""
    net = AutoModel.from_pretrained(root / "base", dtype=torch.float32, attn_implementation="sdpa")
    net = PeftModel.from_pretrained(net, str(root / "mntp")).merge_and_unload()
    net = PeftModel.from_pretrained(net, str(root / "sup")).merge_and_unload()
    make_bidirectional(net.eval())
    return Encoder(net, tiny_tokenizer(), pooling=pooling, max_length=max_length)


def test_official_layout_loads_like_the_hand_built_model(layout):
    ref = reference(layout)
    enc = Encoder.from_pretrained(str(layout / "mntp"), adapter=str(layout / "sup"), dtype="float32", device="cpu")
    assert enc.pooling == "weighted_mean" and enc.max_length == 48  # from llm2vec_config.json
    assert enc.bidirectional
    np.testing.assert_allclose(enc.encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    # The adapters really change the model (so the comparison above is not vacuous).
    plain = Encoder.from_pretrained(str(layout / "base"), pooling="weighted_mean", dtype="float32", device="cpu")
    assert np.abs(plain.encode(TEXTS) - ref.encode(TEXTS)).max() > 1e-3


def test_merged_mntp_base_plus_adapter(layout):
    ref = reference(layout)
    enc = Encoder.from_pretrained(str(layout / "mntp-merged"), adapter=str(layout / "sup"), dtype="float32",
                                  device="cpu")
    assert enc.pooling == "weighted_mean"
    np.testing.assert_allclose(enc.encode(TEXTS), ref.encode(TEXTS), atol=1e-5)


def test_shim_call_shapes(layout):
    model = LLM2Vec.from_pretrained(str(layout / "mntp"), peft_model_name_or_path=str(layout / "sup"),
                                    torch_dtype=torch.float32, device_map="cpu")
    assert model.pooling_mode == "weighted_mean" and model.max_length == 48 and model.doc_max_length == 400
    ref = reference(layout)
    out = model.encode(PAIRS, show_progress_bar=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 32)
    # as upstream tokenises "instruction text": this tokenizer keeps the joining space as a token of its own
    expected = ref.encode([("Retrieve passages: ", PAIRS[0][1]), PAIRS[1][1], ("Classify: ", PAIRS[2][1])])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    # The instruction matters and is not pooled: same text, different instruction -> different vector.
    assert not np.allclose(out[0].numpy(), ref.encode([PAIRS[0][1]])[0], atol=1e-4)
    plain = model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(plain, np.ndarray)
    np.testing.assert_allclose(plain, ref.encode(TEXTS), atol=1e-5)
    single = model.encode("one string", show_progress_bar=False)
    assert single.shape == (1, 32)
    with pytest.raises(TypeError, match=r"sentences\[0\]"):
        model.encode([["only one"]])


def test_instructed_text_gets_the_tokens_it_has_after_the_official_join(layout):
    """Upstream tokenises f"{instruction} {text}" and pools its last len(tokenize(text)) tokens; with a byte-level
    BPE (Llama-3, Qwen) those start "Ġhow", not the "how" of the text tokenised alone (cos 0.958 on the default
    model for one query). The shim now feeds l2v exactly upstream's token ids."""
    model = LLM2Vec.from_pretrained(str(layout / "base"), torch_dtype="float32", device_map="cpu")
    tok, enc = model.tokenizer, model.encoder
    instruction = "Retrieve passages:"
    for text, spaced in (("passages and dogs.", True), ("The quick brown fox jumps.", False)):  # "Ġp" / "Ġ" "The"
        joined = tok(f"{instruction} {text}", add_special_tokens=False)["input_ids"]
        alone = tok(text, add_special_tokens=False)["input_ids"]
        assert (alone != joined[-len(alone):]) == spaced
        ins, txt = model._as_joined(instruction, text)
        assert (ins, txt) == ((instruction, " " + text) if spaced else (instruction + " ", text))
        fed = enc.tokenize_one(txt, ins)
        assert fed.ids == joined and fed.ids[fed.start:fed.end] == joined[-len(alone):]
        np.testing.assert_allclose(model.encode([[instruction, text]], show_progress_bar=False).numpy(),
                                   enc.encode([(ins, txt)]), atol=1e-6)


def test_shim_overrides_and_errors(layout, tmp_path):
    model = LLM2Vec.from_pretrained(str(layout / "mntp"), peft_model_name_or_path=str(layout / "sup"),
                                    pooling_mode="mean", max_length=32, doc_max_length=5, torch_dtype="float32",
                                    device_map="cpu")
    assert model.pooling_mode == "mean" and model.max_length == 32
    # doc_max_length cuts the document by words before encoding, like the official package.
    long_doc = "cats and dogs are common household pets " * 5
    cut = model._cut_doc(long_doc)
    assert len(model.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 5 and long_doc.startswith(cut)
    with pytest.raises(ValueError, match="pooling_mode"):
        LLM2Vec.from_pretrained(str(layout / "base"), pooling_mode="max")
    with pytest.raises(ValueError, match="skip_instruction"):
        LLM2Vec.from_pretrained(str(layout / "base"), skip_instruction=False, device_map="cpu")
    # save() writes a standalone directory that reloads (l2v or the shim) without the adapters.
    model.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())["pooling_mode"] == "mean"
    again = LLM2Vec.from_pretrained(str(tmp_path / "saved"), device_map="cpu", torch_dtype=torch.float32)
    np.testing.assert_allclose(again.encode(TEXTS).numpy(), model.encode(TEXTS).numpy(), atol=1e-5)


def test_doc_cut_counts_tokens_after_max_length_truncation(layout):
    """Upstream measures a document with ``truncation=True, max_length=max_length`` while cutting it to
    doc_max_length, so for a text longer than max_length its word count differs from a cut by the full length."""
    model = LLM2Vec.from_pretrained(str(layout / "base"), max_length=16, doc_max_length=10, torch_dtype="float32",
                                    device_map="cpu")
    tok = model.tokenizer

    def upstream(text: str) -> str:  # the official rule, restated
        length = min(len(tok(text, add_special_tokens=False)["input_ids"]), 16)
        while length > 10:
            words = text.split()
            text = " ".join(words[:int(len(words) * 10 / length)])
            length = min(len(tok(text, add_special_tokens=False)["input_ids"]), 16)
        return text

    doc = "cats and dogs are common household pets " * 5  # 80 tokens: 3 words upstream (2 by full length)
    assert model._cut_doc(doc) == upstream(doc) == "cats and dogs"
    short = "The quick brown fox jumps over the lazy dog."
    assert model._cut_doc(short) == upstream(short)


def test_supervised_adapter_alone_follows_the_chain(layout, tmp_path):
    """Hub supervised adapters name the MNTP adapter repo as their base; loading the adapter alone follows it."""
    chained = tmp_path / "sup-chained"
    shutil.copytree(layout / "sup", chained)
    cfg = json.loads((chained / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(layout / "mntp")
    (chained / "adapter_config.json").write_text(json.dumps(cfg))
    enc = Encoder.from_pretrained(str(chained), dtype="float32", device="cpu")
    assert enc.pooling == "weighted_mean" and enc.max_length == 48
    np.testing.assert_allclose(enc.encode(TEXTS), reference(layout).encode(TEXTS), atol=1e-5)


def test_last_token_pools_the_texts_last_token_like_upstream(layout, tmp_path):
    """Upstream's last_token pools the text's last token and its eos_token appends EOS first; l2v's last_token
    appends EOS, so pooling_mode="last_token" through the shim pooled an extra token (cos ~0.2 to upstream)."""
    ref = reference(layout)
    tok = ref.tokenizer

    def last_state(text: str) -> np.ndarray:  # upstream: the final hidden state of the tokenised input
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            return ref.model(input_ids=ids).last_hidden_state[0, -1].numpy()

    model = LLM2Vec.from_pretrained(str(layout / "mntp"), peft_model_name_or_path=str(layout / "sup"),
                                    pooling_mode="last_token", torch_dtype=torch.float32, device_map="cpu")
    assert model.pooling_mode == "last_token"
    out = model.encode([TEXTS[2], ["Retrieve passages:", TEXTS[0]]], show_progress_bar=False).numpy()
    np.testing.assert_allclose(out, [last_state(TEXTS[2]), last_state(f"Retrieve passages: {TEXTS[0]}")],
                               atol=1e-5)
    # eos_token: EOS appended and pooled (l2v's own last-token pooling)
    eos = LLM2Vec.from_pretrained(str(layout / "mntp"), peft_model_name_or_path=str(layout / "sup"),
                                  pooling_mode="eos_token", torch_dtype=torch.float32, device_map="cpu")
    assert eos.pooling_mode == "eos_token"
    np.testing.assert_allclose(eos.encode(TEXTS[:1], show_progress_bar=False).numpy()[0],
                               last_state(TEXTS[0] + tok.eos_token), atol=1e-5)
    # save() records which one it is, so the reload pools the same token
    for m, name in ((model, "lt"), (eos, "eos")):
        m.save(tmp_path / name)
        again = LLM2Vec.from_pretrained(str(tmp_path / name), torch_dtype=torch.float32, device_map="cpu")
        assert again.pooling_mode == m.pooling_mode
        np.testing.assert_allclose(again.encode(TEXTS, show_progress_bar=False).numpy(),
                                   m.encode(TEXTS, show_progress_bar=False).numpy(), atol=1e-5)
