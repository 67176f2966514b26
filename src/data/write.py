"""Shard writer: turn a folder (or CSV / JSONL list) of captioned videos and images into webdataset shards.

    python -m src.data.write INPUT OUTPUT_DIR [--shard-size 1GB] [--workers N] [--min-frames 1]
        [--prefix shard] [--full-decode]

INPUT is either a folder, searched recursively for videos (.mp4 .mov .mkv .webm .avi .m4v) and images
(.jpg .jpeg .png .webp) each captioned by a same-named ``.txt`` file, or a ``.csv`` / ``.jsonl`` file with
``path`` and ``caption`` columns (``text`` is accepted for ``caption``) and optional ``start`` / ``end``
(seconds: the clip to train on) and ``fps`` (the video's frame rate: where the container states none, or
one more than 0.1% off, the row's rate is the sample's ``fps``, the container's is kept as ``container_fps``,
and times, windows and clip sampling follow the row's). Relative paths in a list are relative to the list's
folder.

Every file is probed with PyAV (see src.data.probe) in a pool of worker processes (codec, size, frame
rate, exact frame count, duration). A video must be as long as its container headers say and demux to
the end (so truncated downloads are caught) and its first frame must decode; ``--full-decode`` decodes
every frame instead.
Bad inputs never stop the run: each is recorded in ``OUTPUT_DIR/rejects.jsonl`` with one of the reasons
in REJECT_REASONS, list rows that cannot be used (``bad_row``) and captions without media (``no_media``)
included. Good samples are written in input order to ``OUTPUT_DIR/{prefix}-000000.tar``, ...
as ``{key}.{ext}`` (the original bytes, untouched), ``{key}.txt`` (the caption) and ``{key}.json``
(the probe), with keys ``{index:09d}``; ``OUTPUT_DIR/index.json`` lists the shards and dataset totals.
One folder holds one prefix: shards of another prefix there are refused, not mixed.
Shards are byte-for-byte reproducible: same input, same tars.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

# probing lives in src.data.probe; the `name as name` imports re-export its public names from here too
from src.cli import HelpFormatter
from src.data.probe import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from src.data.probe import MEDIA_EXTENSIONS, REJECT_REASONS, ProbeError, _describe, _probe_with_times
from src.data.probe import VIDEO_EXTENSIONS as VIDEO_EXTENSIONS
from src.data.probe import container_structure as container_structure
from src.data.probe import probe as probe

LIST_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl")
# index.json's by_frames buckets: (name, first, last) with last None for "and more".
FRAME_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("1", 1, 1),
    ("2-16", 2, 16),
    ("17-32", 17, 32),
    ("33-64", 33, 64),
    ("65-128", 65, 128),
    ("129+", 129, None),
)
DEFAULT_SHARD_SIZE = "1GB"
FPS_AGREEMENT = 1e-3  # a list's fps this close (relatively) to the container's confirms it
CREATED_BY = "kiln src.data.write"
INDEX_VERSION = 1

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_TAR_BLOCK = tarfile.BLOCKSIZE  # 512: every member is a header block plus its data padded to blocks
_TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a whole record


@dataclass(frozen=True)
class InputItem:
    """One candidate sample: a media file, its caption and optionally the part of it to train on.

    `caption` is None when there is none (no .txt file, an unreadable one, or no caption cell);
    `note` then says why. `start` / `end` are seconds, `fps` the video's frame rate as a list row declares it.
    `reject` is (reason, detail) for an input refused before probing: a list row that cannot be read
    (bad_row) or a caption without media (no_media); `path` is then the list or the caption file.
    """

    path: Path
    caption: str | None
    start: float | None = None
    end: float | None = None
    fps: float | None = None
    note: str = ""
    reject: tuple[str, str] | None = None


# ----------------------------------------------------------------------------------------------------
# sizes


def parse_size(text: str | int) -> int:
    """Parse a byte size such as "1GB", "500MB", "64KB", "1.5GiB" or "1048576" into a number of bytes.

    KB/MB/GB/TB (and K/M/G/T) are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; case is ignored.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit, "
            "e.g. 1GB, 500MB, 64KB, 1.5GiB or 1048576 (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = int(Fraction(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise ValueError(f"invalid size {text!r}: it must be at least 1 byte")
    return value


def _format_size(num_bytes: int) -> str:
    """A short human-readable size, e.g. "12.3 MB"."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# ----------------------------------------------------------------------------------------------------
# collecting inputs


def collect_inputs(input: str | Path) -> list[InputItem]:
    """List the candidate samples of INPUT (a media folder, or a .csv / .jsonl list) in write order.

    Folders are searched recursively and sorted by relative path, captions without media after them; lists
    keep their row order. A row that cannot be used (no path, bad numbers, invalid JSON) becomes an item
    with `reject` set, so that one bad row never stops the writer. Raises ValueError if INPUT does not
    exist, is of another kind, has no usable header (CSV), or yields no file.
    """
    path = Path(input)
    if not path.exists():
        raise ValueError(f"input {str(path)!r} does not exist; expected a media folder or a .csv / .jsonl list")
    if path.is_dir():
        items = _collect_folder(path)
        if not items:
            raise ValueError(
                f"input folder {str(path)!r} holds no media files; looked for {', '.join(sorted(MEDIA_EXTENSIONS))}"
            )
        return items
    suffix = path.suffix.lower()
    if suffix not in LIST_EXTENSIONS:
        raise ValueError(f"input {str(path)!r} is neither a folder nor a list file; expected a folder, .csv or .jsonl")
    rows = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    items = [_row_item(path, where, row) for where, row in rows]
    if not items:
        raise ValueError(f"input list {str(path)!r} has no rows")
    return items


def _collect_folder(root: Path) -> list[InputItem]:
    """Every media file under `root` with its same-named .txt caption, sorted by relative path, then every
    .txt caption that no media file uses (rejected as no_media: a video that never arrived is reported)."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in MEDIA_EXTENSIONS and p.is_file()]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    items = []
    for file in files:
        caption, note = _read_caption(file.with_suffix(".txt"))
        items.append(InputItem(path=file, caption=caption, note=note))
    if items:
        items += _orphan_captions(root, {file.with_suffix("") for file in files})
    return items


def _orphan_captions(root: Path, media_stems: set[Path]) -> list[InputItem]:
    """The .txt files under `root` whose name matches no media file (`media_stems`: media paths without suffix)."""
    captions = [p for p in root.rglob("*.txt") if p.is_file() and p.with_suffix("") not in media_stems]
    captions.sort(key=lambda p: p.relative_to(root).as_posix())
    wanted = ", ".join(sorted(MEDIA_EXTENSIONS))
    return [
        InputItem(path, None, reject=("no_media", f"a caption without a video or image named {path.stem} ({wanted})"))
        for path in captions
    ]


def _read_caption(path: Path) -> tuple[str | None, str]:
    """The stripped caption in `path` and, when there is none, a note saying why."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, f"no caption file {path.name}"
    except UnicodeDecodeError as exc:
        return None, f"caption file {path.name} is not UTF-8 ({exc})"
    except OSError as exc:
        return None, f"cannot read caption file {path.name}: {exc}"
    return text.strip(), f"caption file {path.name} is empty"


def _read_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """("PATH: row N", row) for each data row of a CSV with a header; row numbers count the header as 1."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        _check_columns(path, reader.fieldnames or [])
        return [(f"{path}: row {number}", row) for number, row in enumerate(reader, start=2)]


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any] | ValueError]]:
    """("PATH: line N", object) for each non-blank line of a JSON-lines file; a ValueError saying what is wrong
    in place of the object for a line that is not a JSON object with the needed keys."""
    rows: list[tuple[str, dict[str, Any] | ValueError]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                rows.append((f"{path}: line {number}", _parse_jsonl_line(path, number, line)))
    return rows


def _parse_jsonl_line(path: Path, number: int, line: str) -> dict[str, Any] | ValueError:
    """One JSON-lines row as a dict, or the ValueError naming the line and its problem."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return ValueError(f"{path}: line {number} is not valid JSON ({exc}): {line.strip()[:80]!r}")
    if not isinstance(row, dict):
        return ValueError(f"{path}: line {number} is {type(row).__name__}, expected a JSON object")
    try:
        _check_columns(path, list(row), number)
    except ValueError as exc:
        return exc
    return row


def _check_columns(path: Path, columns: Sequence[str], line: int | None = None) -> None:
    """Raise ValueError unless `columns` has "path" and "caption" (or "text")."""
    if "path" not in columns or not ({"caption", "text"} & set(columns)):
        where = f"{path}" if line is None else f"{path}: line {line}"
        raise ValueError(f"{where} has columns {list(columns)}; expected 'path' and 'caption' (or 'text')")


def _row_item(list_path: Path, where: str, row: dict[str, Any] | ValueError) -> InputItem:
    """The InputItem for one list row (`where` names it); relative paths are against the list's folder.

    A row that cannot be used gives an item with `reject` set: no_media for a caption without a path,
    bad_row (naming the row and the value) for anything else.
    """
    if isinstance(row, ValueError):
        return InputItem(list_path, None, reject=("bad_row", str(row)))
    raw_caption = row["caption"] if row.get("caption") is not None else row.get("text")
    caption = str(raw_caption).strip() if raw_caption is not None else None
    raw_path = row.get("path")
    if raw_path is None or (isinstance(raw_path, str) and not raw_path.strip()):
        if caption:
            return InputItem(list_path, None, reject=("no_media", f"{where}: caption {caption[:80]!r} has no path"))
        return InputItem(list_path, None, reject=("bad_row", f"{where}: neither a path nor a caption"))
    if not isinstance(raw_path, str):
        return InputItem(list_path, None, reject=("bad_row", f"{where}: path {raw_path!r} is not a file path"))
    file = Path(raw_path.strip())
    if not file.is_absolute():
        file = list_path.parent / file
    try:
        start, end, fps = _row_numbers(row, where)
    except ValueError as exc:
        return InputItem(file, caption, reject=("bad_row", str(exc)))
    note = "" if caption else "empty caption cell" if caption == "" else "no caption cell"
    return InputItem(path=file, caption=caption, start=start, end=end, fps=fps, note=note)


def _row_numbers(row: dict[str, Any], where: str) -> tuple[float | None, float | None, float | None]:
    """A row's (start, end, fps), each None when absent; ValueError naming the row and the bad value."""
    start = _optional_number(row.get("start"), "start", where)
    end = _optional_number(row.get("end"), "end", where)
    fps = _optional_number(row.get("fps"), "fps", where)
    if start is not None and start < 0:
        raise ValueError(f"{where}: start={start} is negative; expected seconds >= 0")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{where}: end={end} is not after start={start}; expected end > start")
    if end is not None and end <= 0:
        raise ValueError(f"{where}: end={end} must be > 0 seconds")
    if fps is not None and fps <= 0:
        raise ValueError(f"{where}: fps={fps} must be > 0")
    return start, end, fps


def _optional_number(value: Any, name: str, where: str) -> float | None:
    """A row's number cell as float; None when the cell is absent or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name}={value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: {name}={value!r} is not a finite number")
    return number


# ----------------------------------------------------------------------------------------------------
# checking one input (runs in the worker processes)


def _process(item: InputItem, min_frames: int, full_decode: bool = False) -> dict[str, Any]:
    """Check one input: {"ok": True, "meta": sample json} or {"ok": False, "reason", "detail"}."""
    try:
        return {"ok": True, "meta": _sample_meta(item, min_frames, full_decode)}
    except ProbeError as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    except Exception as exc:  # an FFmpeg surprise on one file must never stop the run
        return {"ok": False, "reason": "unreadable", "detail": f"unexpected error while probing: {_describe(exc)}"}


def _sample_meta(item: InputItem, min_frames: int, full_decode: bool) -> dict[str, Any]:
    """The `{key}.json` of a good input; raises ProbeError for a bad one."""
    if item.reject is not None:
        raise ProbeError(*item.reject)
    if not item.path.exists():
        raise ProbeError("missing", f"no such file: {item.path}")
    if not item.caption:
        raise ProbeError("no_caption", item.note or "no caption")
    info, times = _probe_with_times(item.path, full_decode)
    if info["kind"] == "video" and item.fps is not None:
        info, times = _declare_fps(info, times, item.fps)
    meta = {**info, "source": str(item.path)}
    if info["kind"] == "video":
        meta.update(_check_length(info, times, item, min_frames))
    return meta


def _declare_fps(info: dict[str, Any], times: list[float], fps: float) -> tuple[dict[str, Any], list[float]]:
    """The probe and frame times under a list row's frame rate.

    A rate within FPS_AGREEMENT of the container's confirms it (29.97 for 30000/1001): nothing changes. Any
    other rate replaces it: `fps` is the row's, `container_fps` the container's, the duration and frame k's
    time (k / fps) are on the row's clock.
    """
    container = info["fps"]
    if container > 0 and abs(fps - container) <= FPS_AGREEMENT * container:
        return info, times
    declared = {**info, "fps": fps, "container_fps": container, "duration": round(info["frames"] / fps, 6)}
    return declared, [index / fps for index in range(len(times))]


def _check_length(info: dict[str, Any], times: list[float], item: InputItem, min_frames: int) -> dict[str, Any]:
    """Raise too_short if the video (or its start/end window) has fewer than `min_frames` frames.

    Returns the window keys for the sample json: the given "start" / "end" and "window_frames" (frames
    whose presentation time lies in [start, end)).
    """
    if info["frames"] < min_frames:
        raise ProbeError("too_short", f"{info['frames']} frames, fewer than min_frames={min_frames}")
    extra: dict[str, Any] = {}
    if item.start is not None or item.end is not None:
        start = item.start if item.start is not None else 0.0
        end = item.end if item.end is not None else float("inf")
        count = _frames_in_window(times, start, end, info["fps"])
        if count < min_frames:
            raise ProbeError(
                "too_short",
                f"the window start={item.start} end={item.end} s holds {count} of the video's {info['frames']} "
                f"frames ({info['duration']:.3f} s), fewer than min_frames={min_frames}",
            )
        extra.update({k: v for k, v in (("start", item.start), ("end", item.end)) if v is not None})
        extra["window_frames"] = count
    return extra


def _frames_in_window(times: list[float], start: float, end: float, fps: float) -> int:
    """How many frame times lie in [start, end), tolerating timestamps rounded to a fraction of a frame."""
    tolerance = 0.25 / fps if fps > 0 else 1e-3
    return sum(1 for t in times if start - tolerance <= t < end - tolerance)


def _check_all(
    items: Sequence[InputItem], min_frames: int, workers: int, full_decode: bool
) -> Iterator[dict[str, Any]]:
    """`_process` every item, in a pool of `workers` processes when there is more than one; results in order."""
    task = functools.partial(_process, min_frames=min_frames, full_decode=full_decode)
    workers = min(workers, len(items))
    if workers <= 1:
        yield from map(task, items)
        return
    chunksize = max(1, min(16, len(items) // (workers * 8)))
    # spawn, not fork: the parent may hold threads (torch, a DataLoader) that a forked child would inherit locked
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(task, items, chunksize=chunksize)


# ----------------------------------------------------------------------------------------------------
# writing shards


def _member_bytes(size: int) -> int:
    """Bytes a tar member of `size` data bytes occupies: a header block plus data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _archive_bytes(payload: int) -> int:
    """Bytes of a closed tar whose members occupy `payload` bytes: two end blocks, padded to a record."""
    return -(-(payload + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file header with fixed metadata, so that shards do not depend on the clock or the user."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _ShardWriter:
    """Appends samples to `{prefix}-NNNNNN.tar` shards, cutting a new shard before one would exceed max_bytes.

    Each shard is written as `{name}.tmp` and renamed into place when complete, so a crash never
    leaves a half-written shard under a final name. `shards` lists the finished ones for index.json.
    """

    def __init__(self, output_dir: Path, prefix: str, max_bytes: int) -> None:
        self.output_dir = output_dir
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._payload = 0
        self._samples = 0

    def add(self, key: str, media: Path, ext: str, caption: str, meta: dict[str, Any]) -> None:
        """Write one sample: the media file's bytes as-is, its caption and its json."""
        text = caption.encode("utf-8")
        info = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        try:
            handle = media.open("rb")
        except OSError as exc:
            raise ProbeError("missing" if not media.exists() else "unreadable", f"cannot read: {exc}") from exc
        with handle:
            size = os.fstat(handle.fileno()).st_size
            members = [(f"{key}.{ext}", size, handle), (f"{key}.txt", len(text), io.BytesIO(text))]
            members.append((f"{key}.json", len(info), io.BytesIO(info)))
            payload = sum(_member_bytes(member_size) for _, member_size, _ in members)
            if self._samples and _archive_bytes(self._payload + payload) > self.max_bytes:
                self.close()
            tar = self._tar or self._open()
            for name, member_size, source in members:
                tar.addfile(_tar_info(name, member_size), source)
        self._payload += payload
        self._samples += 1

    def _open(self) -> tarfile.TarFile:
        """Start the next shard under its temporary name."""
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.output_dir / f"{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (spans add calls)
        return self._tar

    def close(self) -> None:
        """Finish the current shard (if any) and rename it into place."""
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards.append({"name": final.name, "samples": self._samples, "bytes": final.stat().st_size})
        self._tar, self._tmp, self._payload, self._samples = None, None, 0, 0

    def abort(self) -> None:
        """Drop the unfinished shard after an error."""
        if self._tar is not None and self._tmp is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
        self._tar, self._tmp = None, None


def _frames_bucket(frames: int) -> str:
    """The by_frames bucket name for a sample of `frames` frames."""
    for name, first, last in FRAME_BUCKETS:
        if frames >= first and (last is None or frames <= last):
            return name
    return FRAME_BUCKETS[0][0]  # 0 frames cannot pass the probe; keep the function total anyway


def _build_index(shards: list[dict[str, Any]], metas: Iterable[dict[str, Any]], rejects: list[dict]) -> dict:
    """index.json: the shard list and dataset totals (window_frames counts for windowed clips)."""
    metas = list(metas)
    resolutions = Counter((meta["width"], meta["height"]) for meta in metas)
    by_frames = dict.fromkeys((name for name, _, _ in FRAME_BUCKETS), 0)
    for meta in metas:
        by_frames[_frames_bucket(meta.get("window_frames", meta["frames"]))] += 1
    rejected = Counter(reject["reason"] for reject in rejects)
    return {
        "version": INDEX_VERSION,
        "shards": shards,
        "totals": {
            "samples": len(metas),
            "videos": sum(meta["kind"] == "video" for meta in metas),
            "images": sum(meta["kind"] == "image" for meta in metas),
            "by_resolution": {f"{w}x{h}": resolutions[(w, h)] for w, h in sorted(resolutions)},
            "by_frames": by_frames,
            "rejected": {reason: rejected[reason] for reason in REJECT_REASONS},
        },
        "created_by": CREATED_BY,
    }


def _write_text_atomically(path: Path, text: str) -> None:
    """Write `path` via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    """File names of this prefix's shards, finished or being written."""
    return re.compile(rf"{re.escape(prefix)}-\d{{6,}}\.tar(\.tmp)?")


def _refuse_other_prefixes(output_dir: Path, prefix: str) -> None:
    """Raise ValueError if `output_dir` holds shards of another prefix: index.json and rejects.jsonl describe
    one write, and the keys of a second one would repeat the first's (000000000, ...)."""
    pattern = _shard_pattern(prefix)
    others = sorted(p.name for p in output_dir.glob("*.tar") if not pattern.fullmatch(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(
            f"{output_dir} already holds shards not of prefix {prefix!r} ({shown}); writing here would replace "
            "their index.json and rejects.jsonl and repeat their sample keys. Write into a folder of its own "
            "(a run reads several: data.urls='[DIR_A,DIR_B]'), or reuse their prefix to replace them"
        )


def _remove_stale_shards(output_dir: Path, prefix: str, keep: set[str]) -> list[str]:
    """Delete `{prefix}-NNNNNN.tar` shards left by an earlier, longer run into the same folder."""
    pattern = _shard_pattern(prefix)
    stale = sorted(p.name for p in output_dir.iterdir() if pattern.fullmatch(p.name) and p.name not in keep)
    for name in stale:
        (output_dir / name).unlink()
    return stale


def _default_workers() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _check_arguments(workers: int, min_frames: int, prefix: str) -> None:
    """Raise ValueError for a nonsensical write_shards argument."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise ValueError(f"prefix {prefix!r} must be a plain file-name prefix (letters, digits, '_', '.', '-')")


def write_shards(
    input: str | Path,
    output_dir: str | Path,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    min_frames: int = 1,
    prefix: str = "shard",
    full_decode: bool = False,
) -> dict[str, Any]:
    """Probe every input and write the good ones as webdataset shards; see the module docstring.

    Args:
        input: a media folder (searched recursively, captions in same-named .txt files) or a .csv /
            .jsonl list with path, caption and optional start, end, fps columns.
        output_dir: where shards, index.json and rejects.jsonl go (created if needed). Shards of the
            same prefix left there by an earlier run are replaced; shards of another prefix are refused.
        shard_size: the largest shard, in bytes or as parse_size text ("1GB"); a shard holds at
            least one sample even if that sample alone is larger.
        workers: probing processes; default: the CPUs available.
        min_frames: videos (or their start/end windows) with fewer frames are rejected as too_short;
            images are single frames and exempt.
        prefix: shard file names are `{prefix}-000000.tar`, ...
        full_decode: decode every frame of every video (slow; catches damage mid-stream), see `probe`.

    Returns:
        The index.json dict. Raises ValueError for bad arguments, an input that yields no file, or an
        output folder holding another prefix's shards.

    With workers > 1 the probes run in spawned processes, so a script calling this needs the usual
    `if __name__ == "__main__":` guard.
    """
    max_bytes = parse_size(shard_size)
    workers = _default_workers() if workers is None else workers
    _check_arguments(workers, min_frames, prefix)
    items = collect_inputs(input)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    _refuse_other_prefixes(output, prefix)
    writer = _ShardWriter(output, prefix, max_bytes)
    metas: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    try:
        for item, result in zip(items, _check_all(items, min_frames, workers, full_decode), strict=True):
            try:
                if not result["ok"]:
                    raise ProbeError(result["reason"], result["detail"])
                meta = result["meta"]
                writer.add(f"{len(metas):09d}", item.path, meta["ext"], item.caption or "", meta)
                metas.append(meta)
            except ProbeError as exc:
                rejects.append({"path": str(item.path), "reason": exc.reason, "detail": exc.detail})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    _write_text_atomically(output / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    index = _build_index(writer.shards, metas, rejects)
    _write_text_atomically(output / "index.json", json.dumps(index, indent=2) + "\n")
    _remove_stale_shards(output, prefix, {shard["name"] for shard in writer.shards})
    return index


# ----------------------------------------------------------------------------------------------------
# command line


def format_summary(index: dict[str, Any], output_dir: str | Path) -> str:
    """The end-of-run report: samples written, shards, rejects by reason and where they are listed."""
    totals = index["totals"]
    written = sum(shard["bytes"] for shard in index["shards"])
    lines = [
        f"wrote {totals['samples']} samples ({totals['videos']} videos, {totals['images']} images) "
        f"in {len(index['shards'])} shard{'' if len(index['shards']) == 1 else 's'} ({_format_size(written)}) "
        f"to {output_dir}"
    ]
    rejected = {reason: n for reason, n in totals["rejected"].items() if n}
    if rejected:
        counts = ", ".join(f"{reason} {n}" for reason, n in rejected.items())
        lines.append(f"rejected {sum(rejected.values())} inputs ({counts}); see {Path(output_dir) / 'rejects.jsonl'}")
    else:
        lines.append("rejected 0 inputs")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 even when some inputs were rejected)."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="python -m src.data.write",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    parser.add_argument(
        "input",
        type=Path,
        help="a folder of videos/images with .txt captions, or a .csv/.jsonl list (path, caption; optional start, "
        "end, fps); a relative path in a list is resolved from the list's folder, not from the current one",
    )
    parser.add_argument("output_dir", type=Path, help="where the shards, index.json and rejects.jsonl go")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="largest shard, e.g. 1GB, 500MB, 64KB")
    parser.add_argument("--workers", type=int, default=None, help="probing processes (default: all CPUs)")
    parser.add_argument("--min-frames", type=int, default=1, help="reject shorter videos / windows")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument(
        "--full-decode", action="store_true", help="decode every frame (slow; catches corruption mid-stream)"
    )
    args = parser.parse_args(argv)
    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as exc:
        parser.error(f"--shard-size: {exc}")
    try:
        index = write_shards(
            args.input, args.output_dir, shard_size, args.workers, args.min_frames, args.prefix, args.full_decode
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(index, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
