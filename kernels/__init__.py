"""Triton kernels and their launchers, installed as ``pyattn.kernels``. Importing a module here
needs Triton; ``import pyattn`` does not."""
