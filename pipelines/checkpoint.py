"""What a Ray Train checkpoint of one training run holds, and how to read it back.

A checkpoint directory is written by rank 0 at the end of an epoch (autoencoder, UNet) or of a
stage (the method's head — D3AD's adaptation of φ, DiffusionAD's segmentation network —, the
finished model)::

    progress.json        {"stage": "unet", "epoch": 7, "epochs": 25, "scaling_factor": ...}
    weights.safetensors  vae.*, unet.*, backbone.*, ...: the detector's weights at that point
    loop.pt              optimizer / lr schedule / EMA / RNG state of the stage's loop
    bundle/              (final checkpoint only) the trained bundle, as ``train --output`` writes
    report/              (final checkpoint only) eval report, heatmaps, severity histogram

Weights are safetensors; the loop state is read with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers (no code runs), so a checkpoint is as safe to load
as a bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edge_ad.bundle import detector_weights, load_detector_weights
from edge_ad.d3ad.trainer import LoopState
from edge_ad.detector import Detector

PROGRESS_FILE, WEIGHTS_FILE, LOOP_FILE = "progress.json", "weights.safetensors", "loop.pt"
BUNDLE_DIR, REPORT_DIR = "bundle", "report"

# The order training goes through; a checkpoint names the last stage it reached.
STAGES = ("autoencoder", "unet", "head", "done")


@dataclass
class Resume:
    """Where a checkpoint says training stands."""

    stage: str
    epoch: int  # last finished epoch of ``stage`` (-1 for stage-level checkpoints)
    epochs: int  # epochs ``stage`` runs in all
    loop: LoopState | None

    @property
    def stage_complete(self) -> bool:
        return self.epoch + 1 >= self.epochs

    def finished(self, stage: str) -> bool:
        """Whether ``stage`` needs no more training after this checkpoint."""
        here, there = STAGES.index(self.stage), STAGES.index(stage)
        return there < here or (there == here and self.stage_complete)

    def loop_state(self, stage: str) -> LoopState | None:
        """The loop state to continue ``stage`` from, if the checkpoint is in its middle."""
        if stage == self.stage and not self.stage_complete:
            return self.loop
        return None


def write_checkpoint(
    folder: Path,
    detector: Detector,
    stage: str,
    epoch: int,
    epochs: int,
    loop: LoopState | None = None,
) -> Path:
    """Write the detector's weights and ``stage``'s progress into ``folder``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(detector_weights(detector), str(folder / WEIGHTS_FILE))
    progress = {
        "stage": stage,
        "epoch": epoch,
        "epochs": epochs,
        # Fitted values only (the latent scale): the architecture comes from the settings.
        **{k: v for k, v in detector.extra_meta().items() if not k.endswith("_config")},
    }
    (folder / PROGRESS_FILE).write_text(json.dumps(progress))
    if loop is not None:
        torch.save(loop, folder / LOOP_FILE)
    return folder


def read_checkpoint(folder: Path, detector: Detector) -> Resume:
    """Load the checkpoint's weights into ``detector``; return where training stands."""
    progress: dict[str, Any] = json.loads((folder / PROGRESS_FILE).read_text())
    load_detector_weights(detector, load_file(str(folder / WEIGHTS_FILE)))
    detector.restore_meta(progress)
    loop_file = folder / LOOP_FILE
    loop = torch.load(loop_file, weights_only=True) if loop_file.is_file() else None
    return Resume(progress["stage"], int(progress["epoch"]), int(progress["epochs"]), loop)
