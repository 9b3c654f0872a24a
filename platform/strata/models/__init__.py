"""MoE causal LMs: named presets on transformers' Qwen3-MoE architecture, and expert-load statistics; adapters,
quantised experts and the CPU kernels.

transformers 5.25 requires the `kernels` package, and with it swaps layers for kernels downloaded from the Hugging
Face Hub whenever a model loads on, or switches train/eval mode on, a GPU. Strata runs the model code it ships and
tests: a downloaded kernel changes the numbers a checkpoint was judged on, and on an offline GPU node the download
fails the load (seen on an H200: `kernels-community/rotary` could not verify its publisher). So hub kernels are off
unless `USE_HUB_KERNELS=YES` is set before Strata is imported.
"""

import os

os.environ.setdefault("USE_HUB_KERNELS", "NO")
