"""Fixtures shared by the training tests: a tiny llama directory and a small corpus file."""

from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Machine learning models turn text into vectors.",
    "Paris is the capital of France and a large city.",
    "She reads a book about the history of science.",
    "Cats and dogs are common household pets.",
    "The weather today is sunny with a light breeze.",
    "A woman is slicing an onion in the kitchen.",
    "Two children are playing football in the park.",
    "The stock market fell sharply on Monday morning.",
    "He plays the piano every evening after dinner.",
    "Scientists discovered a new species of frog.",
]


def corpus_file(tmp: Path, n_repeat: int = 4) -> str:
    path = Path(tmp) / "corpus.txt"
    lines = [f"{s} ({i})" for i in range(n_repeat) for s in SENTENCES]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A saved tiny random llama (causal LM + tokenizer)."""
    from tiny import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def corpus(tmp_path) -> str:
    return corpus_file(tmp_path)


def mntp_cfg(model: str, data: str, out: Path, **kw):
    from l2v.train.config import MNTPConfig

    base = dict(model=model, data=data, output_dir=str(out), steps=6, batch_size=4, val_size=8, lr=5e-3,
                warmup_steps=1, progress=False, dtype="float32", device="cpu", threads=1)
    base.update(kw)
    return MNTPConfig(**base)


def simcse_cfg(model: str, data: str, out: Path, **kw):
    from l2v.train.config import SimCSEConfig

    base = dict(model=model, data=data, output_dir=str(out), steps=6, batch_size=4, val_size=8, lr=5e-3,
                warmup_steps=1, progress=False, dtype="float32", device="cpu", threads=1)
    base.update(kw)
    return SimCSEConfig(**base)


def save_tiny_wide_init(path: Path, init: float = 0.5) -> str:
    """A tiny llama whose (frozen, tied) embeddings are large enough for the LM head to express confident
    predictions; with the default 0.02 init every logit stays near 0 and MNTP loss cannot drop below ~log(V)."""
    import torch
    import transformers as tf
    from tiny import tiny_config, tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.initializer_range = init
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
