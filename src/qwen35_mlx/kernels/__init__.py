"""Array math for Qwen3.5: kernels know shapes, never layers; they import only mlx."""
