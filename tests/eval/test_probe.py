"""Word-level probe: CoNLL parsing and a linear probe on frozen token states of a tiny model."""

from __future__ import annotations

import pytest

from l2v.eval.probe import read_conll, word_features, word_probe

CONLL = """-DOCSTART- -X- O O

the DT B-NP
cat NN I-NP
sat VBD B-VP

a DT B-NP
dog NN I-NP
ran VBD B-VP
home NN B-NP

the DT B-NP
dog NN I-NP
sat VBD B-VP
"""


def test_read_conll(tmp_path):
    f = tmp_path / "train.conll"
    f.write_text(CONLL)
    sents = read_conll(f)
    assert [s.words for s in sents] == [["the", "cat", "sat"], ["a", "dog", "ran", "home"], ["the", "dog", "sat"]]
    assert sents[1].labels == ["B-NP", "I-NP", "B-VP", "B-NP"]
    assert read_conll(f, label_column=1)[0].labels == ["DT", "NN", "VBD"]


def test_read_conll_errors(tmp_path):
    f = tmp_path / "bad.conll"
    f.write_text("the DT\nlonely\n")
    with pytest.raises(ValueError, match=r"bad\.conll:2: expected 'word \.\.\. label'"):
        read_conll(f)
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        read_conll(f)
    with pytest.raises(FileNotFoundError):
        read_conll(tmp_path / "missing.conll")


def test_word_features_one_row_per_word(tiny_encoder, tmp_path):
    f = tmp_path / "t.conll"
    f.write_text(CONLL)
    sents = read_conll(f)
    feats = word_features(tiny_encoder, sents, batch_size=2)
    assert feats.shape == (10, tiny_encoder.dim)
    # the same sentence alone or in a padded batch gives the same states
    alone = word_features(tiny_encoder, sents[:1])
    assert abs(alone - feats[:3]).max() < 1e-4


def test_probe_learns_pos_tags(tiny_encoder, tmp_path):
    f = tmp_path / "t.conll"
    f.write_text(CONLL * 3)
    scores = word_probe(tiny_encoder, f, f, label_column=1)
    assert scores["accuracy"] >= 0.9 and scores["train_words"] == 30 and scores["labels"] == 3
