"""Trainer hooks: the callback interface the training loop calls, and the registry that plugins add to.

:meth:`pretrain.trainer.Trainer.fit` calls every callback, on every rank, in list order: the built-ins of
pretrain/callbacks.py first, then those registered here (``register_callback``, usually from a plugin module
named in ``$POLAR_PLUGINS``, models/plugins.py). The events:

* ``on_fit_start(trainer)``: once, after any resume, before the first step.
* ``on_loss(trainer, loss) -> loss``: each micro-batch's loss before backward; what it returns is
  back-propagated (and checked for non-finite values exactly like the model's own).
* ``on_step_end(trainer, record) -> Stop | None``: after each optimizer step, with the step's metrics record
  (``loss`` None when the step was non-finite). A returned :class:`Stop` ends the run after this step; the
  callbacks after it are not called for this step. Decide identically on every rank (from the step, the
  record, or all-reduced values): a Stop on one rank alone would leave the others waiting in a collective.
* ``on_fit_end(trainer, stop)``: once, in order, when the loop ends: with the Stop, or with None when an
  exception is propagating (then only clean up).

Callbacks use the trainer's public attributes (``cfg``, ``state``, ``budget``, ``engine``, ``env``,
``is_main``, ``run_dir``, ``metrics``, ``checkpointer``) and methods (``evaluate``, ``state_dict``, ``print``,
``write_status``, ``request_stop``), and must not change what a checkpoint restores (``trainer.state``, the
weights, the RNG) unless that is their point: resumes are bitwise. docs/training.md shows how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pretrain.trainer import Trainer


@dataclass(frozen=True)
class Stop:
    """How a run ends: the process exit code, ``RUN/status.json``'s state, a line printed on rank 0, and whether
    to write a checkpoint first."""

    code: int
    status: str
    message: str = ""
    save: bool = True


FINISHED = Stop(0, "finished")  # the step budget is spent


class Callback:
    """A no-op for every event; subclasses override the ones they need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_loss(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> Stop | None:
        return None

    def on_fit_end(self, trainer: Trainer, stop: Stop | None) -> None:
        pass


_registered: list[Callable[[], Callback]] = []


def register_callback(factory: Callable[[], Callback]) -> Callable[[], Callback]:
    """Add a callback to every Trainer built afterwards in this process (usable as a class decorator); the
    factory is called once per Trainer, so each run starts with fresh callback state."""
    _registered.append(factory)
    return factory


def registered_callbacks() -> list[Callback]:
    return [factory() for factory in _registered]
