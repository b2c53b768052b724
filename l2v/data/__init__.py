"""Data: corpora for training, pair data, and offline sources of real text."""
