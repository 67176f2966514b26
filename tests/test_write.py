"""Tests for the shard writer (src.data.write) on real media made by tests/media.py."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import av
import pytest
import webdataset

from src.data.write import (
    REJECT_REASONS,
    ProbeError,
    collect_inputs,
    main,
    parse_size,
    probe,
    write_shards,
)
from tests.media import can_encode, corrupt_file, make_image, make_media_folder, make_video, read_tar, truncate_file

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The planted media folder (good samples and bad inputs) described by make_media_folder."""
    return make_media_folder(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def written(media: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(output folder, returned index) of one write of the media folder into a single 1 GB shard."""
    out = tmp_path_factory.mktemp("shards")
    index = write_shards(media["root"], out, workers=WORKERS, min_frames=media["min_frames"])
    return out, index


def read_shards(out: Path, index: dict) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards listed in `index`, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in index["shards"]:
        samples.update(read_tar(out / shard["name"]))
    return samples


def by_source(samples: dict[str, dict[str, bytes]], root: Path) -> dict[str, tuple[str, dict[str, bytes], dict]]:
    """{path relative to root: (key, sample, parsed json)}."""
    found = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        found[Path(meta["source"]).relative_to(root).as_posix()] = (key, sample, meta)
    return found


def read_rejects(out: Path) -> list[dict]:
    """The records of rejects.jsonl."""
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def decoded_frames(data: bytes) -> int:
    """How many frames PyAV decodes from a video's bytes."""
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


# ----------------------------------------------------------------------------------------------------
# the planted media folder


def test_every_good_file_is_a_sample_with_its_original_bytes_caption_and_probe(media: dict, written: tuple) -> None:
    out, index = written
    found = by_source(read_shards(out, index), media["root"])
    assert sorted(found) == sorted(media["good"])
    for name, expected in media["good"].items():
        key, sample, meta = found[name]
        original = (media["root"] / name).read_bytes()
        assert sample[expected["ext"]] == original, name  # byte for byte, untouched
        assert set(sample) == {expected["ext"], "txt", "json"}, name
        assert sample["txt"].decode("utf-8") == expected["caption"], name
        for field in ("kind", "ext", "codec", "width", "height", "frames"):
            assert meta[field] == expected[field], (name, field, meta[field])
        assert meta["fps"] == pytest.approx(expected["fps"], abs=0.01), name
        assert meta["bytes"] == len(original), name
        if expected["kind"] == "video":
            assert meta["frames"] == decoded_frames(original), name  # the count is what a decoder really gets
            assert meta["duration"] == pytest.approx(expected["frames"] / expected["fps"], abs=0.01), name
        else:
            assert meta["duration"] == 0.0, name
        assert "start" not in meta and "end" not in meta


def test_samples_are_keyed_in_sorted_input_order(media: dict, written: tuple) -> None:
    out, index = written
    samples = read_shards(out, index)
    assert list(samples) == [f"{i:09d}" for i in range(len(media["good"]))]
    sources = [json.loads(sample["json"])["source"] for sample in samples.values()]
    relative = [Path(source).relative_to(media["root"]).as_posix() for source in sources]
    assert relative == sorted(relative)


def test_every_planted_bad_input_is_rejected_with_its_reason(media: dict, written: tuple) -> None:
    out, _ = written
    rejects = read_rejects(out)
    got = {Path(r["path"]).relative_to(media["root"]).as_posix(): r["reason"] for r in rejects}
    assert got == media["bad"]
    assert all(set(r) == {"path", "reason", "detail"} and r["detail"] for r in rejects)
    listed = got.keys() | {Path(json.loads(s["json"])["source"]).name for s in read_shards(out, written[1]).values()}
    assert not listed & set(media["ignored"])  # README.md is neither


def test_index_counts_agree_with_the_shards_and_rejects(media: dict, written: tuple) -> None:
    out, index = written
    assert json.loads((out / "index.json").read_text()) == index
    assert index["version"] == 1 and index["created_by"] == "kiln src.data.write"
    good = media["good"].values()
    totals = index["totals"]
    assert totals["samples"] == len(media["good"])
    assert totals["videos"] == sum(g["kind"] == "video" for g in good)
    assert totals["images"] == sum(g["kind"] == "image" for g in good) == 2
    assert totals["by_resolution"] == dict(Counter(f"{g['width']}x{g['height']}" for g in good))
    assert sum(totals["by_frames"].values()) == totals["samples"]
    assert list(totals["by_frames"]) == ["1", "2-16", "17-32", "33-64", "65-128", "129+"]
    assert totals["by_frames"]["1"] == totals["images"]
    assert totals["by_frames"]["2-16"] == sum(2 <= g["frames"] <= 16 for g in good)
    assert totals["rejected"] == {reason: Counter(media["bad"].values())[reason] for reason in REJECT_REASONS}
    assert [shard["name"] for shard in index["shards"]] == ["shard-000000.tar"]
    for shard in index["shards"]:
        assert shard["bytes"] == (out / shard["name"]).stat().st_size
        assert shard["samples"] == len(read_tar(out / shard["name"]))
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "rejects.jsonl", "shard-000000.tar"]


def test_shards_read_back_with_webdataset(media: dict, written: tuple) -> None:
    out, index = written
    urls = [str(out / shard["name"]) for shard in index["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    expected = read_shards(out, index)
    assert [s["__key__"] for s in samples] == list(expected)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample[meta["ext"]] == expected[sample["__key__"]][meta["ext"]]
        assert sample["txt"] == expected[sample["__key__"]]["txt"]


def test_tar_headers_are_deterministic(written: tuple) -> None:
    out, index = written
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        for info in tar:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
            assert info.isreg()


# ----------------------------------------------------------------------------------------------------
# shard size, determinism, re-runs


def test_shard_size_cuts_several_shards_within_the_limit(media: dict, written: tuple, tmp_path: Path) -> None:
    limit = "24KB"
    index = write_shards(media["root"], tmp_path, shard_size=limit, workers=WORKERS, min_frames=media["min_frames"])
    assert len(index["shards"]) >= 3
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))]
    for shard in index["shards"]:
        assert shard["samples"] >= 1
        assert shard["bytes"] <= parse_size(limit) or shard["samples"] == 1
        assert shard["bytes"] == (tmp_path / shard["name"]).stat().st_size
    assert read_shards(tmp_path, index) == read_shards(*written)  # same samples, same keys, same bytes
    assert index["totals"] == written[1]["totals"]


def test_a_sample_larger_than_the_shard_size_gets_a_shard_of_its_own(media: dict, tmp_path: Path) -> None:
    index = write_shards(media["root"], tmp_path, shard_size=1000, workers=WORKERS, min_frames=media["min_frames"])
    assert len(index["shards"]) == index["totals"]["samples"] == len(media["good"])
    assert all(shard["samples"] == 1 and shard["bytes"] > 1000 for shard in index["shards"])


def test_output_is_byte_identical_across_runs_and_worker_counts(media: dict, written: tuple, tmp_path: Path) -> None:
    out, _ = written
    write_shards(media["root"], tmp_path, workers=1, min_frames=media["min_frames"])
    for name in ("shard-000000.tar", "index.json", "rejects.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_a_rerun_replaces_stale_shards_and_leaves_no_temporary_files(media: dict, tmp_path: Path) -> None:
    first = write_shards(media["root"], tmp_path, shard_size="12KB", workers=WORKERS, min_frames=media["min_frames"])
    assert len(first["shards"]) > 1
    second = write_shards(media["root"], tmp_path, workers=WORKERS, min_frames=media["min_frames"])
    assert len(second["shards"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "rejects.jsonl", "shard-000000.tar"]


def test_a_second_prefix_into_the_same_folder_is_refused_and_changes_nothing(media: dict, tmp_path: Path) -> None:
    first = write_shards(media["root"], tmp_path, workers=WORKERS, min_frames=media["min_frames"], prefix="a")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=f"{tmp_path} already holds shards not of prefix 'b' \\(a-000000.tar\\)"):
        write_shards(media["root"], tmp_path, workers=WORKERS, min_frames=media["min_frames"], prefix="b")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "index.json").read_text()) == first
    again = write_shards(media["root"], tmp_path, workers=WORKERS, min_frames=media["min_frames"], prefix="a")
    assert again == first  # the same prefix still replaces its own shards


def test_a_folder_of_only_bad_inputs_writes_no_shard_and_rejects_all(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "fake.mp4").write_text("plain text", encoding="utf-8")
    (source / "fake.txt").write_text("a caption", encoding="utf-8")
    index = write_shards(source, tmp_path / "out", workers=WORKERS)
    assert index["shards"] == [] and index["totals"]["samples"] == 0
    assert index["totals"]["rejected"]["unreadable"] == 1
    assert [r["reason"] for r in read_rejects(tmp_path / "out")] == ["unreadable"]


# ----------------------------------------------------------------------------------------------------
# CSV and JSONL inputs


def test_csv_input_with_windows_missing_files_and_empty_captions(media: dict, tmp_path: Path) -> None:
    root = media["root"]
    relative = Path(os.path.relpath(root, tmp_path))  # relative paths resolve against the CSV's folder
    rows = [
        {"path": relative / "h264_24fps_64x48.mp4", "caption": "a window", "start": "0.25", "end": "0.5", "fps": "24"},
        {"path": relative / "mpeg4_30fps_64x64.mkv", "caption": "too short", "start": "0.5", "end": "0.6"},
        {"path": relative / "no_such_clip.mp4", "caption": "gone"},
        {"path": relative / "h264_30fps_48x64.mp4", "caption": "  "},
        {"path": root / "h264_8fps_96x54.mp4", "caption": "from 0.5 s on", "start": "0.5"},
        {"path": relative / "still_64x48.png", "caption": "an image"},
    ]
    if can_encode("vp9"):
        rows.append({"path": relative / "vp9_24fps_64x64.webm", "caption": "ms timestamps", "start": 0.25, "end": 0.5})
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "caption", "start", "end", "fps"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    index = write_shards(listing, out, workers=WORKERS, min_frames=4)

    rejects = {Path(r["path"]).name: r["reason"] for r in read_rejects(out)}
    assert rejects == {
        "mpeg4_30fps_64x64.mkv": "too_short",
        "no_such_clip.mp4": "missing",
        "h264_30fps_48x64.mp4": "no_caption",
    }
    samples = [json.loads(s["json"]) for s in read_shards(out, index).values()]
    metas = {Path(meta["source"]).name: meta for meta in samples}
    assert list(metas)[:3] == ["h264_24fps_64x48.mp4", "h264_8fps_96x54.mp4", "still_64x48.png"]  # row order
    window = metas["h264_24fps_64x48.mp4"]
    assert (window["start"], window["end"], window["window_frames"], window["fps"]) == (0.25, 0.5, 6, 24.0)
    assert "container_fps" not in window  # the row's fps agrees with the container's: nothing to override
    assert window["frames"] == 20  # the whole file's count is kept alongside the window's
    open_ended = metas["h264_8fps_96x54.mp4"]
    assert open_ended["start"] == 0.5 and "end" not in open_ended and open_ended["window_frames"] == 8
    assert "start" not in metas["still_64x48.png"]
    if can_encode("vp9"):
        assert metas["vp9_24fps_64x64.webm"]["window_frames"] == 6
    assert index["totals"]["rejected"] == {
        "unreadable": 0,
        "truncated": 0,
        "no_caption": 1,
        "too_short": 1,
        "missing": 1,
        "bad_row": 0,
        "no_media": 0,
    }
    assert index["totals"]["by_frames"]["2-16"] == len(samples) - 1  # windowed clips count their window


def test_jsonl_input_accepts_numbers_nulls_and_a_text_column(media: dict, tmp_path: Path) -> None:
    root = media["root"]
    rows = [
        {"path": str(root / "h264_24fps_64x48.mp4"), "caption": "first frames", "start": 0, "end": 0.1},
        {"path": str(root / "h264_24fps_64x48.mp4"), "caption": "whole clip", "start": None, "end": None},
        {"path": "missing/clip.webm", "text": "nowhere"},
        {"path": str(root / "nested/still_48x64.jpg"), "text": "caption from the text column"},
    ]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    index = write_shards(listing, out, workers=WORKERS, min_frames=4)
    assert [(Path(r["path"]).name, r["reason"]) for r in read_rejects(out)] == [
        ("h264_24fps_64x48.mp4", "too_short"),  # 3 frames in [0, 0.1) s at 24 fps
        ("clip.webm", "missing"),
    ]
    assert read_rejects(out)[1]["path"] == str(tmp_path / "missing/clip.webm")
    samples = list(read_shards(out, index).values())
    assert [s["txt"].decode() for s in samples] == ["whole clip", "caption from the text column"]
    assert "start" not in json.loads(samples[0]["json"])


def test_bad_csv_rows_are_rejected_naming_row_and_value_while_the_rest_is_written(media: dict, tmp_path: Path) -> None:
    good = media["root"] / "h264_24fps_64x48.mp4"
    listing = tmp_path / "list.csv"
    lines = [
        "path,caption,start,end",
        f"{good},first good row,,",
        f"{good},ends before it starts,2,1",
        f"{good},starts early,-1,",
        f"{good},starts soon,soon,",
        ",a caption without a video,,",
        ",,,",
        f"{good},last good row,0.25,",
    ]
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = write_shards(listing, tmp_path / "out", workers=1, min_frames=4)

    captions = [s["txt"].decode() for s in read_shards(tmp_path / "out", index).values()]
    assert captions == ["first good row", "last good row"]
    rejects = [(r["reason"], r["detail"]) for r in read_rejects(tmp_path / "out")]
    assert rejects == [
        ("bad_row", f"{listing}: row 3: end=1.0 is not after start=2.0; expected end > start"),
        ("bad_row", f"{listing}: row 4: start=-1.0 is negative; expected seconds >= 0"),
        ("bad_row", f"{listing}: row 5: start='soon' is not a number"),
        ("no_media", f"{listing}: row 6: caption 'a caption without a video' has no path"),
        ("bad_row", f"{listing}: row 7: neither a path nor a caption"),
    ]
    assert index["totals"]["rejected"]["bad_row"] == 4 and index["totals"]["rejected"]["no_media"] == 1


def test_bad_jsonl_lines_are_rejected_while_the_rest_is_written(media: dict, tmp_path: Path) -> None:
    good = str(media["root"] / "still_64x48.png")
    listing = tmp_path / "list.jsonl"
    lines = [json.dumps({"path": good, "caption": "kept"}), "not json", '["a.mp4", "x"]', '{"file": "a.mp4"}']
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = write_shards(listing, tmp_path / "out", workers=1)
    assert index["totals"]["samples"] == 1
    rejects = read_rejects(tmp_path / "out")
    assert [(r["path"], r["reason"]) for r in rejects] == [(str(listing), "bad_row")] * 3
    assert "line 2 is not valid JSON" in rejects[0]["detail"]
    assert "line 3 is list, expected a JSON object" in rejects[1]["detail"]
    assert "line 4 has columns ['file']; expected 'path' and 'caption'" in rejects[2]["detail"]


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".csv", "file,caption\na.mp4,x\n", "expected 'path' and 'caption'"),
        (".csv", "path,caption\n", "has no rows"),
        (".txt", "a.mp4\n", "neither a folder nor a list file"),
    ],
)
def test_malformed_lists_raise_value_errors_naming_the_problem(
    tmp_path: Path, suffix: str, content: str, message: str
) -> None:
    listing = tmp_path / f"list{suffix}"
    listing.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        collect_inputs(listing)


def test_inputs_that_yield_nothing_raise_value_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write_shards(tmp_path / "nowhere", tmp_path / "out", workers=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no media here", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*holds no media files"):
        write_shards(tmp_path / "empty", tmp_path / "out", workers=1)
    for kwargs, message in (
        ({"workers": 0}, "workers"),
        ({"min_frames": 0}, "min_frames"),
        ({"prefix": "a/b"}, "prefix"),
    ):
        with pytest.raises(ValueError, match=message):
            write_shards(tmp_path, tmp_path / "out", **kwargs)


# ----------------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GB", 10**9),
        ("500MB", 500 * 10**6),
        ("64KB", 64_000),
        ("64kb", 64_000),
        ("1k", 1000),
        ("1.5GiB", 3 * 2**29),
        ("2 MiB", 2 * 2**20),
        (" 10B ", 10),
        ("1048576", 1048576),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1XB", "-1GB", "1 G B", "0", "0.0001KB", "1e9"])
def test_parse_size_rejects_nonsense_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# probe


def test_probe_raises_probe_errors_with_reasons_for_planted_bad_files(media: dict) -> None:
    for name, reason in media["bad"].items():
        if reason in ("no_caption", "too_short"):  # properties of the sample, not of the file
            assert probe(media["root"] / name)["kind"] == "video"
            continue
        if reason == "no_media":  # a caption file: found by the folder walk, never probed
            continue
        with pytest.raises(ProbeError) as caught:
            probe(media["root"] / name)
        assert caught.value.reason == reason, (name, caught.value.detail)
        assert isinstance(caught.value, ValueError)
    restored = pickle.loads(pickle.dumps(ProbeError("truncated", "cut at byte 7")))
    assert (restored.reason, restored.detail) == ("truncated", "cut at byte 7")
    with pytest.raises(ProbeError) as caught:
        probe(media["root"] / "no_such_file.mp4")
    assert caught.value.reason == "missing"


CONTAINERS = [("h264", "mp4"), ("h264", "mov"), ("mpeg4", "mkv"), ("vp9", "webm"), ("vp8", "webm"), ("mpeg4", "avi")]


@pytest.mark.parametrize(("codec", "ext"), CONTAINERS)
def test_truncation_is_caught_in_every_container(tmp_path: Path, codec: str, ext: str) -> None:
    if not can_encode(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    source = make_video(tmp_path / f"clip.{ext}", codec, frames=20)
    assert probe(source)["frames"] == 20
    for keep in (0.1, 0.5, 0.9, 0.99):
        cut = truncate_file(shutil.copy(source, tmp_path / f"cut.{ext}"), keep)
        with pytest.raises(ProbeError) as caught:
            probe(cut)
        assert caught.value.reason == "truncated", (keep, caught.value.detail)


@pytest.mark.parametrize(
    ("codec", "ext", "options"),
    [
        ("h264", "mp4", {"preset": "veryfast", "x264-params": "bframes=3"}),  # reordered frames, edit list
        ("h264", "mkv", {"preset": "veryfast", "x264-params": "bframes=3"}),
        ("h264", "m4v", None),
        ("av1", "webm", None),
        ("vp9", "mkv", None),
    ],
)
def test_frame_count_fps_and_size_are_exact_across_codecs(tmp_path: Path, codec: str, ext: str, options) -> None:
    if not can_encode(codec):
        pytest.skip(f"this PyAV build cannot encode {codec}")
    path = make_video(tmp_path / f"clip.{ext}", codec, fps=30, frames=17, width=48, height=32, options=options)
    info = probe(path)
    assert (info["kind"], info["codec"], info["width"], info["height"], info["frames"]) == ("video", codec, 48, 32, 17)
    assert info["frames"] == decoded_frames(path.read_bytes())
    assert info["fps"] == pytest.approx(30.0, abs=0.01)
    assert probe(path, full_decode=True)["frames"] == 17


def test_full_decode_catches_damage_in_the_middle_of_a_stream(tmp_path: Path) -> None:
    path = corrupt_file(make_video(tmp_path / "clip.mp4", "h264", frames=20), fraction=0.5)
    assert probe(path)["frames"] == 20  # the default checks only the first frame and the container
    with pytest.raises(ProbeError, match="does not decode") as caught:
        probe(path, full_decode=True)
    assert caught.value.reason == "unreadable"


def test_probe_images(tmp_path: Path) -> None:
    for name, codec in (("a.png", "png"), ("b.jpeg", "mjpeg"), ("c.webp", "webp")):
        info = probe(make_image(tmp_path / name, 40, 30))
        assert (info["kind"], info["codec"], info["width"], info["height"]) == ("image", codec, 40, 30)
        assert (info["frames"], info["fps"], info["duration"]) == (1, 0.0, 0.0)


# ----------------------------------------------------------------------------------------------------
# command line


def test_cli_prints_a_summary_and_exits_zero_with_rejects(media: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "src.data.write", str(media["root"]), str(out)]
    command += ["--workers", str(WORKERS), "--min-frames", str(media["min_frames"]), "--shard-size", "64KB"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert f"wrote {len(media['good'])} samples" in result.stdout
    assert f"in {len(index['shards'])} shard" in result.stdout
    assert f"rejected {len(media['bad'])} inputs" in result.stdout
    for reason, count in Counter(media["bad"].values()).items():
        assert f"{reason} {count}" in result.stdout
    assert str(out / "rejects.jsonl") in result.stdout


def test_main_exits_nonzero_naming_a_missing_input_or_a_bad_size(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([str(tmp_path), str(tmp_path / "out"), "--shard-size", "lots"])
    assert caught.value.code == 2
    assert "'lots'" in capsys.readouterr().err
