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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from edge_ad.errors import EdgeADError
from edge_ad.names import check_product_name

console = Console()
err_console = Console(stderr=True)


def _plain(value: object) -> str:
    """Text from outside (a frame id, a header, a path, an error naming one) for a rich
    print: its brackets are escaped, so ``[/]`` cannot crash the print and ``[link=…]``
    cannot render a link."""
    return escape(str(value))


class _Group(TyperGroup):
    """Turns user-facing errors into one red line and an exit code, for every subcommand."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeADError as err:
            err_console.print(f"[bold red]error:[/] {_plain(err)}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None


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


def _product_names(value: str | list[str] | None) -> str | list[str] | None:
    """Typer callback: every product name follows the one rule (edge_ad.names)."""
    try:
        for name in [value] if isinstance(value, str) else value or []:
            check_product_name(name)
    except EdgeADError as err:
        raise typer.BadParameter(str(err)) from None
    return value


ProductOpt = Annotated[
    str,
    typer.Option("--product", "-p", help="Product name (one model each).", callback=_product_names),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(help="Folder holding <product>/ (MVTec or folder layout) or a VisA root."),
]
LayoutOpt = Annotated[
    str, typer.Option(help="Dataset layout: auto, mvtec, visa, folder or synthetic.")
]
ProfileOpt = Annotated[str, typer.Option(help="Settings profile: tiny, cpu or paper.")]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="Detector: d3ad (default: patch memory + latent diffusion, severity-chosen "
        "timestep), knn (the patch memory alone, a PatchCore-style baseline: fastest), "
        "diffusionad (one-step reconstruction + segmentation net) or ran (KL + feature scores).",
    ),
]
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


def _pct(value: float | None) -> str:
    """A metric in [0, 1] as a percentage cell; n/a when there is none."""
    return "n/a" if value is None else f"{100 * value:.1f}"


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


def _read_products(products: list[str] | None, products_file: Path | None) -> list[str]:
    """``--product`` values plus the names in ``--products-file`` (one per line, # comments)."""
    names = list(products or [])
    if products_file is not None:
        if not products_file.is_file():
            raise EdgeADError(f"--products-file {products_file} does not exist")
        for line in products_file.read_text().splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                names.append(check_product_name(name))
    if not names:
        raise EdgeADError("name a product: --product P (repeatable) or --products-file FILE")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EdgeADError(f"product listed twice: {', '.join(duplicates)}")
    return names


@app.command(
    epilog="Examples:  edge-ad train -p pcb1 --data-root /data/mvtec --profile cpu --output "
    "models/pcb1  ·  edge-ad train -p pcb1 -p pcb2 --workers 2  ·  edge-ad train -p pcb1 "
    "--resume  ·  RAY_ADDRESS=ray://head:10001 edge-ad train -p pcb1 --gpus-per-worker 1"
)
def train(
    product: Annotated[
        list[str] | None,
        typer.Option(
            "--product",
            "-p",
            help="Product to train (repeat for several).",
            callback=_product_names,
        ),
    ] = None,
    products_file: Annotated[
        Path | None, typer.Option(help="File with one product name per line (# comments).")
    ] = None,
    data_root: DataRootOpt = None,
    layout: LayoutOpt = "auto",
    profile: ProfileOpt = "cpu",
    method: MethodOpt = "d3ad",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Bundle directory (default: EDGE_AD_HOME/models/P); with several products, "
            "each goes to OUTPUT/P."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray Train data-parallel workers (default 1).")
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(min=0, help="GPUs per worker (default 0: CPU training).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue each product's last unfinished run from its checkpoint.")
    ] = False,
    max_failures: Annotated[
        int, typer.Option(min=0, help="Worker-group restarts from the last checkpoint.")
    ] = 2,
    storage_path: Annotated[
        Path | None,
        typer.Option(
            help="Ray Train checkpoints (default EDGE_AD_HOME/ray_results; shared on a cluster)."
        ),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Train a detector (D3AD by default, see --method) per product as Ray Train jobs; log to
    MLflow and register each model.

    Runs on a local Ray (started for you) or on the cluster in $RAY_ADDRESS. Several products
    train as concurrent jobs. The model lands in the registry as a new version of
    edge-ad-<product> (alias staging); `edge-ad promote` moves production.
    """
    from rich.table import Table

    from edge_ad.config import load_settings
    from edge_ad.data import load_dataset
    from edge_ad.progress import RichFitObserver, make_progress
    from pipelines.train import TrainOptions, TrainRequest, train_products

    _check_layout(layout)
    names = _read_products(product, products_file)
    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"runtime.workers={workers}")
    if gpus_per_worker is not None:
        overrides.append(f"runtime.gpus_per_worker={gpus_per_worker}")
    settings = load_settings(profile, config, overrides, method=method)
    root = _data_root(data_root)
    requests = []
    for name in names:
        dataset = load_dataset(root, name, layout)  # bad input fails here, before Ray starts
        console.print(
            f"[bold]{name}[/]: {len(dataset.train)} normal train images ({dataset.layout} "
            f"layout), method [bold]{settings.method}[/], profile [bold]{settings.profile}[/], "
            f"{settings.data.image_size}px, "
            f"{settings.runtime.workers} worker(s)"
        )
        console.print(f"  {_split_summary(dataset, settings)}", highlight=False)
        out = output / name if output is not None and len(names) > 1 else output
        requests.append(TrainRequest(name, str(root), dataset.layout, str(out) if out else None))
    with make_progress() as progress:
        opts = TrainOptions(
            storage_path=storage_path,
            tracking_uri=tracking_uri,
            resume=resume,
            max_failures=max_failures,
            observer_factory=lambda p: RichFitObserver(progress, p if len(names) > 1 else ""),
        )
        results = train_products(requests, settings, opts)
    table = Table(title="trained")
    # "train min" ends when the bundle is calibrated; "wall min" adds Ray start-up, the test-set
    # evaluation and registration.
    columns = (
        "product",
        "version",
        "I-AUROC",
        "PRO",
        "recall",
        "FPR",
        "threshold",
        "train min",
        "wall min",
    )
    for column in (*columns, "bundle"):
        table.add_column(column, justify="left" if column in ("product", "bundle") else "right")
    for r in results:
        rep = r.report or {}
        cells = [
            rep.get(k)
            for k in (
                "image_auroc",
                "pro",
                "recall_at_threshold",
                "false_positive_rate_at_threshold",
            )
        ]
        table.add_row(
            r.product,
            str(r.model_version) if r.model_version is not None else "-",
            *(_pct(v) for v in cells),
            f"{r.summary.get('threshold', float('nan')):.3f}",
            f"{r.summary.get('train_minutes', float('nan')):.1f}",
            f"{r.wall_seconds / 60:.1f}",
            str(r.bundle_path),
        )
    console.print(table)
    for r in results:
        if r.started_from != "scratch":
            console.print(f"{r.product}: continued from checkpoint {r.started_from}")
        console.print(f"bundle: [bold]{r.bundle_path}[/]")
        if r.model_version is not None:
            console.print(
                f"registered edge-ad-{r.product} version {r.model_version} (alias staging, "
                f"MLflow run {r.mlflow_run_id})"
            )
            console.print(f"next: edge-ad promote -p {r.product} --version {r.model_version}")


def _split_summary(dataset: Any, settings: Any) -> str:
    """What training will use of the normal images, said before minutes of work."""
    from edge_ad.data import split_train_val
    from edge_ad.methods import detector_class

    d = settings.data
    train, val = split_train_val(dataset.train, d.val_fraction, d.seed)
    cls = detector_class(settings.method)
    parts = []
    if cls.generative:
        n_net = len(train) if d.max_train_images is None else min(len(train), d.max_train_images)
        parts.append(f"networks train on {n_net}")
    if cls.wants_memory(settings):
        cap = settings.memory.max_images
        parts.append(f"patch memory of {len(train) if cap is None else min(len(train), cap)}")
    parts.append(f"{len(val)} held out to calibrate the threshold")
    return "; ".join(parts)


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
    tracking_uri: TrackingOpt = None,
) -> None:
    """Score the product's test split; print and save I-AUROC, P-AUROC, PRO, AP, F1, s/img."""
    from rich.table import Table

    from edge_ad.engine import evaluate, resolve_model
    from edge_ad.progress import progress_callback

    _check_layout(layout)
    if report.is_dir():
        raise EdgeADError(f"--report {report} is a directory; give a file name such as report.json")
    bundle = resolve_model(model, tracking_uri=tracking_uri)
    with progress_callback(f"scoring {product} test images") as callback:
        result = evaluate(bundle, _data_root(data_root), product, layout, progress=callback)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    table = Table(title=f"{product} ({result['method']}): {result['images']} test images")
    for name in ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max"):
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("recall @thr", justify="right")
    table.add_column("FPR @thr", justify="right")
    table.add_column("s/img", justify="right")
    cells = [result[k] for k in ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max")]
    table.add_row(
        *(_pct(v) for v in cells),
        _pct(result.get("recall_at_threshold")),
        _pct(result.get("false_positive_rate_at_threshold")),
        f"{result['seconds_per_image']:.3f}",
    )
    console.print(table)
    if result["method"] == "d3ad":
        mean_t = result.get("mean_timestep", {})
        console.print(
            f"T̂ chosen (normal): {result['timesteps']['normal']}  (defect): "
            f"{result['timesteps']['defect']}  mean {mean_t.get('normal')} / "
            f"{mean_t.get('defect')}"
        )
    console.print(f"report: {report}")


@app.command(epilog="Example:  edge-ad infer --model models/pcb1 frames/*.png --out results/")
def infer(
    model: ModelOpt,
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    out: Annotated[Path, typer.Option(help="Folder for heatmap overlays and JSON verdicts.")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """Score images: heatmap overlay PNG + JSON (score, verdict, T̂, defect boxes) per image."""
    from edge_ad.engine import check_infer_output, infer_images, resolve_model
    from edge_ad.progress import progress_callback

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise EdgeADError(f"image not found: {', '.join(missing[:3])}")
    check_infer_output(images, out)
    bundle = resolve_model(model, tracking_uri=tracking_uri)
    with progress_callback("scoring") as callback:
        verdicts = infer_images(bundle, images, out, progress=callback)
    for v in verdicts:
        mark = "[bold red]DEFECT[/]" if v["is_anomalous"] else "[green]ok[/]"
        console.print(
            f"{mark:>22} score {v['score']:.3f} (thr {v['threshold']:.3f}) T̂={v['timestep']} "
            f"boxes={len(v['boxes'])}  {_plain(v['image'])}"
        )
    console.print(f"overlays and JSON in {_plain(out)}")


# ----------------------------------------------------------------------------- registry


@app.command(
    epilog="Examples:  edge-ad promote -p pcb1  ·  edge-ad promote -p pcb1 --version 3 --force "
    "--reason 'new camera'"
)
def promote(
    product: ProductOpt,
    version: Annotated[int | None, typer.Option(help="Model version (default: latest).")] = None,
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
    force: Annotated[bool, typer.Option(help="Promote even if worse than production.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded on the version.")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point an MLflow alias (default production) at a model version, if it is not worse.

    Refuses when the candidate's image AUROC or PRO is below the version holding the alias
    (exit code 1) unless --force; records who, when and why as tags on the version.
    """
    from edge_ad import registry

    done = registry.promote(product, version, alias, force, reason, tracking_uri)
    before = f"v{done.previous_version}" if done.previous_version is not None else "none"
    console.print(
        f"[bold green]{done.name}[/] @{done.alias}: {before} → [bold]v{done.version}[/]"
        + (" [yellow](forced)[/]" if done.forced else "")
    )
    for metric, (new, old) in done.compared.items():
        console.print(f"  {metric}: {_pct(new)} (was {_pct(old)})")


@app.command(epilog="Examples:  edge-ad models  ·  edge-ad models -p pcb1")
def models(
    product: Annotated[
        str | None,
        typer.Option("--product", "-p", help="Only this product.", callback=_product_names),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """List registered model versions, their aliases and metrics."""
    from rich.table import Table

    from edge_ad import registry

    rows = registry.list_versions(product, tracking_uri)
    if not rows:
        where = f"for {product!r} " if product else ""
        console.print(
            f"no registered models {where}in {registry.tracking_uri(tracking_uri)}; "
            "train one with `edge-ad train -p P`"
        )
        return
    table = Table(title=f"registered models ({registry.tracking_uri(tracking_uri)})")
    columns = (
        "model",
        "version",
        "method",
        "aliases",
        "I-AUROC",
        "P-AUROC",
        "PRO",
        "created",
        "run",
    )
    for column in columns:
        table.add_column(column, justify="right" if column in ("version",) else "left")
    for row in rows:
        cells = [row.metrics.get(k) for k in ("image_auroc", "pixel_auroc", "pro")]
        table.add_row(
            row.name,
            str(row.version),
            row.tags.get("method", "d3ad"),  # untagged versions predate other methods
            ", ".join(row.aliases) or "-",
            *(_pct(v) for v in cells),
            row.created,
            row.run_id[:8],
        )
    console.print(table)


# ----------------------------------------------------------------------------- streaming


def _replicas(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` (autoscaling between them)."""
    try:
        low, _, high = text.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise EdgeADError(f"--scorer-replicas {text!r}: use N or MIN:MAX, e.g. 1:4") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise EdgeADError(f"--scorer-replicas {text!r}: need 1 <= MIN <= MAX")
    return pair


@app.command(
    epilog="Examples:  edge-ad serve  ·  edge-ad serve --products pcb1,pcb2 --scorer-replicas 1:4"
    "  ·  RAY_ADDRESS=ray://head:10001 edge-ad serve --bootstrap-servers kafka:9092"
)
def serve(
    products: Annotated[
        str | None,
        typer.Option(help="Comma-separated products to accept (default: any with a model)."),
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
    tracking_uri: TrackingOpt = None,
    alias: Annotated[str, typer.Option(help="Registry alias whose version scores.")] = "production",
    scorer_replicas: Annotated[
        str, typer.Option(help="Scorer replicas: N, or MIN:MAX to autoscale.")
    ] = "1",
    ingress_replicas: Annotated[
        int, typer.Option(min=1, help="Consumers in the group (at most the frames partitions).")
    ] = 1,
    scorer_cpus: Annotated[float, typer.Option(min=0.1, help="CPUs reserved per scorer.")] = 1.0,
    scorer_gpus: Annotated[
        float, typer.Option(min=0.0, help="GPUs per scorer (0.5 packs two per GPU).")
    ] = 0.0,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Frames per detector batch.")] = 8,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="Frames between poll and acknowledgement, per consumer.")
    ] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Run the Ray Serve graph: Kafka frames → severity → reconstruction → map → verdicts.

    Each frame is scored by the version of edge-ad-<product> holding the alias (checked every
    2 s, so a promotion takes effect without a restart). Verdicts go to edge-ad.verdicts, bad
    frames to edge-ad.frames.dlq with the reason. Runs on a local Ray (started for you) or on
    the cluster in $RAY_ADDRESS; Ctrl-C stops it.
    """
    import signal
    import threading

    from edge_ad import registry
    from edge_ad.paths import edge_home
    from edge_ad.stream.kafka_io import check_reachable
    from pipelines.serve import ServeOptions, start_serving, stop_serving

    low, high = _replicas(scorer_replicas)
    bootstrap = check_reachable(bootstrap_servers)
    uri = registry.tracking_uri(tracking_uri)
    names = tuple(p.strip() for p in (products or "").split(",") if p.strip())
    for name in names:
        if registry.alias_version(name, alias, uri) is None:
            console.print(
                f"[yellow]warning:[/] no version of edge-ad-{name} holds {alias!r} yet: its "
                f"frames go to the DLQ until you run `edge-ad promote -p {name}`"
            )
    options = ServeOptions(
        bootstrap=bootstrap,
        tracking_uri=uri,
        products=names,
        alias=alias,
        ingress_replicas=ingress_replicas,
        scorer_min_replicas=low,
        scorer_max_replicas=high,
        scorer_cpus=scorer_cpus,
        scorer_gpus=scorer_gpus,
        max_batch_size=max_batch_size,
        max_in_flight=max_in_flight,
        device=device,
        edge_home=str(edge_home().resolve()),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"starting the Serve graph (Kafka {bootstrap}, MLflow {uri}) ...")
    handle = start_serving(options)
    try:
        console.print(
            f"[bold green]serving[/] {', '.join(names) or 'every product'} ({alias}); "
            f"watch with `edge-ad verdicts --follow --bootstrap-servers {bootstrap}`; Ctrl-C stops"
        )
        last = None
        while not stop.wait(5.0):
            stats = handle.get_stats.remote().result(timeout_s=30)
            line = (
                f"consumed {stats['consumed']} · verdicts {stats['verdicts']} · DLQ "
                f"{stats['dlq']} · in flight {stats['in_flight']} · retries {stats['retries']}"
            )
            if line != last:
                console.print(line, highlight=False)
                last = line
    finally:
        console.print("stopping (uncommitted frames are re-read by the next consumer) ...")
        stop_serving()
    console.print("serve stopped")


def _model_image_size(product: str, tracking_uri: str | None) -> int | None:
    """The production model's input size, when the registry can tell."""
    from edge_ad import registry
    from edge_ad.bundle import read_meta

    try:
        path, _ = registry.resolve_bundle(
            f"models:/{registry.model_name(product)}@production", tracking_uri
        )
    except EdgeADError:
        return None
    return int(read_meta(path)["settings"]["data"]["image_size"])


@app.command(
    epilog="Examples:  edge-ad replay -p synth-pcb --source synthetic --fps 20 --count 300  ·  "
    "edge-ad replay -p pcb1 --source /data/mvtec/pcb1/test --fps 5"
)
def replay(
    product: ProductOpt,
    source: Annotated[
        str, typer.Option(help="Image folder (test/<type>/ gives truth), or 'synthetic'.")
    ] = "synthetic",
    fps: Annotated[float, typer.Option(min=0.0, help="Frames per second (0: flat out).")] = 10.0,
    count: Annotated[int, typer.Option(min=1, help="Frames to send.")] = 100,
    defect_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of synthetic frames with a defect.")
    ] = 0.2,
    image_size: Annotated[
        int | None,
        typer.Option(help="Frame side in px (default: the production model's input size)."),
    ] = None,
    cameras: Annotated[int, typer.Option(min=1, help="Cameras to spread frames over.")] = 1,
    line: Annotated[str, typer.Option(help="Line id in the headers.")] = "line-1",
    truth: Annotated[
        Path | None, typer.Option(help="Write frame_id,label,defect_type lines (JSONL) here.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic frames.")] = 0,
    bootstrap_servers: BootstrapOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Camera simulator: publish frames with headers to the frames topic."""
    from edge_ad.progress import progress_callback
    from edge_ad.stream.camera import folder_images, publish_frames, synthetic_images
    from edge_ad.stream.kafka_io import make_producer

    if source != "synthetic" and not Path(source).is_dir():
        raise EdgeADError(f"--source {source} is neither a folder nor 'synthetic'")
    producer = make_producer(bootstrap_servers)  # no broker: say so before anything slow
    size = image_size or _model_image_size(product, tracking_uri)
    if source == "synthetic":
        if size is None:
            raise EdgeADError(
                f"no production model for {product} tells the frame size; pass --image-size"
            )
        images = synthetic_images(product, size, defect_rate, seed)
    else:
        images = folder_images(Path(source), size)
    sent = []
    try:
        with progress_callback(f"replaying {product}") as callback:
            shots = publish_frames(
                producer,
                images,
                product,
                count,
                fps or None,
                line=line,
                cameras=tuple(f"cam-{i + 1}" for i in range(cameras)),
                on_sent=lambda shot: (sent.append(shot), callback(len(sent), count)),
            )
    finally:
        producer.close()
    if truth is not None:
        truth.parent.mkdir(parents=True, exist_ok=True)
        truth.write_text(
            "".join(
                json.dumps({"frame_id": s.frame_id, "label": s.label, "defect": s.defect_type})
                + "\n"
                for s in shots
            )
        )
    span = max(shots[-1].sent_at - shots[0].sent_at, 1e-9)
    defects = sum(s.label == 1 for s in shots)
    console.print(
        f"sent {len(shots)} frames of {product} ({defects} with a defect) in {span:.1f} s "
        f"({(len(shots) - 1) / span if len(shots) > 1 else 0:.1f} frames/s)"
        + (f"; truth in {truth}" if truth else "")
    )


def _verdict_row(v: Any) -> str:
    mark = "[bold red]DEFECT[/]" if v.is_anomalous else "[green]ok    [/]"
    return (
        f"{mark} {_plain(f'{v.frame_id:<24}')} {_plain(f'{v.product:<12}')} "
        f"v{_plain(f'{v.model_version:<3}')} score {v.score:6.2f} / "
        f"{v.threshold:5.2f}  T̂={v.timestep:<3} boxes {len(v.boxes):<2} {v.latency_ms:7.0f} ms"
    )


@app.command(epilog="Examples:  edge-ad verdicts --follow  ·  edge-ad verdicts --dlq")
def verdicts(
    follow: Annotated[bool, typer.Option(help="Keep printing as verdicts arrive.")] = False,
    product: Annotated[str | None, typer.Option(help="Only this product.")] = None,
    dlq: Annotated[bool, typer.Option(help="Show the dead-letter queue instead.")] = False,
    quiet: Annotated[bool, typer.Option(help="Only the tally, not one line per frame.")] = False,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Print verdicts from the verdicts topic (deduplicated on frame_id) with a running tally."""
    import signal
    import threading

    from edge_ad.stream.kafka_io import read_topic
    from edge_ad.stream.schema import DLQ_TOPIC, ERROR_HEADER, VERDICTS_TOPIC, BadVerdict, Verdict
    from edge_ad.stream.tally import VerdictTally

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if dlq:
        shown = 0
        for record in read_topic(DLQ_TOPIC, bootstrap_servers, follow=follow, stop=stop.is_set):
            headers = {k: bytes(v or b"").decode("utf-8", "replace") for k, v in record.headers}
            frame_id = f"{headers.get('frame_id', '?'):<24}"
            from_product = f"{headers.get('product', '?'):<12}"
            console.print(
                f"[yellow]DLQ[/] {_plain(frame_id)} {_plain(from_product)} "
                f"{_plain(headers.get(ERROR_HEADER, '?'))}",
                highlight=False,
            )
            shown += 1
        console.print(f"{shown} frame(s) in {DLQ_TOPIC}")
        return
    tally = VerdictTally()
    malformed = 0
    for record in read_topic(VERDICTS_TOPIC, bootstrap_servers, follow=follow, stop=stop.is_set):
        try:
            verdict = Verdict.from_json(record.value)
        except BadVerdict:
            malformed += 1
            continue
        if product and verdict.product != product:
            continue
        if tally.add(verdict) and not quiet:
            console.print(
                f"{_verdict_row(verdict)}  [dim]({tally.frames} frames, {tally.flagged} "
                "defective)[/]",
                highlight=False,
            )
    s = tally.summary()
    p50, p99 = s["p50_ms"], s["p99_ms"]
    console.print(
        f"{s['frames']} frames, {s['flagged_defective']} defective, {s['duplicates']} duplicate "
        f"verdict(s) skipped"
        + (f", latency p50 {p50:.0f} ms / p99 {p99:.0f} ms" if p50 is not None else "")
        + (f", {malformed} malformed message(s)" if malformed else ""),
        highlight=False,
    )


@app.command(epilog="Example:  edge-ad broker --port 9092")
def broker(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port to listen on.")] = 9092,
    partitions: Annotated[
        int, typer.Option(min=1, help="Partitions of the frames topic (consumers in parallel).")
    ] = 4,
) -> None:
    """Start the embedded Kafka-protocol broker (tansu) and create the topics; Ctrl-C stops it.

    For laptops and tests: loopback only, messages in memory (gone when it stops). In
    production point --bootstrap-servers at a real Kafka.
    """
    import signal
    import threading

    from edge_ad.stream.broker import EmbeddedBroker
    from edge_ad.stream.schema import DLQ_TOPIC, FRAMES_TOPIC, VERDICTS_TOPIC

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=port, frames_partitions=partitions) as running:
        console.print(
            f"broker listening on [bold]{running.bootstrap}[/] (in memory); topics "
            f"{FRAMES_TOPIC} ({partitions} partitions), {VERDICTS_TOPIC}, {DLQ_TOPIC}"
        )
        console.print(
            f"use --bootstrap-servers {running.bootstrap} or EDGE_AD_BOOTSTRAP; Ctrl-C stops it"
        )
        while not stop.wait(0.5):
            if running.process is not None and running.process.poll() is not None:
                raise EdgeADError(
                    f"the broker exited unexpectedly (code {running.process.returncode})"
                )
    console.print("broker stopped")


@app.command(epilog="Examples:  edge-ad demo  ·  edge-ad demo --profile cpu --workdir demo/")
def demo(
    profile: ProfileOpt = "tiny",
    product: Annotated[str, typer.Option(help="Name of the generated product.")] = "synth-pcb",
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where data, MLflow store, model and report go (default: home/demo)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated product.")] = 0,
    frames: Annotated[int, typer.Option(min=10, help="Frames the camera replays.")] = 200,
    fps: Annotated[float, typer.Option(min=0.5, help="Camera frames per second.")] = 5.0,
    defect_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of replayed frames with a defect.")
    ] = 0.25,
) -> None:
    """From nothing to a live line: generate a product, train it on Ray Train, register and
    promote it in MLflow, start the embedded broker and the Ray Serve graph, replay frames,
    and score the streamed verdicts against the truth (HTML report with heatmaps).
    """
    from edge_ad.paths import edge_home
    from pipelines.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            workdir=workdir or edge_home() / "demo",
            profile=profile,
            product=product,
            seed=seed,
            frames=frames,
            fps=fps,
            defect_rate=defect_rate,
        ),
        console,
    )


@app.command(
    epilog="Example:  edge-ad compare -p pcb1 --data-root /data --methods d3ad,diffusionad,ran "
    "--report cmp.json"
)
def compare(
    product: ProductOpt,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods: d3ad, diffusionad, ran, knn; an entry may add its "
            "own settings after @ (d3ad@latent.space=vae,d3ad@latent.space=features)."
        ),
    ] = "d3ad,diffusionad,ran",
    report: Annotated[Path | None, typer.Option(help="Write the comparison as JSON here.")] = None,
    data_root: DataRootOpt = None,
    layout: LayoutOpt = "auto",
    profile: ProfileOpt = "cpu",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Bundles go to OUTPUT/<method> (default EDGE_AD_HOME/compare/P)."),
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Train and evaluate several methods on the same product and split; print one table.

    Each method is a Ray Train job tracked in MLflow (tag compare=<id>), run one after the
    other; none is registered. Columns: I-AUROC, P-AUROC, PRO, AP, s/img, train minutes.
    """
    from edge_ad.config import load_settings
    from edge_ad.data import load_dataset
    from edge_ad.paths import edge_home
    from edge_ad.progress import RichFitObserver, make_progress
    from pipelines.compare import compare_methods, parse_methods, split_entry

    _check_layout(layout)
    names = parse_methods(methods)
    if report is not None and report.is_dir():
        raise EdgeADError(f"--report {report} is a directory; give a file name such as cmp.json")
    overrides = list(set_ or [])
    # Every method's settings are resolved now: a bad --set fails before minutes of training.
    resolved = {}
    for name in names:
        method, own = split_entry(name)
        resolved[name] = load_settings(profile, config, [*overrides, *own], method=method)
    root = _data_root(data_root)
    dataset = load_dataset(root, product, layout)
    console.print(
        f"[bold]{product}[/]: {len(dataset.train)} normal train images, "
        f"{len(dataset.test)} test images; methods {', '.join(names)}; profile {profile}"
    )
    out = output if output is not None else edge_home() / "compare" / product

    def done(method: str, row: dict[str, Any]) -> None:
        if "error" in row:
            err_console.print(f"[bold red]{method} failed:[/] {row['error']}", highlight=False)
        else:
            console.print(
                f"{method}: I-AUROC {_pct(row['image_auroc'])}, PRO {_pct(row['pro'])}, "
                f"{row['seconds_per_image']:.3f} s/img, {row['train_minutes']:.1f} min"
            )

    with make_progress() as progress:
        result = compare_methods(
            product,
            root,
            resolved.__getitem__,
            names,
            out,
            dataset.layout,
            tracking_uri,
            observer_factory=lambda m: RichFitObserver(progress, m),
            on_result=done,
        )
    console.print(_compare_table(result))
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2))
        console.print(f"report: {report}")
    failed = [m for m, row in result["methods"].items() if "error" in row]
    if failed:
        raise EdgeADError(f"{len(failed)} of {len(names)} methods failed: {', '.join(failed)}")


def _compare_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    split = result.get("split", {})
    table = Table(
        title=f"{result['product']}: train {split.get('train_images', '?')} / val "
        f"{split.get('val_images', '?')} / test {split.get('test_images', '?')} images"
    )
    columns = ("I-AUROC", "P-AUROC", "PRO", "AP", "recall", "FPR", "s/img", "train min")
    table.add_column("method", overflow="fold")  # variants carry their settings: show all
    for column in columns:
        table.add_column(column, justify="right")
    for method, row in result["methods"].items():
        if "error" in row:
            table.add_row(method, "[red]failed[/]", *[""] * (len(columns) - 1))
            continue
        table.add_row(
            method,
            *(_pct(row[k]) for k in ("image_auroc", "pixel_auroc", "pro", "pixel_ap")),
            _pct(row.get("recall_at_threshold")),
            _pct(row.get("false_positive_rate_at_threshold")),
            f"{row['seconds_per_image']:.3f}",
            f"{row['train_minutes']:.1f}",
        )
    return table


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


@data_app.command("info", epilog="Example:  edge-ad data info -p candle --data-root /data/visa")
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
