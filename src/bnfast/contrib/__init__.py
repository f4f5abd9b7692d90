"""Optional adapters of bnfast to other frameworks.

Nothing here is imported by ``import bnfast``; each submodule needs its own
optional dependency:

* `bnfast.contrib.autograd` -- HIPS autograd primitives for batch, layer,
  RMS, group and instance normalization (``pip install bnfast[autograd]``).
"""
