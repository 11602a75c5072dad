"""The Fashion-MNIST ViT token reduction is measured on: trained here, cached, saved and loaded.

No package ships a pretrained ViT, so prunekit trains its own (patch 4 on 28×28 images: 49 patches
and a [CLS] token) with the shared training loop. Training is resumable epoch by epoch, so it can
run in short sessions on a busy machine; the finished model is cached as config.json +
model.safetensors.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunekit.core.cache import cache_dir
from prunekit.errors import PrunekitError
from prunekit.io.atomic import atomic_directory
from prunekit.models.vit import ViT

FASHION_VIT_SETTINGS: dict[str, Any] = {"image_size": 28, "patch_size": 4, "in_channels": 1, "num_classes": 10,
                                        "dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0}
TRAINING: dict[str, Any] = {"epochs": 3, "batch_size": 128, "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05,
                            "schedule": "the peak rate for the first epoch, then cosine decay to zero over the "
                                        "remaining epochs, set per quarter epoch", "seed": 0,
                            "data": "Fashion-MNIST train split, all 60000 images, normalised"}
FASHION_VIT_NAME = "fashion-vit"
_CACHE_NAME = "fashion-vit-p4-d6-w192"
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


def vit_settings(model: ViT) -> dict[str, Any]:
    """Constructor arguments of a (uniform) prunekit ViT, read off its layers."""
    block = model.blocks[0]
    patch = model.patch_embed
    side = int(round(math.sqrt(model.num_patches))) * patch.kernel_size[0]
    return {"image_size": side, "patch_size": patch.kernel_size[0], "in_channels": patch.in_channels,
            "num_classes": model.head.out_features, "dim": patch.out_channels, "depth": len(model.blocks),
            "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / patch.out_channels}


def save_vit(model: ViT, path: str | os.PathLike, extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / _CONFIG).write_text(json.dumps({"architecture": "prunekit.models.vit.ViT", **vit_settings(model),
                                               **({"info": extra} if extra else {})}, indent=2))
        save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}, tmp / _WEIGHTS)
    return Path(path)


def is_vit_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / _CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("architecture") == "prunekit.models.vit.ViT"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_vit(path: str | os.PathLike) -> ViT:
    path = Path(path)
    try:
        config = json.loads((path / _CONFIG).read_text())
        settings = {key: config[key] for key in FASHION_VIT_SETTINGS}
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise PrunekitError(f"{path} is not a prunekit ViT directory: {exc}") from None
    model = ViT(**settings)
    try:
        model.load_state_dict(load_file(path / _WEIGHTS))
    except Exception as exc:
        raise PrunekitError(f"could not load the ViT weights in {path}: {type(exc).__name__}: {exc}") from None
    return model.eval()


def fashion_vit_dir() -> Path:
    return cache_dir("models") / _CACHE_NAME


def load_fashion_vit() -> ViT:
    folder = fashion_vit_dir()
    if not (folder / _WEIGHTS).exists():
        raise PrunekitError(f"the Fashion-MNIST ViT is not trained yet ({folder} is empty); train it with "
                            "`python benchmarks/tokens_vit.py train` (3 epochs, checkpointed every quarter epoch; 5 to 15 minutes a quarter on 2 cores, depending on load)")
    return load_vit(folder)


@dataclass
class TrainingProgress:
    parts_done: int
    parts: int
    losses: list[float]
    finished: bool
    path: Path


PARTS_PER_EPOCH = 4  # checkpoints per epoch, so a session on a busy machine never runs long


def _learning_rate(part: int, parts: int) -> float:
    """The peak rate through the first epoch, then cosine decay to zero over the rest (per part)."""
    if part < PARTS_PER_EPOCH:
        return TRAINING["lr"]
    return TRAINING["lr"] * 0.5 * (1 + math.cos(math.pi * (part - PARTS_PER_EPOCH) / (parts - PARTS_PER_EPOCH)))


def train_fashion_vit(max_minutes: float | None = None, epochs: int = TRAINING["epochs"]) -> TrainingProgress:
    """Train (or continue training) the cached Fashion-MNIST ViT, a quarter epoch at a time.

    Every epoch visits each training image once in a seeded random order. The model, optimizer and
    progress are checkpointed after every quarter; with ``max_minutes`` the call stops after the
    quarter that crosses the budget, and the next call continues from there.
    """
    from prunekit.models.fashion_mnist import load_fashion_mnist
    from prunekit.training.loop import make_optimizer, train_classifier

    final = fashion_vit_dir()
    parts = epochs * PARTS_PER_EPOCH
    if (final / _WEIGHTS).exists():
        return TrainingProgress(parts, parts, [], True, final)
    work = cache_dir("models", f"{_CACHE_NAME}.training")
    checkpoint = work / "checkpoint.pt"
    torch.manual_seed(TRAINING["seed"])
    model = ViT(**FASHION_VIT_SETTINGS)
    optimizer = make_optimizer(model, "adamw", lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"])
    done, losses = 0, []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        done = int(saved["parts_done"]) if "parts_done" in saved else int(saved["epochs_done"]) * PARTS_PER_EPOCH
        losses = list(saved["losses"])
    data = load_fashion_mnist("train")
    count = len(data)
    started = time.monotonic()
    while done < parts:
        epoch, quarter = divmod(done, PARTS_PER_EPOCH)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(TRAINING["seed"] + epoch))
        indices = order[quarter * count // PARTS_PER_EPOCH:(quarter + 1) * count // PARTS_PER_EPOCH]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(done, parts)
        history = train_classifier(model, data.images[indices], data.labels[indices], epochs=1,
                                   batch_size=TRAINING["batch_size"], optimizer=optimizer, seed=TRAINING["seed"] + done,
                                   cosine=False, description=f"ViT epoch {epoch + 1}/{epochs}, part {quarter + 1}")
        done += 1
        losses.extend(history.losses)
        tmp = work / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "parts_done": done,
                    "losses": losses}, tmp)
        os.replace(tmp, checkpoint)
        if max_minutes is not None and time.monotonic() - started > max_minutes * 60 and done < parts:
            return TrainingProgress(done, parts, losses, False, final)
    save_vit(model.eval(), final, extra={"training": TRAINING, "train_losses": losses}, overwrite=True)
    return TrainingProgress(done, parts, losses, True, final)
