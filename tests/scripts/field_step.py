"""One field forward+backward on the arch given in argv[1]; writes outputs and gradients to argv[2] (.npz);
argv[3], optional, is the normal mode (default tetrahedral).
Used by tests/test_portability.py to compare backends in separate processes."""

import sys

import numpy as np

from taichi_neus import buffers, runtime

runtime.init(sys.argv[1], verbose=False)

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from field_helpers import random_batch, small_field  # noqa: E402

field, layout, params = small_field(sys.argv[3] if len(sys.argv) > 3 else "tetrahedral", seed=21)
n = 512
pts, d = random_batch(n, seed=22)
out = field.forward(buffers.upload(pts), buffers.upload(d), n, params)
rng = np.random.default_rng(23)
ups = [buffers.upload(rng.normal(size=s).astype(np.float32)) for s in [(n,), (n, 3), (n, 3)]]
grads = layout.allocate()
field.backward(*ups, params, grads)
np.savez(sys.argv[2], sdf=out.sdf.to_numpy()[:n], normal=out.normal.to_numpy()[:n], rgb=out.rgb.to_numpy()[:n],
         grads=buffers.to_numpy(grads))
