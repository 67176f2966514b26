"""Video autoencoders behind one small interface (patch, hunyuan, dcae).

Every VAE class has:
- `spatial_compression`, `temporal_compression`, `latent_channels`, `scaling_factor`, `shift_factor`;
- `check_frames(n)` (the frame-count rule: raise ValueError naming n and what would be valid) and
  `latent_shape(frames, height, width) -> (C, T', H', W')`;
- `encode(video (B, 3, T, H, W) in [-1, 1]) -> latent (B, C, T', H', W')`, already shifted and scaled:
  latent = (z - shift_factor) * scaling_factor; `decode` inverts it. Tiling (spatial and temporal) is a
  constructor setting and is recorded (the DC-AE's is Open-Sora's, `tiling.py`);
- a VAE with a sampled posterior (HunyuanVideo) also has `encode_posterior(video) -> (mean, std)` in latent units,
  what a `posterior: sample` cache stores (`posterior.py`);
- `provenance(**constructor_args) -> dict` (a classmethod, see `src.models.provenance`: computable from a config
  without building the model, so a cache can be checked without loading weights) and `describe()`, the same dict
  for a built instance. The dict holds `name`, `weights_sha256` (None without weights), `dtype`,
  `scaling_factor`, `shift_factor`, `spatial_compression`, `temporal_compression`, `latent_channels`, `tiling`
  and `posterior`.
"""
