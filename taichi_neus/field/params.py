"""One flat float32 parameter buffer for the whole model, carved into named slices.

Every trainable tensor (hash table, MLP weights and biases, NeuS variance) is a slice
``[offset, offset + size)`` of one 1-D ndarray. Kernels receive the flat buffer and an
offset; the optimizer, checkpoints and gradient zeroing each touch one array.
Gradients use the same layout in a second flat buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from taichi_neus import buffers


@dataclass
class Slice:
    name: str
    offset: int
    shape: tuple
    group: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class ParamLayout:
    """Named slices of the flat parameter buffer, in allocation order."""

    slices: dict = field(default_factory=dict)
    total: int = 0

    def add(self, name: str, shape: tuple, group: str) -> Slice:
        if name in self.slices:
            raise KeyError(f"parameter '{name}' allocated twice")
        # Keep every slice 16-float aligned so vector loads stay aligned.
        offset = (self.total + 15) // 16 * 16
        s = Slice(name, offset, tuple(int(d) for d in shape), group)
        self.slices[name] = s
        self.total = offset + s.size
        return s

    def __getitem__(self, name: str) -> Slice:
        return self.slices[name]

    def groups(self) -> dict:
        """group name -> list of (offset, size), contiguous runs merged."""
        out: dict = {}
        for s in self.slices.values():
            runs = out.setdefault(s.group, [])
            if runs and runs[-1][0] + runs[-1][1] <= s.offset and runs[-1][0] + runs[-1][1] + 16 > s.offset:
                start = runs[-1][0]
                runs[-1] = (start, s.offset + s.size - start)
            else:
                runs.append((s.offset, s.size))
        return out

    def allocate(self):
        """A zeroed flat float32 ndarray of ``total`` elements."""
        return buffers.f32(max(self.total, 1))

    def view(self, flat: np.ndarray, name: str) -> np.ndarray:
        """The numpy view of slice ``name`` in a host copy of the flat buffer."""
        s = self.slices[name]
        return flat[s.offset:s.offset + s.size].reshape(s.shape)
