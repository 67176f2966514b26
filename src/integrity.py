"""Checkpoints that prove their integrity, whichever engine wrote them.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNNN/` of files an engine wrote (the local engine's
`local_engine.pt`; DeepSpeed's per-rank `*_model_states.pt` / `*_optim_states.pt` and Kiln's `ema_rank_N.pt`;
torch.distributed.checkpoint's `.metadata` and `*.distcp`). `save_checkpoint` has the engine write them, then:

1. every rank waits for every other (barrier): all files are complete;
2. the files are split over the ranks (sorted names, rank r takes every world-th); each rank hashes its share
   with SHA-256 and fsyncs it through the same open file (one read: the hash costs the read, about 1 GB/s per
   core with SHA-NI, all ranks in parallel);
3. rank 0 writes `manifest.json` (name -> size and SHA-256, the world size) last, by an fsynced temporary file
   renamed into place, then `latest` the same way; the directory entries are fsynced too;
4. with `ckpt_keep`, checkpoints older than the newest `ckpt_keep` sealed ones are deleted.

`latest` therefore only ever names a folder whose every file is on disk and listed. On resume `resume_tag`
verifies the manifest the same way (split over the ranks, the verdict gathered so that every rank decides alike)
and refuses, naming each missing, changed or unlisted file; `resume=latest_intact` falls back to the newest
intact checkpoint instead. `python -m src.integrity verify|seal FOLDER` does the same by hand.

The manifest knows nothing of engines: it hashes whatever files the folder holds.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from src.cli import HelpFormatter
from src.parallel.dist import all_gather_objects
from src.rundir import latest_tag
from src.safe_load import refuse_unsafe_files

log = logging.getLogger("kiln.checkpoint")
MANIFEST = "manifest.json"
FORMAT = 1
POLICIES = ("latest", "latest_intact")
_CHUNK = 16 << 20
_STEP = re.compile(r"step_(\d+)$")


def file_sha256(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file, read in chunks; with `sync`, fsync it through the same descriptor afterwards."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every regular file under `folder` (relative POSIX paths, sorted), the manifest and its temporary excepted."""
    skip = {MANIFEST, MANIFEST + ".tmp"}
    return sorted(
        p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() and p.name not in skip
    )


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old content or the new, never a mix or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def seal(folder: Path) -> dict:
    """Hash and fsync the files of a checkpoint folder (split over the ranks) and write its manifest (rank 0).

    A collective: every rank calls it once every rank's files are written. Returns the manifest."""
    folder = Path(folder)
    _barrier()  # every rank's files are complete
    rank, world = _rank_world()
    names = folder_files(folder)
    mine = {
        n: {"size": (folder / n).stat().st_size, "sha256": file_sha256(folder / n, sync=True)}
        for n in names[rank::world]
    }
    files = {name: entry for part in all_gather_objects(mine) for name, entry in part.items()}
    manifest = {"format": FORMAT, "tag": folder.name, "world_size": world, "files": dict(sorted(files.items()))}
    if rank == 0:
        _fsync_dir(folder)
        atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))
    _barrier()
    return manifest


def _check_share(folder: Path, files: dict, names: list[str]) -> list[str]:
    """Problems with the files `names` of a manifest's `files`: missing, another size, another hash."""
    problems = []
    for name in names:
        path, entry = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{path} is missing (listed in {MANIFEST})")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, its manifest says {entry['size']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in {MANIFEST} (the file changed after the save)")
    return problems


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; ValueError saying why when there is none or it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: the save of {Path(folder).name} did not finish (or the checkpoint predates "
            f"manifests; if you trust its files, `python -m src.integrity seal {folder}` records them)"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from err
    return manifest


def verify(folder: Path) -> list[str]:
    """Every problem of a checkpoint folder against its manifest; [] when intact.

    A collective when a process group exists (each rank hashes its share; every rank returns the same list)."""
    folder = Path(folder)
    rank, world = _rank_world()
    try:
        files = read_manifest(folder)["files"]
    except ValueError as err:
        return [str(err)]  # every rank reads the same manifest: no collective is skipped by some ranks only
    names = sorted(files)
    problems = _check_share(folder, files, names[rank::world])
    if rank == 0:
        problems += [f"{folder / n} is not listed in {MANIFEST}" for n in folder_files(folder) if n not in files]
    return [p for part in all_gather_objects(problems) for p in part]


def step_folders(ckpt_dir: Path) -> list[Path]:
    """The `step_N` folders of a checkpoints directory, newest (highest step) first."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: _step(p.name), reverse=True)


def _step(tag: str) -> int:
    match = _STEP.match(tag)
    return int(match[1]) if match else -1


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically (rank 0 only)."""
    if _rank_world()[0] == 0:
        atomic_write(Path(ckpt_dir) / "latest", tag)


def refusal(folder: Path, problems: list[str]) -> str:
    return (
        f"checkpoint {folder} is not intact, so it is not loaded:\n  - "
        + "\n  - ".join(problems)
        + "\nRestore the named files, or resume from the newest intact checkpoint with resume=latest_intact."
    )


def resume_tag(ckpt_dir: Path, policy: str = "latest") -> str | None:
    """The verified checkpoint to resume from, or None for a fresh start (no `latest`).

    `policy="latest"` refuses a `latest` that is not intact, naming every bad file. "latest_intact" takes the
    newest intact checkpoint instead (logging what it skipped and why) and points `latest` at it. Either way a
    checkpoint whose pickles would run code is refused (`src.safe_load`). A collective."""
    if policy not in POLICIES:
        raise ValueError(f"resume={policy!r} is not one of {POLICIES}")
    ckpt_dir = Path(ckpt_dir)
    try:
        tag = latest_tag(ckpt_dir)
    except ValueError as err:  # an empty `latest`, or one naming a missing folder
        if policy == "latest":
            raise
        return _newest_intact(ckpt_dir, [str(err)])
    if tag is None:
        return None
    problems = verify(ckpt_dir / tag)
    if not problems:
        refuse_unsafe_files(ckpt_dir / tag)
        return tag
    if policy == "latest":
        raise ValueError(refusal(ckpt_dir / tag, problems))
    return _newest_intact(ckpt_dir, [f"{tag}: " + "; ".join(problems)], skip=tag)


def _newest_intact(ckpt_dir: Path, skipped: list[str], skip: str = "") -> str:
    """resume=latest_intact: the newest checkpoint that verifies, now named by `latest`; `skipped` says why the
    others were passed over."""
    for folder in step_folders(ckpt_dir):
        if folder.name == skip:
            continue
        problems = verify(folder)
        if not problems:
            refuse_unsafe_files(folder)
            log.warning("resume=latest_intact: resuming from %s; skipped: %s", folder, " | ".join(skipped))
            write_latest(ckpt_dir, folder.name)
            _barrier()
            return folder.name
        skipped.append(f"{folder.name}: " + "; ".join(problems))
    raise ValueError(f"no intact checkpoint in {ckpt_dir}:\n  - " + "\n  - ".join(skipped))


def prune(ckpt_dir: Path, keep: int | None) -> list[str]:
    """Delete the checkpoints older than the newest `keep` sealed ones up to the one `latest` names (rank 0; None
    keeps all). Folders past `latest` (left by a run that resumed from an older checkpoint) are not counted and
    not deleted. Returns the deleted tags."""
    current = _current(ckpt_dir)
    if keep is None or _rank_world()[0] != 0 or current is None:
        return []
    folders = step_folders(ckpt_dir)
    newest = _step(current)
    sealed = [f for f in folders if (f / MANIFEST).is_file() and _step(f.name) <= newest]
    if len(sealed) <= keep:
        return []
    oldest_kept = _step(sealed[keep - 1].name)
    doomed = [f for f in folders if _step(f.name) < oldest_kept]
    for folder in doomed:
        shutil.rmtree(folder)
    if doomed:
        log.info("ckpt_keep=%d: deleted %s", keep, ", ".join(f.name for f in doomed))
    return [f.name for f in doomed]


def _current(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None (no `latest`, an empty one, one naming a missing folder)."""
    try:
        return latest_tag(ckpt_dir)
    except ValueError:
        return None


def _prepare(folder: Path, ckpt_dir: Path) -> None:
    """Rank 0: a tag folder left by an interrupted save is emptied; the one `latest` names loses only its manifest
    (it is unsealed while it is rewritten)."""
    if _rank_world()[0] != 0 or not folder.exists():
        return
    if folder.name == _current(ckpt_dir):
        (folder / MANIFEST).unlink(missing_ok=True)
    else:
        shutil.rmtree(folder)


def save_failure(folder: Path, err: BaseException) -> OSError:
    """The error for a save that failed: says "no space" when the filesystem is (nearly) full, and what to do."""
    try:
        free = shutil.disk_usage(folder.parent).free
    except OSError:
        free = None
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    current, needed = _current(folder.parent), written
    if current and (folder.parent / current / MANIFEST).is_file():
        needed = sum(e["size"] for e in read_manifest(folder.parent / current)["files"].values())
    full = getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free <= max(needed - written, 1 << 20))
    previous = f"`latest` still names {current}, which resumes" if current else "no checkpoint is complete yet"
    if full:
        return OSError(
            errno.ENOSPC,
            f"no space left on the filesystem of {folder.parent} while writing checkpoint {folder.name} "
            f"({free} bytes free; a checkpoint takes about {needed} bytes; {type(err).__name__}: {err}). Free space "
            f"(ckpt_keep=N keeps only the newest N checkpoints) or move the run directory; {previous}.",
        )
    return OSError(f"writing checkpoint {folder} failed ({type(err).__name__}: {err}); {previous}.")


def save_checkpoint(engine, ckpt_dir: Path, tag: str, state: dict, keep: int | None = None) -> None:
    """Write a checkpoint with `engine.save`, seal it, move `latest` to it, apply `keep`. Every rank calls it."""
    ckpt_dir = Path(ckpt_dir)
    folder = ckpt_dir / tag
    _prepare(folder, ckpt_dir)
    _barrier()
    try:
        engine.save(ckpt_dir, tag, state)
        seal(folder)
        write_latest(ckpt_dir, tag)
    except (OSError, RuntimeError) as err:
        raise save_failure(folder, err) from err
    prune(ckpt_dir, keep)
    _barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m src.integrity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("verify", "seal"))
    parser.add_argument("folder", type=Path, help="a checkpoint folder (RUN_DIR/checkpoints/step_N)")
    args = parser.parse_args(argv)
    if args.action == "seal":
        manifest = seal(args.folder)
        print(f"sealed {args.folder}: {len(manifest['files'])} files")
        return 0
    problems = verify(args.folder)
    print("\n".join(problems) if problems else f"{args.folder}: intact")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
