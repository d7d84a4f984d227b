"""Command line: generate, preload, models, serve."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from dreamsketch.config import Settings, SettingsError
from dreamsketch.engine import GenerationError, Step
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import RegistryError
from dreamsketch.request import (
    DEFAULT_STRENGTH,
    IMAGE_FORMATS,
    MAX_AREA_FACTOR,
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    RequestError,
)
from dreamsketch.schedulers import DEFAULT_SCHEDULER, SCHEDULERS


class OptionError(ValueError):
    """A command-line option that cannot work as given; the message names the option."""

    def __init__(self, option: str, rule: str) -> None:
        super().__init__(f"{option}: {rule}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreamsketch", description="DreamSketch text-to-image studio")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="make pictures from a prompt (img2img with --image)",
        description="Make pictures from a prompt and save them into the gallery (DREAMSKETCH_OUTPUT_DIR). "
        "Options left out take the model's own values.",
    )
    side = f"a multiple of 8, {MIN_SIDE}..{MAX_SIDE}; width*height at most {MAX_AREA_FACTOR}x the model's native area"
    generate.add_argument("prompt", help=f"what to draw (may be empty; at most {MAX_PROMPT_CHARS} characters)")
    generate.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help=f"what to keep out of the picture (at most {MAX_PROMPT_CHARS} characters; default: none)",
    )
    generate.add_argument(
        "--model",
        dest="model_id",
        default=None,
        metavar="ID",
        help="a model id (see `models`; default: DREAMSKETCH_DEFAULT_MODEL, else the first model usable now "
        "that is not a bundled tiny one, else tiny-shapes, else tiny-demo; with USE_LOCAL_MODELS=false the first "
        "Hub model)",
    )
    generate.add_argument("--width", type=int, help=f"picture width in pixels: {side} (default: the model's)")
    generate.add_argument("--height", type=int, help=f"picture height in pixels: {side} (default: the model's)")
    generate.add_argument("--steps", type=int, help=f"denoising steps, 1..{MAX_STEPS} (default: the model's)")
    generate.add_argument(
        "--guidance-scale",
        "--cfg",
        type=float,
        help=f"how closely to follow the prompt (CFG scale), 0..{MAX_GUIDANCE:g} (default: the model's)",
    )
    generate.add_argument(
        "--seed",
        type=int,
        help=f"0..{MAX_SEED}, or -1 for a random one (default: -1); a batch uses seed, seed+1, ...",
    )
    generate.add_argument(
        "--scheduler",
        choices=[DEFAULT_SCHEDULER, *SCHEDULERS],
        metavar="NAME",
        help=f"the sampler: {', '.join(SCHEDULERS)}, or {DEFAULT_SCHEDULER} for the model's own (the default)",
    )
    generate.add_argument("--batch-size", type=int, help=f"pictures to make, 1..{MAX_BATCH} (default: 1)")
    generate.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help=f"input picture ({', '.join(IMAGE_FORMATS)}, at most {MAX_IMAGE_BYTES // (1024 * 1024)} MB and "
        f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels, resized to width x height): makes this an img2img run",
    )
    generate.add_argument(
        "--strength",
        type=float,
        help=f"img2img denoising strength, more than 0 and at most 1 (default: {DEFAULT_STRENGTH:g})",
    )
    generate.add_argument(
        "--output",
        type=Path,
        metavar="FILE.png",
        help="also copy the picture to this PNG file, in a folder that exists (batches: name-1.png, ...)",
    )

    preload = commands.add_parser(
        "preload",
        help="download and check model weights ahead of time",
        description="Download and check model weights ahead of time; exits 1 if any could not be fetched or loaded.",
    )
    which = preload.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", nargs="+", metavar="ID", help="the models to fetch (ids from `models`)")
    which.add_argument("--all", action="store_true", help="every model in the registry")

    commands.add_parser(
        "models",
        help="list the registry's models and whether they are usable now",
        description="List the registry's models (DREAMSKETCH_MODELS_FILE) and whether their weights are usable now.",
    )
    commands.add_parser(
        "serve",
        help="start the web app (same as `python app.py`)",
        description="Start the web app (same as `python app.py`). It listens on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT "
        f"(default {Settings.server_name}:{Settings.server_port}); set those environment variables to change it.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from dreamsketch.studio import Studio

    try:
        studio = Studio()
        if args.command == "serve":
            from dreamsketch.server import serve

            serve(studio)
            return 0
        return {"generate": generate, "preload": preload, "models": models}[args.command](studio, args)
    except (
        SettingsError,
        RegistryError,
        RequestError,
        OptionError,
        ModelUnavailableError,
        GenerationError,
        OSError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def generate(studio, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    fields = {
        name: getattr(args, name)
        for name in ("negative_prompt", "model_id", "width", "height", "steps", "guidance_scale", "seed", "scheduler")
    }
    fields.update(prompt=args.prompt, batch_size=args.batch_size)
    mode = "txt2img"
    if args.image is not None:
        mode = "img2img"
        fields.update(image=read_image(args.image), strength=args.strength)
    elif args.strength is not None:
        raise RequestError("strength", "only for img2img (give --image)")
    request = studio.parse(fields, mode)
    targets = [] if args.output is None else output_targets(args.output, request.batch_size)
    studio.engine.preload(request.model_id)  # load (or fetch) the model before the bar starts
    with tqdm(total=request.denoising_steps, desc=request.model_id, unit="step") as bar:

        def on_step(step: Step) -> None:
            bar.total = step.total
            bar.update(step.step - bar.n)

        result = studio.generate(request, on_step)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for index, entry in enumerate(result.entries):
        path = studio.gallery.folder / entry.file_name
        if targets:
            try:
                copy_whole(path, targets[index])
            except OSError as exc:
                raise OptionError(
                    "--output", f"could not write {targets[index]} ({exc.strerror or exc}); the picture is {path}"
                ) from None
            path = targets[index]
        print(f"{path}  seed {entry.meta.seed}")
    return 0


def read_image(path: Path) -> bytes:
    """The bytes of --image (the request checks them as a picture), or a RequestError naming the field."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RequestError("image", f"cannot read {path}: {exc.strerror or exc}") from None


def copy_whole(source: Path, target: Path) -> None:
    """Copy by way of a temporary file beside the target, so that an interrupted copy leaves no half-written target."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def output_targets(output: Path, count: int) -> list[Path]:
    """The files --output names for `count` pictures (name.png, name-1.png, ...), checked before any model work:
    each must be a PNG file name, not a folder, in a folder that exists and can be written."""
    targets = [output, *(output.with_stem(f"{output.stem}-{index}") for index in range(1, count))]
    for target in targets:
        if target.is_dir():
            raise OptionError("--output", f"{target} is a folder; give a file name such as {target / 'picture.png'}")
    if output.suffix.lower() != ".png":
        raise OptionError("--output", f"must name a .png file, e.g. {output.with_suffix('.png')} (got {output})")
    folder = output.parent
    if not folder.is_dir():
        raise OptionError("--output", f"{folder} is not a folder" if folder.exists() else f"no such folder: {folder}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OptionError("--output", f"cannot write into {folder} ({exc.strerror or exc})") from None
    for target in targets:
        if target.exists() and not os.access(target, os.W_OK):
            raise OptionError("--output", f"{target} exists and cannot be overwritten")
    return targets


def preload(studio, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    ids = studio.registry.ids() if args.all else args.models
    failed = []
    for model_id in ids:
        try:
            if model_id not in studio.registry:
                raise ModelUnavailableError(f"unknown model {model_id!r}; known: {', '.join(studio.registry.ids())}")
            if studio.engine.preload(model_id, compiled=True):
                print(f"ok      {model_id}")
            else:  # the model works, without its compiled blocks
                print(f"ok      {model_id} (its compilation failed: see the log above)")
        except (ModelUnavailableError, OSError) as exc:
            failed.append(model_id)
            print(f"FAILED  {model_id}: {exc}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(ids)} models could not be loaded: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def models(studio, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    rows = [("ID", "FAMILY", "SIZE", "WEIGHTS", "NAME")]
    for model in studio.models():
        default = "  (default)" if model["id"] == studio.default_model else ""
        size = f"{model['width']}x{model['height']}"
        rows.append((model["id"], model["family"], size, model["weights"], f"{model['name']}{default}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]))
    return 0
