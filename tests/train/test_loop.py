"""The shared loop: exact resume, atomic checkpoints, config files and overrides, schedule, bad input."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import mntp_cfg, simcse_cfg  # noqa: E402

from l2v.train import loop as L  # noqa: E402
from l2v.train.config import MNTPConfig, SimCSEConfig, TrainConfig  # noqa: E402
from l2v.train.mntp import MNTPObjective  # noqa: E402
from l2v.train.simcse import SimCSEObjective  # noqa: E402


class Crash(Exception):
    pass


def _crash_at(k):
    def hook(step, metrics):
        if step == k:
            raise Crash(step)
    return hook


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in L.read_metrics(run_dir) if r.get("split") == "train"}


@pytest.mark.parametrize("kind", ["mntp", "simcse"])
def test_killed_and_resumed_run_matches_uninterrupted(tiny_dir, corpus, tmp_path, kind):
    make, objective = (mntp_cfg, MNTPObjective) if kind == "mntp" else (simcse_cfg, SimCSEObjective)
    kw = dict(steps=6, save_every=2, grad_accum=2)
    full = L.train(make(tiny_dir, corpus, tmp_path / "full", **kw), objective())
    with pytest.raises(Crash):
        L.train(make(tiny_dir, corpus, tmp_path / "cut", **kw), objective(), on_step=_crash_at(5))
    assert [p.name for p in L.checkpoint_dirs(tmp_path / "cut")] == ["step-0000002", "step-0000004"]
    resumed = L.train(make(tiny_dir, corpus, tmp_path / "cut", resume=True, **kw), objective())
    assert resumed["resumed_from"].endswith("step-0000004")
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint, then continued
    assert a[1] != a[6]  # training moved
    for step in (5, 6):
        assert abs(a[step] - b[step]) < 1e-3, (step, a[step], b[step])
    assert abs(full["final_loss"] - resumed["final_loss"]) < 1e-3


def test_existing_checkpoints_need_resume(tiny_dir, corpus, tmp_path):
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=2, save_every=1)
    L.train(cfg, MNTPObjective())
    with pytest.raises(L.TrainingError, match="--resume"):
        L.train(cfg, MNTPObjective())


def test_a_finished_run_is_never_replaced_without_overwrite(tiny_dir, corpus, tmp_path):
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=2)  # no --save-every: no checkpoints
    L.train(cfg, MNTPObjective())
    run = tmp_path / "run"
    adapter = {p.name: p.read_bytes() for p in (run / "adapter").iterdir() if p.is_file()}
    with pytest.raises(L.TrainingError, match="finished run.*--overwrite"):
        L.train(cfg, MNTPObjective())
    with pytest.raises(L.TrainingError, match="no checkpoint to resume"):
        L.train(cfg.replace(resume=True), MNTPObjective())
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir() if p.is_file()} == adapter
    with pytest.raises(ValueError, match="contradict"):
        cfg.replace(resume=True, overwrite=True)
    out = L.train(cfg.replace(overwrite=True, seed=7), MNTPObjective())
    assert out["resumed_from"] == "" and json.loads((run / L.RUN_CONFIG).read_text())["seed"] == 7


def test_overwrite_removes_the_replaced_runs_checkpoints(tiny_dir, corpus, tmp_path):
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=4, save_every=2)
    L.train(cfg, MNTPObjective())
    assert [p.name for p in L.checkpoint_dirs(tmp_path / "run")] == ["step-0000004"]
    L.train(cfg.replace(steps=1, save_every=0, overwrite=True), MNTPObjective())
    assert L.checkpoint_dirs(tmp_path / "run") == []  # a later --resume cannot pick up the old run's step 4


def test_resume_past_steps_is_refused_before_training(tiny_dir, corpus, tmp_path):
    """--resume with --steps below the checkpoint's step (e.g. left at its default) is an error, not an empty
    'finished' run with final_loss NaN."""
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=4, save_every=2)
    L.train(cfg, MNTPObjective())
    with pytest.raises(L.TrainingError, match=r"checkpoint is at step 4, past --steps 3; give --steps 4"):
        L.train(cfg.replace(resume=True, steps=3), MNTPObjective())
    with pytest.raises(L.TrainingError, match=r"already finished at step 4 .*--steps above 4"):
        L.train(cfg.replace(resume=True), MNTPObjective())  # nothing to train: was a summary with final_loss NaN
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4  # untouched


def test_resume_with_changed_settings_warns_naming_them(tiny_dir, corpus, tmp_path):
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=2, save_every=1)
    L.train(cfg, MNTPObjective())
    with pytest.warns(UserWarning, match=r"lr: 0.005 -> 0.001") as rec:
        L.train(cfg.replace(resume=True, steps=3, lr=1e-3), MNTPObjective())
    assert all("steps" not in str(w.message) for w in rec)  # extending a run is what --resume is for
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        L.train(cfg.replace(resume=True, steps=4, lr=1e-3), MNTPObjective())  # as saved by the last resume
    assert not [w for w in rec if "--resume" in str(w.message)]


def test_failed_checkpoint_write_keeps_last_good_one(tiny_dir, corpus, tmp_path, monkeypatch):
    import safetensors.torch as st

    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=4, save_every=2)
    real = st.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk is full
            real(tensors, path, *a, **k)
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError, match="No space"):
        L.train(cfg, MNTPObjective())
    root = tmp_path / "run" / L.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]  # no temp dir, no half checkpoint
    monkeypatch.setattr(st, "save_file", real)
    out = L.train(cfg.replace(resume=True), MNTPObjective())
    assert out["resumed_from"].endswith("step-0000002")


def test_run_dir_has_config_metrics_summary(tiny_dir, corpus, tmp_path):
    cfg = mntp_cfg(tiny_dir, corpus, tmp_path / "run", steps=3)
    summary = L.train(cfg, MNTPObjective())
    run = tmp_path / "run"
    saved = json.loads((run / L.RUN_CONFIG).read_text())
    assert saved["objective"] == "mntp" and saved["steps"] == 3 and saved["mask_fraction"] == 0.2
    recs = L.read_metrics(run)
    assert [r["step"] for r in recs if r.get("split") == "train"] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "acc"} <= set(recs[1])
    assert json.loads((run / "summary.json").read_text())["final_loss"] == summary["final_loss"]


def test_fewer_texts_than_a_batch_is_a_clear_error(tiny_dir, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("One short sentence here.\nAnother short sentence here.\n", encoding="utf-8")
    cfg = mntp_cfg(tiny_dir, str(path), tmp_path / "run", batch_size=8, val_size=0)
    with pytest.raises(L.TrainingError, match="fewer than one batch"):
        L.train(cfg, MNTPObjective())


def test_warmup_then_linear_decay():
    f = L.lr_lambda(TrainConfig(steps=10, warmup_steps=4))
    vals = [f(s) for s in range(10)]
    assert vals[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert vals[4] == pytest.approx(1.0) and vals[9] == pytest.approx(1 / 6)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:], strict=False))
    g = L.lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="constant"))
    assert [g(s) for s in range(10)] == [1.0] * 10


def test_data_order_is_deterministic_and_a_permutation():
    a, b = L.epoch_order(10, 3, 0), L.epoch_order(10, 3, 0)
    assert a == b and sorted(a) == list(range(10)) and a != L.epoch_order(10, 3, 1)


def test_config_file_and_overrides(tmp_path):
    import argparse

    from l2v.train.config import add_config_args, config_from_args

    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 0.001\nmask_fraction: 0.3\nmerge: true\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"steps": 9, "batch-size": 3}), encoding="utf-8")
    p = argparse.ArgumentParser()
    add_config_args(p, MNTPConfig)
    cfg = config_from_args(MNTPConfig, p.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.01"]))
    assert (cfg.steps, cfg.lr, cfg.mask_fraction, cfg.merge) == (7, 0.01, 0.3, True)
    cfg = config_from_args(MNTPConfig, p.parse_args(["--config", str(tmp_path / "c.json"), "--merge", "false"]))
    assert (cfg.steps, cfg.batch_size, cfg.merge) == (9, 3, False)
    assert SimCSEConfig().lr == 3e-5 and SimCSEConfig().attention_dropout == 0.3 and SimCSEConfig().scale == 20
    (tmp_path / "bad.yaml").write_text("stepz: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="stepz"):
        MNTPConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="max_texts must be an integer >= 1, got 0"):  # was: every text
        MNTPConfig(max_texts=0).validate()
    with pytest.raises(ValueError, match="mask_fraction"):
        MNTPConfig(mask_fraction=1.5).validate()
    with pytest.raises(FileNotFoundError):
        MNTPConfig.from_file(tmp_path / "missing.yaml")


def test_rng_state_roundtrip():
    torch.manual_seed(1)
    state = L._rng_state()
    x = torch.rand(3)
    L._set_rng_state(state)
    assert torch.equal(x, torch.rand(3))


# ---------------------------------------------------------------- --compile
@pytest.mark.parametrize("kind", ["mntp", "simcse"])
def test_compiled_training_matches_eager_without_dropout(tiny_dir, corpus, tmp_path, kind):
    make, objective = (mntp_cfg, MNTPObjective) if kind == "mntp" else (simcse_cfg, SimCSEObjective)
    kw = dict(steps=3, lora_dropout=0.0, **({"attention_dropout": 0.0} if kind == "simcse" else {}))
    eager = L.train(make(tiny_dir, corpus, tmp_path / "eager", **kw), objective())
    obj = objective()
    compiled = L.train(make(tiny_dir, corpus, tmp_path / "compiled", compile=True, **kw), obj)
    assert obj.encoder._compiled_train is not None and "_compiled_train" in obj.encoder._compile_checked
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert a[1] != a[3]
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert abs(eager["after"]["val_loss"] - compiled["after"]["val_loss"]) < 1e-4


def test_compiled_training_resumes_exactly_and_draws_every_dropout_mask(tiny_dir, corpus, tmp_path, monkeypatch):
    import l2v.train.dropout as D

    calls = []
    real = D.keep_mask
    monkeypatch.setattr(D, "keep_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(steps=4, save_every=2, compile=True)
    obj = SimCSEObjective()
    seen: list[int] = []
    full = L.train(simcse_cfg(tiny_dir, corpus, tmp_path / "full", **kw), obj,
                   on_step=lambda step, metrics: seen.append(len(calls)))
    n_dropouts = sum(isinstance(m, D.FastDropout) for m in obj.model.modules())
    per_step = {b - a for a, b in zip(seen, seen[1:], strict=False)}
    assert n_dropouts and per_step == {n_dropouts}  # the compiled step draws every LoRA mask; none merged away
    with pytest.raises(Crash):
        L.train(simcse_cfg(tiny_dir, corpus, tmp_path / "cut", **kw), SimCSEObjective(), on_step=_crash_at(3))
    resumed = L.train(simcse_cfg(tiny_dir, corpus, tmp_path / "cut", resume=True, **kw), SimCSEObjective())
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    for step in (3, 4):
        assert abs(a[step] - b[step]) < 1e-3, (step, a[step], b[step])
    assert abs(full["final_loss"] - resumed["final_loss"]) < 1e-3


def test_compile_with_gradient_checkpointing_is_refused(tiny_dir, corpus, tmp_path):
    with pytest.raises(ValueError, match="compile and gradient_checkpointing"):
        simcse_cfg(tiny_dir, corpus, tmp_path / "run", compile=True, gradient_checkpointing=True).validate()


class _TinyGradient(L.Objective):
    """One linear layer whose gradient (1e-8 per output) underflows to zero in fp16 activations."""

    name = "tiny-gradient"

    def setup(self, cfg, device):
        self.model = torch.nn.Linear(4, 4, bias=False)
        self.start = self.model.weight.detach().clone()
        self.examples = [torch.ones(1, 4)] * 4

    def collate(self, examples, generator):
        return torch.cat(list(examples))

    def loss(self, batch):
        return self.model(batch).float().sum() * 1e-8, {}

    def save(self, out_dir):
        pass


def test_fp16_autocast_scales_the_loss_so_small_gradients_survive(tmp_path):
    """Without a GradScaler, fp16 autocast flushed these gradients to zero and training silently did nothing."""
    kw = dict(steps=2, batch_size=2, warmup_steps=0, dtype="float16", device="cpu", progress=False,
              save_every=1)
    obj = _TinyGradient()
    L.train(TrainConfig(output_dir=str(tmp_path / "run"), **kw), obj)
    assert not torch.equal(obj.model.weight.detach(), obj.start)
    state = torch.load(L.checkpoint_dirs(tmp_path / "run")[-1] / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # saved with the checkpoint, so a resumed run keeps it
    resumed = L.train(TrainConfig(output_dir=str(tmp_path / "run"), resume=True, **{**kw, "steps": 3}),
                      _TinyGradient())
    assert resumed["resumed_from"].endswith("step-0000002")


def test_resume_on_fewer_gpus_restores_the_cuda_rng_it_can(monkeypatch):
    """A checkpoint saved with 2 GPUs' RNG states, resumed where there is 1: torch.cuda.set_rng_state_all raised
    IndexError for the missing GPU, so the resume failed. Simulated: no GPU is needed."""
    restored = []

    def fake_set_rng_state(new_state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= 1:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        restored.append(index)

    state = L._rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", fake_set_rng_state)
    L._set_rng_state(state)
    assert restored == [0]


def test_single_process_objectives_refuse_a_launcher(corpus, tmp_path, monkeypatch):
    """Under torchrun, an objective without a process group of its own would run one full copy per rank, every
    copy on the same GPU and writing the same output directory. It stops before loading anything (mntp, simcse
    and supervised are distributed)."""

    class OneProcess(L.Objective):
        name = "oneprocess"

        def setup(self, cfg, device):
            raise AssertionError("setup must not run")

    assert MNTPObjective.distributed and SimCSEObjective.distributed and not OneProcess.distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(L.TrainingError, match="train oneprocess runs in one process.*WORLD_SIZE"):
        L.train(TrainConfig(data=corpus, output_dir=str(tmp_path / "run"), progress=False), OneProcess())
    assert not (tmp_path / "run").exists()
