"""Detector throughput: images/s at batch sizes 1, 8, 32 and milliseconds per image per stage.

    python benchmarks/detector.py                     # trains a tiny model on generated data
    python benchmarks/detector.py --method diffusionad  # ... of another method
    python benchmarks/detector.py --set latent.space=features  # ... D3AD in feature space
    python benchmarks/detector.py --model DIR         # a trained bundle (e.g. the cpu profile)

Stages are the method's own (``STAGES`` of its detector class); for D3AD: features (φ(x)),
memory (the patch memory's nearest-neighbour search), severity (top-k patch distances or the
pooled KNN, + bins), encode (E, or the feature projection), diffusion (the DDIM steps), decode
(D; 0 where the map has no feature term or the latent is features), map (φ(x̂) where it has
one, distances, normalisation, blur); DiffusionAD:
encode, diffusion (2 ε_θ evaluations), decode, segment; RAN: encode, kl, reconstruct (gradient
denoising), decode, features; knn: features, memory, map. For a model with a patch memory the
JSON also says how many patches it keeps and how long its coreset took to choose at training
time. One burn-in batch per size, then ``--repeats`` timed batches (CUDA synchronised). The last
line printed is one JSON object: {"batch": [...], "images_per_s": [...],
"ms_per_image_by_stage": {stage: ms}, "method": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_ad.bundle import load_bundle
from edge_ad.config import load_settings
from edge_ad.data.synthetic import SyntheticProduct, SynthSpec, generate_dataset
from edge_ad.engine import as_chw, train_product


def tiny_bundle(workdir: Path, method: str, overrides: list[str] | None = None) -> Path:
    settings = load_settings("tiny", method=method, overrides=overrides)
    spec = SynthSpec(
        image_size=settings.data.image_size, n_train=60, n_test_good=1, n_test_per_defect=1
    )
    generate_dataset("bench-pcb", workdir / "data", spec)
    return train_product("bench-pcb", workdir / "data", settings, workdir / "model").bundle_path


def frames(n: int, size: int) -> torch.Tensor:
    product = SyntheticProduct("bench-pcb", image_size=size, seed=1)
    defects = (None, "scratch", None, "missing_part", None, "stain", None, "contamination")
    return as_chw(np.stack([product.render(i, defects[i % len(defects)])[0] for i in range(n)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle directory (default: train tiny)")
    parser.add_argument("--method", default="d3ad", help="method of the tiny model trained")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="setting of the tiny model trained, e.g. --set latent.space=features",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_bundle(Path(tmp), args.method, args.overrides)
        detector = load_bundle(model, device=args.device).detector
    stages = type(detector).STAGES
    size = detector.settings.data.image_size
    pool = frames(max(args.batches), size)
    rates, by_stage = [], {}
    for batch in args.batches:
        x = pool[:batch]
        detector.predict(x)  # burn-in
        timings: dict[str, float] = {}
        start = time.perf_counter()
        for _ in range(args.repeats):
            detector.predict(x, timings=timings)
        elapsed = time.perf_counter() - start
        n = batch * args.repeats
        rates.append(n / elapsed)
        by_stage[str(batch)] = {s: 1000.0 * timings.get(s, 0.0) / n for s in stages}
        print(
            f"batch {batch:3d}: {n / elapsed:7.2f} images/s  "
            + "  ".join(f"{s} {v:.1f}ms" for s, v in by_stage[str(batch)].items())
        )
    result = {
        "batch": args.batches,
        "images_per_s": [round(r, 3) for r in rates],
        "ms_per_image_by_stage": {
            k: round(v, 3) for k, v in by_stage[str(max(args.batches))].items()
        },
        "ms_per_image_by_stage_per_batch": by_stage,
        "image_size": size,
        "profile": detector.settings.profile,
        "method": detector.method,
        "device": str(detector.device),
        "threads": torch.get_num_threads(),
    }
    memory = getattr(detector, "memory", None)
    if memory is not None:
        result["memory_patches"] = len(memory.bank)
        result["coreset_seconds"] = round(memory.coreset_seconds, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
