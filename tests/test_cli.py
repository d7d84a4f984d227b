import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dreamsketch.gallery import read_parameters

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(tmp_path, *args):
    env = {**os.environ, "DREAMSKETCH_MODELS_FILE": str(REPO_ROOT / "models.yaml"), "HF_HUB_OFFLINE": "1"}
    env["DREAMSKETCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    return subprocess.run(
        [sys.executable, "-m", "dreamsketch", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )


def test_generate_twice_gives_identical_pictures_with_the_parameters(tmp_path):
    args = ["generate", "a red fox", "--model", "tiny-demo", "--seed", "7", "--steps", "4", "--width", "128"]
    args += ["--height", "128"]
    for name in ("fox.png", "fox2.png"):
        done = run_cli(tmp_path, *args, "--output", name)
        assert done.returncode == 0, done.stderr
    first, second = Image.open(tmp_path / "fox.png"), Image.open(tmp_path / "fox2.png")
    assert np.array_equal(np.asarray(first), np.asarray(second))
    parameters = read_parameters(first)
    assert parameters.startswith("a red fox\n")
    for part in ("Steps: 4", "Seed: 7", "Size: 128x128", "Model: tiny-demo", "Sampler: Euler a", "CFG scale: 7.5"):
        assert part in parameters
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 2


def test_img2img_batch_and_errors(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.png")
    args = ["generate", "sea", "--model", "tiny-demo", "--steps", "2", "--image", "in.png", "--strength", "0.5"]
    done = run_cli(tmp_path, *args, "--batch-size", "2", "--seed", "1", "--output", "sea.png")
    assert done.returncode == 0, done.stderr
    assert "Denoising strength: 0.5" in read_parameters(Image.open(tmp_path / "sea-1.png"))
    assert "seed 2" in done.stdout
    bad = run_cli(tmp_path, "generate", "x", "--model", "tiny-demo", "--width", "100")
    assert bad.returncode == 2 and "field 'width': must be a multiple of 8" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_models_and_preload_report_what_is_usable(tmp_path):
    listing = run_cli(tmp_path, "models")
    assert listing.returncode == 0
    for text in ("tiny-demo", "stable-diffusion-v1-5", "not cached", "(default)"):
        assert text in listing.stdout
    preload = run_cli(tmp_path, "preload", "--models", "tiny-demo", "stable-diffusion-v1-5")
    assert preload.returncode == 1
    assert "ok      tiny-demo" in preload.stdout
    assert "FAILED  stable-diffusion-v1-5" in preload.stderr and "1 of 2 models could not be fetched" in preload.stderr
