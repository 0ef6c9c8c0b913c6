"""`ibau_jax.probe`: universal perturbations, the suspect class, the targeted success rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import probe

H = W = 8
CLASSES = 4
# Class c's images are bright on region c; the model reads each region with weight 3.
REGIONS = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(5, 8)), (slice(5, 8), slice(0, 3)),
           (slice(3, 5), slice(3, 5))]
PATCH = (slice(6, 8), slice(6, 8))  # the planted trigger: 2x2 pixels in the corner


def linear_model(backdoor: bool):
  """``logits = W vec(x) + b``; with ``backdoor`` the patch's pixels drive class 2."""
  w = np.zeros((H, W, 1, CLASSES), np.float32)
  for c, (rows, cols) in enumerate(REGIONS):
    w[rows, cols, 0, c] = 3.0
  if backdoor:
    w[PATCH[0], PATCH[1], 0, 2] = 30.0
  return {"params": {"w": jnp.asarray(w), "b": jnp.zeros(CLASSES)}}


def apply_fn(variables, x):
  p = variables["params"]
  return jnp.einsum("nhwc,hwck->nk", x, p["w"]) + p["b"]


def images(n=200, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 0.1, (n, H, W, 1)).astype(np.float32)
  for i, c in enumerate(np.arange(n) % CLASSES):
    x[i, REGIONS[c][0], REGIONS[c][1]] += 0.8
  return x


def test_one_step_matches_the_closed_form_gradient_of_a_linear_model():
  v, x = linear_model(True), images(100)
  delta = probe.universal_perturbation(apply_fn, v, x, bound=1.0, target=3, epochs=1)
  w = np.asarray(v["params"]["w"]).reshape(-1, CLASSES)
  p = jax.nn.softmax(apply_fn(v, jnp.asarray(x)))
  # ∇_δ mean_i CE(f(x_i + δ), 3) = W (mean_i p_i − e_3); one step of length C/5 against it.
  g = w @ (np.asarray(p).mean(0) - np.eye(CLASSES)[3])
  expected = -0.2 * g / np.linalg.norm(g)
  np.testing.assert_allclose(np.asarray(delta).ravel(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", [None, 1])
def test_the_perturbation_stays_in_the_ball(target):
  v, x = linear_model(True), images()
  for bound in (0.3, 2.0):
    delta = probe.universal_perturbation(apply_fn, v, x, bound=bound, target=target, epochs=3)
    assert delta.shape == (H, W, 1)
    assert float(jnp.linalg.norm(delta)) <= bound * (1 + 1e-5)


def test_the_suspect_is_the_planted_target_and_its_probe_separates_the_models():
  x = images()
  found = probe.find_suspect(apply_fn, linear_model(True), x, bounds=(0.25, 0.5, 1.0))
  assert found is not None and found["target"] == 2 and found["share"] >= 0.5
  # Targeted towards class 2 the backdoored model falls at a radius the clean one resists.
  bound = found["bound"]
  bad = probe.targeted_success(apply_fn, linear_model(True), x, 2, bound=bound)
  clean = probe.targeted_success(apply_fn, linear_model(False), x, 2, bound=bound)
  assert bad >= 0.5 and clean <= 0.2, (bad, clean)
  # The targeted δ found the patch: most of its energy lies on the patch's 4 of 36 pixels.
  delta = np.asarray(probe.universal_perturbation(apply_fn, linear_model(True), x,
                                                  bound=bound, target=2))
  assert (delta[PATCH] ** 2).sum() / (delta ** 2).sum() > 0.9  # 4 of 64 pixels


def test_a_clean_model_has_no_suspect_at_small_radii():
  assert probe.find_suspect(apply_fn, linear_model(False), images(), bounds=(0.25, 0.5, 1.0)) \
      is None


def test_too_few_images_is_a_clear_error():
  with pytest.raises(ValueError, match="at least one batch"):
    probe.universal_perturbation(apply_fn, linear_model(True), images(50), bound=1.0)


def _unlearn(select, **kw):
  import ibau_jax
  x = images(200)
  y = np.arange(200) % CLASSES
  seen = {}
  config = ibau_jax.IBAUConfig(rounds=3, batch_size=50, inner_candidates=(), norm_bound=1.0,
                               outer_lr=0.05, select=select, probe_bounds=(0.25, 0.5, 1.0),
                               probe_images=100, callback=lambda r, s, v: seen.__setitem__(r, v),
                               retries=0, repair_epochs=0, **kw)
  result = ibau_jax.unlearn(apply_fn, linear_model(True), x, y.astype(np.int32), config,
                            key=jax.random.PRNGKey(0))
  return result, seen


def test_unlearn_returns_the_round_with_the_lowest_probe():
  result, seen = _unlearn("probe")
  assert result.suspect["target"] == 2 and result.suspect["bound"] == 0.5
  probes = [h["probe"] for h in result.history]
  best = max(r for r, p in enumerate(probes) if p == min(probes))
  assert result.selected_round == best
  for a, b in zip(jax.tree_util.tree_leaves(result.variables),
                  jax.tree_util.tree_leaves(seen[best])):
    np.testing.assert_array_equal(a, b)
  # Selection changes only what is returned: the rounds are those of select="last".
  last, seen_last = _unlearn("last")
  assert last.selected_round == 2 and last.suspect is None
  assert [h["outer_loss"] for h in last.history] == [h["outer_loss"] for h in result.history]
  for a, b in zip(jax.tree_util.tree_leaves(last.variables),
                  jax.tree_util.tree_leaves(seen_last[2])):
    np.testing.assert_array_equal(a, b)
  # The probe is the targeted success of the returned model, recomputed by hand.
  again = probe.targeted_success(apply_fn, result.variables, images(200)[:100], 2, bound=0.5,
                                 batch_size=50)
  assert again == pytest.approx(probes[best])


@pytest.mark.parametrize("scores,selected", [([0.5, 0.2, 0.7], 1), ([0.3, 0.3, 0.4], 1),
                                             ([0.9, 0.8, 0.1], 2)])
def test_the_lowest_probe_wins_and_ties_go_to_the_later_round(monkeypatch, scores, selected):
  calls = iter(scores)
  monkeypatch.setattr(probe, "targeted_success", lambda *a, **k: next(calls))
  result, seen = _unlearn("probe")
  assert [h["probe"] for h in result.history] == scores
  assert result.selected_round == selected
  for a, b in zip(jax.tree_util.tree_leaves(result.variables),
                  jax.tree_util.tree_leaves(seen[selected])):
    np.testing.assert_array_equal(a, b)
  # The rounds differ, so returning another round's variables would be caught.
  assert not np.array_equal(seen[0]["params"]["w"], seen[2]["params"]["w"])


@pytest.mark.parametrize("field,value", [("select", "best"), ("probe_bounds", ()),
                                         ("probe_bounds", (1.0, -2.0)), ("probe_images", 0),
                                         ("probe_min_share", 0.0), ("probe_epochs", 1.5)])
def test_bad_probe_settings_are_rejected(field, value):
  import ibau_jax
  with pytest.raises(ValueError, match=field):
    ibau_jax.IBAUConfig(**{field: value})


def test_select_average_returns_the_mean_of_the_rounds_parameters():
  for start in (0, 1):
    result, seen = _unlearn("average", average_from=start)
    assert result.selected_round is None
    for leaf, *rounds in zip(jax.tree_util.tree_leaves(result.variables),
                             *[jax.tree_util.tree_leaves(seen[r]) for r in range(start, 3)]):
      np.testing.assert_allclose(leaf, np.mean(np.stack(rounds), 0), rtol=1e-6, atol=1e-7)
  last, _ = _unlearn("last")
  assert [h["outer_loss"] for h in last.history] == [h["outer_loss"] for h in result.history]
  import ibau_jax
  for bad in (-1, 3, 1.0):
    with pytest.raises(ValueError, match="average_from"):
      ibau_jax.IBAUConfig(rounds=3, average_from=bad)


def test_cut_stamp_keeps_the_locations_of_largest_energy_and_the_sign_of_delta():
  delta = np.zeros((4, 5, 2), np.float32)
  delta[1, 2] = [3.0, -1.0]  # energy 10
  delta[3, 4] = [-2.0, 0.5]  # 4.25
  delta[0, 0] = [0.0, 1.0]  # 1
  mask, pattern = probe.cut_stamp(delta, share=0.1)  # ⌈0.1 · 20⌉ = 2 locations
  expected = np.zeros((4, 5, 1), np.float32)
  expected[1, 2] = expected[3, 4] = 1.0
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(pattern, (delta > 0).astype(np.float32))
  assert probe.cut_stamp(delta, share=0.15)[0].sum() == 3
  with pytest.raises(ValueError, match="share"):
    probe.cut_stamp(delta, share=0.0)
  with pytest.raises(ValueError, match="shape"):
    probe.cut_stamp(delta[0])


def test_a_stamp_cut_from_the_universal_perturbation_is_the_planted_patch():
  v, x = linear_model(True), images()
  delta = probe.universal_perturbation(apply_fn, v, x, bound=2.0, epochs=2)
  mask, pattern = probe.cut_stamp(delta, share=4 / (H * W))
  planted = np.zeros((H, W, 1), np.float32)
  planted[PATCH] = 1.0
  np.testing.assert_array_equal(mask, planted)
  np.testing.assert_array_equal(pattern[PATCH], 1.0)
  assert probe.stamp_share(apply_fn, v, x, mask, pattern) == (2, 1.0)
  # The clean model ignores the corner: nothing moves to class 2.
  assert probe.stamp_share(apply_fn, linear_model(False), x, mask, pattern, target=2) == (2, 0.0)


def test_best_window_is_the_window_of_largest_energy_first_in_row_major_order():
  rng = np.random.default_rng(0)
  delta = rng.normal(size=(7, 9, 2))
  energy = np.sum(delta ** 2, axis=-1)
  for size in (1, 3, 7):
    sums = {(i, j): energy[i:i + size, j:j + size].sum()
            for i in range(7 - size + 1) for j in range(9 - size + 1)}
    assert probe.best_window(delta, size) == max(sums, key=sums.get)
  ties = np.zeros((5, 5, 1))
  ties[2, 2] = 1.0  # every 3x3 window holding (2, 2) ties: the first one wins
  assert probe.best_window(ties, 3) == (0, 0)
  mask = probe.window_mask(ties.shape, (1, 2), 3)
  assert mask.shape == (5, 5, 1) and mask.sum() == 9 and mask[1:4, 2:5].all()
  with pytest.raises(ValueError, match="window size"):
    probe.best_window(delta, 8)
  with pytest.raises(ValueError, match="shape"):
    probe.best_window(delta[0], 2)


def test_a_pattern_fitted_in_the_window_of_the_patch_is_the_trigger():
  x = images()
  mask = probe.window_mask((H, W), (6, 6), 2)
  v = linear_model(True)
  # From a dark pattern, which the backdoor ignores, the patch's pixels turn bright.
  dark = np.full((H, W, 1), -4.0, np.float32)
  assert probe.window_share(apply_fn, v, x, mask, dark, 2) == 0.0
  logits = probe.fit_window(apply_fn, v, x, mask, 2, init=dark, steps=50, batch_size=50)
  assert np.all(1 / (1 + np.exp(-logits[PATCH])) > 0.25)  # from 0.018
  np.testing.assert_array_equal(logits[mask[..., 0] == 0], -4.0)  # outside: untouched
  assert probe.window_share(apply_fn, v, x, mask, logits, 2) == 1.0
  # The clean model does not read the corner: no pattern there moves an image.
  clean = linear_model(False)
  logits = probe.fit_window(apply_fn, clean, x, mask, 2, steps=50, batch_size=50)
  assert probe.window_share(apply_fn, clean, x, mask, logits, 2) == 0.0


def _repaired(backdoor, **kw):
  import ibau_jax
  x, y = images(200), (np.arange(200) % CLASSES).astype(np.int32)
  # Rounds that barely move the model, so that what the repair does is what is measured.
  config = ibau_jax.IBAUConfig(**{**dict(
      rounds=1, batch_size=50, inner_candidates=(), norm_bound=1.0, outer_lr=1e-4, retries=0,
      probe_images=100, repair_window=2, repair_lr=1.0, repair_fraction=0.5,
      repair_fit_steps=50, warp_epochs=0), **kw})
  result = ibau_jax.unlearn(apply_fn, linear_model(backdoor), x, y, config,
                            key=jax.random.PRNGKey(0))
  planted = np.zeros((H, W, 1), np.float32)
  planted[PATCH] = 1.0
  return result, probe.stamp_share(apply_fn, result.variables, x, planted, planted, target=2)[1]


def test_the_repair_finds_the_planted_patch_and_unlearns_it():
  plain, plain_share = _repaired(True, repair_epochs=0)
  assert plain.repair is None and plain_share == 1.0  # the rounds left the backdoor
  calls = []
  result, share = _repaired(True, repair_epochs=3,
                            progress=lambda done, total: calls.append((done, total)))
  # The check's fit, a fit and a pass per pass, the last fit: 2 * 3 + 2 steps.
  assert calls == [(i, 8) for i in range(1, 9)]
  rep = result.repair
  assert (rep["target"], rep["corner"], rep["size"]) == (2, [6, 6], 2)
  assert rep["active"] and rep["input_share"] == 1.0
  assert len(rep["shares"]) == 4 and len(rep["losses"]) == 3
  assert rep["shares"][0] == 1.0 and rep["shares"][-1] == 0.0
  assert share == 0.0  # the real patch no longer works
  strip = lambda h: {k: v for k, v in h.items() if k != "seconds"}
  assert [strip(h) for h in result.history] == [strip(h) for h in plain.history]
  # On the clean model the window pattern moves nothing: no pass runs, the rounds' variables
  # are returned.
  calls.clear()
  clean, _ = _repaired(False, repair_epochs=3,
                       progress=lambda done, total: calls.append((done, total)))
  assert calls == [(1, 8), (8, 8)]  # the check, then done
  clean_plain, _ = _repaired(False, repair_epochs=0)
  assert not clean.repair["active"] and clean.repair["shares"] == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, clean.variables, clean_plain.variables)
  # A window larger than the images is the whole image.
  whole, _ = _repaired(True, repair_epochs=1, repair_window=20)
  assert (whole.repair["size"], whole.repair["corner"]) == (H, [0, 0])


def test_a_repair_pass_that_makes_the_parameters_non_finite_raises(monkeypatch):
  from ibau_jax import ibau
  real = ibau._repair_step

  def poisoned(*args):
    params, state, loss = real(*args)
    return jax.tree_util.tree_map(lambda p: p * jnp.nan, params), state, loss

  monkeypatch.setattr(ibau, "_repair_step", poisoned)
  with pytest.raises(ibau.NonFiniteHypergradientError, match="repair pass 0"):
    _repaired(True, repair_epochs=2)


# Universal warps ----------------------------------------------------------------------

STRIPE = (7, slice(3, 5))  # every image is bright there
EDGE = (6, slice(3, 5))  # just above it: dark, unless the rows move down


def warp_images(n=200, seed=1):
  x = images(n, seed)
  x[:, STRIPE[0], STRIPE[1]] = 1.0
  return x


def warp_model(backdoor: bool):
  """The regions' model; with ``backdoor``, the pixels above the stripe drive class 2, so
  that sampling them half a row lower (a warp) sends every image there."""
  v = linear_model(False)
  if backdoor:
    w = np.array(v["params"]["w"])
    w[EDGE[0], EDGE[1], 0, 2] = 30.0
    v = {"params": {"w": jnp.asarray(w), "b": v["params"]["b"]}}
  return v


def test_warp_is_the_identity_at_zero_and_a_shift_for_a_constant_field():
  x = jnp.asarray(images(10))
  np.testing.assert_array_equal(probe.warp(x, np.zeros((4, 4, 2))), x)
  # A constant field of (1, 0) samples one row lower; the last row repeats.
  down = np.zeros((4, 4, 2), np.float32)
  down[..., 0] = 1.0
  out = np.asarray(probe.warp(x, down))
  np.testing.assert_allclose(out[:, :-1], np.asarray(x)[:, 1:], atol=1e-6)
  np.testing.assert_allclose(out[:, -1], np.asarray(x)[:, -1], atol=1e-6)
  # Half a column to the right: the mean of each pixel and its right neighbour.
  right = np.zeros((4, 4, 2), np.float32)
  right[..., 1] = 0.5
  out = np.asarray(probe.warp(x, right))
  np.testing.assert_allclose(out[:, :, :-1], (np.asarray(x)[:, :, :-1] + np.asarray(x)[:, :, 1:]) / 2,
                             atol=1e-6)
  with pytest.raises(ValueError, match="phi"):
    probe.warp(x, np.zeros((4, 4)))


def test_the_untargeted_warp_finds_a_warping_backdoor_and_not_on_a_clean_model():
  x = warp_images()
  v = warp_model(True)
  assert probe.warp_share(apply_fn, v, x, np.zeros((4, 4, 2)), target=2)[1] == 0.0
  phi = probe.fit_warp(apply_fn, v, x, bound=0.5, steps=40, batch_size=50)
  assert np.abs(phi).max() <= 0.5 + 1e-6
  assert probe.warp_share(apply_fn, v, x, phi) == (2, 1.0)
  clean = warp_model(False)
  phi = probe.fit_warp(apply_fn, clean, x, bound=0.5, steps=40, batch_size=50)
  assert probe.warp_share(apply_fn, clean, x, phi)[1] < 0.1
  # Targeted: towards class 2 on the backdoored model, the same.
  phi = probe.fit_warp(apply_fn, v, x, bound=0.5, target=2, steps=40, batch_size=50)
  assert probe.warp_share(apply_fn, v, x, phi, target=2) == (2, 1.0)


def _warp_repaired(backdoor, **kw):
  import ibau_jax
  x, y = warp_images(200), (np.arange(200) % CLASSES).astype(np.int32)
  config = ibau_jax.IBAUConfig(**{**dict(
      rounds=1, batch_size=50, inner_candidates=(), norm_bound=1.0, outer_lr=1e-4, retries=0,
      repair_epochs=0, probe_images=100, repair_lr=1.0, repair_fraction=0.5,
      warp_fit_steps=40), **kw})
  result = ibau_jax.unlearn(apply_fn, warp_model(backdoor), x, y, config,
                            key=jax.random.PRNGKey(0))
  down = np.zeros((4, 4, 2), np.float32)
  down[..., 0] = 0.5  # the planted trigger: half a row down
  return result, probe.warp_share(apply_fn, result.variables, x, down, target=2)[1]


def test_the_warp_repair_finds_the_planted_warp_and_unlearns_it():
  plain, plain_share = _warp_repaired(True, warp_epochs=0)
  assert plain.warp is None and plain_share == 1.0  # the rounds left the backdoor
  calls = []
  result, share = _warp_repaired(True, warp_epochs=2,
                                 progress=lambda done, total: calls.append((done, total)))
  assert calls == [(i, 6) for i in range(1, 7)]
  info = result.warp
  assert (info["target"], info["input_share"], info["active"]) == (2, 1.0, True)
  assert len(info["shares"]) == 3 and len(info["losses"]) == 2
  assert np.asarray(info["phi"]).shape == (4, 4, 2)
  assert info["shares"][0] == 1.0 and info["shares"][-1] < 0.1
  assert share < 0.1  # the planted warp no longer works
  strip = lambda h: {k: v for k, v in h.items() if k != "seconds"}
  assert [strip(h) for h in result.history] == [strip(h) for h in plain.history]
  # On the clean model no warp moves the images: nothing runs, the rounds' variables stay.
  calls.clear()
  clean, _ = _warp_repaired(False, warp_epochs=2,
                            progress=lambda done, total: calls.append((done, total)))
  assert calls == [(1, 6), (6, 6)] and not clean.warp["active"]
  assert np.abs(np.asarray(clean.warp["phi"])).max() <= 0.5 + 1e-6  # the check's warp
  clean_plain, _ = _warp_repaired(False, warp_epochs=0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, clean.variables, clean_plain.variables)
  # With the patch repair too, the two stages share one progress count.
  calls.clear()
  _warp_repaired(True, warp_epochs=1, repair_epochs=1, repair_window=2, repair_fit_steps=10,
                 progress=lambda done, total: calls.append((done, total)))
  assert calls[-1] == (8, 8) and all(t == 8 for _, t in calls)
  assert [d for d, _ in calls] == sorted(d for d, _ in calls)
