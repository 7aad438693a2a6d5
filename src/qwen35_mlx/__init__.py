"""qwen35_mlx: Qwen3.5 models (hybrid Gated DeltaNet + gated attention) on MLX.

Public API: load, generate, stream_generate, batch_generate.
"""

# Must run before anything imports mlx: on Linux it swaps MLX's reference BLAS for OpenBLAS.
from ._blas import preload_openblas

preload_openblas()

__version__ = "0.1.0"
