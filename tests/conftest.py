"""Test setup: 4 fake CPU devices (for the tests of data parallelism) and shared fixtures."""

import os
import sys

# Must precede any JAX import: every test process (and every launch.py it starts) sees 4 host
# devices, and XLA compiles without LLVM's optimisations (-O0) unless XLA_FLAGS says otherwise:
# the tests run small programs a few times each, so on a CPU with an empty compilation cache the
# optimiser costs far more than it saves (docs/performance.md). Levels agree only up to float
# rounding, so every process of a test must compile at the same one (`helpers.launch_env` keeps
# it); user runs and benchmarks keep XLA's default.
_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
if "--xla_backend_optimization_level" not in _xla_flags:
  _xla_flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _xla_flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache, shared by the xdist workers and the launch.py subprocesses
# they start (all inherit this process's environment), and kept between runs: the suite trains
# the same small configs many times, and compiling them is most of its time on a 2-core CPU.
# Cached executables are keyed by their HLO, flags and jaxlib, so a hit runs exactly what a
# fresh compile would; a changed model or jaxlib only adds entries. JAX_COMPILATION_CACHE_DIR set
# by the user wins.
#
# No JAX size cap (JAX_COMPILATION_CACHE_MAX_SIZE): with one, JAX's LRU cache lists and stats
# every entry, under a file lock shared by the workers, on every write; the suite writes thousands
# of small entries into an empty cache, so a cold run slowed the further it got (quadratic).
# The folder is instead emptied here, once, when it has grown past `_CACHE_CAP`.
#
# The CPU kernels' partitioning rules (jax custom_partitioning, medjax/ops/cpu) put a pointer to
# their Python callback into the HLO, which differs in every process: every step compiled on more
# than one device missed the cache. The pointer is left out of the key here, which is safe only
# while the rules cannot change under a cached executable; so the folder is named by a digest of
# the sources that define them, and a folder of older sources is removed.
_CACHE_CAP = 2 * 1024**3  # bytes; a whole run of the suite writes well under a tenth of it


def _compilation_cache_dir() -> str:
  """``~/.cache/medjax/jax-tests/ops-<digest of medjax/ops/cpu/*.py>``; removes the others, and
  empties it past `_CACHE_CAP`."""
  import hashlib
  import shutil

  ops_cpu = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "medjax",
                         "ops", "cpu")
  digest = hashlib.sha256()
  for name in sorted(os.listdir(ops_cpu)):
    if name.endswith(".py"):
      with open(os.path.join(ops_cpu, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                      "medjax", "jax-tests")
  cache = os.path.join(root, "ops-" + digest.hexdigest()[:12])
  if os.path.isdir(root) and not os.environ.get("PYTEST_XDIST_WORKER"):  # once, before workers
    for name in os.listdir(root):  # folders of other sources, or entries of the flat layout
      path = os.path.join(root, name)
      if path != cache:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    if os.path.isdir(cache) and sum(e.stat().st_size for e in os.scandir(cache)) > _CACHE_CAP:
      shutil.rmtree(cache, ignore_errors=True)
  return cache


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache_dir()
  os.environ.setdefault("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "1")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small ones too

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `import configs` as launch.py does

from medjax import host  # noqa: E402

host.keep_freed_memory()  # as launch.py: XLA's large temporaries stop faulting in on every call

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_synthetic_medmnist(root, flag="pneumoniamnist", n_train=96, n_val=40, size=28, ndim=2,
                             seed=0, with_test=False):
  """A learnable MedMNIST-format file: class 1 images carry a bright blob, class 0 do not.

  Returns the folder to pass as ``data.dir``.
  """
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "medmnist")
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("val", n_val)) + ((("test", n_val),) if with_test else ()):
    labels = (np.arange(n) % 2).astype(np.uint8)
    rng.shuffle(labels)
    shape = (n,) + (size,) * ndim
    images = rng.integers(0, 100, size=shape).astype(np.float32)
    c = size // 2
    sl = (slice(c - 4, c + 4),) * ndim
    for i in np.flatnonzero(labels):
      images[(i,) + sl] += 120
    arrays[f"{split}_images"] = images.clip(0, 255).astype(np.uint8)
    arrays[f"{split}_labels"] = labels[:, None]
  name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
  np.savez_compressed(os.path.join(folder, name), **arrays)
  return folder


def write_multilabel_medmnist(root, flag="chestmnist", labels=14, n_train=64, n_val=32, seed=0):
  """A random multi-label MedMNIST-format file (``[N, labels]`` 0/1); returns its folder."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "medmnist")
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("val", n_val)):
    arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28)).astype(np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 2, (n, labels)).astype(np.uint8)
  np.savez(os.path.join(folder, f"{flag}.npz"), **arrays)
  return folder


def write_msd(root, n=6, channels=("MRI",), layout="msd", seed=0, shape=(22, 26, 18),
              spacing=(1.0, 1.0, 1.0), lps=False, nested=False):
  """A small MSD-style dataset: each case an ellipsoid (class 1) with a core (class 2);
  ``nested``: a third shell inside the core (class 3, "inner"), for region-based training."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
  os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
  entries = []
  for c in range(n):
    dims = np.array(shape) + rng.integers(-3, 4, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1)
    centre = dims / 2 + rng.uniform(-2, 2, 3)
    r = np.linalg.norm((grid - centre) / (dims / 4), axis=-1)
    label = np.where(r < 0.5, 2, np.where(r < 1.0, 1, 0)).astype(np.uint8)
    if nested:  # shells of equal thickness: 1 outside r = 0.6, 2 down to 0.3, 3 inside
      label = np.where(r < 0.3, 3, np.where(r < 0.6, 2, label)).astype(np.uint8)
    image = (20 + 40 * (label == 1) + 80 * (label == 2) + 130 * (label == 3) +
             rng.normal(0, 5, dims)).clip(1, None)
    image[:2] = 0  # an empty border, so cropping to nonzero has work to do
    label[:2] = 0
    # lps: files stored with x and y reversed (as DICOM conversions often are), so readers must
    # reorient to RAS and writers back.
    affine = np.diag([s * (-1 if lps and a < 2 else 1) for a, s in enumerate(spacing)] + [1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    name = f"case_{c:03d}"
    if layout == "msd":
      data = np.stack([image] * len(channels), -1) if len(channels) > 1 else image
      nib.save(nib.Nifti1Image(data.astype(np.float32), affine),
               os.path.join(root, "imagesTr", f"{name}.nii.gz"))
    else:
      for k in range(len(channels)):
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine),
                 os.path.join(root, "imagesTr", f"{name}_{k:04d}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(root, "labelsTr", f"{name}.nii.gz"))
    entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
  meta = {"name": "Synthetic", "modality": {str(i): c for i, c in enumerate(channels)},
          "labels": {"0": "background", "1": "outer", "2": "core"}, "training": entries}
  if nested:
    meta["labels"]["3"] = "inner"
  if layout == "nnunet":
    meta = {"name": "Synthetic", "channel_names": meta["modality"],
            "labels": {v: int(k) for k, v in meta["labels"].items()}}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  return str(root)


def write_fusion_atlas(root, cases=None, size=32, seed=0):
  """A Harvard-atlas-style fusion folder (`medjax.io.harvard`): ``{pair: {case: slices}}`` PNG
  pairs, the MRI grey, CT grey and PET/SPECT RGB, each a disc with a ring (the skull) and noise.

  Returns ``root``.
  """
  from PIL import Image

  cases = cases or {"CT-MRI": {2: 2, 28: 2}, "PET-MRI": {25: 2, 30: 1},
                    "SPECT-MRI": {3: 1, 28: 2, 40: 1}}
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  r = np.hypot(yy - size / 2, xx - size / 2)
  for pair, by_case in cases.items():
    first, second = pair.split("-")
    for case, slices in by_case.items():
      for s in range(1, slices + 1):
        name = f"{case}{s:03d}.png"
        mri = np.where(r < size * 0.4, 90 + 60 * np.sin(xx / 2.0), 0) + rng.normal(0, 5, r.shape)
        other = np.where(np.abs(r - size * 0.42) < 2, 250, np.where(r < size * 0.4, 60, 0))
        other = other + rng.normal(0, 3, r.shape)
        images = {"MRI": mri, first: other}
        if first in ("PET", "SPECT"):
          images[first] = np.stack([other, 0.6 * other, 255 - other], -1)
        for modality in (first, second):
          folder = os.path.join(root, pair, modality)
          os.makedirs(folder, exist_ok=True)
          image = np.clip(np.round(images[modality]), 0, 255).astype(np.uint8)
          Image.fromarray(image).save(os.path.join(folder, name))
  return root


@pytest.fixture
def synthetic_medmnist(tmp_path):
  return write_synthetic_medmnist(str(tmp_path))


def computed_once(tmp_path_factory, name, build):
  """``build(folder)``'s JSON value, computed once per test run however many xdist workers ask.

  For fixtures that train a model which tests then only read (or copy): the first worker to ask
  builds into a folder beside the workers' own temporary folders, under a file lock; the others
  wait for it and read the value it saved. A build that raises leaves nothing behind, so the
  next worker to ask builds again (and fails the same way).
  """
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's folder, shared by every worker
  folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
  with FileLock(str(root / f"shared-{name}.lock")):
    if not done.exists():
      if folder.exists():
        shutil.rmtree(folder)
      folder.mkdir()
      value = build(str(folder))
      done.write_text(json.dumps(value, default=float))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
  """``(workdir, summary)`` of one small run that has learnt the synthetic task: 256 train, 40 val
  and 40 test images, 30 steps of 32 on all 4 devices (sharded checkpoints), evaluated every 10.

  Trained once per test run (`computed_once`) and shared by the tests that only read it; a test
  that writes into the workdir works on a copy (``shutil.copytree``).
  """

  def train(root):
    from helpers import config

    from medjax.train import loop

    data = write_synthetic_medmnist(root, n_train=256, n_val=40, with_test=True)
    workdir = os.path.join(root, "run")
    c = config(data, steps=30, **{"train.batch_size": 32, "eval.every_steps": 10,
                                  "eval.batch_size": 40, "mesh.data": 4})
    return workdir, loop.train_and_evaluate(c, workdir)

  workdir, summary = computed_once(tmp_path_factory, "learned_run", train)
  return workdir, summary


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory):
  """``(workdir, msd_root)`` of a 3-D U-Net trained one step on `write_msd` (5 LPS-stored cases):
  a segmentation run for the tests that predict with one. Made once (`computed_once`); tests
  only read it."""

  def train(root):
    from helpers import seg_config

    from medjax.train import loop

    msd = str(write_msd(os.path.join(root, "msd"), n=5, lps=True))
    workdir = os.path.join(root, "run")
    loop.train_and_evaluate(seg_config(msd), workdir)
    return workdir, msd

  workdir, msd = computed_once(tmp_path_factory, "seg_run", train)
  return workdir, msd


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
  """``{"data": ..., "workdir": ...}``: the synthetic MedMNIST folder and the run of one process on
  one device that the multi-process launches (``srun``, ``mpirun``) must reproduce: the runlocal
  config with `helpers.MULTIPROCESS_OVERRIDES`. Trained once per test run (`computed_once`);
  tests only read it."""

  def train(root):
    from helpers import MULTIPROCESS_OVERRIDES, config

    from medjax.train import loop

    data = write_synthetic_medmnist(root)
    workdir = os.path.join(root, "one")
    loop.train_and_evaluate(config(data, **MULTIPROCESS_OVERRIDES), workdir)
    return {"data": data, "workdir": workdir}

  return computed_once(tmp_path_factory, "one_process_run", train)


@pytest.fixture(scope="session")
def mpirun():
  """The ``mpirun`` command line (its flags for 2 processes on a 2-core host, as root or not) for
  the tests marked ``mpi``. Skipped where no Open MPI 4 ``mpirun`` is installed: launch.py finds
  the processes of Open MPI 4 and older from their environment (Open MPI 5 needs flags)."""
  if shutil.which("mpirun") is None:
    pytest.skip("no mpirun here: the mpi tests need Open MPI 4 (apt-get install openmpi-bin)")
  p = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
  first = (p.stdout + p.stderr).strip().splitlines()[:1]
  version = first[0] if first else "no version"
  if "Open MPI" not in version or not version.split()[-1].startswith(("1.", "2.", "3.", "4.")):
    pytest.skip(f"mpirun here is {version!r}, not Open MPI 4: the mpi tests need Open MPI 4 "
                "(apt-get install openmpi-bin on Debian 12)")
  # --oversubscribe: 2 processes even where Open MPI counts fewer free slots (busy or 1-core hosts).
  return ["mpirun", "--allow-run-as-root", "--oversubscribe"]


SLURM_CLUSTER_SCRIPT = os.path.join(REPO, "tests", "slurm", "cluster.sh")


@pytest.fixture(scope="session")
def slurm_conf(tmp_path_factory):
  """The ``SLURM_CONF`` of a one-node SLURM cluster on this host (tests/slurm/cluster.sh) for the
  tests marked ``slurm``: started once per test run (`computed_once`, shared by the xdist
  workers), stopped when the run ends (`pytest_sessionfinish`). Skipped where SLURM's and munge's
  daemons are not installed, or without root (slurmd runs the jobs)."""
  missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol")
             if shutil.which(t) is None]
  if missing:
    pytest.skip(f"no SLURM here ({', '.join(missing)} not found): the slurm tests need "
                "Debian's slurm-wlm and munge packages (apt-get install slurm-wlm munge)")
  if os.geteuid() != 0:
    pytest.skip("the test SLURM cluster needs root (its slurmd runs jobs as their user)")

  def start(folder):
    p = subprocess.run(["bash", SLURM_CLUSTER_SCRIPT, "start", folder], capture_output=True,
                       text=True, timeout=120)
    if p.returncode:
      raise RuntimeError(f"{SLURM_CLUSTER_SCRIPT} start failed:\n{p.stdout}{p.stderr}")
    return os.path.join(folder, "slurm.conf")

  return computed_once(tmp_path_factory, "slurm_cluster", start)


def pytest_sessionfinish(session):
  """Stops the test SLURM cluster, if one was started, once every worker is done: in the xdist
  controller, or in the one process without xdist."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return
  factory = getattr(session.config, "_tmp_path_factory", None)
  if factory is None:
    return
  folder = factory.getbasetemp() / "shared-slurm_cluster"
  if (folder / "slurm.conf").exists():
    subprocess.run(["bash", SLURM_CLUSTER_SCRIPT, "stop", str(folder)], check=False, timeout=60)


@pytest.fixture(scope="session")
def cv_runs(tmp_path_factory):
  """``(cv_folder, msd_root)``: a two-fold cross-validation of the 3-D ``runlocal`` config on
  `write_msd` (7 cases, ``case_006`` held out by ``data.holdout``), each fold trained two steps
  and validated without mirroring, in ``<cv_folder>/fold<k>``. Made once (`computed_once`);
  tests only read it (a test that writes into it works on a copy)."""

  def train(root):
    from helpers import seg_config

    from medjax.infer import segment
    from medjax.train import loop

    msd = str(write_msd(os.path.join(root, "msd"), n=7))
    folder = os.path.join(root, "cv")
    for fold in range(2):
      workdir = os.path.join(folder, f"fold{fold}")
      loop.train_and_evaluate(seg_config(msd, steps=2, **{
          "data.folds": 2, "data.fold": fold, "data.holdout": ("case_006",), "train.batch_size": 2,
          "optim.lr": 1e-2}), workdir)
      segment.validate(workdir, mirror=False, overlays=0, n_boot=20)
    return folder, msd

  folder, msd = computed_once(tmp_path_factory, "cv_runs", train)
  return folder, msd


@pytest.fixture
def data_root():
  root = os.environ.get("MEDJAX_DATA_DIR")
  if not root or not os.path.isdir(root):
    pytest.skip("MEDJAX_DATA_DIR is unset or missing; real data tests need ../shared/data")
  return root
