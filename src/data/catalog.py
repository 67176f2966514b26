"""The catalogue of a set of webdataset shards: every sample's key, probe and where its members lie.

Built once at start by reading tar headers and the small `.json` / `.txt` members (local shards are seeked
over, never read in full); `pipe:` shards are streamed once. Planning batches needs only the catalogue; the
media bytes are read later, by offset for local shards. A shard that cannot be opened is retried, then
reported and left out; a tar that breaks off keeps the samples before the break; samples without media,
caption or a usable probe are reported. Nothing bad is used silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset
from braceexpand import braceexpand
from webdataset import tariterators

from src.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, probe

log = logging.getLogger(__name__)

VIDEO_EXTS = tuple(sorted(ext.lstrip(".") for ext in VIDEO_EXTENSIONS))  # the shard writer's media types
IMAGE_EXTS = tuple(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
PROBE_KEYS = ("width", "height", "frames", "fps")


@dataclass
class SampleInfo:
    """One sample of a shard. Locations are (offset, size) in the tar file, None for streamed shards."""

    key: str
    media: str  # extension of the media member ("mp4", "png", ...)
    meta: dict  # kind, width, height, frames, fps (+ start/end seconds of a cut)
    media_loc: tuple[int, int] | None = None
    caption_loc: tuple[int, int] | None = None


@dataclass
class ShardInfo:
    url: str
    samples: list[SampleInfo] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return is_local(self.url)


@dataclass(frozen=True)
class Skip:
    """A sample or shard that is not used, and why."""

    key: str
    reason: str
    detail: str


def is_local(url: str) -> bool:
    return url.startswith("file:") or not (url.startswith("pipe:") or "://" in url)


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://").removeprefix("file:"))


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from directories (their *.tar), brace patterns, plain paths or `pipe:` commands, sorted."""
    patterns = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    expanded: list[str] = []
    for pattern in map(str, patterns):
        if not is_local(pattern):
            expanded.extend(braceexpand(pattern))
            continue
        if local_path(pattern).is_dir():
            found = sorted(str(p) for p in local_path(pattern).glob("*.tar"))
        else:
            found = [p for p in braceexpand(pattern) if local_path(p).is_file()]
        if not found:
            raise ValueError(
                f"shard pattern {pattern!r} matches no tar files (a directory of .tar, a brace "
                "pattern like shard-{000000..000009}.tar, or pipe: URLs)"
            )
        expanded.extend(found)
    return sorted(expanded)


def split_name(name: str) -> tuple[str, str] | None:
    """ "dir/000000012.mp4" -> ("dir/000000012", "mp4"), as webdataset groups members into samples."""
    prefix, ext = tariterators.base_plus_ext(name)
    return None if prefix is None or name.startswith("__") else (prefix, ext.lower())


def probe_bytes(data: bytes, ext: str) -> dict:
    """The shard writer's probe (`src.data.probe.probe`) of in-memory media, for shards written without `.json`."""
    with tempfile.NamedTemporaryFile(suffix=f".{ext}") as f:
        f.write(data)
        f.flush()
        return probe(f.name)


def _assemble(
    key: str, members: dict[str, tuple], read: Callable[[tuple | bytes], bytes]
) -> tuple[SampleInfo | None, Skip | None]:
    """A SampleInfo from one key's members {ext: location or bytes}, or the reason it is skipped."""
    media = next((ext for ext in (*VIDEO_EXTS, *IMAGE_EXTS) if ext in members), None)
    if media is None:
        return None, Skip(key, "missing_media", f"members {sorted(members)}")
    if "txt" not in members:
        return None, Skip(key, "missing_txt", f"members {sorted(members)}")
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(read(members["json"]))
        except (ValueError, UnicodeDecodeError) as err:
            return None, Skip(key, "bad_json", str(err))
    meta.setdefault("kind", "image" if media in IMAGE_EXTS else "video")
    if meta["kind"] == "image":
        meta.setdefault("frames", 1)
        meta.setdefault("fps", 0.0)
    if any(k not in meta for k in PROBE_KEYS):
        try:
            meta.update(probe_bytes(read(members[media]), media))
        except Exception as err:  # PyAV raises many kinds on garbage
            return None, Skip(key, "unreadable_media", f"{type(err).__name__}: {err}")
    return SampleInfo(key, media, meta), None


def scan_local(url: str) -> tuple[list[SampleInfo], list[Skip]]:
    """Catalogue a local tar from its headers; small members are read, media only located.

    A tar that breaks off keeps the samples before the break (`truncated_shard`), none when it breaks inside its
    first member; a file whose first header is not a tar header raises (retried, then `unreadable_shard`).
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    skips: list[Skip] = []
    path = local_path(url)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        headers = 0  # tar headers that parsed: one is enough to know the file is a tar
        try:
            end = 0  # where the last member's data (padded to 512-byte blocks) ends
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    headers += 1
                    end = info.offset_data + -(-info.size // 512) * 512
                    if info.offset_data + info.size > file_size:  # headers seek past a cut-off end
                        raise EOFError(f"member {info.name} ends at byte {info.offset_data + info.size} of {file_size}")
                    parts = split_name(info.name) if info.isreg() else None
                    if parts:
                        members.setdefault(parts[0], {})[parts[1]] = (info.offset_data, info.size)
            if members and file_size - end < 1024:  # a complete tar ends with two zero blocks
                raise EOFError(f"no end-of-archive marker after byte {end}: the file was cut after a member")
        except (tarfile.TarError, EOFError, OSError) as err:
            if not headers:
                raise  # not a tar at all: retried, then reported as unreadable
            skips.append(truncated_shard(url, err, kept_some=bool(members)))

        def read(loc: tuple[int, int]) -> bytes:
            f.seek(loc[0])
            data = f.read(loc[1])
            if len(data) != loc[1]:
                raise EOFError(f"member at {loc[0]} ends after {len(data)} of {loc[1]} bytes")
            return data

        samples = []
        for key, found in members.items():
            try:
                sample, skip = _assemble(key, found, read)
            except EOFError as err:
                sample, skip = None, Skip(key, "truncated_member", str(err))
            if sample is not None:
                sample.media_loc, sample.caption_loc = found[sample.media], found["txt"]
                samples.append(sample)
            else:
                skips.append(skip)
    return samples, skips


def stream_shard(url: str) -> Iterator[dict]:
    """Samples {ext: bytes, "__key__": key} of any shard URL, in tar order."""
    with contextlib.closing(webdataset.gopen(url)) as stream:
        yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def scan_streamed(url: str) -> tuple[list[SampleInfo], list[Skip]]:
    """Catalogue a shard that can only be streamed (pipe:, http...)."""
    samples, skips = [], []
    try:
        for raw in stream_shard(url):
            found = {k: v for k, v in raw.items() if not k.startswith("__")}
            sample, skip = _assemble(raw["__key__"], found, lambda data: data)
            (samples if sample else skips).append(sample or skip)
    except Exception as err:  # a broken stream: keep what came before
        if not samples and not _ends_early(err):
            raise
        skips.append(truncated_shard(url, err, kept_some=bool(samples)))
    return samples, skips


def truncated_shard(url: str, err: Exception, kept_some: bool) -> Skip:
    """The skip of a shard that breaks off; `kept_some`: whether samples before the break are used."""
    kept = "keeping the samples before" if kept_some else "it breaks off before its first sample ends: no sample kept"
    return Skip(url, "truncated_shard", f"{type(err).__name__}: {err}; {kept}")


def _ends_early(err: Exception) -> bool:
    """Whether a streamed tar's error says its data ran out inside a member (tarfile's words for a cut file)."""
    return isinstance(err, tarfile.ReadError) and "unexpected end of data" in str(err)


def scan_shards(urls: Sequence[str], retries: int = 3, retry_wait: float = 1.0) -> tuple[list[ShardInfo], list[Skip]]:
    """Catalogue every shard; one that cannot be opened after `retries` tries is reported and left out."""
    shards, skips = [], []
    for url in urls:
        for attempt in range(1, retries + 1):
            try:
                samples, shard_skips = (scan_local if is_local(url) else scan_streamed)(url)
                break
            except Exception as err:
                if attempt == retries:
                    skips.append(Skip(url, "unreadable_shard", f"{type(err).__name__}: {err} ({retries} tries)"))
                    samples, shard_skips = None, []
                else:
                    time.sleep(retry_wait * attempt)
        if samples is not None:
            shards.append(ShardInfo(url, samples))
        skips.extend(shard_skips)
    return shards, skips


def read_at(f, loc: tuple[int, int]) -> bytes:
    """The bytes of a tar member at (offset, size) of an open file; OSError when the file ends early."""
    f.seek(loc[0])
    data = f.read(loc[1])
    if len(data) != loc[1]:
        raise OSError(f"member at byte {loc[0]} ends after {len(data)} of {loc[1]} bytes")
    return data


class MemberReader:
    """Reads the caption and media bytes of catalogued samples: by offset for local shards, by streaming
    (keeping the last streamed shard in memory) for the others. One per DataLoader worker."""

    def __init__(self):
        self.files: dict[str, object] = {}
        self.streamed: tuple[str, dict[str, dict]] | None = None

    def read(self, shard: ShardInfo, sample: SampleInfo, retries: int = 3) -> tuple[bytes, str]:
        """(media bytes, caption); an OSError (a flaky mount, a stream that broke) is retried `retries` times."""
        for attempt in range(1, retries + 1):
            try:
                return self._read(shard, sample)
            except OSError:
                self.files.pop(shard.url, None)
                self.streamed = None
                if attempt == retries:
                    raise
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _read(self, shard: ShardInfo, sample: SampleInfo) -> tuple[bytes, str]:
        if shard.local:
            f = self.files.get(shard.url)
            if f is None:
                f = self.files[shard.url] = open(local_path(shard.url), "rb")  # noqa: SIM115 - kept open
            media, caption = (self._read_at(f, loc) for loc in (sample.media_loc, sample.caption_loc))
        else:
            if self.streamed is None or self.streamed[0] != shard.url:
                self.streamed = (shard.url, {s["__key__"]: s for s in stream_shard(shard.url)})
            raw = self.streamed[1].get(sample.key)
            if raw is None:
                raise OSError(f"{sample.key} is no longer in {shard.url}")
            media, caption = raw[sample.media], raw["txt"]
        return media, caption.decode("utf-8").strip()

    @staticmethod
    def _read_at(f, loc: tuple[int, int]) -> bytes:
        return read_at(f, loc)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
