"""A dependency-free progress bar: one redrawn line on a terminal, periodic lines otherwise."""

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, stream=None, every: int = 10, width: int = 24):
        self.total, self.n = total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.width = every, width
        self.t0 = time.time()
        self.start = start

    def update(self, n: int, **stats) -> None:
        self.n = n
        if not self.tty and n % self.every and n != self.total:
            return
        frac = n / max(self.total, 1)
        done = int(frac * self.width)
        el = time.time() - self.t0
        rate = (n - self.start) / el if el > 0 else 0.0
        eta = (self.total - n) / rate if rate > 0 else 0.0
        txt = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        line = (f"[{'#' * done}{'.' * (self.width - done)}] {n}/{self.total} "
                f"{el:5.0f}s<{eta:4.0f}s {rate:.2f}it/s {txt}")
        if self.tty:
            self.stream.write("\r" + line[:200] + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
