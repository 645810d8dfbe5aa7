"""medjax's ops on the CPU backend, chosen by ``medjax.ops`` only where JAX runs on the CPU.

``onednn``: oneDNN's convolutions and a 3-D Winograd as XLA FFI handlers, with the fused instance
norm + leaky ReLU of ``norm_act`` in the same library, compiled from the ``*.cc`` files here on
first use. ``conv``: which convolution runs (those handlers, else XLA lowerings that suit XLA:CPU).
``upsample_fold``: the U-Net decoder's up-sampling folded into the convolution that reads it.
``docs/performance-kernels.md`` has the measurements behind each choice.
"""
