"""Two CPU processes (gloo) give the loss and gradients of one process with the same global batch (supervised,
MNTP, SimCSE), with dropout masks of their own."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _dist_helpers import train_worker  # noqa: E402
from _pairs_helpers import dist_worker, grads, one_thread, tiny_encoder, toy_pairs  # noqa: E402
from _train_helpers import corpus_file, mntp_cfg, simcse_cfg  # noqa: E402

from l2v.train import distributed as D  # noqa: E402
from l2v.train.loop import TrainingError, read_metrics, train  # noqa: E402
from l2v.train.mntp import MNTPObjective, shard_masked_batch  # noqa: E402
from l2v.train.simcse import SimCSEObjective  # noqa: E402
from l2v.train.supervised import PairStep, StepSettings  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_single_process(tmp_path):
    from safetensors.torch import load_file
    from test_supervised import _adapter, _pair_dir
    from tiny import save_tiny

    from l2v.train.supervised import SupervisedConfig, train_supervised

    n = 8
    loop_cfg = dict(model=save_tiny("llama", tmp_path / "tiny"), data=str(_pair_dir(tmp_path / "pairs")), steps=2,
                    batch_size=4, warmup_steps=0, lr=1e-3, dtype="float32", device="cpu", val_size=8,
                    progress=False, lora_dropout=0.0, threads=1, gradcache_chunk=1,
                    output_dir=str(tmp_path / "run2"))
    mp.start_processes(dist_worker, args=(2, _free_port(), str(tmp_path), n, 2, loop_cfg), nprocs=2, join=True,
                       start_method="spawn")
    # the training loop: rank 0 wrote the run; it equals a single-process run with the same global batches
    single = train_supervised(SupervisedConfig(**{**loop_cfg, "output_dir": str(tmp_path / "run1"),
                                                  "gradcache_chunk": 0}))
    assert abs(float(load_file(tmp_path / "loop0.safetensors")["final_loss"]) - single["final_loss"]) < 1e-4
    a, b = _adapter(tmp_path / "run1"), _adapter(tmp_path / "run2")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert (tmp_path / "run2" / "metrics.jsonl").is_file()
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for name, negatives, chunk in (("plain", "some", None), ("gradcache", "all", 2)):
        enc = tiny_encoder()
        enc.model.zero_grad()
        loss = PairStep(enc, StepSettings(chunk_size=chunk)).step(toy_pairs(n, negatives=negatives))
        ref = grads(enc.model)
        for r in ranks:
            assert abs(float(r[f"{name}.loss"]) - loss) < 1e-5, name
            for k, g in ref.items():
                torch.testing.assert_close(r[f"{name}.grad.{k}"], g, atol=1e-5, rtol=1e-5, msg=f"{name} {k}")


def test_single_process_helpers_are_noops():
    t = torch.randn(3, 4, requires_grad=True)
    assert D.gather_with_grad(t) is t
    assert D.shard_rows([1, 2, 3]) == [1, 2, 3]
    assert D.current().world_size == 1


def test_shard_rows_and_env(monkeypatch):
    info = D.DistInfo(rank=1, world_size=2)
    assert D.shard_rows(list(range(6)), info) == [3, 4, 5]
    with pytest.raises(ValueError, match="multiple of 2"):
        D.shard_rows(list(range(5)), info)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="inconsistent"):
        D.env_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        D.env_info()


def test_single_process_keeps_the_named_gpu(monkeypatch):
    """--device cuda:1 without a launcher trained on cuda:0 (the GPU index came from LOCAL_RANK, default 0) while
    the loop believed cuda:1. Simulated: no GPU is needed."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert D.init_distributed(device="cuda:1")[1] == torch.device("cuda", 1)
    assert D.init_distributed(device="cuda")[1] == torch.device("cuda", 0)
    assert D.init_distributed(device=None)[1] == torch.device("cuda", 0)
    assert D.init_distributed(device="cpu")[1] == torch.device("cpu")
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 0)]
    # Under a launcher every rank takes GPU LOCAL_RANK, whatever index --device names.
    rank1 = D.DistInfo(rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(D, "env_info", lambda: rank1)
    monkeypatch.setattr(D, "current", lambda: rank1)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)  # the process group exists already
    assert D.init_distributed(device="cuda:0")[1] == torch.device("cuda", 1)


# ------------------------------------------------------------------------------------- MNTP and SimCSE
WORLD = 2
RUNS = {  # global batch 4 = 2 rows per rank; dropout off so that one process and two ranks can match exactly
    "mntp": dict(steps=3, batch_size=4, grad_accum=2, lora_dropout=0.0),
    "simcse": dict(steps=3, batch_size=4, attention_dropout=0.0, lora_dropout=0.0),
}
SAME_TEXT = ["A man is playing a guitar on the street."] * (2 * WORLD)


def _cfg(kind, tiny, corpus, out, **kw):
    return (mntp_cfg if kind == "mntp" else simcse_cfg)(tiny, corpus, out, **{**RUNS[kind], **kw})


@pytest.fixture(scope="module")
def two_rank_runs(tiny_dir, tmp_path_factory):
    """One 2-process launch (spawning is the slow part) trains MNTP then SimCSE; the tests below read its files."""
    root = tmp_path_factory.mktemp("dist_runs")
    corpus = corpus_file(root)
    runs = [(kind, vars(_cfg(kind, tiny_dir, corpus, root / f"{kind}2"))) for kind in RUNS]
    resume = vars(simcse_cfg(tiny_dir, corpus, root / "resume", steps=4, save_every=2, attention_dropout=0.3))
    mp.start_processes(train_worker, args=(WORLD, _free_port(), str(root), runs, SAME_TEXT, resume), nprocs=WORLD,
                       join=True, start_method="spawn")
    return root, corpus


def _steps(records):
    return {k: [r[k] for r in records] for k in records[0]}


@pytest.mark.parametrize("kind", list(RUNS))
def test_mntp_and_simcse_on_two_ranks_match_one_process(two_rank_runs, tiny_dir, kind):
    from test_supervised import _adapter

    root, corpus = two_rank_runs
    ranks = [json.loads((root / f"{kind}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    single_steps: list[dict] = []
    objective = MNTPObjective() if kind == "mntp" else SimCSEObjective()
    single = train(_cfg(kind, tiny_dir, corpus, root / f"{kind}1"), objective,
                   on_step=lambda s, m: single_steps.append(m))
    ref = _steps([{k: m[k] for k in ranks[0]["steps"][0]} for m in single_steps])
    for r in ranks:  # every rank logs the global loss / accuracy / masked count, and the summed gradient's norm
        got = _steps(r["steps"])
        assert got.keys() == ref.keys() and len(got["loss"]) == RUNS[kind]["steps"]
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), (kind, k)
        assert r["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4, abs=1e-5)
    # each rank ran the model on its own half of the global batch (SimCSE: both views of it)
    rows = RUNS[kind]["batch_size"] // WORLD * (2 if kind == "simcse" else 1)
    n_forwards = RUNS[kind]["steps"] * RUNS[kind].get("grad_accum", 1)
    assert [[s[0] for s in r["shapes"]] for r in ranks] == [[rows] * n_forwards] * WORLD
    logged = [m["loss"] for m in read_metrics(root / f"{kind}2") if m.get("split") == "train"]  # rank 0's log
    assert logged == pytest.approx([m["loss"] for m in read_metrics(root / f"{kind}1")
                                    if m.get("split") == "train"], rel=1e-4, abs=1e-5)
    a, b = _adapter(root / f"{kind}1"), _adapter(root / f"{kind}2")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(float(v.abs().sum()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained


def test_simcse_ranks_draw_their_own_dropout_masks(two_rank_runs):
    """The same text on both ranks (same weights, same RNG state) embeds differently through dropout alone, and
    the ranks' shared RNG streams stay identical (a checkpoint from rank 0 fits every rank)."""
    root, _ = two_rank_runs
    r0, r1 = (torch.load(root / f"dropout.rank{r}.pt") for r in range(WORLD))
    assert r0["emb"].shape == r1["emb"].shape == (4, r0["emb"].shape[1])  # 2 texts x 2 views on each rank
    assert not torch.allclose(r0["emb"], r1["emb"], atol=1e-4)
    assert torch.equal(r0["rng"], r1["rng"])


def test_two_rank_simcse_with_dropout_resumes_exactly(two_rank_runs):
    """Crashed after its step-2 checkpoint (rank 0's RNG state, reloaded by every rank) and resumed, a 2-rank run
    with dropout on matches the uninterrupted one: the ranks' shared RNG streams never diverge."""
    from test_supervised import _adapter

    root, _ = two_rank_runs
    whole, resumed = root / "resume-whole", root / "resume-resumed"

    def losses(run):
        return {m["step"]: m["loss"] for m in read_metrics(run) if m.get("split") == "train"}

    assert list(losses(resumed)) == [1, 2, 3, 4]
    assert losses(resumed) == losses(whole)
    a, b = _adapter(whole), _adapter(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)


def test_rank_rng_gives_ranks_their_own_masks_and_keeps_the_shared_stream(monkeypatch):
    from l2v.train.dropout import keep_mask

    def draw():
        torch.manual_seed(0)
        with D.rank_rng("cpu"):
            mask = keep_mask((64, 64), 0.3)
        return mask, torch.get_rng_state()

    single_mask, _ = draw()  # one process: a no-op, dropout draws from the global stream as before
    torch.manual_seed(0)
    assert torch.equal(single_mask, keep_mask((64, 64), 0.3))
    out = []
    for rank in range(WORLD):
        monkeypatch.setattr(D, "current", lambda rank=rank: D.DistInfo(rank=rank, world_size=WORLD))
        out.append(draw())
    (m0, s0), (m1, s1) = out
    assert not torch.equal(m0, m1) and not torch.equal(m0, single_mask)
    assert 0.6 < float(m0.float().mean()) < 0.8  # still dropout with p = 0.3
    torch.manual_seed(0)
    torch.randint(0, 2**62, ())  # the shared stream advanced by exactly one draw on every rank
    assert torch.equal(s0, s1) and torch.equal(s0, torch.get_rng_state())


@pytest.mark.parametrize("side", ["right", "left"])
def test_mntp_rank_rows_are_masked_as_one_process_and_cropped(tiny_dir, tmp_path, side):
    obj = MNTPObjective()
    obj.setup(mntp_cfg(tiny_dir, corpus_file(tmp_path), tmp_path / "run"), torch.device("cpu"))
    obj.encoder.padding_side = side
    by_len = sorted(obj.examples[:16], key=lambda t: len(t.ids))
    items = by_len[:2] + by_len[-2:]  # rank 0 gets the short rows: its slice needs fewer columns
    assert len(items[1].ids) < len(items[3].ids)
    whole = obj._masked(items, torch.Generator().manual_seed(3))
    obj.model.eval()
    with torch.no_grad():
        ref = obj.logits(whole)
    labels = []
    for rank in range(WORLD):
        part = shard_masked_batch(whole, D.DistInfo(rank=rank, world_size=WORLD))
        local = obj.encoder.collate(items[2 * rank:2 * rank + 2])  # what this rank would pad to on its own
        for k in ("attention_mask", "pool_mask", "position_ids"):
            assert torch.equal(part[k], local[k]), k
        rows, cols = part["mask_rows"], part["mask_cols"]
        assert torch.equal(part["labels"], local["input_ids"][rows, cols])
        local["input_ids"][rows, cols] = obj.mask_id
        assert torch.equal(part["input_ids"], local["input_ids"])
        assert int(part["global_masked"]) == whole["labels"].numel()
        mine = (whole["mask_rows"] >= 2 * rank) & (whole["mask_rows"] < 2 * rank + 2)
        with torch.no_grad():
            torch.testing.assert_close(obj.logits(part), ref[mine], atol=1e-5, rtol=1e-4)
        labels.append(part["labels"])
    assert torch.equal(torch.cat(labels), whole["labels"])


@pytest.mark.parametrize("kind", list(RUNS))
def test_batch_size_must_split_over_the_ranks(tiny_dir, corpus, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    objective = MNTPObjective() if kind == "mntp" else SimCSEObjective()
    with pytest.raises(TrainingError, match=r"--batch-size 3 must be a multiple of the 2 ranks \(it is the global"):
        train(_cfg(kind, tiny_dir, corpus, tmp_path / "run", batch_size=3), objective)
