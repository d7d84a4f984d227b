"""Training and evaluation of the bundled tiny-shapes model."""

import os

# Set before torch starts its thread pool: spinning OpenMP threads slow down several-fold when other
# processes share the CPU cores (measured: 0.7-1.0 s instead of 5-28 s a training step on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
