"""Whole decoded videos kept in memory, so that a small data set trained for many epochs is decoded once.

`data.memo_mb` (conf/data/shards.yaml) gives each loader worker a `VideoMemo` of that many MiB. The first time a
video is asked for, every frame of it is decoded to RGB and held (`src.data.video_frames._decode_all`); every
later clip of it is picked from those frames by the same placement rules as a decode, so a run with the memo gets
bitwise the batches it would get without (tests/test_video.py). Past the budget the least recently used video is
dropped. A video is not held, and is decoded as usual every time, when it alone would not fit, when its frames
change size, or when its timestamps or a corrupt stretch would make a whole decode disagree with a clip's own.

It pays where decoding is a large part of a step and videos are short (clips cut by the shard writer): the CPU
demo and the learning check decode their 512 clips of 64x64 once instead of about 20 times (docs/learning.md).
A video is keyed by its encoded bytes (a dict lookup compares them), so the same file in two shards is held once
and a changed file is never answered from stale frames.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("kiln.data")

MIB = 1 << 20


class Held(Protocol):
    nbytes: int  # memory the held video takes


class VideoMemo:
    """An LRU of decoded videos by their encoded bytes, at most `max_mb` MiB of frames (and keys) in all."""

    def __init__(self, max_mb: float):
        if not max_mb > 0:
            raise ValueError(f"data.memo_mb must be > 0 MiB to hold any video (0 turns the memo off), got {max_mb}")
        self.max_bytes = int(max_mb * MIB)
        self._held: OrderedDict[bytes, Held] = OrderedDict()
        self._refused: set[int] = set()  # hash(data) of videos decoded as usual every time
        self.nbytes = 0
        self.hits = self.misses = self.dropped = 0

    def __len__(self) -> int:
        return len(self._held)

    def fetch(self, data: bytes, decode_all: Callable[[bytes, int], Held | None]) -> Held | None:
        """The held video of `data`, decoding it with `decode_all(data, max_bytes)` on a miss; None when the video is
        not to be held (`decode_all` said so, now or before): decode the clip as usual."""
        held = self._held.get(data)
        if held is not None:
            self._held.move_to_end(data)
            self.hits += 1
            return held
        if hash(data) in self._refused:
            return None
        self.misses += 1
        held = decode_all(data, self.max_bytes - len(data))
        if held is None:
            self._refused.add(hash(data))
            return None
        self._held[data] = held
        self.nbytes += held.nbytes + len(data)
        while self.nbytes > self.max_bytes:
            key, old = self._held.popitem(last=False)
            self.nbytes -= old.nbytes + len(key)
            self.dropped += 1
            if self.dropped == 1:
                log.info("video memo full at data.memo_mb=%g (%d videos held): the least recently used are dropped "
                         "and decoded again when asked for", self.max_bytes / MIB, len(self._held))  # fmt: skip
        return held
