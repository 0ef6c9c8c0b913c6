"""Test-session setup: one persistent XLA compilation cache shared by the whole run.

On CPU most of a small test's time is XLA compilation (the tiny smoke pipeline, measured next
to other work: 100 s cold, 21 s with every program already compiled), and many tests, and the
subprocesses some of them start, compile the same programs. The cache lives in a fresh
temporary directory per pytest session, so every run starts cold, measures honestly, and
leaves nothing behind. The pytest-xdist workers and the subprocesses inherit it through the
environment (a worker finds the variable set and leaves the directory to the controller).
A cache hit is still a new entry in `jax.jit`'s own tracing cache, so the no-recompilation
tests (which count those entries) are unaffected.
"""
import os
import shutil
import tempfile

_OWNED = []


def pytest_configure(config):
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the caller chose a cache: use it as is
    return
  path = tempfile.mkdtemp(prefix="ibau_jax_test_xla_cache_")
  _OWNED.append(path)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  # Cache every program, however small or quick to compile.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  import jax  # the updates below also reach a jax imported before this hook
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  while _OWNED:
    shutil.rmtree(_OWNED.pop(), ignore_errors=True)
