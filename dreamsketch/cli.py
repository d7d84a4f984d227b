"""Command line: generate, preload, models, serve."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from dreamsketch.config import SettingsError
from dreamsketch.engine import GenerationError, Step
from dreamsketch.pipelines import ModelUnavailableError
from dreamsketch.registry import RegistryError
from dreamsketch.request import RequestError
from dreamsketch.schedulers import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreamsketch", description="DreamSketch text-to-image studio")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="make pictures from a prompt (img2img with --image)")
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--model", dest="model_id", default=None, help="a model id (see `models`)")
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--guidance-scale", "--cfg", type=float)
    generate.add_argument("--seed", type=int, help="-1 for a random seed (default)")
    generate.add_argument("--scheduler", choices=list(SCHEDULERS))
    generate.add_argument("--batch-size", type=int)
    generate.add_argument("--image", type=Path, help="input picture: makes this an img2img run")
    generate.add_argument("--strength", type=float, help="img2img denoising strength, 0..1")
    generate.add_argument("--output", type=Path, help="also copy the picture here (batches: name-1.png, ...)")

    preload = commands.add_parser("preload", help="download and check model weights ahead of time")
    which = preload.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", nargs="+", metavar="ID")
    which.add_argument("--all", action="store_true")

    commands.add_parser("models", help="list the registry's models and whether they are usable now")
    commands.add_parser("serve", help="start the web app (same as `python app.py`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from dreamsketch.server import serve

        serve()
        return 0
    from dreamsketch.studio import Studio

    try:
        studio = Studio()
        return {"generate": generate, "preload": preload, "models": models}[args.command](studio, args)
    except (SettingsError, RegistryError, RequestError, ModelUnavailableError, GenerationError, OSError) as exc:
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
        fields.update(image=args.image.read_bytes(), strength=args.strength)
    elif args.strength is not None:
        raise RequestError("strength", "only for img2img (give --image)")
    request = studio.parse(fields, mode)
    with tqdm(total=request.steps, desc=request.model_id, unit="step") as bar:

        def on_step(step: Step) -> None:
            bar.total = step.total
            bar.update(step.step - bar.n)

        result = studio.generate(request, on_step)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for index, entry in enumerate(result.entries):
        path = studio.gallery.folder / entry.file_name
        if args.output is not None:
            target = args.output if index == 0 else args.output.with_stem(f"{args.output.stem}-{index}")
            shutil.copyfile(path, target)
            path = target
        print(f"{path}  seed {entry.meta.seed}")
    return 0


def preload(studio, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    ids = studio.registry.ids() if args.all else args.models
    failed = []
    for model_id in ids:
        try:
            if model_id not in studio.registry:
                raise ModelUnavailableError(f"unknown model {model_id!r}; known: {', '.join(studio.registry.ids())}")
            studio.engine.preload(model_id)
            print(f"ok      {model_id}")
        except (ModelUnavailableError, OSError) as exc:
            failed.append(model_id)
            print(f"FAILED  {model_id}: {exc}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(ids)} models could not be fetched: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def models(studio, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    for model in studio.models():
        usable = "usable now" if model["available"] else "not cached"
        default = "  (default)" if model["id"] == studio.default_model else ""
        print(
            f"{model['id']:<24} {model['family']:<5} {model['width']}x{model['height']:<5} {usable:<11} "
            f"{model['name']}{default}"
        )
    return 0
