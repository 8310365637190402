"""Networks of D3AD: feature backbone φ, KL autoencoder (E, D) and the latent denoiser ε_θ.

Plain torch modules and builder functions; the D3AD algorithm that combines them lives in
``edge_ad/d3ad/``.
"""

from edge_ad.models.autoencoder import (
    DEFAULT_AE_CHANNELS,
    LatentCodec,
    autoencoder_loss,
    build_autoencoder,
    estimate_scaling_factor,
    load_pretrained_autoencoder,
)
from edge_ad.models.backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_LAYERS,
    FeatureBackbone,
    freeze,
    frozen_copy,
    load_backbone_weights,
    read_state_dict,
    resolve_backbone_weights,
    set_batchnorm_eval,
    truncate_unused_blocks,
    unfreeze,
)
from edge_ad.models.unet import (
    BETA_END,
    BETA_START,
    DEFAULT_UNET_CHANNELS,
    NUM_TRAIN_TIMESTEPS,
    build_unet,
    diffusion_loss,
    make_noise_scheduler,
)

__all__ = [
    "BETA_END",
    "BETA_START",
    "DEFAULT_AE_CHANNELS",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "DEFAULT_UNET_CHANNELS",
    "NUM_TRAIN_TIMESTEPS",
    "FeatureBackbone",
    "LatentCodec",
    "autoencoder_loss",
    "build_autoencoder",
    "build_unet",
    "diffusion_loss",
    "estimate_scaling_factor",
    "freeze",
    "frozen_copy",
    "load_backbone_weights",
    "load_pretrained_autoencoder",
    "make_noise_scheduler",
    "read_state_dict",
    "resolve_backbone_weights",
    "set_batchnorm_eval",
    "truncate_unused_blocks",
    "unfreeze",
]
