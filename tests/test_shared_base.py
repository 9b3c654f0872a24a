"""Many LoRA variants on one base, without Ray: the mixed-adapter batch against each variant's merged model."""

from __future__ import annotations

import threading

import pytest
import torch
from lora_adapters import make_adapter, misfit_adapter
from test_engine import Collector, reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from strata.config import EngineSettings, ServeConfig, VariantConfig
from strata.models.adapters import merged_model
from strata.models.cpu_features import cpu_instructions
from strata.serve.adapter_sources import check_group
from strata.serve.engine import Engine, SamplingParams
from strata.serve.engine_loops import EngineLoops
from strata.serve.replica_groups import group_base
from strata.serve.shared_base import SharedBase

FP32 = EngineSettings(dtype="float32")  # compared token for token with fp32 references
PROMPTS = ["def main(", "import os\nimport sys\n", "class Parser:\n    def __init__(self, text):\n", "x = 1"]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """Two adapters of other layers, ranks and scalings: `b` adapts k_proj, which `a` does not, and o_proj at a rank
    of its own (rank_pattern), with rank-stabilised scaling and an alpha of its own for k_proj (alpha_pattern)."""
    root = tmp_path_factory.mktemp("adapters")
    b = {"target_modules": ["k_proj", "o_proj"], "use_rslora": True, "rank_pattern": {"o_proj": 2}}
    return {
        "a": make_adapter(tiny_base, root / "a", 1),
        "b": make_adapter(tiny_base, root / "b", 2, alpha_pattern={"k_proj": 16}, **b),
    }


def group(tiny_base, adapters) -> list[VariantConfig]:
    return [
        VariantConfig(name="a", model=str(tiny_base), adapter=str(adapters["a"]), replica_group="g", engine=FP32),
        VariantConfig(name="base", model=str(tiny_base), replica_group="g", engine=FP32),
        VariantConfig(name="b", model=str(tiny_base), adapter=str(adapters["b"]), replica_group="g", engine=FP32),
    ]


@pytest.fixture(scope="module")
def merged_references(tiny_base, adapters) -> dict[tuple[str, str], str]:
    """Each (prompt, variant)'s 12 greedy tokens from the variant's own merged model."""
    models = {name: merged_model(str(tiny_base), "lora", str(adapters[name])).eval() for name in ("a", "b")}
    models["base"] = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    for model in models.values():
        model.config.output_router_logits = False
    expected = {(p, v): reference(models[v], tokenizer, p, 12) for p in PROMPTS for v in models}
    assert len({expected[(PROMPTS[0], v)] for v in models}) == 3, "the adapters are too alike to tell apart"
    return expected


def test_rows_of_different_adapters_in_one_batch_decode_as_their_merged_models(tiny_base, adapters, merged_references):
    shared = SharedBase(group(tiny_base, adapters))
    assert shared.adapter_of == {"a": "a", "base": "__base__", "b": "b"}
    engine = Engine(shared.model, shared.tokenizer, max_batch_size=8, adapters=shared.adapters)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    submitted = []  # rows of all three variants join the running batch at different steps
    with torch.inference_mode():
        for step, (prompt, variant) in enumerate((p, v) for p in PROMPTS for v in ("a", "base", "b")):
            submitted.append((prompt, variant, Collector()))
            ids = shared.tokenizer.encode(prompt, add_special_tokens=False)
            engine.submit(ids, params, submitted[-1][2], adapter=shared.adapter_of[variant])
            if step % 2:
                engine.step()
        while not all(c.done.is_set() for *_, c in submitted):
            engine.step()
    for prompt, variant, collector in submitted:
        assert collector.text == merged_references[(prompt, variant)], (prompt, variant)


@pytest.mark.skipif(cpu_instructions() is None, reason="the kernels need a CPU with AMX or AVX512-BF16")
def test_on_the_bf16_kernels_each_row_of_a_mixed_batch_takes_its_own_adapter(tiny_base, adapters):
    """bf16 on the brgemm kernels (the low-rank matmuls in bf16 too): one batch of the same prompt for `a`, the base
    and `b`, each row's logits against every variant's merged fp32 model's: nearest its own, and mostly its argmax."""
    bf16 = EngineSettings(dtype="bfloat16")
    shared = SharedBase([v.model_copy(update={"engine": bf16}) for v in group(tiny_base, adapters)])
    assert shared.info["a"]["kernels"].startswith("brgemm"), shared.info["a"]
    ids = shared.tokenizer(PROMPTS[2], return_tensors="pt", add_special_tokens=False).input_ids
    names = ["a", "base", "b"]
    models = {name: merged_model(str(tiny_base), "lora", str(adapters[name])).eval() for name in ("a", "b")}
    models["base"] = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.inference_mode():
        want = {name: model(ids).logits[0].float() for name, model in models.items()}
        with shared.adapters.rows([shared.adapter_of[name] for name in names]):
            got = shared.model(ids.repeat(len(names), 1)).logits.float()
    for row, name in enumerate(names):
        distance = {other: (got[row] - want[other]).abs().mean().item() for other in names}
        assert min(distance, key=distance.get) == name, (name, distance)
        assert (got[row].argmax(-1) == want[name].argmax(-1)).float().mean() > 0.9, name


def test_two_engine_loops_on_one_base_decode_concurrent_mixed_traffic_as_the_merged_models(
    tiny_base, adapters, merged_references
):
    """Both loops decode at once on the one model, each batch mixing all three variants: every row must get its own
    adapter, not the one the other loop's batch asked for at the same moment."""
    shared = SharedBase(group(tiny_base, adapters))
    loops = EngineLoops(
        shared.model, shared.tokenizer, loops=2, max_batch_size=8, torch_threads=1, adapters=shared.adapters
    )
    loops.start()
    requests = [(p, v) for _ in range(2) for p in PROMPTS for v in ("a", "base", "b")]
    collectors = [Collector() for _ in requests]

    def client(first: int) -> None:  # four clients, each sending its share one after another
        for index in range(first, len(requests), 4):
            prompt, variant = requests[index]
            ids = shared.tokenizer.encode(prompt, add_special_tokens=False)
            loops.submit(ids, SamplingParams(12, 0.0), collectors[index], shared.adapter_of[variant])
            collectors[index].done.wait(120)

    try:
        threads = [threading.Thread(target=client, args=(first,)) for first in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        stats = loops.stats()
    finally:
        loops.stop()
    assert loops.failure is None and stats["finished"] == len(requests)
    assert all(engine.steps for engine in loops.engines), "one loop did all the work"
    for (prompt, variant), collector in zip(requests, collectors, strict=True):
        assert collector.text == merged_references[(prompt, variant)], (prompt, variant)


def test_adapters_that_do_not_stack_are_refused_naming_the_variant(tiny_base, tmp_path):
    experts = make_adapter(
        tiny_base, tmp_path / "experts", 3, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]
    )
    variants = [VariantConfig(name="moe", model=str(tiny_base), adapter=str(experts), replica_group="g", engine=FP32)]
    with pytest.raises(ValueError, match="variant 'moe'.*target_parameters"):
        SharedBase(variants)
    dora = make_adapter(tiny_base, tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(ValueError, match="variant 'd': a DoRA adapter; serve it without replica_group"):
        SharedBase([VariantConfig(name="d", model=str(tiny_base), adapter=str(dora), replica_group="g", engine=FP32)])
    with pytest.raises(ValueError, match="replica group 'g' has no adapter"):
        SharedBase([VariantConfig(name="base", model=str(tiny_base), replica_group="g", engine=FP32)])


def test_an_adapter_that_does_not_fit_the_base_is_refused_and_the_others_decode_as_before(
    tiny_base, adapters, merged_references, tmp_path
):
    """An adapter of another base is found only when its factors meet the base's layers. Refused, it leaves every
    layer as it was (the other variants decode as their merged models), and a name already loaded is refused too."""
    shared = SharedBase(group(tiny_base, adapters))
    misfit = misfit_adapter(adapters["a"], tmp_path / "misfit")
    added = VariantConfig(name="misfit", model=str(tiny_base), adapter=str(misfit), replica_group="g", engine=FP32)
    with pytest.raises(ValueError, match=r"variant 'misfit': its adapter's factors for .*v_proj .* do not fit"):
        shared.add(added)
    with pytest.raises(ValueError, match="variant 'a': an adapter of that name is already loaded"):
        shared.adapters.add("a", adapters["a"])
    assert shared.adapter_of == {"a": "a", "base": "__base__", "b": "b"}
    engine = Engine(shared.model, shared.tokenizer, max_batch_size=8, adapters=shared.adapters)
    collectors = {}
    for variant in ("a", "base", "b"):
        collectors[variant] = Collector()
        ids = shared.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
        engine.submit(ids, SamplingParams(12, 0.0), collectors[variant], adapter=shared.adapter_of[variant])
    with torch.inference_mode():
        while not all(c.done.is_set() for c in collectors.values()):
            engine.step()
    for variant, collector in collectors.items():
        assert collector.text == merged_references[(PROMPTS[1], variant)], variant


def test_a_group_is_checked_before_anything_loads(tiny_base, adapters, tmp_path):
    """What `strata deploy` and `strata add-variant` refuse, naming the variant, from configs alone: members built
    on another base, an adapter that is not there, one that does not stack."""
    members = group(tiny_base, adapters)
    check_group("g", members)  # the group the tests above serve
    other = VariantConfig(name="other", model=str(tmp_path / "other-base"), adapter=str(adapters["a"]), engine=FP32)
    with pytest.raises(ValueError, match=r"variant 'other' is built on .*other-base, not on its replica group 'g'"):
        check_group("g", [*members, other])
    missing = VariantConfig(name="gone", model=str(tiny_base), adapter=str(tmp_path / "nowhere"), engine=FP32)
    with pytest.raises(ValueError, match="variant 'gone': .*nowhere holds no peft adapter"):
        check_group("g", [*members, missing])
    dora = make_adapter(tiny_base, tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(ValueError, match="variant 'd': a DoRA adapter; serve it without replica_group"):
        check_group("g", [*members, VariantConfig(name="d", model=str(tiny_base), adapter=str(dora), engine=FP32)])


def test_a_plain_serve_deploy_refuses_a_group_that_cannot_share_its_base(tiny_base, adapters, tmp_path, strata_home):
    """`serve deploy` of a config file builds the application in the Serve controller (`serve_apps.ab:build_app`),
    without `strata deploy`'s checks before it: the build refuses the group itself, naming the variant, before a
    replica starts."""
    from serve_apps.ab import build_app

    members = [v.model_dump() for v in group(tiny_base, adapters)]
    build_app({"model_name": "m", "variants": members})
    other = {**members[0], "name": "other", "model": str(tmp_path / "other-base")}
    with pytest.raises(ValueError, match=r"variant 'other' is built on .*other-base, not on its replica group 'g'"):
        build_app({"model_name": "m", "variants": [*members, other]})


def test_a_replica_group_needs_one_set_of_unquantised_replica_settings():
    quantized = {"name": "a", "model": "m", "replica_group": "g", "engine": {"quantization": "int8"}}
    with pytest.raises(ValueError, match="variant 'a': engine.quantization int8 with replica_group 'g'"):
        ServeConfig(model_name="m", variants=[quantized])
    variants = [
        {"name": "a", "model": "m", "adapter": "x", "replica_group": "g"},
        {"name": "b", "model": "m", "adapter": "y", "replica_group": "g", "num_cpus": 1},
    ]
    with pytest.raises(ValueError, match="'a' and 'b' share replica_group 'g' but differ in num_cpus"):
        ServeConfig(model_name="m", variants=variants)


def register_fine_tune(tiny_base, adapter_dir, method: str) -> str:
    """A base version and a fine-tune of it, tagged and logged as `strata finetune` does (the adapter as an
    artifact of the run that registered it); the fine-tune's registered model is a copy of the base: only its
    tags and its run's adapter are read."""
    import mlflow

    from strata import registry, tracking

    tracking.use_store()
    with tracking.start_run("shared-base", f"base-{method}", {}):
        base = registry.log_model(tiny_base, "tiny")
    tags = {"strata.job": "finetune", "strata.method": method, "base_model": "tiny", "base_model_version": base.version}
    with tracking.start_run("shared-base", f"tune-{method}", {}, tags=tags):
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        tuned = registry.log_model(tiny_base, "tiny", tags=tags)
    return f"models:/tiny/{tuned.version}", f"models:/tiny/{base.version}"


def test_registered_lora_and_qlora_fine_tunes_share_their_recorded_base(tiny_base, adapters, strata_home):
    tuned, base = register_fine_tune(tiny_base, adapters["a"], "lora")
    shared = SharedBase(
        [
            VariantConfig(name="tuned", model=tuned, replica_group="g", engine=FP32),
            VariantConfig(name="stable", model=base, replica_group="g", engine=FP32),
        ]
    )
    assert shared.adapter_of == {"tuned": "tuned", "stable": "__base__"}
    assert shared.info["tuned"]["base"] == base and shared.info["tuned"]["adapter"].endswith("/adapter")
    registered = [
        VariantConfig(name=n, model=m, replica_group="g", engine=FP32) for n, m in (("t", tuned), ("s", base))
    ]
    check_group("g", registered)  # the fine-tune's run's adapter is there, on the version its tags name
    missing = shared.info["tuned"]["adapter"].removesuffix("/adapter") + "/nothing"
    with pytest.raises(ValueError, match=f"variant 'gone': no peft adapter at {missing}"):
        check_group("g", [*registered, VariantConfig(name="gone", model=base, adapter=missing, engine=FP32)])
    unknown = VariantConfig(name="next", model="models:/tiny/99", replica_group="g", engine=FP32)
    with pytest.raises(ValueError, match="replica group 'g': models:/tiny/99: .*not found"):
        check_group("g", [*registered, unknown])  # a version that is not there: a clear error, not MLflow's raw one
    members = [VariantConfig(name="tuned", model=tuned, replica_group="g", engine=FP32)]
    assert group_base(members) == base  # what `strata add-variant --adapter` puts the new adapter on
    shared.add(VariantConfig(name="added", model=group_base(members), adapter=str(adapters["b"]), engine=FP32))
    assert shared.adapter_of["added"] == "added"
    engine = Engine(shared.model, shared.tokenizer, adapters=shared.adapters)
    collector = Collector()
    engine.submit(
        shared.tokenizer.encode(PROMPTS[0], add_special_tokens=False), SamplingParams(12, 0.0), collector, "tuned"
    )
    with torch.inference_mode():
        while not collector.done.is_set():
            engine.step()
    merged = merged_model(str(tiny_base), "lora", str(adapters["a"])).eval()
    merged.config.output_router_logits = False
    assert collector.text == reference(merged, shared.tokenizer, PROMPTS[0], 12)

    qlora, qlora_base = register_fine_tune(tiny_base, adapters["b"], "qlora")  # on the base it was quantised from
    shared = SharedBase([VariantConfig(name="q", model=qlora, replica_group="g", engine=FP32)])
    assert shared.adapter_of == {"q": "q"} and shared.info["q"]["method"] == "qlora"
    assert shared.info["q"]["base"] == qlora_base
