"""What a run produces and how it is scored: meshes, PLY files, rasterised mesh views, metrics.

- :mod:`~taichi_neus.export.mesh`: marching cubes on the SDF, mask-based cleaning, components.
- :mod:`~taichi_neus.export.ply`: PLY reader and writer.
- :mod:`~taichi_neus.export.mesh_raster`: a z-buffer rasteriser for meshes seen from the cameras.
- :mod:`~taichi_neus.export.evaluation`: Chamfer distance, DTU evaluation, background coverage.
"""
