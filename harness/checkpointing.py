"""Training state that a run saves as ``checkpoints/last.pt`` and resumes from.

A checkpoint contains everything that decides the rest of a run: the model and optimizer state,
the number of completed optimizer updates, the data order with its position and generator, and
the random number generators of Python, NumPy and torch. Resuming from it on the same device
reproduces the metrics of an uninterrupted run exactly.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

CHECKPOINT_ARTIFACT = "checkpoints/last.pt"
FORMAT_VERSION = 1


@dataclass
class DataOrder:
    """Shuffled order of the training split, consumed ``batch_size`` indices at a time.

    A new permutation is drawn from ``generator`` when fewer than ``batch_size`` indices are
    left, so every mini-batch has the same size.
    """

    num_samples: int
    batch_size: int
    generator: torch.Generator
    order: Tensor
    position: int = 0

    @classmethod
    def start(cls, num_samples: int, batch_size: int, seed: int) -> DataOrder:
        """Return the order of a fresh run, seeded by ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_samples, generator=generator)
        return cls(num_samples, batch_size, generator, order)

    def next_batch(self) -> Tensor:
        """Return the indices of the next mini-batch."""
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(self.num_samples, generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def state_dict(self) -> dict[str, Any]:
        """Return the order, position and generator state as tensors and ints."""
        return {"order": self.order.clone(), "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: If the saved order is for a training split of another size.
        """
        if len(state["order"]) != self.num_samples:
            raise ValueError(
                f"The checkpoint's data order has {len(state['order'])} samples, but the training "
                f"split has {self.num_samples}: resume with the data set config of the original run."
            )
        self.order = state["order"]
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])


def rng_states() -> dict[str, Any]:
    """Return the states of Python's, NumPy's and torch's global generators (CUDA's too, if present).

    NumPy's state is stored as a tensor so that ``torch.load(..., weights_only=True)`` can read it.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore the generator states that :func:`rng_states` returned."""
    random.setstate(_as_tuples(states["python"]))
    saved = states["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    """Turn lists back into the nested tuples of ``random.getstate()``."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


@dataclass
class TrainingState:
    """Progress of a run between two optimizer updates.

    Attributes:
        step: Number of completed optimizer updates.
        checkpoint_done: Whether the spectrum of ``step`` is already logged, so a resumed run
            does not compute it again.
        data_order: The mini-batch order of the training split.
        rng: Generator states from the start of the spectrum computation of ``step`` while it
            runs, else None. A checkpoint saved when that computation is interrupted stores
            them, since the computation may have drawn random numbers (Monte-Carlo GGN).
    """

    step: int
    checkpoint_done: bool
    data_order: DataOrder
    rng: dict[str, Any] | None = None


def checkpoint_bytes(
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, Any] | None = None,
) -> bytes:
    """Serialize a checkpoint with ``torch.save``.

    Args:
        rng: Generator states to store. None stores the current ones. A caller interrupted in
            the middle of work that draws random numbers passes the states from before it.
    """
    payload = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "checkpoint_done": state.checkpoint_done,
        "data_order": state.data_order.state_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng if rng is not None else rng_states(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(
    data: bytes, model: nn.Module, optimizer: torch.optim.Optimizer, data_order: DataOrder
) -> TrainingState:
    """Restore model, optimizer, data order and generators from a checkpoint; return the state.

    The file is read with ``torch.load(..., weights_only=True)``, which unpickles only tensors
    and plain containers, so a checkpoint cannot run code when it is loaded.

    Raises:
        ValueError: If the checkpoint has another format version or does not fit the model.
    """
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint format version {payload.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION}): resume it with the harness version that wrote it."
        )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ValueError(
            f"The checkpoint does not fit the model: {error}. Resume with the model config of "
            "the original run."
        ) from error
    optimizer.load_state_dict(payload["optimizer"])
    data_order.load_state_dict(payload["data_order"])
    restore_rng_states(payload["rng"])
    return TrainingState(int(payload["step"]), bool(payload["checkpoint_done"]), data_order)
