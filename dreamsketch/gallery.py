"""The gallery on disk: PNGs with A1111 "parameters" metadata plus a SQLite index (gallery.sqlite3).

Metadata text (DESIGN.md, "Gallery on disk")::

    <prompt>
    Negative prompt: <negative prompt>        (line left out when empty)
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: stable-diffusion-v1-5

The last line is always the parameters line. The negative prompt starts at the first line that begins with
"Negative prompt:" and runs to the parameters line, so both prompts may span lines. A prompt that would read back
differently as plain text (one with a line that starts with "Negative prompt:", or one that is itself a JSON string
literal such as '"x"') is written as one JSON string instead; the reader decodes a prompt that is a JSON string
literal. So every prompt round trips exactly, and ordinary prompts stay plain for other tools.

The index is a cache of what the PNGs say: it is rebuilt from them when missing or corrupt, and reconciled with the
folder each time a Gallery opens; an index deleted or damaged while a Gallery is open is rebuilt the same way by the
next operation, which then goes on. Writers in several threads and processes share it (WAL, busy timeout, one
connection per call); file names are unique without locks.
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import errno
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, PngImagePlugin

log = logging.getLogger(__name__)
_T = TypeVar("_T")

INDEX_NAME = "gallery.sqlite3"
TEMP_PREFIX = ".tmp-"
ORPHAN_AGE_S = 300.0  # a temporary file this old has lost its writer (a save takes well under a second)
BUSY_TIMEOUT_S = 30.0
WAL_RETRY_S = 0.05
LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
NEGATIVE_LABEL = "Negative prompt:"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png")
_NAME_TIME = re.compile(r"(\d{8}-\d{6})-")
# A1111's own pattern for one "Key: value" pair (a value is a JSON string or runs to the next comma).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_TRAILER = re.compile(r"(\w[\w \-/]+):(?: (.*))?")  # one "Key: value" line after the parameters line
MAX_TRAILER_LINES = 4
_INT = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class ImageMeta:
    """What generation knows about one image."""

    prompt: str
    negative_prompt: str
    model_id: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str  # A1111 sampler name, e.g. "Euler a"
    strength: float | None = None  # img2img denoising strength; None for txt2img


@dataclass(frozen=True)
class GalleryEntry:
    """One image of the gallery: its index row."""

    id: int
    file_name: str
    meta: ImageMeta
    created_at: str  # UTC ISO 8601 with Z, seconds precision

    def to_dict(self) -> dict[str, Any]:
        """Flat: id, file_name, the ImageMeta fields, created_at."""
        meta = {f.name: getattr(self.meta, f.name) for f in fields(ImageMeta)}
        return {"id": self.id, "file_name": self.file_name, **meta, "created_at": self.created_at}


class GalleryError(OSError):
    """Saving to (or opening) the gallery failed; nothing partial was left behind."""


class _UnusableIndex(sqlite3.DatabaseError):
    """The index file is missing or not a usable gallery index (not SQLite, damaged, wrong schema)."""


# ---------------------------------------------------------------------------------------------------------------
# The A1111 "parameters" text


def format_parameters(meta: ImageMeta) -> str:
    """The A1111 "parameters" text for an image (exact inverse: meta_from_parameters)."""
    lines = [_prompt_text(meta.prompt)] if meta.prompt else []
    if meta.negative_prompt:
        lines.append(f"{NEGATIVE_LABEL} {_prompt_text(meta.negative_prompt)}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in _param_pairs(meta)))
    return "\n".join(lines)


def _param_pairs(meta: ImageMeta) -> list[tuple[str, str]]:
    pairs = [("Steps", str(meta.steps))]
    if meta.scheduler:  # "" where it is not known (the Inference API chose it)
        pairs.append(("Sampler", meta.scheduler))
    pairs += [
        ("CFG scale", _format_float(meta.guidance_scale)),
        ("Seed", str(meta.seed)),
        ("Size", f"{meta.width}x{meta.height}"),
        ("Model", meta.model_id),
    ]
    if meta.strength is not None:
        pairs.append(("Denoising strength", _format_float(meta.strength)))
    return pairs


def _format_float(value: float) -> str:
    """Shortest text that reads back to the same float, without a trailing ".0" (7.5, 7, 0.05)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _quote(value: str) -> str:
    """A1111's rule (JSON string when the value holds , : or a newline), plus whatever else would not read back."""
    plain = value and value == value.strip() and not value.startswith('"') and not any(c in value for c in ",:\n")
    return value if plain else json.dumps(value, ensure_ascii=False)


def _prompt_text(prompt: str) -> str:
    ambiguous = prompt.startswith(NEGATIVE_LABEL) or f"\n{NEGATIVE_LABEL}" in prompt or _json_string(prompt) is not None
    return json.dumps(prompt, ensure_ascii=False) if ambiguous else prompt


def _json_string(text: str) -> str | None:
    """The decoded string if text is exactly one JSON string literal, else None."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111-style "parameters" text (ours, A1111, Forge, civitai).

    Always has "prompt", "negative_prompt" (empty when absent) and "extra" (other keys, values as strings).
    "steps", "sampler", "cfg_scale", "seed", "width", "height", "model", "denoising_strength" are present only
    when the text has them with a readable value (a malformed one goes to "extra" as written). "sampler" includes
    A1111 1.8+'s separate "Schedule type" (which "extra" keeps too): see _sampler_name.
    """
    body, params_line, extra = _split_params_line(text.rstrip())
    prompt, negative = _split_prompts(body)
    result: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for key, value in _param_items(params_line):
        converted = _convert(key, value)
        if converted is None:
            extra[key] = value
        else:
            result.update(converted)
    result["extra"] = extra
    if "sampler" in result:
        result["sampler"] = _sampler_name(result["sampler"], extra.get("Schedule type", ""))
    return result


def _sampler_name(sampler: str, schedule: str) -> str:
    """One name for a sampler and its schedule, as DreamSketch and A1111 before 1.8 write it: "DPM++ 2M" with
    "Karras" is "DPM++ 2M Karras". "Automatic" (the sampler's own schedule) adds nothing. A pair that DreamSketch has
    no scheduler for ("Euler" with "Exponential") gives a name it does not know, as that A1111 wrote for the pair."""
    if schedule in ("", "Automatic") or sampler.endswith(f" {schedule}"):
        return sampler
    return f"{sampler} {schedule}"


def _split_params_line(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt part, parameters line, the "Key: value" lines after it). As in A1111 the parameters line is the last
    line if it has 3 pairs or more; extensions may add lines of one pair after it (Dynamic Prompts: "Template:
    ..."), and then the parameters line is the one before them that has Steps (a prompt may end in such lines)."""
    lines = text.split("\n")
    for index in range(len(lines) - 1, max(len(lines) - 1 - MAX_TRAILER_LINES, 0) - 1, -1):
        pairs = _PARAM.findall(lines[index])
        if len(pairs) >= 3 and (index == len(lines) - 1 or any(key.strip() == "Steps" for key, _ in pairs)):
            trailer = [_TRAILER.fullmatch(line) for line in lines[index + 1 :]]
            return "\n".join(lines[:index]), lines[index], {m[1]: m[2] or "" for m in trailer if m is not None}
        if not _TRAILER.fullmatch(lines[index]):
            break
    return text, "", {}


def _split_prompts(body: str) -> tuple[str, str]:
    if body.startswith(NEGATIVE_LABEL):
        prompt, negative = "", body[len(NEGATIVE_LABEL) :]
    elif (cut := body.find(f"\n{NEGATIVE_LABEL}")) >= 0:
        prompt, negative = body[:cut], body[cut + 1 + len(NEGATIVE_LABEL) :]
    else:
        prompt, negative = body, ""
    return _unquote_prompt(prompt), _unquote_prompt(negative.removeprefix(" "))


def _unquote_prompt(text: str) -> str:
    decoded = _json_string(text)
    return text if decoded is None else decoded


def _param_items(line: str) -> Iterator[tuple[str, str]]:
    for key, raw in _PARAM.findall(line):
        value = _json_string(raw) if raw.startswith('"') else None
        yield key.strip(), raw.strip() if value is None else value


def _parse_int(text: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _parse_size(text: str) -> dict[str, Any]:
    width, sep, height = text.partition("x")
    if not sep:
        raise ValueError(f"not a size: {text!r}")
    return {"width": _parse_int(width.strip()), "height": _parse_int(height.strip())}


def _field(name: str, parse: Callable[[str], Any]) -> Callable[[str], dict[str, Any]]:
    return lambda text: {name: parse(text)}


_CONVERTERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "Steps": _field("steps", _parse_int),
    "Sampler": _field("sampler", str),
    "CFG scale": _field("cfg_scale", _parse_float),
    "Seed": _field("seed", _parse_int),
    "Size": _parse_size,
    "Model": _field("model", str),
    "Denoising strength": _field("denoising_strength", _parse_float),
}


def _convert(key: str, value: str) -> dict[str, Any] | None:
    """The typed fields for a known key with a readable value; None for any other key or a malformed value."""
    converter = _CONVERTERS.get(key)
    if converter is None:
        return None
    try:
        return converter(value)
    except ValueError:
        return None


_REQUIRED = ("steps", "cfg_scale", "seed", "width", "height", "model")
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # EXIF's sub-directory and its UserComment tag
_INDEX_INTEGERS = range(-(2**63), 2**63)  # SQLite's INTEGER


def meta_from_parameters(text: str) -> ImageMeta:
    """The ImageMeta that a "parameters" text describes; ValueError if it lacks a field that ImageMeta needs."""
    parsed = parse_parameters(text)
    missing = [key for key in _REQUIRED if key not in parsed]
    if missing:
        raise ValueError(f"parameters text lacks {', '.join(missing)}")
    for key in ("width", "height", "steps", "seed"):  # other tools' seeds go up to 2**64 - 1
        if parsed[key] not in _INDEX_INTEGERS:
            raise ValueError(f"{key} {parsed[key]} does not fit the index")
    return ImageMeta(
        prompt=parsed["prompt"],
        negative_prompt=parsed["negative_prompt"],
        model_id=parsed["model"],
        width=parsed["width"],
        height=parsed["height"],
        steps=parsed["steps"],
        guidance_scale=parsed["cfg_scale"],
        seed=parsed["seed"],
        scheduler=parsed.get("sampler", ""),
        strength=parsed.get("denoising_strength"),
    )


def read_parameters(image: Image.Image) -> str | None:
    """The parameters text of a picture: a PNG's "parameters" chunk (tEXt, iTXt or zTXt), or the EXIF UserComment
    where AUTOMATIC1111 and Forge write it in a JPEG or WebP; None without either."""
    value = image.info.get("parameters")
    if value is None and isinstance(image, PngImagePlugin.PngImageFile):
        value = image.text.get("parameters")  # a chunk after the image data (loads the image)
    if value is None:
        try:
            value = _user_comment(image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
        except Exception:  # malformed EXIF: Pillow raises whatever its parser meets (SyntaxError, struct.error, ...)
            value = None
    return str(value) if isinstance(value, str) and value else None


def _user_comment(value: Any) -> str | None:
    """EXIF's UserComment: 8 bytes naming the encoding ("UNICODE": UTF-16, whose byte order A1111 does not mark, so
    the zero bytes of ASCII text tell it), then the text."""
    if not isinstance(value, bytes) or len(value) < 8:
        return value if isinstance(value, str) else None
    code, text = value[:8], value[8:]
    if code == b"UNICODE\0":
        if text[:2] in (codecs.BOM_UTF16_BE, codecs.BOM_UTF16_LE):
            return text.decode("utf-16", errors="replace")
        return max((text.decode(order, errors="replace") for order in ("utf-16-be", "utf-16-le")), key=_readable)
    return text.decode("utf-8", errors="replace").rstrip("\0")  # "ASCII\0\0\0", or undefined (zeros)


def _readable(text: str) -> int:
    """How much of `text` reads as parameters do: the byte order that gives more of ASCII's letters, digits,
    punctuation and line breaks is the one it was written in (A1111 writes UTF-16 without a byte order mark)."""
    return sum(" " <= char <= "~" or char == "\n" for char in text)


# ---------------------------------------------------------------------------------------------------------------
# The gallery

_COLUMNS = (
    "file_name",
    "prompt",
    "negative_prompt",
    "model_id",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "strength",
    "created_at",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_name TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    model_id TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    guidance_scale REAL NOT NULL,
    seed INTEGER NOT NULL,
    scheduler TEXT NOT NULL,
    strength REAL,
    created_at TEXT NOT NULL
)"""
_UPSERT = (
    f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    f"ON CONFLICT(file_name) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])} RETURNING id"
)
_INSERT_MISSING = (
    f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT(file_name) DO NOTHING"
)


class Gallery:
    """PNG files with metadata in one folder, indexed by gallery.sqlite3. Safe across threads and processes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.index_path = self.folder / INDEX_NAME
        self._opening = threading.Lock()  # one thread of this process opens (or rebuilds) at a time
        self._open()

    # -- public ---------------------------------------------------------------------------------------------------

    def save(self, image: Image.Image, meta: ImageMeta) -> GalleryEntry:
        """Write the PNG atomically, then its index row; GalleryError (and nothing left behind) on failure."""
        now = datetime.now(UTC)
        file_name = f"{now:%Y%m%d-%H%M%S}-{meta.seed}-{uuid.uuid4().hex[:12]}.png"
        created_at = _iso(now)
        try:
            self._write_png(image, format_parameters(meta), self.folder / file_name)
            entry_id = self._insert(file_name, meta, created_at)
        except GalleryError:  # the index was lost and could not be rebuilt
            raise
        except (OSError, sqlite3.Error) as error:
            log.warning("could not save %s in %s: %s", file_name, self.folder, error)  # the folder for the log only
            raise GalleryError(f"could not save image to the gallery: {_reason(error)}") from error
        return GalleryEntry(entry_id, file_name, meta, created_at)

    def list(self, limit: int = 20, offset: int = 0) -> builtins.list[GalleryEntry]:
        """Entries newest first (by id)."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        rows = self._fetch("SELECT * FROM images ORDER BY id DESC LIMIT ? OFFSET ?", limit, offset)
        return [_entry(row) for row in rows]

    def count(self) -> int:
        return int(self._fetch("SELECT COUNT(*) FROM images")[0][0])

    def get(self, entry_id: int) -> GalleryEntry | None:
        rows = self._fetch("SELECT * FROM images WHERE id = ?", entry_id)
        return _entry(rows[0]) if rows else None

    def find(self, file_name: str) -> GalleryEntry | None:
        """The entry of a file: ids change when a lost index is rebuilt, names do not."""
        rows = self._fetch("SELECT * FROM images WHERE file_name = ?", file_name)
        return _entry(rows[0]) if rows else None

    def delete(self, file_name: str) -> None:
        """Remove the file, then its row (in this order, so that a concurrent reconcile never revives it)."""
        (self.folder / file_name).unlink(missing_ok=True)
        self._run(lambda conn: conn.execute("DELETE FROM images WHERE file_name = ?", (file_name,)), write=True)

    def refresh(self) -> None:
        """Take in PNGs added to or removed from the folder behind the app's back (as at start)."""
        self._open()

    def file_path(self, file_name: str) -> Path | None:
        """The path of a gallery PNG named in the index; None for anything else (traversal-proof)."""
        if not isinstance(file_name, str) or ".." in file_name or not _SAFE_NAME.fullmatch(file_name):
            return None
        known = self._fetch("SELECT 1 FROM images WHERE file_name = ?", file_name)
        path = self.folder / file_name
        return path if known and _plain_file(path) else None

    def holds(self, path: Path) -> bool:
        """Whether `path` (absolute) is one of the gallery's PNGs named in the index."""
        return path.parent == self.folder and self.file_path(path.name) is not None

    # -- files ----------------------------------------------------------------------------------------------------

    def _write_png(self, image: Image.Image, parameters: str, target: Path) -> None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        temp = self.folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}.png"
        try:
            with open(temp, "xb") as handle:
                image.save(handle, format="PNG", pnginfo=info)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            _remove_quietly(temp)
            raise
        _fsync_folder(self.folder)

    def _remove_orphans(self) -> None:
        cutoff = datetime.now(UTC).timestamp() - ORPHAN_AGE_S
        for path in self.folder.glob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    log.info("removed orphan temporary file %s", path)

    def _png_names(self) -> set[str]:
        return {p.name for p in self.folder.iterdir() if _SAFE_NAME.fullmatch(p.name) and _plain_file(p)}

    def _scan(self, names: set[str]) -> builtins.list[tuple[str, ImageMeta, str]]:
        """(name, meta, created_at) of the named PNGs that carry our metadata, oldest file first."""
        found = []
        for name in names:
            path = self.folder / name
            try:
                mtime = path.stat().st_mtime
                found.append((mtime, name, meta_from_parameters(_png_parameters(path) or ""), _created_at(name, mtime)))
            except (OSError, SyntaxError, ValueError) as exc:  # not ours, not readable, or not indexable
                log.info("gallery: %s left out of the index (%s)", name, exc)
        found.sort(key=lambda item: (item[0], item[1]))
        return [(name, meta, created) for _, name, meta, created in found]

    # -- index ----------------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Open the gallery: create the index, or move a corrupt one aside and start a new one; then reconcile it
        with the folder (a new index gets a row for each PNG). Also what brings back an index lost while open: the
        threads that find it lost meanwhile wait here, then find it whole."""
        try:
            with self._opening:
                if self.folder.exists() and not self.folder.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
                self.folder.mkdir(parents=True, exist_ok=True)
                self._remove_orphans()
                self._open_index()
                self._reconcile()
        except (OSError, sqlite3.Error) as error:
            raise GalleryError(f"could not open the gallery in {self.folder}: {_reason(error)}") from error

    def _run(self, work: Callable[[sqlite3.Connection], _T], write: bool = False) -> _T:
        """work(connection), in one transaction if it writes. On an index that is missing or unusable (deleted or
        damaged since the gallery opened), the gallery opens again first: rows lost with the index were for PNGs
        that were written before it went, so the new index has them all."""

        def attempt() -> _T:
            with self._transaction() if write else self._connect() as conn:
                return work(conn)

        try:
            return attempt()
        except _UnusableIndex as error:
            log.warning("gallery index %s is missing or unusable (%s); rebuilding it", self.index_path, error)
        self._open()
        return attempt()

    def _fetch(self, sql: str, *parameters: Any) -> builtins.list[sqlite3.Row]:
        return self._run(lambda conn: conn.execute(sql, parameters).fetchall())

    @contextlib.contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection to the index; _UnusableIndex if it is missing (unless create), damaged or lacks our table."""
        uri = f"{self.index_path.as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.OperationalError as error:
            if create:
                raise
            raise _UnusableIndex(str(error)) from error  # mode=rw does not create a missing file
        conn.row_factory = sqlite3.Row
        try:
            if not create:
                _check_schema(conn)
            yield conn
        except sqlite3.DatabaseError as error:  # "database is locked" and the like are not damage
            if getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise _UnusableIndex(str(error)) from error
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        with self._connect(create) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite ends it itself after some errors
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _open_index(self) -> None:
        """Create the index, or move an unusable one (not SQLite, damaged, wrong schema) aside and start a new one."""
        try:
            self._prepare_index()
        except _UnusableIndex as error:
            self._move_index_aside(error)
            self._prepare_index()

    def _prepare_index(self) -> None:
        """The index file, checked and in WAL mode. A missing table is made by _reconcile(), in the transaction that
        fills it: until then no save can take an id before the PNGs already in the folder."""
        with self._connect(create=True) as conn:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _UnusableIndex(f"integrity check: {check}")
            _use_wal(conn)
            if _has_table(conn):
                _check_schema(conn)

    def _move_index_aside(self, error: Exception) -> None:
        suffix = f".corrupt-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        for extra in ("", "-wal", "-shm"):
            path = self.folder / f"{INDEX_NAME}{extra}"
            with contextlib.suppress(FileNotFoundError):
                path.replace(path.with_name(path.name + suffix))
        log.warning(
            "gallery index %s was unreadable (%s); moved aside as *%s, rebuilding", self.index_path, error, suffix
        )

    def _reconcile(self) -> None:
        """Drop rows whose file is gone; add rows for PNGs with our metadata that have none. The PNGs are read
        first, with no lock held (a whole folder can take long: saves in other processes would time out waiting),
        then in one transaction those that came meanwhile, and the rows are written."""
        with self._connect(create=True) as conn:
            indexed = {row[0] for row in conn.execute("SELECT file_name FROM images")} if _has_table(conn) else set()
        scanned = self._png_names()
        found = self._scan(scanned - indexed)
        with self._transaction(create=True) as conn:
            conn.execute(_SCHEMA)
            indexed = {row[0] for row in conn.execute("SELECT file_name FROM images")}
            on_disk = self._png_names()
            unindexed = on_disk - indexed
            found = [item for item in found if item[0] in unindexed]  # still there, not indexed meanwhile
            if arrived := on_disk - scanned - indexed:
                found += self._scan(arrived)
            gone = [(name,) for name in indexed - on_disk if not (self.folder / name).exists()]
            conn.executemany("DELETE FROM images WHERE file_name = ?", gone)
            conn.executemany(_INSERT_MISSING, [_row(name, meta, created) for name, meta, created in found])
        if gone or found:
            log.info("gallery index reconciled: %d rows dropped, %d added", len(gone), len(found))

    def _insert(self, file_name: str, meta: ImageMeta, created_at: str) -> int:
        """Upsert (a concurrent reconcile may have indexed the file already); on failure remove the file."""
        row = _row(file_name, meta, created_at)
        try:
            return self._run(lambda conn: int(conn.execute(_UPSERT, row).fetchone()[0]), write=True)
        except BaseException:
            _remove_quietly(self.folder / file_name)
            raise


def _use_wal(conn: sqlite3.Connection) -> None:
    """WAL mode. Switching takes an exclusive lock, and SQLite answers "database is locked" at once, without waiting,
    where waiting could deadlock (this connection reading while another writes: processes making a new index
    together); so the switch is tried again until the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", 0) & 0xFF not in LOCKED or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_S)


def _has_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone() is not None


def _check_schema(conn: sqlite3.Connection) -> None:
    """_UnusableIndex unless the index has our table with all its columns."""
    try:
        conn.execute(f"SELECT id, {', '.join(_COLUMNS)} FROM images LIMIT 0")
    except sqlite3.OperationalError as error:
        if error.sqlite_errorcode == sqlite3.SQLITE_ERROR:  # no such table, no such column
            raise _UnusableIndex(str(error)) from error
        raise


def _row(file_name: str, meta: ImageMeta, created_at: str) -> tuple[Any, ...]:
    return (file_name, *astuple(meta), created_at)


def _entry(row: sqlite3.Row) -> GalleryEntry:
    meta = ImageMeta(**{f.name: row[f.name] for f in fields(ImageMeta)})
    return GalleryEntry(row["id"], row["file_name"], meta, row["created_at"])


def _png_parameters(path: Path) -> str | None:
    """The parameters chunk when it precedes the image data (where we write it): no image decoding."""
    with Image.open(path) as image:
        value = image.info.get("parameters")
    return str(value) if isinstance(value, str) else None


def _created_at(file_name: str, mtime: float) -> str:
    """The time in our file names (the save's own created_at), else the file's mtime."""
    match = _NAME_TIME.match(file_name)
    if match:
        with contextlib.suppress(ValueError):
            return _iso(datetime.strptime(match[1], "%Y%m%d-%H%M%S").replace(tzinfo=UTC))
    return _iso(datetime.fromtimestamp(mtime, UTC))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _remove_quietly(path: Path) -> None:
    """Cleanup after a failure: the original error is the one to report."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened this way on Windows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
