"""A dependency-free progress bar: one redrawn line on a terminal, periodic lines otherwise."""

import math
import sys
import time

# printed once before the bar: what its fields mean
LEGEND = ("progress: loss = colour L1 + mask + eikonal terms; PSNR of this step's batch; sharpness s = NeuS's "
          "1/σ, rising as the surface gets crisp; samples/ray after empty space is skipped")


def step_fields(st: dict) -> list[str]:
    """The bar's named fields for one training step's stats (``Trainer.train_step``'s dict)."""
    def num(k, fmt):
        v = st.get(k, float("nan"))
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
    fields = [f"loss {num('loss', '.4f')}", f"PSNR {num('psnr', '.2f')} dB", f"sharpness s={num('s', '.0f')}",
              f"samples/ray {num('samples_per_ray', '.1f')}"]
    if st.get("rejected"):
        fields.append("step rejected (non-finite)")
    return fields


class Progress:
    def __init__(self, total: int, start: int = 0, stream=None, every: int = 10, width: int = 24):
        self.total, self.n = total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.width = every, width
        self.t0 = time.time()
        self.start = start

    def update(self, n: int, *fields: str) -> None:
        """Redraw at step ``n`` with ``fields`` (already named and formatted, e.g. ``'PSNR 24.1 dB'``)."""
        self.n = n
        if not self.tty and n % self.every and n != self.total:
            return
        frac = n / max(self.total, 1)
        done = int(frac * self.width)
        el = time.time() - self.t0
        rate = (n - self.start) / el if el > 0 else 0.0
        eta = (self.total - n) / rate if rate > 0 else 0.0
        line = (f"[{'#' * done}{'.' * (self.width - done)}] {n}/{self.total} "
                f"{el:5.0f}s<{eta:4.0f}s {rate:.2f} steps/s | " + " | ".join(fields))
        if self.tty:
            self.stream.write("\r" + line[:200] + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
