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
    def __init__(self, total: int, start: int = 0, stream=None, every: int = 10, width: int = 24,
                 start_fraction: float = 0.0):
        self.total, self.n = total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.width = every, width
        self.t0 = time.time()
        self.start = start
        self.frac0 = start_fraction  # share of the run done when this process started (a resumed run)

    def update(self, n: int, *fields: str, fraction: float | None = None) -> None:
        """Redraw at step ``n`` with ``fields`` (already named and formatted, e.g. ``'PSNR 24.1 dB'``).

        ``fraction``: the share of the run done, in [0, 1], when it is not ``n / total`` (a run that
        stops on a time budget before its step count); the bar and the time left then follow it."""
        self.n = n
        if not self.tty and n % self.every and n != self.total:
            return
        el = time.time() - self.t0
        rate = (n - self.start) / el if el > 0 else 0.0
        if fraction is None:
            frac = n / max(self.total, 1)
            eta = (self.total - n) / rate if rate > 0 else 0.0
        else:
            frac = min(max(float(fraction), 0.0), 1.0)
            gained = frac - self.frac0  # the share this process has done
            eta = el * (1.0 - frac) / gained if gained > 0 else 0.0
        done = int(frac * self.width)
        count = f"{n}/{self.total}" if fraction is None else f"{n} steps {100 * frac:3.0f}%"
        line = (f"[{'#' * done}{'.' * (self.width - done)}] {count} "
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
