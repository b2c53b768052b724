"""Two CPU processes (gloo) give the loss and gradients of one process with the same global batch."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _pairs_helpers import dist_worker, grads, one_thread, tiny_encoder, toy_pairs  # noqa: E402

from l2v.train import distributed as D  # noqa: E402
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
