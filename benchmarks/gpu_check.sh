#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: a CUDA smoke test, the GPU benchmarks against PyTorch /
# MONAI on the same GPU, and the two quickstart-style trainings on real data, each part bounded by
# `timeout` so that a slow part cannot starve the others. CI never runs this.
#
#   bash benchmarks/gpu_check.sh DATA_DIR OUT_DIR [SECONDS_FOR_THE_HIPPOCAMPUS_RUN]
#
# DATA_DIR holds medmnist/pneumoniamnist.npz and msd_task04_hippocampus/ (a copy of
# ../shared/data's); OUT_DIR gets log.txt and the runs' results.md / metrics.jsonl. Where a
# folder .whl/ exists, its wheels are installed first (the device image lacks grain,
# ml_collections, nibabel, pydicom, tensorboardX and monai; see .library/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:?DATA_DIR}; out=${2:?OUT_DIR}; hippo_s=${3:-240}
export MEDJAX_DATA_DIR=$data PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
exec > >(tee "$out/log.txt") 2>&1

if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
nvidia-smi -L
$py -c "import jax, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__,
jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"

part() { echo; echo "=== $1 ($(date +%T))"; shift; local t=$SECONDS; "$@"; echo "--- rc=$? $((SECONDS - t)) s"; }

part "CUDA smoke: model, loss and sliding-window tests on the GPU" \
  timeout 120 $py -m pytest -q -x -p no:cacheprovider tests/models/test_layers.py \
  tests/models/test_unet.py tests/train/test_losses.py \
  tests/infer/test_sliding_window.py
part "ResNet-18 28² train step vs PyTorch+MONAI on CUDA" \
  timeout 90 $py benchmarks/train_step_vs_torch.py --torch_device cuda --steps 50
part "3-D ResNet-18 28³ train step vs PyTorch+MONAI on CUDA" \
  timeout 90 $py benchmarks/train_step_vs_torch.py --torch_device cuda --dims 3 --stem_stride 2 \
  --batch 32 --steps 30
part "3-D U-Net train step vs MONAI DynUNet on CUDA" \
  timeout 90 $py benchmarks/unet_step_vs_monai.py --torch_device cuda --deep_supervision \
  --steps 30
part "sliding window (mirrored) vs MONAI on CUDA" \
  timeout 90 $py benchmarks/sliding_window_vs_monai.py --torch_device cuda --mirror --repeats 5
part "PneumoniaMNIST ResNet-18, default config" \
  timeout 150 $py launch.py --config configs/pneumoniamnist_resnet18.py --workdir /tmp/pneu
cp /tmp/pneu/results.md "$out/pneumonia_results.md" 2>/dev/null
part "MSD Hippocampus 3-D U-Net, default config" \
  timeout "$hippo_s" $py launch.py --config configs/hippocampus_unet3d.py --workdir /tmp/hippo
cp /tmp/hippo/results.md "$out/hippocampus_results.md" 2>/dev/null
cp /tmp/hippo/metrics.jsonl "$out/hippocampus_metrics.jsonl" 2>/dev/null
exit 0
