"""Tests of medjax/ops/cpu/onednn.py: the oneDNN convolutions equal XLA's, and their build."""

import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from medjax import ops
from medjax.ops import xla
from medjax.ops.cpu import onednn

# Where the toolchain exists (this repository's CI machine) the handlers must build: a broken
# build would otherwise only show as slower training.
_CAN_BUILD = (platform.system() == "Linux" and platform.machine() == "x86_64"
              and shutil.which(os.environ.get("CXX", "g++")) is not None)
needs_onednn = pytest.mark.skipif(not _CAN_BUILD, reason="needs Linux x86-64 and a C++ compiler")


def _run_python(code, **env):
  """``python -c code`` on the CPU from the repository root, with ``env`` added."""
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                        cwd=REPO)


def _assert_equal_values_and_gradients(ours, ref, x, w, value_tol, grad_tol):
  """``ours(x, w)`` equals ``ref(x, w)``, and so do the gradients of a nonlinear loss of them."""
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-5, atol=value_tol)
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)))
  for a, b in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w),
                  jax.grad(loss(ref), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=grad_tol)


@needs_onednn
def test_builds_and_loads_here():
  assert onednn.available(), onednn._load()


@needs_onednn
@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 9, 11, 3), (3, 3), (1, 1), "SAME"),
    ((2, 9, 11, 3), (3, 3), (2, 2), "SAME"),  # odd sizes: the high side pads one more
    ((2, 8, 8, 4), (1, 1), (2, 2), "SAME"),
    ((3, 2, 2, 4), (3, 3), (1, 1), "SAME"),  # smaller than the kernel
    ((2, 5, 7, 3), (3, 2), (2, 1), "VALID"),  # rows of the input no output reads
    ((2, 12, 3), (5,), (1,), "SAME"),
    ((2, 7, 6, 5, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    ((2, 7, 6, 5, 1), (3, 3, 3), (2, 1, 2), "SAME"),
    ((2, 6, 7, 6, 2), (1, 3, 3), (1, 2, 2), "VALID"),
    ((2, 7, 6, 5, 3), (2, 3, 1), (3, 1, 1), "VALID")])
def test_equals_xla_values_and_gradients(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel + (shape[-1], 5))
  pads = tuple(xla.pads(n, k, s, padding) for n, k, s in zip(shape[1:-1], kernel,
                                                                         strides))
  ours = lambda x, w: onednn.conv(x, w, strides, pads)
  ref = lambda x, w: xla.conv(x, w, strides, padding)
  _assert_equal_values_and_gradients(ours, ref, x, w, value_tol=1e-5, grad_tol=1e-4)


@needs_onednn
@pytest.mark.parametrize("x_shape,kernel,strides,padding", [
    ((2, 8, 6, 5), (4, 4), (2, 2), ((1, 1), (1, 1))),  # a folded U-Net up-sampling (2-D)
    ((2, 8, 6, 4, 3), (4, 3, 4), (2, 1, 2), ((1, 1), (1, 1), (1, 1))),
    ((2, 7, 5, 3), (3, 3), (2, 2), ((1, 1), (1, 1)))])
def test_conv_transpose_is_the_adjoint_of_conv_values_and_gradients(x_shape, kernel, strides,
                                                                   padding):
  w = jax.random.normal(jax.random.PRNGKey(1), kernel + (x_shape[-1], 4))
  y_shape = jax.eval_shape(lambda x: onednn.conv(x, w, strides, padding),
                           jax.ShapeDtypeStruct(x_shape, jnp.float32)).shape
  y = jax.random.normal(jax.random.PRNGKey(0), y_shape)
  ours = lambda y, w: onednn.conv_transpose(y, w, strides, padding, x_shape)
  ref = lambda y, w: jax.linear_transpose(
      lambda x: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=(
          xla.dimension_numbers(len(x_shape) - 2))),
      jax.ShapeDtypeStruct(x_shape, jnp.float32))(y)[0]
  np.testing.assert_allclose(jax.jit(ours)(y, w), ref(y, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda y, w: jnp.sum(jnp.cos(f(y, w)))
  for a, b in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(y, w),
                  jax.grad(loss(ref), argnums=(0, 1))(y, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("shape,out_channels,padding", [
    ((2, 6, 8, 6, 16), 16, ((1, 1),) * 3),  # whole tiles
    ((1, 7, 5, 9, 8), 24, ((1, 1),) * 3),  # odd sizes: the last tiles reach past the output
    ((2, 6, 7, 5, 24), 8, ((0, 0),) * 3),  # VALID
    ((1, 5, 6, 7, 8), 16, ((0, 2), (2, 0), (1, 2))),  # uneven padding
    ((1, 1, 2, 3, 8), 8, ((1, 1),) * 3)])  # smaller than one input tile
def test_winograd_forward_equals_xla_values_and_gradients(shape, out_channels, padding,
                                                          monkeypatch):
  assert onednn.available()
  if not onednn._WINOGRAD_CPU[0] & 1:
    pytest.skip("this CPU has no AVX2 + FMA")
  monkeypatch.setattr(onednn, "WINOGRAD_MIN_VOXELS", 0)
  monkeypatch.setattr(onednn, "WINOGRAD_CPUS", "1")  # on AVX-512 CPUs too
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, shape[-1], out_channels))
  assert onednn.winograd_applies(x.shape, w.shape, (1, 1, 1), padding)
  ours = lambda x, w: onednn.conv(x, w, (1, 1, 1), padding)
  assert "medjax_onednn_winograd" in jax.jit(ours).lower(x, w).as_text()
  # Both gradients are Winograd's too.
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w)), argnums=(0, 1))).lower(x, w)
  assert "medjax_onednn_winograd_kernel_grad" in grads.as_text()
  assert "medjax_onednn_input_grad" not in grads.as_text()
  assert "medjax_onednn_kernel_grad" not in grads.as_text()
  ref = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1, 1), padding, dimension_numbers=xla.dimension_numbers(3),
      precision=jax.lax.Precision.HIGHEST)
  _assert_equal_values_and_gradients(ours, ref, x, w, value_tol=1e-4, grad_tol=1e-3)


@needs_onednn
def test_winograd_kernel_gradient_does_not_depend_on_the_threads(monkeypatch):
  """Threads take blocks as they come free; the kernel gradient's sum must follow neither them
  nor their number, to the last bit."""
  if not onednn._WINOGRAD_CPU[0] & 1:
    pytest.skip("this CPU has no AVX2 + FMA")
  monkeypatch.setattr(onednn, "WINOGRAD_CPUS", "1")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16, 12, 16))  # 48 blocks of tiles
  dy = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16, 12, 16))
  padding = ((1, 1),) * 3
  assert onednn.winograd_applies(x.shape, (3, 3, 3, 16, 16), (1, 1, 1), padding)
  grads = []
  for threads in (1, 2, 3, 2, 2):
    monkeypatch.setattr(onednn, "threads_per_call", lambda threads=threads: threads)
    grads.append(np.asarray(onednn._call("winograd_kernel_grad", (3, 3, 3, 16, 16), x, dy,
                                         (1, 1, 1), padding)))
  for g in grads[1:]:
    np.testing.assert_array_equal(g, grads[0])


@needs_onednn
@pytest.mark.parametrize("shape,kernel,strides,reason", [
    ((1, 8, 8, 8, 16), (3, 3, 3, 16, 16), (1, 1, 1), "fewer output voxels than the threshold"),
    ((4, 40, 40, 40, 16), (3, 3, 3, 16, 16), (2, 2, 2), "strided"),
    ((4, 40, 40, 40, 4), (3, 3, 3, 4, 16), (1, 1, 1), "channels not a multiple of 8"),
    ((4, 40, 40, 40, 16), (1, 3, 3, 16, 16), (1, 1, 1), "not 3x3x3"),
    ((4, 40, 40, 16), (3, 3, 16, 16), (1, 1), "2-D")])
def test_winograd_is_left_to_onednn_where_it_does_not_apply(shape, kernel, strides, reason):
  padding = ((1, 1),) * (len(shape) - 2)
  assert not onednn.winograd_applies(shape, kernel, strides, padding), reason
  hlo = jax.jit(lambda x, w: onednn.conv(x, w, strides, padding)).lower(
      jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(kernel, jnp.float32))
  assert "medjax_onednn_winograd" not in hlo.as_text() and "medjax_onednn_forward" in \
      hlo.as_text()


@needs_onednn
@pytest.mark.parametrize("setting,flags,runs", [
    ("auto", 1, True), ("auto", 3, False), ("auto", 0, False), ("1", 3, True), ("1", 0, False),
    ("0", 1, False)])
def test_winograd_runs_on_the_cpus_it_is_meant_for(setting, flags, runs, monkeypatch):
  """``MEDJAX_WINOGRAD``: auto is AVX2 + FMA without AVX-512 (flags bit 0 and not bit 1)."""
  assert onednn.available()
  monkeypatch.setattr(onednn, "WINOGRAD_CPUS", setting)
  monkeypatch.setattr(onednn, "_WINOGRAD_CPU", [flags])
  assert onednn._winograd_cpu() == runs
  monkeypatch.setattr(onednn, "WINOGRAD_CPUS", "yes")
  with pytest.raises(ValueError, match="MEDJAX_WINOGRAD='yes'"):
    onednn._winograd_cpu()


@needs_onednn
def test_winograd_handler_names_what_it_cannot_do():
  """Called directly with a kernel it does not take, the handler says so; it does not run."""
  assert onednn.available()
  x, w = jnp.ones((1, 6, 6, 6, 8)), jnp.ones((2, 2, 2, 8, 8))
  with pytest.raises(Exception, match="needs a 3x3x3 stride-1 kernel"):
    jax.block_until_ready(onednn._call("winograd", (1, 5, 5, 5, 8), x, w, (1, 1, 1),
                                       ((0, 0),) * 3))
  with pytest.raises(Exception, match="needs a 3x3x3 stride-1 kernel"):
    jax.block_until_ready(onednn._call("winograd_kernel_grad", (2, 2, 2, 8, 8), x,
                                       jnp.ones((1, 5, 5, 5, 8)), (1, 1, 1), ((0, 0),) * 3))
  with pytest.raises(Exception, match="output shape does not follow"):  # SAME's shape, VALID's pads
    jax.block_until_ready(onednn._call("winograd", (1, 6, 6, 6, 8), x, jnp.ones((3, 3, 3, 8, 8)),
                                       (1, 1, 1), ((0, 0),) * 3))


@needs_onednn
def test_ops_conv_sends_float32_cpu_convolutions_to_onednn():
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
  hlo = jax.jit(lambda x, w: ops.conv(x, w, (1, 1), "SAME")).lower(x, w).as_text()
  assert "medjax_onednn_forward" in hlo and "convolution" not in hlo
  # Other dtypes keep XLA's convolution.
  hlo16 = jax.jit(lambda x, w: ops.conv(x, w, (1, 1), "SAME")).lower(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
  assert "medjax_onednn" not in hlo16 and "convolution" in hlo16
  # Modules for jax.export stay XLA-only, to run without medjax.
  with ops.portable():
    hlo = jax.jit(lambda x, w: ops.conv(x, w, (1, 1), "SAME")).lower(x, w).as_text()
  assert "medjax_onednn" not in hlo and "convolution" in hlo


@needs_onednn
def test_a_batch_split_over_devices_stays_split():
  """Over conftest's 4 devices, each call sees its own quarter of the batch (no all-gather), and
  the kernel gradient, summed across the devices, equals XLA's."""
  from medjax.train import sharding

  assert onednn.available()  # registers the handlers
  mesh = sharding.make_mesh()
  assert mesh.size == 4
  split, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8, 10, 10, 3)), split)
  w = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5)), replicated)
  pads = ((1, 1), (1, 1))
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)))  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(lambda x, w: onednn.conv(x, w, (1, 1), pads)),
                                    argnums=(0, 1)), out_shardings=(replicated, (split, replicated)))
  hlo = ours.lower(x, w).compile().as_text()
  calls = [line for line in hlo.splitlines() if "custom-call(" in line and "medjax_onednn" in line]
  assert len(calls) == 3 and "all-gather" not in hlo
  assert all("f32[2,10,10," in line for line in calls if "kernel_grad" not in line), calls
  value, grads = ours(x, w)
  ref_value, ref_grads = jax.value_and_grad(
      loss(lambda x, w: xla.conv(x, w, (1, 1), "SAME")), argnums=(0, 1))(
          np.asarray(x), np.asarray(w))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_vmapped_conv_equals_looped():
  xs = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6, 6, 2))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
  f = lambda x: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(jax.vmap(f)(xs), np.stack([f(x) for x in xs]), rtol=1e-6)


@needs_onednn
def test_build_is_cached_and_rebuilt_elsewhere(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDJAX_CACHE_DIR", str(tmp_path))
  path = onednn.build()
  assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [
      os.path.basename(path)]  # no temporary left behind
  mtime = os.stat(path).st_mtime_ns
  assert onednn.build() == path and os.stat(path).st_mtime_ns == mtime  # not compiled again


def test_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    pytest.skip("builds only on Linux x86-64")
  with pytest.raises(onednn.BuildError, match="no-such-compiler-xyz"):
    onednn.build()


@needs_onednn
def test_compiler_failure_quotes_it_and_leaves_nothing(tmp_path, monkeypatch):
  fake = tmp_path / "bin" / "fakecxx"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 1\n")
  fake.chmod(0o755)
  cache = tmp_path / "cache"
  monkeypatch.setenv("MEDJAX_CACHE_DIR", str(cache))
  monkeypatch.setenv("CXX", str(fake))
  with pytest.raises(onednn.BuildError, match="out of cheese"):
    onednn.build()
  assert os.listdir(cache) == []


@needs_onednn
def test_compiler_warnings_are_logged(tmp_path, monkeypatch, caplog):
  """The build shows what the compiler warned about (no ``-w``), and still succeeds."""
  fake = tmp_path / "bin" / "fakecxx"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\nfor a; do out=$a; done\n"  # the output file comes last
                  "echo 'norm_act.cc:1:1: warning: unused variable' >&2\n: > \"$out\"\n")
  fake.chmod(0o755)
  monkeypatch.setenv("MEDJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(fake))
  with caplog.at_level("WARNING"):
    path = onednn.build()
  assert os.path.exists(path)
  assert "warning: unused variable" in caplog.text and "fakecxx" in caplog.text


@needs_onednn
def test_the_real_build_passes_no_flag_that_hides_warnings(tmp_path, monkeypatch):
  """``-w`` would silence the compiler; the build's command is recorded by a wrapper."""
  log = tmp_path / "args"
  wrapper = tmp_path / "bin" / "wrapcxx"
  wrapper.parent.mkdir()
  wrapper.write_text(f"#!/bin/sh\necho \"$@\" > {log}\nfor a; do out=$a; done\n: > \"$out\"\n")
  wrapper.chmod(0o755)
  monkeypatch.setenv("MEDJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(wrapper))
  onednn.build()
  args = log.read_text().split()
  assert "-w" not in args and "-Wall" in args


def test_turned_off_falls_back_to_xla(tmp_path):
  """``MEDJAX_ONEDNN=0``: XLA's convolution instead."""
  code = ("import jax, jax.numpy as jnp\n"
          "from medjax import ops\n"
          "from medjax.ops.cpu import onednn\n"
          "x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))\n"
          "hlo = jax.jit(lambda x, w: ops.conv(x, w, (1, 1), 'SAME')).lower(x, w)"
          ".as_text()\n"
          "print(onednn.available(), 'medjax_onednn' in hlo, 'convolution' in hlo)\n")
  out = _run_python(code, MEDJAX_ONEDNN="0")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["False", "False", "True"]


@needs_onednn
def test_strided_1x1_convolutions_keep_the_heap_intact():
  """A strided 1×1 convolution is taken by slicing, so oneDNN sees unit strides: its own strided
  1×1 kernel gradient corrupted the heap (glibc's checks aborted 2 runs of 3 of this loop)."""
  code = ("import jax, jax.numpy as jnp\n"
          "from medjax.ops.cpu import onednn\n"
          "assert onednn.available()\n"
          "x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))\n"
          "w = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 4, 5))\n"
          "f = lambda x, w: jnp.sum(jnp.cos(onednn.conv(x, w, (2, 2), ((0, 0), (0, 0)))))\n"
          "hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()\n"
          "assert 'strides = dense<2>' not in hlo and 'strides = dense<1>' in hlo\n"
          "for _ in range(10):\n"
          "  jax.block_until_ready(jax.jit(jax.grad(f, argnums=(0, 1)))(x, w))\n"
          "print('ok')\n")
  out = _run_python(code, MALLOC_CHECK_="3")
  assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stderr[-2000:]
