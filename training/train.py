"""Train tiny-shapes: a small Stable Diffusion pipeline that draws the scenes of training/shapes.py.

    .venv/bin/python -m training.train    # the shipped model: about 50 minutes on 2 idle CPU cores

Phase 1 trains the VAE (64x64 pictures <-> 4x16x16 latents), phase 2 the text encoder and the UNet
(v-prediction, zero terminal SNR, 10% empty captions for classifier-free guidance). Every batch, noise and timestep
comes from (seed, phase, step), so a run is reproducible and resumes from its last checkpoint
(training/runs/<run>/checkpoint.pt) exactly; it refuses to resume a run started with other settings. The loss
log is training/runs/<run>/loss.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from dreamsketch.tiny import END, MAX_TOKENS, START, byte_characters, tiny_text_config
from training import shapes

# SD's betas, rescaled to zero terminal SNR: at 16x16 latents the plain schedule leaves the picture's colours
# visible in x_T, so the model learns them from the noise instead of the caption (and then ignores the caption
# when sampling from pure noise). Zero terminal SNR needs v-prediction and "trailing" sampling timesteps.
SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
}
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-5
CHECKPOINT_EVERY = 100


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merging of one word, with the given merge ranks."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while True:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs, default=(math.inf, 0))
        if rank == math.inf:
            return pieces
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer where every grammar word is one token; other text falls back to characters."""
    merges: list[tuple[str, str]] = []
    for word in shapes.vocabulary():
        pieces = _bpe(word, {pair: rank for rank, pair in enumerate(merges)})
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces[:2] = [pieces[0] + pieces[1]]
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [START, END]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_models(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIZE,
        mid_block_add_attention=False,
    )
    # Start the posterior's log-variance at -10 (std 0.007) instead of 0: decoding unit-variance samples, the
    # VAE first learns from noise and converges about twice as slowly. Reconstruction keeps the variance low.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, hidden=64))
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def batch(scenes: list[shapes.Scene], size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = shapes.sample(scenes, size, seed)
    return to_tensor(images), captions


def cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Run:
    """Checkpoint, loss log and timing of one training run (training/runs/<name>)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = folder / "checkpoint.pt"
        self.log = folder / "loss.csv"
        self.rows: list[list] = []
        self.state: dict = {"phase": "vae", "step": 0, "seconds": 0.0}
        if self.checkpoint.exists():
            self.state = torch.load(self.checkpoint, weights_only=False)
        self.started = time.monotonic() - self.state["seconds"]

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def save(self, **state) -> None:
        """Write the checkpoint atomically, then the loss rows logged since the last one."""
        self.state = {**state, "seconds": self.seconds()}
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(self.state, tmp)
        tmp.replace(self.checkpoint)
        new = not self.log.exists()
        with self.log.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["phase", "step", "loss", "lr", "seconds"])
            writer.writerows(self.rows)
        self.rows = []


def train_phase(run: Run, name: str, models: dict, frozen: dict, steps: int, lr: float, loss_fn: Callable) -> None:
    """Train `models` for `steps` steps of `loss_fn(step) -> loss`, resumably; checkpoints also hold `frozen`."""
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = 0
    if run.state["phase"] == name:
        start = run.state["step"]
        if start:
            for key, model in models.items():
                model.load_state_dict(run.state["models"][key])
            optimizer.load_state_dict(run.state["optimizer"])
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps)
    for step in bar:
        step_lr = cosine_lr(step, steps, lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        run.rows.append([name, step + 1, f"{loss.item():.5f}", f"{step_lr:.2e}", f"{run.seconds():.0f}"])
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            states = {key: model.state_dict() for key, model in {**models, **frozen}.items()}
            run.save(phase=name, step=step + 1, models=states, optimizer=optimizer.state_dict())


def train_vae(run: Run, vae: AutoencoderKL, scenes: list[shapes.Scene], args: argparse.Namespace) -> None:
    def loss_fn(step: int) -> torch.Tensor:
        images, _ = batch(scenes, args.vae_batch, seed=args.seed * 1_000_003 + step)
        posterior = vae.encode(images).latent_dist
        generator = torch.Generator().manual_seed(args.seed + step)
        decoded = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return torch.nn.functional.mse_loss(decoded, images) + KL_WEIGHT * kl

    if run.state["phase"] == "vae":
        train_phase(run, "vae", {"vae": vae}, {}, args.vae_steps, args.vae_lr, loss_fn)
    else:
        vae.load_state_dict(run.state["models"]["vae"])


def latent_scale(vae: AutoencoderKL, scenes: list[shapes.Scene], seed: int) -> float:
    """1 / the standard deviation of the latents, so that the UNet sees unit-variance latents."""
    images, _ = batch(scenes, 512, seed)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(seed))
    return 1 / latents.std().item()


def train_unet(
    run: Run,
    models: tuple[CLIPTokenizer, AutoencoderKL, CLIPTextModel, UNet2DConditionModel],
    scenes: list[shapes.Scene],
    args: argparse.Namespace,
) -> None:
    tokenizer, vae, text_encoder, unet = models
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    scale = vae.config.scaling_factor

    def loss_fn(step: int) -> torch.Tensor:
        seed = args.seed * 1_000_003 + 500_000 + step
        images, captions = batch(scenes, args.batch, seed)
        generator = torch.Generator().manual_seed(seed)
        drop = torch.rand(len(captions), generator=generator) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids).last_hidden_state).sample
        return torch.nn.functional.mse_loss(prediction, noise_scheduler.get_velocity(latents, noise, timesteps))

    trainable = {"text_encoder": text_encoder, "unet": unet}
    train_phase(run, "unet", trainable, {"vae": vae}, args.unet_steps, args.unet_lr, loss_fn)


def assemble(
    tokenizer: CLIPTokenizer, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    scheduler = DDIMScheduler(
        **SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def whole(lowest: int, highest: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `lowest` (to `highest`)."""

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or not text.isascii():  # int() takes "1_0" and other digits
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text})")
        value = int(text)
        if value < lowest or (highest is not None and value > highest):
            span = f"at least {lowest}" if highest is None else f"from {lowest} to {highest}"
            raise argparse.ArgumentTypeError(f"must be a whole number {span} (got {text})")
        return value

    return parse


def rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0 (got {text})")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's settings, each checked here: a bad one used to fail with a traceback after the VAE phase, or to
    save an untrained model over the shipped one (0 steps)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="tiny-shapes", help="run name: checkpoints in training/runs/<run>")
    parser.add_argument("--out", default="models/tiny-shapes", help="where the diffusers folder is saved")
    parser.add_argument("--seed", type=whole(0, 2**32 - 1), default=0)
    parser.add_argument("--vae-steps", type=whole(1), default=2500)
    parser.add_argument("--vae-batch", type=whole(1), default=16)
    parser.add_argument("--vae-lr", type=rate, default=3e-3)
    parser.add_argument("--unet-steps", type=whole(1), default=6400)
    parser.add_argument("--batch", type=whole(1), default=32)
    parser.add_argument("--unet-lr", type=rate, default=1e-3)
    parser.add_argument("--threads", type=whole(1), default=2, help="CPU threads (the weights depend on it too)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    folder = out if out.exists() else next(parent for parent in out.parents if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        parser.error(f"--out: {args.out} cannot be written (a file, or a folder this user cannot write in, is there)")
    return args


# The settings that decide the weights (the thread count too: it changes how sums are rounded); a run resumes only
# with the same ones.
SETTINGS = ("seed", "vae_steps", "vae_batch", "vae_lr", "unet_steps", "batch", "unet_lr", "threads")


def check_settings(run: Run, args: argparse.Namespace) -> None:
    """Stop if the run folder holds a checkpoint of a run started with other settings (e.g. an older default)."""
    saved = run.folder / "args.json"
    if not (run.checkpoint.exists() and saved.exists()):
        return
    before = json.loads(saved.read_text())
    changed = {key: (before.get(key), getattr(args, key)) for key in SETTINGS if before.get(key) != getattr(args, key)}
    if changed:
        raise SystemExit(
            f"{run.folder} was started with other settings {changed} (before, now); resume with the settings "
            "it began with, use another --run, or delete that folder to start afresh"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Run(Path(__file__).parent / "runs" / args.run)
    check_settings(run, args)
    (run.folder / "args.json").write_text(json.dumps(vars(args), indent=2))
    scenes, _ = shapes.split_scenes()
    tokenizer = build_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer)
    train_vae(run, vae, scenes, args)
    vae.requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=latent_scale(vae, scenes, args.seed))
    train_unet(run, (tokenizer, vae, text_encoder, unet), scenes, args)
    assemble(tokenizer, vae, text_encoder, unet).save_pretrained(args.out, safe_serialization=True)
    summary = {"seconds": round(run.seconds()), "scaling_factor": vae.config.scaling_factor, **vars(args)}
    (run.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {args.out} after {summary['seconds'] / 60:.1f} minutes of training")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the last checkpoint is kept: the same command resumes from it
        raise SystemExit("interrupted; run the same command again to resume from the last checkpoint") from None
