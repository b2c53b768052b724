"""SimCSE: InfoNCE, dropout as the only noise, starting from an MNTP encoder, the saved (stacked) encoder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import mntp_cfg, simcse_cfg  # noqa: E402

from l2v import Encoder  # noqa: E402
from l2v.train.loop import train  # noqa: E402
from l2v.train.mntp import MNTPObjective  # noqa: E402
from l2v.train.simcse import SimCSEObjective, info_nce  # noqa: E402


def test_info_nce_values():
    a = torch.eye(4)
    loss, acc = info_nce(a, a.clone(), scale=2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 3))  # cos 1 for the positive, 0 for 3 negatives
    assert loss.item() == pytest.approx(expected, rel=1e-5) and acc.item() == 1.0
    loss, acc = info_nce(a, a.flip(0), scale=20)  # every positive at cos 0, one negative at cos 1
    assert loss.item() > 10 and acc.item() == 0.0
    # cosine, not dot product: scaling a view changes nothing
    assert info_nce(a, 7 * a, 2)[0].item() == pytest.approx(expected, rel=1e-5)


def test_dropout_is_the_only_noise(tiny_dir, corpus, tmp_path):
    obj = SimCSEObjective()
    obj.setup(simcse_cfg(tiny_dir, corpus, tmp_path / "run"), torch.device("cpu"))
    base = obj.encoder._forward_target()
    assert base.config.attention_dropout == 0.3
    assert all(m.attention_dropout == 0.3 for m in base.modules() if hasattr(m, "attention_dropout"))
    ad = obj.encoder.model.peft_config["default"]
    assert ad.lora_dropout == 0.05 and ad.r == 16
    batch = obj.collate(obj.examples[:4], torch.Generator())
    assert torch.equal(batch["input_ids"][:4], batch["input_ids"][4:])  # the same text twice
    obj.model.train()
    a, b = obj.encoder(batch).chunk(2)
    assert not torch.allclose(a, b, atol=1e-6)  # the views differ only through dropout
    obj.model.eval()
    with torch.no_grad():
        a, b = obj.encoder(batch).chunk(2)
    assert torch.allclose(a, b, atol=1e-5)


def test_simcse_from_mntp_encoder_stacks_adapters(tiny_dir, corpus, tmp_path):
    train(mntp_cfg(tiny_dir, corpus, tmp_path / "mntp", steps=3, lr=1e-2), MNTPObjective())
    obj = SimCSEObjective()
    summary = train(simcse_cfg(str(tmp_path / "mntp"), corpus, tmp_path / "simcse", steps=4, lr=1e-2), obj)
    assert summary["final_loss"] > 0 and "val_loss" in summary["after"]
    out = tmp_path / "simcse"
    mntp = json.loads((tmp_path / "mntp" / "l2v_config.json").read_text())  # a plain base model: the defaults
    assert (mntp["prompts"], mntp["default_prompt_name"], mntp["similarity_fn_name"]) == ({}, None, "cosine")
    cfg = json.loads((out / "l2v_config.json").read_text())
    assert cfg["adapter"] == ["merged_0", "adapter"] and cfg["base_model"] == str(Path(tiny_dir).resolve())
    assert (out / "merged_0" / "adapter_model.safetensors").is_file()
    texts = ["Two children are playing football.", "The stock market fell."]
    obj.model.eval()
    ref = obj.encoder.encode(texts)
    got = Encoder.from_pretrained(str(out), device="cpu", dtype="float32").encode(texts)
    assert torch.allclose(torch.as_tensor(got), torch.as_tensor(ref), atol=1e-4)
    mntp_only = Encoder.from_pretrained(str(tmp_path / "mntp"), device="cpu", dtype="float32").encode(texts)
    assert not torch.allclose(torch.as_tensor(mntp_only), torch.as_tensor(ref), atol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_trained_encoder_keeps_start_prompts_and_similarity(tiny_dir, corpus, tmp_path, merge):
    # As sentence-transformers keeps a model's prompts and similarity function across fit + save.
    prompts = {"query": "Retrieve passages that answer the question", "document": ""}
    start = Encoder.from_pretrained(tiny_dir, device="cpu", dtype="float32", prompts=prompts,
                                    default_prompt_name="query")
    start.similarity_fn_name = "dot"
    start.save_pretrained(tmp_path / "start")
    train(simcse_cfg(str(tmp_path / "start"), corpus, tmp_path / "out", steps=2, merge=merge), SimCSEObjective())
    out = tmp_path / "out"
    assert (out / "config.json").is_file() == merge  # the merged layout holds full weights, else adapters
    enc = Encoder.from_pretrained(str(out), device="cpu", dtype="float32")
    assert enc.prompts == prompts and enc.default_prompt_name == "query" and enc.similarity_fn_name == "dot"


def test_simcse_needs_two_sentences_per_batch():
    from l2v.train.config import SimCSEConfig

    with pytest.raises(ValueError, match="batch_size >= 2"):
        SimCSEConfig(batch_size=1).validate()


def test_bf16_training_keeps_frozen_weights_bf16_and_lora_fp32(tiny_dir, corpus, tmp_path):
    obj = SimCSEObjective()
    obj.setup(simcse_cfg(tiny_dir, corpus, tmp_path / "run", dtype="bfloat16"), torch.device("cpu"))
    dtypes = {(p.requires_grad, p.dtype) for p in obj.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = obj.loss(obj.collate(obj.examples[:4], torch.Generator()))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for _, p in obj.trainable_parameters())


def test_attention_dropout_alone_makes_the_two_views_differ(tiny_dir, corpus, tmp_path):
    """The official SimCSE noise is attention dropout 0.3 (simcse_dropout): it must act inside l2v's
    bidirectional attention, not only LoRA dropout."""
    views = {}
    for p in (0.0, 0.3):
        obj = SimCSEObjective()
        obj.setup(simcse_cfg(tiny_dir, corpus, tmp_path / f"r{p}", lora_dropout=0.0, attention_dropout=p),
                  torch.device("cpu"))
        obj.model.train()
        a, b = obj.encoder(obj.collate(obj.examples[:4], torch.Generator())).chunk(2)
        views[p] = float((a - b).abs().max())
    assert views[0.0] == 0.0 and views[0.3] > 1e-3
