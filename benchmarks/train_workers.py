"""Ray Train scaling: wall time of one product's training job with 1 vs N data-parallel workers.

    python benchmarks/train_workers.py                               # tiny, generated product
    python benchmarks/train_workers.py --profile cpu --data-root ../shared/data \\
        --product magnetictile --set autoencoder.epochs=2 --set unet.epochs=3

Each job is the real ``pipelines.train`` path (local Ray, MLflow tracking off so only training
is timed) and starts from scratch; the CPUs are split evenly between the workers, so on a
2-core box 2 workers get 1 thread each where 1 worker gets 2. The last line printed is one JSON
object: {"workers": [...], "wall_s": [...], "stage_s": [{...}], "speedup": [...]}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edge_ad.config import load_settings
from edge_ad.data.synthetic import SynthSpec, generate_dataset
from pipelines.train import TrainOptions, TrainRequest, ensure_ray, train_one

STAGE_KEYS = ("ae_seconds", "unet_seconds", "da_seconds", "train_minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--product", default="bench-pcb")
    parser.add_argument("--data-root", type=Path, help="default: generate a product")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = args.data_root
        if root is None:
            size = load_settings(args.profile).data.image_size
            spec = SynthSpec(image_size=size, n_train=60, n_test_good=1, n_test_per_defect=1)
            root = work / "data"
            generate_dataset(args.product, root, spec)
        ensure_ray()
        walls, stages = [], []
        for n in args.workers:
            settings = load_settings(
                args.profile, overrides=[*args.overrides, f"runtime.workers={n}"]
            )
            opts = TrainOptions(storage_path=work / "ray", track=False, evaluate=False)
            request = TrainRequest(args.product, str(root), output=str(work / f"model-{n}"))
            result = train_one(request, settings, opts)
            walls.append(result.wall_seconds)
            stages.append({k: result.summary[k] for k in STAGE_KEYS if k in result.summary})
            print(f"{n} worker(s): {result.wall_seconds:.1f} s  {stages[-1]}", flush=True)
    print(
        json.dumps(
            {
                "profile": args.profile,
                "workers": args.workers,
                "wall_s": [round(w, 2) for w in walls],
                "stage_s": stages,
                "speedup": [round(walls[0] / w, 3) for w in walls],
            }
        )
    )


if __name__ == "__main__":
    main()
