"""MoE causal LMs: named presets on transformers' Qwen3-MoE architecture, and expert-load statistics."""
