"""Array math for Qwen3.5: kernels know shapes, never layers. Imports only mlx (and numpy in tests)."""
