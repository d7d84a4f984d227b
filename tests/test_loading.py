"""The real loading paths, with tiny models: a local folder, the Hub cache by repo id, and absent from the cache."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from dreamsketch.engine import LocalEngine, batch_key
from dreamsketch.pipelines import ModelUnavailableError, is_available
from dreamsketch.registry import load_registry
from dreamsketch.request import parse_request
from dreamsketch.studio import Studio, choose_default_model
from dreamsketch.tiny import build_tiny_sdxl_pipeline
from tests.conftest import TINY_REPO, entry, lay_into_hub_cache, write_registry


def generate(engine, model_id):
    fields = {"prompt": "a fox", "seed": 3, "steps": 2, "model_id": model_id}
    request = parse_request(fields, engine.cache.registry, "txt2img", model_id)
    return np.asarray(engine.generate(request).images[0])


@pytest.fixture
def hub_settings(settings, tmp_path, tiny_pipeline_dir, monkeypatch):
    """A registry whose Hub model sits in a temporary Hugging Face cache, in the Hub's own layout."""
    hf_home = tmp_path / "hf-home"
    lay_into_hub_cache(tiny_pipeline_dir, hf_home, TINY_REPO)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    registry = write_registry(
        tmp_path / "hub.yaml",
        [
            entry("uncached-hub", "nobody-here/not-cached"),
            entry("cached-hub", TINY_REPO),
            entry("tiny-demo", "builtin:tiny"),
        ],
    )
    return dataclasses.replace(settings, models_file=registry, default_model=None)


def test_local_folder_loads_and_gives_the_folders_weights(settings):
    engine = LocalEngine(settings, load_registry(settings.models_file))
    folder_image = generate(engine, "tiny-folder")
    builtin_image = generate(engine, "tiny-demo")
    assert folder_image.shape == (128, 128, 3)
    assert not np.array_equal(folder_image, builtin_image)  # seed 1 weights in the folder, seed 0 builtin


def test_hub_repo_loads_from_the_cache_offline(hub_settings, settings):
    engine = LocalEngine(hub_settings, load_registry(hub_settings.models_file))
    assert is_available(engine.cache.registry.get("cached-hub"))
    assert not is_available(engine.cache.registry.get("uncached-hub"))
    from_cache = generate(engine, "cached-hub")
    from_folder = generate(LocalEngine(settings, load_registry(settings.models_file)), "tiny-folder")
    assert np.array_equal(from_cache, from_folder)


def test_uncached_hub_model_gives_the_offline_message_and_leaves_nothing_loaded(hub_settings):
    engine = LocalEngine(hub_settings, load_registry(hub_settings.models_file))
    generate(engine, "tiny-demo")
    with pytest.raises(ModelUnavailableError) as error:
        generate(engine, "uncached-hub")
    message = str(error.value)
    for needed in ("'uncached-hub'", "nobody-here/not-cached", "not in the local cache", "HF_TOKEN", "tiny-demo"):
        assert needed in message
    assert "Traceback" not in message
    assert engine.loaded_ids() == []  # tiny-demo made room; the failed load left no half-filled entry
    assert generate(engine, "tiny-demo").shape == (128, 128, 3)


def test_missing_local_sources_say_where_they_point(tmp_path, settings):
    registry = write_registry(
        tmp_path / "gone.yaml",
        [entry("gone-folder", str(tmp_path / "no-such-folder")), entry("gone-file", "missing.safetensors")],
    )
    engine = LocalEngine(settings, load_registry(registry))
    for model_id in ("gone-folder", "gone-file"):
        with pytest.raises(ModelUnavailableError, match=f"'{model_id}'.*not where `source` points"):
            engine.preload(model_id)


def test_default_model_is_the_first_usable_then_the_offline_one(hub_settings, settings, tmp_path, monkeypatch):
    registry = load_registry(hub_settings.models_file)
    assert choose_default_model(hub_settings, registry) == "cached-hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    assert choose_default_model(hub_settings, registry) == "tiny-demo"
    shapes = write_registry(
        tmp_path / "shapes.yaml",
        [entry("uncached-hub", "a/b"), entry("tiny-demo", "builtin:tiny"), entry("tiny-shapes", str(tmp_path))],
    )
    (tmp_path / "model_index.json").write_text("{}")
    assert choose_default_model(hub_settings, load_registry(shapes)) == "tiny-shapes"
    assert choose_default_model(dataclasses.replace(hub_settings, default_model="tiny-demo"), registry) == "tiny-demo"


def test_unknown_default_model_fails_at_start(settings):
    with pytest.raises(ValueError, match="DREAMSKETCH_DEFAULT_MODEL='nope'"):
        Studio(dataclasses.replace(settings, default_model="nope"))


def test_sdxl_family_folder_loads_with_the_sdxl_pipelines(settings, tmp_path):
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "tiny-sdxl")
    registry = write_registry(tmp_path / "xl.yaml", [entry("tiny-xl", str(tmp_path / "tiny-sdxl"), family="sdxl")])
    engine = LocalEngine(settings, load_registry(registry))
    text_image = generate(engine, "tiny-xl")
    model = engine.cache.get("tiny-xl")
    assert type(model.txt2img).__name__ == "StableDiffusionXLPipeline"
    assert type(model.img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert model.img2img.text_encoder_2 is model.txt2img.text_encoder_2
    fields = {"prompt": "a fox", "seed": 3, "steps": 4, "image": Image.fromarray(text_image), "strength": 0.5}
    result = engine.generate(parse_request(fields, engine.cache.registry, "img2img", "tiny-xl"))
    assert result.images[0].size == (128, 128) and text_image.shape == (128, 128, 3)


def test_sdxl_without_a_negative_prompt_gives_plain_diffusers_picture(settings, tmp_path):
    """No negative prompt means zero embeddings for SDXL's unconditional branch, as in diffusers; a merged batch
    never mixes requests with and without one."""
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "tiny-sdxl")
    registry = write_registry(tmp_path / "xl.yaml", [entry("tiny-xl", str(tmp_path / "tiny-sdxl"), family="sdxl")])
    engine = LocalEngine(settings, load_registry(registry))
    plain = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny-sdxl")
    plain.set_progress_bar_config(disable=True)
    for negative in ("", "blurry"):
        fields = {"prompt": "a fox", "negative_prompt": negative, "seed": 3, "steps": 2}
        image = engine.generate(parse_request(fields, engine.cache.registry, "txt2img", "tiny-xl")).images[0]
        expected = plain(
            "a fox",
            negative_prompt=negative or None,
            num_inference_steps=2,
            guidance_scale=7.5,
            width=128,
            height=128,
            generator=[torch.Generator().manual_seed(3)],
        ).images[0]
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1
    assert batch_key(parse_request({"prompt": "a"}, engine.cache.registry, "txt2img", "tiny-xl")) != batch_key(
        parse_request({"prompt": "a", "negative_prompt": "b"}, engine.cache.registry, "txt2img", "tiny-xl")
    )


def test_sdxl_vae_that_asks_for_upcast_decodes_in_fp32_straight_away(settings, tmp_path):
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "tiny-sdxl")
    registry = write_registry(tmp_path / "xl.yaml", [entry("tiny-xl", str(tmp_path / "tiny-sdxl"), family="sdxl")])
    engine = LocalEngine(dataclasses.replace(settings, dtype="fp16"), load_registry(registry))
    vae = engine.cache.get("tiny-xl").txt2img.vae
    decode, dtypes = vae.decode, []
    vae.decode = lambda latents, **kwargs: dtypes.append(vae.dtype) or decode(latents, **kwargs)
    image = generate(engine, "tiny-xl")
    assert dtypes == [torch.float32] and vae.dtype == torch.float16
    assert image.std() > 0
