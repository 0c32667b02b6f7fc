"""Integrations of pyattn's kernels into other libraries (imported on demand)."""
