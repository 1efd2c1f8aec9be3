"""The feature cloud's random stream: one ``torch.Generator`` per head, saved with its state."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

# Odd 64-bit constant (golden ratio) spreading the seeds of different noise streams far apart.
_STREAM_STRIDE = 0x9E3779B97F4A7C15


def noise_seed(seed: int, step: int, stream: int = 0) -> int:
    """Seed of the cloud generator at ``step`` for noise stream ``stream`` (0: single process)."""
    return (seed + step + stream * _STREAM_STRIDE) % (2**63)


class CloudRNG:
    """Lazily created, checkpointable generator of the cloud angles.

    The generator lives on the device of the data it draws for. A fresh one (first use, another
    device type, another stream) is seeded from ``(seed, step, stream)``; a checkpointed state is
    restored only on the device type and stream (rank) that saved it, otherwise the stream is
    reseeded deterministically. ``state()`` / ``load()`` are what a Module's extra state holds.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None
        self._stream = 0
        self._pending: Optional[Tuple[str, Tensor, int]] = None

    def generator(self, device: torch.device, step: int, stream: int = 0) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device.type != device.type or stream != self._stream or (
            device.type != "cpu" and gen.device != device
        ):
            gen = torch.Generator(device=device)
            pending = self._pending
            if pending is not None and pending[0] == device.type and pending[2] == stream:
                gen.set_state(pending[1])
            else:
                gen.manual_seed(noise_seed(self.seed, step, stream))
            self._generator, self._pending, self._stream = gen, None, stream
        return gen

    def get_state(self) -> Optional[Tensor]:
        """The generator's current state (``None`` before first use)."""
        if self._generator is not None:
            return self._generator.get_state()
        return None if self._pending is None else self._pending[1]

    def state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"seed": self.seed}
        if self._generator is not None:
            state["rng_device"] = self._generator.device.type
            state["rng_state"] = self._generator.get_state()
            state["rng_stream"] = self._stream
        elif self._pending is not None:
            state["rng_device"], state["rng_state"], state["rng_stream"] = self._pending
        return state

    def load(self, state: Dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator = None
        self._pending = (
            (state["rng_device"], state["rng_state"].cpu(), int(state.get("rng_stream", 0)))
            if "rng_state" in state else None
        )
