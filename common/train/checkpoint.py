"""The finetuning checkpoint: a run's whole state in one file, saved atomically and restored.

:func:`common.train.finetune.finetune` saves, every ``checkpoint_every`` seconds and after each epoch,
the model, optimizer, schedule, RNG states, the callback's state and the :class:`Position` within the
run (format ``CHECKPOINT_FORMAT``). A restore refuses a file of another run: its identity (the recipe,
the total steps, the steps per epoch and the world size) must match, and the message names what differs.

A caller that knows more about what is finetuned (the experiment: its log, the dense checkpoint, the
plan, the data) gives it as the ``owner``: a file whose owner differs, or that has none, is stale
state of something else; it is discarded, with a message naming what differs, and training starts over.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from common.files import atomic_write

CHECKPOINT_FORMAT = "htd-finetune-checkpoint/1"


@dataclass
class Position:
    """How far a finetuning run is: what a checkpoint restores besides the weights and optimizer."""

    done: int = 0  # steps over all epochs
    epoch: int = 0  # index of the epoch in progress
    in_epoch: int = 0  # steps of that epoch done
    sums: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])  # its loss sum, correct, images
    images_seen: int = 0  # images of the finished epochs
    history: list[dict] = dataclasses.field(default_factory=list)


class Run(Protocol):
    """What a :class:`Checkpointer` saves and restores of a finetuning run
    (``common.train.finetune._FinetuneRun``)."""

    cfg: Any  # the run's FinetuneConfig (a dataclass)
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    train_loader: Any  # a BatchLoader or StreamLoader (its len: steps per epoch)
    total_steps: int
    pos: Position
    rank: int
    world: int


class Checkpointer:
    """Saves a finetuning run's whole state to one file (atomically) and restores it."""

    def __init__(
        self,
        path: Path,
        every: float,
        callback: Any,
        owner: dict | None = None,
        say: Callable[[str], None] = print,
    ):
        """``owner``: JSON-like identity of what is finetuned, saved with the state; a file of another
        owner is discarded (a message to ``say``). None: files are told apart by their recipe only."""
        self.path, self.every, self.callback = path, float(every), callback
        self.owner, self.say = owner, say
        self.last = time.perf_counter()

    def _identity(self, run: Run) -> dict:
        recipe = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(run.cfg).items()}
        return {
            "recipe": recipe,
            "total_steps": run.total_steps,
            "steps_per_epoch": len(run.train_loader),
            "world_size": run.world,
        }

    def maybe_save(self, run: Run) -> None:
        if time.perf_counter() - self.last >= self.every:
            self.save(run)

    def save(self, run: Run) -> None:
        self.last = time.perf_counter()
        if run.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            **self._identity(run),
            "position": dataclasses.asdict(run.pos),
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "callback": self.callback.state_dict() if hasattr(self.callback, "state_dict") else None,
            "owner": self.owner,
        }
        atomic_write(self.path, lambda fh: torch.save(state, fh))

    def restore(self, run: Run) -> None:
        """Load the checkpoint into ``run`` if the file exists (a fresh run otherwise)."""
        if not self.path.exists():
            return
        try:
            state = torch.load(self.path, map_location=run.device, weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"finetune checkpoint {self.path} is unreadable ({type(exc).__name__}: {exc}); delete it to start over"
            ) from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path} is not a finetune checkpoint ({CHECKPOINT_FORMAT}); delete or move it")
        if self.owner is not None and state.get("owner") != self.owner:
            self._discard(state.get("owner"))
            return
        want = self._identity(run)
        diff = [k for k in want if state.get(k) != want[k]]
        if "recipe" in diff:
            diff.remove("recipe")
            diff += [f"recipe.{k}" for k in want["recipe"] if state["recipe"].get(k) != want["recipe"][k]]
        if diff:
            raise ValueError(
                f"finetune checkpoint {self.path} belongs to another run (differs in {', '.join(diff)}); "
                "delete it to start this finetuning over"
            )
        try:
            run.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"finetune checkpoint {self.path} holds another model: {exc}") from exc
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), run.device)
        if state["callback"] is not None and hasattr(self.callback, "load_state_dict"):
            self.callback.load_state_dict(state["callback"])
        run.pos = Position(**state["position"])
        self.say(f"resuming from the finetune checkpoint {self.path} ({run.pos.done} of {run.total_steps} steps done)")

    def _discard(self, owner: Any) -> None:
        """Delete a checkpoint of another owner (stale state: nothing can resume it), saying what differs."""
        if isinstance(owner, dict):
            keys = sorted(k for k in self.owner.keys() | owner.keys() if owner.get(k) != self.owner.get(k))
            why = f"it belongs to another {', '.join(keys)}"
        else:
            why = "it does not say what it finetunes (saved before that was recorded)"
        self.path.unlink(missing_ok=True)
        self.say(f"discarded the finetune checkpoint {self.path}: {why}; this finetuning starts from its beginning")
