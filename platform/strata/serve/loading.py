"""Loading a model version for serving: from the MLflow registry or a directory, optionally with a LoRA adapter."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from strata.config import VariantConfig
from strata.registry import resolve_model
from strata.serve.precision import to_serving_precision


def fetch_adapter(uri: str) -> str:
    """A local adapter directory, or one downloaded from MLflow (`runs:/ID/adapter`, `models:/`, `s3://`)."""
    if ":/" not in uri:
        return uri
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


def load_for_serving(variant: VariantConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, str]]:
    """The model (eval mode, on the GPU if there is one, in the variant's precision), its tokenizer, and what it is
    (registry tags, dtype and quantisation)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = resolve_model(variant.model)
    if variant.adapter:
        from strata.models.adapters import merged_model  # peft: seconds to import, for adapter variants only

        model = merged_model(base.directory, "lora", fetch_adapter(variant.adapter))
    else:
        model = AutoModelForCausalLM.from_pretrained(base.directory)
    model, precision = to_serving_precision(model, variant, device)
    model.config.output_router_logits = False  # router logits feed training losses only
    tokenizer = AutoTokenizer.from_pretrained(base.directory)
    info = {**base.tags, **({"adapter": variant.adapter} if variant.adapter else {}), **precision}
    return model, tokenizer, info
