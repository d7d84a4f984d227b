"""The compiled fast path gives the plain path's pictures. On the CPU torch.compile traces with aot_eager
(inductor's CPU code generation takes minutes on two cores); on CUDA the same graph goes to inductor."""

import dataclasses

import numpy as np
import torch

import dreamsketch.fastpath
from dreamsketch.engine import LocalEngine
from dreamsketch.fastpath import apply_fast_path
from dreamsketch.registry import load_registry
from dreamsketch.request import parse_request
from dreamsketch.tiny import build_tiny_pipeline


def test_fast_path_output_equals_the_plain_path():
    plain, fast = build_tiny_pipeline(), apply_fast_path(build_tiny_pipeline(), backend="aot_eager")
    assert fast.unet.__class__.__name__ == "OptimizedModule"
    unet = fast.unet._orig_mod
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(hasattr(module, "to_qkv") for module in unet.modules())  # fused QKV projections
    kwargs = dict(prompt="a red fox", num_inference_steps=4, height=128, width=128, output_type="np")
    for seed in (1, 2):
        a = plain(**kwargs, generator=torch.Generator().manual_seed(seed)).images
        b = fast(**kwargs, generator=torch.Generator().manual_seed(seed)).images
        assert np.abs(a - b).max() < 1e-4


def test_compile_setting_applies_the_fast_path_and_warms_up_at_load(settings, monkeypatch):
    calls = []
    original = dreamsketch.fastpath.apply_fast_path

    def traced(pipe, backend="inductor"):
        calls.append(backend)
        return original(pipe, backend="aot_eager")

    monkeypatch.setattr("dreamsketch.pipelines.apply_fast_path", traced)
    engine = LocalEngine(dataclasses.replace(settings, compile=True), load_registry(settings.models_file))
    plain = LocalEngine(settings, load_registry(settings.models_file))
    request = parse_request({"prompt": "fox", "seed": 3, "steps": 3}, plain.cache.registry, "txt2img", "tiny-demo")
    fast_image = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    plain_image = np.asarray(plain.generate(request).images[0], dtype=np.int16)
    assert calls == ["inductor"]
    assert np.abs(fast_image - plain_image).max() <= 1
