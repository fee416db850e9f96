"""GPU readiness: the routing facts of a device, the first-use self-check and the compile audit.

* :mod:`.device`: the one place that asks a GPU for its compute capability and ``flashdino._C``
  for the architectures it was built for; the dispatch's per-backend device rules.
* :mod:`.selfcheck`: the first time a fast kernel runs for a (device, dtype, op), it is compared
  with the PyTorch reference on a small probe; a mismatch disables that backend for that op.
* :mod:`.audit`: compiles every Triton launch configuration the dispatch can select for given
  architectures (no GPU needed) and reports registers, spills and shared memory.

``flashdino check`` (``cli/check.py``) runs the probes on the current GPU, or the audit.
"""
