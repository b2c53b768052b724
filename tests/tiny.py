"""Tiny randomly initialised decoder models and a small trained tokenizer, shared by the tests."""

from __future__ import annotations

import functools

import torch
import transformers as tf

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt"]
VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


def tiny_config(arch: str, attn_implementation: str = "sdpa") -> tf.PreTrainedConfig:
    """A 2-layer, 32-wide config of ``arch`` (random weights when instantiated)."""
    if arch == "llama":
        cfg = tf.LlamaConfig(**_COMMON, **_DEC, num_key_value_heads=2)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**_COMMON, **_DEC, num_key_value_heads=2, sliding_window=64)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**_COMMON, **_DEC, num_key_value_heads=2)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**_COMMON, **_DEC, num_key_value_heads=2, head_dim=8)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**_COMMON, **_DEC, num_key_value_heads=2, head_dim=8)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**_COMMON, **_DEC, num_key_value_heads=2)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(**_COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**_COMMON, **_DEC)
    elif arch == "opt":
        cfg = tf.OPTConfig(**_COMMON, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=256)
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, attn_implementation),
                                                attn_implementation=attn_implementation)
    return model.eval()


_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Machine learning models turn text into vectors.",
    "Paris is the capital of France and a large city.",
    "She reads a book about the history of science.",
    "Represent this sentence for searching relevant passages:",
    "Cats and dogs are common household pets.",
    "The weather today is sunny with a light breeze.",
]


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAIN_TEXT * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(padding_side: str = "right") -> tf.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (ids < VOCAB) with <pad>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer

    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                     bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.padding_side = padding_side
    return tok


def save_tiny(arch: str, path, attn_implementation: str = "sdpa") -> str:
    """Save a tiny model + tokenizer to ``path`` (a local model directory, like a hub snapshot)."""
    tiny_model(arch, attn_implementation).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
