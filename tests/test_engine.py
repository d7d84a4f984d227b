import dataclasses
import io
import threading
import weakref

import diffusers
import numpy as np
import pytest
import scipy.integrate
import torch
from PIL import Image

import dreamsketch.pipelines
import dreamsketch.schedulers
from dreamsketch.engine import (
    GenerationCancelled,
    GenerationError,
    LocalEngine,
    OneStepAhead,
    latent_preview,
    to_pictures,
)
from dreamsketch.registry import load_registry
from dreamsketch.request import parse_request
from dreamsketch.schedulers import SCHEDULERS, make_scheduler, noise_copied_without_waiting

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def engine(settings):
    return LocalEngine(settings, load_registry(settings.models_file))


def request(engine, mode="txt2img", **fields):
    fields = {"prompt": "a red fox", "seed": 7, "steps": 3, **fields}
    return parse_request(fields, engine.cache.registry, mode, "tiny-demo")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def plain_diffusers_picture(engine, scheduler, steps):
    """tiny-demo's picture of the engine's default request (seed 7) from plain diffusers, with its own scheduler."""
    model = engine.cache.get("tiny-demo")
    plain = model.txt2img.__class__(**model.txt2img.components)
    plain.scheduler = make_scheduler(scheduler, model.default_scheduler.config)
    return plain("a red fox", num_inference_steps=steps, generator=torch.Generator().manual_seed(7)).images[0]


def test_same_seed_same_image_other_seed_other_image(engine):
    first = engine.generate(request(engine))
    again = engine.generate(request(engine))
    other = engine.generate(request(engine, seed=8))
    assert first.images[0].size == (128, 128) and first.seeds == [7]
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_random_seed_is_reported_and_reproduces(engine):
    drawn = engine.generate(request(engine, seed=-1))
    assert drawn.request.seed == drawn.seeds[0] != -1
    replay = engine.generate(request(engine, seed=drawn.seeds[0]))
    assert np.array_equal(pixels(drawn.images[0]), pixels(replay.images[0]))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(engine, name):
    generation = engine.generate(request(engine, scheduler=name, steps=2))
    assert generation.scheduler == name and len(generation.images) == 1
    assert type(engine.cache.get("tiny-demo").txt2img.scheduler).__name__ == SCHEDULERS[name][0]


def test_schedulers_are_built_once_per_model_and_copied_fresh_for_each_request(engine, monkeypatch):
    built = []
    original = dreamsketch.pipelines.make_scheduler
    monkeypatch.setattr("dreamsketch.pipelines.make_scheduler", lambda *args: built.append(args[0]) or original(*args))
    first, again = (engine.generate(request(engine, scheduler="DPM++ 2M")) for _ in range(2))
    assert built == ["DPM++ 2M"]
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    model = engine.cache.get("tiny-demo")
    assert model.txt2img.scheduler is not model.scheduler_prototypes["DPM++ 2M"]
    expected = plain_diffusers_picture(engine, "DPM++ 2M", steps=3)
    assert np.abs(pixels(expected) - pixels(first.images[0])).max() <= 1


def test_sde_scheduler_pictures_follow_the_seed(engine):
    """DPM++ SDE takes its noise from its own Brownian trees, not from the generators: they are seeded per image."""
    single = [engine.generate(request(engine, scheduler="DPM++ SDE Karras", seed=seed)) for seed in (7, 8, 7)]
    batch = engine.generate(request(engine, scheduler="DPM++ SDE Karras", seed=7, batch_size=2))
    assert np.array_equal(pixels(single[0].images[0]), pixels(single[2].images[0]))
    assert not np.array_equal(pixels(single[0].images[0]), pixels(single[1].images[0]))
    for image, alone in zip(batch.images, single[:2], strict=True):
        assert np.abs(pixels(image) - pixels(alone.images[0])).max() <= 2


def test_lms_coefficients_are_integrated_once_and_give_diffusers_own_pictures(engine, monkeypatch):
    integrations = []
    quad = scipy.integrate.quad
    monkeypatch.setattr(
        scipy.integrate, "quad", lambda *args, **kwargs: integrations.append(1) or quad(*args, **kwargs)
    )
    engine.generate(request(engine, scheduler="LMS", steps=6, seed=1))
    integrations.clear()
    again = engine.generate(request(engine, scheduler="LMS", steps=6))
    assert integrations == []
    expected = plain_diffusers_picture(engine, "LMS", steps=6)
    assert len(integrations) == 18  # 1 + 2 + 3 + 4 + 4 + 4: diffusers integrates at every step
    assert np.array_equal(pixels(expected), pixels(again.images[0]))


def test_euler_a_draws_each_steps_noise_through_the_copy_without_waiting_and_gives_diffusers_own_pictures(
    engine, monkeypatch
):
    from diffusers.schedulers import scheduling_euler_ancestral_discrete
    from diffusers.utils.torch_utils import randn_tensor

    drawn = []

    def counted(*args, **kwargs):
        drawn.append(kwargs["generator"])
        return noise_copied_without_waiting(*args, **kwargs)

    monkeypatch.setattr(dreamsketch.schedulers, "noise_copied_without_waiting", counted)
    generation = engine.generate(request(engine, scheduler="Euler a", steps=4))
    assert len(drawn) == 4 and all(generator is not None for generator in drawn)
    assert scheduling_euler_ancestral_discrete.randn_tensor is randn_tensor  # plain diffusers stays plain
    expected = plain_diffusers_picture(engine, "Euler a", steps=4)
    assert np.array_equal(pixels(expected), pixels(generation.images[0]))


@pytest.mark.parametrize("name", ["PNDM", "DDIM"])
def test_pndm_and_ddim_steps_get_their_timestep_as_a_number_and_give_diffusers_own_pictures(engine, monkeypatch, name):
    """Their steps index the noise schedule with the timestep on the host: a device tensor made each step wait."""
    scheduler_class = getattr(diffusers, SCHEDULERS[name][0])
    step, timesteps = scheduler_class.step, []

    def recorded_step(self, model_output, timestep, *args, **kwargs):
        timesteps.append(timestep)
        return step(self, model_output, timestep, *args, **kwargs)

    monkeypatch.setattr(scheduler_class, "step", recorded_step)
    expected = plain_diffusers_picture(engine, name, steps=4)
    timesteps.clear()
    generation = engine.generate(request(engine, scheduler=name, steps=4))
    assert np.array_equal(pixels(expected), pixels(generation.images[0]))
    source = png(Image.new("RGB", (128, 128), (200, 40, 40)))
    engine.generate(request(engine, "img2img", image=source, strength=0.5, scheduler=name, steps=4))
    assert len(timesteps) == {"PNDM": 5 + 3, "DDIM": 4 + 2}[name]  # PNDM takes one step more than asked
    assert all(type(t) is int for t in timesteps)


def test_the_host_waits_for_the_step_before_the_one_it_queued(monkeypatch):
    log = []

    class RecordedEvent:
        def __init__(self):
            self.number = 1 + sum(what == "record" for what, _ in log)

        def record(self):
            log.append(("record", self.number))

        def synchronize(self):
            log.append(("wait", self.number))

    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    pace = OneStepAhead(torch.device("cuda"))
    for _ in range(3):
        pace.step_queued()
    assert log == [("record", 1), ("record", 2), ("wait", 1), ("record", 3), ("wait", 2)]
    OneStepAhead(torch.device("cpu")).step_queued()
    assert len(log) == 5  # nothing to wait for on the CPU


@cuda
def test_cuda_steps_are_reported_when_the_device_has_done_the_step_before(settings):
    engine = LocalEngine(dataclasses.replace(settings, device="cuda"), load_registry(settings.models_file))
    unet = engine.cache.get("tiny-demo").txt2img.unet
    forward, finished = unet.forward, []

    def slow_forward(*args, **kwargs):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds: far longer than the host needs to queue a step
        output = forward(*args, **kwargs)
        finished.append(torch.cuda.Event())
        finished[-1].record()
        return output

    unet.forward = slow_forward
    done_before = []
    engine.generate(  # Euler: no step of it waits for the device by itself (DDIM's read a timestep to the host)
        request(engine, scheduler="Euler", steps=5),
        on_step=lambda step: done_before.append([event.query() for event in finished[: step.step - 1]]),
    )
    assert [len(done) for done in done_before] == [0, 1, 2, 3, 4]
    assert all(all(done) for done in done_before)


@cuda
@pytest.mark.parametrize("name", [name for name in SCHEDULERS if name != "UniPC"])
def test_cuda_steps_after_the_first_never_make_the_host_wait_for_the_device(settings, name):
    """Only the engine's pacing may wait for the device. UniPC copies sigmas to the device and solves for its
    coefficients there at every step: it still waits (not fixed)."""
    engine = LocalEngine(dataclasses.replace(settings, device="cuda"), load_registry(settings.models_file))

    def watch(step):  # after the last step the engine reads the pictures back, which is meant to wait
        torch.cuda.set_sync_debug_mode("error" if step.step < step.total else "default")

    try:
        engine.generate(request(engine, scheduler=name, steps=4), on_step=watch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_noise_is_diffusers_own_and_copied_while_the_device_is_busy():
    from diffusers.utils.torch_utils import randn_tensor

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    def noise():
        return noise_copied_without_waiting(
            (2, 4, 64, 64), generator=generators(), device=torch.device("cuda"), dtype=torch.float16
        )

    noise()  # the first call sets up CUDA and torch's pinned memory cache
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the device is busy for a tenth of a second or more
    copied = noise()
    assert not torch.cuda.current_stream().query()  # the host did not wait for the device
    expected = randn_tensor((2, 4, 64, 64), generator=generators(), device=torch.device("cpu"), dtype=torch.float16)
    assert copied.device.type == "cuda" and torch.equal(copied.cpu(), expected)


def test_default_scheduler_is_the_models_own(engine):
    assert engine.generate(request(engine)).scheduler == "Euler a"


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_default_scheduler_stays_the_models_own_after_another_was_used(engine, mode):
    image = {"image": png(Image.new("RGB", (64, 64)))} if mode == "img2img" else {}
    engine.generate(request(engine, mode, scheduler="PNDM", **image))
    # Found by the API fuzz: "Default" became a PNDM without its skip_prk_steps, which fails at 2 steps (a 500).
    generation = engine.generate(request(engine, mode, steps=2, **image))
    assert generation.scheduler == "Euler a"


def test_batch_images_have_consecutive_seeds_and_match_single_runs(engine):
    batch = engine.generate(request(engine, batch_size=3, scheduler="DDIM"))
    assert batch.seeds == [7, 8, 9] and len(batch.images) == 3
    single = engine.generate(request(engine, seed=8, scheduler="DDIM"))
    assert np.abs(pixels(batch.images[1]) - pixels(single.images[0])).max() <= 2


def test_img2img_pictures_are_diffusers_own_from_the_image_at_the_request_size(engine):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    fields = {"image": png(photo), "strength": 0.7, "batch_size": 2, "scheduler": "DDIM"}
    batch = engine.generate(request(engine, "img2img", **fields))
    plain = engine.cache.get("tiny-demo").img2img(
        prompt="a red fox",
        image=photo.resize((128, 128), Image.Resampling.LANCZOS),
        strength=0.7,
        num_inference_steps=3,
        guidance_scale=batch.request.guidance_scale,
        generator=torch.Generator().manual_seed(8),
    )
    assert np.abs(pixels(batch.images[1]) - pixels(plain.images[0])).max() <= 2


def test_progress_reports_every_step_with_a_preview(engine):
    steps = []
    engine.generate(request(engine, steps=5), on_step=lambda s: steps.append((s.step, s.total, s.preview().size)))
    assert steps == [(i, 5, (16, 16)) for i in range(1, 6)]


@pytest.mark.parametrize("scheduler", ["Heun", "DPM++ SDE Karras", "PNDM"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_progress_counts_the_requests_steps_whatever_the_unet_evaluations(engine, scheduler, mode):
    """Heun with Steps 8 counted to 15 (two UNet evaluations a step but the last), PNDM to 9."""
    fields = {"image": png(Image.new("RGB", (96, 96), "red")), "strength": 0.5} if mode == "img2img" else {}
    steps = []
    engine.generate(request(engine, mode, steps=8, scheduler=scheduler, **fields), on_step=steps.append)
    total = 8 if mode == "txt2img" else 4
    assert {s.total for s in steps} == {total} and len(steps) > total  # each evaluation reports
    counted = [s.step for s in steps]
    assert counted == sorted(counted) and set(range(1, total + 1)) <= set(counted) <= set(range(total + 1))
    assert counted[-2] < counted[-1] == total  # all done only when the last evaluation is


def test_img2img_strength_sets_the_steps(engine):
    source = png(Image.new("RGB", (96, 96), (200, 40, 40)))
    outputs = []
    for strength in (0.3, 1.0):
        steps = []
        fields = {"image": source, "strength": strength, "steps": 10, "scheduler": "DDIM"}
        result = engine.generate(request(engine, "img2img", **fields), on_step=steps.append)
        assert [s.step for s in steps] == list(range(1, int(10 * strength) + 1))
        assert result.images[0].size == (128, 128) and result.request.strength == strength
        outputs.append(pixels(result.images[0]))
    assert not np.array_equal(*outputs)


def test_img2img_shares_the_txt2img_weights(engine):
    engine.generate(request(engine))
    model = engine.cache.get("tiny-demo")
    for name in ("unet", "vae", "text_encoder"):
        first, second = getattr(model.txt2img, name), getattr(model.img2img, name)
        assert first is second
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_least_recently_used_model_is_evicted(settings):
    engine = LocalEngine(dataclasses.replace(settings, max_loaded=2), load_registry(settings.models_file))
    engine.preload("tiny-demo")
    engine.preload("tiny-folder")
    engine.cache.get("tiny-demo")  # now the most recently used
    assert engine.loaded_ids() == ["tiny-folder", "tiny-demo"]
    engine.generate(request(engine, model_id="tiny-folder"))
    assert engine.loaded_ids() == ["tiny-demo", "tiny-folder"]
    single = LocalEngine(settings, load_registry(settings.models_file))
    single.preload("tiny-demo")
    single.preload("tiny-folder")
    assert single.loaded_ids() == ["tiny-folder"]


def test_cancel_stops_within_a_step_and_leaves_the_pipeline_usable(engine):
    cancel = threading.Event()
    seen = []

    def on_step(step):
        seen.append(step.step)
        if step.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(request(engine, steps=20), on_step, cancel)
    assert seen == [1, 2]
    assert len(engine.generate(request(engine)).images) == 1
    with pytest.raises(GenerationCancelled):
        engine.generate(request(engine), cancel=cancel)  # cancelled before it started


def test_long_prompt_is_reported_not_silently_dropped(engine):
    # The tiny tokenizer reads one token per character: 75 fit between the start and end markers.
    prompt = "a" * 75 + "XYZ tail"
    generation = engine.generate(request(engine, prompt=prompt, negative_prompt="short"))
    expected = "prompt is 82 tokens; the text encoder reads 75, so this part is ignored: 'XYZ tail'"
    assert generation.warnings == [expected]  # the words as written (CLIP's tokens are lower-cased)
    assert engine.generate(request(engine, prompt="a" * 75)).warnings == []
    # An emoji is 4 byte tokens and the first fox is read only in part: the quote starts at a whole character.
    (warning,) = engine.generate(request(engine, prompt="a" * 74 + "🦊🦊 tail")).warnings
    assert warning == "prompt is 86 tokens; the text encoder reads 75, so this part is ignored: '🦊🦊 tail'"


def test_half_precision_vae_nan_is_decoded_again_in_fp32(settings):
    engine = LocalEngine(dataclasses.replace(settings, dtype="bf16"), load_registry(settings.models_file))
    vae = engine.cache.get("tiny-demo").txt2img.vae
    decode = vae.decode
    dtypes = []

    def nan_in_half_precision(latents, **kwargs):
        dtypes.append(vae.dtype)
        sample = decode(latents, **kwargs)[0]
        if vae.dtype != torch.float32:
            sample = torch.full_like(sample, float("nan"))
        return (sample,)

    vae.decode = nan_in_half_precision
    image = engine.generate(request(engine)).images[0]
    assert dtypes == [torch.bfloat16, torch.float32] and vae.dtype == torch.bfloat16
    assert pixels(image).std() > 0


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # CUDA's and its libraries' own allocation failures, which torch raises as other errors
        torch.AcceleratorError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    ],
    ids=["allocator", "cuda", "cublas", "cudnn9"],
)
def test_out_of_memory_asks_for_smaller_work_and_the_next_request_runs(engine, error):
    unet = engine.cache.get("tiny-demo").txt2img.unet
    forward = unet.forward
    unet.forward = lambda *a, **k: (_ for _ in ()).throw(error)
    with pytest.raises(GenerationError, match="lower the size or the batch size"):
        engine.generate(request(engine, batch_size=2))
    unet.forward = forward
    assert len(engine.generate(request(engine)).images) == 1


def test_other_errors_that_name_memory_are_not_taken_for_out_of_memory(engine):
    unet = engine.cache.get("tiny-demo").txt2img.unet
    failure = GenerationError("the remote worker ran out of memory")  # ours, not torch's
    unet.forward = lambda *a, **k: (_ for _ in ()).throw(failure)
    with pytest.raises(GenerationError) as raised:
        engine.generate(request(engine))
    assert raised.value is failure


def test_out_of_memory_is_handled_once_the_failed_call_has_let_go_of_its_tensors(engine, monkeypatch):
    """Memory was released, and merged requests ran again, while the error still held the failed call's frames
    and with them its activations: gigabytes on a GPU, so the retries ran out of memory again."""
    unet = engine.cache.get("tiny-demo").txt2img.unet
    forward, activations, alive_when_freeing = unet.forward, [], []

    def fail_once(*args, **kwargs):
        unet.forward = forward
        activation = torch.ones(4)
        activations.append(weakref.ref(activation))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    release = engine.cache.free_memory
    monkeypatch.setattr(
        engine.cache, "free_memory", lambda: alive_when_freeing.append(activations[0]() is not None) or release()
    )
    unet.forward = fail_once
    with pytest.raises(GenerationError, match=r"^Out of GPU memory at 128x128: lower the size\.$"):
        engine.generate(request(engine))
    assert alive_when_freeing == [False]


def test_a_batch_whose_decoding_runs_out_of_memory_is_decoded_one_picture_at_a_time(engine):
    """Decoding a batch at once takes much memory (8 SDXL pictures at 1024x1024: about 33 GB in fp32): the denoised
    batch is not thrown away and denoised again when decoding it all at once does not fit."""
    vae = engine.cache.get("tiny-demo").txt2img.vae
    decode, decoded, activations = vae.decode, [], []

    def one_picture_only(latents, **kwargs):
        alive = [activation() is not None for activation in activations]
        decoded.append((len(latents), alive))
        if len(latents) > 1:
            activation = torch.ones(4)  # the failed call's tensors, held by the error's frames
            activations.append(weakref.ref(activation))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return decode(latents, **kwargs)

    together = engine.generate(request(engine, batch_size=3))
    vae.decode = one_picture_only
    apart = engine.generate(request(engine, batch_size=3))
    assert decoded == [(3, []), (1, [False]), (1, [False]), (1, [False])]  # let go of before the first retry
    for made, expected in zip(apart.images, together.images, strict=True):
        assert np.abs(pixels(made) - pixels(expected)).max() <= 1


def test_a_single_picture_whose_decoding_runs_out_of_memory_asks_for_smaller_work(settings):
    """Also when the fp32 VAE, after the failed decode, ran out of memory converting back to half precision: it was
    left half converted, and every later request failed on mixed dtypes."""
    engine = LocalEngine(dataclasses.replace(settings, dtype="bf16"), load_registry(settings.models_file))
    vae = engine.cache.get("tiny-demo").txt2img.vae
    decode, to, decoded = vae.decode, vae.to, []

    def nan_then_out_of_memory(latents, **kwargs):
        decoded.append(vae.dtype)
        if vae.dtype == torch.float32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return (torch.full_like(decode(latents, **kwargs)[0], float("nan")),)

    def half_converted_once(dtype):  # converting back, while the failed decode's tensors are still held
        vae.to = to
        vae.decoder.to(dtype)  # the encoder stays in fp32
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    vae.decode = nan_then_out_of_memory
    vae.to = lambda dtype: half_converted_once(dtype) if dtype == torch.bfloat16 else to(dtype)
    with pytest.raises(GenerationError, match=r"^Out of GPU memory at 128x128: lower the size\.$"):
        engine.generate(request(engine))
    assert decoded == [torch.bfloat16, torch.float32]
    assert {parameter.dtype for parameter in vae.parameters()} == {torch.bfloat16}


def test_requests_merged_into_a_batch_too_big_for_the_device_run_again_alone(engine):
    """Out of memory failed every request merged into the batch, each told to lower a batch size it never chose."""
    unet = engine.cache.get("tiny-demo").txt2img.unet
    forward = unet.forward

    def small_batches_only(sample, *args, **kwargs):
        if sample.shape[0] > 2:  # CFG doubles the batch: more than one image
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return forward(sample, *args, **kwargs)

    requests = [request(engine, seed=1), request(engine, seed=2), request(engine, seed=3, batch_size=2)]
    unet.forward = small_batches_only
    try:
        results, calls, _ = run_concurrently(engine, requests)
    finally:
        unet.forward = forward
    assert calls == [4, 1, 1, 2]
    assert [len(results[i].images) for i in range(2)] == [1, 1]
    assert isinstance(results[2], GenerationError)
    assert str(results[2]) == "Out of GPU memory at 128x128, batch size 2: lower the size or the batch size."
    alone = engine.generate(requests[0])
    assert np.abs(pixels(results[0].images[0]) - pixels(alone.images[0])).max() <= 2


def test_latent_preview_uses_the_family_matrix():
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 0] = 1.0
    preview = np.asarray(latent_preview(latents, "sd15"))
    assert preview.shape == (2, 2, 3)
    assert tuple(preview[0, 0]) == tuple(round((v + 1) * 127.5) for v in (0.298, 0.207, 0.208))
    assert tuple(np.asarray(latent_preview(-9 * latents, "sdxl"))[0, 0]) == (0, 0, 0)


def start_while_busy(engine, threads):
    """Start the threads while the device is held, so that all their requests wait; then let them run, and join."""
    with engine.lock:
        for thread in threads:
            thread.start()
        while len(engine._waiting) < len(threads):
            threading.Event().wait(0.01)
    for thread in threads:
        thread.join(120)


def run_concurrently(engine, requests):
    """Start the requests while the device is held, so they queue up and can be merged."""
    results: dict[int, object] = {}
    calls = []
    pipe = engine.cache.get(requests[0].model_id).txt2img
    original = pipe.__class__.__call__

    def counting_call(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    def run(index, request):
        try:
            results[index] = engine.generate(request, on_step=lambda s, i=index: steps[i].append(s.latents.shape[0]))
        except Exception as exc:
            results[index] = exc

    steps = {i: [] for i in range(len(requests))}
    pipe.__class__.__call__ = counting_call
    try:
        start_while_busy(engine, [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(requests)])
    finally:
        pipe.__class__.__call__ = original
    return results, calls, steps


def test_concurrent_requests_run_as_one_batch_and_each_gets_its_own_images(engine):
    requests = [request(engine, seed=10 * i, batch_size=1 + (i == 2), scheduler="DDIM") for i in range(4)]
    results, calls, steps = run_concurrently(engine, requests)
    assert calls == [5]
    for i, r in enumerate(requests):
        generation = results[i]
        assert generation.seeds == r.image_seeds() and len(generation.images) == r.batch_size
        assert steps[i] == [r.batch_size] * 3
        alone = engine.generate(r)
        for merged, single in zip(generation.images, alone.images, strict=True):
            assert np.abs(pixels(merged) - pixels(single)).max() <= 2


def test_only_compatible_requests_are_merged(engine):
    requests = [request(engine, seed=1), request(engine, seed=2, steps=4), request(engine, seed=3, width=64)]
    requests.append(request(engine, seed=4, batch_size=8))
    results, calls, _ = run_concurrently(engine, requests)
    assert sorted(calls) == [1, 1, 1, 8]
    assert all(len(results[i].images) == r.batch_size for i, r in enumerate(requests))


def test_waiting_requests_take_the_device_in_the_order_they_came(engine):
    """Each waiting thread used to grab the device when it could: a request could wait behind dozens sent after it."""
    ran: list[int] = []
    pipe_class = type(engine.cache.get("tiny-demo").txt2img)
    original = pipe_class.__call__
    requests = [request(engine, seed=seed, steps=1 + seed % 3, width=64 + 8 * seed) for seed in range(8)]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in requests]  # no two can share a batch
    pipe_class.__call__ = lambda self, **kwargs: ran.append(kwargs["width"]) or original(self, **kwargs)
    try:
        with engine.lock:
            for count, thread in enumerate(threads, start=1):
                thread.start()
                while len(engine._waiting) < count:
                    threading.Event().wait(0.005)
        for thread in threads:
            thread.join(120)
    finally:
        pipe_class.__call__ = original
    assert ran == [r.width for r in requests]


def test_a_batch_that_fails_outside_the_pipeline_leaves_no_request_waiting(engine):
    """Requests taken from the waiting list into a batch that failed before it ran (here a start callback that
    raises) were in no list any more, and waited forever, cancel or not."""
    outcomes: dict[int, object] = {}

    def on_start(index):
        if index == 1:
            raise RuntimeError("broken callback")

    def run(index):
        try:
            outcomes[index] = engine.generate(request(engine, seed=index), on_start=lambda: on_start(index))
        except RuntimeError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    start_while_busy(engine, threads)
    assert not any(thread.is_alive() for thread in threads)
    assert all(isinstance(outcomes[index], RuntimeError) for index in range(3)) and engine._waiting == []
    assert len(engine.generate(request(engine)).images) == 1


def test_a_cancelled_request_leaves_its_batch_running(engine):
    cancel = threading.Event()
    requests = [request(engine, seed=1, steps=6), request(engine, seed=2, steps=6)]
    outcomes = {}

    def run(index, on_step=None, cancel=None):
        try:
            outcomes[index] = engine.generate(requests[index], on_step, cancel)
        except GenerationCancelled as exc:
            outcomes[index] = exc

    def cancel_at_two(step):
        if step.step == 2:
            cancel.set()

    threads = [threading.Thread(target=run, args=(0, cancel_at_two, cancel)), threading.Thread(target=run, args=(1,))]
    start_while_busy(engine, threads)
    assert isinstance(outcomes[0], GenerationCancelled)
    assert len(outcomes[1].images) == 1


def test_a_request_cancelled_while_waiting_leaves_at_once_not_when_the_running_batch_ends(engine):
    cancel, outcome = threading.Event(), []

    def wait():
        try:
            engine.generate(request(engine), cancel=cancel)
        except GenerationCancelled as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=wait)
    with engine.lock:  # a batch runs meanwhile
        waiting.start()
        while not engine._waiting:
            threading.Event().wait(0.01)
        cancel.set()
        waiting.join(30)
        assert outcome and engine._waiting == []
    assert not waiting.is_alive()


def test_the_empty_float32_warning_of_diffusers_is_dropped_and_other_warnings_pass():
    import logging

    from dreamsketch.tiny import build_tiny_pipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    source = logging.getLogger("diffusers.models.modeling_utils")
    logging.getLogger("diffusers").addHandler(handler)
    try:
        build_tiny_pipeline().unet.to(torch.float16)
        source.warning("another warning")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [record.getMessage() for record in records] == ["another warning"]


def test_a_request_that_finds_nobody_waiting_gives_others_a_moment_to_join(engine, monkeypatch):
    from types import SimpleNamespace

    from dreamsketch.engine import BATCH_WINDOW_S

    pipe_class = type(engine.cache.get("tiny-demo").txt2img)
    original, calls, followers = pipe_class.__call__, [], []
    counted = lambda self, **kwargs: calls.append(len(kwargs["prompt"])) or original(self, **kwargs)  # noqa: E731
    monkeypatch.setattr(pipe_class, "__call__", counted)

    def window(seconds):  # the others arrive while the first request waits for company
        assert seconds == BATCH_WINDOW_S
        followers.extend(threading.Thread(target=engine.generate, args=(request(engine, seed=s),)) for s in (2, 3))
        for thread in followers:
            thread.start()
        while len(engine._waiting) < 3:
            threading.Event().wait(0.01)

    monkeypatch.setattr("dreamsketch.engine.time", SimpleNamespace(sleep=window))
    first = engine.generate(request(engine, seed=1))
    for thread in followers:
        thread.join(60)
    assert calls == [3] and first.seeds == [1]


def test_pictures_are_rounded_as_diffusers_rounds_them():
    from diffusers.image_processor import VaeImageProcessor

    decoded = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some clamped
    decoded[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # 0.0 is 127.5 levels: a tie, rounded to even
    for dtype in (torch.float32, torch.float16):  # the VAE decodes in fp16 on a GPU
        pictures = to_pictures(decoded.to(dtype))
        expected = VaeImageProcessor().postprocess(decoded.to(dtype).float(), output_type="pil")
        assert [picture.mode for picture in pictures] == ["RGB", "RGB"]
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(pictures, expected, strict=True))
