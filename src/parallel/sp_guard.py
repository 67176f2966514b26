"""Run-time guard of sequence parallelism: the ranks of a group must train on one and the same batch.

A rank of a sequence-parallel group that reads another batch (a loader split by global instead of data-parallel
rank, a different seed, a diverged data state after a resume) does not crash: its tokens are silently mixed into
the others' attention and the samples degrade. `check_sequence_batches` compares a fingerprint of each rank's
batch (sample keys and indices, bucket, the exact timesteps, the noise seeds) within every group, at the first
step of a run and every `sp_guard_every` steps, and stops the run on every rank, naming the ranks that differ.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from src.diffusion.flow import noise_seed
from src.parallel.dist import DistInfo


def batch_fingerprint(batch: dict, t: torch.Tensor, seed: int) -> tuple[str, str]:
    """(digest, readable summary) of what must be identical within a sequence-parallel group.

    batch: the loader's batch ("index", "bucket", and "key" when the loader gives them); t: (B,) timesteps.
    """
    indices = batch["index"].tolist()
    fields = {
        "bucket": batch["bucket"],
        "index": indices,
        "key": list(batch.get("key", [])),
        "noise_seed": [noise_seed(seed, i) for i in indices],
    }
    digest = hashlib.sha256(json.dumps(fields).encode())
    times = t.detach().float().cpu()  # a host sync: this runs only every sp_guard_every steps
    digest.update(times.numpy().tobytes())
    summary = f"bucket {fields['bucket']}, samples {indices[:4]}, t {[round(x, 6) for x in times.tolist()[:4]]}"
    return digest.hexdigest()[:16], summary


def check_sequence_batches(batch: dict, t: torch.Tensor, seed: int, info: DistInfo, step: int) -> None:
    """Raise RuntimeError on every rank if the ranks of any sequence-parallel group hold different batches.

    Gathers every rank's fingerprint (one small all-gather over the world), so that all ranks reach the same
    verdict and stop together instead of some waiting forever in the next collective.
    """
    if info.sp_size == 1:
        return
    digest, summary = batch_fingerprint(batch, t, seed)
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, (info.rank, digest, summary))
    problems = []
    for dp_rank in range(info.world_size // info.sp_size):  # the groups from the ranks, not from the loader's view
        members = [m for m in everyone if m[0] // info.sp_size == dp_rank]
        if len({m[1] for m in members}) > 1:
            ranks = ", ".join(str(m[0]) for m in members)
            listing = "; ".join(f"rank {r}: {s}" for r, _, s in members)
            problems.append(f"ranks {ranks} (data-parallel rank {dp_rank}) hold different batches: {listing}")
    if problems:
        raise RuntimeError(
            f"sequence parallelism out of step at step {step}: " + " | ".join(problems) + ". Every rank of a "
            "sequence-parallel group must read the same batch (the loader splits by data-parallel rank) with the "
            "same seed; the run is stopped rather than trained on mixed sequences."
        )
