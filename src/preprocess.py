"""Encode a video dataset once: `torchrun --nproc_per_node=N -m src.preprocess +experiment=NAME`.

The Hydra entry of `src.data.preprocess.preprocess` (what it reads, writes and checks is described there): the
training config is composed, and the feature shards go to the experiment's `data.urls`.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from src.data.preprocess import preprocess
from src.parallel.dist import leave


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    preprocess(cfg)


def main() -> None:
    # The training config is composed, but nothing goes to the run directory: the log lands beside the cache.
    sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=${data.urls}", "hydra.job.name=preprocess"]
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    _hydra_main()


if __name__ == "__main__":
    main()
    leave()  # once every rank has finished; no interpreter finalization (src.parallel.dist.leave)
