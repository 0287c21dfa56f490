"""S3IM: stochastic structural similarity over a batch of rays.

Xie et al., "S3IM: Stochastic Structural SIMilarity and Its Unreasonable Effectiveness for
Neural Fields", ICCV 2023. The B rays of a training batch carry no image structure of their
own, so S3IM *makes* a virtual image out of them and scores it with SSIM:

1. Repeat the batch M times. Repeat 0 keeps the batch order, repeats 1..M-1 are random
   permutations of it.
2. Each repeat is laid out row-major as a ``patch_height x (B / patch_height)`` patch, and the M
   patches are put side by side into one virtual image of height ``H_p = patch_height`` and width
   ``M * B / H_p`` (3 channels).
3. SSIM (Wang et al. 2004) of the rendered against the ground-truth virtual image, with a
   ``K x K`` window moved with stride ``s`` (paper defaults K = s = 4), averaged over all window
   positions and the 3 channels:

       SSIM = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

   with C1 = 0.01^2, C2 = 0.03^2 (colours in [0, 1]), mu the window-weighted means and the
   (co)variances computed as weighted E[xy] - mu_x mu_y.
4. loss = weight * (1 - SSIM).

Window and padding follow the authors' public code (Madaoer/S3IM-Neural-Fields, read, not
copied): a normalised separable Gaussian window with sigma = 1.5 whose taps sit at offsets
``i - K // 2`` for ``i = 0..K-1`` (so for even K it is one tap off-centre), and zero padding of
``(K - 1) // 2`` pixels on every side of the virtual image before the strided windows (with
K = 4, stride 4 and 64 rows the windows span rows -1..62: the last row and column of the virtual
image fall in no window, and the rays there count only through the other, shuffled repeats). Pass
``window="uniform"`` for a box window or ``padding=0`` for windows that tile the virtual image
exactly. One deliberate difference: the authors' code fills the ``H_p x (M * W_p)`` image
row-major from the concatenated repeats instead of placing the repeats side by side; both are
random layouts of the same rays, and side by side keeps repeat 0 a coherent patch of the batch.

Two entry points:

- :meth:`S3IM.loss` -- torch in, scalar torch tensor out, differentiable by autograd.
- :meth:`S3IM.loss_and_grad` -- numpy in, ``(loss, dL/dpred)`` out, for the Taichi trainer that
  holds the batch colours as arrays and adds this gradient into its dL/dcolour.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from taichi_neus.errors import UserInputError

__all__ = ["S3IM"]

_C1 = 0.01**2
_C2 = 0.03**2


class S3IM:
    """Stochastic structural similarity loss over a batch of rays (Xie et al. 2023).

    Args:
        kernel: SSIM window side K in virtual pixels (paper: 4).
        stride: step between windows (paper: 4, i.e. non-overlapping windows).
        repeats: M, the number of repeats of the batch (paper: 10); repeat 0 is unshuffled.
        patch_height: H_p, the height of the virtual patch (paper: 64). The batch size must be a
            multiple of it; each repeat is a ``H_p x (B / H_p)`` patch.
        weight: lambda, the multiplier of ``1 - SSIM`` (paper: 1 for most scenes).
        window: ``"gaussian"`` (sigma = 1.5, as the authors' code) or ``"uniform"``.
        padding: zero padding added on each side of the virtual image; ``None`` means
            ``(kernel - 1) // 2`` as in the authors' code.
        sigma: standard deviation of the Gaussian window, in virtual pixels.
        num_threads: torch intra-op threads used inside :meth:`loss_and_grad` (restored
            afterwards); ``None`` keeps torch's setting. The default 1 is deliberate: the
            tensors are small (~0.6 M elements) and on a busy 2-core machine torch's
            multi-threaded kernels measured 5-50x slower than one thread.
    """

    def __init__(
        self,
        kernel: int = 4,
        stride: int = 4,
        repeats: int = 10,
        patch_height: int = 64,
        weight: float = 1.0,
        window: str = "gaussian",
        padding: int | None = None,
        sigma: float = 1.5,
        num_threads: int | None = 1,
    ):
        for name, value in (("kernel", kernel), ("stride", stride), ("repeats", repeats),
                            ("patch_height", patch_height)):
            if int(value) != value or value < 1:
                raise UserInputError(f"S3IM: {name} must be a positive integer, got {value!r}.")
        if window not in ("gaussian", "uniform"):
            raise UserInputError(f"S3IM: window must be 'gaussian' or 'uniform', got {window!r}.")
        self.kernel = int(kernel)
        self.stride = int(stride)
        self.repeats = int(repeats)
        self.patch_height = int(patch_height)
        self.weight = float(weight)
        self.window = window
        self.padding = (self.kernel - 1) // 2 if padding is None else int(padding)
        if self.padding < 0:
            raise UserInputError(f"S3IM: padding must be >= 0, got {padding!r}.")
        self.sigma = float(sigma)
        self.num_threads = num_threads

    # ------------------------------------------------------------------ building blocks
    def window_1d(self, dtype=torch.float32) -> torch.Tensor:
        """(K,) normalised 1-D window; the 2-D window is its outer product with itself."""
        if self.window == "uniform":
            w = torch.ones(self.kernel, dtype=torch.float64)
        else:
            offsets = torch.arange(self.kernel, dtype=torch.float64) - self.kernel // 2
            w = torch.exp(-(offsets**2) / (2.0 * self.sigma**2))
        return (w / w.sum()).to(dtype)

    def check_batch(self, batch_size: int) -> None:
        """Raise a ValueError (:class:`UserInputError`) if ``batch_size`` cannot form the patches."""
        if batch_size <= 0 or batch_size % self.patch_height != 0:
            raise UserInputError(
                f"S3IM: the batch size ({batch_size}) must be a positive multiple of "
                f"patch_height ({self.patch_height}); change the batch size or s3im patch_height.")
        width = self.repeats * batch_size // self.patch_height + 2 * self.padding
        height = self.patch_height + 2 * self.padding
        if min(width, height) < self.kernel:
            raise UserInputError(
                f"S3IM: the virtual image ({self.patch_height} x {width - 2 * self.padding}) is "
                f"smaller than the kernel ({self.kernel}); use a larger batch or a smaller kernel.")

    def permutation(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(M, B) int64 ray indices: row 0 is ``arange(B)``, rows 1..M-1 random permutations.

        Drawn with ``torch.randperm(B, generator=generator)`` in row order, so the same generator
        state gives the same indices.
        """
        rows = [torch.arange(batch_size)]
        rows += [torch.randperm(batch_size, generator=generator) for _ in range(self.repeats - 1)]
        return torch.stack(rows)

    def virtual_image(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Lay ``values`` (B, C) out as the virtual image (1, C, H_p, M * B / H_p).

        Repeat r occupies columns ``[r * W_p, (r + 1) * W_p)`` with ``W_p = B / H_p``; inside it,
        the ray ``index[r, j]`` sits at row ``j // W_p``, column ``r * W_p + j % W_p``.
        """
        m, b = index.shape
        c = values.shape[1]
        wp = b // self.patch_height
        patches = values[index.reshape(-1)].reshape(m, self.patch_height, wp, c)  # M, H_p, W_p, C
        return patches.permute(3, 1, 0, 2).reshape(1, c, self.patch_height, m * wp)

    def filter(self, img: torch.Tensor) -> torch.Tensor:
        """Window-weighted means of ``img`` (N, C, H, W) at every window position.

        Zero padding, then the separable window applied along rows and then columns with the
        stride -- the same numbers as ``conv2d(img, outer(w, w), stride, padding)`` per channel,
        computed with two strided ``unfold`` views (several times faster than a grouped conv2d
        on the CPU).
        """
        w1 = self.window_1d(img.dtype).to(img.device)
        p = self.padding
        img = F.pad(img, (p, p, p, p))
        rows = (img.unfold(2, self.kernel, self.stride) * w1).sum(-1)  # N, C, nH, W + 2p
        return (rows.unfold(3, self.kernel, self.stride) * w1).sum(-1)  # N, C, nH, nW

    def ssim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean SSIM of two images (1, C, H, W) with this object's window, stride and padding."""
        c = x.shape[1]
        stats = self.filter(torch.cat([x, y, x * x, y * y, x * y], dim=1))
        mu_x, mu_y, ex2, ey2, exy = stats.split(c, dim=1)
        var_x = ex2 - mu_x * mu_x
        var_y = ey2 - mu_y * mu_y
        cov = exy - mu_x * mu_y
        num = (2 * mu_x * mu_y + _C1) * (2 * cov + _C2)
        den = (mu_x * mu_x + mu_y * mu_y + _C1) * (var_x + var_y + _C2)
        return (num / den).mean()

    # ------------------------------------------------------------------ entry points
    def loss(self, pred: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """S3IM loss ``weight * (1 - SSIM)`` of a batch; differentiable w.r.t. ``pred``.

        Args:
            pred: (B, 3) float tensor, rendered colours in [0, 1].
            target: (B, 3) float tensor, ground-truth colours in [0, 1] (no gradient needed).
            generator: torch RNG for the permutations of repeats 1..M-1 (``None``: torch's
                global generator).

        Returns:
            0-dim tensor of ``pred``'s dtype; 0 when ``pred == target``.
        """
        if pred.shape != target.shape or pred.ndim != 2:
            raise UserInputError(
                f"S3IM: pred and target must both be (B, 3), got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}.")
        self.check_batch(pred.shape[0])
        index = self.permutation(pred.shape[0], generator).to(pred.device)
        target = target.to(dtype=pred.dtype, device=pred.device)
        return self.weight * (1.0 - self.ssim(self.virtual_image(pred, index),
                                              self.virtual_image(target, index)))

    def loss_and_grad(self, pred: np.ndarray, target: np.ndarray,
                      seed: int | None = None) -> tuple[float, np.ndarray]:
        """S3IM loss and its gradient for callers that hold colours as numpy arrays.

        Args:
            pred: (B, 3) float32 (or float64) rendered colours in [0, 1].
            target: (B, 3) ground-truth colours in [0, 1], any float dtype.
            seed: seeds the permutations (``torch.Generator().manual_seed(seed)``); ``None``
                draws a fresh seed.

        Returns:
            ``(loss, grad)``: the loss as a Python float and dL/dpred, an array of ``pred``'s
            shape and dtype (already multiplied by ``weight``), to be added to the trainer's
            gradient of the loss w.r.t. the rendered colours.
        """
        pred = np.asarray(pred)
        dtype = torch.float64 if pred.dtype == np.float64 else torch.float32
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        x = torch.as_tensor(pred, dtype=dtype).clone().requires_grad_(True)
        y = torch.as_tensor(np.asarray(target), dtype=dtype)
        old_threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.enable_grad():
                loss = self.loss(x, y, gen)
                (grad,) = torch.autograd.grad(loss, x)
        finally:
            if self.num_threads is not None:
                torch.set_num_threads(old_threads)
        out_dtype = pred.dtype if pred.dtype in (np.float32, np.float64) else np.float32
        return float(loss.detach()), grad.numpy().astype(out_dtype, copy=False)

    def __repr__(self) -> str:
        return (f"S3IM(kernel={self.kernel}, stride={self.stride}, repeats={self.repeats}, "
                f"patch_height={self.patch_height}, weight={self.weight}, window={self.window!r}, "
                f"padding={self.padding}, sigma={self.sigma})")

