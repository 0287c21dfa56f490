"""The user-facing application: the ``taichi-neus`` command, run folders, the live preview.

- :mod:`~taichi_neus.app.cli`: ``taichi-neus train|mesh|render|eval``.
- :mod:`~taichi_neus.app.results`: loading a run folder, rendering and evaluating it.
- :mod:`~taichi_neus.app.preview`: the ``ti.GUI`` live preview while training.
- :mod:`~taichi_neus.app.progress`: the terminal progress bar.
"""
