"""DiffusionAD (Zhang et al. 2023): noise-to-norm reconstruction with norm-guided one-step
denoising, and a segmentation network on (x, x̂) trained with synthetic anomalies.
The fast method."""
