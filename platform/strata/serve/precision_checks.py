"""The deploy-time check of each variant's precision, before any replica starts, without loading torch: the Serve
controller runs it while it builds the application (`app.build_application`), on every deploy, and `strata deploy`
runs it on the caller's machine first. torch and bitsandbytes load only when a variant asks for nf4."""

from __future__ import annotations

from strata.config import ServeConfig


def nf4_unavailable() -> str | None:
    """Why bitsandbytes cannot quantise to nf4 here, or None: it is importable and quantises a small tensor."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as err:  # an import error, or no backend for this device
        return f"{type(err).__name__}: {err}"
    return None


def check_precisions(config: ServeConfig) -> None:
    """ValueError naming the variant and the field for a precision a replica could not load: nf4 where bitsandbytes
    cannot run (float16 on a CPU is refused by the config itself)."""
    nf4_variants = [v.name for v in config.variants if v.engine.quantization == "nf4"]
    reason = nf4_unavailable() if nf4_variants else None
    if reason:
        raise ValueError(
            f"variant {nf4_variants[0]!r}: engine.quantization nf4 needs bitsandbytes, which cannot run here "
            f"({reason}); use int8 or none"
        )
