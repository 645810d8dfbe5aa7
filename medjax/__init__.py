"""medjax: JAX/Flax deep learning for medical images (X-ray, CT, MRI)."""

__version__ = "0.1.0"
