"""The neural SDF field: multiresolution hash encoding, tiny MLPs and their parameters.

- :mod:`~taichi_neus.field.hash_grid`: hash encoding (Müller et al. 2022), forward and backward.
- :mod:`~taichi_neus.field.mlp`: fully connected layers with hand-written backward passes.
- :mod:`~taichi_neus.field.sh`: spherical-harmonics encoding of view directions.
- :mod:`~taichi_neus.field.params`: one flat parameter buffer and its named slices.
- :mod:`~taichi_neus.field.sdf_field`: the field itself (sdf, normal by finite differences, colour).
- :mod:`~taichi_neus.field.torch_reference`: the same field in plain torch, the tests' oracle.
- :mod:`~taichi_neus.field.torch_ops`: the field as a torch autograd function (gradients to parameters,
  points and view directions).
- :mod:`~taichi_neus.field.tape_ops`: the field inside ``ti.ad.Tape`` on Taichi fields (every backend).
"""
