"""From a field to pixels: where to sample along rays, NeuS compositing, and whole images.

- :mod:`~taichi_neus.render.occupancy`: occupancy grid that skips empty space.
- :mod:`~taichi_neus.render.sampling`: coarse and inverse-CDF fine samples per ray (packed).
- :mod:`~taichi_neus.render.compositing`: NeuS alpha, transmittance, weights; colour, opacity, depth.
- :mod:`~taichi_neus.render.background`: the NeRF++-style model of what lies beyond the unit sphere.
- :mod:`~taichi_neus.render.grad_scaling`: the backward hook that rescales per-sample gradients.
- :mod:`~taichi_neus.render.images`: whole images (rgb, normal, depth) from a trained field.
- :mod:`~taichi_neus.render.camera_paths`: orbit and interpolated camera paths for videos and the preview.
- :mod:`~taichi_neus.render.torch_ops`: compositing and whole-ray rendering as torch autograd functions.
- :mod:`~taichi_neus.render.tape_ops`: compositing inside ``ti.ad.Tape`` on Taichi fields (every backend).
- :mod:`~taichi_neus.render.pose`: camera pose refinement through the renderer (iNeRF-style se(3) updates).
"""
