"""Where encoded images come from, and which of them can be used.

`open_source(path)` accepts an ImageFolder tree (root/<class>/<image>), a text file list
('path [label]' per line), or WebDataset tar shards (one .tar, a glob like
'shards/train-*.tar', or a directory holding only .tar files). Every kind answers the same
three questions for sample i: `names[i]` (a path, or 'shard.tar:member' inside a tar, for
logs), `labels[i]` (-1 when unknown) and `read(i)` (the encoded bytes).

`check_image(data)` is the cheap test every backend runs before decoding: it parses the
header (format and size) and looks for the end marker of JPEG and PNG files, so zero-byte,
random-bytes and truncated files are skipped the same way whichever decoder runs. It reads
the header only: a file whose entropy-coded data is damaged in the middle passes it and is
caught by the decoder (see datasets.py and dali.py).

Tar shards need an index (byte offset and size of every member) for random access. It is
written in DALI's own format ('v1.2', as `wds2idx` writes), so `fn.readers.webdataset` reads
the same file: `tar_index(shard)` builds it next to the shard (or under the cache directory
when the shard's folder is read-only) if it is missing or older than the shard.
`python -m dataloading.sources SHARD...` builds indexes ahead of time.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("img2vec.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# PIL format names of what DALI's decoders read (PPM covers PNM/PGM/PBM).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (tools/wds2idx.py)


class BadImage(ValueError):
    """An image that no backend will use; str(err) is the reason shown in logs and by verify."""


# ---- checking encoded bytes ----

def check_image(data: bytes) -> tuple[str, int, int]:
    """Return (format, height, width) of an image that looks complete; raise BadImage otherwise.

    Costs a header parse plus a backward search for the end marker (~20-50 us), not a decode.
    """
    if not data:
        raise BadImage("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise BadImage("not an image (no format PIL recognises)") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error, ...
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from None
    if width < 1 or height < 1:
        raise BadImage(f"{fmt} header says {width}x{height} pixels")
    if fmt == "JPEG" and not data[-64:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):  # fast path: ends in EOI
        # Entropy-coded data cannot hold the bytes FF D9 (a data FF is always followed by 00),
        # so a complete file has an end-of-image marker after its last start-of-scan marker.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise BadImage("truncated JPEG (no end-of-image marker after the last scan)")
    elif fmt == "PNG" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        raise BadImage("truncated PNG (no IEND chunk at the end)")
    return fmt, height, width


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode `data` with PIL and convert any mode (L, CMYK, RGBA, P, I;16, ...) to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        raise BadImage(f"decode failed ({type(err).__name__}: {err})") from None


# ---- the three kinds of data set ----

@dataclass
class Source:
    """A data set: sample i has a display name, a label (-1 if none), and encoded bytes."""

    names: list[str]
    labels: list[int]
    kind: str  # "folder" | "list" | "webdataset"
    notes: list[str] = field(default_factory=list)  # what was left out while listing, for the log
    origin: str = ""  # the data path it was opened from (keys the scan cache)

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
    """List images under root/<class>/ (any depth below the class folder), sorted; label = class order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    names: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        before = len(names)
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()  # os.walk order is file-system dependent; sorting makes indices stable
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
    return Source(names, labels, "folder", notes)


def _read_list(list_file: Path) -> Source:
    """Read 'path [label]' lines; relative paths are resolved against the list file's folder."""
    names: list[str] = []
    labels: list[int] = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise ValueError(
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


def build_tar_index(shard: Path, index_path: Path) -> int:
    """Write DALI's v1.2 index of `shard` to `index_path`; return the number of samples.

    One line per sample (consecutive regular members sharing a key), each component as
    'ext data_offset size member_name'. Reads tar headers only (tarfile seeks over data).
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, as random access needs
        for member in tar:
            if not member.isreg():
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
    for s, shard in enumerate(shards):
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
        names, [-1] * len(names), "webdataset", notes, shards=list(shards), index_paths=index_paths,
        shard_of=np.asarray(shard_of, np.int32), offsets=np.asarray(offsets, np.int64),
        sizes=np.asarray(sizes, np.int64), lines=lines,
    )


def write_filtered_index(source: TarSource, shard: int, keep: np.ndarray) -> Path:
    """A copy of shard `shard`'s index holding only the samples in `keep`, for fn.readers.webdataset.

    Named by a hash of its content under the cache dir, written atomically, so ranks that
    filter alike share one file and never read a half-written one.
    """
    lines = source.index_paths[shard].read_text().splitlines()[1:]
    kept = [lines[source.lines[i]] for i in keep.tolist()]  # keep: sample indices of this shard
    text = f"{INDEX_VERSION} {len(kept)}\n" + "".join(line + "\n" for line in kept)
    path = _cache_path("wds_index_filtered", source.shards[shard], f"-{hashlib.sha1(text.encode()).hexdigest()[:12]}.idx")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


# ---- entry point ----

def open_source(path: str | os.PathLike) -> Source:
    """Open a data set; raise FileNotFoundError/ValueError with one line if it is missing or empty."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(text))
        if not shards:
            raise FileNotFoundError(f"data path {text} matches no files")
        if not all(p.suffix == ".tar" for p in shards):
            raise ValueError(f"data path pattern {text} must match only .tar shards (WebDataset)")
        source, where = _open_shards(shards), f"in the {len(shards)} shard(s) matching {text}"
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
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
        else:
            source, where = _read_list(path), f"listed in {path}"
    if not len(source):
        raise ValueError(f"no images found {where}")
    source.origin = os.path.abspath(text)
    return source


def main(argv: list[str] | None = None) -> int:
    """python -m dataloading.sources SHARD.tar...: build (or refresh) the WebDataset index of each shard."""
    shards = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not shards:
        print("usage: python -m dataloading.sources SHARD.tar [SHARD.tar ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for shard in shards:
        tar_index(shard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
