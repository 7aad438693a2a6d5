"""`python -m qwen35_mlx` runs the generation command (same as `python -m qwen35_mlx.generate`)."""

from qwen35_mlx.generate import main

raise SystemExit(main())
