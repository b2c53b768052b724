"""MNTP: masking rules, the i-1 shift with the LM head only at masked positions, learning, the saved encoder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import mntp_cfg  # noqa: E402

from l2v import Encoder  # noqa: E402
from l2v.train.loop import train  # noqa: E402
from l2v.train.mntp import MNTPObjective, mask_batch, resolve_mask_id  # noqa: E402


def _objective(tiny_dir, corpus, tmp_path, **kw):
    obj = MNTPObjective()
    obj.setup(mntp_cfg(tiny_dir, corpus, tmp_path / "run", **kw), torch.device("cpu"))
    return obj


@pytest.mark.parametrize("side", ["right", "left"])
def test_masks_only_text_tokens_never_specials_first_or_padding(tiny_dir, corpus, tmp_path, side):
    obj = _objective(tiny_dir, corpus, tmp_path)
    obj.encoder.padding_side = side
    items = obj.examples[:6]
    plain = obj.encoder.collate(items)
    bos = obj.encoder.tokenizer.bos_token_id
    # put a special token inside a text span: it must never be masked
    plain["input_ids"][0, plain["pool_mask"][0].nonzero()[1]] = bos
    special = {int(i) for i in obj.encoder.tokenizer.all_special_ids}
    b = mask_batch(plain, 0.2, obj.mask_id, special, torch.Generator().manual_seed(0))
    rows, cols = b["mask_rows"], b["mask_cols"]
    assert torch.equal(b["labels"], plain["input_ids"][rows, cols])
    assert bool(plain["pool_mask"][rows, cols].all())  # text tokens only (no pads, no BOS/EOS prefix)
    assert bool(plain["attention_mask"][rows, cols - 1].bool().all())  # the state at i-1 is a real token
    assert not any(int(t) in special for t in b["labels"])
    assert bool((b["input_ids"][rows, cols] == obj.mask_id).all())
    untouched = torch.ones_like(b["input_ids"], dtype=torch.bool)
    untouched[rows, cols] = False
    assert torch.equal(b["input_ids"][untouched], plain["input_ids"][untouched])
    for r in range(len(items)):
        n_text = int(plain["pool_mask"][r].sum())
        assert 1 <= int((rows == r).sum()) <= max(1, round(0.2 * n_text) + 1)


def test_mask_fraction_is_respected_on_average(tiny_dir, corpus, tmp_path):
    obj = _objective(tiny_dir, corpus, tmp_path)
    b = obj.encoder.collate(obj.examples[:32])
    out = mask_batch(b, 0.3, obj.mask_id, set(), torch.Generator().manual_seed(1))
    assert out["labels"].numel() / int(b["pool_mask"][:, 1:].sum()) == pytest.approx(0.3, abs=0.06)


def test_loss_reads_logits_at_previous_position(tiny_dir, corpus, tmp_path):
    """The head-only-where-needed loss equals CE on the full causal-LM logits shifted by one."""
    from transformers import AutoModelForCausalLM

    from l2v import make_bidirectional

    obj = _objective(tiny_dir, corpus, tmp_path, lora_dropout=0.0)
    obj.model.eval()
    batch = obj.collate(obj.examples[:4], torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, _ = obj.loss(batch)
        lm = make_bidirectional(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval())
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits
        ref = torch.nn.functional.cross_entropy(logits[batch["mask_rows"], batch["mask_cols"] - 1], batch["labels"])
        wrong = torch.nn.functional.cross_entropy(logits[batch["mask_rows"], batch["mask_cols"]], batch["labels"])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-4)  # fresh LoRA (B=0) == the base model
    assert abs(loss.item() - wrong.item()) > 1e-3


def test_mask_token_choices(tiny_dir, corpus, tmp_path):
    obj = _objective(tiny_dir, corpus, tmp_path)
    tok = obj.encoder.tokenizer
    assert resolve_mask_id(tok, "eos") == tok.eos_token_id
    assert resolve_mask_id(tok, "_") == tok("_", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="exactly one token"):
        resolve_mask_id(tok, "this is several tokens")
    # 'auto' (the default): the tokenizer's own mask token if it has one (Gemma: <mask>), else '_'
    assert tok.mask_token is None and obj.mask_id == resolve_mask_id(tok, "auto") == resolve_mask_id(tok, "_")
    tok.add_special_tokens({"mask_token": "<mask>"})
    assert resolve_mask_id(tok, "auto") == tok.convert_tokens_to_ids("<mask>") != resolve_mask_id(tok, "_")
    new = _objective(tiny_dir, corpus, tmp_path / "n", mask_token="new")
    assert new.mask_id >= 320 and new.mask_id in new.special_ids
    loss, _ = new.loss(new.collate(new.examples[:4], torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss)


def test_mntp_learns_and_reports_heldout_before_after(corpus, tmp_path):
    from _train_helpers import save_tiny_wide_init

    model = save_tiny_wide_init(tmp_path / "wide")
    summary = train(mntp_cfg(model, corpus, tmp_path / "run", steps=40, lr=3e-2, val_size=12),
                    MNTPObjective())
    before, after = summary["before"], summary["after"]
    assert set(before) == {"val_loss", "val_acc"}
    assert after["val_loss"] < before["val_loss"] - 0.3, (before, after)
    assert after["val_acc"] > before["val_acc"]


def test_saved_encoder_loads_alone_and_matches_training_model(tiny_dir, corpus, tmp_path):
    obj = MNTPObjective()
    train(mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=3, lr=1e-2), obj)
    out = tmp_path / "run"
    cfg = json.loads((out / "l2v_config.json").read_text())
    assert cfg["adapter"] == "adapter" and cfg["base_model"] == str(Path(tiny_dir).resolve())
    # Training crops texts to 128 tokens; the saved encoder keeps the inference length it started with (512).
    assert cfg["bidirectional"] is True and cfg["pooling"] == "mean" and cfg["max_length"] == 512
    ad = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ad["r"] == 16 and {m.split(".")[-1] for m in ad["target_modules"]} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"}
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("base_model.model.layers.") for k in keys)  # on the base transformer
    texts = ["A man is playing a guitar.", "Cats are pets."]
    obj.model.eval()
    ref = obj.encoder.encode(texts)
    enc = Encoder.from_pretrained(str(out), device="cpu", dtype="float32")
    assert enc.bidirectional
    assert torch.allclose(torch.as_tensor(enc.encode(texts)), torch.as_tensor(ref), atol=1e-4)
    base = Encoder.from_pretrained(tiny_dir, device="cpu", dtype="float32").encode(texts)
    assert not torch.allclose(torch.as_tensor(base), torch.as_tensor(ref), atol=1e-3)  # the adapter did something


def test_merge_option_writes_full_weights(tiny_dir, corpus, tmp_path):
    obj = MNTPObjective()
    train(mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=2, lr=1e-2, merge=True), obj)
    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "l2v_config.json").read_text())["adapter"] is None
    texts = ["A man is playing a guitar."]
    merged = Encoder.from_pretrained(str(out), device="cpu", dtype="float32").encode(texts)
    via_adapter = Encoder.from_pretrained(tiny_dir, adapter=str(out / "adapter"), device="cpu",
                                          dtype="float32").encode(texts)
    assert torch.allclose(torch.as_tensor(merged), torch.as_tensor(via_adapter), atol=1e-4)


def test_adapter_for_another_base_model_is_rejected(tiny_dir, corpus, tmp_path):
    from tiny import save_tiny

    train(mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=1), MNTPObjective())
    other = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ValueError, match="different base model"):
        train(mntp_cfg(other, corpus, tmp_path / "run2", steps=1, adapter=str(tmp_path / "run" / "adapter")),
              MNTPObjective())


def test_gradient_checkpointing_gives_same_loss(tiny_dir, corpus, tmp_path):
    a = _objective(tiny_dir, corpus, tmp_path / "a", lora_dropout=0.0)
    b = _objective(tiny_dir, corpus, tmp_path / "b", lora_dropout=0.0, gradient_checkpointing=True)
    b.model.load_state_dict(a.model.state_dict())
    batch = a.collate(a.examples[:4], torch.Generator().manual_seed(0))
    la, _ = a.loss(batch)
    lb, _ = b.loss(batch)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), abs=1e-5)
    ga = [p.grad for _, p in a.trainable_parameters()]
    gb = [p.grad for _, p in b.trainable_parameters()]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("merge", [False, True])
def test_new_mask_token_run_saves_an_encoder_that_loads(tiny_dir, corpus, tmp_path, merge):
    """The added mask token only exists during training: the saved adapter must fit the unresized base (peft
    used to save the resized embedding into it, so loading failed, and --merge failed after training)."""
    obj = MNTPObjective()
    train(mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=2, lr=1e-2, mask_token="new", merge=merge), obj)
    texts = ["A man is playing a guitar.", "Cats are pets."]
    obj.model.eval()
    ref = torch.as_tensor(obj.encoder.encode(texts))
    enc = Encoder.from_pretrained(str(tmp_path / "run"), device="cpu", dtype="float32")
    assert torch.allclose(torch.as_tensor(enc.encode(texts)), ref, atol=1e-4)


def test_new_mask_token_on_a_padded_vocabulary_keeps_the_rows(corpus, tmp_path):
    """A model with more embedding rows than tokens (Qwen-style padding) is not shrunk to the tokenizer, and the
    mask token's row is initialised to the mean embedding."""
    import transformers as tf
    from tiny import VOCAB, tiny_config, tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.vocab_size = VOCAB + 16
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").save_pretrained(tmp_path / "padded")
    tiny_tokenizer().save_pretrained(tmp_path / "padded")
    obj = _objective(str(tmp_path / "padded"), corpus, tmp_path, mask_token="new")
    emb = obj.encoder.model.get_input_embeddings().weight
    assert obj.mask_id == VOCAB and emb.shape[0] == VOCAB + 16
    assert torch.allclose(emb[obj.mask_id], emb[:VOCAB].mean(0), atol=1e-6)


def test_no_peft_deprecation_noise_when_training_merging_and_loading(tiny_dir, corpus, tmp_path):
    """peft reads transformers 5's deprecated ``is_gradient_checkpointing`` each time it wraps a model, so every
    train, ``--adapter`` merge and adapter load printed a FutureWarning the user can do nothing about."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=1), MNTPObjective())
        train(mntp_cfg(tiny_dir, corpus, tmp_path / "run2", steps=1, adapter=str(tmp_path / "run" / "adapter")),
              MNTPObjective())
        Encoder.from_pretrained(str(tmp_path / "run"), device="cpu", dtype="float32")
    noise = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert not noise, noise
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):  # the filter is scoped, not global
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)


def _metaspace_tokenizer():
    """A SentencePiece-like vocabulary (Metaspace, prefix space): tokenising "_" gives "▁_", a separate entry from
    the bare "_" that the official run_mntp.py masks with (``tokenizer.mask_token = "_"``)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "_": 3, "▁": 4, "▁_": 5, "a": 6, "▁a": 7}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "_"), ("▁", "a")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_mask_token_is_the_vocabulary_entry_as_in_official_llm2vec():
    tok = _metaspace_tokenizer()
    assert tok("_", add_special_tokens=False)["input_ids"] == [5]  # "▁_": what tokenising the string gives
    assert resolve_mask_id(tok, "_") == 3  # the bare "_" entry, as convert_tokens_to_ids("_") upstream
    assert resolve_mask_id(tok, "a") == 6
    assert resolve_mask_id(tok, "<unk>") == 0
    with pytest.raises(ValueError, match="exactly one token"):
        resolve_mask_id(tok, "a a")  # not an entry, and two tokens


def test_bert_mask_mode_replaces_80_10_10_like_official_default_collator(tiny_dir, corpus, tmp_path):
    """--mask-mode bert: the official Llama-2/3 and Sheared-LLaMA recipes (transformers' default MLM collator)
    put the mask token on 80% of the chosen tokens, a random token on 10%, and leave 10% as they are."""
    obj = _objective(tiny_dir, corpus, tmp_path, mask_mode="bert")
    assert obj.cfg.mask_mode == "bert"
    plain = obj.encoder.collate(obj.examples[:32] * 8)
    b = obj.collate(obj.examples[:32] * 8, torch.Generator().manual_seed(0))
    rows, cols, labels = b["mask_rows"], b["mask_cols"], b["labels"]
    assert torch.equal(labels, plain["input_ids"][rows, cols])  # every chosen position is still predicted
    got = b["input_ids"][rows, cols]
    n = labels.numel()
    is_mask = got == obj.mask_id
    kept = (got == labels) & ~is_mask
    changed = ~is_mask & ~kept
    assert is_mask.float().mean().item() == pytest.approx(0.8, abs=0.05), n
    assert kept.float().mean().item() == pytest.approx(0.1, abs=0.04)
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.04)
    assert int(got.max()) < len(obj.encoder.tokenizer)
    untouched = torch.ones_like(b["input_ids"], dtype=torch.bool)
    untouched[rows, cols] = False
    assert torch.equal(b["input_ids"][untouched], plain["input_ids"][untouched])
    loss, _ = obj.loss(b)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="mask_mode"):
        obj.cfg.replace(mask_mode="random")
