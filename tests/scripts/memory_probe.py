"""Peak-memory probe for test_faults.py: writes a NeuS-layout scene of 48 images of 640x480 into argv[1],
then measures the growth of the peak RSS while loading it and training 3 steps of the small model.
Prints ``MEMORY {json}`` with image_bytes, mask_bytes and growth (bytes)."""

import json
import pathlib
import resource
import sys

import numpy as np
from PIL import Image

from taichi_neus import runtime

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from training_helpers import small_config  # noqa: E402

from taichi_neus.data import synthetic as syn  # noqa: E402
from taichi_neus.data.cameras import projection_matrix  # noqa: E402
from taichi_neus.data.loader import load_scene  # noqa: E402

V, W, H = 48, 640, 480
root = pathlib.Path(sys.argv[1]) / "big"
(root / "image").mkdir(parents=True)
(root / "mask").mkdir()
K = syn.intrinsics(W, H)
ys, xs = np.mgrid[0:H, 0:W]
cams = {}
for i, c in enumerate(syn.camera_centres(V, seed=0)):
    img = np.stack([(xs * (i + 1)) % 256, (ys * 3 + i) % 256, (xs + ys) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(root / "image" / f"{i:03d}.png", compress_level=1)
    mask = (((xs - W / 2) ** 2 + (ys - H / 2) ** 2) < (0.3 * H) ** 2).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / "mask" / f"{i:03d}.png", compress_level=1)
    R, t = syn.look_at(c)
    P = np.eye(4)
    P[:3] = projection_matrix(K, R, t)
    cams[f"world_mat_{i}"], cams[f"scale_mat_{i}"] = P, np.eye(4)
np.savez(root / "cameras_sphere.npz", **cams)
del img, mask, xs, ys

runtime.init("cpu", verbose=False)
from taichi_neus.train.trainer import Trainer  # noqa: E402

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
scene = load_scene(root)
assert scene.images.dtype == np.uint8
tr = Trainer(scene, small_config(iters=10), root.parent / "run", log=lambda *a: None)
for _ in range(3):
    tr.train_step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("MEMORY " + json.dumps({"image_bytes": int(scene.images.nbytes), "mask_bytes": int(scene.masks.nbytes),
                              "growth": int(after - before), "before": int(before)}))
