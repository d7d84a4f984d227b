"""The fast path: on CUDA by default, with its compiled blocks where DREAMSKETCH_COMPILE=1 (also on other devices).
Same pictures as the plain path, up to fp16 noise.

- channels_last memory for the UNet and fused QKV projections (the VAE keeps torch's default memory format: it
  runs eagerly, and eager GroupNorm copies channels_last tensors back, which made SD 1.5's decode 8 ms slower);
- regional compilation: torch.compile on the UNet's repeated blocks (resnets and transformer blocks) rather
  than on the whole UNet, with dynamic shapes, so that the number of compilations depends on the block
  configurations only, not on the batch sizes and picture sizes a server sees; inductor's caches live in a
  persistent folder so that a restart compiles from cache;
- on CUDA, each call of the UNet and of the text encoders replays a CUDA graph captured once per input shape: one
  UNet step of SD 1.5 at 512x512 is mostly kernel-launch overhead (DESIGN.md, "Performance facts"), and a text
  encoder's few hundred small kernels are nothing else;
- on CUDA the blocks compile in the background (CompiledInBackground): requests are served by the eager UNet's
  CUDA graphs meanwhile, since compiling SD 1.5 from an empty cache takes nearly two minutes on an H100.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)

COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dreamsketch" / "torch-compile"
REGIONS = ("ResnetBlock2D", "BasicTransformerBlock")
GRAPHED = ("unet", "text_encoder", "text_encoder_2")  # a pipeline's models whose calls replay CUDA graphs
RECOMPILE_LIMIT = 64  # compiled variants per block class (one per block configuration)
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
MAX_GRAPHS = 32  # captured input shapes (batch size x picture size); later new shapes run eagerly
GRAPH_WARMUP_CALLS = 2  # eager calls on a side stream before capture (compiles, lazy CUDA initialisation)
COMPILE_ATTEMPTS = 3  # background compilations of a UNet that may run out of GPU memory before it gives up


def configure_compile_cache() -> None:
    """Keep inductor's caches (on by default) in COMPILE_CACHE, which outlives reboots, unless the user chose a
    folder. Importing diffusers already sets TORCHINDUCTOR_CACHE_DIR to torch's default under /tmp, so a value
    equal to that default counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)


def apply_fast_path(pipe: Any, backend: str | None = "inductor", graphs: bool | None = None) -> Any:
    """Make a loaded txt2img pipeline fast in place (img2img shares its modules, so it is fast too).

    `backend` is torch.compile's (None: no compilation); tests on the CPU use "aot_eager". `graphs`: whether the
    GRAPHED models' calls replay CUDA graphs (None: on CUDA); with graphs the UNet's blocks compile in the
    background, without them at the UNet's first call."""
    convert_layout(pipe)
    if graphs is None:
        graphs = pipe.device.type == "cuda"
    twin = compiled_twin(pipe.unet, backend) if graphs and backend is not None else None
    if graphs:
        replay_as_graphs(pipe)
    if twin is not None:
        pipe.unet.forward = CompiledInBackground(pipe.unet.forward, twin)
    elif backend is not None:
        compile_unet(pipe.unet, backend)
    log.info("fast path on: channels_last UNet, fused QKV, compiled blocks: %s, CUDA graphs: %s", backend, graphs)
    return pipe


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """Compile the UNet's blocks (at its next call), with what keeps later calls from compiling them again."""
    compile_regions(unet, backend)
    unet.forward = with_batch_of_two_at_least(unet.forward)
    unet.forward = with_sides_of_one_eager(unet.forward, count_halvings(unet))


def compiled_twin(unet: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of `unet` with module objects of its own, its blocks compiled, and the same parameter and buffer
    tensors (it costs no memory): compiling its blocks leaves `unet`'s eager."""
    shared = {id(tensor): tensor for tensor in (*unet.parameters(), *unet.buffers())}
    twin = copy.deepcopy(unet, shared)
    compile_unet(twin, backend)
    return twin


def convert_layout(pipe: Any) -> None:
    """The fast path's eager part: the UNet in channels_last memory, with fused QKV projections."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet.fuse_qkv_projections()
    share_fused_weights(pipe.unet)


FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}  # diffusers' fused layers and their parts


def share_fused_weights(model: torch.nn.Module) -> None:
    """diffusers keeps the separate q, k and v layers beside each fused one (to unfuse them): their weights become
    views of the fused layer's, so that fusing costs no memory (0.11 GB of SD 1.5's UNet in fp16, 1.3 GB of
    SDXL's). A later change of dtype copies them apart again, and save_pretrained refuses shared tensors."""
    for module in model.modules():
        for fused_name, part_names in FUSED.items():
            fused = getattr(module, fused_name, None)
            if not isinstance(fused, torch.nn.Linear):
                continue
            parts = [getattr(module, name) for name in part_names]
            for tensor_name in ("weight", "bias"):
                whole = getattr(fused, tensor_name)
                start = 0
                for part in parts if whole is not None else ():
                    tensor = getattr(part, tensor_name)
                    tensor.data = whole.data[start : start + tensor.shape[0]]
                    start += tensor.shape[0]


def graphed_models(pipe: Any) -> list[torch.nn.Module]:
    """The GRAPHED models that `pipe` has (SD 1.x/2.x: one text encoder, SDXL: two)."""
    return [model for model in (getattr(pipe, name, None) for name in GRAPHED) if model is not None]


def replay_as_graphs(pipe: Any) -> None:
    """From now on, each call of `pipe`'s GRAPHED models replays a CUDA graph of its input signature."""
    for model in graphed_models(pipe):
        model.forward = CudaGraphs(model.forward, type(model).__name__)


def graph_wrappers(pipe: Any) -> list[CudaGraphs]:
    """The CudaGraphs that `pipe`'s models replay (the UNet's two while it compiles in the background)."""
    wrappers: list[CudaGraphs] = []
    for model in graphed_models(pipe):
        if isinstance(model.forward, CompiledInBackground):
            wrappers += [model.forward.eager, model.forward.compiled]
        elif isinstance(model.forward, CudaGraphs):
            wrappers.append(model.forward)
    return wrappers


def drop_graphs(pipe: Any) -> bool:
    """Drop the CUDA graphs `pipe`'s models captured (the memory they keep goes back at the next free_memory());
    each shape is captured again at its next call. Whether there were any."""
    wrappers = graph_wrappers(pipe)
    captured = any(graph is not None for wrapper in wrappers for graph in wrapper.graphs.values())
    for wrapper in wrappers:
        wrapper.drop()
    return captured


def wait_for_compilation(pipe: Any) -> bool:
    """Wait until the UNet's background compilation (if it has one, and it started) has ended; whether the
    compiled UNet serves from the next call on (for `dreamsketch preload`, benchmarks and tests)."""
    forward = pipe.unet.forward
    return not isinstance(forward, CompiledInBackground) or forward.wait()


def compiling(pipe: Any) -> bool:
    """Whether the UNet's blocks are being compiled in the background now."""
    return isinstance(pipe.unet.forward, CompiledInBackground) and pipe.unet.forward in COMPILING


def stop_compilation(pipe: Any) -> None:
    """Stop the UNet's background compilation, if it has one running, and wait for it to end."""
    if isinstance(pipe.unet.forward, CompiledInBackground):
        pipe.unet.forward.stop()
        pipe.unet.forward.wait()


# How CUDA's own allocation failures and cuBLAS's and cuDNN's read: torch raises them as plain RuntimeErrors (or, from
# 2.8, AcceleratorErrors), not as the OutOfMemoryError of its caching allocator; MPS's "MPS backend out of memory" too.
OUT_OF_MEMORY = ("out of memory", "ALLOC_FAILED", "ALLOCATION_FAILED")  # cuBLAS, cuDNN 8; cuDNN 9
TORCH_ERRORS = (RuntimeError, getattr(torch, "AcceleratorError", RuntimeError))


def out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc` says that the GPU ran out of memory (the words only in torch's own errors, not in ours)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return type(exc) in TORCH_ERRORS and any(words in str(exc) for words in OUT_OF_MEMORY)


def caused_by_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from or while handling (a capture's own error, dynamo's wrapping
    of its compiler's), says that the GPU ran out of memory."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if out_of_memory(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def free_memory() -> None:
    """Give back what nothing holds any more: Python's reference cycles, then the CUDA caching allocator's blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compile_regions(model: torch.nn.Module, backend: str) -> None:
    """torch.compile each of `model`'s REGIONS blocks (the UNet's; benchmarks also try the VAE decoder's)."""
    configure_compile_cache()
    options = INDUCTOR_OPTIONS if backend == "inductor" else None
    for module in model.modules():
        if type(module).__name__ in REGIONS:
            module.compile(backend=backend, fullgraph=True, dynamic=True, options=options)
    model.forward = with_dynamo_settings(model.forward)


def with_dynamo_settings(forward: Callable[..., Any]) -> Callable[..., Any]:
    """torch keeps dynamo's settings per thread (2.13), and a server compiles in whichever thread brings a new
    shape: each call sets them in its own thread. The limit on compilations per function (all resnets share one)
    goes up to RECOMPILE_LIMIT. Floats are constants: the blocks' only floats are their eps, dropout and scale
    factors, and with them symbolic dynamo's first analysis of each block class failed and started again (about
    5 s of the cold first call's 99 s on an H100, by its compile log). Every size gets a symbol of its own: with
    torch's duck shaping equal sizes share one, so the first graph of each block class held only square latents,
    and the first picture that was not square compiled them again."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    @functools.wraps(forward)
    def with_settings(*args: Any, **kwargs: Any) -> Any:
        limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        with (
            torch._dynamo.config.patch(cache_size_limit=limit, specialize_float=True),
            fx_config.patch(use_duck_shape=False),  # type: ignore[attr-defined]  # made by torch at import
        ):
            return forward(*args, **kwargs)

    return with_settings


def with_batch_of_two_at_least(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled UNet called with one latent runs on two copies of it and returns the first result. Dynamo
    specialises sizes of 1, so a UNet batch of 1 (a request without CFG: guidance 1 or less) compiled every block
    again, for as long as the first start took; a second copy costs little at such a batch size."""

    def two(x: Any) -> Any:
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x

    @functools.wraps(forward)
    def padded(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] != 1:
            return forward(sample, *args, **kwargs)
        output = forward(two(sample), *tree_map(two, args), **tree_map(two, kwargs))
        return tree_map(lambda x: x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, output)

    return padded


def count_halvings(unet: Any) -> int:
    """How many times a UNet halves its latent's sides on the way down (SD 1.x/2.x: 3, SDXL: 2)."""
    return sum(1 for block in unet.down_blocks if block.downsamplers)


def with_sides_of_one_eager(forward: Callable[..., Any], halvings: int) -> Callable[..., Any]:
    """Latents that leave a side of 1 at the UNet's deepest level (SD 1.x/2.x at 64 pixels) run without the
    compiled blocks: dynamo specialises sizes of 1, and such a request compiled 4-5 of full-size SD 1.5's graphs
    again, waiting for inductor with the device lock held. torch's stance is global; the engine's device lock
    keeps other UNet calls out meanwhile (on CUDA, where the UNet compiles in the background, such latents never
    reach the compiled UNet: CompiledInBackground)."""

    @functools.wraps(forward)
    def guarded(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not has_side_of_one(sample, halvings):
            return forward(sample, *args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return forward(sample, *args, **kwargs)

    return guarded


def has_side_of_one(sample: torch.Tensor, halvings: int) -> bool:
    """Whether latents `sample` leave a side of 1 after `halvings` halvings (each rounds up)."""
    return min(sample.shape[-2:]) <= 2**halvings


class CompilationStopped(Exception):
    """The background compilation was stopped (the model is evicted, or the process ends)."""


COMPILING: set[CompiledInBackground] = set()  # the UNets whose worker is compiling now


class CompiledInBackground:
    """The UNet's forward while its compiled `twin` is made: calls replay CUDA graphs of the eager UNet (`eager`)
    until a worker thread, started by the first call with a copy of that call's inputs, has compiled the twin's
    blocks; the first call after that replays the twin's graphs (`compiled`) and the eager graphs go. The worker
    runs the twin once on a CUDA stream of its own, as a capture's warm-up calls do (not in inference mode), so that
    the captures find its code compiled. If compilation fails the eager graphs serve on (out of memory: a later call
    tries again). Latents that leave a side of 1 at the UNet's deepest level always run the eager UNet (dynamo
    specialises sizes of 1), so nothing here needs torch's global compiler stance, which the worker would see."""

    def __init__(self, eager: CudaGraphs, twin: Any) -> None:  # twin: a diffusers UNet2DConditionModel
        self.eager, self.compiled = eager, CudaGraphs(twin.forward, "the compiled UNet")
        self.halvings = count_halvings(twin)
        self.worker: threading.Thread | None = None  # only calls (the device's owner) set it
        self.attempts = 0
        self.ready = threading.Event()  # the twin compiled
        self.ran_out_of_memory = threading.Event()  # the last worker ran out of GPU memory
        self.stopping = threading.Event()
        self.switched = False  # the eager graphs went
        for level in (*twin.down_blocks, twin.mid_block, *twin.up_blocks):  # eager modules: their hooks run as is
            if level is not None:
                level.register_forward_pre_hook(self._stop_if_asked)

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if has_side_of_one(sample, self.halvings):
            return self.eager(sample, *args, **kwargs)
        if self.ready.is_set():
            if not self.switched:
                self.switched = True
                self.eager.drop()
                free_memory()
            return self.compiled(sample, *args, **kwargs)
        output = self.eager(sample, *args, **kwargs)
        if self.worker is None or self._to_try_again():
            self.attempts += 1
            self.ran_out_of_memory.clear()
            self.worker = threading.Thread(target=self._compile, args=self._copies((sample, *args), kwargs))
            COMPILING.add(self)
            self.worker.start()
        return output

    def _to_try_again(self) -> bool:
        worker = self.worker
        ended = worker is not None and not worker.is_alive()
        retry = self.ran_out_of_memory.is_set() and self.attempts < COMPILE_ATTEMPTS
        return ended and retry and not self.stopping.is_set()

    @staticmethod
    def _copies(*inputs: Any) -> tuple[Any, ...]:
        """Normal tensors (not inference tensors, as in a capture), made before the worker reads them."""
        with torch.inference_mode(False):
            copies = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, inputs)
        if cuda_device(copies) is not None:
            torch.cuda.current_stream().synchronize()
        return copies

    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        start = time.perf_counter()
        device = cuda_device((args, kwargs))
        stream = None if device is None else torch.cuda.Stream(device)
        try:
            with torch.inference_mode(False), torch.no_grad(), torch.cuda.stream(stream):
                self.compiled.forward(*args, **kwargs)
            if stream is not None:
                stream.synchronize()
            seconds = time.perf_counter() - start
            log.info("compiled the UNet's blocks in %.1f s; the next call switches to them", seconds)
            self.ready.set()
        except Exception as exc:
            if self.stopping.is_set():  # CompilationStopped, or torch's own error while the process ends
                log.info("stopped compiling the UNet's blocks")
            elif caused_by_out_of_memory(exc) and self.attempts < COMPILE_ATTEMPTS:
                log.warning("out of GPU memory while compiling the UNet's blocks; a later call tries again")
                self.ran_out_of_memory.set()
            else:
                log.warning("compiling the UNet's blocks failed, the fast path goes on without them: %s", exc)
                log.debug("the failure", exc_info=True)
        finally:
            COMPILING.discard(self)

    def _stop_if_asked(self, *_: Any) -> None:
        if self.stopping.is_set() and threading.current_thread() is self.worker:  # requests' calls go on
            raise CompilationStopped

    def wait(self) -> bool:
        """Wait for the worker, if it started; whether the twin compiled."""
        worker = self.worker
        if worker is not None:
            worker.join()
        return self.ready.is_set()

    def stop(self) -> None:
        """Make the worker stop at the next level of the UNet it reaches, if there is one (SD 1.5's levels took 13 s
        each on average on an H100 with an empty cache), and start no other."""
        self.stopping.set()


def stop_compiling() -> None:
    """Make every background compilation stop soon: before the process ends, which waits for the workers (as
    daemon threads they would die inside torch's C++ code and abort the process)."""
    for compiling in list(COMPILING):
        compiling.stop()


# However the process ends (the CLI, a server's shut-down, `uvicorn app:app`, an error), before it waits for its
# threads: the hook that concurrent.futures uses for its own workers.
threading._register_atexit(stop_compiling)  # type: ignore[attr-defined]


class CudaGraphs:
    """Wraps a module's forward: the first call with a new input signature (tensor shapes and dtypes, other
    arguments' values) captures a CUDA graph; later calls copy their tensors into the graph's inputs and replay
    it. Callers must not run two calls at once (the engine holds its device lock)."""

    def __init__(self, forward: Callable[..., Any], name: str) -> None:
        self.forward, self.name = forward, name
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any] | None] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        key = signature(leaves, spec)
        if key is None:
            return self.forward(*args, **kwargs)
        if key not in self.graphs and len(self.graphs) < MAX_GRAPHS:
            self.graphs[key] = self.capture(leaves, spec)
        captured = self.graphs.get(key)
        if captured is None:
            return self.forward(*args, **kwargs)
        graph, inputs, output = captured
        for static, leaf in zip(inputs, (leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), strict=True):
            static.copy_(leaf)
        graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)

    def drop(self) -> None:
        """Forget every graph; the memory they keep goes back at the next free_memory() (new graphs get a new pool:
        capturing into the pool of dropped graphs failed an internal assertion of torch 2.11's caching allocator on
        an H100)."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, leaves: list[Any], spec: Any) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any] | None:
        """The graph, its input tensors and its output; None (this signature runs eagerly) if it cannot be
        captured, e.g. because the forward synchronises with the CPU. Out of memory, the graphs captured so far
        go too (they keep the memory of the largest shape each captured), so that the eager call has it."""
        start = time.perf_counter()
        try:
            captured = self._capture(leaves, spec)
        except RuntimeError as exc:  # out of memory too, or as the cause of the capture's own error
            if not caused_by_out_of_memory(exc):
                log.warning("no CUDA graph for this input signature, it runs eagerly: %s", exc)
                return None
            captured = None  # dropped below, once the error no longer holds the capture's tensors
        if captured is None:
            log.warning("out of GPU memory while capturing a CUDA graph of %s: its graphs are dropped", self.name)
            self.drop()
            free_memory()
            return None
        shape = next(tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor))
        what = f"a CUDA graph of {self.name} for {shape}"
        seconds, count = time.perf_counter() - start, len(self.graphs) + 1
        log.info("captured %s in %.1f s, compilation included (%d so far)", what, seconds, count)
        return captured

    def _capture(self, leaves: list[Any], spec: Any) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]:
        # Normal tensors (not inference tensors), so that later calls under no_grad may copy into them.
        with torch.inference_mode(False), torch.no_grad():
            static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            args, kwargs = tree_unflatten(static, spec)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_CALLS):
                    self.forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = self.forward(*args, **kwargs)
        return graph, [x for x in static if isinstance(x, torch.Tensor)], output


def cuda_device(tree: Any) -> torch.device | None:
    """The CUDA device of the first CUDA tensor in `tree`, if any."""
    return next((x.device for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor) and x.is_cuda), None)


def signature(leaves: list[Any], spec: Any) -> tuple | None:
    """What a captured graph is specific to; None when an argument is neither a CUDA tensor nor a plain value."""
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "cuda":
                return None
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            parts.append(leaf)
        else:
            return None
    return tuple(parts)


def warm_up(pipe: Any, width: int, height: int) -> None:
    """Capture (and compile, or start compiling) ahead of the first request: one short run at the model's native
    size, in the inference mode that the engine runs requests in (without CUDA graphs dynamo's graphs are specific
    to it)."""
    with torch.inference_mode():
        pipe(prompt="", num_inference_steps=2, width=width, height=height, output_type="latent")
