"""The real loading paths, with tiny models: a local folder, the Hub cache by repo id, and absent from the cache."""

import dataclasses
import json
import logging
import shutil
import weakref

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

import dreamsketch.pipelines
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


def test_uncached_hub_model_gives_the_offline_message_and_leaves_the_loaded_model_loaded(hub_settings):
    engine = LocalEngine(hub_settings, load_registry(hub_settings.models_file))
    generate(engine, "tiny-demo")
    with pytest.raises(ModelUnavailableError) as error:
        generate(engine, "uncached-hub")
    message = str(error.value)
    for needed in ("'uncached-hub'", "nobody-here/not-cached", "not in the local cache", "HF_TOKEN", "tiny-demo"):
        assert needed in message
    assert "Traceback" not in message
    assert engine.loaded_ids() == ["tiny-demo"]  # nothing made room for it, and no half-filled entry was left
    assert generate(engine, "tiny-demo").shape == (128, 128, 3)


def test_a_model_that_cannot_load_pushes_out_no_loaded_model(hub_settings):
    """QA's case, with the default DREAMSKETCH_MAX_LOADED=1: a request for a Hub model that is not cached offline
    fails, and the model that works stays loaded (the same pipelines, not loaded again) and is reported so."""
    studio = Studio(hub_settings)
    fields = {"prompt": "a fox", "seed": 3, "steps": 2}
    studio.generate(studio.parse({**fields, "model_id": "cached-hub"}, "txt2img"))
    model = studio.engine.cache.loaded["cached-hub"]
    with pytest.raises(ModelUnavailableError, match="'uncached-hub'"):
        studio.generate(studio.parse({**fields, "model_id": "uncached-hub"}, "txt2img"))
    assert studio.status()["loaded_models"] == ["cached-hub"]
    assert {m["id"]: m["loaded"] for m in studio.models()} == {
        "uncached-hub": False,
        "cached-hub": True,
        "tiny-demo": False,
    }
    studio.generate(studio.parse({**fields, "model_id": "cached-hub"}, "txt2img"))
    assert studio.engine.cache.loaded["cached-hub"] is model


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_damaged_weights_fail_before_the_loaded_model_makes_room(settings, tmp_path, tiny_pipeline_dir, device):
    """The weights are read into host memory before anything leaves the device: weights that do not fit their
    config (a file whose header reads, so that the model is listed ready) fail there."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_pipeline_dir, damaged)
    doubled(damaged / "unet" / "config.json", "block_out_channels")
    registry = write_registry(
        tmp_path / "damaged.yaml", [entry("tiny-demo", "builtin:tiny"), entry("damaged", str(damaged))]
    )
    engine = LocalEngine(settings, load_registry(registry))
    engine.preload("tiny-demo")
    assert engine.model_state(engine.cache.registry.get("damaged")) == ("ready offline", True)
    engine.cache.device = torch.device(device)  # the failure comes before anything would go onto it
    with pytest.raises(ModelUnavailableError, match="'damaged'.*do not fit together.*Check `source`") as refused:
        engine.preload("damaged")
    assert engine.loaded_ids() == ["tiny-demo"]
    assert "internet" not in str(refused.value)  # a local folder: connecting would not help


@pytest.mark.parametrize(("family", "kind"), [("sdxl", "SD 1.x/2.x"), ("sd15", "SDXL")])
def test_weights_registered_as_another_family_are_refused_and_leave_the_loaded_model(
    settings, tmp_path, tiny_pipeline_dir, family, kind
):
    """An SD 1.5 folder registered as sdxl loaded as an SDXL pipeline without tokenizers, reported itself ready,
    took the loaded model's place and failed every request with an AttributeError."""
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "tiny-sdxl")
    source = str(tiny_pipeline_dir if family == "sdxl" else tmp_path / "tiny-sdxl")
    registry = write_registry(
        tmp_path / "mixed.yaml", [entry("tiny-demo", "builtin:tiny"), entry("mislabelled", source, family=family)]
    )
    engine = LocalEngine(settings, load_registry(registry))
    engine.preload("tiny-demo")
    with pytest.raises(ModelUnavailableError, match=f"'mislabelled'.*UNet is {kind}'s.*`family: {family}`"):
        engine.preload("mislabelled")
    assert engine.loaded_ids() == ["tiny-demo"]


def test_a_pipeline_without_its_text_encoder_is_refused_at_load(settings, tmp_path):
    """diffusers loads an SDXL folder without text_encoder/tokenizer (as for a refiner) with None in their place; the
    engine needs both, and failed at the first request."""
    folder = tmp_path / "xl"
    build_tiny_sdxl_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("text_encoder", "tokenizer"):
        index.pop(part)
        shutil.rmtree(folder / part)
    (folder / "model_index.json").write_text(json.dumps(index))
    registry = write_registry(tmp_path / "xl.yaml", [entry("partial-xl", str(folder), family="sdxl")])
    engine = LocalEngine(settings, load_registry(registry))
    with pytest.raises(ModelUnavailableError, match="'partial-xl'.*the pipeline has no tokenizer, text_encoder"):
        engine.preload("partial-xl")
    assert engine.loaded_ids() == []


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def doubled(path, *keys):
    config = json.loads(path.read_text())
    edit_json(
        path,
        **{key: [v * 2 for v in config[key]] if isinstance(config[key], list) else config[key] * 2 for key in keys},
    )


DAMAGES = {  # QA found each of these failing with a traceback (and `preload --all` stopping at the first)
    "unet config against its weights": lambda folder: doubled(folder / "unet" / "config.json", "block_out_channels"),
    "a class that does not exist": lambda folder: edit_json(folder / "model_index.json", unet=["diffusers", "NoUNet"]),
    "text encoder config against its weights": lambda folder: doubled(
        folder / "text_encoder" / "config.json", "hidden_size", "intermediate_size"
    ),
    "tokenizer with only its config": lambda folder: [
        path.unlink() for path in (folder / "tokenizer").iterdir() if path.name != "tokenizer_config.json"
    ],
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_files_that_do_not_fit_together_are_refused_and_leave_the_loaded_model(
    settings, tmp_path, tiny_pipeline_dir, damage
):
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "damaged")
    DAMAGES[damage](folder)
    registry = write_registry(tmp_path / "d.yaml", [entry("tiny-demo", "builtin:tiny"), entry("damaged", str(folder))])
    engine = LocalEngine(settings, load_registry(registry))
    engine.preload("tiny-demo")
    with pytest.raises(ModelUnavailableError, match="Model 'damaged'.*cannot be loaded: its .*Check `source`"):
        engine.preload("damaged")
    assert engine.loaded_ids() == ["tiny-demo"]


def test_a_folder_or_cached_repo_without_some_components_is_not_ready(hub_settings, tmp_path, tiny_pipeline_dir):
    """An interrupted download leaves model_index.json without some components: such a model was listed "ready
    offline", could become the default, and failed at the first picture (an empty tokenizer folder: at every one)."""
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "partial")
    for path in (folder / "tokenizer").iterdir():
        path.unlink()
    snapshot = next((tmp_path / "hf-home" / "hub").glob("models--*/snapshots/*"))
    for path in (snapshot / "unet").glob("*.safetensors"):
        path.unlink()
    models = [entry("partial-folder", str(folder)), entry("partial-hub", TINY_REPO), entry("tiny-demo", "builtin:tiny")]
    studio = Studio(dataclasses.replace(hub_settings, models_file=write_registry(tmp_path / "p.yaml", models)))
    weights = {m["id"]: (m["weights"], m["available"]) for m in studio.models()}
    assert weights["partial-folder"] == ("incomplete", False)
    assert weights["partial-hub"] == ("partly cached, Hub offline", False)
    assert studio.default_model == "tiny-demo"
    for model_id, words in (("partial-folder", "the folder's tokenizer: missing"), ("partial-hub", "lacks its unet")):
        with pytest.raises(ModelUnavailableError, match=f"'{model_id}'.*{words}"):
            studio.engine.preload(model_id)


def shards_without_weights(unet):
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
    )
    for path in unet.glob("*.safetensors"):
        path.unlink()


def cut_short(unet):
    for path in unet.glob("*.safetensors"):
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])


INCOMPLETE_UNETS = {
    "an index without its shards": shards_without_weights,
    "empty weights": lambda unet: [path.write_bytes(b"") for path in unet.glob("*.safetensors")],
    "weights cut short": cut_short,  # were listed ready offline and could become the default
    "not weights at all": lambda unet: [
        path.write_bytes(bytes(range(256)) * 64) for path in unet.glob("*.safetensors")
    ],
    "weights without config.json": lambda unet: (unet / "config.json").unlink(),
}


@pytest.mark.parametrize("damage", INCOMPLETE_UNETS)
def test_what_an_interrupted_download_leaves_is_incomplete(tmp_path, tiny_pipeline_dir, damage):
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "partial")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1000\n"
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(pointer)  # a variant never loaded
    assert dreamsketch.pipelines.missing_components(folder) == []
    INCOMPLETE_UNETS[damage](folder / "unet")
    assert dreamsketch.pipelines.missing_components(folder) == ["unet"]


@pytest.mark.parametrize("index", ["[1, 2]", "null", "{not json"])
def test_a_folder_whose_model_index_is_no_object_is_incomplete_not_a_crash(
    settings, tmp_path, tiny_pipeline_dir, index
):
    """A model_index.json of valid JSON that is not an object stopped the app at start (AttributeError)."""
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "odd")
    (folder / "model_index.json").write_text(index)
    models = [entry("odd", str(folder)), entry("tiny-demo", "builtin:tiny")]
    registry = write_registry(tmp_path / "o.yaml", models)
    studio = Studio(dataclasses.replace(settings, models_file=registry, default_model=None))
    assert studio.default_model == "tiny-demo"
    assert studio.engine.model_state(studio.registry.get("odd")) == ("incomplete", False)
    with pytest.raises(
        ModelUnavailableError, match="'odd'.*the folder's model_index.json: missing, empty or cut short"
    ):
        studio.engine.preload("odd")


def test_out_of_memory_and_bugs_while_loading_are_not_called_damaged_files(settings, monkeypatch):
    """Every error of these kinds was reported as "its files do not fit together", with advice to check `source`."""
    failure: Exception = TypeError("a bug: unexpected keyword argument")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fail)
    engine = LocalEngine(settings, load_registry(settings.models_file))
    with pytest.raises(TypeError) as raised:
        engine.preload("tiny-folder")
    assert raised.value is failure
    failure = torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ModelUnavailableError, match=r"^Model 'tiny-folder' does not fit in the GPU's free memory"):
        engine.preload("tiny-folder")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs neither device")
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_that_is_not_there_fails_at_start_naming_the_setting(settings, device):
    with pytest.raises(ValueError, match=f"DREAMSKETCH_DEVICE='{device}': .* finds no"):
        Studio(dataclasses.replace(settings, device=device))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_model_that_loads_pushes_the_old_one_out_before_its_weights_go_onto_the_device(settings, monkeypatch, device):
    """max_loaded=1: two big pipelines may not fit on the device together."""
    engine = LocalEngine(settings, load_registry(settings.models_file))
    engine.preload("tiny-demo")
    engine.cache.device = torch.device(device)
    placed, move = [], StableDiffusionPipeline.to

    def to(pipe, *args, **kwargs):
        if args and args[0] == engine.cache.device:
            placed.append(engine.loaded_ids())
            args = (torch.device("cpu"),)  # no GPU here: the "cuda" pipeline stays on the CPU
        return move(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "to", to)
    engine.preload("tiny-folder")
    assert placed == [[]]
    assert engine.loaded_ids() == ["tiny-folder"]


def test_a_load_that_fails_on_the_device_leaves_no_entry_and_frees_its_pipeline(settings, monkeypatch):
    """Past reading, the old model has made room; a failure there (out of memory placing or fusing the weights)
    leaves the cache empty rather than half-filled, frees the half-placed pipeline at once, says the model does
    not fit (not "lower the size" of a request, nor a traceback in the CLI), and the next try loads."""
    seen = []

    def fail_fast_path(pipe, backend, graphs):
        seen.append(weakref.ref(pipe))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("dreamsketch.pipelines.warm_up", lambda pipe, width, height: None)
    engine = LocalEngine(dataclasses.replace(settings, compile=True), load_registry(settings.models_file))
    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", lambda pipe, backend, graphs: None)
    engine.preload("tiny-demo")
    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", fail_fast_path)
    with pytest.raises(ModelUnavailableError, match="does not fit in the GPU's free memory"):
        engine.preload("tiny-folder")
    assert engine.loaded_ids() == []
    assert len(seen) == 1 and seen[0]() is None, "freed while the error is still held (by the engine, the caller)"
    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", lambda pipe, backend, graphs: None)
    assert generate(engine, "tiny-folder").shape == (128, 128, 3)
    assert engine.loaded_ids() == ["tiny-folder"]


def test_a_warm_up_out_of_gpu_memory_leaves_the_model_loaded_for_smaller_requests(settings, monkeypatch, caplog):
    """The warm-up runs the native size: a GPU without the memory for it failed the whole load, and every request,
    at any size, loaded the model again and failed again."""

    def fail_warm_up(pipe, width, height):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("dreamsketch.pipelines.warm_up", fail_warm_up)
    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", lambda pipe, backend, graphs: None)
    engine = LocalEngine(settings, load_registry(settings.models_file))
    engine.cache.graphs = True  # as on CUDA
    engine.preload("tiny-demo")
    assert engine.loaded_ids() == ["tiny-demo"]
    assert "warming tiny-demo up at 128x128 ran out of GPU memory; it loads without" in caplog.text
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


def test_models_say_where_their_weights_stand(hub_settings, tmp_path, monkeypatch):
    """A missing local folder was shown as "needs download" (the browser) or "not cached" (the CLI)."""
    models = [
        entry("uncached-hub", "nobody-here/not-cached"),
        entry("cached-hub", TINY_REPO),
        entry("tiny-demo", "builtin:tiny"),
        entry("gone-folder", str(tmp_path / "no-such-folder")),
    ]
    registry = write_registry(tmp_path / "all.yaml", models)
    studio = Studio(dataclasses.replace(hub_settings, models_file=registry))
    assert {m["id"]: m["weights"] for m in studio.models()} == {
        "uncached-hub": "not cached, Hub offline",
        "cached-hub": "ready offline",
        "tiny-demo": "ready offline",
        "gone-folder": "missing",
    }
    assert all(m["available"] == is_available(studio.registry.get(m["id"])) for m in studio.models())
    monkeypatch.setattr(dreamsketch.pipelines, "hub_reachable", lambda: True)
    assert {m["id"]: m["weights"] for m in studio.models()}["uncached-hub"] == "needs download"


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
    builtin = write_registry(tmp_path / "builtin.yaml", [entry("uncached-hub", "a/b"), entry("m2", "builtin:tiny")])
    assert choose_default_model(hub_settings, load_registry(builtin)) == "m2"  # a built-in model of another name


def test_a_registry_with_no_usable_model_still_starts_and_says_why(settings, tmp_path, caplog):
    """It refused to start at all, so `models` could not even show what was wrong."""
    models = [entry("uncached-hub", "nobody-here/not-cached"), entry("gone", str(tmp_path / "gone"))]
    studio = Studio(
        dataclasses.replace(settings, models_file=write_registry(tmp_path / "none.yaml", models), default_model=None)
    )
    assert studio.default_model == "uncached-hub"
    assert "no model in" in caplog.text and "is usable now" in caplog.text
    assert {m["id"]: m["weights"] for m in studio.models()} == {
        "uncached-hub": "not cached, Hub offline",
        "gone": "missing",
    }
    with pytest.raises(ModelUnavailableError, match="'uncached-hub'.*tiny-demo"):
        studio.generate(studio.parse({"prompt": "x"}, "txt2img"))


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


def test_fp16_on_the_cpu_loads_without_diffusers_saying_it_will_fail(settings):
    """DREAMSKETCH_DTYPE=fp16 on the CPU works, and diffusers printed three times per load that it would fail."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        engine = LocalEngine(dataclasses.replace(settings, dtype="fp16"), load_registry(settings.models_file))
        assert generate(engine, "tiny-demo").std() > 0
    finally:
        logger.removeHandler(handler)
    assert engine.cache.get("tiny-demo").txt2img.unet.dtype == torch.float16
    assert not [message for message in said if "cannot run with `cpu` device" in message]


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
