"""The MLflow pyfunc face of a bundle: ``mlflow.pyfunc.load_model("models:/edge-ad-P@production")``.

Logged as *models from code*: MLflow stores this file and runs it at load time (it ends with
``mlflow.models.set_model``), while the weights travel as the bundle directory, an MLflow
artifact of JSON + safetensors. Nothing is pickled, so loading a model that arrived over the
network cannot run anything but this file and edge-ad itself.

Input (``predict``):

* a DataFrame (or Series / list) whose ``image`` column holds encoded PNG/JPEG bytes, or base64
  strings of them (what JSON and ``mlflow models serve`` carry);
* a ``uint8`` array ``(N, H, W, 3)`` or ``(H, W, 3)`` of already decoded RGB frames at the
  bundle's image size.

Bytes are decoded with :func:`edge_ad.data.untrusted.decode_untrusted` (limits checked on the
header before decoding, then the colour conversion and resize of training), so the pyfunc
scores exactly what ``edge-ad infer`` and Serve score, and refuses what they refuse. Output: one
row per image with ``score, is_anomalous, threshold, timestep, severity_distance``.

The model is logged without a signature on purpose: a column signature would make MLflow turn
every input into a DataFrame first, which rejects the 4-D frame arrays above.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from edge_ad.bundle import Bundle, load_bundle
from edge_ad.data.untrusted import decode_untrusted
from edge_ad.errors import EdgeADError

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("score", "is_anomalous", "threshold", "timestep", "severity_distance")
BATCH_SIZE = 8


def _as_bytes(value: Any, index: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            # MLflow's own encoder (input examples, serving) wraps lines: drop the whitespace.
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise EdgeADError(
                f"image {index} is a string but not base64; send encoded PNG/JPEG bytes "
                "or their base64 text"
            ) from None
    raise EdgeADError(
        f"image {index} is a {type(value).__name__}; expected encoded PNG/JPEG bytes or base64"
    )


def frames_from_input(model_input: Any, size: int) -> np.ndarray:
    """Whatever ``predict`` accepts → ``uint8`` frames ``(N, size, size, 3)``."""
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        frames = model_input[None] if model_input.ndim == 3 else model_input
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise EdgeADError(
                f"frame arrays must be uint8 (N, {size}, {size}, 3) or ({size}, {size}, 3), got "
                f"{model_input.dtype} {model_input.shape}; or send encoded images in an "
                f"{IMAGE_COLUMN!r} column"
            )
        return np.ascontiguousarray(frames)
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            columns = ", ".join(map(str, model_input.columns)) or "none"
            raise EdgeADError(
                f"input needs an {IMAGE_COLUMN!r} column of encoded images (got columns: {columns})"
            )
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, pd.Series | np.ndarray | list | tuple):
        values = list(model_input)
    elif isinstance(model_input, bytes | bytearray | str):
        values = [model_input]
    else:
        raise EdgeADError(
            f"cannot score a {type(model_input).__name__}; send a DataFrame with an "
            f"{IMAGE_COLUMN!r} column of encoded images, or uint8 frames (N, H, W, 3)"
        )
    if not values:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack(
        [decode_untrusted(_as_bytes(v, i), size, name=f"image #{i}") for i, v in enumerate(values)]
    )


class EdgeADModel(mlflow.pyfunc.PythonModel):
    """A bundle behind the pyfunc interface (``context.artifacts["bundle"]`` is its directory).

    ``model_config={"device": "cpu"}`` at load time picks the device (default ``auto``).
    """

    bundle: Bundle

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        device = str((context.model_config or {}).get("device", "auto"))
        self.bundle = load_bundle(context.artifacts["bundle"], device=device)

    # Annotated as DataFrame because that is how MLflow reads the hint: no schema inference and
    # no input validation from it (arrays are accepted too, see the module docstring).
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        detector = self.bundle.detector
        frames = frames_from_input(model_input, detector.settings.data.image_size)
        scores, distances, timesteps, flagged = [], [], [], []
        for start in range(0, len(frames), BATCH_SIZE):
            chw = torch.from_numpy(frames[start : start + BATCH_SIZE]).permute(0, 3, 1, 2)
            pred = detector.predict(chw.contiguous())
            scores.append(pred.scores.numpy())
            distances.append(pred.distances.numpy())
            timesteps.append(pred.timesteps.numpy())
            flagged.append(pred.is_anomalous.numpy())

        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        score = cat(scores, np.float64)  # float32 scores, widened exactly
        broken = np.flatnonzero(~np.isfinite(score))
        if len(broken):
            raise EdgeADError(
                f"the model gave non-finite scores for image(s) {broken[:10].tolist()}: its "
                "bundle is broken; retrain it or load another version"
            )
        return pd.DataFrame(
            {
                "score": score,
                "is_anomalous": cat(flagged, np.bool_),
                "threshold": np.full(len(score), detector.threshold, dtype=np.float64),
                "timestep": cat(timesteps, np.int64),
                "severity_distance": cat(distances, np.float64),
            },
            columns=list(OUTPUT_COLUMNS),
        )


mlflow.models.set_model(EdgeADModel())
