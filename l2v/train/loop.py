"""The one training loop shared by MNTP, SimCSE and supervised contrastive training.

An :class:`Objective` supplies the model, the training examples and the loss; the loop owns everything else:
seeding, the deterministic data order (so a resumed run sees exactly the batches it would have seen), AdamW with
warmup, gradient accumulation, autocast (fp16 with loss scaling), gradient clipping, checkpoints (trainable
weights + optimizer + scheduler + loss scale + RNG + data position, written to a temp dir then renamed) and exact
``resume``, a progress bar, and a ``metrics.jsonl`` / ``train_config.json`` in the run directory.

Adding an objective::

    class MyObjective(Objective):
        name = "mine"
        def setup(self, cfg, device): self.model = ...; self.examples = [...]; self.val_examples = [...]
        def collate(self, examples, generator): return batch          # deterministic given generator
        def loss(self, batch): return loss_tensor, {"acc": 0.5}
        def evaluate(self): return {"val_loss": ...}                  # optional
        def save(self, out_dir): ...                                  # the final artefact
    train(MyConfig(...), MyObjective())

Under a launcher (``torchrun`` / ``accelerate launch``, ``WORLD_SIZE`` > 1) every rank runs this loop over the
same seeded global batches. An objective that sets ``distributed = True`` (mntp, simcse, supervised) joins the
process group in ``setup()`` (:meth:`Objective.join_launcher`), computes the global loss from its own rows
(``forward_backward``), sums gradients over ranks (``sync_gradients``) and writes only on rank 0 (``is_main``);
any other objective is refused there rather than trained once per rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_directory, atomic_write_text
from . import distributed as D
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RUN_CONFIG = "train_config.json"


class TrainingError(ValueError):
    """A training run cannot start or continue; the message says what to change."""


class Objective:
    """What a training objective gives the loop. Subclass and fill in; see the module docstring."""

    name = "objective"
    distributed = False  # True: setup() joins the launcher's process group and splits the work over its ranks
    info = D.DistInfo()  # this rank (set by join_launcher); a single process by default
    model: nn.Module
    examples: Sequence[Any]
    val_examples: Sequence[Any] = ()

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        raise NotImplementedError

    def collate(self, examples: Sequence[Any], generator: torch.Generator) -> Any:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def save(self, out_dir: Path) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run's files (rank 0, or a single process)."""
        return self.info.is_main

    def join_launcher(self, cfg: TrainConfig, device: torch.device) -> torch.device:
        """For the ``setup()`` of a distributed objective: check that ``--batch-size`` (the global batch) splits
        evenly over the launcher's ranks, then join its process group and set :attr:`info`. Returns this rank's
        device (GPU ``LOCAL_RANK`` under a launcher); a single process gets rank 0 of 1 and its device."""
        world = D.env_info().world_size
        if cfg.batch_size % world:
            raise TrainingError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} ranks (it is the "
                                "global batch).")
        self.info, dev = D.init_distributed(
            device=cfg.device if cfg.device else (None if device.type == "cuda" else str(device)))
        return dev

    def sync_gradients(self) -> None:
        """Sum the trainable gradients over ranks before clipping (each rank holds its share of the global batch's
        gradient); a no-op in a single process."""
        D.all_reduce_gradients([p for _, p in self.trainable_parameters()], average=False)


# ------------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast where asked (or 'auto' and supported natively), else nothing (fp32)."""
    from ..encoder import resolve_dtype

    resolved = resolve_dtype(dtype, device)
    if resolved == torch.float32 or device.type not in ("cpu", "cuda", "mps"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolved)


def grad_scaler(dtype: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling under fp16 autocast, whose small gradients otherwise underflow to zero in fp16 activations
    (a bf16 or fp32 run gets a disabled scaler: every call is then a no-op)."""
    from ..encoder import resolve_dtype

    fp16 = device.type in ("cpu", "cuda") and resolve_dtype(dtype, device) == torch.float16
    return torch.amp.GradScaler(device.type if fp16 else "cpu", enabled=fp16)


def _loss_scale(scaler: torch.amp.GradScaler, device: torch.device) -> float:
    """The scaler's current factor for an objective that runs its own backward (1.0 when disabled).

    Through ``scaler.scale()``, not ``get_scale()``: that call also creates the scaler's state on first use, which
    ``unscale_``/``update`` need (with ``get_scale()`` alone the first fp16 step failed "_scale is None").
    """
    return float(scaler.scale(torch.ones((), device=device)))


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm, total = cfg.warmup_steps, cfg.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_generator(seed: int, micro_step: int) -> torch.Generator:
    """A generator for per-batch randomness (e.g. MNTP masks) that depends only on the data position."""
    return torch.Generator().manual_seed((seed * 7_919 + micro_step * 104_729 + 17) % 2**62)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
                  for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np_state = [x.numpy() if isinstance(x, torch.Tensor) else x for x in state["numpy"]]
    np.random.set_state(tuple(np_state))
    if "cuda" in state and torch.cuda.is_available():
        # Resumed on fewer GPUs than it was saved on: restore the ones there are (set_rng_state_all raised
        # IndexError for the others).
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs start with '.' and are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.pt").is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint directory (``step-N``) was saved at."""
    return int(ckpt.name.split("-")[1])


def save_checkpoint(run_dir: Path, step: int, objective: Objective, optimizer: torch.optim.Optimizer,
                    scheduler: Any, keep: int, scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a checkpoint to a temp dir, then rename it into place: a crash never leaves a half-written one."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_directory(final, fsync=True) as tmp:  # fsync: durable before the rename publishes it
        weights = {n: p.detach().to("cpu").contiguous() for n, p in objective.trainable_parameters()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "rng": _rng_state()},
                   tmp / "state.pt")
    if keep:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, objective: Objective, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler | None = None) -> int:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(objective.trainable_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise TrainingError(f"{ckpt}: checkpoint does not match this run's trainable parameters "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the config changed?")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise TrainingError(f"{ckpt}: {n} has shape {tuple(weights[n].shape)}, run has {tuple(p.shape)}.")
            p.copy_(weights[n])
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------------ metrics
class MetricsLog:
    """Append-only jsonl; on resume, lines past the checkpoint step are dropped so the log tells one story."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step and rec.get("event") != "end":
                    keep.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the loop
def train(
    cfg: TrainConfig,
    objective: Objective,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``objective`` as ``cfg`` says; returns a summary (also written to ``summary.json``).

    ``on_step(step, metrics)`` is called after every optimizer step (tests use it to simulate a crash).
    """
    from ..encoder import Encoder, default_device

    cfg.validate()
    world = D.env_info().world_size
    if world > 1 and not objective.distributed:
        raise TrainingError(f"l2v train {objective.name} runs in one process, but a launcher started {world} "
                            "(WORLD_SIZE): each would train its own copy on the same GPU into the same "
                            "--output-dir. Run it without torchrun/accelerate (train mntp, simcse and supervised "
                            "are distributed).")
    run_dir = Path(cfg.output_dir)
    existing = _check_run_dir(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device) if cfg.device else default_device()
    seed_everything(cfg.seed)

    t_setup = time.perf_counter()
    objective.setup(cfg, device)
    if cfg.compile:
        encoder = getattr(objective, "encoder", None)
        if not isinstance(encoder, Encoder):  # every nn.Module has a compile(); only Encoder's takes training=
            raise TrainingError(f"--compile: objective {objective.name!r} has no encoder to compile.")
        encoder.compile(training=True)
        _say(cfg, "--compile: the first step compiles the model (a few minutes on CPU; later steps are faster)")
    n = len(objective.examples)
    if n == 0:
        raise TrainingError(f"{cfg.data}: no training examples left (after holding out {cfg.val_size} for "
                            "validation); give a larger corpus or a smaller --val-size.")
    if n < cfg.batch_size:
        raise TrainingError(f"{cfg.data}: only {n} training examples, fewer than one batch "
                            f"(--batch-size {cfg.batch_size}); give more text or a smaller batch size.")
    # Optional objective hooks: batches(epoch) picks each epoch's batches itself (supervised: one dataset per
    # batch); forward_backward(batch, scale) runs its own backward (GradCache, cross-rank gather: supervised, and
    # mntp/simcse under a launcher). Every objective's sync_gradients() runs before clipping (a no-op in one
    # process) and is_main=False silences writes on other ranks.
    custom_batches = getattr(objective, "batches", None)
    own_backward = getattr(objective, "forward_backward", None)
    main = objective.is_main
    batches_per_epoch = len(custom_batches(0)) if custom_batches else n // cfg.batch_size
    params = [p for _, p in objective.trainable_parameters()]
    if not params:
        raise TrainingError(f"objective {objective.name!r} has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = grad_scaler(cfg.dtype, device)

    start_step = 0
    resumed_from = None
    if cfg.resume and existing:
        _warn_changed_config(run_dir, cfg)
        resumed_from = existing[-1]
        start_step = load_checkpoint(resumed_from, objective, optimizer, scheduler, scaler)
        _say(cfg, f"resuming from {resumed_from} (step {start_step}/{cfg.steps})")
    elif cfg.resume:
        _say(cfg, f"--resume: no checkpoint in {run_dir / CHECKPOINTS}; starting from step 0")
    if main:
        cfg.save(run_dir / RUN_CONFIG, objective=objective.name)
    log = MetricsLog(run_dir / METRICS, start_step if resumed_from else None) if main else _NoLog()
    setup_s = time.perf_counter() - t_setup
    autocast = autocast_context(cfg.dtype, device)

    summary: dict[str, Any] = {"objective": objective.name, "output_dir": str(run_dir), "steps": cfg.steps,
                               "train_examples": n, "val_examples": len(objective.val_examples),
                               "setup_s": round(setup_s, 2)}
    if start_step == 0:
        before = _evaluate(objective, autocast)
        if before:
            log.write(step=0, split="val", **before)
            summary["before"] = before
            _say(cfg, "before training: " + _fmt(before))
    else:
        summary["before"] = _first_val(run_dir)

    from tqdm.auto import tqdm

    order_cache: dict[int, list[int]] = {}
    objective.model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=objective.name, unit="step",
               disable=not cfg.progress or not main,
               dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    try:
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                m = step * cfg.grad_accum + micro
                epoch, index = divmod(m, batches_per_epoch)
                if epoch not in order_cache:
                    order_cache.clear()
                    order_cache[epoch] = custom_batches(epoch) if custom_batches else epoch_order(n, cfg.seed, epoch)
                idx = order_cache[epoch][index] if custom_batches else \
                    order_cache[epoch][index * cfg.batch_size:(index + 1) * cfg.batch_size]
                batch = objective.collate([objective.examples[i] for i in idx], batch_generator(cfg.seed, m))
                with autocast:
                    if own_backward:
                        loss, extra = own_backward(batch, _loss_scale(scaler, params[0].device) / cfg.grad_accum)
                    else:
                        loss, extra = objective.loss(batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"step {step + 1}: loss is {loss.item()}; lower --lr or use --dtype "
                                        "float32.")
                if not own_backward:
                    scaler.scale(loss / cfg.grad_accum).backward()
                totals["loss"] = totals.get("loss", 0.0) + loss.item() / cfg.grad_accum
                for k, v in extra.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
            objective.sync_gradients()
            scaler.unscale_(optimizer)  # fp16: clip and step on the true gradients (a step with inf/NaN is skipped)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                       else float("inf"))
            lr = scheduler.get_last_lr()[0]
            scale = scaler.get_scale() if scaler.is_enabled() else 0.0
            scaler.step(optimizer)
            scaler.update()
            if not scaler.is_enabled() or scaler.get_scale() >= scale:
                # fp16: a step with inf/NaN gradients is skipped (the scale drops); the schedule waits for the
                # first real step, as transformers' Trainer does (torch warned "lr_scheduler.step() before
                # optimizer.step()" and the warm-up lost a step per overflow)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = {**totals, "lr": lr, "grad_norm": float(grad_norm), "step_s": time.perf_counter() - t_step,
                    "epoch": (done * cfg.grad_accum) / batches_per_epoch}
            if done % cfg.log_every == 0 or done == cfg.steps:
                log.write(step=done, split="train", **{k: _round(v) for k, v in last.items()})
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                val = _evaluate(objective, autocast)
                if val:
                    log.write(step=done, split="val", **val)
                objective.model.train()
            if main and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save_checkpoint(run_dir, done, objective, optimizer, scheduler, cfg.keep_checkpoints, scaler)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if on_step is not None:
                on_step(done, last)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    after = _evaluate(objective, autocast)
    if after:
        log.write(step=cfg.steps, split="val", **after)
        summary["after"] = after
        _say(cfg, "after training:  " + _fmt(after))
    ran = cfg.steps - start_step
    summary.update(train_s=round(train_s, 2), s_per_step=round(train_s / ran, 4) if ran else None,
                   final_loss=_round(last.get("loss", float("nan"))), resumed_from=str(resumed_from or ""))
    if not main:
        return summary
    objective.save(run_dir)
    if cfg.save_every:  # the finished run is the artefact; keep one final checkpoint for later resumes/extends
        save_checkpoint(run_dir, cfg.steps, objective, optimizer, scheduler, 1, scaler)
    log.write(step=cfg.steps, event="end", **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _say(cfg, f"saved encoder to {run_dir}")
    return summary


# Fields that may differ when a run is resumed: how long it runs, how it is logged and saved, where it runs.
_RESUMABLE_CHANGES = {"steps", "save_every", "keep_checkpoints", "log_every", "eval_every", "progress", "resume",
                      "overwrite", "threads", "device", "compile", "merge", "output_dir"}


def _check_run_dir(run_dir: Path, cfg: TrainConfig) -> list[Path]:
    """The run's checkpoints, after refusing to replace an earlier run unless ``cfg.overwrite`` says so.

    A finished run without checkpoints (trained without --save-every) is only recognisable by its summary.json;
    training into it again would silently replace its encoder. ``overwrite`` removes the old checkpoints, so a
    later --resume cannot pick one of the replaced run's.
    """
    existing = checkpoint_dirs(run_dir)
    finished = (run_dir / "summary.json").is_file()
    if cfg.overwrite:
        if existing:
            shutil.rmtree(run_dir / CHECKPOINTS)
        return []
    if existing and not cfg.resume:
        raise TrainingError(f"{run_dir}: already holds checkpoints (latest {existing[-1].name}); pass --resume to "
                            "continue that run, --overwrite to replace it, or choose another --output-dir.")
    if finished and not existing:
        what = ("--resume: it has no checkpoint to resume from (trained without --save-every)" if cfg.resume
                else "training again would replace its encoder")
        raise TrainingError(f"{run_dir}: holds a finished run (summary.json); {what}. Choose another "
                            "--output-dir, or pass --overwrite to replace it.")
    if existing and cfg.resume:
        # Found before the model loads: resuming past --steps would "finish" a run that never trained to it
        # (an empty summary, final_loss NaN) -- typically --steps was left at its default on --resume.
        at = checkpoint_step(existing[-1])
        if at > cfg.steps:
            raise TrainingError(f"{run_dir}: --resume: the latest checkpoint is at step {at}, past --steps "
                                f"{cfg.steps}; give --steps {at} or more (and the run's other options).")
        if at == cfg.steps and finished:
            raise TrainingError(f"{run_dir}: --resume: the run already finished at step {at} (summary.json); "
                                f"give --steps above {at} to extend it.")
    return existing


def _warn_changed_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming replays the saved data order and optimizer state; say which settings differ from the saved run."""
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    now = cfg.to_dict()
    changed = sorted(k for k, v in now.items() if k in saved and k not in _RESUMABLE_CHANGES and saved[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        msg = f"--resume: settings differ from the run being resumed ({detail}); the result is not that run's."
        warnings.warn(msg, stacklevel=3)


class _NoLog:
    """Metrics sink for non-main ranks of a distributed run."""

    def write(self, **record: Any) -> None:
        pass


def _evaluate(objective: Objective, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    if not objective.val_examples:
        return {}
    was = objective.model.training
    objective.model.eval()
    try:
        with torch.no_grad(), autocast:
            out = objective.evaluate()
    finally:
        objective.model.train(was)
    return {k: _round(v) for k, v in out.items()}


def _first_val(run_dir: Path) -> dict[str, Any]:
    for rec in read_metrics(run_dir):
        if rec.get("split") == "val" and rec.get("step") == 0:
            return {k: v for k, v in rec.items() if k not in ("step", "split")}
    return {}


def _round(v: float) -> float:
    return float(v) if not math.isfinite(v) else float(f"{v:.6g}")


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in d.items())


def _say(cfg: TrainConfig, msg: str) -> None:
    if cfg.progress:
        print(f"l2v: {msg}", file=sys.stderr)
