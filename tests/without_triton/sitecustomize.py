"""Put this folder on ``PYTHONPATH`` and ``import triton`` fails as if Triton were not installed.

``.ci/run`` runs the test suite a second time so, with every process it starts (the
distributed tests' ranks included) seeing no Triton: every path that does not use the Triton
kernels must work without them (``pyproject.toml`` makes Triton optional).
"""

import sys

# A None entry makes every import of the module (and of its submodules) raise
# ModuleNotFoundError, and importlib.util.find_spec report it missing.
sys.modules["triton"] = None
