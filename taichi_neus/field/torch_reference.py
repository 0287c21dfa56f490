"""The same field written in plain torch: the tests' oracle (in float64) and the
benchmark's baseline (in float32). It reads the Taichi field's flat parameter buffer
(as a torch tensor) and layout, so both compute exactly the same function.

Nothing here is used for training.
"""

import torch
import torch.nn.functional as F

from taichi_neus.field.sdf_field import SDFField, stencil

PRIME_Y = 2654435761
PRIME_Z = 805459861
_MASK32 = (1 << 32) - 1


def hash_encode(x: torch.Tensor, table: torch.Tensor, res, loff, lsize, ldense, bound: float,
                n_active: int | None = None) -> torch.Tensor:
    """x (M,3) → (M, L·F): trilinear interpolation of hashed/dense grid entries per level; the levels
    ``>= n_active`` (none for None) are constant zeros."""
    u01 = ((x + bound) / (2 * bound)).clamp(0.0, 1.0)
    feats = []
    for lv in range(len(res)):
        if n_active is not None and lv >= n_active:
            feats.append(torch.zeros(x.shape[0], table.shape[1], dtype=table.dtype, device=table.device))
            continue
        r = int(res[lv])
        u = u01 * r
        i0 = torch.floor(u).clamp(max=r - 1).long()
        f = u - i0.to(u.dtype)
        acc = 0.0
        for c in range(8):
            d = [(c >> a) & 1 for a in range(3)]
            ix, iy, iz = (i0[:, a] + d[a] for a in range(3))
            w = 1.0
            for a in range(3):
                w = w * (f[:, a] if d[a] else 1.0 - f[:, a])
            if ldense[lv]:
                idx = ix + (r + 1) * (iy + (r + 1) * iz)
            else:
                h = (ix ^ ((iy * PRIME_Y) & _MASK32) ^ ((iz * PRIME_Z) & _MASK32)) & _MASK32
                idx = h & (int(lsize[lv]) - 1)
            acc = acc + w[:, None] * table[int(loff[lv]) + idx]
        feats.append(acc)
    return torch.cat(feats, dim=1)


def sh16(d: torch.Tensor) -> torch.Tensor:
    """Real SH basis, bands 0..3, of unit directions d (M,3) → (M,16)."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    xx, yy, zz = x * x, y * y, z * z
    one = torch.ones_like(x)
    return torch.stack([
        0.28209479177387814 * one,
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
        0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * x * z,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ], dim=1)


class TorchField:
    """Torch twin of :class:`SDFField` over the same flat parameter vector ``theta`` (torch tensor)."""

    def __init__(self, field: SDFField):
        self.f = field
        enc = field.encoding
        # Plain Python ints and lists, read once: under torch.compile a numpy call inside the traced
        # forward (np.prod for a slice's size, numpy level arrays) breaks the graph at every layer.
        self.res, self.loff, self.lsize, self.ldense = ([int(v) for v in a] for a in
                                                        (enc.res_np, enc.loff_np, enc.lsize_np, enc.ldense_np))
        self.table_slice = enc.slice
        cenc = field.color_encoding  # the colour network's own grid, or None
        self.color_levels = None if cenc is None else tuple([int(v) for v in a] for a in
                                                            (cenc.res_np, cenc.loff_np, cenc.lsize_np, cenc.ldense_np))
        tables = [enc.slice] + ([cenc.slice] if cenc is not None else [])
        self._geom = {s.name: (int(s.offset), int(s.size), tuple(int(d) for d in s.shape))
                      for s in tables + [t for lin in (*field.sdf_layers, *field.color_layers)
                                         for t in (lin.W, lin.b)]}
        self._stencils = {}
        self._stencil(field.cfg.normal_mode)  # filled here, not on a traced call

    def _w(self, theta, s):
        off, size, shape = self._geom[s.name]
        return theta[off:off + size].view(*shape)

    def _stencil(self, mode: str):
        """(offsets (K, 3), normal coefficients) as nested Python lists, per stencil mode."""
        if mode not in self._stencils:
            off, coef = stencil(mode)
            self._stencils[mode] = (off.tolist(), coef.tolist())
        return self._stencils[mode]

    def _mlp(self, theta, layers, x):
        for lin in layers:
            x = F.linear(x, self._w(theta, lin.W).t(), self._w(theta, lin.b))
            if lin.act == 1:
                x = torch.relu(x)
            elif lin.act == 2:
                x = F.softplus(x, beta=lin.beta)
            elif lin.act == 3:
                x = torch.sigmoid(x)
        return x

    def sdf_net(self, theta, x):
        """x (M,3) → (M, 1 + feature_dim)."""
        g = self.f.cfg.grid
        enc = hash_encode(x, self._w(theta, self.table_slice), self.res, self.loff, self.lsize, self.ldense,
                          g.bound, self.f.active_levels)
        inp = torch.cat([x, enc], dim=1) if self.f.cfg.include_xyz else enc
        return self._mlp(theta, self.f.sdf_layers, inp)

    def forward(self, theta, x, dirs, eps: float):
        """Returns sdf (M,), normal (M,3) (finite differences, or for ``analytic`` the autograd gradient,
        kept differentiable: create_graph), rgb (M,3)."""
        if self.f.cfg.normal_mode == "analytic":
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            out = self.sdf_net(theta, xg)
            (normal,) = torch.autograd.grad(out[:, 0].sum(), xg, create_graph=True)
            return self._colour(theta, x, dirs, out[:, 0], normal, out[:, 1:])
        off, coef = self._stencil(self.f.cfg.normal_mode)
        off = torch.tensor(off, dtype=x.dtype, device=x.device)
        coef = torch.tensor(coef, dtype=x.dtype, device=x.device)
        K, M = off.shape[0], x.shape[0]
        xs = (x[None, :, :] + eps * off[:, None, :]).reshape(K * M, 3)
        out = self.sdf_net(theta, xs).view(K, M, -1)
        normal = torch.einsum("kc,km->mc", coef, out[:, :, 0]) / eps
        return self._colour(theta, x, dirs, out[0, :, 0], normal, out[0, :, 1:])

    def _colour(self, theta, x, dirs, sdf, normal, feat):
        sh = sh16(dirs)
        sh = torch.cat([sh[:, :self.f.n_sh], torch.zeros_like(sh[:, self.f.n_sh:])], dim=1)  # view_degree
        parts = [x, normal, sh, feat]
        if self.color_levels is not None:  # all of the colour grid's levels are always on
            cenc = self.f.color_encoding
            parts.append(hash_encode(x, self._w(theta, cenc.slice), *self.color_levels, cenc.cfg.bound))
        cin = torch.cat(parts, dim=1)
        rgb = self._mlp(theta, self.f.color_layers, cin)
        return sdf, normal, rgb
