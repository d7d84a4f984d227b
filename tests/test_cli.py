import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.load import server_process
from dreamsketch.cli import build_parser, copy_whole, main
from dreamsketch.config import Settings, SettingsError
from dreamsketch.engine import LocalEngine
from dreamsketch.gallery import read_parameters
from dreamsketch.request import MAX_BATCH, MAX_GUIDANCE, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE
from dreamsketch.server import listen
from dreamsketch.studio import Studio
from tests.conftest import entry, write_registry

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
    for text in ("tiny-demo", "stable-diffusion-v1-5", "not cached, Hub offline", "(default)"):
        assert text in listing.stdout
    preload = run_cli(tmp_path, "preload", "--models", "tiny-demo", "stable-diffusion-v1-5")
    assert preload.returncode == 1
    assert "ok      tiny-demo" in preload.stdout
    assert "FAILED  stable-diffusion-v1-5" in preload.stderr and "1 of 2 models could not be loaded" in preload.stderr


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`python -m dreamsketch ...` run in this process: (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMSKETCH_MODELS_FILE", str(REPO_ROOT / "models.yaml"))
    monkeypatch.setenv("DREAMSKETCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("DREAMSKETCH_DEFAULT_MODEL", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model or generating fails the test: the request must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("model work for a request that should have been refused")

    monkeypatch.setattr(Studio, "generate", refuse)
    monkeypatch.setattr(LocalEngine, "preload", refuse)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("/nonexistent-dir/x.png", "error: --output: no such folder: /nonexistent-dir"),
        ("existing", "error: --output: existing is a folder"),
        ("a-file.png/x.png", "error: --output: a-file.png is not a folder"),
        ("fox.jpg", "error: --output: must name a .png file"),
        ("fox", "error: --output: must name a .png file"),
        ("taken.png", "error: --output: taken-1.png is a folder"),  # the batch's second picture
    ],
)
def test_output_that_cannot_be_written_is_refused_before_any_model_work(tmp_path, cli, no_model_work, output, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "taken-1.png").mkdir()
    (tmp_path / "a-file.png").write_bytes(b"x")
    args = ["generate", "x", "--model", "tiny-demo", "--steps", "2", "--batch-size", "2", "--output", output]
    code, out, err = cli(*args)
    assert code == 2 and err.strip().startswith(message), err
    assert out == "" and "Traceback" not in err
    assert not list((tmp_path / "outputs").glob("*.png"))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("missing.png", "error: field 'image': cannot read missing.png: No such file or directory"),
        ("folder", "error: field 'image': cannot read folder: Is a directory"),
    ],
)
def test_unreadable_input_image_names_the_field(tmp_path, cli, no_model_work, image, message):
    (tmp_path / "folder").mkdir()
    code, out, err = cli("generate", "x", "--model", "tiny-demo", "--image", image, "--output", "x.png")
    assert code == 2 and err.strip() == message, err


def test_models_table_lines_up_for_any_ids_and_sizes(tmp_path, cli, monkeypatch):
    registry = [
        entry("a-model-id-much-longer-than-the-others", "nobody-here/not-cached", 1024, name="Big one"),
        entry("tiny-demo", "builtin:tiny", 64, name="Small one"),
        entry("mid", "builtin:tiny", 512, name="Middle one"),
    ]
    write_registry(tmp_path / "models.yaml", registry)
    monkeypatch.setenv("DREAMSKETCH_MODELS_FILE", str(tmp_path / "models.yaml"))
    code, out, _err = cli("models")
    assert code == 0
    rows = [line for line in out.splitlines() if any(e["name"] in line for e in registry)]
    assert len(rows) == 3
    for column in (
        [f"{e['width']}x{e['height']}" for e in registry],
        ["not cached, Hub offline", "ready offline", "ready offline"],
        [e["name"] for e in registry],
    ):
        starts = {row.index(cell) for row, cell in zip(rows, column, strict=True)}
        assert len(starts) == 1, out
    assert all(line == line.rstrip() for line in out.splitlines())


def test_default_scheduler_and_negative_zero_cfg(tmp_path, cli):
    args = ["generate", "x", "--model", "tiny-demo", "--steps", "1", "--width", "64", "--height", "64"]
    code, _out, err = cli(*args, "--scheduler", "Default", "--cfg", "-0.0", "--output", "x.png")
    assert code == 0, err
    parameters = read_parameters(Image.open(tmp_path / "x.png"))
    assert "Sampler: Euler a, CFG scale: 0, Seed:" in parameters, parameters  # tiny-demo's own scheduler


# Exit status 130, or the process ends by SIGINT itself: Python does so at exit after some Ctrl-Cs during imports
# (seen 1 time in 10 at 2.5 s), even when the KeyboardInterrupt was handled. A shell shows 130 either way.
INTERRUPTED = (130, -signal.SIGINT)


def test_generate_interrupted_says_so_in_one_line_and_writes_nothing(tmp_path):
    """Ctrl-C once the steps have begun: one line, exit status 130, no picture and no temporary file anywhere (the
    gallery's index is made at start)."""
    env = {**os.environ, "DREAMSKETCH_MODELS_FILE": str(REPO_ROOT / "models.yaml"), "HF_HUB_OFFLINE": "1"}
    env["DREAMSKETCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    args = ["generate", "x", "--model", "tiny-demo", "--steps", "150", "--output", "x.png"]
    process = subprocess.Popen(
        [sys.executable, "-m", "dreamsketch", *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored, as in a background job
    )
    assert process.stderr is not None
    shown = b""
    while not re.search(rb" [1-9][0-9]*/150 ", shown):  # a step done: generation has started
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, shown.decode()
        shown += chunk
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    err = (shown + rest).decode()
    assert process.returncode in INTERRUPTED, err
    assert err.rstrip().endswith("\ninterrupted") and "Traceback" not in err, err
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == ["gallery.sqlite3"], err
    assert "/150 " in err and "150/150" not in err, err  # stopped mid-steps


def test_ctrl_c_while_the_cli_starts_is_one_line_too(tmp_path):
    """Ctrl-C in the second or more of imports (torch, diffusers) printed a KeyboardInterrupt traceback."""
    env = {**os.environ, "DREAMSKETCH_MODELS_FILE": str(REPO_ROOT / "models.yaml"), "HF_HUB_OFFLINE": "1"}
    env["DREAMSKETCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    process = subprocess.Popen(
        [sys.executable, "-m", "dreamsketch", "generate", "x", "--model", "tiny-demo", "--steps", "150"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.5)  # past the interpreter's own start, into the imports (or later: the same line either way)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode in INTERRUPTED and err.decode().rstrip().endswith("interrupted"), err.decode()
    assert b"Traceback" not in err, err.decode()


def test_an_interrupted_output_copy_leaves_the_old_file_whole(tmp_path, monkeypatch):
    source, target = tmp_path / "new.png", tmp_path / "out.png"
    source.write_bytes(b"new picture")
    target.write_bytes(b"old picture")

    def copy_half_then_interrupt(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr("shutil.copyfile", copy_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        copy_whole(source, target)
    assert target.read_bytes() == b"old picture"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.png", "out.png"]
    monkeypatch.undo()
    copy_whole(source, target)
    assert target.read_bytes() == b"new picture"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.png", "out.png"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_with_its_bounds():
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    generate = " ".join(subcommands()["generate"].format_help().split())
    for text in (f"{MIN_SIDE}..{MAX_SIDE}", f"1..{MAX_STEPS}", f"0..{MAX_GUIDANCE:g}", f"1..{MAX_BATCH}"):
        assert text in generate
    assert str(MAX_SEED) in generate and "DPM++ 2M Karras" in generate
    serve = " ".join(subcommands()["serve"].format_help().split())
    assert "GRADIO_SERVER_NAME" in serve and "GRADIO_SERVER_PORT" in serve and "127.0.0.1:7860" in serve


def test_a_prompt_past_the_text_encoders_length_is_reported_once(tmp_path):
    """diffusers' and transformers' own warnings of the cut were printed as well, in other words."""
    args = ["generate", "a red fox in the snow " * 20, "--model", "tiny-demo", "--steps", "1", "--output", "x.png"]
    done = run_cli(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert "truncated" not in done.stderr and "sequence length" not in done.stderr, done.stderr
    assert done.stderr.count("warning: prompt is 320 tokens; the text encoder reads 75") == 1, done.stderr


def test_model_loading_shows_no_progress_bars_of_its_own(tmp_path):
    """tiny-shapes is a diffusers folder: diffusers and transformers would draw loading bars into generate's."""
    done = run_cli(tmp_path, "generate", "x", "--model", "tiny-shapes", "--steps", "2", "--output", "x.png")
    assert done.returncode == 0, done.stderr
    assert "Loading pipeline components" not in done.stderr and "Loading weights" not in done.stderr
    bar = re.search(r"tiny-shapes: +0%", done.stderr)
    assert bar and done.stderr.index("loading tiny-shapes from") < bar.start(), done.stderr


@pytest.mark.parametrize("command", [["app.py"], ["-m", "dreamsketch", "serve"]])
def test_a_start_up_mistake_is_one_line_not_a_traceback(tmp_path, command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMSKETCH_MAX_LOADED": "abc"}
    env["DREAMSKETCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    done = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: DREAMSKETCH_MAX_LOADED='abc'"), done.stderr


@pytest.mark.parametrize("command", [["app.py"], ["-m", "dreamsketch", "serve"]])
def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path, command):
    """uvicorn announced the address, then failed with its own message and status 3."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port)}
        env["DREAMSKETCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
        done = subprocess.run(
            [sys.executable, *command], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
        )
    assert done.returncode not in (0, 3) and "Traceback" not in done.stderr and "DreamSketch on" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: GRADIO_SERVER_NAME='127.0.0.1', GRADIO_SERVER_PORT={port}: cannot listen"), last


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 here")
def test_listening_on_every_ipv6_address_takes_ipv4_too_as_the_start_up_line_says():
    """GRADIO_SERVER_NAME=:: listened on IPv6 only, while the start-up line gave http://127.0.0.1:PORT."""
    try:
        sock = listen(Settings(server_name="::", server_port=0))
    except SettingsError as exc:
        pytest.skip(f"cannot listen on :: here ({exc})")
    with sock, socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5):
        pass
    assert Settings(server_name="::").local_url == "http://127.0.0.1:7860"
    assert Settings(server_name="::1", server_port=8000).local_url == "http://[::1]:8000"


def test_ctrl_c_on_app_py_ends_with_one_line(tmp_path):
    """`make run` is `python app.py`: after the server stopped, Ctrl-C ended in KeyboardInterrupt's traceback."""
    app_py = str(Path(__file__).resolve().parent.parent / "app.py")
    with server_process(tmp_path, queue_size=4, command=(app_py,)) as (_url, process):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130  # psutil: raises TimeoutExpired if it is still running
    log = (tmp_path / "server.log").read_text()
    assert log.rstrip().endswith("interrupted") and "Traceback" not in log, log[-2000:]


def test_serve_logs_what_it_uses_and_stops_on_sigterm_while_a_browser_tab_is_open(tmp_path):
    """A browser tab keeps a heartbeat stream open, and the server waited for it to close before it stopped."""
    with (
        server_process(tmp_path, queue_size=4) as (url, process),
        httpx.stream("GET", f"{url}/gradio_api/heartbeat/a-tab", timeout=60) as heartbeat,
    ):
        assert heartbeat.status_code == 200
        assert httpx.post(f"{url}/api/txt2img", json={"steps": 1}, timeout=60).status_code == 200  # loaded by now
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # psutil: raises TimeoutExpired if it is still running
    log = (tmp_path / "server.log").read_text()
    assert "default model: tiny-demo (DREAMSKETCH_DEFAULT_MODEL)" in log and "loaded tiny-demo in" in log
    assert f"gallery: {tmp_path / 'outputs'} (0 images)" in log and "Loading pipeline components" not in log
    assert "Traceback" not in log, log  # the tab's stream ends at once, not cut after the grace period
