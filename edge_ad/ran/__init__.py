"""RAN, "Removing Anomalies as Noises": pixel-level KL-divergence scores of
the diffusion model plus a feature-level score against a reconstruction made by gradient
denoising under a PaDiM model of normal features."""
