"""The benchmarks run here in their small form (tiny model, CPU): they work and report every figure.
No timing is asserted."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks import compile_regions, cpu_overhead, gpu_pipeline, request_phases, scheduler_steps
from dreamsketch import fastpath
from dreamsketch.schedulers import SCHEDULERS


@pytest.mark.slow
def test_gpu_pipeline_small_form_reports_every_figure(capsys):
    argv = ["--small", "--runs", "1", "--compile-backend", "aot_eager", "--variants", *gpu_pipeline.VARIANTS]
    assert gpu_pipeline.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["benchmark"] == "gpu_pipeline"
    assert set(report["models"]) == {"tiny-sd15_128", "tiny-sdxl_128"}
    for model in report["models"].values():
        check_model_figures(model)


def test_gpu_pipeline_first_call_form(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    argv = ["--small", "--first-call", "--only", "sd15", "--compile-backend", "aot_eager"]
    assert gpu_pipeline.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    figures = report["models"]["tiny-sd15_128"]["dreamsketch_compile"]
    assert figures["first_call_s"] > 0 and figures["compile_cache"] == str(tmp_path)
    assert figures["cache_files_before"] == 0


def test_gpu_pipeline_regions_experiment_compiles_only_the_named_blocks(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    graphs = {}
    for regions in (["BasicTransformerBlock"], list(fastpath.REGIONS)):
        torch._dynamo.reset()
        argv = ["--small", "--first-call", "--only", "sd15", "--compile-backend", "aot_eager", "--regions", *regions]
        assert gpu_pipeline.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["settings"]["compiled_regions"] == regions
        graphs[regions[0]] = counters["stats"]["unique_graphs"]
    assert 0 < graphs["BasicTransformerBlock"] < graphs[fastpath.REGIONS[0]]
    assert fastpath.REGIONS == ("ResnetBlock2D", "BasicTransformerBlock")  # the experiment's choice is undone


def test_compile_regions_small_form_compiles_once_per_block_configuration(capsys):
    assert compile_regions.main(["--small"]) == 0
    report = json.loads(capsys.readouterr().out)
    for model in ("tiny-sd15_128", "tiny-sdxl_128"):
        figures = report[model]
        assert figures["graph_breaks"] == 0 and figures["graphs_compiled_by_later_calls"] == 0
        assert [call["batch"] for call in figures["calls"]] == [batch for batch, _, _ in compile_regions.SHAPES]
        assert all(call["max_difference_vs_eager"] < 1e-4 for call in figures["calls"])
    all_regions = report["tiny-sd15_128"]["calls"][0]["graphs_compiled"]
    assert all_regions > 0
    assert compile_regions.main(["--small", "--only", "sd15", "--regions", "BasicTransformerBlock"]) == 0
    transformers_only = json.loads(capsys.readouterr().out)
    assert transformers_only["regions"] == ["BasicTransformerBlock"]
    assert 0 < transformers_only["tiny-sd15_128"]["calls"][0]["graphs_compiled"] < all_regions
    assert compile_regions.main(["--small", "--only", "sd15", "--top-levels", "1"]) == 0
    top_level = json.loads(capsys.readouterr().out)["tiny-sd15_128"]
    assert 0 < top_level["calls"][0]["graphs_compiled"] < all_regions
    assert top_level["graphs_compiled_by_later_calls"] == 0
    assert all(call["max_difference_vs_eager"] < 1e-4 for call in top_level["calls"])
    assert fastpath.compile_regions.__name__ == "compile_regions"  # the experiment's choice is undone


def check_model_figures(model):
    for variant in ("plain_diffusers", *gpu_pipeline.VARIANTS):
        stats = model[variant]
        for key in ("latency_p50_s", "unet_ms_per_step", "it_per_s", "achieved_tflops", "share_of_peak_pct"):
            assert stats[key] >= 0
        assert stats["first_call_s"] > 0
    for variant in gpu_pipeline.VARIANTS:  # fp32 on the CPU: the engine's picture is plain diffusers'
        assert model[variant]["pixel_difference_vs_plain"]["max"] <= 2
    assert model["plain_diffusers"]["sequential_images_per_s"] > 0
    for variant in gpu_pipeline.VARIANTS:
        at_once = model[variant]["at_once"]
        assert set(at_once) == {"4", "8"}
        for clients, figures in at_once.items():  # every request ran once, in batches the engine allows
            assert figures["images_per_s"] > 0 and sum(figures["batches"]) == int(clients)
            assert figures["vs_plain_one_after_another"] > 0 and figures["vs_itself_one_after_another"] > 0
            assert max(figures["batches"]) <= 8
            assert figures["peak_memory_gb"] is None and figures["peak_reserved_gb"] is None  # CUDA only


def test_request_phases_small_form_times_each_phase(capsys, monkeypatch, request):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # experiments change both for the process
    order = torch._C._get_sdp_priority_order()
    request.addfinalizer(lambda: torch._C._set_sdp_priority_order(order))
    argv = ["--small", "--runs", "2", "--profile", "5", "--cudnn-benchmark", "--cudnn-attention"]
    argv += ["--compile-vae", "--compile-backend", "aot_eager"]
    assert request_phases.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["variant"] == "default" and report["model"] == "tiny-sd15_128"
    assert report["phase_calls"] == {
        "encode_prompt": 1,
        "unet": 4,  # tiny-demo's 4 steps, one UNet call each (CFG batched)
        "scheduler_step": 4,
        "vae_decode": 1,
        "to_pictures": 1,
    }
    assert all(report["phases_ms"][phase] > 0 for phase in request_phases.PHASES)
    assert report["rest_ms"] >= 0  # the phases do not overlap: they fit inside the request
    assert "Self CPU time total" in captured.err  # the profiler's table
    assert report["device_busy_ms"] == 0  # kernels and copies on a device: none on the CPU
    parts = [json.loads(line) for line in captured.err.splitlines() if line.startswith('{"model"')]
    assert [part["variant"] for part in parts] == [
        "default",
        "default + cudnn_benchmark",
        "default + cudnn_attention",
        "default + vae_compiled",
    ]  # each part as it finishes, for a run cut short
    assert parts[0]["phases_ms"] == report["phases_ms"]
    for experiment in ("cudnn_benchmark", "cudnn_attention"):  # no cuDNN on the CPU: the same computation
        assert report[experiment]["pixel_difference_max"] == 0
    compiled = report["vae_compiled"]  # fp32 on the CPU: the compiled VAE gives the eager VAE's picture
    assert compiled["pixel_difference_max"] <= 1 and compiled["phase_calls"] == report["phase_calls"]
    assert request_phases.main(["--small", "--runs", "1", "--scheduler", "PNDM"]) == 0
    pndm = json.loads(capsys.readouterr().out)
    assert pndm["scheduler"] == "PNDM" and pndm["phase_calls"]["scheduler_step"] == 5  # PLMS repeats its first step


@pytest.mark.slow
def test_cpu_overhead_reports_every_path_and_part(capsys):
    assert cpu_overhead.main(["--runs", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    paths = ("direct_engine", "studio_generate", "http_api", "gradio_client", "gradio_trivial_endpoint")
    assert set(report["latency"]) == set(paths)
    assert all(report["latency"][path]["p50_ms"] > 0 for path in paths)
    assert set(report["added_p50_ms"]) == {
        "http_api_over_direct_engine",
        "gradio_client_over_trivial_endpoint_and_engine",
    }
    parts = ("inference_p50_ms", "png_encoding_p50_ms", "gallery_write_p50_ms", "gradio_queue_and_transport_p50_ms")
    assert set(report["parts"]) == set(parts)


def test_scheduler_steps_small_form_times_every_scheduler(capsys):
    assert scheduler_steps.main(["--steps", "3", "--side", "8", "--runs", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latents"] == [1, 4, 8, 8] and set(report["schedulers"]) == set(SCHEDULERS)
    calls = {name: figures["step_calls"] for name, figures in report["schedulers"].items()}
    assert calls["Euler a"] == 3 and calls["Heun"] == calls["DPM++ SDE Karras"] == 5  # two evaluations a step
    assert all(figures["steps_ms"] > 0 for figures in report["schedulers"].values())
