"""Word-level probe (LLM2Vec's word-level tasks: chunking, NER, POS): a linear classifier on frozen token states.

Each word is represented by the final hidden state of its first sub-token (the paper's choice), computed with the
encoder's own attention (bidirectional or causal) over the whole sentence. A logistic regression is trained on
the train file's words and scored on the test file: accuracy and macro-F1 over word labels.

CoNLL-style files: one word per line, whitespace-separated columns, the word first and the label in column
``label_column`` (default: the last); blank lines separate sentences; ``-DOCSTART-`` lines are skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics as M


@dataclass
class Sentence:
    words: list[str]
    labels: list[str]


def read_conll(path: str | Path, label_column: int = -1) -> list[Sentence]:
    """Sentences of a CoNLL-style file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such CoNLL file.")
    sentences: list[Sentence] = []
    words: list[str] = []
    labels: list[str] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            if words:
                sentences.append(Sentence(words, labels))
                words, labels = [], []
            continue
        cols = line.split()
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'word ... label' columns, got {line.strip()!r}.")
        try:
            label = cols[label_column]
        except IndexError as exc:
            raise ValueError(f"{path}:{lineno}: no column {label_column} in {line.strip()!r}.") from exc
        words.append(cols[0])
        labels.append(label)
    if words:
        sentences.append(Sentence(words, labels))
    if not sentences:
        raise ValueError(f"{path}: no sentences found.")
    return sentences


def _word_ids(encoder: Any, words: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of the sentence (words joined by spaces, with the model's special tokens) and the index of each
    word's first sub-token."""
    tok = encoder.tokenizer
    ids = list(encoder._prefix)
    firsts = []
    for i, w in enumerate(words):
        piece = tok(w if i == 0 else " " + w, add_special_tokens=False)["input_ids"] or [encoder._pad_id]
        firsts.append(len(ids))
        ids += piece
    ids += list(encoder._suffix)
    if len(ids) > encoder.max_length:
        raise ValueError(f"a sentence of {len(words)} words is {len(ids)} tokens, over max_length="
                         f"{encoder.max_length}: {' '.join(words[:12])}...")
    return ids, firsts


def word_features(encoder: Any, sentences: list[Sentence], batch_size: int = 16) -> np.ndarray:
    """(n_words, dim) first-sub-token states for every word of every sentence, in order."""
    from ..encoder import Tokenized

    feats = []
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(sentences), batch_size):
                chunk = sentences[s:s + batch_size]
                items, firsts = [], []
                for sent in chunk:
                    ids, f = _word_ids(encoder, sent.words)
                    items.append(Tokenized(ids=ids, start=0, end=len(ids)))
                    firsts.append(f)
                batch = encoder.collate(items)
                states = encoder.token_states(batch).float().cpu()
                for row, (item, f) in enumerate(zip(items, firsts, strict=True)):
                    offset = states.shape[1] - len(item.ids) if encoder.padding_side == "left" else 0
                    feats.append(states[row, [offset + i for i in f]].numpy())
    finally:
        encoder.model.train(was_training)
    return np.concatenate(feats) if feats else np.zeros((0, encoder.dim), dtype=np.float32)


def word_probe(encoder: Any, train: str | Path | list[Sentence], test: str | Path | list[Sentence],
               label_column: int = -1, max_iter: int = 1000, seed: int = 0) -> dict[str, float]:
    """Train a logistic-regression probe on ``train`` word states, score on ``test``: accuracy, macro-F1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr = train if isinstance(train, list) else read_conll(train, label_column)
    te = test if isinstance(test, list) else read_conll(test, label_column)
    xtr, xte = word_features(encoder, tr), word_features(encoder, te)
    ytr = [lab for s in tr for lab in s.labels]
    yte = [lab for s in te for lab in s.labels]
    if len(set(ytr)) < 2:
        raise ValueError(f"the probe needs at least 2 labels in the training data, got {sorted(set(ytr))}.")
    scaler = StandardScaler().fit(xtr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=max_iter, random_state=seed).fit(scaler.transform(xtr), ytr)
    pred = clf.predict(scaler.transform(xte)).tolist()
    return {"accuracy": M.accuracy(yte, pred), "f1": M.macro_f1(yte, pred), "train_words": len(ytr),
            "test_words": len(yte), "labels": len(set(ytr) | set(yte))}
