"""Corpus -> tokenizer -> packed token sequences, each step cached on disk and skipped when up to date."""
