"""Where encoded images come from, and which of them can be used.

`open_source(path)` accepts an ImageFolder tree (root/<class>/<image>), a text file list
('path [label]' per line), or WebDataset tar shards (one .tar, a glob like
'shards/train-*.tar', or a directory holding only .tar files). Every kind answers the same
three questions for sample i: `names[i]` (a path, or 'shard.tar:member' inside a tar, for
logs), `labels[i]` (-1 when unknown) and `read(i)` (the encoded bytes).

`check_image(data)` is the cheap test every backend runs before decoding: it parses the
header (format and size) and looks for the end marker of JPEG and PNG files, so zero-byte,
random-bytes, truncated and oversized files are skipped the same way whichever decoder runs.
It reads the header only: a file whose entropy-coded data is damaged in the middle passes it
and is caught by the decoder (see datasets.py and dali.py) or by `verify --full`.

Folder trees are walked following directory links, each real directory once, so a link
loop cannot multiply the data set. A WebDataset shard cut short (a copy that stopped, a full
disk) keeps the samples stored whole before the damage; `Source.lost` says what was lost.

Tar shards need an index (byte offset and size of every member) for random access. It is
written in DALI's own format ('v1.2', as `wds2idx` writes), so `fn.readers.webdataset` reads
the same file: `tar_index(shard)` builds it next to the shard (or under the cache directory
when the shard's folder is read-only) if it is missing or older than the shard.
`python -m dataloading.sources SHARD...` builds indexes ahead of time.

Errors that mean the data set cannot be used at all (missing, empty, a single image, a
binary file given as a list) raise `DataError`, one line saying what to pass instead.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import logging
import os
import sys
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("img2vec.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# PIL format names of what DALI's decoders read (PPM covers PNM/PGM/PBM).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (tools/wds2idx.py)
# Images with more pixels (from the header) are skipped before decoding. 64 MP holds every
# camera photo up to 61 MP full-frame sensors and costs ~190 MB decoded as uint8 RGB (the
# torch backend's PIL decode, plus about as much again for the conversion); a 12000 x 12000
# PNG would cost 430 MB decoded and ~1.8 GB in the pipeline for one 224-px crop. It also stays
# below PIL's decompression-bomb warning (89 MP). PIL refuses anything above 179 MP whatever
# the setting.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_TAR_END = 1024  # a complete tar ends with two 512-byte zero blocks (end-of-archive marker)


class DataError(ValueError):
    """The data set (or a loader setting) cannot start a run; str(err) is one line saying what to do."""


class DataNotFound(DataError, FileNotFoundError):
    """The data path does not exist or matches nothing."""


class BadImage(ValueError):
    """An image that no backend will use; str(err) is the reason shown in logs and by verify."""


def escape_name(name: str) -> str:
    """`name` with backslashes and unprintable characters (newline, tab, ESC, ...) escaped, for one-line output."""
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in name)


# ---- checking encoded bytes ----

def check_image(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, int, int]:
    """Return (format, height, width) of an image that looks complete; raise BadImage otherwise.

    Costs a header parse plus a backward search for the end marker (~20-50 us), not a decode.
    max_image_pixels: images with more pixels (height * width) are refused; 0 = no cap of ours.
    """
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():  # our cap below says it in one line, without PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise BadImage("not an image (no format PIL recognises)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"too large to decode ({err})") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error, ...
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    if width < 1 or height < 1:
        raise BadImage(f"{fmt} header says {width}x{height} pixels")
    if max_image_pixels and width * height > max_image_pixels:
        raise BadImage(f"{width}x{height} = {width * height / 1e6:.0f} MP, above max_image_pixels "
                       f"{max_image_pixels} ({max_image_pixels / 1e6:g} MP); raise it to use this image")
    if fmt == "JPEG" and not data[-64:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):  # fast path: ends in EOI
        # Entropy-coded data cannot hold the bytes FF D9 (a data FF is always followed by 00),
        # so a complete file has an end-of-image marker after its last start-of-scan marker.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise BadImage("truncated JPEG (no end-of-image marker after the last scan)")
    elif fmt == "PNG" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        raise BadImage("truncated PNG (no IEND chunk at the end)")
    return fmt, height, width


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit gray (PNG, TIFF) as PIL opens it


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode `data` with PIL and convert any mode (L, CMYK, RGBA, P, I;16, ...) to 8-bit RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            if image.mode in _WIDE_GRAY:
                # convert() clips 16-bit values at 255 (a white image); scale 0..65535 to 0..255 as DALI does.
                # Mode "I" holds 16-bit gray for PNG/TIFF; values outside 0..65535 are clipped.
                wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)  # (H, W)
                image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        raise BadImage(f"decode failed ({type(err).__name__}: {err})") from None


# ---- the three kinds of data set ----

@dataclass
class Source:
    """A data set: sample i has a display name, a label (-1 if none), and encoded bytes."""

    names: list[str]
    labels: list[int]
    kind: str  # "folder" | "list" | "webdataset" | "file"
    notes: list[str] = field(default_factory=list)  # what was left out while listing, for the log
    origin: str = ""  # the data path it was opened from (keys the scan cache)
    lost: list[str] = field(default_factory=list)  # data that is damaged and could not be listed (a cut-off shard)

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> bytes:
        with open(self.names[index], "rb") as f:
            return f.read()


@dataclass
class TarSource(Source):
    """Samples inside WebDataset shards: member `offsets[i]`/`sizes[i]` of `shards[shard_of[i]]`."""

    shards: list[Path] = field(default_factory=list)
    index_paths: list[Path] = field(default_factory=list)
    shard_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lines: list[int] = field(default_factory=list)  # sample i is line lines[i] (0-based, after the header) of its index

    def shard_starts(self) -> np.ndarray:
        """(shards + 1,) first sample index of each shard (samples are numbered shard by shard)."""
        return np.searchsorted(self.shard_of, np.arange(len(self.shards) + 1))

    def index_at(self, shard: int, offset: int) -> int:
        """The sample whose image member's data starts at byte `offset` of shard `shard`."""
        lo, hi = self.shard_starts()[shard : shard + 2]
        return int(lo + np.searchsorted(self.offsets[lo:hi], offset))

    def read(self, index: int) -> bytes:
        fd = os.open(self.shards[self.shard_of[index]], os.O_RDONLY)
        try:
            return os.pread(fd, int(self.sizes[index]), int(self.offsets[index]))
        finally:
            os.close(fd)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: Path) -> Source:
    """List images under root/<class>/ (any depth below the class folder), sorted; label = class order.

    Directory links are followed, each real directory once (the first path that reaches it in
    sorted order), so a link loop or two links to one folder cannot list files twice.
    """
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    names: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    empty: list[str] = []
    seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every directory listed
    repeated: list[str] = []

    def first_visit(path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:  # a dangling link: nothing to list
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            repeated.append(path)
            return False
        seen.add(key)
        return True

    for label, name in enumerate(classes):
        before = len(names)
        walk = os.walk(root / name, followlinks=True) if first_visit(str(root / name)) else ()
        for dirpath, dirnames, filenames in walk:
            dirnames[:] = [d for d in sorted(dirnames) if first_visit(os.path.join(dirpath, d))]  # sorted: stable indices
            for filename in sorted(filenames):
                if _is_image(filename):
                    names.append(os.path.join(dirpath, filename))
                    labels.append(label)
                else:
                    ignored.append(os.path.join(dirpath, filename))
        if len(names) == before:
            empty.append(name)
    notes = []
    if ignored:
        notes.append(f"ignored {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}")
    if empty:
        notes.append(f"{len(empty)} class folder(s) hold no images: {', '.join(empty[:5])}")
    if repeated:
        notes.append(f"listed each directory once: {len(repeated)} link(s) to a directory already listed were not "
                     f"followed, e.g. {escape_name(repeated[0])}")
    return Source(names, labels, "folder", notes)


def _read_list(list_file: Path) -> Source:
    """Read 'path [label]' lines; relative paths are resolved against the list file's folder."""
    names: list[str] = []
    labels: list[int] = []
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise DataError(f"data path {list_file} is not a text file list; pass an ImageFolder directory, "
                        "a file list ('path [label]' per line) or .tar shards") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise DataError(
                f"{list_file}:{line_no}: expected 'path [integer label]', got {line!r}; "
                "paths containing spaces are not supported"
            )
        names.append(str(list_file.parent / fields[0]))  # an absolute fields[0] replaces the parent
        labels.append(int(fields[1]) if len(fields) == 2 else -1)
    return Source(names, labels, "list")


# ---- WebDataset shards ----

def _split_member(name: str) -> tuple[str, str]:
    """'dir/key.seg.png' -> ('dir/key', 'seg.png'): WebDataset's (and DALI's) sample key and extension."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _cache_root() -> Path:
    return Path(os.environ.get("IMG2VEC_CACHE") or Path.home() / ".cache" / "img2vec")


def _cache_path(kind: str, key: Path, suffix: str) -> Path:
    digest = hashlib.sha1(str(key.resolve()).encode()).hexdigest()[:16]
    return _cache_root() / kind / f"{key.stem}-{digest}{suffix}"


def _tar_members(shard: Path) -> tuple[list[tarfile.TarInfo], str]:
    """The regular members of `shard` stored whole, and what was lost when the shard is cut short ("" if intact).

    Reads tar headers only (tarfile seeks over data). A shard is cut short when a header is
    cut off, a member's data runs past the end of the file, or the end-of-archive marker is
    missing; the members stored whole before the damage are kept.
    """
    file_size = shard.stat().st_size
    members: list[tarfile.TarInfo] = []
    damage = ""
    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, as random access needs
            try:
                for member in tar:
                    members.append(member)
            except tarfile.ReadError as err:  # a header or member cut off mid-way
                damage = str(err)
            end = tar.offset  # just past the last member tarfile read
    except tarfile.ReadError as err:  # not even a first header
        return [], f"{shard} is not a readable tar ({err}): all of it is lost; copy the shard again"
    whole = [m for m in members if m.offset_data + m.size <= file_size]
    cut = [m for m in members if m.isreg() and m.offset_data + m.size > file_size]
    if not damage and not cut:
        with open(shard, "rb") as f:
            f.seek(end)
            marker = f.read(_TAR_END)
        if len(marker) < _TAR_END or marker.strip(b"\0"):
            damage = "no end-of-archive marker"
    if not damage and not cut:
        return whole, ""
    cut_keys = {_split_member(m.name)[0] for m in cut} - {_split_member(m.name)[0] for m in whole if m.isreg()}
    return whole, (f"{shard} is cut short at byte {file_size} ({damage or 'a member runs past the end'}): "
                   f"kept the {len(whole)} member(s) stored whole, lost {len(cut_keys)} sample(s) cut off mid-member "
                   "and whatever followed them; copy the shard again")


def build_tar_index(shard: Path, index_path: Path) -> int:
    """Write DALI's v1.2 index of `shard` to `index_path`; return the number of samples.

    One line per sample (consecutive regular members sharing a key), each component as
    'ext data_offset size member_name'. A shard cut short is indexed up to the damage.
    Member names holding whitespace cannot be written in this format and are left out.
    """
    samples: list[list[str]] = []
    last_key = None
    for member in _tar_members(shard)[0]:
        if not member.isreg() or any(c.isspace() for c in member.name):
            continue
        key, ext = _split_member(member.name)
        if not key or key.endswith("/"):  # hidden files ('.name') are not samples
            continue
        component = f"{ext} {member.offset_data} {member.size} {member.name}"
        if key == last_key:
            samples[-1].append(component)
        else:
            samples.append([component])
            last_key = key
    tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    os.replace(tmp, index_path)  # atomic: a concurrent reader sees the old index or the whole new one
    return len(samples)


def shard_damage(shard: Path) -> str:
    """"" when `shard` ends with a tar end-of-archive marker (read: 1 KB), else what was lost (reads the headers)."""
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        f.seek(max(0, size - _TAR_END))
        tail = f.read(_TAR_END)
    if size >= 2 * _TAR_END and not tail.strip(b"\0"):
        return ""
    return _tar_members(shard)[1]


def _index_version(index_path: Path) -> str:
    with open(index_path) as f:
        return f.readline().split(" ", 1)[0]


def tar_index(shard: Path) -> Path:
    """Return an up-to-date index of `shard`: beside it (shard.idx), else under the cache dir; build if needed."""
    candidates = [shard.with_suffix(".idx"), _cache_path("wds_index", shard, ".idx")]
    shard_mtime = shard.stat().st_mtime_ns
    for path in candidates:
        if path.is_file() and path.stat().st_mtime_ns >= shard_mtime and _index_version(path) == INDEX_VERSION:
            return path
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            count = build_tar_index(shard, path)
        except OSError as err:
            if path is candidates[-1]:
                raise OSError(f"cannot write an index for {shard}: {err}") from None
            continue  # read-only data folder: use the cache
        log.info("indexed %s: %d samples -> %s", shard, count, path)
        return path
    raise AssertionError("unreachable")


def _parse_index(index_path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Read a v1.2 index: per sample, its (ext, data_offset, size, member_name) components."""
    lines = index_path.read_text().splitlines()
    samples = []
    for line in lines[1:]:
        fields = line.split()
        samples.append([(fields[j], int(fields[j + 1]), int(fields[j + 2]), fields[j + 3])
                        for j in range(0, len(fields) - 3, 4)])
    return samples


def _open_shards(shards: list[Path]) -> TarSource:
    names, shard_of, offsets, sizes, lines = [], [], [], [], []
    index_paths = []
    no_image = 0
    lost = []
    for s, shard in enumerate(shards):
        damage = shard_damage(shard)
        if damage:
            lost.append(damage)
        index_path = tar_index(shard)
        index_paths.append(index_path)
        for line, components in enumerate(_parse_index(index_path)):
            image = next((c for c in components if ("." + c[0].rsplit(".", 1)[-1]).lower() in IMAGE_EXTENSIONS), None)
            if image is None:
                no_image += 1
                continue
            ext, offset, size, member = image
            names.append(f"{shard}:{member}")
            shard_of.append(s)
            offsets.append(offset)
            sizes.append(size)
            lines.append(line)
    notes = [f"ignored {no_image} tar sample(s) with no image component"] if no_image else []
    return TarSource(
        names, [-1] * len(names), "webdataset", notes, lost=lost, shards=list(shards), index_paths=index_paths,
        shard_of=np.asarray(shard_of, np.int32), offsets=np.asarray(offsets, np.int64),
        sizes=np.asarray(sizes, np.int64), lines=lines,
    )


# ---- entry point ----

def open_source(path: str | os.PathLike) -> Source:
    """Open a data set; raise DataError (DataNotFound when missing) with one line if it cannot be used."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(text))
        if not shards:
            raise DataNotFound(f"data path {text} matches no files")
        if not all(p.suffix == ".tar" for p in shards):
            raise DataError(f"data path pattern {text} must match only .tar shards (WebDataset)")
        source, where = _open_shards(shards), f"in the {len(shards)} shard(s) matching {text}"
    else:
        path = Path(path)
        if not path.exists():
            raise DataNotFound(
                f"data path {path} does not exist; pass an ImageFolder directory, a file list or .tar shards"
            )
        if path.is_dir():
            entries = list(os.scandir(path))
            shards = sorted(Path(e.path) for e in entries if e.is_file() and e.name.endswith(".tar"))
            if shards and not any(e.is_dir() for e in entries):
                source, where = _open_shards(shards), f"in the {len(shards)} .tar shard(s) under {path}"
            else:
                source = _scan_folder(path)
                where = f"under {path}/<class>/ (expected layout root/<class>/<image>, extensions {', '.join(IMAGE_EXTENSIONS)})"
        elif path.suffix == ".tar":
            source, where = _open_shards([path]), f"in {path}"
        elif _is_image(path.name):
            raise DataError(f"data path {path} is one image file; pass the ImageFolder root above its folder "
                            "(root/<class>/<image>), a file list or .tar shards")
        else:
            source, where = _read_list(path), f"listed in {path}"
    if not len(source):
        lost = f" ({source.lost[0]})" if source.lost else ""
        raise DataError(f"no images found {where}{lost}")
    source.origin = os.path.abspath(text)
    return source


def single_image_source(path: str | os.PathLike) -> Source:
    """A one-sample Source for one image file (what `verify` checks when given a file)."""
    return Source([str(path)], [-1], "file", origin=os.path.abspath(path))


def main(argv: list[str] | None = None) -> int:
    """python -m dataloading.sources SHARD.tar...: build (or refresh) the WebDataset index of each shard."""
    parser = argparse.ArgumentParser(prog="python -m dataloading.sources", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Build (or refresh) the index of each WebDataset .tar shard: "
                                                 "beside it, else under $IMG2VEC_CACHE/wds_index.")
    parser.add_argument("shards", nargs="+", metavar="SHARD.tar", help="uncompressed WebDataset shard(s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = 0
    for shard in map(Path, args.shards):
        if not shard.is_file():
            print(f"error: {shard} is not a file; pass .tar shards", file=sys.stderr)
            return 2
        damage = shard_damage(shard)
        if damage:
            print(f"LOST {escape_name(damage)}")
            status = 1
        tar_index(shard)
    return status


if __name__ == "__main__":
    sys.exit(main())
