"""qwen35_mlx: Qwen3.5 models (hybrid Gated DeltaNet + gated attention) on MLX.

Public API: load, generate, stream_generate, batch_generate.
"""

__version__ = "0.1.0"
