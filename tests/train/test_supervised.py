"""Supervised contrastive training: the loss, instructions, the loop integration, the CLI and bad input."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _pairs_helpers import one_thread, tiny_encoder, toy_pairs  # noqa: E402
from tiny import save_tiny  # noqa: E402

from l2v.data.pairs import PairExample, load_pairs  # noqa: E402
from l2v.train.supervised import PairStep, SupervisedConfig, info_nce, train_supervised  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()

def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    docs = [p[0], p[1], n[0], n[1]]
    expected = 0.0
    for i, target in ((0, 0), (1, 1)):
        logits = torch.tensor([20 * cos(q[i], d) for d in docs])
        expected += float(-logits[target] + torch.logsumexp(logits, 0)) / 2
    assert math.isclose(float(info_nce(q, p, n)), expected, rel_tol=1e-5)
    # a masked hard negative (example without one) is not a candidate
    mask = torch.tensor([True, False])
    expected_masked = 0.0
    for i in (0, 1):
        logits = torch.tensor([20 * cos(q[i], d) for d in docs[:3]])
        expected_masked += float(-logits[i] + torch.logsumexp(logits, 0)) / 2
    assert math.isclose(float(info_nce(q, p, n, mask)), expected_masked, rel_tol=1e-5)
    # in-batch only
    logits = 20 * F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    assert math.isclose(float(info_nce(q, p)), float(F.cross_entropy(logits, torch.arange(2))), rel_tol=1e-6)


def test_instructions_only_on_queries_for_asymmetric_tasks():
    enc = tiny_encoder()
    step = PairStep(enc)
    asym = PairExample("a query", "a doc", "a neg", query_instruction="Retrieve it")
    sym = PairExample("one", "two", None, query_instruction="Same meaning", doc_instruction="Same meaning")
    qs, ps, ns = step.tokenize([asym, sym])
    plain = enc.tokenize_one("a query")
    assert qs[0].start > plain.start and qs[0].ids[qs[0].start:qs[0].end] == plain.ids[plain.start:plain.end]
    assert ps[0].ids == enc.tokenize_one("a doc").ids and ns[0].ids == enc.tokenize_one("a neg").ids
    assert ps[1].ids == enc.tokenize_one("two", "Same meaning").ids and len(ns) == 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny")


def _pair_dir(root: Path, n=40):
    root.mkdir(parents=True, exist_ok=True)
    for name, k in (("retrieval", n), ("nli", n // 2)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for e in toy_pairs(k, seed=len(name)):
                fh.write(json.dumps({"query": e.query, "positive": e.positive, "negative": e.negative}) + "\n")
    (root / "instructions.json").write_text(json.dumps(
        {"retrieval": "Retrieve a passage", "nli": {"instruction": "Same meaning", "symmetric": True}}))
    return root


def _cfg(tiny_dir, tmp_path, **kw):
    base = dict(model=str(tiny_dir), data=str(_pair_dir(tmp_path / "pairs")), steps=3, batch_size=4,
                warmup_steps=0, lr=1e-3, dtype="float32", device="cpu", val_size=8, progress=False,
                lora_dropout=0.0, threads=1, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return SupervisedConfig(**base)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(run.glob("adapter/*.safetensors"))))


def test_loop_gradcache_equals_plain_and_saves_encoder(tiny_dir, tmp_path):
    s_plain = train_supervised(_cfg(tiny_dir, tmp_path, output_dir=str(tmp_path / "plain")))
    s_gc = train_supervised(_cfg(tiny_dir, tmp_path, output_dir=str(tmp_path / "gc"), gradcache_chunk=2))
    assert abs(s_plain["final_loss"] - s_gc["final_loss"]) < 1e-4
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "gc")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(float((v - 0).abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert "val_top1" in s_plain["before"] and "val_top1" in s_plain["after"]
    metrics = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("split") == "train"] == [1, 2, 3]
    cfg = json.loads((tmp_path / "plain" / "l2v_config.json").read_text())
    assert cfg["extra"]["query_instructions"] == {"retrieval": "Retrieve a passage", "nli": "Same meaning"}
    from l2v.encoder import Encoder

    enc = Encoder.from_pretrained(str(tmp_path / "plain"), dtype="float32", device="cpu")
    assert enc.encode(["hello"]).shape == (1, 32)


def test_default_scale_is_the_official_supervised_loss_scale(tiny_dir, tmp_path):
    """Official run_supervised.py: its train configs set no loss_scale, so HardNegativeNLLLoss gets the script's
    default 50 (temperature 0.02); 20 is only its SimCSE configs' value."""
    from l2v.train.supervised import SupervisedObjective

    assert SupervisedConfig().scale == 50.0
    obj = SupervisedObjective()
    obj.setup(_cfg(tiny_dir, tmp_path), torch.device("cpu"))
    assert obj.pair_step.config.scale == 50.0
    q, p = torch.eye(3), torch.eye(3).flip(0)
    assert math.isclose(float(info_nce(q, p, scale=obj.cfg.scale)),
                        float(F.cross_entropy(50.0 * q @ p.T, torch.arange(3))), rel_tol=1e-6)


def test_batches_come_from_one_dataset(tiny_dir, tmp_path):
    from l2v.train.supervised import SupervisedObjective

    cfg = _cfg(tiny_dir, tmp_path)
    obj = SupervisedObjective()
    obj.setup(cfg, torch.device("cpu"))
    for b in obj.batches(0):
        assert len(b) == 4 and len({obj.examples[i].dataset for i in b}) == 1
    by_name = {e.dataset: e for e in obj.examples}
    assert by_name["nli"].doc_instruction == "Same meaning" and by_name["retrieval"].doc_instruction is None


def test_cli_bad_input_names_file_and_line(tiny_dir, tmp_path, capsys):
    from l2v.cli import main

    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(12)]
    rows[4] = json.dumps({"query": "q", "positive": ""})
    rows[7] = json.dumps({"positive": "p"})
    bad.write_text("\n".join(rows) + "\n")
    common = ["train", "supervised", "--model", str(tiny_dir), "--data", str(bad), "--steps", "1",
              "--dtype", "float32", "--device", "cpu", "--val-size", "0", "--progress", "false"]
    assert main(common + ["--output-dir", str(tmp_path / "r1")]) == 2
    assert "bad.jsonl:5: 'positive' is an empty string" in capsys.readouterr().err
    assert main(common + ["--output-dir", str(tmp_path / "r2"), "--skip-bad-lines", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad line(s)" in err and "bad.jsonl:5" in err
    assert main(common + ["--output-dir", str(tmp_path / "r3"), "--skip-bad-lines", "--batch-size", "16"]) == 2
    assert "bad.jsonl:1-12: dataset 'bad' has 10 pairs" in capsys.readouterr().err
    imap = tmp_path / "i.json"
    imap.write_text('{"bad": "x",\n "typo": "y"}')
    assert main(common + ["--output-dir", str(tmp_path / "r4"), "--skip-bad-lines", "--instructions",
                          str(imap)]) == 2
    assert "i.json:2: unknown dataset 'typo'" in capsys.readouterr().err


def test_builtin_data_is_offline_wordnet(monkeypatch):
    from l2v.train.supervised import _data_paths

    paths, instr = _data_paths(SupervisedConfig())
    data = load_pairs(paths, instructions=instr)
    assert set(data.datasets()) == {"wordnet_usage", "wordnet_define", "wordnet_synonyms"}
    assert all(e.negative for e in data.examples[:100])


def test_resume_after_crash_is_exact(tiny_dir, tmp_path):
    full = train_supervised(_cfg(tiny_dir, tmp_path, steps=4, output_dir=str(tmp_path / "full")))

    def crash(step, metrics):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")

    cfg = _cfg(tiny_dir, tmp_path, steps=4, save_every=2, output_dir=str(tmp_path / "crash"))
    with pytest.raises(KeyboardInterrupt):
        train_supervised(cfg, on_step=crash)
    resumed = train_supervised(cfg.replace(resume=True))
    assert resumed["resumed_from"].endswith("step-0000002")
    assert abs(resumed["final_loss"] - full["final_loss"]) < 1e-5
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "crash")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_fp16_trains_with_loss_scaling(tiny_dir, tmp_path):
    """Supervised runs its own backward: the GradScaler was only asked get_scale(), never initialised, and the
    first fp16 step (what --dtype auto picks on a T4/V100) failed in unscale_ ("_scale is None")."""
    for name, chunk in (("plain", 0), ("gc", 2)):
        run = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # torch: "lr_scheduler.step() before optimizer.step()"
            summary = train_supervised(_cfg(tiny_dir, tmp_path, dtype="float16", steps=7, gradcache_chunk=chunk,
                                            save_every=7, log_every=1, output_dir=str(run)))
        assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN
        norms = [m["grad_norm"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if m.get("split") == "train"]
        assert len(norms) == 7 and norms[-1] == norms[-1]  # overflowing steps skipped, the scale found
        assert any(float(v.abs().sum()) > 0 for k, v in _adapter(run).items() if "lora_B" in k)  # it trained
        state = torch.load(next((run / "checkpoints").iterdir()) / "state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 1  # the loss scale is live and saved for a resume
        # the schedule advanced only on the steps the optimizer took (overflowing ones skipped it)
        assert 0 < state["scheduler"]["last_epoch"] < 7, state["scheduler"]


def test_each_step_draws_rank_own_dropout(tiny_dir, tmp_path, monkeypatch):
    """Every training step runs inside ``distributed.rank_rng`` (like mntp and simcse), so under a launcher each
    rank draws its own dropout masks instead of rank 0's; the step count shows it wraps each step exactly once."""
    import contextlib

    from l2v.train import distributed as D

    entered: list[str] = []
    real = D.rank_rng

    @contextlib.contextmanager
    def spy(device):
        entered.append(str(device))
        with real(device):
            yield

    monkeypatch.setattr(D, "rank_rng", spy)
    train_supervised(_cfg(tiny_dir, tmp_path, output_dir=str(tmp_path / "run")))
    assert entered == ["cpu"] * 3
