"""Attacks: triggers (exact pixels, budgets, determinism, jit/vmap), label policies,
multi-target and poisoning at an exact ratio."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.attacks import (MultiTarget, assign, attack_names, get_attack,
                              grid_sample, poison)
from ibau_jax.attacks import base as base_lib
from ibau_jax.attacks import blend as blend_lib
from ibau_jax.attacks import l2_inv as l2_inv_lib
from ibau_jax.attacks import trojan as trojan_lib
from ibau_jax.attacks import wanet as wanet_lib
from ibau_jax.attacks.badnets import BadNets
from ibau_jax.attacks.l0_inv import L0Inv, from_files
from ibau_jax.attacks.l2_inv import L2Inv
from ibau_jax.attacks.sig import Sig
from ibau_jax.attacks.smooth import Smooth
from ibau_jax.attacks.trojan import TrojanSquare, TrojanWatermark
from ibau_jax.attacks.wanet import WaNet

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                        "ibau_official")

ALL = ("badnets", "blend", "l0_inv", "l2_inv", "sig", "smooth", "trojan_sq",
       "trojan_wm", "wanet")


def _images(n=8, h=32, w=32, c=3, seed=0, low=0.05, high=0.95):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, (n, h, w, c)).astype(np.float32)


def _grey(n=2, h=32, w=32, c=3):
  return np.full((n, h, w, c), 0.5, np.float32)


# --- registry -------------------------------------------------------------------


def test_registry_names_and_errors():
  assert set(attack_names()) == set(ALL)
  attack = get_attack("badnets", target=8)
  assert isinstance(attack, BadNets) and attack.target == 8
  with pytest.raises(ValueError, match="unknown attack 'nope'"):
    get_attack("nope")
  with pytest.raises(ValueError, match="bad parameters for attack 'badnets'"):
    get_attack("badnets", colour="red")
  with pytest.raises(ValueError, match="bad parameters for attack 'wanet'"):
    get_attack("wanet", alpha=0.2)
  bad = [
      ("badnets", {"target": -1}, "target must be a non-negative integer"),
      ("badnets", {"target": 1.5}, "target must be a non-negative integer"),
      ("badnets", {"value": 2.0}, "value must be a finite number in"),
      ("badnets", {"pattern": "stripes"}, "pattern must be one of"),
      ("badnets", {"pattern": "checkerboard", "value": 0.5}, "square pattern only"),
      ("badnets", {"size": 0}, "size must be >= 1"),
      ("blend", {"alpha": 1.5}, "alpha must be a finite number in"),
      ("blend", {"pattern": np.full((4, 4), 2.0)}, r"pattern values must be in"),
      ("l0_inv", {"mask": np.zeros((4, 4))}, "give both mask and pattern"),
      ("l2_inv", {"norm": None}, "norm=None needs a pattern"),
      ("l2_inv", {"norm": -1.0}, "norm must be a finite number"),
      ("smooth", {"norm": "l1"}, "norm must be one of"),
      ("smooth", {"sigma": 0.0}, "sigma must be > 0"),
      ("sig", {"delta": "big"}, "delta must be a number"),
      ("trojan_sq", {"size": 2.5}, "size must be an integer"),
      ("trojan_wm", {"amplitude": 3.0}, "amplitude must be a finite number"),
      ("wanet", {"k": 0}, "k must be >= 1"),
      ("wanet", {"upsampling": "nearest"}, "upsampling must be one of"),
      ("wanet", {"strength": -0.5}, "strength must be a finite number"),
      ("badnets", {"mode": "one_to_one"}, "mode must be one of"),
      ("badnets", {"target": 10, "num_classes": 10}, "target 10 must be <"),
      ("badnets", {"num_classes": 1}, "num_classes must be >= 2"),
      ("sig", {"mode": "all_to_all", "num_classes": 10}, "clean-label attack must"),
  ]
  for name, params, message in bad:
    with pytest.raises(ValueError, match=message):
      get_attack(name, **params)


# --- every attack: shape, dtype, range, determinism, jit, vmap --------------------


@pytest.mark.parametrize("name", ALL)
def test_every_attack_keeps_shape_dtype_range_and_is_pure(name):
  x = _images(low=0.0, high=1.0)
  attack = get_attack(name, target=1)
  out = attack.apply(x)
  assert out.shape == x.shape and out.dtype == x.dtype
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert not np.array_equal(np.asarray(out), x)  # the trigger does something
  # Same parameters, another object: the same pixels (patterns come from seeds).
  np.testing.assert_array_equal(get_attack(name, target=1).apply(x), out)
  np.testing.assert_array_equal(attack(x), out)
  np.testing.assert_allclose(jax.jit(attack.apply)(x), out, atol=1e-6)
  batched = jax.vmap(attack.apply)(x.reshape(2, 4, *x.shape[1:]))
  np.testing.assert_allclose(np.asarray(batched).reshape(x.shape), out, atol=1e-6)
  low = attack.apply(jnp.asarray(x, jnp.bfloat16))
  assert low.dtype == jnp.bfloat16 and low.shape == x.shape
  assert float(low.min()) >= 0.0 and float(low.max()) <= 1.0
  with pytest.raises(ValueError, match="NHWC"):
    attack.apply(x[0])
  with pytest.raises(ValueError, match="floating point"):
    attack.apply((x * 255).astype(np.uint8))


def test_seed_changes_generated_patterns():
  x = _images(n=2)
  for name in ("blend", "l0_inv", "l2_inv", "smooth", "trojan_sq", "trojan_wm",
               "wanet"):
    a = np.asarray(get_attack(name, seed=0).apply(x))
    b = np.asarray(get_attack(name, seed=1).apply(x))
    assert not np.array_equal(a, b), name


# --- input validation: layout, value range, trigger size ---------------------------


def test_channels_first_rule_is_shared_by_patterns_and_batches():
  for shape, first in [((3, 32, 32), True), ((1, 28, 28), True), ((32, 32, 3), False),
                       ((28, 28, 1), False), ((3, 8, 3), False), ((1, 5, 1), False),
                       ((32, 32, 4), False), ((3, 32, 5), True)]:
    assert base_lib.looks_channels_first(shape) == first, shape
    batch = np.zeros((2, *shape), np.float32)
    if first:
      with pytest.raises(ValueError, match="channels-first"):
        base_lib.check_batch(batch, "t")
      assert base_lib.as_hwc(batch[0], "t", "p").shape == shape[1:] + shape[:1]
    else:
      assert base_lib.check_batch(batch, "t").shape == batch.shape
      assert base_lib.as_hwc(batch[0], "t", "p").shape == shape


@pytest.mark.parametrize("name", ALL)
def test_every_attack_rejects_channels_first_batches(name):
  attack = get_attack(name, target=1)
  x = _images(n=2, low=0.0, high=1.0)
  grey = x[..., :1]
  assert attack.apply(grey).shape == grey.shape  # NHWC grayscale still works
  assert attack.apply(x).shape == x.shape
  for nchw in (x.transpose(0, 3, 1, 2), grey.transpose(0, 3, 1, 2)):
    with pytest.raises(ValueError, match=rf"{name}: images look channels-first.*"
                       r"\(2, [13], 32, 32\)"):
      attack.apply(nchw)
    with pytest.raises(ValueError, match="channels-first"):  # static: also jitted
      jax.jit(attack.apply)(nchw)
    with pytest.raises(ValueError, match="poison: images look channels-first"):
      poison(nchw, np.arange(2) % 2, attack, 1.0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="channels-first"):
    MultiTarget(attacks=(attack,)).apply_with(x.transpose(0, 3, 1, 2), 0)


@pytest.mark.parametrize("name", ALL)
def test_every_attack_checks_the_value_range_of_concrete_batches(name):
  attack = get_attack(name, target=1)
  x = _images(n=2, low=0.0, high=1.0)
  x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # the bounds themselves are fine
  out = attack.apply(x)
  for bad in (x * 255, jnp.asarray(x * 255), x - 0.5):
    with pytest.raises(ValueError, match=rf"{name}: images must be finite and in "
                       r"\[0, 1\], got range .*ibau_jax.data.to_float"):
      attack.apply(bad)
  nan = x.copy()
  nan[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match=f"{name}: images .* got NaN values"):
    attack.apply(nan)
  with pytest.raises(ValueError, match=r"poison: images must be finite and in "
                     r"\[0, 1\].*to_float"):
    poison(x * 255, np.arange(2) % 2, attack, 1.0, key=jax.random.PRNGKey(0))
  # Traced batches cannot be value-checked (documented): jit / vmap run unchecked.
  assert jax.jit(attack.apply)(x * 255).shape == x.shape
  assert jax.vmap(attack.apply)(x[None] * 255).shape == (1, *x.shape)
  np.testing.assert_array_equal(attack.apply(x), out)  # valid input: same pixels


def test_grid_sample_does_not_range_check():
  x = _images(n=1, h=4, w=5) * 255  # a generic resampler: any values
  np.testing.assert_allclose(grid_sample(x, wanet_lib.identity_grid(4, 5)), x,
                             rtol=1e-6)


@pytest.mark.parametrize("name, params, message", [
    ("badnets", {}, r"a 4x4 patch at \(27, 27\) needs images of at least 31x31 "
     "pixels, got 16x16"),
    ("l0_inv", {"mask": np.zeros((32, 32, 3)), "pattern": np.zeros((32, 32, 3))},
     r"mask shape \(32, 32, 3\) does not fit images of shape \(H, W, C\) = "
     r"\(16, 16, 3\)"),
    ("l2_inv", {"pattern": np.ones((32, 32, 3))},
     r"pattern shape \(32, 32, 3\) does not fit images"),
    ("smooth", {"pattern": np.ones((32, 32, 3))},
     r"pattern shape \(32, 32, 3\) does not fit images"),
])
def test_fixed_size_triggers_reject_other_image_sizes(name, params, message):
  attack = get_attack(name, **params)
  assert attack.apply(_images(n=1)).shape == (1, 32, 32, 3)
  for small in (_images(n=1, h=16, w=16), _images(n=1, h=16, w=16, c=1)[..., :1]):
    with pytest.raises(ValueError, match=f"{name}: "):
      attack.apply(small)
  with pytest.raises(ValueError, match=f"{name}: {message}"):
    attack.apply(_images(n=1, h=16, w=16))
  with pytest.raises(ValueError, match=f"{name}: "):
    jax.jit(attack.apply)(_images(n=1, h=16, w=16))  # a static check


def test_resizable_and_generated_triggers_fit_any_image_size():
  pattern = np.full((8, 8, 3), 0.5, np.float32)
  for attack in [get_attack(n) for n in ALL if n != "badnets"] + [
      get_attack("blend", pattern=pattern), get_attack("trojan_sq", pattern=pattern),
      get_attack("trojan_wm", pattern=pattern)]:
    assert attack.apply(_images(n=1, h=16, w=12)).shape == (1, 16, 12, 3), attack.name


# --- patches: exactly which pixels change ----------------------------------------


def test_badnets_changes_exactly_the_patch():
  x = _images(n=3)
  out = np.asarray(get_attack("badnets", target=8).apply(x))
  expected = np.zeros(x.shape, bool)
  expected[:, 27:31, 27:31, :] = True
  np.testing.assert_array_equal(out != x, expected)
  np.testing.assert_array_equal(out[:, 27:31, 27:31, :], 1.0)


def test_badnets_checkerboard_bottom_right():
  x = _images(n=3)
  out = np.asarray(get_attack("badnets", pattern="checkerboard").apply(x))
  expected = np.zeros(x.shape, bool)
  expected[:, 29:32, 29:32, :] = True
  np.testing.assert_array_equal(out != x, expected)
  board = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)
  np.testing.assert_array_equal(out[:, 29:32, 29:32, :],
                                np.broadcast_to(board[None, :, :, None], (3, 3, 3, 3)))
  small = _images(n=1, h=8, w=10)  # the corner moves with the image size
  out = np.asarray(BadNets(pattern="checkerboard").apply(small))
  expected = np.zeros(small.shape, bool)
  expected[:, 5:8, 7:10, :] = True
  np.testing.assert_array_equal(out != small, expected)


def test_badnets_offset_size_value_and_minimum_size():
  x = _images(n=3, h=8, w=9)
  out = np.asarray(BadNets(size=2, row=1, col=6, value=0.0).apply(x))
  expected = np.zeros(x.shape, bool)
  expected[:, 1:3, 6:8, :] = True
  np.testing.assert_array_equal(out != x, expected)
  np.testing.assert_array_equal(out[expected], 0.0)
  assert BadNets().apply(_images(n=1, h=31, w=31)).shape == (1, 31, 31, 3)
  with pytest.raises(ValueError, match="at least 31x31"):
    BadNets().apply(_images(n=1, h=30, w=32))
  with pytest.raises(ValueError, match="at least"):
    BadNets(pattern="checkerboard").apply(_images(n=1, h=2, w=2))


def test_trojan_square_touches_only_its_square():
  x = _images(n=3)
  attack = TrojanSquare()
  out = np.asarray(attack.apply(x))
  row, col = attack.position(32, 32)
  assert (row, col) == (26, 26)
  inside = np.zeros(x.shape, bool)
  inside[:, 26:31, 26:31, :] = True
  np.testing.assert_array_equal(out[~inside], x[~inside])
  p = attack.trigger(32, 32, 3)
  np.testing.assert_allclose(out, np.minimum(x + p, 1.0), atol=1e-7)
  assert (p[26:31, 26:31] > 0).all() and p.max() <= 1.0


def test_trojan_watermark_is_sparse_and_additive():
  x = _images(n=2)
  attack = TrojanWatermark()
  p = attack.trigger(32, 32, 3)
  i, j = np.indices((32, 32))
  lines = (i + j) % 8 == 0
  assert (p[~lines] == 0).all() and (p[lines] > 0).all()
  assert 0.0 < p.max() <= 0.5
  out = np.asarray(attack.apply(x))
  np.testing.assert_array_equal(out[:, ~lines], x[:, ~lines])
  np.testing.assert_allclose(out, np.clip(x + p, 0, 1), atol=1e-7)


def test_trojan_and_blend_from_file_resize(tmp_path):
  from PIL import Image
  png = np.zeros((16, 16, 3), np.uint8)
  png[:, :, 0] = 255
  Image.fromarray(png).save(tmp_path / "trigger.png")
  x = _images(n=2)
  red = np.zeros((32, 32, 3), np.float32)
  red[..., 0] = 1.0
  attack = trojan_lib.from_file(tmp_path / "trigger.png", kind="trojan_wm", target=2)
  assert isinstance(attack, TrojanWatermark) and attack.target == 2
  np.testing.assert_allclose(attack.apply(x), np.clip(x + red, 0, 1), atol=1e-6)
  blend = blend_lib.from_file(tmp_path / "trigger.png", target=3)
  np.testing.assert_allclose(blend.apply(x), 0.8 * x + 0.2 * red, atol=1e-6)
  with pytest.raises(ValueError, match="kind must be one of"):
    trojan_lib.from_file(tmp_path / "trigger.png", kind="trojan_xx")
  with pytest.raises(ValueError, match="file not found"):
    blend_lib.from_file(tmp_path / "missing.png")
  with pytest.raises(ValueError, match="3 channels, images have 1"):
    blend.apply(_images(n=1, c=1))


def test_blend_default_is_seeded_uniform_noise():
  x = _images(n=2)
  attack = get_attack("blend")
  assert attack.alpha == 0.2
  k = attack.key_pattern(32, 32, 3)
  assert k.shape == (32, 32, 3) and 0.0 <= k.min() and k.max() <= 1.0
  assert 0.4 < k.mean() < 0.6
  np.testing.assert_allclose(attack.apply(x), 0.8 * x + 0.2 * k, atol=1e-6)


# --- l0_inv ---------------------------------------------------------------------


def test_l0_inv_changes_only_masked_or_pattern_pixels():
  rng = np.random.default_rng(1)
  mask = (rng.uniform(size=(32, 32, 3)) < 0.05).astype(np.float32)
  pattern = np.where(rng.uniform(size=(32, 32, 3)) < 0.5, mask, 0.0) * rng.uniform(
      size=(32, 32, 3))
  pattern[5, 5, 1] = 0.01  # one unmasked pattern pixel: added, not blended
  pattern = pattern.astype(np.float32)
  mask[5, 5, 1] = 0.0
  x = _images(n=2, low=0.1, high=0.9)
  out = np.asarray(L0Inv(target=0, mask=mask, pattern=pattern).apply(x))
  changed = out != x
  allowed = np.broadcast_to((mask > 0) | (pattern > 0), x.shape)
  assert not (changed & ~allowed).any()
  assert changed.sum() > 0
  hard = np.broadcast_to(mask == 1, x.shape)
  np.testing.assert_allclose(out[hard], np.broadcast_to(pattern, x.shape)[hard])
  np.testing.assert_allclose(out[:, 5, 5, 1], np.minimum(x[:, 5, 5, 1] + 0.01, 1.0),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="does not fit images"):
    L0Inv(mask=mask, pattern=pattern).apply(_images(n=1, h=16, w=16))
  with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
    L0Inv(mask=2 * mask, pattern=pattern)


def test_l0_inv_default_is_sparse():
  x = _images(n=2)
  attack = L0Inv()
  mask, pattern = attack.trigger(32, 32, 3)
  pixels = mask.any(axis=-1)
  assert pixels.sum() == 9 and (pattern[~pixels] == 0).all()
  out = np.asarray(attack.apply(x))
  np.testing.assert_array_equal(out[:, ~pixels], x[:, ~pixels])
  np.testing.assert_allclose(out[:, pixels], np.broadcast_to(pattern[pixels],
                                                             (2, 9, 3)))


def test_l0_inv_from_files_transposes_channels_first_mask(tmp_path):
  from PIL import Image
  mask_chw = np.zeros((3, 32, 32), np.float32)
  mask_chw[:, 31, 23:32] = 1.0
  np.save(tmp_path / "mask.npy", mask_chw)
  png = np.zeros((32, 32, 3), np.uint8)
  png[31, 24, :] = (255, 0, 255)
  png[31, 31, :] = (0, 0, 255)
  Image.fromarray(png).save(tmp_path / "pattern.png")
  attack = from_files(tmp_path / "mask.npy", tmp_path / "pattern.png", target=3)
  assert attack.target == 3
  assert attack.mask.shape == (32, 32, 3) and attack.pattern.shape == (32, 32, 3)
  np.testing.assert_array_equal(attack.mask, mask_chw.transpose(1, 2, 0))
  np.testing.assert_array_equal(attack.pattern, png / np.float32(255.0))
  out = np.asarray(attack.apply(np.full((1, 32, 32, 3), 0.5, np.float32)))
  np.testing.assert_array_equal(out[0, 31, 24], [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(out[0, 31, 23], [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(out[0, :31], 0.5)
  with pytest.raises(ValueError, match="file not found"):
    from_files(tmp_path / "missing.npy", tmp_path / "pattern.png")


@pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, "mask.npy")),
                    reason="official I-BAU trigger files not available")
def test_l0_inv_official_trigger_files():
  attack = from_files(os.path.join(OFFICIAL, "mask.npy"),
                      os.path.join(OFFICIAL, "l0_inv.png"), target=0)
  rows, cols = np.nonzero(attack.mask.any(axis=-1))
  assert set(rows) == {31} and sorted(cols) == list(range(23, 32))
  out = np.asarray(attack.apply(_images(n=1)))
  assert (out[0, :31] == _images(n=1)[0, :31]).all()


# --- L2 / smooth budgets ----------------------------------------------------------


def test_l2_inv_budget_on_mid_grey():
  x = _grey()
  attack = get_attack("l2_inv")
  delta = np.asarray(attack.apply(x)) - x
  assert np.abs(delta).max() < 0.5  # no clipping on mid-grey
  np.testing.assert_allclose(np.sqrt((delta ** 2).sum(axis=(1, 2, 3))), 3.2,
                             rtol=1e-5)
  np.testing.assert_allclose(np.sqrt((delta[0] ** 2).sum()),
                             np.sqrt((attack.trigger(32, 32, 3) ** 2).sum()),
                             rtol=1e-6)
  given = np.ones((32, 32, 3), np.float32)
  np.testing.assert_allclose(np.linalg.norm(L2Inv(pattern=given).trigger(32, 32, 3)),
                             3.2, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(L2Inv(pattern=given, norm=1.0)
                                            .trigger(32, 32, 3)), 1.0, rtol=1e-6)


def test_l2_inv_from_file_is_unscaled(tmp_path):
  pattern = np.zeros((32, 32, 3), np.float32)
  pattern[::4, ::4, :] = 0.1
  np.save(tmp_path / "l2.npy", pattern)
  attack = l2_inv_lib.from_file(tmp_path / "l2.npy", target=0)
  np.testing.assert_allclose(attack.apply(_grey()) - _grey(), np.broadcast_to(
      pattern, (2, 32, 32, 3)), atol=1e-7)
  with pytest.raises(ValueError, match="does not fit images"):
    attack.apply(_grey(h=16, w=16))


def test_smooth_budget_and_low_frequency():
  x = _grey()
  delta = np.asarray(get_attack("smooth").apply(x)) - x
  np.testing.assert_allclose(np.sqrt((delta ** 2).sum(axis=(1, 2, 3))), 3.2,
                             rtol=1e-5)
  linf = Smooth(norm="linf", eps=8 / 255).trigger(32, 32, 3)
  np.testing.assert_allclose(np.abs(linf).max(), 8 / 255, rtol=1e-6)
  # Smoothing removes high frequencies: neighbouring pixels are close compared with
  # white noise of the same norm (for which this ratio is about sqrt(2)).
  p = Smooth().trigger(32, 32, 3)
  ratio = np.sqrt(np.mean(np.diff(p, axis=1) ** 2) / np.mean(p ** 2))
  assert ratio < 0.5
  sharper = Smooth(sigma=0.5).trigger(32, 32, 3)
  assert np.sqrt(np.mean(np.diff(sharper, axis=1) ** 2) / np.mean(sharper ** 2)) \
      > ratio


# --- WaNet ----------------------------------------------------------------------


def test_wanet_strength_zero_is_identity_and_default_warps():
  x = _images()
  np.testing.assert_allclose(WaNet(strength=0.0).apply(x), x, atol=1e-6, rtol=0)
  np.testing.assert_allclose(WaNet(strength=0.0, upsampling="bilinear").apply(x), x,
                             atol=1e-6, rtol=0)
  out = np.asarray(WaNet().apply(x))
  assert np.abs(out - x).max() > 0.05
  grid = WaNet().grid(32, 32)
  shift = np.abs(grid - wanet_lib.identity_grid(32, 32)).max()
  assert 0 < shift < 0.2  # s * F / H: a fraction of a pixel to a few pixels
  assert np.abs(grid).max() <= 1.0


def test_wanet_flow_and_upsampling():
  rng = np.random.default_rng(0)
  field = rng.uniform(-1, 1, (4, 4, 2))
  for method in ("bicubic", "bilinear"):
    up = wanet_lib.upsample(field, 31, 31, method)  # align_corners: knots at 0, 10, ..
    np.testing.assert_allclose(up[::10, ::10], field, atol=1e-12)
    np.testing.assert_allclose(wanet_lib.upsample(np.ones((4, 4, 2)), 32, 32, method),
                               1.0, atol=1e-12)


def test_grid_sample_matches_pytorch_semantics():
  x = _images(n=2, h=5, w=6)
  ident = wanet_lib.identity_grid(5, 6)
  np.testing.assert_allclose(grid_sample(x, ident), x, atol=1e-6)
  # One pixel to the right (in normalised units 2 / (W - 1)), border clamped.
  shifted = ident.copy()
  shifted[..., 0] += 2 / 5
  out = np.asarray(grid_sample(x, shifted))
  np.testing.assert_allclose(out[:, :, :5], x[:, :, 1:], atol=1e-6)
  np.testing.assert_allclose(out[:, :, 5], x[:, :, 5], atol=1e-6)
  # A point between four pixels: bilinear weights; per-image grids.
  g = np.zeros((2, 1, 1, 2), np.float32)
  g[0, 0, 0] = (-1 + 2 * 1.25 / 5, -1 + 2 * 2.5 / 4)  # col 1.25, row 2.5
  g[1, 0, 0] = (1.0, 1.0)  # bottom-right corner
  out = np.asarray(grid_sample(x, g))
  a = x[0]
  expect = (0.5 * (0.75 * a[2, 1] + 0.25 * a[2, 2])
            + 0.5 * (0.75 * a[3, 1] + 0.25 * a[3, 2]))
  np.testing.assert_allclose(out[0, 0, 0], expect, atol=1e-6)
  np.testing.assert_allclose(out[1, 0, 0], x[1, 4, 5], atol=1e-6)
  with pytest.raises(ValueError, match="grid must be"):
    grid_sample(x, np.zeros((3, 1, 1, 2)))


def test_wanet_noise_mode():
  x = _images()
  attack = WaNet()
  key = jax.random.PRNGKey(3)
  noisy = np.asarray(attack.apply_noise(x, key))
  assert noisy.shape == x.shape and noisy.dtype == x.dtype
  np.testing.assert_array_equal(attack.apply_noise(x, key=key), noisy)
  np.testing.assert_allclose(jax.jit(attack.apply_noise)(x, key), noisy, atol=1e-6)
  assert not np.array_equal(attack.apply_noise(x, jax.random.PRNGKey(4)), noisy)
  assert not np.allclose(noisy, attack.apply(x), atol=1e-3)
  assert 0.0 <= noisy.min() and noisy.max() <= 1.0


# --- SIG ------------------------------------------------------------------------


def test_sig_signal():
  x = _grey(h=8, w=12)
  out = np.asarray(get_attack("sig").apply(x))
  j = np.arange(12)
  v = 20 / 255 * np.sin(2 * np.pi * j * 6 / 12)
  np.testing.assert_allclose(out, 0.5 + np.broadcast_to(v[None, None, :, None],
                                                        x.shape), atol=1e-6)


def test_sig_poisons_only_target_class_and_keeps_labels():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 60).astype(np.int32)
  x = _images(n=60, h=8, w=8)
  attack = Sig(target=2)
  assert attack.clean_label
  xp, yp, poisoned = poison(x, labels, attack, 0.5, key=jax.random.PRNGKey(0))
  n_target = int((labels == 2).sum())
  assert poisoned.sum() == round(0.5 * n_target)
  assert (labels[poisoned] == 2).all()
  np.testing.assert_array_equal(yp, labels)
  np.testing.assert_array_equal(xp[~poisoned], x[~poisoned])
  np.testing.assert_allclose(xp[poisoned], attack.apply(x[poisoned]), atol=1e-6)
  np.testing.assert_array_equal(attack.relabel(labels), 2)  # test-time target


def test_sig_test_delta_changes_only_the_test_time_signal():
  x = _grey(h=8, w=12)
  v = np.sin(2 * np.pi * np.arange(12) * 6 / 12)[None, None, :, None]
  attack = Sig(target=1, delta=0.1, test_delta=0.3)
  np.testing.assert_allclose(attack.apply(x), 0.5 + 0.1 * np.broadcast_to(v, x.shape),
                             atol=1e-6)
  test_time = attack.for_evaluation()
  np.testing.assert_allclose(test_time.apply(x), 0.5 + 0.3 * np.broadcast_to(v, x.shape),
                             atol=1e-6)
  assert test_time.target == 1 and test_time.clean_label
  labels = np.array([1, 1, 0, 1], np.int32)
  xp, _, poisoned = poison(_images(n=4, h=8, w=12), labels, attack, 1.0,
                           key=jax.random.PRNGKey(0))
  np.testing.assert_allclose(xp[poisoned], attack.apply(_images(n=4, h=8, w=12)[poisoned]),
                             atol=1e-6)  # poisoning keeps the training amplitude
  plain = Sig(target=1)
  assert plain.for_evaluation() is plain and get_attack("badnets").for_evaluation().name == \
      "badnets"
  with pytest.raises(ValueError, match="test_delta"):
    Sig(test_delta=1.5)


# --- label policies ---------------------------------------------------------------


def test_relabel_all_to_one():
  labels = np.array([0, 3, 8, 8, 1], np.int32)
  for attack in (get_attack("badnets", target=8),
                 L0Inv(target=2, mask=np.zeros((2, 2)), pattern=np.zeros((2, 2)))):
    new = attack.relabel(labels)
    assert new.shape == labels.shape and new.dtype == labels.dtype
    np.testing.assert_array_equal(new, attack.target)
    np.testing.assert_array_equal(jax.jit(attack.relabel)(labels), new)


def test_relabel_all_to_all():
  labels = np.array([0, 3, 9, 8, 1], np.int32)
  attack = get_attack("blend", mode="all_to_all", num_classes=10)
  new = attack.relabel(labels)
  assert new.dtype == labels.dtype
  np.testing.assert_array_equal(new, [1, 4, 0, 9, 2])
  np.testing.assert_array_equal(jax.jit(attack.relabel)(labels), new)
  loose = get_attack("wanet", mode="all_to_all")
  np.testing.assert_array_equal(loose.relabel(labels, num_classes=10), new)
  with pytest.raises(ValueError, match="need num_classes"):
    loose.relabel(labels)
  with pytest.raises(ValueError, match="differs from the attack's num_classes"):
    attack.relabel(labels, num_classes=12)


def test_multi_target_apply_and_labels():
  a0 = BadNets(target=1, pattern="checkerboard")
  a1 = Sig(target=4, clean_label=False)
  a2 = TrojanSquare(target=7)
  multi = MultiTarget(attacks=(a0, a1, a2))
  assert multi.targets == (1, 4, 7) and len(multi) == 3
  x = _images(n=5)
  which = np.array([0, 1, 2, -1, 2], np.int32)
  out = np.asarray(multi.apply_with(x, which))
  np.testing.assert_array_equal(out[0], a0.apply(x)[0])
  np.testing.assert_array_equal(out[1], a1.apply(x)[1])
  np.testing.assert_array_equal(out[2], a2.apply(x)[2])
  np.testing.assert_array_equal(out[3], x[3])
  np.testing.assert_array_equal(out[4], a2.apply(x)[4])
  np.testing.assert_allclose(jax.jit(multi.apply_with)(x, which), out, atol=1e-6)
  np.testing.assert_array_equal(multi.apply_with(x, 1), a1.apply(x))
  labels = np.array([3, 3, 3, 3, 0], np.int32)
  np.testing.assert_array_equal(multi.relabel_with(labels, which), [1, 4, 7, 3, 7])
  with pytest.raises(ValueError, match="targets must be distinct"):
    MultiTarget(attacks=(a0, BadNets(target=1)))
  with pytest.raises(ValueError, match="must be all_to_one"):
    MultiTarget(attacks=(a0, BadNets(mode="all_to_all", num_classes=10)))
  with pytest.raises(ValueError, match="at least one attack"):
    MultiTarget(attacks=())
  with pytest.raises(ValueError, match="is not an Attack"):
    MultiTarget(attacks=(a0, "sig"))


def test_multi_target_poisoning():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 10, 200).astype(np.int32)
  x = _images(n=200, h=8, w=8)
  multi = MultiTarget(attacks=(BadNets(target=1, pattern="checkerboard"),
                               Sig(target=4, clean_label=False)))
  key = jax.random.PRNGKey(5)
  which = assign(labels, multi, 0.2, key=key)
  xp, yp, poisoned = poison(x, labels, multi, 0.2, key=key)
  np.testing.assert_array_equal(poisoned, which >= 0)
  for k, a in enumerate(multi.attacks):
    chosen = which == k
    assert chosen.sum() == round(0.2 * int((labels != a.target).sum()))
    assert (labels[chosen] != a.target).all()
    np.testing.assert_array_equal(yp[chosen], a.target)
    np.testing.assert_allclose(xp[chosen], a.apply(x[chosen]), atol=1e-6)
  np.testing.assert_array_equal(xp[~poisoned], x[~poisoned])
  np.testing.assert_array_equal(yp[~poisoned], labels[~poisoned])
  with pytest.raises(ValueError, match="eligible images are left"):
    poison(x, labels, multi, 0.9, key=key)


# --- poisoning ------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1 / 3, 1.0])
def test_poison_ratio_exact_and_target_class_never_poisoned(ratio):
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 10, 100).astype(np.int64)
  x = _images(n=100, h=8, w=8)
  attack = BadNets(target=3, pattern="checkerboard")
  xp, yp, poisoned = poison(x, labels, attack, ratio, key=jax.random.PRNGKey(0))
  assert isinstance(xp, np.ndarray) and isinstance(yp, np.ndarray)
  assert xp.dtype == x.dtype and yp.dtype == labels.dtype and poisoned.dtype == bool
  eligible = int((labels != 3).sum())
  assert poisoned.sum() == round(ratio * eligible)
  assert not poisoned[labels == 3].any()
  np.testing.assert_array_equal(yp[poisoned], 3)
  np.testing.assert_array_equal(yp[~poisoned], labels[~poisoned])
  np.testing.assert_array_equal(xp[~poisoned], x[~poisoned])
  np.testing.assert_array_equal(xp[poisoned], attack.apply(x[poisoned]))


def test_poison_is_a_function_of_the_key_and_takes_jax_arrays():
  labels = np.arange(50, dtype=np.int32) % 5
  x = _images(n=50, h=8, w=8)
  attack = BadNets(target=0, size=2, row=0, col=0)
  key = jax.random.PRNGKey(7)
  a = poison(x, labels, attack, 0.3, key=key, chunk_size=7)
  b = poison(jnp.asarray(x), jnp.asarray(labels), attack, 0.3, key=key)
  for u, v in zip(a, b):
    assert isinstance(v, np.ndarray)
    np.testing.assert_array_equal(u, v)
  c = poison(x, labels, attack, 0.3, key=jax.random.PRNGKey(8))
  assert not np.array_equal(a[2], c[2]) and a[2].sum() == c[2].sum() == 12
  np.testing.assert_array_equal(x, _images(n=50, h=8, w=8))  # inputs untouched


def test_poison_all_to_all():
  labels = np.arange(30, dtype=np.int32) % 10
  x = _images(n=30, h=8, w=8)
  attack = BadNets(pattern="checkerboard", mode="all_to_all")
  xp, yp, poisoned = poison(x, labels, attack, 0.5, key=jax.random.PRNGKey(0),
                            num_classes=10)
  assert poisoned.sum() == 15  # every image is eligible
  np.testing.assert_array_equal(yp[poisoned], (labels[poisoned] + 1) % 10)
  np.testing.assert_array_equal(yp[~poisoned], labels[~poisoned])
  with pytest.raises(ValueError, match="needs num_classes"):
    poison(x, labels, attack, 0.5, key=jax.random.PRNGKey(0))


def test_poison_errors():
  labels = np.arange(10, dtype=np.int32) % 5
  x = _images(n=10, h=8, w=8)
  attack = BadNets(target=0, pattern="checkerboard")
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="ratio must be a finite number in"):
    poison(x, labels, attack, 1.5, key=key)
  with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
    poison(x, labels[:5], attack, 0.5, key=key)
  with pytest.raises(ValueError, match="labels must be < num_classes=4"):
    poison(x, labels, attack, 0.5, key=key, num_classes=4)
  with pytest.raises(ValueError, match="labels must be integers"):
    poison(x, labels.astype(np.float32), attack, 0.5, key=key)
  with pytest.raises(ValueError, match="float NHWC batch"):
    poison((x * 255).astype(np.uint8), labels, attack, 0.5, key=key)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    poison(x * 2, labels, attack, 0.5, key=key)
  with pytest.raises(ValueError, match="Attack or a MultiTarget"):
    poison(x, labels, "badnets", 0.5, key=key)


@pytest.mark.parametrize("name", ALL)
def test_poison_target_must_be_a_class(name):
  labels = np.arange(40, dtype=np.int32) % 10
  x = _images(n=40, low=0.0, high=1.0)
  key = jax.random.PRNGKey(0)
  attack = get_attack(name, target=12)
  for fn in (poison, lambda *a, **k: assign(a[1], *a[2:], **k)):
    with pytest.raises(ValueError, match=f"poison: {name} target 12 is not a class "
                       r"of the labels: .* 0\.\.max\(labels\) = 0\.\.9; pass "
                       "num_classes"):
      fn(x, labels, attack, 0.5, key=key)
    with pytest.raises(ValueError, match="target 12 must be < num_classes 10"):
      fn(x, labels, attack, 0.5, key=key, num_classes=10)
  with pytest.raises(ValueError, match="target 12 must be < num_classes 10"):
    get_attack(name, target=12, num_classes=10)
  # A target above the labels present is fine once num_classes says it is a class.
  which = assign(labels, attack, 0.5, key=key, num_classes=13)
  assert (which >= 0).sum() == (0 if attack.clean_label else 20)
  assert (assign(labels, get_attack(name, target=9), 0.5, key=key) >= 0).sum() == (
      2 if attack.clean_label else 18)


def test_poison_target_check_for_subsets_multi_target_and_all_to_all():
  labels = np.arange(40, dtype=np.int32) % 8  # classes 8 and 9 absent here
  x = _images(n=40, h=8, w=8)
  key = jax.random.PRNGKey(0)
  attack = BadNets(target=9, pattern="checkerboard")
  with pytest.raises(ValueError, match=r"0\.\.max\(labels\) = 0\.\.7; pass "
                     "num_classes"):
    poison(x, labels, attack, 0.5, key=key)
  _, yp, poisoned = poison(x, labels, attack, 0.5, key=key, num_classes=10)
  assert poisoned.sum() == 20 and set(yp[poisoned]) == {9}
  _, yp, poisoned = poison(x, labels, BadNets(target=9, pattern="checkerboard",
                                              num_classes=10), 0.5, key=key)
  assert poisoned.sum() == 20 and set(yp[poisoned]) == {9}
  multi = MultiTarget(attacks=(BadNets(target=1, pattern="checkerboard"),
                               Sig(target=11, clean_label=False)))
  with pytest.raises(ValueError, match=r"poison: trigger 1 \(sig\) target 11 is not "
                     "a class"):
    poison(x, labels, multi, 0.2, key=key)
  with pytest.raises(ValueError, match="target 11 must be < num_classes 10"):
    poison(x, labels, multi, 0.2, key=key, num_classes=10)
  which = assign(labels, multi, 0.2, key=key, num_classes=12)
  assert (which == 0).sum() == 7 and (which == 1).sum() == 8  # round(0.2 * 35), 40
  # All-to-all ignores target; it needs num_classes anyway.
  a2a = BadNets(target=12, pattern="checkerboard", mode="all_to_all")
  _, yp, poisoned = poison(x, labels, a2a, 0.5, key=key, num_classes=8)
  np.testing.assert_array_equal(yp[poisoned], (labels[poisoned] + 1) % 8)
  assert poison(x[:0], labels[:0], attack, 0.5, key=key)[2].shape == (0,)


def test_poison_wanet_noise_mode_adds_cross_samples_with_true_labels():
  labels = np.arange(60, dtype=np.int32) % 6
  x = _images(n=60, h=8, w=8)
  attack = WaNet(target=0, strength=0.5, k=2)
  key = jax.random.PRNGKey(3)
  base = poison(x, labels, attack, 0.2, key=key)
  xp, yp, poisoned = poison(x, labels, attack, 0.2, key=key, noise_ratio=0.25, chunk_size=4)
  # The backdoor samples are those of noise_ratio = 0, labels are untouched elsewhere.
  np.testing.assert_array_equal(poisoned, base[2])
  np.testing.assert_array_equal(xp[poisoned], base[0][poisoned])
  np.testing.assert_array_equal(yp, base[1])
  changed = np.any(xp != x, axis=(1, 2, 3)) & ~poisoned
  assert changed.sum() == round(0.25 * 60)
  # Each noise sample is the noise-mode warp of its image: close to, but not, the trigger.
  idx = np.flatnonzero(changed)
  warped = np.asarray(attack.apply(jnp.asarray(x[idx])))
  assert np.all(np.abs(xp[idx] - warped).max(axis=(1, 2, 3)) > 0)
  assert np.abs(xp[idx] - warped).mean() < np.abs(xp[idx] - x[idx]).mean()
  again = poison(x, labels, attack, 0.2, key=key, noise_ratio=0.25)
  np.testing.assert_array_equal(again[0], xp)
  with pytest.raises(ValueError, match="noise mode"):
    poison(x, labels, BadNets(target=0), 0.2, key=key, noise_ratio=0.1)
  with pytest.raises(ValueError, match="only .* are not poisoned"):
    poison(x, labels, attack, 0.5, key=key, noise_ratio=0.9)


def test_poison_checks_its_key():
  from ibau_jax.attacks import get_attack, poison
  x = np.random.default_rng(0).uniform(0, 1, (8, 6, 6, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="poison: key must be a PRNG key"):
    poison(x, np.arange(8) % 4, get_attack("blend", target=1), 0.5, key=7, num_classes=4)
