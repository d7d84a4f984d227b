"""The on-disk gallery: A1111 metadata text, PNG round trip, SQLite index, concurrency, recovery, safety."""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import re
import sqlite3
import threading
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from dreamsketch import gallery as gallery_module
from dreamsketch.gallery import (
    Gallery,
    GalleryEntry,
    GalleryError,
    ImageMeta,
    _use_wal,
    format_parameters,
    meta_from_parameters,
    parse_parameters,
    read_parameters,
)

META = ImageMeta(
    prompt="a cat",
    negative_prompt="blurry",
    model_id="stable-diffusion-v1-5",
    width=512,
    height=512,
    steps=30,
    guidance_scale=7.5,
    seed=1234,
    scheduler="Euler a",
)
DESIGN_PARAMS_LINE = (
    "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: stable-diffusion-v1-5"
)
TRICKY_PROMPTS = [
    "",
    "line one\nline two",
    "Negative prompt: not really",
    "a\nNegative prompt: still the prompt",
    '"quoted"',
    '""',
    "a, b: c",
    "  spaced  ",
    "\n",
    "trailing newline\n",
    "Steps: 1, Sampler: x, CFG scale: 1, Seed: 1, Size: 8x8, Model: m",
    "unicode é ß 中文 😀 𝔘𝔫𝔦 \U0010fffd \u2028 \r\n tab\t",
]


def image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 30, 90))


def png_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


# --- the parameters text ------------------------------------------------------------------------------------------


def test_format_matches_design_example() -> None:
    assert format_parameters(META) == f"a cat\nNegative prompt: blurry\n{DESIGN_PARAMS_LINE}"


def test_format_leaves_out_empty_negative_and_prints_whole_cfg_compactly() -> None:
    text = format_parameters(replace(META, negative_prompt="", guidance_scale=7.0))
    assert text == "a cat\n" + DESIGN_PARAMS_LINE.replace("CFG scale: 7.5", "CFG scale: 7")


def test_img2img_adds_denoising_strength() -> None:
    text = format_parameters(replace(META, strength=0.6))
    assert text.endswith(f"{DESIGN_PARAMS_LINE}, Denoising strength: 0.6")
    assert parse_parameters(text)["denoising_strength"] == 0.6
    assert "Denoising strength" not in format_parameters(META)


def test_values_with_comma_colon_newline_are_json_strings() -> None:
    meta = replace(META, model_id="org/model, v2", scheduler="Euler: a\nb")
    line = format_parameters(meta).split("\n")[-1]
    assert 'Sampler: "Euler: a\\nb"' in line
    assert 'Model: "org/model, v2"' in line
    assert meta_from_parameters(format_parameters(meta)) == meta


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
@pytest.mark.parametrize("negative", ["", "plain", "multi\nline\nNegative prompt: x", " lead", '"q"'])
def test_tricky_prompts_round_trip(prompt: str, negative: str) -> None:
    meta = replace(META, prompt=prompt, negative_prompt=negative)
    assert meta_from_parameters(format_parameters(meta)) == meta


def test_ambiguous_prompt_is_written_as_json_string() -> None:
    text = format_parameters(replace(META, prompt="Negative prompt: x", negative_prompt=""))
    assert text.split("\n")[0] == '"Negative prompt: x"'


_names = st.text(max_size=20)
_metas = st.builds(
    ImageMeta,
    prompt=st.text(),
    negative_prompt=st.text(),
    model_id=_names,
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    steps=st.integers(1, 150),
    guidance_scale=st.floats(0, 30),
    seed=st.integers(0, 2**32 - 1),
    scheduler=_names,
    strength=st.none() | st.floats(0, 1, exclude_min=True),
)


@settings(max_examples=300, deadline=None)
@given(_metas)
def test_any_meta_round_trips_through_text(meta: ImageMeta) -> None:
    assert meta_from_parameters(format_parameters(meta)) == meta


def test_parse_real_world_a1111_text() -> None:
    text = (
        "masterpiece, best quality, 1girl, (portrait:1.2), <lora:detail:0.6>\n"
        "city lights at night\n"
        "Negative prompt: (worst quality:1.4), lowres,\n"
        "bad hands, watermark\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 6.5, Seed: 3456789012, "
        "Size: 832x1216, Model hash: 7f96a1a9ca, Model: dreamshaper_8, Denoising strength: 0.45, Clip skip: 2, "
        'ADetailer model: face_yolov8n.pt, Lora hashes: "detail: 0123abcd, other: 4567ef", Version: v1.6.0\n'
    )
    parsed = parse_parameters(text)
    assert (
        parsed["prompt"] == "masterpiece, best quality, 1girl, (portrait:1.2), <lora:detail:0.6>\ncity lights at night"
    )
    assert parsed["negative_prompt"] == "(worst quality:1.4), lowres,\nbad hands, watermark"
    assert (parsed["steps"], parsed["sampler"], parsed["cfg_scale"], parsed["seed"]) == (
        28,
        "DPM++ 2M Karras",
        6.5,
        3456789012,
    )
    assert (parsed["width"], parsed["height"], parsed["model"]) == (832, 1216, "dreamshaper_8")
    assert parsed["denoising_strength"] == 0.45
    assert parsed["extra"] == {
        "Schedule type": "Karras",
        "Model hash": "7f96a1a9ca",
        "Clip skip": "2",
        "ADetailer model": "face_yolov8n.pt",
        "Lora hashes": "detail: 0123abcd, other: 4567ef",
        "Version": "v1.6.0",
    }
    assert meta_from_parameters(text).model_id == "dreamshaper_8"


def test_parse_leaves_out_absent_keys_and_keeps_malformed_ones_as_extra() -> None:
    parsed = parse_parameters("just a prompt\nSteps: many, Sampler: Euler, Seed: 5")
    assert parsed == {
        "prompt": "just a prompt",
        "negative_prompt": "",
        "sampler": "Euler",
        "seed": 5,
        "extra": {"Steps": "many"},
    }
    assert parse_parameters("only a prompt, no: parameters") == {
        "prompt": "only a prompt, no: parameters",
        "negative_prompt": "",
        "extra": {},
    }
    with pytest.raises(ValueError, match="steps"):
        meta_from_parameters("just a prompt\nSteps: many, Sampler: Euler, Seed: 5")


@pytest.mark.parametrize(
    ("sampler_and_schedule", "scheduler"),
    [
        ("Sampler: DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras"),
        ("Sampler: DPM++ SDE, Schedule type: Karras", "DPM++ SDE Karras"),
        ("Sampler: DPM++ 2M, Schedule type: Automatic", "DPM++ 2M"),
        ("Sampler: Euler a", "Euler a"),
        ("Sampler: DPM++ 2M Karras, Schedule type: Karras", "DPM++ 2M Karras"),  # already one name
        # No DreamSketch scheduler: the name that A1111 before 1.8 wrote, unknown here like any other sampler.
        ("Sampler: Euler, Schedule type: Exponential", "Euler Exponential"),
    ],
)
def test_a1111_schedule_type_joins_the_sampler_name(sampler_and_schedule: str, scheduler: str) -> None:
    text = f"a cat\nSteps: 20, {sampler_and_schedule}, CFG scale: 7, Seed: 1, Size: 512x512, Model: m"
    assert parse_parameters(text)["sampler"] == scheduler
    assert meta_from_parameters(text).scheduler == scheduler
    schedule = sampler_and_schedule.partition("Schedule type: ")[2]
    assert parse_parameters(text)["extra"] == ({"Schedule type": schedule} if schedule else {})


# --- PNG ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a cat", "unicode 😀 中文 \U0010fffd", "multi\nline, with: colons"])
def test_metadata_round_trips_through_png(tmp_path: Path, prompt: str) -> None:
    meta = replace(META, prompt=prompt, strength=0.25)
    entry = Gallery(tmp_path).save(image(), meta)
    with Image.open(tmp_path / entry.file_name) as png:
        text = read_parameters(png)
    assert text == format_parameters(meta)
    assert meta_from_parameters(text) == meta
    chunk = b"tEXt" if prompt.isascii() else b"iTXt"  # PIL writes iTXt for text that is not Latin-1
    assert chunk + b"parameters\x00" in (tmp_path / entry.file_name).read_bytes()


def test_read_parameters_finds_text_after_image_data_and_none_without(tmp_path: Path) -> None:
    path = tmp_path / "late.png"
    image().save(path)
    with Image.open(path) as png:
        assert read_parameters(png) is None
    data = path.read_bytes()
    iend = data.rindex(b"IEND") - 4  # the chunk's length field
    body = b"parameters\x00late text"
    text_chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    path.write_bytes(data[:iend] + text_chunk + data[iend:])
    with Image.open(path) as png:
        assert read_parameters(png) == "late text"


# --- the gallery --------------------------------------------------------------------------------------------------


def test_save_writes_png_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "outputs"
    gallery = Gallery(folder)
    entry = gallery.save(image(), META)
    assert (folder / entry.file_name).is_file()
    assert all(c.isalnum() or c in "._-" for c in entry.file_name)
    assert entry.file_name.endswith(".png") and f"-{META.seed}-" in entry.file_name
    assert entry.created_at.endswith("Z") and len(entry.created_at) == len("2026-11-26T10:00:00Z")
    assert gallery.get(entry.id) == entry
    assert gallery.count() == 1
    assert entry.to_dict() == {
        "id": entry.id,
        "file_name": entry.file_name,
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "model_id": "stable-diffusion-v1-5",
        "width": 512,
        "height": 512,
        "steps": 30,
        "guidance_scale": 7.5,
        "seed": 1234,
        "scheduler": "Euler a",
        "strength": None,
        "created_at": entry.created_at,
    }
    assert list(entry.to_dict()) == ["id", "file_name", *list(entry.to_dict())[2:-1], "created_at"]


def test_list_newest_first_with_limit_and_offset(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    ids = [gallery.save(image(), replace(META, seed=n)).id for n in range(5)]
    assert [e.id for e in gallery.list()] == ids[::-1]
    assert [e.id for e in gallery.list(limit=2)] == ids[4:2:-1]
    assert [e.id for e in gallery.list(limit=2, offset=3)] == ids[1::-1]
    assert gallery.list(limit=2, offset=10) == []
    assert [e.meta.seed for e in gallery.list(limit=1)] == [4]
    with pytest.raises(ValueError):
        gallery.list(limit=-1)


def test_get_find_and_delete(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    keep, gone = gallery.save(image(), META), gallery.save(image(), replace(META, seed=9))
    assert gallery.get(999) is None and gallery.find("nothing.png") is None
    assert gallery.get(gone.id) == gone and gallery.find(gone.file_name) == gone
    gallery.delete(gone.file_name)
    assert not (tmp_path / gone.file_name).exists()
    assert gallery.get(gone.id) is None and gallery.find(gone.file_name) is None
    gallery.delete(gone.file_name)  # gone already: nothing to do
    assert gallery.list() == [keep]


def _save_many(folder: str, worker: int, count: int) -> None:
    gallery = Gallery(folder)
    for n in range(count):
        gallery.save(image(), replace(META, seed=worker * 1000 + n))


def _assert_complete(folder: Path, expected: int, gallery: Gallery | None = None) -> None:
    """The index holds each PNG once (checked through `gallery`, opened earlier, or else a new one that reconciles)."""
    gallery = gallery or Gallery(folder)
    entries = gallery.list(limit=expected + 10)
    assert len(entries) == expected == gallery.count()
    assert len({e.file_name for e in entries}) == expected
    assert len({e.meta.seed for e in entries}) == expected
    assert png_names(folder) == {e.file_name for e in entries}
    assert not list(folder.glob(".tmp-*"))


def test_concurrent_writers_in_threads(tmp_path: Path) -> None:
    threads = [threading.Thread(target=_save_many, args=(str(tmp_path), w, 10)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _assert_complete(tmp_path, 80)


def test_concurrent_writers_in_processes(tmp_path: Path) -> None:
    Gallery(tmp_path).save(image(), replace(META, seed=999999))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_save_many, args=(str(tmp_path), w, 10)) for w in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * 4
    _assert_complete(tmp_path, 41)


# --- recovery -----------------------------------------------------------------------------------------------------


def _three_and_a_foreign_png(folder: Path) -> list[GalleryEntry]:
    gallery = Gallery(folder)
    entries = [gallery.save(image(), replace(META, seed=n, prompt=f"p{n}\nNegative prompt: x")) for n in range(3)]
    for n, entry in enumerate(entries):  # distinct mtimes, oldest first
        os.utime(folder / entry.file_name, (1_700_000_000 + n, 1_700_000_000 + n))
    image().save(folder / "foreign.png")  # no parameters: never indexed
    return entries


def _assert_rebuilt(folder: Path, entries: list[GalleryEntry]) -> None:
    gallery = Gallery(folder)
    listed = gallery.list()
    assert [(e.file_name, e.meta, e.created_at) for e in listed] == [
        (e.file_name, e.meta, e.created_at) for e in entries[::-1]
    ]
    assert gallery.file_path("foreign.png") is None


def test_index_rebuilt_after_sqlite_file_deleted(tmp_path: Path) -> None:
    entries = _three_and_a_foreign_png(tmp_path)
    (tmp_path / "gallery.sqlite3").unlink()
    _assert_rebuilt(tmp_path, entries)


def test_corrupt_index_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    entries = _three_and_a_foreign_png(tmp_path)
    (tmp_path / "gallery.sqlite3").write_bytes(b"this is not a database" * 100)
    _assert_rebuilt(tmp_path, entries)
    assert len(list(tmp_path.glob("gallery.sqlite3.corrupt-*"))) == 1


def test_index_with_wrong_schema_is_rebuilt(tmp_path: Path) -> None:
    entries = _three_and_a_foreign_png(tmp_path)
    (tmp_path / "gallery.sqlite3").unlink()
    with sqlite3.connect(tmp_path / "gallery.sqlite3") as conn:
        conn.execute("CREATE TABLE images (x TEXT)")
    conn.close()
    _assert_rebuilt(tmp_path, entries)


@pytest.mark.parametrize("operation", ["list", "count", "get", "find", "file_path", "delete", "save"])
def test_any_operation_rebuilds_an_index_deleted_while_the_gallery_is_open(tmp_path: Path, operation: str) -> None:
    entries = _three_and_a_foreign_png(tmp_path)
    gallery = Gallery(tmp_path)
    (tmp_path / "gallery.sqlite3").unlink()
    first = entries[0]
    calls = {
        "list": lambda: gallery.list(),
        "count": lambda: gallery.count(),
        "get": lambda: gallery.get(first.id),
        "find": lambda: gallery.find(first.file_name),
        "file_path": lambda: gallery.file_path(first.file_name),
        "delete": lambda: gallery.delete(first.file_name),
        "save": lambda: gallery.save(image(), replace(META, seed=7)),
    }
    result = calls[operation]()
    expected = {
        "list": entries[::-1],  # the same ids, in the same order, as before
        "count": 3,
        "get": first,
        "find": first,
        "file_path": tmp_path.resolve() / first.file_name,
        "delete": None,
        "save": result,
    }
    assert result == expected[operation]
    rows = [result] if operation == "save" else []
    rows += entries[:0:-1] if operation == "delete" else entries[::-1]
    for listed in gallery.list(), Gallery(tmp_path).list():  # a rebuild numbers the rows anew
        assert [(e.file_name, e.meta, e.created_at) for e in listed] == [
            (e.file_name, e.meta, e.created_at) for e in rows
        ]


@pytest.mark.parametrize("damage", ["emptied", "garbage", "wrong schema", "damaged rows"])
def test_index_damaged_while_the_gallery_is_open_is_rebuilt(tmp_path: Path, damage: str) -> None:
    entries = _three_and_a_foreign_png(tmp_path)
    gallery = Gallery(tmp_path)
    index = tmp_path / "gallery.sqlite3"
    data = index.read_bytes()
    page = int.from_bytes(data[16:18], "big")  # the schema is on the first page, the rows on others
    damaged = {"garbage": b"this is not a database" * 100, "damaged rows": data[:page] + b"\xff" * (len(data) - page)}
    index.write_bytes(damaged.get(damage, b""))
    if damage == "wrong schema":
        with sqlite3.connect(index) as conn:
            conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, x TEXT)")
        conn.close()
    entry = gallery.save(image(), replace(META, seed=7))
    assert gallery.list() == [entry, *entries[::-1]]
    assert len(list(tmp_path.glob("gallery.sqlite3.corrupt-*"))) == (damage != "emptied")


def test_writers_in_threads_rebuild_a_deleted_index_together(tmp_path: Path) -> None:
    Gallery(tmp_path).save(image(), replace(META, seed=999999))
    galleries = [Gallery(tmp_path) for _ in range(8)]
    (tmp_path / "gallery.sqlite3").unlink()
    threads = [threading.Thread(target=_save_into, args=(g, w, 5)) for w, g in enumerate(galleries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _assert_complete(tmp_path, 41, galleries[0])


def test_a_picture_saved_while_the_index_is_rebuilt_is_indexed_after_the_older_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save during the rebuild's scan went into the new, empty index first: the newest picture got id 1."""
    entries = _three_and_a_foreign_png(tmp_path)
    gallery = Gallery(tmp_path)
    (tmp_path / "gallery.sqlite3").unlink()
    scan, writers = Gallery._scan, []

    def scan_while_another_saves(self: Gallery, names: set[str]) -> list:
        if not writers:
            writers.append(threading.Thread(target=gallery.save, args=(image(), replace(META, seed=99))))
            writers[0].start()
            writers[0].join(1.0)  # it waits for the rebuild now; before, it was done here
        return scan(self, names)

    monkeypatch.setattr(Gallery, "_scan", scan_while_another_saves)
    assert gallery.count() in (3, 4)  # the rebuild; the save may have followed it by now
    writers[0].join(30)
    assert [entry.meta.seed for entry in gallery.list()] == [99, 2, 1, 0]
    assert [entry.file_name for entry in gallery.list()[1:]] == [entry.file_name for entry in entries[::-1]]


def test_a_save_from_another_process_does_not_wait_out_a_rebuilds_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild read the whole folder holding the index's write lock: a save from another process waited its busy
    timeout out ("database is locked") and its picture was lost."""
    _three_and_a_foreign_png(tmp_path)
    rebuilding, other = Gallery(tmp_path), Gallery(tmp_path)  # two processes' galleries, as far as locks go
    (tmp_path / "gallery.sqlite3").unlink()
    monkeypatch.setattr(gallery_module, "BUSY_TIMEOUT_S", 0.2)
    scan, saved = Gallery._scan, []

    def save_elsewhere_during_the_scan(self: Gallery, names: set[str]) -> list:
        if self is rebuilding and not saved:
            saved.append(other.save(image(), replace(META, seed=99)))
        return scan(self, names)

    monkeypatch.setattr(Gallery, "_scan", save_elsewhere_during_the_scan)
    assert rebuilding.count() == 4
    assert saved[0].id == 4 and [entry.meta.seed for entry in rebuilding.list()] == [99, 2, 1, 0]


def test_a_lost_index_is_rebuilt_once_for_all_who_find_it_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request that found the index gone scanned every PNG again (8 at once at 30,000 PNGs: 45 s each)."""
    _three_and_a_foreign_png(tmp_path)
    gallery = Gallery(tmp_path)
    (tmp_path / "gallery.sqlite3").unlink()
    scan, scanned = Gallery._scan, []
    monkeypatch.setattr(Gallery, "_scan", lambda self, names: scanned.append(len(names)) or scan(self, names))
    counts: list[int] = []
    readers = [threading.Thread(target=lambda: counts.append(gallery.count())) for _ in range(8)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(60)
    assert counts == [3] * 8
    assert scanned.count(4) == 1 and set(scanned) == {4, 1}  # all once; then only the foreign PNG, never indexed


def _save_into(gallery: Gallery, worker: int, count: int) -> None:
    for n in range(count):
        gallery.save(image(), replace(META, seed=worker * 1000 + n))


def _open_then_save(folder: str, worker: int, count: int, ready: Any, go: Any) -> None:
    gallery = Gallery(folder)
    ready.release()
    assert go.wait(60)
    _save_into(gallery, worker, count)


def test_writers_in_processes_rebuild_a_deleted_index_together(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    gallery.save(image(), replace(META, seed=999999))
    context = multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    processes = [context.Process(target=_open_then_save, args=(str(tmp_path), w, 5, ready, go)) for w in range(4)]
    for process in processes:
        process.start()
    for _ in processes:
        assert ready.acquire(timeout=60)
    (tmp_path / "gallery.sqlite3").unlink()
    go.set()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * 4
    _assert_complete(tmp_path, 21, gallery)


def test_open_drops_rows_without_file_and_adds_files_without_row(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    lost, kept = gallery.save(image(), META), gallery.save(image(), replace(META, seed=2))
    (tmp_path / lost.file_name).unlink()
    with sqlite3.connect(tmp_path / "gallery.sqlite3") as conn:
        conn.execute("DELETE FROM images WHERE id = ?", (kept.id,))
    conn.close()
    reopened = Gallery(tmp_path)
    assert [(e.file_name, e.meta) for e in reopened.list()] == [(kept.file_name, kept.meta)]


def test_open_removes_orphan_temp_files_but_not_fresh_ones(tmp_path: Path) -> None:
    Gallery(tmp_path)
    orphan, fresh = tmp_path / ".tmp-0123abcd.png", tmp_path / ".tmp-4567ef01.png"
    orphan.write_bytes(b"partial")
    fresh.write_bytes(b"being written by another process")
    os.utime(orphan, (1_700_000_000, 1_700_000_000))
    Gallery(tmp_path)
    assert not orphan.exists()
    assert fresh.exists()


# --- failures -----------------------------------------------------------------------------------------------------


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_disk_full_leaves_no_temp_file_and_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    gallery = Gallery(tmp_path)
    monkeypatch.setattr(gallery_module.os, target, _disk_full)
    message = "could not save image to the gallery: No space left on device"  # no server path for the page
    with pytest.raises(GalleryError, match=re.escape(message)):
        gallery.save(image(), META)
    monkeypatch.undo()
    assert png_names(tmp_path) == set()
    assert not list(tmp_path.glob(".tmp-*"))
    assert gallery.count() == 0


def test_failed_index_insert_removes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = Gallery(tmp_path)
    monkeypatch.setattr(gallery_module, "_UPSERT", "INSERT INTO no_such_table VALUES (?)")
    with pytest.raises(GalleryError, match="no such table"):
        gallery.save(image(), META)
    assert png_names(tmp_path) == set()
    assert gallery.count() == 0


# --- file_path ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/etc/passwd",
        "a/b.png",
        "a\\b.png",
        "x\x00.png",
        "..",
        "",
        "gallery.sqlite3",
        "missing.png",
        ".tmp-a.png",
    ],
)
def test_file_path_refuses_anything_but_indexed_pngs(tmp_path: Path, name: str) -> None:
    gallery = Gallery(tmp_path)
    gallery.save(image(), META)
    (tmp_path / ".tmp-a.png").write_bytes(b"x")
    assert gallery.file_path(name) is None


def test_file_path_of_indexed_png(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path)
    entry = gallery.save(image(), META)
    assert gallery.file_path(entry.file_name) == tmp_path.resolve() / entry.file_name
    gallery.delete(entry.file_name)
    assert gallery.file_path(entry.file_name) is None


def test_a_gallery_folder_that_is_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "outputs").write_text("not a folder")
    with pytest.raises(GalleryError, match=r"could not open the gallery in .*outputs: it is a file, not a folder$"):
        Gallery(tmp_path / "outputs")


def test_a_picture_whose_seed_does_not_fit_the_index_is_left_out(tmp_path: Path) -> None:
    """A ComfyUI seed (up to 2**64 - 1) in a PNG copied into the folder stopped the gallery, and the server, at start
    ("Python int too large to convert to SQLite INTEGER")."""
    gallery = Gallery(tmp_path)
    kept = gallery.save(image(), META)
    huge = PngImagePlugin.PngInfo()
    huge.add_text("parameters", format_parameters(replace(META, seed=2**64 - 1)))
    image().save(tmp_path / "comfyui.png", pnginfo=huge)
    gallery.refresh()
    assert [entry.file_name for entry in Gallery(tmp_path).list()] == [kept.file_name]
    assert parse_parameters(format_parameters(replace(META, seed=2**64 - 1)))["seed"] == 2**64 - 1  # PNG info reads it


PARAMETERS_TEXT = (
    "a fox, ünïcode 🦊\nNegative prompt: blur\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: x"
)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize(
    "comment",
    [
        b"UNICODE\0" + PARAMETERS_TEXT.encode("utf-16-be"),  # AUTOMATIC1111 and Forge (piexif's "unicode")
        b"UNICODE\0" + PARAMETERS_TEXT.encode("utf-16-le"),
        b"UNICODE\0" + PARAMETERS_TEXT.encode("utf-16"),  # with a byte order mark
        b"ASCII\0\0\0" + PARAMETERS_TEXT.encode(),
    ],
)
def test_parameters_of_a1111_jpeg_and_webp_are_read_from_exif(fmt: str, comment: bytes) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    buffer = io.BytesIO()
    image().save(buffer, format=fmt, exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert read_parameters(opened) == PARAMETERS_TEXT


def test_lines_an_extension_adds_after_the_parameters_line() -> None:
    """Dynamic Prompts writes its templates after the parameters line: they went into the negative prompt, and the
    picture's steps, seed and size were lost."""
    text = (
        "a red fox\nNegative prompt: bad\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
        "Model: x\nTemplate: a {red|blue} fox\nNegative Template: bad"
    )
    parsed = parse_parameters(text)
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["steps"], parsed["seed"]) == ("a red fox", "bad", 20, 5)
    assert parsed["extra"] == {"Template": "a {red|blue} fox", "Negative Template": "bad"}
    assert parse_parameters("a cat\nstyle: watercolor")["prompt"] == "a cat\nstyle: watercolor"  # no parameters line
    assert parse_parameters(f"{text}\nNegative Template: ")["extra"]["Negative Template"] == ""  # emptied by rstrip


def test_a_prompt_that_ends_in_key_value_lines_stays_a_prompt() -> None:
    """A prompt line of 3 pairs followed by lines of one pair was taken for a parameters line and its trailer."""
    for text in (
        "masterpiece, style: anime, light: soft, mood: calm\nNote: x",
        "a\nLens: 50mm, Film: k, F: 2\nNote: x",
    ):
        parsed = parse_parameters(text)
        assert (parsed["prompt"], parsed["extra"]) == (text, {})


@pytest.mark.parametrize("text", ["一个女孩, masterpiece", "猫 on a sofa", "🐱 cat, best quality"])
@pytest.mark.parametrize("order", ["utf-16-be", "utf-16-le"])
def test_a_user_comment_that_starts_outside_ascii_reads_in_either_byte_order(text: str, order: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + f"{text}\n{PARAMETERS_TEXT}".encode(order)
    buffer = io.BytesIO()
    image().save(buffer, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert read_parameters(opened) == f"{text}\n{PARAMETERS_TEXT}"


def test_malformed_exif_reads_as_no_parameters(tmp_path: Path) -> None:
    image().save(tmp_path / "bad.png", exif=b"Exif\0\0hello")  # getexif() raises SyntaxError on it
    with Image.open(tmp_path / "bad.png") as opened:
        assert read_parameters(opened) is None


def test_switching_an_index_to_wal_waits_for_a_writer_instead_of_failing(tmp_path: Path) -> None:
    """Processes making a new index together: one switching it to WAL while another wrote got "database is locked"
    at once (SQLite does not wait where waiting could deadlock), and its save failed (seen once in a full run)."""
    writer = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    threading.Timer(1.0, lambda: writer.execute("COMMIT")).start()
    reader = sqlite3.connect(tmp_path / "index.sqlite3", timeout=30, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        reader.execute("PRAGMA journal_mode=WAL")  # what the index's opening did
    _use_wal(reader)
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader.close()
    writer.close()
