"""Adapters of bnfast's kernels for other frameworks (optional dependencies).

Nothing here is imported by ``import bnfast``; each submodule needs its own
optional dependency:

* `bnfast.contrib.autograd` -- HIPS autograd primitives for batch, layer,
  RMS, group and instance normalization (``pip install bnfast[autograd]``);
* `bnfast.contrib.jax` -- ``jax.custom_vjp`` batch norm usable under ``jit``
  and ``grad`` (``pip install bnfast[jax]``).
"""
