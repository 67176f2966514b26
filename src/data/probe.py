"""Probing one media file: can this video or image become a training sample, and what is it?

`probe(path)` opens a file with PyAV and returns its kind, container, codec, size, frame rate, exact
frame count and duration, or raises `ProbeError` with one of REJECT_REASONS. A video must be as long as
its container headers say (`container_structure` walks the top-level MP4/MOV, Matroska/WebM or AVI
layout, so truncated downloads are caught), demux to its end, and its first frame must decode;
`full_decode=True` decodes every frame instead. Used by the shard writer, src.data.write.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import av

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MEDIA_EXTENSIONS: frozenset[str] = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
# the last two come from the input list, not the file: a list row that cannot be read (bad_row) and a caption
# without a video or image beside it (no_media)
REJECT_REASONS: tuple[str, ...] = (
    "unreadable",
    "truncated",
    "no_caption",
    "too_short",
    "missing",
    "bad_row",
    "no_media",
)
_PYAV_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, IndexError, KeyError, RuntimeError, TypeError)


class ProbeError(ValueError):
    """A file cannot become a sample; `reason` is one of REJECT_REASONS and `detail` says why in words."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.reason, self.detail))  # picklable across worker processes


# ----------------------------------------------------------------------------------------------------
# container structure: is the file as long as its own headers say?

_ISOBMFF_TOP_LEVEL: frozenset[bytes] = frozenset(
    {b"ftyp", b"styp", b"moov", b"mdat", b"moof", b"mfra", b"free", b"skip", b"wide", b"uuid", b"pdin", b"meta"}
    | {b"sidx", b"ssix", b"prft", b"emsg", b"pnot", b"junk", b"PICT", b"udta"}
)
_EBML_MAGIC = 0x1A45DFA3
_EBML_SEGMENT = 0x18538067


def container_structure(path: Path) -> tuple[str, str]:
    """Check the top-level layout of an MP4/MOV, Matroska/WebM or AVI file against its length.

    Returns ("complete", ""), ("truncated", what is missing) or ("unknown", why it cannot tell:
    another container, or headers too damaged to read).
    """
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for check in (_isobmff_structure, _ebml_structure, _riff_structure):
            handle.seek(0)
            verdict = check(handle, size)
            if verdict is not None:
                return verdict
    return "unknown", "not an MP4/MOV, Matroska/WebM or AVI file"


def _isobmff_structure(handle: BinaryIO, size: int) -> tuple[str, str] | None:
    """Walk the top-level boxes of an ISO base media (MP4/MOV) file; None if it is not one."""
    offset, seen = 0, set()
    while offset < size:
        handle.seek(offset)
        header = handle.read(16)
        if len(header) < 8:
            return None if offset == 0 else ("truncated", f"box header at byte {offset} is cut off")
        box_size, box_type = struct.unpack(">I4s", header[:8])
        if box_type not in _ISOBMFF_TOP_LEVEL:
            return None if offset == 0 else ("unknown", f"unexpected top-level box {box_type!r} at byte {offset}")
        if box_size == 1:  # 64-bit size follows the type
            if len(header) < 16:
                return "truncated", f"{box_type.decode()} box header at byte {offset} is cut off"
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:  # the box runs to the end of the file
            box_size = size - offset
        if box_size < 8:
            return "unknown", f"{box_type.decode()} box at byte {offset} has impossible size {box_size}"
        if offset + box_size > size:
            return "truncated", (
                f"{box_type.decode()} box at byte {offset} needs {box_size} bytes but only {size - offset} remain"
            )
        seen.add(box_type)
        offset += box_size
    if b"moov" not in seen:
        return "truncated", "no moov box: the file was never finalised"
    return "complete", ""


def _read_ebml_vint(handle: BinaryIO, keep_marker: bool) -> tuple[int, bool] | None:
    """Read one EBML variable-length integer: (value, all value bits set), or None at end of file."""
    first = handle.read(1)
    if not first:
        return None
    length = 1
    while length <= 8 and not first[0] & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        raise ValueError("invalid EBML variable-length integer")
    rest = handle.read(length - 1)
    if len(rest) < length - 1:
        return None
    value = first[0] if keep_marker else first[0] & (0xFF >> length)
    for byte in rest:
        value = (value << 8) | byte
    all_ones = (value == (1 << (7 * length)) - 1) and not keep_marker
    return value, all_ones


def _ebml_element(handle: BinaryIO) -> tuple[int, int | None] | None:
    """Read an EBML element header at the current position: (id, data size or None if unknown)."""
    element = _read_ebml_vint(handle, keep_marker=True)
    if element is None:
        return None
    data_size = _read_ebml_vint(handle, keep_marker=False)
    if data_size is None:
        return None
    return element[0], None if data_size[1] else data_size[0]


def _ebml_structure(handle: BinaryIO, size: int) -> tuple[str, str] | None:
    """Check a Matroska/WebM file's Segment (and its clusters) against the file size; None if not EBML."""
    try:
        header = _ebml_element(handle)
        if header is None or header[0] != _EBML_MAGIC or header[1] is None:
            return None
        handle.seek(header[1], os.SEEK_CUR)
        while True:  # skip Void / CRC elements before the Segment
            element = _ebml_element(handle)
            if element is None:
                return "truncated", "the Segment element is missing"
            if element[0] == _EBML_SEGMENT:
                break
            if element[1] is None:
                return "unknown", "unsized element before the Segment"
            handle.seek(element[1], os.SEEK_CUR)
        start, segment_size = handle.tell(), element[1]
        if segment_size is not None:
            if start + segment_size > size:
                return "truncated", f"the Segment needs {segment_size} bytes but only {size - start} remain"
            return "complete", ""
        return _ebml_children(handle, start, size)
    except ValueError as exc:
        return "unknown", f"unreadable EBML header: {exc}"


def _ebml_children(handle: BinaryIO, offset: int, size: int) -> tuple[str, str]:
    """Walk the level-1 elements of an unsized (live-written) Segment up to the end of the file."""
    while offset < size:
        handle.seek(offset)
        element = _ebml_element(handle)
        if element is None:
            return "truncated", f"element header at byte {offset} is cut off"
        if element[1] is None:
            return "unknown", f"unsized element at byte {offset}: cannot tell where the file should end"
        end = handle.tell() + element[1]
        if end > size:
            return "truncated", f"element at byte {offset} needs {end - offset} bytes but only {size - offset} remain"
        offset = end
    return "complete", ""


def _riff_structure(handle: BinaryIO, size: int) -> tuple[str, str] | None:
    """Check the RIFF chunk(s) of an AVI file against the file size; None if it is not RIFF/AVI."""
    offset = 0
    while offset + 12 <= size:
        handle.seek(offset)
        tag, chunk_size, form = struct.unpack("<4sI4s", handle.read(12))
        if tag != b"RIFF" or form not in (b"AVI ", b"AVIX"):
            return None if offset == 0 else ("complete", "")  # trailing junk after the last RIFF chunk
        if offset + 8 + chunk_size > size:
            return "truncated", f"RIFF chunk at byte {offset} needs {chunk_size + 8} bytes but {size - offset} remain"
        offset += 8 + chunk_size + (chunk_size & 1)
    return None if offset == 0 else ("complete", "")  # fewer than 12 bytes left: padding, not a chunk


# ----------------------------------------------------------------------------------------------------
# probing


def probe(path: str | Path, full_decode: bool = False) -> dict[str, Any]:
    """Probe a video or image file with PyAV and return what a training sample needs to know about it.

    A video must open, demux to its end (and be as long as its container headers say) and its first
    frame must decode; `full_decode` decodes every frame instead, which also catches damage in the
    middle of a stream, at the cost of a full decode.

    Returns {"kind": "video" | "image", "ext", "format" (container), "codec", "width", "height",
    "fps" (float; 0 for images), "frames" (exact: packets demuxed, or frames decoded with
    full_decode; 1 for images), "duration" (seconds; 0 for images), "bytes"}.
    Raises ProbeError with reason "missing", "unreadable" or "truncated".
    """
    return _probe_with_times(Path(path), full_decode)[0]


def _probe_with_times(path: Path, full_decode: bool = False) -> tuple[dict[str, Any], list[float]]:
    """`probe`, plus each video frame's presentation time in seconds from the first frame."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ProbeError("missing", f"no such file: {path}") from None
    except OSError as exc:
        raise ProbeError("unreadable", f"cannot stat: {exc}") from exc
    if not path.is_file():
        raise ProbeError("unreadable", "not a regular file")
    if size == 0:
        raise ProbeError("unreadable", "empty file (0 bytes)")
    ext = path.suffix.lower().lstrip(".")
    if f".{ext}" in IMAGE_EXTENSIONS:
        return _probe_image(path, ext, size), [0.0]
    return _probe_video(path, ext, size, full_decode)


def _describe(exc: BaseException) -> str:
    """A one-line description of an exception for a reject's detail."""
    return f"{type(exc).__name__}: {exc}"


def _open(path: Path) -> av.container.InputContainer:
    """Open `path` for reading; non-UTF-8 metadata must not make a good file unreadable."""
    return av.open(str(path), mode="r", metadata_errors="replace")


def _probe_image(path: Path, ext: str, size: int) -> dict[str, Any]:
    """Probe a still image: it must hold a picture that decodes."""
    try:
        with _open(path) as container:
            if not container.streams.video:
                raise ProbeError("unreadable", "no image stream")
            stream = container.streams.video[0]
            frame = next(iter(container.decode(stream)), None)
            if frame is None:
                raise ProbeError("unreadable", "no picture decodes")
            return {
                "kind": "image",
                "ext": ext,
                "format": container.format.name,
                "codec": stream.codec_context.codec.canonical_name,
                "width": frame.width,
                "height": frame.height,
                "fps": 0.0,
                "frames": 1,
                "duration": 0.0,
                "bytes": size,
            }
    except ProbeError:
        raise
    except _PYAV_ERRORS as exc:
        raise ProbeError("unreadable", f"cannot decode image: {_describe(exc)}") from exc


@dataclass
class _Scan:
    """What one pass over a video stream's packets found."""

    full_decode: bool = False  # decode every packet, not just until the first frame
    packets: int = 0
    decoded: int = 0  # frames the decoder returned
    pts: list[int] = field(default_factory=list)
    end_pts: int | None = None
    frame: av.VideoFrame | None = None  # the first decoded frame
    decode_error: BaseException | None = None
    demux_error: BaseException | None = None

    @property
    def decoding(self) -> bool:
        """Whether packets should still go to the decoder."""
        return self.decode_error is None and (self.full_decode or self.frame is None)


def _scan_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream, full: bool) -> _Scan:
    """Demux every packet of `stream` (counting them, keeping timestamps) and decode the first frame (or all)."""
    scan = _Scan(full_decode=full)
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the empty packet PyAV yields at the end to flush the decoder
                continue
            scan.packets += 1
            if packet.pts is not None:
                scan.pts.append(packet.pts)
                end = packet.pts + (packet.duration or 0)
                scan.end_pts = end if scan.end_pts is None else max(scan.end_pts, end)
            if scan.decoding:
                _decode_into(scan, packet.decode)
    except _PYAV_ERRORS as exc:
        scan.demux_error = exc
    if scan.decoding and scan.packets:
        _decode_into(scan, lambda: stream.codec_context.decode(None))  # drain frames held back for reordering
    return scan


def _decode_into(scan: _Scan, decode: Callable[[], list[av.VideoFrame]]) -> None:
    """Run one decoder step; count its frames and keep the first, or keep the decoding error."""
    try:
        frames = decode()
    except _PYAV_ERRORS as exc:
        scan.decode_error = exc
        return
    if frames and scan.frame is None:
        scan.frame = frames[0]
    scan.decoded += len(frames)


def _probe_video(path: Path, ext: str, size: int, full_decode: bool) -> tuple[dict[str, Any], list[float]]:
    """Probe a video: open it, demux it to the end, decode its first frame (or every frame), count frames."""
    state, structure = container_structure(path)
    if state == "truncated":  # shorter than its own headers say, whatever FFmpeg makes of the rest
        raise ProbeError("truncated", structure)
    try:
        container = _open(path)
    except _PYAV_ERRORS as exc:
        raise ProbeError("unreadable", f"cannot open: {_describe(exc)}") from exc
    with container:
        if not container.streams.video:
            raise ProbeError("unreadable", "no video stream")
        stream = container.streams.video[0]
        scan = _scan_packets(container, stream, full_decode)
        _check_scan(scan, stream, state)
        fps = _frame_rate(stream, scan)
        info = {
            "kind": "video",
            "ext": ext,
            "format": container.format.name,
            "codec": stream.codec_context.codec.canonical_name,  # "av1", not the decoder "libdav1d"
            "width": scan.frame.width,
            "height": scan.frame.height,
            "fps": round(fps, 6),
            "frames": scan.decoded if full_decode else scan.packets,
            "duration": round(_duration(container, stream, scan, fps), 6),
            "bytes": size,
        }
        times = _frame_times(stream, scan, fps)
    return info, times


def _check_scan(scan: _Scan, stream: av.video.stream.VideoStream, state: str) -> None:
    """Raise ProbeError if the scan shows a truncated or undecodable video; `state` is container_structure's."""
    if scan.demux_error is not None:
        where = f"demuxing stopped after {scan.packets} packets: {_describe(scan.demux_error)}"
        if state == "unknown" and isinstance(scan.demux_error, EOFError):
            raise ProbeError("truncated", where)  # an unrecognised container that simply ran out of bytes
        raise ProbeError("unreadable", where)
    if scan.packets == 0:
        raise ProbeError("unreadable", "the video stream has no packets")
    declared = stream.frames or 0
    if declared > scan.packets:  # in a file as long as its headers say, missing packets mean damage, not a cut
        reason = "unreadable" if state == "complete" else "truncated"
        raise ProbeError(reason, f"the container declares {declared} frames but only {scan.packets} demux")
    if scan.decode_error is not None:
        which = "the first frame" if scan.frame is None else f"frame {scan.decoded + 1}"
        raise ProbeError("unreadable", f"{which} does not decode: {_describe(scan.decode_error)}")
    if scan.frame is None:
        raise ProbeError("unreadable", f"no frame decodes from {scan.packets} packets")


def _frame_rate(stream: av.video.stream.VideoStream, scan: _Scan) -> float:
    """The stream's average frame rate, falling back to the guessed / base rate, then to the timestamps."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if scan.pts and len(scan.pts) > 1 and stream.time_base:
        span = float((max(scan.pts) - min(scan.pts)) * stream.time_base)
        return (len(scan.pts) - 1) / span if span > 0 else 0.0
    return 0.0


def _frame_times(stream: av.video.stream.VideoStream, scan: _Scan, fps: float) -> list[float]:
    """Each frame's presentation time in seconds from the first; from timestamps when every packet has one."""
    if scan.pts and len(scan.pts) == scan.packets and stream.time_base:
        first = min(scan.pts)
        return sorted(float((pts - first) * stream.time_base) for pts in scan.pts)
    step = 1.0 / fps if fps > 0 else 0.0
    return [index * step for index in range(scan.packets)]


def _duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, scan: _Scan, fps: float
) -> float:
    """The video stream's duration in seconds: from packet timestamps, else the stream, container or fps."""
    if scan.pts and scan.end_pts is not None and stream.time_base:
        span = float((scan.end_pts - min(scan.pts)) * stream.time_base)
        if scan.end_pts > max(scan.pts):
            return span
        if fps > 0:  # packets without durations: the last frame lasts one frame period
            return span + 1.0 / fps
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return scan.packets / fps if fps > 0 else 0.0
