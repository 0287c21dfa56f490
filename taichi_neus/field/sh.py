"""Real spherical harmonics up to degree 4 (16 coefficients, bands l = 0..3) of a unit
direction, the view-direction encoding of the colour network (as in Instant-NGP / NeuS
follow-ups). Orthonormal on the sphere: ∫ Y_a Y_b dω = δ_ab (checked in the tests)."""

import taichi as ti

SH_DIM = 16


@ti.func
def sh16(x: ti.f32, y: ti.f32, z: ti.f32):
    xx, yy, zz = x * x, y * y, z * z
    return ti.Vector([
        0.28209479177387814,
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * x * y,
        -1.0925484305920792 * y * z,
        0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy),
        2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz),
        0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz),
        1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ])


@ti.func
def sh16_vjp(x: ti.f32, y: ti.f32, z: ti.f32, g):
    """gᵀ·∂sh16/∂(x, y, z) for an upstream gradient ``g`` (16-vector): the view direction's gradient.

    The basis is evaluated as the polynomials above, so this is their derivative at (x, y, z) as given
    (no projection onto the sphere's tangent plane: a caller normalising directions chains through that)."""
    c1, c2, c3 = 0.48860251190291987, 1.0925484305920792, 0.94617469575755997
    c5, c6, c7 = 0.54627421529603959, 0.59004358992664352, 2.8906114426405538
    c8, c9, c10 = 0.45704579946446572, 0.3731763325901154, 1.4453057213202769
    xx, yy, zz = x * x, y * y, z * z
    gx = (-c1 * g[3] + c2 * y * g[4] - c2 * z * g[7] + 2.0 * c5 * x * g[8] - 6.0 * c6 * x * y * g[9]
          + c7 * y * z * g[10] + c8 * (1.0 - 5.0 * zz) * g[13] + 2.0 * c10 * x * z * g[14]
          + 3.0 * c6 * (yy - xx) * g[15])
    gy = (-c1 * g[1] + c2 * x * g[4] - c2 * z * g[5] - 2.0 * c5 * y * g[8] + 3.0 * c6 * (yy - xx) * g[9]
          + c7 * x * z * g[10] + c8 * (1.0 - 5.0 * zz) * g[11] - 2.0 * c10 * y * z * g[14]
          + 6.0 * c6 * x * y * g[15])
    gz = (c1 * g[2] - c2 * y * g[5] + 2.0 * c3 * z * g[6] - c2 * x * g[7] + c7 * x * y * g[10]
          - 10.0 * c8 * y * z * g[11] + c9 * (15.0 * zz - 3.0) * g[12] - 10.0 * c8 * x * z * g[13]
          + c10 * (xx - yy) * g[14])
    return ti.Vector([gx, gy, gz])
