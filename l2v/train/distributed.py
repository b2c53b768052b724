"""torch.distributed plumbing for training (supervised, SimCSE, MNTP): one code path from 1 CPU to many GPUs on many
nodes.

* :func:`init_distributed` reads the environment that ``torchrun`` and ``accelerate launch`` both set
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it, it is a no-op and the
  run is a single process. Multi-GPU users only change the launcher.
* :func:`gather_with_grad` all-gathers embeddings so every rank sees every in-batch negative. The gathered copy
  of this rank's own rows is replaced by the local tensor, so gradients flow into the local rows. Every rank then
  computes the *same global loss*; rank r back-propagates the part of it that depends on its own rows. Summed
  over ranks that is exactly the full-batch gradient, so :func:`all_reduce_gradients` **sums** (``average=False``)
  or equivalently the loss is multiplied by the world size before a mean-reducing step (what DDP does).
* :func:`shard_rows` gives each rank its contiguous slice of a global batch: the batch sampler is seeded
  identically on every rank, so the global batch — and hence the loss — is the same as with one process.
* :func:`rank_rng` gives each rank its own dropout noise for one step while the ranks' shared RNG streams (the
  state a checkpoint saves from rank 0 and every rank reloads) stay in lockstep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun/accelerate).") \
            from exc


def env_info() -> DistInfo:
    """Rank / world size from the launcher's environment (torchrun, accelerate launch, SLURM via torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}.")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def current() -> DistInfo:
    """The initialised process group's rank and size, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=_env_int("LOCAL_RANK", dist.get_rank()))
    return DistInfo()


def init_distributed(backend: str | None = None, device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment, if any; return (info, device for this rank).

    ``backend``: default ``nccl`` when CUDA is used, else ``gloo``. Each rank uses GPU ``LOCAL_RANK``; a single
    process uses the GPU ``device`` names (``cuda:1``), else GPU 0. Calling it twice, or in a plain single-process
    run, is harmless.
    """
    info = env_info()
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        named = torch.device(device) if device is not None else None
        if not info.distributed and named is not None and named.index is not None:
            dev = named  # --device cuda:1 in a single process (a launcher's ranks each take GPU LOCAL_RANK)
        else:
            dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    if info.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={info.world_size} but MASTER_ADDR is not set: launch with `torchrun "
                "--nproc_per_node N -m l2v ...` or `accelerate launch -m l2v ...`.")
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"),
                                rank=info.rank, world_size=info.world_size)
        import atexit

        atexit.register(cleanup)
    return current(), dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenate ``local`` (rows, ...) from all ranks in rank order; gradients flow into this rank's rows.

    Every rank must pass the same number of rows. Without a process group, returns ``local`` itself.
    """
    info = current()
    if not info.distributed:
        return local
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[info.rank] = local
    return torch.cat(parts, dim=0)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], average: bool = False) -> None:
    """Sum (or average) ``.grad`` over ranks in one flat buffer per dtype/device. No-op without a process group.

    Use ``average=False`` with :func:`gather_with_grad` losses (each rank holds its share of the global gradient).
    """
    info = current()
    if not info.distributed:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:  # keep every rank's buffer layout identical
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        if average:
            flat /= info.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (for logging)."""
    info = current()
    if not info.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over ranks (a new tensor; on the rank's GPU under nccl). Itself without a process group."""
    if not current().distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


@contextlib.contextmanager
def rank_rng(device: torch.device | str) -> Iterator[None]:
    """Inside: torch's CPU RNG and ``device``'s CUDA RNG are reseeded per rank (dropout masks differ across ranks).

    Every rank starts a step with the same RNG state (seeded alike; a resumed run reloads rank 0's checkpointed
    state on every rank), so without this rank r's rows would get exactly rank 0's dropout masks. The seed mixes
    one draw from the shared generator (identical on all ranks, so their shared streams advance in lockstep and a
    checkpoint stays valid for all of them) with the rank; on exit the forked state is dropped. Without a process
    group it does nothing (a single process keeps drawing from the global stream, as before).
    """
    info = current()
    if not info.distributed:
        yield
        return
    draw = int(torch.randint(0, 2**62, ()))  # the same number on every rank
    with seeded_rng(device, (draw * 1_000_003 + info.rank) % 2**63):
        yield


@contextlib.contextmanager
def seeded_rng(device: torch.device | str, seed: int) -> Iterator[None]:
    """Inside: torch's CPU RNG and ``device``'s CUDA RNG seeded with ``seed``; both are restored on exit.

    Only ``device``'s GPU is forked and seeded (``torch.manual_seed`` would reseed every GPU, and forking them all
    warns on a multi-GPU node and touches other ranks' devices).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def shard_span(n: int, info: DistInfo | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of a global batch of ``n`` rows (``n`` must divide evenly)."""
    info = info or current()
    if n % info.world_size:
        raise ValueError(f"global batch of {n} rows does not split evenly over {info.world_size} ranks; "
                         f"use a batch size that is a multiple of {info.world_size}.")
    per = n // info.world_size
    return info.rank * per, (info.rank + 1) * per


def shard_rows(rows: Sequence[T], info: DistInfo | None = None) -> list[T]:
    """This rank's contiguous share of a global batch (the batch size must divide evenly by the world size)."""
    info = info or current()
    if info.world_size == 1:
        return list(rows)
    lo, hi = shard_span(len(rows), info)
    return list(rows[lo:hi])


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
