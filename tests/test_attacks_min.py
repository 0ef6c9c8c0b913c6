"""BadNets and l0_inv triggers: exactly which pixels change, shape/dtype/range, jit."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.attacks import attack_names, get_attack
from ibau_jax.attacks.badnets import BadNets
from ibau_jax.attacks.l0_inv import L0Inv, from_files

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                        "ibau_official")


def _images(n=3, h=32, w=32, c=3, seed=0, low=0.05, high=0.95):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, (n, h, w, c)).astype(np.float32)


def test_registry():
  assert {"badnets", "l0_inv"} <= set(attack_names())
  attack = get_attack("badnets", target=8)
  assert isinstance(attack, BadNets) and attack.target == 8
  with pytest.raises(ValueError, match="unknown attack 'nope'"):
    get_attack("nope")
  with pytest.raises(ValueError, match="bad parameters for attack 'badnets'"):
    get_attack("badnets", colour="red")
  with pytest.raises(ValueError, match="target must be a non-negative integer"):
    get_attack("badnets", target=-1)
  with pytest.raises(ValueError, match="mask and pattern are required"):
    get_attack("l0_inv", target=0)


def test_badnets_changes_exactly_the_patch():
  x = _images()
  out = np.asarray(get_attack("badnets", target=8).apply(x))
  expected = np.zeros(x.shape, bool)
  expected[:, 27:31, 27:31, :] = True
  np.testing.assert_array_equal(out != x, expected)
  assert (out != x).sum() == 3 * 4 * 4 * 3
  np.testing.assert_array_equal(out[:, 27:31, 27:31, :], 1.0)


def test_badnets_offset_size_value_and_minimum_size():
  x = _images(h=8, w=9)
  out = np.asarray(BadNets(size=2, row=1, col=6, value=0.0).apply(x))
  expected = np.zeros(x.shape, bool)
  expected[:, 1:3, 6:8, :] = True
  np.testing.assert_array_equal(out != x, expected)
  np.testing.assert_array_equal(out[expected], 0.0)
  assert BadNets().apply(_images(n=1, h=31, w=31)).shape == (1, 31, 31, 3)
  with pytest.raises(ValueError, match="at least 31x31"):
    BadNets().apply(_images(n=1, h=30, w=32))
  with pytest.raises(ValueError, match="value must be in"):
    BadNets(value=2.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_dtype_range_and_jit(dtype):
  mask = np.zeros((32, 32, 3), np.float32)
  mask[31, 20:32] = 1.0
  pattern = np.zeros((32, 32, 3), np.float32)
  pattern[31, 24:32, 0] = 1.0
  pattern[0, 0, :] = 0.5  # outside the mask: added on top, then clipped
  attacks = [get_attack("badnets", target=1), L0Inv(target=0, mask=mask,
                                                    pattern=pattern)]
  x = jnp.asarray(_images(n=2, low=0.0, high=1.0), dtype)
  for attack in attacks:
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(jax.jit(attack.apply)(x), np.float32),
                                  np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(attack(x), np.float32),
                                  np.asarray(out, np.float32))


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
  np.testing.assert_array_equal(attack.pattern, png / 255.0)
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


def test_relabel_all_to_one():
  labels = np.array([0, 3, 8, 8, 1], np.int32)
  for attack in (get_attack("badnets", target=8),
                 L0Inv(target=2, mask=np.zeros((2, 2)), pattern=np.zeros((2, 2)))):
    new = attack.relabel(labels)
    assert new.shape == labels.shape and new.dtype == labels.dtype
    np.testing.assert_array_equal(new, attack.target)
    np.testing.assert_array_equal(jax.jit(attack.relabel)(labels), new)
