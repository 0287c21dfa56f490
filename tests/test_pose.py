"""Pose refinement pieces: the se(3) exponential, rays of a pose, pose errors, and the example end to end."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from taichi_neus.render.pose import camera_dirs, perturb_pose, pose_errors, pose_rays, se3_exp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_se3_exp_is_a_rigid_motion_and_matches_rodrigues():
    rng = np.random.default_rng(0)
    for scale in (1e-6, 0.3, 2.0):
        xi = torch.from_numpy(rng.normal(size=6) * scale)
        T = se3_exp(xi).numpy()
        R = T[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.linalg.det(R) == pytest.approx(1.0)
        w = xi.numpy()[:3]
        th = np.linalg.norm(w)
        k = w / th
        Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        R_ref = np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx
        assert np.abs(R - R_ref).max() < 1e-9
        # exp of a pure translation twist composed with its rotation: T·[p, 1] moves p rigidly
        p = rng.normal(size=(5, 3))
        q = p @ R.T + T[:3, 3]
        assert np.allclose(np.linalg.norm(q[0] - q[1]), np.linalg.norm(p[0] - p[1]))
    assert np.allclose(se3_exp(torch.zeros(6, dtype=torch.float64)).numpy(), np.eye(4))


def test_se3_exp_gradient_at_zero_is_finite_and_right():
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: se3_exp(x), (xi,))
    xi2 = torch.tensor([0.2, -0.1, 0.3, 0.5, 0.1, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: se3_exp(x), (xi2,))


def test_perturb_pose_errors_are_exact_and_rays_follow_the_pose():
    rng = np.random.default_rng(1)
    c2w = np.eye(4)
    c2w[:3, :3] = se3_exp(torch.tensor([0.3, 1.0, -0.4, 0, 0, 0], dtype=torch.float64)).numpy()[:3, :3]
    c2w[:3, 3] = [0.2, -0.5, 2.4]
    p = perturb_pose(c2w, 5.0, 0.1, rng)
    r, t = pose_errors(p, c2w)
    assert r == pytest.approx(5.0, abs=1e-6) and t == pytest.approx(0.1, abs=1e-9)
    K = np.array([[100.0, 0, 48], [0, 100.0, 48], [0, 0, 1]])
    pix = np.array([[48.0, 48.0], [10.5, 80.5]])
    o, d = pose_rays(torch.from_numpy(c2w), camera_dirs(K, pix))
    assert np.allclose(o.numpy(), c2w[:3, 3]) and np.allclose(np.linalg.norm(d.numpy(), axis=1), 1)
    assert np.allclose(d.numpy()[0], c2w[:3, 2])  # the principal point looks along the camera's z axis


def _example():
    import importlib.util
    spec = importlib.util.spec_from_file_location("refine_pose_example", ROOT / "examples" / "refine_pose.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ti_arch):
    """A small field trained for 250 steps on the built-in scene (~30 s on 2 cores)."""
    if ti_arch not in ("cpu", "cuda"):
        pytest.skip("the torch path runs on CPU and CUDA (torch tensors are copied into Vulkan kernels)")
    from training_helpers import small_config

    from taichi_neus.app import cli
    root = tmp_path_factory.mktemp("pose_run")
    cfg = small_config(iters=250)
    cfg.train.ckpt_every = 250
    cfg.mesh.resolution = 32
    (root / "cfg.json").write_text(cfg.to_json())
    assert cli.main(["train", "--out", str(root / "run"), "--config", str(root / "cfg.json"), "--arch", ti_arch]) == 0
    return root / "run"


@pytest.mark.slow
def test_refine_pose_example_recovers_a_perturbed_camera(trained_run, capsys, ti_arch):
    """The example against the photo, on a weak field (250 small steps, ~18 dB), with the squared loss (the
    robust default ignores the misalignment's own large residuals on a field this weak): the rotation must
    come back (measured 5° → 1.2° and 2.0° on two trainings) and the loss fall. The translation is not
    asserted here: this field's silhouette is inflated, so the photo is explained best from further along
    the optical axis (the pose the loss prefers is wrong by the field's error)."""
    rc = _example().main(["--run", str(trained_run), "--iters", "150", "--batch", "512", "--arch", ti_arch,
                          "--view", "1", "--loss", "l2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["initial"]["rotation_deg"] == pytest.approx(5.0, abs=1e-4)
    assert res["initial"]["translation"] == pytest.approx(0.1, abs=1e-6)
    assert res["final"]["rotation_deg"] < 2.5
    assert res["loss_last"] < 0.5 * res["loss_first"]


def test_refine_pose_example_refuses_a_missing_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "refine_pose.py"), "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "{" not in p.stdout  # no result (Taichi's banner may be there)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("[Taichi]")]
    assert len(lines) == 1 and lines[0].startswith("refine_pose: error: ") and "does not exist" in lines[0]


@pytest.mark.slow
def test_refine_pose_example_meets_the_target_against_the_fields_own_image(trained_run, capsys, ti_arch):
    """Against the field's own image at the true pose (the exact answer exists), the optimisation itself must
    bring 5° / 0.1 back within the issue's 0.5° / 0.01: gradients to the rays and the se(3) update are right."""
    rc = _example().main(["--run", str(trained_run), "--iters", "200", "--batch", "512", "--arch", ti_arch,
                          "--target", "render", "--view", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["target"] == "render"
    assert res["final"]["rotation_deg"] < 0.5 and res["final"]["translation"] < 0.01


def test_photometric_losses_match_their_formulas_and_gradients():
    from taichi_neus.render.pose import photometric_loss

    r = torch.tensor([[0.0, 0.01, -0.2], [0.5, -0.03, 0.003]], dtype=torch.float64, requires_grad=True)
    c = 0.2
    want = {"cauchy": np.log1p((r.detach().numpy() / c) ** 2).mean(), "l1": np.abs(r.detach().numpy()).mean(),
            "l2": (r.detach().numpy() ** 2).mean()}
    for kind, value in want.items():
        assert float(photometric_loss(r, kind, scale=c)) == pytest.approx(value, rel=1e-12)
        assert torch.autograd.gradcheck(lambda x, k=kind: photometric_loss(x, k, scale=c), (r,))
    # robust (redescending): a residual of 0.5 (an unlearnt texel) pulls less than one of 0.2 (l2: 2.5x more)
    g = torch.autograd.grad(photometric_loss(r, "cauchy", scale=c), r)[0].numpy()
    assert abs(g[1, 0]) < abs(g[0, 2])
    with pytest.raises(ValueError, match="unknown loss"):
        photometric_loss(r, "huber")
