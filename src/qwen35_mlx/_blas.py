"""Placeholder: OpenBLAS preloading for MLX's Linux CPU wheel (filled in with the kernel work)."""


def preload_openblas() -> None:
    """Load a faster BLAS before mlx is imported, where that can be done safely."""
