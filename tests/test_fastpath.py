"""The fast path gives the plain path's pictures. On the CPU torch.compile traces with aot_eager (inductor's CPU
code generation takes minutes on two cores); on CUDA the same graphs go to inductor and are replayed as CUDA
graphs (the CUDA tests run on a GPU machine; see benchmarks/README.md)."""

import contextlib
import dataclasses
import io
import logging
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_unflatten

import dreamsketch.fastpath
from benchmarks.gpu_pipeline import unet_inputs
from dreamsketch.engine import LocalEngine
from dreamsketch.fastpath import (
    REGIONS,
    CompiledInBackground,
    CudaGraphs,
    apply_fast_path,
    compile_regions,
    compiled_twin,
    graph_wrappers,
    graphed_models,
    replay_as_graphs,
    signature,
    wait_for_compilation,
)
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import load_registry
from dreamsketch.request import parse_request
from dreamsketch.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline


def test_fast_path_output_equals_the_plain_path():
    plain, fast = build_tiny_pipeline(), apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    unet = fast.unet
    regions = [module for module in unet.modules() if type(module).__name__ in REGIONS]
    assert {type(module).__name__ for module in regions} == set(REGIONS)
    assert all(module._compiled_call_impl is not None for module in regions)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.decoder.conv_in.weight.is_contiguous()  # the VAE, eager, is faster in torch's default format
    assert any(hasattr(module, "to_qkv") for module in unet.modules())  # fused QKV projections
    kwargs = dict(prompt="a red fox", num_inference_steps=4, height=128, width=128, output_type="np")
    for seed in (1, 2):
        a = plain(**kwargs, generator=torch.Generator().manual_seed(seed)).images
        b = fast(**kwargs, generator=torch.Generator().manual_seed(seed)).images
        assert np.abs(a - b).max() < 1e-4


def test_each_block_configuration_is_analysed_once():
    """With the blocks' floats symbolic, dynamo's first analysis of each block class failed and started again."""
    aot_eager, analysed = lookup_backend("aot_eager"), []

    def counted(graph, example_inputs):
        analysed.append(graph)
        return aot_eager(graph, example_inputs)

    pipe = build_tiny_pipeline()
    compile_regions(pipe.unet, backend=counted)
    counters.clear()
    pipe(prompt="a red fox", num_inference_steps=1, height=128, width=128, output_type="latent")
    assert len(analysed) == counters["stats"]["unique_graphs"] > 0


def test_pictures_that_are_not_square_compile_nothing_new():
    """With torch's duck shaping, height and width shared a symbol in the first graph of each block class."""
    torch._dynamo.reset()  # graphs of earlier tests would serve the first picture
    fast = apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    compiled = []
    for height, width in ((128, 128), (128, 192), (192, 128)):
        counters.clear()
        fast(prompt="a red fox", num_inference_steps=1, height=height, width=width, output_type="latent")
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled[0] > 0 and compiled[1:] == [0, 0]


def test_a_unet_batch_of_one_compiles_nothing_new_and_gives_the_plain_picture():
    """Without CFG (guidance 1 or less) the UNet sees one latent, and dynamo specialises sizes of 1."""
    torch._dynamo.reset()
    plain, fast = build_tiny_pipeline(), apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    kwargs = dict(prompt="a red fox", num_inference_steps=2, height=128, width=128, output_type="np")
    fast(**kwargs, guidance_scale=7.5)  # compiles for the CFG batch of 2
    counters.clear()
    a = plain(**kwargs, guidance_scale=1.0, generator=torch.Generator().manual_seed(1)).images
    b = fast(**kwargs, guidance_scale=1.0, generator=torch.Generator().manual_seed(1)).images
    assert counters["stats"]["unique_graphs"] == 0
    assert a.shape == b.shape == (1, 128, 128, 3) and np.abs(a - b).max() < 1e-4
    args, unet_kwargs = unet_inputs(fast.unet, 1, 16, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert fast.unet(*args, **unet_kwargs).sample.shape == (1, 4, 16, 16)  # UNet2DConditionOutput too


def test_a_side_of_one_at_the_deepest_level_compiles_nothing_new_and_gives_the_plain_output():
    """SD 1.5 at 64 pixels leaves its deepest level 1 latent wide; tiny-demo's UNet halves once, so a latent side of
    2 does the same, and dynamo specialises sizes of 1."""
    torch._dynamo.reset()
    plain, fast = build_tiny_pipeline(), apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        args, kwargs = unet_inputs(fast.unet, 2, 16, cpu, torch.float32)
        fast.unet(*args, **kwargs)  # compiles
        counters.clear()
        for height, width in ((2, 16), (16, 2), (3, 16)):
            args, kwargs = unet_inputs(fast.unet, 2, height, cpu, torch.float32, latent_width=width)
            expected = plain.unet(*args, **kwargs).sample
            assert (fast.unet(*args, **kwargs).sample - expected).abs().max() < 1e-5
    assert counters["stats"]["unique_graphs"] == 0


def test_fast_path_compiles_new_shapes_in_any_thread():
    """A server compiles in whichever thread brings a new shape, and torch 2.13 keeps dynamo's settings per thread.
    On the CPU a batch of 16 picks another convolution backend: every resnet configuration of tiny-demo compiles
    again, past dynamo's default limit of 8 compilations per function."""
    plain, fast = build_tiny_pipeline(), apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    kwargs = dict(prompt="a red fox", num_inference_steps=2, height=128, width=128, output_type="np")
    fast(**kwargs)  # compiled here for the CFG batch of 2
    batch = {**kwargs, "prompt": ["a red fox"] * 8}  # CFG batch 16
    results = {}

    def generate() -> None:
        results["fast"] = fast(**batch, generator=torch.Generator().manual_seed(1)).images

    thread = threading.Thread(target=generate)
    thread.start()
    thread.join()
    expected = plain(**batch, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(expected - results["fast"]).max() < 1e-4


def test_compile_setting_applies_the_fast_path_and_warms_up_at_load(settings, monkeypatch):
    calls = []
    original = dreamsketch.fastpath.apply_fast_path

    def traced(pipe, backend, graphs):
        calls.append((backend, graphs))
        return original(pipe, backend="aot_eager", graphs=graphs)

    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", traced)
    engine = LocalEngine(dataclasses.replace(settings, compile=True), load_registry(settings.models_file))
    plain = LocalEngine(settings, load_registry(settings.models_file))
    request = parse_request({"prompt": "fox", "seed": 3, "steps": 3}, plain.cache.registry, "txt2img", "tiny-demo")
    fast_image = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    plain_image = np.asarray(plain.generate(request).images[0], dtype=np.int16)
    assert calls == [("inductor", False)]  # CUDA graphs on CUDA only
    assert np.abs(fast_image - plain_image).max() <= 1


def test_after_the_warm_up_the_requests_people_make_compile_nothing(settings, monkeypatch):
    """Other sizes (not square too), batches, no CFG, integer timesteps, img2img: none may compile again (a request
    would wait for inductor with the device lock held). Without CUDA graphs (here, and on MPS) the blocks run in the
    engine's inference mode, so the warm-up has to compile in it too: it compiled under no_grad, and the first
    request compiled every graph again."""
    original = dreamsketch.fastpath.apply_fast_path
    monkeypatch.setattr(
        "dreamsketch.pipelines.apply_fast_path", lambda pipe, backend, graphs: original(pipe, "aot_eager", graphs)
    )
    torch._dynamo.reset()
    engine = LocalEngine(dataclasses.replace(settings, compile=True), load_registry(settings.models_file))
    engine.preload("tiny-demo")  # compiles while warming up at the native size, 128x128
    counters.clear()
    source = io.BytesIO()
    Image.new("RGB", (96, 160), (200, 40, 40)).save(source, format="PNG")
    requests = [
        ("txt2img", {"width": 192, "height": 128, "batch_size": 2}),
        ("txt2img", {"width": 64, "height": 256, "guidance_scale": 1.0}),
        ("txt2img", {"scheduler": "DDIM", "negative_prompt": "blurry"}),
        ("img2img", {"image": source.getvalue(), "strength": 0.5, "width": 96, "height": 160}),
    ]
    for mode, fields in requests:
        request = parse_request({"prompt": "fox", "steps": 2, **fields}, engine.cache.registry, mode, "tiny-demo")
        assert len(engine.generate(request).images) == fields.get("batch_size", 1)
    assert counters["stats"]["unique_graphs"] == 0


def test_graph_signature_tells_shapes_apart_and_refuses_what_it_cannot_replay():
    sample = torch.zeros(2, 4, 8, 8)
    assert signature([sample, None, False], "spec") is None  # a CPU tensor: no CUDA graph
    assert signature([object()], "spec") is None
    assert signature([1.5, None, "x"], "spec") == ("spec", 1.5, None, "x")


class CpuReplay:
    """Stands in for a captured CUDA graph on the CPU: a replay computes the wrapped forward from the static
    inputs into the static outputs, in place, as a CUDA graph writes into its memory."""

    def __init__(self, forward, static_leaves, spec):
        self.forward, self.static_leaves, self.spec = forward, static_leaves, spec
        args, kwargs = tree_unflatten(static_leaves, spec)
        self.output = forward(*args, **kwargs)

    def replay(self):  # what was captured ran in the capture's grad modes
        args, kwargs = tree_unflatten(self.static_leaves, self.spec)
        with torch.inference_mode(False), torch.no_grad():
            fresh = self.forward(*args, **kwargs)
            for static, value in zip(tree_leaves(self.output), tree_leaves(fresh), strict=True):
                static.copy_(value)


class Capturable(TorchDispatchMode):
    """Fails on what a CUDA graph capture refuses: reading a tensor's value on the host (`.item()`, `if tensor:`),
    shapes that depend on values, and tensors made from Python data (a copy from the host on CUDA)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        by_mask = func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        assert not (str(func).startswith(CAPTURE_BREAKERS) or by_mask), f"{func} cannot be captured in a CUDA graph"
        return func(*args, **(kwargs or {}))


CAPTURE_BREAKERS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.lift_fresh")


@pytest.fixture
def cpu_graphs(monkeypatch):
    """CudaGraphs on the CPU: "capture" makes a CpuReplay, CPU tensors may be captured, and a capture fails as on
    CUDA where the forward does what a CUDA graph cannot hold."""
    monkeypatch.setattr("torch.cuda.graph_pool_handle", lambda: None)

    def cpu_signature(leaves, spec):
        return (str(spec), *[(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves])

    def capture(self, leaves, spec):  # in the grad modes of CudaGraphs._capture
        with torch.inference_mode(False), torch.no_grad():
            static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            with Capturable():
                replay = CpuReplay(self.forward, static, spec)
        return replay, [leaf for leaf in static if isinstance(leaf, torch.Tensor)], replay.output

    monkeypatch.setattr("dreamsketch.fastpath.signature", cpu_signature)
    monkeypatch.setattr(CudaGraphs, "_capture", capture)


@pytest.fixture
def cpu_settings(settings):
    """The CPU even where a GPU is (the GPU run of the CUDA tests selects these tests by their names too)."""
    return dataclasses.replace(settings, device="cpu")


@pytest.fixture
def engine_as_on_cuda(cpu_graphs, cpu_settings):
    """The default engine as it is on CUDA, its CUDA graphs captured on the CPU as cpu_graphs simulates them."""
    engine = LocalEngine(cpu_settings, load_registry(cpu_settings.models_file))
    engine.cache.graphs = True
    return engine


def test_the_simulated_capture_refuses_what_a_cuda_graph_cannot_hold(cpu_graphs):
    def reads_a_value(x):
        return x * float(x.sum())

    def makes_a_tensor_from_python_data(x):
        return x + torch.tensor([1.0, 2.0])

    def picks_by_value(x):
        return x[x > 0]

    for forward in (reads_a_value, makes_a_tensor_from_python_data, picks_by_value):
        with pytest.raises(AssertionError, match="cannot be captured in a CUDA graph"):
            CudaGraphs(forward, "stand-in")(torch.ones(2))


def test_the_default_engine_on_cuda_replays_graphs_with_the_plain_pictures(engine_as_on_cuda, cpu_settings):
    """Without DREAMSKETCH_COMPILE the fast path runs on CUDA too, without compilation: channels_last, fused QKV and
    CUDA graphs (captured here on the CPU as the cpu_graphs fixture simulates them), the native size at load."""
    engine = engine_as_on_cuda
    plain = LocalEngine(cpu_settings, load_registry(cpu_settings.models_file))
    assert not plain.cache.graphs
    unet = engine.cache.get("tiny-demo").txt2img.unet
    assert isinstance(unet.forward, CudaGraphs) and len(unet.forward.graphs) == 1  # the warm-up's, 128x128
    assert isinstance(engine.cache.get("tiny-demo").txt2img.text_encoder.forward, CudaGraphs)
    source = io.BytesIO()
    Image.new("RGB", (96, 160), (200, 40, 40)).save(source, format="PNG")
    for mode, fields in [
        ("txt2img", {}),
        ("txt2img", {"width": 192, "height": 128, "batch_size": 2}),
        ("txt2img", {"guidance_scale": 1.0}),
        ("img2img", {"image": source.getvalue(), "strength": 0.5, "width": 96, "height": 160}),
    ]:
        fields = {"prompt": "fox", "steps": 3, "seed": 5, **fields}
        request = parse_request(fields, plain.cache.registry, mode, "tiny-demo")
        for made, expected in zip(engine.generate(request).images, plain.generate(request).images, strict=True):
            assert np.abs(np.asarray(made, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert len(unet.forward.graphs) == 4  # and one per new UNet batch and latent size: 4x16x24, 1x16x16, 2x20x12


def test_the_compiled_twin_shares_the_unets_weights_and_leaves_its_blocks_eager():
    unet = apply_fast_path(build_tiny_pipeline(), backend=None, graphs=False).unet  # fused QKV: weights as views
    twin = compiled_twin(unet, "aot_eager")
    assert all(a is b for a, b in zip(unet.parameters(), twin.parameters(), strict=True))
    attention = next(m for m in twin.modules() if getattr(m, "to_qkv", None) is not None)
    assert attention.to_k.weight.untyped_storage().data_ptr() == attention.to_qkv.weight.untyped_storage().data_ptr()

    def regions(model):
        return [module for module in model.modules() if type(module).__name__ in REGIONS]

    assert all(module._compiled_call_impl is None for module in regions(unet))
    assert all(module._compiled_call_impl is not None for module in regions(twin))


@pytest.fixture
def compiled_cpu_graphs(cpu_graphs, monkeypatch):
    """cpu_graphs for the compiled UNet too: its captures go unchecked (dynamo will not run under a dispatch mode
    such as Capturable); the tests above check the eager UNet's."""
    monkeypatch.setattr(f"{__name__}.Capturable", contextlib.nullcontext)
    torch._dynamo.reset()


def compiling_on_cuda(engine, monkeypatch, backend):
    """`engine` (engine_as_on_cuda, with compiled_cpu_graphs) with DREAMSKETCH_COMPILE=1, its UNet's blocks compiled
    by `backend`."""
    original = dreamsketch.fastpath.apply_fast_path
    monkeypatch.setattr(
        "dreamsketch.pipelines.apply_fast_path", lambda pipe, _, graphs: original(pipe, backend, graphs)
    )
    engine.cache.compile = True
    return engine


def held_back_compilation():
    """A backend that compiles (aot_eager) once the returned event is set."""
    release, aot_eager = threading.Event(), lookup_backend("aot_eager")

    def held_back(graph, example_inputs):
        assert release.wait(timeout=120)
        return aot_eager(graph, example_inputs)

    return held_back, release


def test_on_cuda_the_eager_unet_serves_while_its_twin_compiles_then_the_compiled_one(
    compiled_cpu_graphs, engine_as_on_cuda, cpu_settings, monkeypatch
):
    """Compiling SD 1.5 from an empty cache takes nearly two minutes on an H100: meanwhile requests are answered by
    the eager UNet's CUDA graphs (simulated here on the CPU), and the first request after it replays the compiled
    UNet's, which the compilation has already made for it."""
    release, compiled_graphs = threading.Event(), []
    aot_eager = lookup_backend("aot_eager")

    def held_back(graph, example_inputs):  # compiles once the test lets it
        assert release.wait(timeout=120)
        compiled_graphs.append(graph)
        return aot_eager(graph, example_inputs)

    engine = compiling_on_cuda(engine_as_on_cuda, monkeypatch, held_back)
    plain = LocalEngine(cpu_settings, load_registry(cpu_settings.models_file))
    request = parse_request({"prompt": "fox", "steps": 3, "seed": 5}, plain.cache.registry, "txt2img", "tiny-demo")
    expected = np.asarray(plain.generate(request).images[0], dtype=np.int16)
    pipe = engine.cache.get("tiny-demo").txt2img  # warms up: captures the eager UNet, starts compiling
    unet = pipe.unet.forward
    assert isinstance(unet, CompiledInBackground) and unet.worker is not None and unet.worker.is_alive()
    assert engine.compiling_ids() == ["tiny-demo"]  # /api/status says so
    served = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    assert np.abs(served - expected).max() <= 1
    assert compiled_graphs == [] and len(unet.eager.graphs) == 1 and unet.compiled.graphs == {}
    release.set()
    assert wait_for_compilation(pipe) and compiled_graphs and engine.compiling_ids() == []
    assert all(module._compiled_call_impl is None for module in pipe.unet.modules())  # its own blocks stay eager
    counters.clear()
    made = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    assert counters["stats"]["unique_graphs"] == 0  # the worker compiled what the request needs
    assert np.abs(made - expected).max() <= 1
    assert unet.eager.graphs == {} and len(unet.compiled.graphs) == 1


def test_on_cuda_a_failed_compilation_leaves_the_eager_unet_serving(
    compiled_cpu_graphs, engine_as_on_cuda, monkeypatch, caplog
):
    def broken(graph, example_inputs):
        raise RuntimeError("inductor broke")

    engine = compiling_on_cuda(engine_as_on_cuda, monkeypatch, broken)
    assert not engine.preload("tiny-demo", compiled=True)  # `dreamsketch preload` says so
    pipe = engine.cache.get("tiny-demo").txt2img
    assert not wait_for_compilation(pipe)
    assert "compiling the UNet's blocks failed, the fast path goes on without them" in caplog.text
    request = parse_request({"prompt": "fox", "steps": 2}, engine.cache.registry, "txt2img", "tiny-demo")
    assert len(engine.generate(request).images) == 1
    assert len(pipe.unet.forward.eager.graphs) == 1 and pipe.unet.forward.compiled.graphs == {}


def test_on_cuda_preloading_waits_for_the_compilation_and_evicting_stops_it(
    compiled_cpu_graphs, engine_as_on_cuda, monkeypatch, caplog
):
    """`dreamsketch preload` leaves the compile cache full for the server's start; an evicted model's weights stay
    on the GPU while its compilation runs, so the eviction stops it (at the UNet's next level) and waits."""
    caplog.set_level(logging.INFO, logger="dreamsketch.fastpath")
    held_back, release = held_back_compilation()
    engine = compiling_on_cuda(engine_as_on_cuda, monkeypatch, held_back)
    threading.Timer(0.5, release.set).start()
    engine.preload("tiny-demo", compiled=True)
    assert engine.cache.get("tiny-demo").txt2img.unet.forward.ready.is_set()
    engine.cache.evict("tiny-demo")
    release.clear()
    torch._dynamo.reset()  # the next load compiles again
    pipe = engine.cache.get("tiny-demo").txt2img
    worker = pipe.unet.forward.worker
    assert worker.is_alive()
    stopping = pipe.unet.forward.stopping
    threading.Thread(target=lambda: stopping.wait(120) and release.set()).start()  # once the eviction asks it to stop
    engine.cache.evict("tiny-demo")
    assert not worker.is_alive() and not pipe.unet.forward.ready.is_set()
    assert "stopped compiling the UNet's blocks" in caplog.text


def test_on_cuda_the_compilation_stops_when_the_process_is_told_to_end(compiled_cpu_graphs, monkeypatch):
    """The worker is no daemon thread (one dying inside torch's C++ code at exit aborted the process), so the
    process's end and a server's shut-down stop it."""
    held_back, release = held_back_compilation()
    pipe = apply_fast_path(build_tiny_pipeline(), backend=held_back, graphs=True)
    pipe(prompt="fox", num_inference_steps=1, height=128, width=128, output_type="latent")
    unet = pipe.unet.forward
    assert unet in dreamsketch.fastpath.COMPILING and not unet.worker.daemon
    dreamsketch.fastpath.stop_compiling()
    release.set()
    assert not wait_for_compilation(pipe) and unet not in dreamsketch.fastpath.COMPILING


def test_on_cuda_compiling_out_of_memory_tries_again_at_a_later_call(compiled_cpu_graphs, caplog):
    aot_eager, calls = lookup_backend("aot_eager"), []

    def short_of_memory_once(graph, example_inputs):
        calls.append(graph)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return aot_eager(graph, example_inputs)

    pipe = apply_fast_path(build_tiny_pipeline(), backend=short_of_memory_once, graphs=True)
    kwargs = dict(prompt="fox", num_inference_steps=1, height=128, width=128, output_type="latent")
    pipe(**kwargs)
    assert not wait_for_compilation(pipe)
    assert "out of GPU memory while compiling the UNet's blocks; a later call tries again" in caplog.text
    pipe(**kwargs)
    assert wait_for_compilation(pipe)


def test_on_cuda_compiling_out_of_memory_gives_up_after_a_few_attempts(compiled_cpu_graphs, caplog):
    def short_of_memory(graph, example_inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    pipe = apply_fast_path(build_tiny_pipeline(), backend=short_of_memory, graphs=True)
    kwargs = dict(prompt="fox", num_inference_steps=1, height=128, width=128, output_type="latent")
    workers = []
    for _ in range(dreamsketch.fastpath.COMPILE_ATTEMPTS + 1):
        pipe(**kwargs)
        assert not wait_for_compilation(pipe)
        workers.append(pipe.unet.forward.worker)
    assert len(set(workers)) == dreamsketch.fastpath.COMPILE_ATTEMPTS
    assert "compiling the UNet's blocks failed, the fast path goes on without them" in caplog.text


def test_on_cuda_latents_with_a_side_of_one_always_run_the_eager_unet(compiled_cpu_graphs):
    """dynamo specialises sizes of 1, and the fast path's way round it elsewhere (torch's global compiler stance)
    would reach the worker's compilation too: such latents start no compilation and never reach the compiled UNet."""
    pipe = apply_fast_path(build_tiny_pipeline(), backend="aot_eager", graphs=True)
    unet, cpu = pipe.unet.forward, torch.device("cpu")
    small, square = (unet_inputs(pipe.unet, 2, 16, cpu, torch.float32, latent_width=w) for w in (2, 16))
    with torch.inference_mode():
        pipe.unet(*small[0], **small[1])  # tiny-demo's UNet halves once: a latent side of 2 leaves a side of 1
        assert unet.worker is None and len(unet.eager.graphs) == 1
        pipe.unet(*square[0], **square[1])
        assert wait_for_compilation(pipe)
        counters.clear()
        for args, kwargs in (square, small, square, small):
            pipe.unet(*args, **kwargs)
    assert counters["stats"]["unique_graphs"] == 0
    assert len(unet.compiled.graphs) == 1 and len(unet.eager.graphs) == 1  # the small latents' graph, captured again
    unet.stop()  # as a server's shut-down may while requests finish: they go on, new shapes captured too
    bigger = unet_inputs(pipe.unet, 4, 16, cpu, torch.float32)
    with torch.inference_mode():
        assert pipe.unet(*square[0], **square[1]).sample.shape == (2, 4, 16, 16)
        assert pipe.unet(*bigger[0], **bigger[1]).sample.shape == (4, 4, 16, 16)


def test_fused_projections_cost_no_memory():
    """diffusers keeps the q, k and v layers beside the fused one: SDXL's UNet grew by 1.3 GB in fp16."""

    def stored_bytes(model):
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        return sum(storages.values())

    plain, fast = build_tiny_sdxl_pipeline(), apply_fast_path(build_tiny_sdxl_pipeline(), backend=None)
    assert stored_bytes(fast.unet) == stored_bytes(plain.unet)
    attention = next(m for m in fast.unet.modules() if getattr(m, "to_qkv", None) is not None)
    assert attention.to_k.weight.untyped_storage().data_ptr() == attention.to_qkv.weight.untyped_storage().data_ptr()
    assert torch.equal(attention.to_v.weight, attention.to_qkv.weight[-attention.to_v.weight.shape[0] :])


def capture_error_from(out_of_memory):
    """The capture's own RuntimeError, raised while out of memory (as torch's capture_end may raise it)."""
    try:
        raise out_of_memory
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904


@pytest.mark.parametrize("raise_it", [lambda error: error, capture_error_from], ids=["plain", "as-the-context"])
def test_a_capture_out_of_memory_drops_the_graphs_and_runs_that_shape_eagerly(cpu_graphs, monkeypatch, raise_it):
    """It was taken for a forward a graph cannot hold: the graphs captured before kept their memory, the engine
    never heard of it (nothing freed, merged requests not split), and the shape ran eagerly for good."""
    captures = []
    graphed = CudaGraphs(lambda x: x * 2, "stand-in")
    capture = CudaGraphs._capture

    def short_of_memory_for_big_inputs(self, leaves, spec):
        captures.append(leaves[0].shape[0])
        if leaves[0].shape[0] > 2:
            raise raise_it(torch.cuda.OutOfMemoryError("CUDA out of memory"))
        return capture(self, leaves, spec)

    monkeypatch.setattr(CudaGraphs, "_capture", short_of_memory_for_big_inputs)
    assert torch.equal(graphed(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(graphed(torch.ones(4)), torch.full((4,), 2.0))  # eagerly
    assert [value is None for value in graphed.graphs.values()] == [True]  # the small shape's graph went too
    graphed(torch.ones(4))
    graphed(torch.ones(2))  # captured again
    assert captures == [2, 4, 2]
    graphed.drop()  # as freeing memory after an out-of-memory error in the engine does: the big shape tries again
    graphed(torch.ones(4))
    assert captures == [2, 4, 2, 4]


def test_freeing_memory_after_an_out_of_memory_error_drops_the_loaded_models_graphs(engine_as_on_cuda):
    engine = engine_as_on_cuda
    pipe = engine.cache.get("tiny-demo").txt2img
    assert len(pipe.unet.forward.graphs) == 1 and len(pipe.text_encoder.forward.graphs) == 1  # the warm-up's
    with pytest.raises(ModelUnavailableError):
        engine.preload("uncached-hub")  # a model that cannot load for another reason leaves the graphs alone
    assert len(pipe.unet.forward.graphs) == 1
    engine.cache.free_memory()
    assert pipe.unet.forward.graphs == {} and pipe.text_encoder.forward.graphs == {}


def test_a_request_out_of_memory_runs_again_once_when_cuda_graphs_kept_memory(engine_as_on_cuda):
    """The graphs keep the memory of the largest batch they captured: once they are dropped, the request may fit."""
    engine = engine_as_on_cuda
    pipe = engine.cache.get("tiny-demo").txt2img
    decode, graphs_then = pipe.vae.decode, []

    def short_of_memory_once(*args, **kwargs):
        if not graphs_then:
            graphs_then.append(len(pipe.unet.forward.graphs))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return decode(*args, **kwargs)

    pipe.vae.decode = short_of_memory_once
    request = parse_request({"prompt": "fox", "steps": 2}, engine.cache.registry, "txt2img", "tiny-demo")
    assert len(engine.generate(request).images) == 1
    assert graphs_then == [1] and len(pipe.unet.forward.graphs) == 1  # dropped, then captured again


def test_graph_replays_hand_out_copies_that_outlive_the_next_replay(cpu_graphs):
    """diffusers encodes the prompt and then the negative prompt through the same text encoder graph: the first
    call's output (a transformers ModelOutput) must not change when the second replays."""
    encoder = build_tiny_pipeline().text_encoder
    graphed = CudaGraphs(encoder.forward, "CLIPTextModel")
    prompt, negative = torch.tensor([[1, 5, 9] + [2] * 74]), torch.tensor([[1] + [2] * 76])
    with torch.no_grad():
        first, second = graphed(prompt, output_hidden_states=True), graphed(negative, output_hidden_states=True)
        expected_first, expected_second = (
            encoder(prompt, output_hidden_states=True),
            encoder(negative, output_hidden_states=True),
        )
    assert len(graphed.graphs) == 1 and type(first) is type(expected_first)
    for got, expected in ((first, expected_first), (second, expected_second)):
        for got_leaf, expected_leaf in zip(tree_leaves(got), tree_leaves(expected), strict=True):
            assert torch.equal(got_leaf, expected_leaf)


@pytest.mark.parametrize("build", [build_tiny_pipeline, build_tiny_sdxl_pipeline])
def test_graph_replays_give_the_plain_pictures(cpu_graphs, build):
    """The CUDA test below, with replays simulated on the CPU: the outputs of every graphed model (the UNet's,
    the text encoders' with their hidden states and pooled embeddings) reach the pipeline intact."""
    plain, fast = build(), build()
    replay_as_graphs(fast)
    assert_replays_give_the_plain_pictures(plain, fast, tolerance=1e-6)


def assert_replays_give_the_plain_pictures(plain, fast, tolerance):
    kwargs = dict(num_inference_steps=3, height=128, width=128, output_type="np")
    for batch, seed in ((1, 1), (1, 2), (3, 3)):
        prompts = dict(prompt=["a red fox"] * batch, negative_prompt=["blurry"] * batch)
        a = plain(**prompts, **kwargs, generator=torch.Generator().manual_seed(seed)).images
        b = fast(**prompts, **kwargs, generator=torch.Generator().manual_seed(seed)).images
        assert np.abs(a - b).max() < tolerance
    wrappers = [wrapper for wrapper in graph_wrappers(fast) if wrapper.graphs]  # the compiled UNet's, if compiled
    assert len(wrappers) == len(graphed_models(fast))
    for wrapper in wrappers:  # one graph per input shape: UNet CFG batches 2 and 6, text batches 1 and 3
        assert len(wrapper.graphs) == 2 and all(captured is not None for captured in wrapper.graphs.values())


def test_compile_cache_outlives_reboots_unless_the_user_chose_one(monkeypatch, tmp_path):
    import diffusers  # noqa: F401  (importing it sets TORCHINDUCTOR_CACHE_DIR to torch's default under /tmp)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    dreamsketch.fastpath.configure_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(dreamsketch.fastpath.COMPILE_CACHE)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    dreamsketch.fastpath.configure_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(
    ("build", "backend"),
    [(build_tiny_pipeline, None), (build_tiny_pipeline, "inductor"), (build_tiny_sdxl_pipeline, None)],
)
def test_cuda_fast_path_replays_graphs_with_the_plain_pictures(build, backend):
    plain = build().to("cuda", torch.float16)
    fast = apply_fast_path(build().to("cuda", torch.float16), backend=backend)
    if backend is not None:  # the first call starts compiling the UNet; the calls below replay the compiled one
        fast(prompt="a red fox", num_inference_steps=1, height=128, width=128, output_type="latent")
        assert wait_for_compilation(fast)
    encoders = ["CLIPTextModel"] + (["CLIPTextModelWithProjection"] if build is build_tiny_sdxl_pipeline else [])
    assert [type(model).__name__ for model in graphed_models(fast)] == ["UNet2DConditionModel", *encoders]
    assert_replays_give_the_plain_pictures(plain, fast, tolerance=2e-2)  # fp16 noise
    if backend is not None:
        assert len(fast.unet.forward.compiled.graphs) == 2 and fast.unet.forward.eager.graphs == {}


@cuda
def test_cuda_dropping_the_graphs_gives_their_memory_back(settings):
    """What an out-of-memory error in the engine does: the pools of the graphs captured so far (the largest batch's
    memory) go back to the device, and the next request captures again."""
    engine = LocalEngine(dataclasses.replace(settings, device="cuda"), load_registry(settings.models_file))
    fields = {"prompt": "fox", "steps": 2, "batch_size": 8, "width": 256, "height": 256}
    request = parse_request(fields, engine.cache.registry, "txt2img", "tiny-demo")
    engine.generate(request)  # captures the UNet for a batch of 16 rows
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    engine.cache.free_memory()
    assert torch.cuda.memory_reserved() < held
    assert len(engine.generate(request).images) == 8
    assert len(engine.cache.get("tiny-demo").txt2img.unet.forward.graphs) == 1


@cuda
def test_cuda_compiled_unet_batch_of_one_replays_its_own_graph_with_the_plain_picture():
    plain = build_tiny_pipeline().to("cuda", torch.float16)
    fast = apply_fast_path(build_tiny_pipeline().to("cuda", torch.float16), backend="inductor")
    kwargs = dict(prompt="a red fox", num_inference_steps=3, height=128, width=128, output_type="np")
    fast(**kwargs, guidance_scale=7.5)  # starts compiling for the CFG batch of 2
    assert wait_for_compilation(fast)
    fast(**kwargs, guidance_scale=7.5)  # captures the compiled UNet's graph
    counters.clear()
    for _ in range(2):  # the first call captures the graph of a batch of one, the second replays it
        a = plain(**kwargs, guidance_scale=1.0, generator=torch.Generator().manual_seed(1)).images
        b = fast(**kwargs, guidance_scale=1.0, generator=torch.Generator().manual_seed(1)).images
        assert np.abs(a - b).max() < 2e-2  # fp16 noise
    assert counters["stats"]["unique_graphs"] == 0
    assert len(fast.unet.forward.compiled.graphs) == 2
