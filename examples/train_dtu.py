"""Train on a DTU scene in the NeuS layout and write a mesh.

    python examples/train_dtu.py --data ../shared/data/dtu_scan24 --out runs/scan24 --downscale 4

Without --data it trains on the built-in synthetic scene. Every option of `taichi-neus train` is
accepted (`taichi-neus train --help` lists them), e.g. --iters 3000 --render.n_fine 48 --arch vulkan.
"""

import sys

from taichi_neus.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
