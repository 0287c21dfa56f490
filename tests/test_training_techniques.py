"""The trainer's technique switches (S3IM, quadtree, soft mining, gradient scaling) really act in training."""

import math

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from training_helpers import small_config

from taichi_neus.data import default_scene_path, load_dtu
from taichi_neus.train.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scene():
    return load_dtu(default_scene_path())


def _cfg(iters=6, rays=256):
    cfg = small_config(iters=iters)
    cfg.train.min_rays = cfg.train.max_rays = rays
    cfg.train.sample_budget = rays * cfg.render.n_fine
    cfg.train.grad_scaling = "none"
    return cfg


def test_s3im_term_is_trained_on_whole_patches(scene, tmp_path):
    cfg = _cfg()
    cfg.train.s3im_weight, cfg.train.s3im_batch, cfg.train.s3im_patch = 1.0, 512, 32
    tr = Trainer(scene, cfg, tmp_path, log=lambda *a: None)
    stats = [tr.train_step() for _ in range(3)]
    for st in stats:
        assert st["rays"] == 512 and math.isfinite(st["loss"])
        assert 0.0 < st["s3im"] <= 2.0
        assert st["loss"] == pytest.approx(st["l1"] + st["mask_bce"] + st["eikonal"] + st["eikonal_points"]
                                           + st["curvature"] + st["s3im"] + st["photo"])


def test_masked_target_for_s3im_and_sampler_errors(scene, tmp_path):
    """With masks the background target is the background colour, not the photo's background."""
    sc = load_dtu(default_scene_path())
    sc.images[sc.masks == 0] = 255  # a white photo background the model is not asked to render
    cfg = _cfg()
    cfg.train.s3im_weight, cfg.train.s3im_batch, cfg.train.s3im_patch = 1.0, 256, 16
    cfg.train.pixel_sampler = "quadtree"
    tr = Trainer(sc, cfg, tmp_path, log=lambda *a: None)
    seen = {}
    s3im_fn, update_fn = tr.s3im.loss_and_grad, tr.pixels.update

    def spy_s3im(pred, target, seed=None):
        seen["pred"], seen["target"] = pred.copy(), target.copy()
        return s3im_fn(pred, target, seed=seed)

    def spy_update(vids, pix, err, step):
        seen["vids"], seen["pix"], seen["err"] = vids, pix, err
        return update_fn(vids, pix, err, step)

    tr.s3im.loss_and_grad, tr.pixels.update = spy_s3im, spy_update
    tr.train_step()
    x = seen["pix"][:, 0].astype(int)
    y = seen["pix"][:, 1].astype(int)
    fg = sc.masks[seen["vids"], y, x] > 127
    assert fg.any() and (~fg).any()
    np.testing.assert_array_equal(seen["target"][~fg], 0.0)
    np.testing.assert_allclose(seen["target"][fg], sc.images[seen["vids"], y, x][fg] / 255.0, atol=1e-6)
    np.testing.assert_allclose(seen["err"], np.abs(seen["pred"] - seen["target"]).mean(1), atol=1e-6)


def test_soft_mining_targets_are_bilinear_and_weights_act(scene, tmp_path):
    cfg = _cfg(iters=9)
    cfg.train.pixel_sampler = "soft_mining"
    tr = Trainer(scene, cfg, tmp_path, log=lambda *a: None)
    assert tr.pixels.warmup_steps == 3  # a third of the run
    for _ in range(4):
        assert math.isfinite(tr.train_step()["loss"])
    vids, pix, *_, gt, mask, w = tr._batch(256)
    assert w.std() > 0.01 and w.mean() == pytest.approx(1.0, abs=1e-4)
    assert np.abs(pix - np.floor(pix) - 0.5).max() > 0.1  # continuous positions, not pixel centres
    for v in np.unique(vids)[:5]:  # reference: scipy's linear interpolation, pixel centres at +0.5
        sel = vids == v
        img = scene.images[v].astype(np.float64) / 255.0
        coords = [np.clip(pix[sel, 1] - 0.5, 0, scene.H - 1), np.clip(pix[sel, 0] - 0.5, 0, scene.W - 1)]
        ref = np.stack([map_coordinates(img[..., c], coords, order=1) for c in range(3)], axis=1)
        np.testing.assert_allclose(gt[sel], ref, atol=1e-5)


def test_quadtree_and_gradient_scaling_train(scene, tmp_path):
    cfg = _cfg()
    cfg.train.pixel_sampler = "quadtree"
    tr = Trainer(scene, cfg, tmp_path / "q", log=lambda *a: None)
    for _ in range(3):
        assert math.isfinite(tr.train_step()["loss"])
    assert tr.pixels.leaves()["rays"].sum() == 3 * 256  # the errors of every ray reached the quadtree
    # gradient scaling changes the update (it scales per-sample gradients unevenly), nothing else
    cfg_a, cfg_b = _cfg(iters=2), _cfg(iters=2)
    cfg_b.train.grad_scaling = "paper"
    a = Trainer(scene, cfg_a, tmp_path / "a", log=lambda *a: None)
    b = Trainer(scene, cfg_b, tmp_path / "b", log=lambda *a: None)
    sa, sb = a.train_step(), b.train_step()
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-6)  # same forward pass
    pa, pb = a.state()["params"], b.state()["params"]
    assert not np.allclose(pa, pb)


def test_s_floor_holds_neus_sharpness_up_on_its_log_linear_ramp(scene, tmp_path):
    """``train.s_floor``: after each step, s = exp(10·v) is at least the floor, which rises log-linearly from
    s at the start to ``s_floor`` at ``s_floor_anneal`` of training; off (0), s is learned freely."""
    cfg = _cfg(iters=12)
    cfg.train.s_floor, cfg.train.s_floor_anneal = 800.0, 0.5
    tr = Trainer(scene, cfg, tmp_path / "a", log=lambda *a: None)
    s0 = math.exp(10 * cfg.train.init_variance)
    for step in range(12):
        st = tr.train_step()
        floor = math.exp(math.log(s0) + (math.log(800.0) - math.log(s0)) * min(step / 12 / 0.5, 1.0))
        assert tr.inv_s() >= floor * (1 - 1e-4), (step, st["s"], floor)
    assert tr.inv_s() == pytest.approx(800.0, rel=1e-3)  # the learned s stays far below: the floor holds it
    free = Trainer(scene, _cfg(iters=12), tmp_path / "b", log=lambda *a: None)
    for _ in range(12):
        free.train_step()
    assert free.inv_s() < 100.0



def test_renders_march_with_a_finer_coarse_step(scene, tmp_path):
    """--render.render_refine k: renders (held-out scores, validation images) march at coarse_step / k with
    k times the bins; training keeps coarse_step. A trained surface's renders change with it."""
    cfg = _cfg(iters=4)
    cfg.render.render_refine = 4
    tr = Trainer(scene, cfg, tmp_path / "r", log=lambda *a: None)
    rc = cfg.render
    assert tr.sampler.step == pytest.approx(rc.coarse_step) and tr.sampler.max_coarse == rc.max_coarse
    assert tr.render_sampler.step == pytest.approx(rc.coarse_step / 4)
    assert tr.render_sampler.max_coarse == 4 * rc.max_coarse
    # renders end behind the first opaque surface (a scout at the training step); training never cuts its rays
    assert tr.render_sampler.stop_transmittance == rc.render_stop > 0 and tr.sampler.stop_transmittance == 0
    assert tr.render_sampler._scout.step == pytest.approx(rc.coarse_step)
    for _ in range(3):
        assert math.isfinite(tr.train_step()["loss"])
    view = int(scene.test_ids[0])
    fine = tr.render_view(view, 2)
    rc.render_refine = 1
    tr.render_sampler = tr.make_render_sampler(rc.n_fine)
    assert tr.render_sampler.step == pytest.approx(rc.coarse_step)
    coarse = tr.render_view(view, 2)
    assert np.isfinite(fine["rgb"]).all() and not np.allclose(fine["depth"], coarse["depth"])
