"""Qwen3.5 model classes: text (dense, MoE) and vision-language, sharing layers by import."""
