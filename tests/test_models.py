"""Model shapes, parameter counts, registry, and the PyTorch state-dict import.

The import tests check Flax logits against an independent NumPy forward pass written
in PyTorch's NCHW semantics on a random PyTorch-layout state dict, so a wrong kernel
transpose, flatten order, padding or BatchNorm convention fails them.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.models import get_model, model_names, vgg
from ibau_jax.models.resnet import PreActResNet18
from ibau_jax.models.torch_import import export_torch_state, load_torch_state
from _layers import Conv, Dense

EPS = 1e-5


def _n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_variables(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


# ----------------------------------------------------------------------------
# NumPy reference (PyTorch NCHW semantics, float64).


def _conv(x, w, b=None, stride=1, pad=0):
  """PyTorch Conv2d (cross-correlation, zero padding): x (N,C,H,W), w (O,C,kh,kw)."""
  n, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (h + 2 * pad - kh) // stride + 1
  wo = (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, ho, wo, o))
  for dy in range(kh):
    for dx in range(kw):
      patch = xp[:, :, dy:dy + stride * (ho - 1) + 1:stride,
                 dx:dx + stride * (wo - 1) + 1:stride]
      out += np.tensordot(patch, w[:, :, dy, dx], axes=([1], [1]))
  out = out.transpose(0, 3, 1, 2)
  if b is not None:
    out = out + b[None, :, None, None]
  return out


def _bn(x, sd, prefix):
  scale = sd[f"{prefix}.weight"] / np.sqrt(sd[f"{prefix}.running_var"] + EPS)
  shift = sd[f"{prefix}.bias"] - sd[f"{prefix}.running_mean"] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def _elu(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _maxpool2(x):
  n, c, h, w = x.shape
  return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _vgg_reference(sd, x_nchw):
  x = x_nchw.astype(np.float64)
  for conv_idx in (0, 3, 8, 11, 16, 19):
    x = _conv(x, sd[f"features.{conv_idx}.weight"], sd[f"features.{conv_idx}.bias"],
              pad=1)
    x = _elu(_bn(x, sd, f"features.{conv_idx + 1}"))
    if conv_idx in (3, 11, 19):
      x = _maxpool2(x)
  x = x.reshape(x.shape[0], -1)  # PyTorch flatten: C, H, W
  return x @ sd["classifier.weight"].T + sd["classifier.bias"]


def _resnet_reference(sd, x_nchw):
  relu = lambda a: np.maximum(a, 0)
  x = _conv(x_nchw.astype(np.float64), sd["conv1.weight"], pad=1)
  in_planes = 64
  for layer, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), 1):
    for b, s in enumerate((stride, 1)):
      p = f"layer{layer}.{b}"
      out = relu(_bn(x, sd, f"{p}.bn1"))
      if s != 1 or in_planes != planes:
        shortcut = _conv(out, sd[f"{p}.shortcut.0.weight"], stride=s)
      else:
        shortcut = x
      out = _conv(out, sd[f"{p}.conv1.weight"], stride=s, pad=1)
      out = _conv(relu(_bn(out, sd, f"{p}.bn2")), sd[f"{p}.conv2.weight"], pad=1)
      x = out + shortcut
      in_planes = planes
  x = relu(_bn(x, sd, "bn")).mean(axis=(2, 3))
  return x @ sd["linear.weight"].T + sd["linear.bias"]


# ----------------------------------------------------------------------------
# Random PyTorch-layout state dicts, keys written out by hand.


def _add_conv(sd, rng, name, o, i, k, bias):
  sd[f"{name}.weight"] = (rng.standard_normal((o, i, k, k))
                          * np.sqrt(2.0 / (i * k * k))).astype(np.float32)
  if bias:
    sd[f"{name}.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)


def _add_bn(sd, rng, name, c):
  sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
  sd[f"{name}.running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
  sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)


def _random_vgg_state(rng, num_classes):
  sd = {}
  in_ch = 3
  for stage, width in enumerate((32, 64, 128)):
    for j in range(2):
      idx = 8 * stage + 3 * j
      _add_conv(sd, rng, f"features.{idx}", width, in_ch, 3, bias=True)
      _add_bn(sd, rng, f"features.{idx + 1}", width)
      in_ch = width
  sd["classifier.weight"] = (rng.standard_normal((num_classes, 2048))
                             / np.sqrt(2048)).astype(np.float32)
  sd["classifier.bias"] = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
  return sd


def _random_resnet_state(rng, num_classes):
  sd = {}
  _add_conv(sd, rng, "conv1", 64, 3, 3, bias=False)
  in_planes = 64
  for layer, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), 1):
    for b, s in enumerate((stride, 1)):
      p = f"layer{layer}.{b}"
      _add_bn(sd, rng, f"{p}.bn1", in_planes)
      _add_conv(sd, rng, f"{p}.conv1", planes, in_planes, 3, bias=False)
      _add_bn(sd, rng, f"{p}.bn2", planes)
      _add_conv(sd, rng, f"{p}.conv2", planes, planes, 3, bias=False)
      if s != 1 or in_planes != planes:
        _add_conv(sd, rng, f"{p}.shortcut.0", planes, in_planes, 1, bias=False)
      in_planes = planes
  _add_bn(sd, rng, "bn", 512)
  sd["linear.weight"] = (rng.standard_normal((num_classes, 512))
                         / np.sqrt(512)).astype(np.float32)
  sd["linear.bias"] = (0.1 * rng.standard_normal(num_classes)).astype(np.float32)
  return sd


def _assert_logits_close(flax_logits, ref_logits):
  flax_logits = np.asarray(flax_logits, np.float64)
  scale = max(1.0, float(np.abs(ref_logits).max()))
  np.testing.assert_allclose(flax_logits, ref_logits, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------
# Shapes, parameter counts, registry.


@pytest.mark.parametrize("num_classes, n_params", [(10, 308_394), (43, 376_011)])
def test_small_vgg16_shapes_and_param_count(num_classes, n_params):
  model = get_model("small_vgg16", num_classes)
  abstract = _abstract_variables(model)  # shapes of model.init's output
  assert set(abstract) == {"params", "batch_stats"}
  assert _n_params(abstract["params"]) == n_params
  assert _n_params(abstract["batch_stats"]) == 2 * 2 * (32 + 64 + 128)
  variables = load_torch_state(_random_vgg_state(np.random.default_rng(0), num_classes))
  logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, num_classes)


def test_small_vgg16_train_mode_updates_batch_stats():
  model = get_model("small_vgg16", 10)
  variables = load_torch_state(_random_vgg_state(np.random.default_rng(5), 10))
  x = np.random.default_rng(6).uniform(0.0, 1.0, (4, 32, 32, 3)).astype(np.float32)
  train_apply = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
  logits, updates = train_apply(variables, x, jax.random.PRNGKey(2))
  assert logits.shape == (4, 10)
  old = variables["batch_stats"]["bn0_0"]["mean"]
  assert not np.allclose(updates["batch_stats"]["bn0_0"]["mean"], old)


def _preact_param_count(num_classes):
  count = 3 * 64 * 9  # stem
  in_planes = 64
  for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
    for s in (stride, 1):
      count += 2 * in_planes + in_planes * planes * 9 + 2 * planes + planes * planes * 9
      if s != 1 or in_planes != planes:
        count += in_planes * planes
      in_planes = planes
  return count + 2 * 512 + 512 * num_classes + num_classes


def test_preact_resnet18_shapes_and_param_count():
  assert "preact_resnet18" in model_names()
  model = get_model("preact_resnet18", 10)
  abstract = _abstract_variables(model)
  assert _n_params(abstract["params"]) == _preact_param_count(10) == 11_172_170
  # Every BatchNorm has as many running statistics (mean, var) as parameters
  # (scale, bias); the only other 1-D parameter is the linear bias.
  bn_params = sum(int(x.size) for x in jax.tree.leaves(abstract["params"])
                  if x.ndim == 1) - 10
  assert _n_params(abstract["batch_stats"]) == bn_params
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract,
                       jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32))
  assert out.shape == (3, 10)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 10)


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    get_model("nope", 10)
  with pytest.raises(ValueError, match="num_classes"):
    get_model("small_vgg16", 1)
  with pytest.raises(ValueError, match="no PyTorch key mapping"):
    load_torch_state({"a": np.zeros(1)}, arch="nope")


@pytest.mark.parametrize("name", ["small_vgg16", "preact_resnet18"])
@pytest.mark.parametrize("num_classes", [10.7, 10.0, True, "10", -3])
def test_num_classes_must_be_an_integer(name, num_classes):
  with pytest.raises(ValueError, match=rf"num_classes must be an integer >= 2, got "
                                       rf"{re.escape(repr(num_classes))}"):
    get_model(name, num_classes)


def test_num_classes_integer_types_and_direct_construction():
  model = get_model("small_vgg16", np.int64(7))
  assert model.num_classes == 7 and type(model.num_classes) is int
  assert get_model("preact_resnet18", 5).num_classes == 5
  with pytest.raises(ValueError, match=r"SmallVGG16.num_classes must be a positive integer, "
                                       r"got 10\.7"):
    vgg.SmallVGG16(num_classes=10.7)
  with pytest.raises(ValueError, match=r"PreActResNet18.num_classes must be a positive "
                                       r"integer, got 10\.7"):
    PreActResNet18(num_classes=10.7)


@pytest.mark.parametrize("kw, match", [
    (dict(widths=(4, 8, 8, 16)), r"a dropout rate per stage: got 4 widths \(4, 8, 8, 16\) "
                                 r"and 3 dropout_rates"),
    (dict(widths=(4, 8), dropout_rates=(0.0,)), "a dropout rate per stage: got 2 widths"),
    (dict(widths=()), "widths must be a non-empty sequence of positive integers"),
    (dict(widths=(4, 0, 8)), "widths must be a non-empty sequence of positive integers"),
    (dict(widths=(4, 8.5, 8)), "widths must be a non-empty sequence of positive integers"),
    (dict(dropout_rates=(0.3, 1.5, 0.4)), r"dropout_rates must be numbers in \[0, 1\]"),
])
def test_small_vgg16_stage_fields_are_checked(kw, match):
  with pytest.raises(ValueError, match=match):
    get_model("small_vgg16", 10, **kw)


def test_small_vgg16_fewer_widths_than_rates_builds_fewer_stages():
  # Documented: stage i uses widths[i] and dropout_rates[i]; the smoke presets use one stage.
  abstract = _abstract_variables(get_model("small_vgg16", 10, widths=(4,)), (1, 8, 8, 3))
  assert sorted(abstract["params"]) == ["bn0_0", "bn0_1", "classifier", "conv0_0", "conv0_1"]


# ----------------------------------------------------------------------------
# PyTorch import / export.


def test_load_torch_state_small_vgg16_matches_numpy_reference():
  rng = np.random.default_rng(0)
  sd = _random_vgg_state(rng, num_classes=7)
  variables = load_torch_state(sd, arch="small_vgg16")  # num_classes inferred
  model = get_model("small_vgg16", 7)
  expected = _abstract_variables(model)
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape
                                   and a.dtype == b.dtype, variables, expected))
  x = rng.uniform(0.0, 1.0, (3, 32, 32, 3)).astype(np.float32)
  ref = _vgg_reference(sd, x.transpose(0, 3, 1, 2))
  assert np.abs(ref).max() > 1.0 and np.std(ref) > 0.1  # not a degenerate network
  _assert_logits_close(model.apply(variables, x, train=False), ref)


def test_load_torch_state_preact_resnet18_matches_numpy_reference():
  rng = np.random.default_rng(1)
  sd = _random_resnet_state(rng, num_classes=5)
  variables = load_torch_state(sd, arch="preact_resnet18")
  model = get_model("preact_resnet18", 5)
  assert jax.tree.structure(variables) == jax.tree.structure(_abstract_variables(model))
  x = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
  ref = _resnet_reference(sd, x.transpose(0, 3, 1, 2))
  assert np.std(ref) > 0.1
  _assert_logits_close(jax.jit(model.apply)(variables, x), ref)


@pytest.mark.parametrize("arch, make", [("small_vgg16", _random_vgg_state),
                                        ("preact_resnet18", _random_resnet_state)])
def test_export_import_round_trip(arch, make, tmp_path):
  sd = make(np.random.default_rng(2), 10)
  variables = load_torch_state(sd, arch=arch)
  exported = export_torch_state(variables, arch)
  expected_keys = {k for k in sd if not k.endswith("num_batches_tracked")}
  assert set(exported) == expected_keys
  for k in expected_keys:
    assert exported[k].shape == sd[k].shape, k
    np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)
  path = tmp_path / "state.npz"
  np.savez(path, **exported)
  again = load_torch_state(path, arch=arch, num_classes=10)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                   variables, again))


def test_load_torch_state_errors_name_the_key(tmp_path):
  sd = _random_vgg_state(np.random.default_rng(3), 10)

  missing = dict(sd)
  del missing["features.9.running_var"]
  with pytest.raises(ValueError, match=r"missing keys \['features.9.running_var'\]"):
    load_torch_state(missing)

  extra = dict(sd, **{"features.99.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \['features.99.weight'\]"):
    load_torch_state(extra)

  bad = dict(sd)
  bad["features.3.weight"] = np.zeros((32, 32, 5, 5), np.float32)
  with pytest.raises(ValueError, match=r"shape mismatch for 'features.3.weight'"):
    load_torch_state(bad)

  with pytest.raises(ValueError, match=r"'classifier.weight': got \(10, 2048\), "
                     r"expected \(43, 2048\)"):
    load_torch_state(sd, num_classes=43)

  no_classifier = {k: v for k, v in sd.items() if not k.startswith("classifier")}
  with pytest.raises(ValueError, match="cannot infer num_classes"):
    load_torch_state(no_classifier)

  with pytest.raises(ValueError, match="not found"):
    load_torch_state(tmp_path / "nope.npz")


def test_load_torch_state_accepts_dataparallel_prefix():
  sd = _random_vgg_state(np.random.default_rng(4), 10)
  plain = load_torch_state(sd)
  prefixed = load_torch_state({f"module.{k}": v for k, v in sd.items()})
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                   plain, prefixed))


# ----------------------------------------------------------------------------
# The CPU-friendly ops of SmallVGG16 compute the same function as the XLA ops they replace.

@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_equals_nn_max_pool(shape):
  import flax.linen as nn
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  np.testing.assert_array_equal(vgg.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  # Without ties the gradient is the same one-hot routing as select-and-scatter.
  g = jax.random.normal(jax.random.PRNGKey(1), vgg.max_pool_2x2(x).shape)
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * g))(x)
  np.testing.assert_allclose(grad(vgg.max_pool_2x2),
                             grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))), atol=1e-6)


def test_conv_im2col_equals_lax_conv_with_gradients():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 5, 3))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=dn)
  ours = lambda x, k: vgg.conv_im2col(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
  np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.PRNGKey(2), ref(x, k).shape)
  grads = lambda f: jax.grad(lambda x, k: jnp.sum(f(x, k) * g), argnums=(0, 1))(x, k)
  for a, b in zip(grads(ours), grads(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Strided convolutions fall back to XLA's.
  strided = vgg.conv_im2col(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
  np.testing.assert_allclose(strided, jax.lax.conv_general_dilated(
      x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn), rtol=1e-5, atol=1e-5)


class _ConvBnDense(nn.Module):
  """Two parameter shapes and BatchNorm statistics: enough for the init test, cheap to
  initialise eagerly (every initializer shape compiles on its own there)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(Conv(2, (3, 3))(x))
    return Dense(3)(x.reshape((x.shape[0], -1)))


def test_init_variables_equals_eager_init_and_compiles_once_per_model():
  from ibau_jax.models import init_variables, _init
  model = _ConvBnDense()
  x = jnp.zeros((1, 4, 4, 3))
  rngs = {"params": jax.random.PRNGKey(3), "dropout": jax.random.PRNGKey(4)}
  eager = model.init(rngs, x, train=False)
  before = _init._cache_size()
  jitted = init_variables(model, rngs, x)
  assert _init._cache_size() == before + 1
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)
  other = init_variables(_ConvBnDense(),
                         {"params": jax.random.PRNGKey(5), "dropout": jax.random.PRNGKey(4)}, x)
  assert _init._cache_size() == before + 1  # an equal model and another key: no new program
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other["params"]),
                                                      jax.tree.leaves(jitted["params"])))
