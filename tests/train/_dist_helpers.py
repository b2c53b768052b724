"""Worker for the 2-process (gloo) MNTP / SimCSE tests: whole training runs launched as torchrun would."""

from __future__ import annotations

import json
import os

import torch

STEP_KEYS = ("loss", "acc", "masked", "grad_norm")


def _spy(base: type) -> type:
    """``base`` (an objective class) recording the rows and columns of every forward that trains (grad on)."""

    class Spy(base):
        def setup(self, cfg, device):
            super().setup(cfg, device)
            self.shapes: list[list[int]] = []

            def hook(module, args, kwargs):
                if torch.is_grad_enabled():
                    self.shapes.append(list(kwargs["input_ids"].shape))

            self.encoder.model.register_forward_pre_hook(hook, with_kwargs=True)

    return Spy


class Crash(Exception):
    pass


def _crash_at(k: int):
    def hook(step: int, metrics: dict) -> None:
        if step == k:
            raise Crash(step)
    return hook


def train_worker(rank: int, world: int, port: int, out_dir: str, runs: list[tuple[str, dict]],
                 dropout_texts: list[str] | None = None, resume_cfg: dict | None = None) -> None:
    """Run each ``(kind, config)`` of ``runs`` through the shared loop on this rank; write per-step metrics, the
    training forwards' shapes and the summary's final loss to ``out_dir/<kind>.rank<r>.json``. With
    ``dropout_texts``, also embed the same global batch of identical texts once with SimCSE's dropout on and save
    this rank's embeddings and its RNG state afterwards (``dropout.rank<r>.pt``). With ``resume_cfg`` (a SimCSE
    config with dropout on and checkpoints), train it into ``<output_dir>-whole`` and, crashed after the first
    checkpoint and resumed, into ``<output_dir>-resumed``."""
    import torch.distributed as dist

    from l2v.train import distributed as D
    from l2v.train.config import MNTPConfig, SimCSEConfig
    from l2v.train.loop import train
    from l2v.train.mntp import MNTPObjective
    from l2v.train.simcse import SimCSEObjective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    kinds = {"mntp": (MNTPConfig, MNTPObjective), "simcse": (SimCSEConfig, SimCSEObjective)}
    try:
        for kind, cfg in runs:
            config_cls, objective_cls = kinds[kind]
            steps: list[dict] = []
            objective = _spy(objective_cls)()
            summary = train(config_cls(**cfg), objective,
                            on_step=lambda s, m, steps=steps: steps.append({k: m[k] for k in STEP_KEYS if k in m}))
            with open(f"{out_dir}/{kind}.rank{rank}.json", "w", encoding="utf-8") as fh:
                json.dump({"steps": steps, "shapes": objective.shapes, "final_loss": summary["final_loss"],
                           "world": objective.info.world_size}, fh)
        if dropout_texts:
            cfg = SimCSEConfig(**{**runs[-1][1], "attention_dropout": 0.3, "lora_dropout": 0.3, "val_size": 0})
            torch.manual_seed(0)  # as the loop's seeding: every rank starts with the same weights and RNG
            obj = SimCSEObjective(dropout_texts)
            obj.setup(cfg, torch.device("cpu"))
            out: list[torch.Tensor] = []
            obj.encoder.register_forward_hook(lambda m, i, o: out.append(o.detach()))
            obj.model.train()
            torch.manual_seed(1)
            obj.forward_backward(obj.collate(obj.examples[:2 * world], torch.Generator()), 1.0)
            torch.save({"emb": out[0], "rng": torch.get_rng_state()}, f"{out_dir}/dropout.rank{rank}.pt")
        if resume_cfg:
            whole = {**resume_cfg, "output_dir": resume_cfg["output_dir"] + "-whole"}
            resumed = {**resume_cfg, "output_dir": resume_cfg["output_dir"] + "-resumed"}
            train(SimCSEConfig(**whole), SimCSEObjective())
            try:
                train(SimCSEConfig(**resumed), SimCSEObjective(), on_step=_crash_at(resume_cfg["save_every"] + 1))
            except Crash:
                pass
            train(SimCSEConfig(**{**resumed, "resume": True}), SimCSEObjective())
        dist.barrier()
    finally:
        D.cleanup()
