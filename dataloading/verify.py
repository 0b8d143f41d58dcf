"""Find the files of a data set that training would skip, and say why.

    python -m dataloading.verify PATH [--full] [--workers N] [--max_image_pixels N]

PATH is anything `build_loader` accepts (ImageFolder tree, file list, .tar shards), or one
image file. Prints one line per unusable file ('SKIP name: reason'), 'LOST' lines for data
that cannot even be listed (a .tar shard cut short), 'NOTE' lines for what the listing left
out (files without an image extension, empty class folders, tar samples without an image,
directory links already listed), and a summary. Names are printed escaped (a newline in a
file name shows as \\n), so every line is one record.
Exit status: 0 when every file is usable, 1 when some would be skipped or data was lost,
2 when the data set cannot be opened at all (missing path, no images).

The default check is `check_image` (header + end marker + size cap, ~60 us a file, what
every backend runs before decoding); --full also decodes every file with PIL (~10x slower)
and, for JPEGs, with libjpeg through torchvision, whose "Corrupt JPEG data" warnings reveal
damage in the middle of the entropy-coded data that PIL decodes without a word.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from .sources import (DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, BadImage, DataError, Source, TarSource, check_image, decode_rgb,
                      escape_name, open_source, single_image_source)

_PARALLEL_MIN = 4096  # below this many files a process pool costs more than it saves
_CHUNK = 512


class _Stderr:
    """Collects what C code writes to file descriptor 2 (libjpeg prints its warnings there)."""

    def __enter__(self) -> _Stderr:
        self._sink = tempfile.TemporaryFile()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._sink.fileno(), 2)
        return self

    def text(self) -> str:
        """What was written since the last call."""
        self._sink.seek(0)
        out = self._sink.read().decode(errors="replace")
        self._sink.seek(0)
        self._sink.truncate()
        return out

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._sink.close()


def _jpeg_damage(data: bytes, stderr: _Stderr) -> str | None:
    """libjpeg's complaint about a JPEG's entropy-coded data, or None (also None when torchvision is missing)."""
    try:
        import torch
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for its image codecs
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError as err:
        return f"decode failed (libjpeg: {str(err).strip().splitlines()[-1]})"
    corrupt = [line.strip() for line in stderr.text().splitlines() if "Corrupt JPEG data" in line]
    return f"damaged JPEG data (libjpeg: {corrupt[0]})" if corrupt else None


def _check(data: bytes, full: bool, max_image_pixels: int, stderr: _Stderr | None) -> str | None:
    """The reason `data` is unusable, or None."""
    try:
        fmt, _, _ = check_image(data, max_image_pixels)
        if full:
            decode_rgb(data)
            if fmt == "JPEG" and stderr is not None:
                return _jpeg_damage(data, stderr)
    except BadImage as err:
        return str(err)
    return None


def _read(where: tuple) -> bytes:
    if len(where) == 1:
        with open(where[0], "rb") as f:
            return f.read()
    path, offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _check_chunk(chunk: list[tuple[int, tuple]], full: bool, max_image_pixels: int) -> list[tuple[int, str]]:
    """Check (index, where) pairs (in a worker process for big data sets); return the (index, reason) of unusable ones."""
    bad = []
    with _Stderr() if full else contextlib.nullcontext() as stderr:
        for index, where in chunk:
            try:
                reason = _check(_read(where), full, max_image_pixels, stderr)
            except OSError as err:
                reason = f"cannot read ({err})"
            if reason:
                bad.append((index, reason))
    return bad


def _where(source: Source, index: int) -> tuple:
    """How a worker process reads sample `index` without the whole Source: (path,) or (shard, offset, size)."""
    if isinstance(source, TarSource):
        return str(source.shards[source.shard_of[index]]), int(source.offsets[index]), int(source.sizes[index])
    return (source.names[index],)


def scan(source: Source, full: bool = False, indices: list[int] | None = None, workers: int = 1,
         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[int, str]:
    """{index: reason} of the unusable samples among `indices` (default: all); full: decode every file too."""
    indices = list(range(len(source))) if indices is None else indices
    work = [(i, _where(source, i)) for i in indices]
    bad: dict[int, str] = {}
    if workers > 1 and len(work) >= _PARALLEL_MIN:
        chunks = [work[k : k + _CHUNK] for k in range(0, len(work), _CHUNK)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for found in pool.map(_check_chunk, chunks, [full] * len(chunks), [max_image_pixels] * len(chunks)):
                bad.update(found)
    else:
        bad.update(_check_chunk(work, full, max_image_pixels))
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloading.verify", description=__doc__.split("\n")[0],
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data_path", metavar="PATH",
                        help="ImageFolder root, file list, .tar shard(s) (a glob in quotes), a folder of shards, "
                             "or one image file")
    parser.add_argument("--full", action="store_true", help="also decode every file (slower, finds damage mid-file)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for big data sets")
    parser.add_argument("--max_image_pixels", "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="images with more pixels are skipped (the loader's setting of the same name); 0: no cap")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_image_pixels < 0:
        parser.error("--workers must be >= 1 and --max_image_pixels >= 0")
    try:
        if os.path.isfile(args.data_path) and args.data_path.lower().endswith(IMAGE_EXTENSIONS):
            source = single_image_source(args.data_path)
        else:
            source = open_source(args.data_path)
    except (OSError, DataError) as err:
        print(f"error: {escape_name(str(err))}", file=sys.stderr)
        return 2
    for note in source.notes:
        print(f"NOTE {escape_name(note)}")
    for lost in source.lost:
        print(f"LOST {escape_name(lost)}")
    start = time.perf_counter()
    bad = scan(source, full=args.full, workers=args.workers, max_image_pixels=args.max_image_pixels)
    elapsed = time.perf_counter() - start
    for i in sorted(bad):
        print(f"SKIP {escape_name(source.names[i])}: {escape_name(bad[i])}")
    how = "full decode" if args.full else "header + end-marker check"
    lost = f"; {len(source.lost)} damaged shard(s) lost data" if source.lost else ""
    print(f"{len(bad)} of {len(source)} files would be skipped ({how}, {len(source) / max(elapsed, 1e-9):.0f} "
          f"files/s){lost}")
    return 1 if bad or source.lost else 0


if __name__ == "__main__":
    sys.exit(main())
