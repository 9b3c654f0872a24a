"""The MLflow model registry: Strata models are transformers directories wrapped as MLflow pyfunc models.

Wrapping (rather than `mlflow.transformers`/`mlflow.pytorch`) keeps the files a plain transformers
directory that serving and fine-tuning load with `from_pretrained`, and needs no tracing or hub access.
`mlflow.pyfunc.load_model(uri).predict(["prompt", ...])` still generates text, for quick checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import mlflow
import mlflow.pyfunc
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient

from strata import paths

HF_ARTIFACT = "hf_model"
DEFAULT_PARAMS = {"max_new_tokens": 32, "temperature": 0.0}
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "mlflow")
EVICT_AFTER_IDLE_S = 3600  # a cached version read this recently is never evicted

log = logging.getLogger(__name__)


class CausalLMPyfunc(mlflow.pyfunc.PythonModel):
    """Greedy text continuation of a list of prompts (the registry's smoke test, not the serving engine)."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = context.artifacts[HF_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory).eval()

    def predict(self, context, model_input, params=None):
        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        params = {**DEFAULT_PARAMS, **(params or {})}
        return [
            generate_text(self.model, self.tokenizer, p, int(params["max_new_tokens"]), float(params["temperature"]))
            for p in prompts
        ]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0) -> str:
    """The continuation of `prompt`, ending at EOS or the chat template's end of turn, as the serving engine's does."""
    import torch

    from strata.data.tokenizer import stop_token_ids

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    stop = stop_token_ids(tokenizer, model.generation_config)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop, **sampling
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def log_model(hf_dir: str | Path, registered_name: str | None, tags: dict[str, str] | None = None):
    """Log `hf_dir` into the active run as a pyfunc model and, if named, register a new version of it."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=CausalLMPyfunc(),
        artifacts={HF_ARTIFACT: str(hf_dir)},
        signature=infer_signature(["def main("], ["    pass"], params=DEFAULT_PARAMS),
        # Explicit requirements: inferring them would load the model in a subprocess.
        pip_requirements=pinned_requirements(),
    )
    if not registered_name:
        return None
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return version


def pinned_requirements() -> list[str]:
    """What loading a model needs, at the versions it was logged with: `torch==2.13.0` (without a local label such
    as `+cpu`, so that any build of that release satisfies it)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


FINAL_CHECKPOINT_TAG = "strata.final_checkpoint"
REGISTERED_VERSION_TAG = "strata.registered_version"


def already_registered(run, checkpoint_path: str) -> bool:
    return run.data.tags.get(FINAL_CHECKPOINT_TAG) == checkpoint_path


def register_once(run, checkpoint_path: str, model_dir: str | Path, name: str | None, tags: dict[str, str]):
    """Log and register a run's final model once per final checkpoint: re-running a finished run name
    resumes at its last step, trains nothing, and must not add a duplicate version. Returns the version."""
    if already_registered(run, checkpoint_path):
        return run.data.tags.get(REGISTERED_VERSION_TAG)
    version = log_model(model_dir, name, tags=tags)
    mlflow.set_tag(FINAL_CHECKPOINT_TAG, checkpoint_path)
    if version is None:
        return None
    mlflow.set_tag(REGISTERED_VERSION_TAG, str(version.version))
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def resolve_uri(model: str) -> str:
    """`NAME@ALIAS`, `NAME/VERSION` or `models:/...` -> a `models:/` URI."""
    if model.startswith("models:/"):
        return model
    return f"models:/{model}"


@dataclass(frozen=True)
class ResolvedModel:
    directory: str  # a local transformers directory, or a hub id
    tags: dict[str, str]  # what a model derived from it (a fine-tune) records about it
    pinned: str  # the same model by a name that cannot move (`models:/NAME/VERSION` for an alias or `latest`)


class ModelNotFound(LookupError):
    """A `models:/` spec that names no registered version (the caller says which field gave it)."""


def resolve_model(spec: str) -> ResolvedModel:
    """A model from the registry (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest`) downloaded to
    a local directory; a local directory or a hub id is taken as it is."""
    if not spec.startswith("models:/"):
        return ResolvedModel(spec, {"base_model": spec}, spec)
    pinned = pin(spec)
    name, _, version = pinned.removeprefix("models:/").partition("/")
    return ResolvedModel(str(download_model(pinned)), {"base_model": name, "base_model_version": version}, pinned)


def pin(spec: str) -> str:
    """The registered version `spec` names now, as `models:/NAME/VERSION` (a registry lookup, no download); a
    directory or a hub id as it is. ModelNotFound, saying why, for a version that is not there."""
    if not spec.startswith("models:/"):
        return spec
    name, _, ref = spec.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref).version
        else:
            name, _, version = name.partition("/")
            if not version:
                raise ModelNotFound(f"{spec}: name a version, an alias or latest (models:/{name}/1, @stable, /latest)")
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ModelNotFound(f"{spec}: registered model {name!r} has no versions")
                version = str(max(int(v.version) for v in versions))
            client.get_model_version(name, version)
    except MlflowException as err:
        raise ModelNotFound(f"{spec}: {err.message}") from None
    return f"models:/{name}/{version}"


def recorded_base(spec: str, recorded: dict[str, str]) -> str:
    """The base a run goes on with: `spec`, unless it names a registry alias or `latest` of the model the run
    recorded (`recorded`: its tags, as `ResolvedModel.tags` gave them when it began). The alias may have moved
    since, and a resumed run must keep the weights its checkpoints were trained against: then the recorded
    version."""
    name, _, alias = spec.removeprefix("models:/").partition("@")
    name, _, ref = name.partition("/")
    movable = spec.startswith("models:/") and (bool(alias) or ref == "latest")
    if movable and recorded.get("base_model") == name and recorded.get("base_model_version"):
        return f"models:/{name}/{recorded['base_model_version']}"
    return spec


@dataclass(frozen=True)
class FineTune:
    """A registered LoRA or QLoRA fine-tune, as its run recorded it: the base version and the adapter it trained."""

    base: str  # models:/NAME/VERSION, or the directory or hub id it was trained on
    adapter: str  # runs:/RUN_ID/adapter
    method: str  # lora or qlora


def fine_tune_of(spec: str) -> FineTune | None:
    """What a registered version was fine-tuned from (`strata.job=finetune` tags and its run's `adapter`
    artifact); None for a directory, a pretrained version or a full fine-tune, which have no adapter to share.
    ModelNotFound, saying why, for a version that is not there."""
    if not spec.startswith("models:/"):
        return None
    name, _, ref = spec.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        raise ModelNotFound(f"{spec}: {err.message}") from None
    tags = version.tags
    if tags.get("strata.job") != "finetune" or tags.get("strata.method") not in ("lora", "qlora"):
        return None
    version_of_base = tags.get("base_model_version")  # none for a base directory or hub id
    base = f"models:/{tags['base_model']}/{version_of_base}" if version_of_base else tags["base_model"]
    return FineTune(base, f"runs:/{version.run_id}/adapter", tags["strata.method"])


def download_model(model_uri: str) -> Path:
    """The transformers directory of a registered model (`models:/NAME@ALIAS`, `models:/NAME/3`), from this node's
    cache of registered versions."""
    local = cached_version(pin(model_uri))
    flavor = Model.load(local / "MLmodel").flavors["python_function"]
    return local / flavor["artifacts"][HF_ARTIFACT]["path"]


def cached_version(pinned: str) -> Path:
    """A registered version's files (`models:/NAME/VERSION`), downloaded once per node: every worker a restarted
    training run starts, every sweep trial and every replica on the node reads them there. A version's files never
    change, and its key holds the store and the logged model it points to, so a store made again at the same path
    never serves an older model's files. One process downloads while the others on the node wait on its lock (a
    flock, dropped when its holder dies); the download is renamed into place whole, so a process killed mid-way
    leaves nothing that looks cached, and the next holder of the lock clears what it left. Beside each version lies
    the list of its files and their sizes, checked at every read: a version whose files were truncated, deleted or
    added to since (a full disk, a hand in the cache) is downloaded again, never loaded. Each read marks the
    version used; a download past the cache's budget evicts the versions least recently used."""
    name, _, version = pinned.removeprefix("models:/").partition("/")
    found = MlflowClient().get_model_version(name, version)
    key = hashlib.sha256(f"{mlflow.get_registry_uri()}\n{found.source}\n{found.run_id}".encode()).hexdigest()[:16]
    cached = paths.cache_dir() / "models" / quote(name, safe="") / f"{version}-{key}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(cached)
    with version_lock(cached):
        if cached.is_dir():  # downloaded before, or by another process while this one waited
            changed = changed_files(cached)
            if not changed:
                os.utime(cached)  # used now: the last to be evicted
                return cached
            log.warning("cached %s changed since its download (%s): downloading it again", pinned, changed)
            cached.rename(partial)  # out of place first: never read half-deleted
        shutil.rmtree(partial, ignore_errors=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(partial))
            manifest_path(cached).write_text(json.dumps(file_sizes(partial)))
            partial.rename(cached)
            os.utime(cached)  # used now (a long download's directory is as old as its start)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    evict_unused(paths.cache_dir() / "models", cache_budget_bytes())
    return cached


def version_lock(cached: Path) -> FileLock:
    return FileLock(cached.with_name(f".{cached.name}.lock"))


def partial_path(cached: Path) -> Path:
    return cached.with_name(f".{cached.name}.partial")


def manifest_path(cached: Path) -> Path:
    return cached.with_name(f".{cached.name}.files.json")


def file_sizes(directory: Path) -> dict[str, int]:
    """Each file under `directory`, by its path there, and its size in bytes."""
    return {f.relative_to(directory).as_posix(): f.stat().st_size for f in directory.rglob("*") if f.is_file()}


def changed_files(cached: Path) -> str | None:
    """How a cached version's files differ from those it was downloaded with, or None. Sizes, not contents: a
    stat per file at each read, where hashing would read every weight again."""
    try:
        recorded = json.loads(manifest_path(cached).read_text())
    except (OSError, ValueError):
        return "no list of its files"
    found = file_sizes(cached)
    missing, added = sorted(recorded.keys() - found.keys()), sorted(found.keys() - recorded.keys())
    resized = sorted(f for f in recorded.keys() & found.keys() if recorded[f] != found[f])
    parts = [
        f"{what}: {', '.join(files)}"
        for what, files in (("missing", missing), ("added", added), ("resized", resized))
        if files
    ]
    return "; ".join(parts) or None


def cache_budget_bytes() -> float:
    """$STRATA_CACHE_MAX_GB (default 200): past it, a download evicts the least recently used versions."""
    return float(os.environ.get("STRATA_CACHE_MAX_GB", "200")) * 1e9


def evict_unused(models: Path, budget_bytes: float) -> list[Path]:
    """Remove cached versions, least recently used first, until the cache fits `budget_bytes`. A version used in
    the last `EVICT_AFTER_IDLE_S` stays whatever the budget: a process that was handed its path may still be
    loading it. Each goes under its own lock (one being downloaded or read now is skipped), renamed out of place
    before it is deleted, so a half-deleted version never looks cached. Returns what it removed."""
    versions = [v for v in models.glob("*/*") if v.is_dir() and not v.name.startswith(".")]
    sizes = {v: sum(file_sizes(v).values()) for v in versions}
    total, removed = sum(sizes.values()), []
    for version in sorted(versions, key=lambda v: v.stat().st_mtime):
        if total <= budget_bytes:
            break
        try:
            with version_lock(version).acquire(timeout=0):
                if time.time() - version.stat().st_mtime < EVICT_AFTER_IDLE_S:
                    continue
                version.rename(partial_path(version))
                shutil.rmtree(partial_path(version))
                manifest_path(version).unlink(missing_ok=True)
        except Timeout:
            continue
        total -= sizes[version]
        removed.append(version)
    return removed
