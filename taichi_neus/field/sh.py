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
