"""Strata: train, fine-tune and serve mixture-of-experts language models on Ray.

Data flows through the subpackages in this order: config -> data -> models -> registry/tracking -> train -> serve.
"""

__version__ = "0.1.0"
