"""The ``edge-ad`` command line.

Thin on purpose: each command parses its options, calls one function of ``edge_ad`` or
``pipelines`` and prints the result. Heavy imports (torch, ray, mlflow) happen inside the
commands so ``edge-ad --help`` answers instantly.

Errors the user can fix (:class:`edge_ad.errors.EdgeADError`) are printed as one line and exit
non-zero; no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from edge_ad.errors import EdgeADError, NotAvailableYet

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
    """Turns user-facing errors into one red line and an exit code, for every subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeADError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise click.exceptions.Exit(err.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name="edge-ad",
    help="Visual defect inspection for factory lines: train D3AD per product, track it in "
    "MLflow, serve it on Kafka frames with Ray Serve.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(
    cls=_Group,
    help="Generate, download and inspect datasets.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")

# ----------------------------------------------------------------------------- shared options

ProductOpt = Annotated[str, typer.Option("--product", "-p", help="Product name (one model each).")]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(help="Folder holding <product>/ (MVTec or folder layout) or a VisA root."),
]
LayoutOpt = Annotated[
    str, typer.Option(help="Dataset layout: auto, mvtec, visa, folder or synthetic.")
]
ProfileOpt = Annotated[str, typer.Option(help="Settings profile: tiny, cpu or paper.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML file overriding the profile's settings.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting, e.g. --set unet.epochs=40 (repeatable)."),
]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Bundle directory or models:/edge-ad-P@ALIAS.")
]
BootstrapOpt = Annotated[
    str | None,
    typer.Option(help="Kafka bootstrap H:P (default $EDGE_AD_BOOTSTRAP or 127.0.0.1:9092)."),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite in home)."),
]


def _not_yet(command: str, issue: int) -> NoReturn:
    raise NotAvailableYet(f"`edge-ad {command}` is not available yet (planned in issue {issue})")


def _check_layout(layout: str) -> str:
    from edge_ad.data import LAYOUTS

    if layout not in ("auto", *LAYOUTS):
        raise EdgeADError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    return layout


def _data_root(data_root: Path | None) -> Path:
    """``--data-root`` or, by default, the generated data under EDGE_AD_HOME."""
    from edge_ad.paths import edge_home

    return data_root if data_root is not None else edge_home() / "data"


# ----------------------------------------------------------------------------- train / eval


@app.command(
    epilog="Examples:  edge-ad train -p pcb1 --data-root /data/mvtec --profile cpu --output "
    "models/pcb1  ·  edge-ad train -p synth-pcb --profile tiny --set unet.epochs=20"
)
def train(
    product: ProductOpt,
    data_root: DataRootOpt = None,
    layout: LayoutOpt = "auto",
    profile: ProfileOpt = "cpu",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[
        Path | None, typer.Option(help="Write the trained bundle here (default: EDGE_AD_HOME).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train data-parallel workers.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker.")] = 0,
) -> None:
    """Train a D3AD model for one product on its normal images."""
    from edge_ad.config import load_settings
    from edge_ad.data import load_dataset

    _check_layout(layout)
    settings = load_settings(profile, config, set_)
    dataset = load_dataset(_data_root(data_root), product, layout)
    console.print(
        f"[bold]{product}[/]: {len(dataset.train)} train images ({dataset.layout} layout), "
        f"profile {settings.profile}"
    )
    _not_yet("train", 4)


@app.command(
    epilog="Example:  edge-ad eval -p pcb1 --model models/pcb1 --data-root /data/mvtec "
    "--report pcb1.json"
)
def eval(
    product: ProductOpt,
    model: ModelOpt,
    report: Annotated[Path, typer.Option(help="Write the metrics report (JSON) here.")],
    data_root: DataRootOpt = None,
    layout: LayoutOpt = "auto",
) -> None:
    """Score the product's test split; print and save I-AUROC, P-AUROC, PRO, AP, F1, s/img."""
    _check_layout(layout)
    _not_yet("eval", 4)


@app.command(
    epilog="Example:  edge-ad infer --model models/pcb1 frames/*.png --out results/"
)
def infer(
    model: ModelOpt,
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    out: Annotated[Path, typer.Option(help="Folder for heatmap overlays and JSON verdicts.")],
) -> None:
    """Score images: heatmap overlay PNG + JSON (score, verdict, T̂, defect boxes) per image."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise EdgeADError(f"image not found: {', '.join(missing[:3])}")
    _not_yet("infer", 4)


# ----------------------------------------------------------------------------- registry


@app.command(
    epilog="Examples:  edge-ad promote -p pcb1  ·  edge-ad promote -p pcb1 --version 3 --force"
)
def promote(
    product: ProductOpt,
    version: Annotated[int | None, typer.Option(help="Model version (default: latest).")] = None,
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    force: Annotated[bool, typer.Option(help="Promote even if worse than production.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded on the version.")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point an MLflow alias (default production) at a model version, if it is not worse."""
    _not_yet("promote", 5)


@app.command(epilog="Example:  edge-ad models -p pcb1")
def models(
    product: Annotated[
        str | None, typer.Option("--product", "-p", help="Only this product.")
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """List registered model versions, their aliases and metrics."""
    _not_yet("models", 5)


# ----------------------------------------------------------------------------- streaming


@app.command(epilog="Example:  edge-ad serve --products pcb1,pcb2")
def serve(
    products: Annotated[
        str | None, typer.Option(help="Comma-separated products (default: all in production).")
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the Ray Serve graph: Kafka frames → severity → reconstruction → map → verdicts."""
    _not_yet("serve", 6)


@app.command(epilog="Example:  edge-ad replay -p synth-pcb --source synthetic --fps 20 --count 300")
def replay(
    product: ProductOpt,
    source: Annotated[str, typer.Option(help="Image folder, or 'synthetic'.")] = "synthetic",
    fps: Annotated[float, typer.Option(min=0.1, help="Frames per second.")] = 10.0,
    count: Annotated[int, typer.Option(min=1, help="Frames to send.")] = 100,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Camera simulator: publish frames with headers to the frames topic."""
    if source != "synthetic" and not Path(source).is_dir():
        raise EdgeADError(f"--source {source} is neither a folder nor 'synthetic'")
    _not_yet("replay", 6)


@app.command(epilog="Example:  edge-ad verdicts --follow")
def verdicts(
    follow: Annotated[bool, typer.Option(help="Keep printing as verdicts arrive.")] = False,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Print verdicts from the verdicts topic with a running tally."""
    _not_yet("verdicts", 6)


@app.command(epilog="Example:  edge-ad broker --port 9092")
def broker(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port to listen on.")] = 9092,
) -> None:
    """Start the embedded Kafka-protocol broker (tansu) and create the topics."""
    _not_yet("broker", 6)


@app.command(epilog="Example:  edge-ad demo --profile tiny")
def demo(
    profile: ProfileOpt = "tiny",
    product: Annotated[str, typer.Option(help="Name of the generated product.")] = "synth-pcb",
) -> None:
    """From nothing to a live line: generate a product, train, register, serve, replay, report."""
    _not_yet("demo", 4)


@app.command(
    epilog="Example:  edge-ad compare -p pcb1 --data-root /data --methods d3ad,diffusionad,ran "
    "--report cmp.json"
)
def compare(
    product: ProductOpt,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "d3ad,diffusionad,ran",
    report: Annotated[Path | None, typer.Option(help="Write the table as JSON here.")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Train and evaluate several methods on the same split; print one table."""
    _not_yet("compare", 8)


# ----------------------------------------------------------------------------- data


@data_app.command(
    "synth",
    epilog="Example:  edge-ad data synth -p synth-pcb --out data/  (then --data-root data/)",
)
def data_synth(
    product: Annotated[str, typer.Option("--product", "-p", help="Product name.")] = "synth-pcb",
    out: Annotated[Path | None, typer.Option(help="Root folder; writes OUT/<product>/.")] = None,
    image_size: Annotated[int, typer.Option(help="Image side in px (multiple of 32).")] = 256,
    train: Annotated[int, typer.Option(min=2, help="Normal training images.")] = 200,
    test_good: Annotated[int, typer.Option(min=1, help="Normal test images.")] = 40,
    per_defect: Annotated[int, typer.Option(min=1, help="Test images per defect type.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing product folder.")] = False,
) -> None:
    """Generate a synthetic PCB-like product with exact defect masks, in MVTec layout."""
    from edge_ad.data.synthetic import SynthSpec, generate_dataset
    from edge_ad.progress import progress_callback

    spec = SynthSpec(
        image_size=image_size,
        n_train=train,
        n_test_good=test_good,
        n_test_per_defect=per_defect,
        seed=seed,
    )
    root = _data_root(out)
    with progress_callback(f"synthesising {product}") as callback:
        product_dir = generate_dataset(product, root, spec, progress=callback, overwrite=overwrite)
    console.print(f"wrote {product_dir}  (use --data-root {root} --product {product})")


@data_app.command(
    "info", epilog="Example:  edge-ad data info -p candle --data-root /data/visa"
)
def data_info(
    product: ProductOpt,
    data_root: DataRootOpt = None,
    layout: LayoutOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show how a dataset is read: layout, image counts per split and defect type."""
    from rich.table import Table

    from edge_ad.data import load_dataset

    dataset = load_dataset(_data_root(data_root), product, _check_layout(layout))
    summary = dataset.summary()
    if as_json:
        console.print_json(json.dumps(summary))
        return
    table = Table(title=f"{product} ({dataset.layout} layout, {dataset.root})")
    table.add_column("split")
    table.add_column("type")
    table.add_column("images", justify="right")
    table.add_column("with mask", justify="right")
    for split, samples in (("train", dataset.train), ("test", dataset.test)):
        for defect_type in sorted({s.defect_type for s in samples}):
            group = [s for s in samples if s.defect_type == defect_type]
            masked = sum(s.mask_path is not None for s in group)
            table.add_row(split, defect_type, str(len(group)), str(masked))
    console.print(table)


@data_app.command(
    "download",
    epilog="Examples:  edge-ad data download visa --to /data/visa  ·  offline: "
    "edge-ad data download visa --to /data/visa --url file:///mnt/VisA_20220922.tar",
)
def data_download(
    name: Annotated[str, typer.Argument(help="Dataset to download (visa).")],
    to: Annotated[Path, typer.Option(help="Folder to extract into.")],
    url: Annotated[
        str | None, typer.Option(help="Mirror URL, file:// URL or local path of the archive.")
    ] = None,
) -> None:
    """Download and extract a public dataset (checksum verified, progress shown)."""
    from edge_ad.data.download import VISA_URL, download_visa

    if name.lower() != "visa":
        raise EdgeADError(f"unknown dataset {name!r}; available: visa")
    root = download_visa(to, url=url or VISA_URL)
    console.print(f"VisA ready in {root}  (use --data-root {root} --product candle)")


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
