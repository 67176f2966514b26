"""Kiln. Importing the package registers its OmegaConf resolvers (`src/config.py`: `${latent_channels:${vae}}`),
so every entry point, Hydra compose and test resolves them."""

from src.config import register_resolvers

register_resolvers()
