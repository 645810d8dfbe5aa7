"""A train step over medjax's CPU handlers compiles once: later processes on one device load it
from JAX's persistent compilation cache (its HLO, and so its cache key, is the same in each)."""

import os
import re
import subprocess
import sys

from conftest import REPO
from test_onednn import needs_onednn

# A train-step-like function over every handler kind: oneDNN and Winograd convolutions and their
# gradients, the fused instance norm + leaky ReLU and its gradient.
_STEP = """
import jax, jax.numpy as jnp
from medjax.ops.cpu import norm_act, onednn
assert onednn.available() and jax.device_count() == 1
x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 16, 8))
w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 8, 8)) * 0.1
scale, bias = jnp.ones(8), jnp.zeros(8)
assert onednn.winograd_applies(x.shape, w.shape, (1, 1, 1), ((1, 1),) * 3)

def loss(x, w, scale, bias):
  y = onednn.conv(x, w, (1, 1, 1), ((1, 1),) * 3)
  y = norm_act.instance_norm_leaky_relu(y, scale, bias)
  return jnp.mean(onednn.conv(y, w, (2, 2, 2), ((1, 1),) * 3) ** 2)

def cache_step(x, w, scale, bias):
  return jax.grad(loss, argnums=(1, 2, 3))(x, w, scale, bias)

jax.block_until_ready(jax.jit(cache_step)(x, w, scale, bias))
"""


def _entries(folder):
  """The cached executables of the step, by key (with a size cap JAX keeps each one as a
  ``-cache`` file and a ``-atime`` file beside it)."""
  return sorted({re.sub(r"-(cache|atime)$", "", f) for f in os.listdir(folder)
                 if f.startswith("jit_cache_step-")})


@needs_onednn
def test_a_second_process_loads_the_train_step_from_the_persistent_cache(tmp_path):
  cache = tmp_path / "jax-cache"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MEDJAX_WINOGRAD": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  entries = []
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    entries.append(_entries(cache))
  assert len(entries[0]) == 1, entries  # the first process compiled it and stored it
  assert entries[1] == entries[0], entries  # the second found it: no entry under a new key
