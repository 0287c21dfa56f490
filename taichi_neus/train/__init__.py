"""Training: the configuration, pixel samplers, losses, the optimiser and the training loop.

- :mod:`~taichi_neus.train.config`: the typed configuration, one sub-config per stage.
- :mod:`~taichi_neus.train.pixel_samplers`: uniform, quadtree and soft-mining pixel samplers.
- :mod:`~taichi_neus.train.losses`: colour L1, mask BCE and eikonal terms with their gradients.
- :mod:`~taichi_neus.train.s3im`: the S3IM stochastic structural similarity loss (torch).
- :mod:`~taichi_neus.train.adam`: Adam over the flat parameter buffer, per-group settings.
- :mod:`~taichi_neus.train.trainer`: one training step, validation, checkpoints, the loop.
"""
