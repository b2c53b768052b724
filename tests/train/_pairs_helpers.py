"""Shared helpers for the supervised / GradCache / distributed tests: a tiny fp32 encoder and toy pairs."""

from __future__ import annotations

import torch
from tiny import tiny_model, tiny_tokenizer

from l2v.bidirectional import make_bidirectional
from l2v.data.pairs import PairExample
from l2v.encoder import Encoder

WORDS = ("cat dog fox city book music guitar weather river paris science model vector house tree stone "
         "light water fire cloud green blue small large quick lazy happy").split()


def tiny_encoder(arch: str = "llama", seed: int = 0, dropout: float = 0.0) -> Encoder:
    lm = tiny_model(arch, seed=seed)
    net = lm.model if hasattr(lm, "model") else lm.base_model
    if dropout:
        net.config.attention_dropout = dropout
        for m in net.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = dropout
    make_bidirectional(net)
    net.float().train()
    return Encoder(net, tiny_tokenizer(), pooling="mean", max_length=64)


def toy_pairs(n: int, seed: int = 0, negatives: str = "all") -> list[PairExample]:
    """``negatives``: "all", "none" or "some" (every third example lacks one)."""
    g = torch.Generator().manual_seed(seed)

    def sent(k: int) -> str:
        idx = torch.randint(len(WORDS), (k,), generator=g).tolist()
        return " ".join(WORDS[i] for i in idx)

    out = []
    for i in range(n):
        neg = None if negatives == "none" or (negatives == "some" and i % 3 == 0) else sent(3 + i % 4)
        out.append(PairExample(query=sent(2 + i % 3), positive=sent(4 + i % 5), negative=neg,
                               dataset="toy", source=f"toy:{i + 1}",
                               query_instruction="Retrieve a passage" if i % 2 == 0 else None))
    return out


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def dist_worker(rank: int, world: int, port: int, out_dir: str, n: int, chunk: int | None,
                loop_cfg: dict | None = None) -> None:
    """One rank of the 2-process gloo test: same model, same global batch, its own slice; saves loss + grads."""
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    from l2v.train import distributed as D
    from l2v.train.supervised import PairStep, StepSettings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info, _ = D.init_distributed(device="cpu")
    assert info.world_size == world and info.rank == rank
    try:
        results = {}
        for name, negatives, ch in (("plain", "some", None), ("gradcache", "all", chunk)):
            enc = tiny_encoder()
            enc.model.zero_grad()
            loss = PairStep(enc, StepSettings(chunk_size=ch)).step(toy_pairs(n, negatives=negatives))
            D.all_reduce_gradients(enc.model.parameters())
            results[f"{name}.loss"] = torch.tensor([loss])
            results.update({f"{name}.grad.{k}": v for k, v in grads(enc.model).items()})
        save_file(results, f"{out_dir}/rank{rank}.safetensors")
        if loop_cfg is not None:  # the whole training loop, launched like torchrun would
            from l2v.train.supervised import SupervisedConfig, train_supervised

            summary = train_supervised(SupervisedConfig(**loop_cfg))
            save_file({"final_loss": torch.tensor([summary["final_loss"]])}, f"{out_dir}/loop{rank}.safetensors")
        dist.barrier()
    finally:
        D.cleanup()


def one_thread():
    """Generator body for an autouse fixture: tiny models run fastest on one thread (and CI machines are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
