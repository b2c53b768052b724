"""One end-to-end check on the real default model (SmolLM2-135M): MNTP then SimCSE, tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2v import Encoder
from l2v.train.recipe import Recipe, run_recipe


@pytest.mark.slow
def test_recipe_on_default_model(default_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from l2v.train.mntp import resolve_mask_id

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert tok.convert_ids_to_tokens(resolve_mask_id(tok, "_")) == "_"
    r = Recipe(output_dir=str(tmp_path / "run"), mntp_steps=1, mntp_batch_size=2, mntp_max_length=24,
               simcse_steps=1, simcse_batch_size=4, simcse_max_length=16, max_texts=60, val_size=4,
               warmup_steps=0, progress=False)
    out = run_recipe(r)
    before, after = out["mntp"]["before"], out["mntp"]["after"]
    assert 0 < before["val_loss"] < 12 and 0 <= before["val_acc"] <= 1 and after["val_loss"] > 0
    cfg = json.loads((tmp_path / "run" / "simcse" / "l2v_config.json").read_text())
    assert cfg["base_model"] == "smollm2-135m" and cfg["adapter"] == ["merged_0", "adapter"]
    enc = Encoder.from_pretrained(out["simcse_dir"], dtype="float32")
    v = enc.encode(["A man plays the guitar.", "Someone is playing music."], normalize=True)
    assert v.shape == (2, 576) and np.isfinite(v).all()
