"""Find the files of a data set that training would skip, and say why.

    python -m dataloading.verify PATH [--full] [--workers N] [--no-cache]

PATH is anything `build_loader` accepts (ImageFolder tree, file list, .tar shards). Prints
one line per unusable file ('SKIP name: reason'), 'NOTE' lines for what the listing left out
(files without an image extension, empty class folders, tar samples without an image) and
for images only DALI's own reader would skip (formats its decoders lack, e.g. a GIF named
.jpg), and a summary.
Exit status: 0 when every file is usable, 1 when some would be skipped, 2 when the data set
cannot be opened at all (missing path, no images).

The default check is `check_image` (header + end marker, ~60 us a file, what every
backend runs before decoding); --full decodes every file with PIL (~10x slower) and also
finds damage in the middle of the data. `scan()` is the same check as a function; the DALI
"reader" source runs it at build time to filter the files it hands to DALI. Quick scans
are cached per data set under $IMG2VEC_CACHE/scans/ and redone only for files whose size
or modification time changed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from .sources import DALI_FORMATS, BadImage, Source, TarSource, _cache_root, check_image, decode_rgb, open_source

log = logging.getLogger("img2vec.data")

_CACHE_VERSION = 1
_PARALLEL_MIN = 4096  # below this many files a process pool costs more than it saves
_CHUNK = 512


DALI_UNREADABLE = "DALI's decoders cannot read it"  # ends the reason of a usable file DALI cannot decode


def _check(data: bytes, full: bool) -> str | None:
    """The reason `data` is unusable (or, ending in DALI_UNREADABLE, unusable by DALI only), or None."""
    try:
        fmt, _, _ = check_image(data)
        if full:
            decode_rgb(data)
    except BadImage as err:
        return str(err)
    return None if fmt in DALI_FORMATS else f"{fmt} data: {DALI_UNREADABLE}"


def _read(where: tuple) -> bytes:
    if len(where) == 1:
        with open(where[0], "rb") as f:
            return f.read()
    path, offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _check_chunk(chunk: list[tuple[int, tuple]], full: bool) -> list[tuple[int, str]]:
    """Check (index, where) pairs in a worker process; return the (index, reason) of unusable ones."""
    bad = []
    for index, where in chunk:
        try:
            reason = _check(_read(where), full)
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


def _unit(source: Source, index: int) -> tuple[str, str]:
    """(file on disk, member inside it): what a cache entry's size and mtime belong to."""
    if isinstance(source, TarSource):
        return str(source.shards[source.shard_of[index]]), source.names[index]
    return source.names[index], ""


def _cache_file(source: Source) -> str:
    key = hashlib.sha1(source.origin.encode()).hexdigest()[:16]
    return str(_cache_root() / "scans" / f"{os.path.basename(source.origin.rstrip('/')) or 'data'}-{key}.json")


def scan(
    source: Source,
    full: bool = False,
    indices: list[int] | None = None,
    workers: int = 1,
    use_cache: bool = True,
    dali_formats_only: bool = False,
) -> dict[int, str]:
    """{index: reason} of the unusable samples among `indices` (default: all).

    full: PIL-decode every file instead of the header check. dali_formats_only: also reject
    formats DALI cannot decode (GIF named .jpg, ...). The cache covers quick scans of the
    whole data set only.
    """
    indices = list(range(len(source))) if indices is None else indices
    cached = use_cache and not full and len(indices) == len(source) and bool(source.origin)
    signatures: dict[str, list[int]] = {}
    entries: dict[str, list] = {}
    todo = indices
    bad: dict[int, str] = {}
    if cached:
        path = _cache_file(source)
        try:
            with open(path) as f:
                stored = json.load(f)
            entries = stored["units"] if stored.get("version") == _CACHE_VERSION else {}
        except (OSError, ValueError, KeyError):
            entries = {}
        todo = []
        for i in indices:
            unit, member = _unit(source, i)
            if unit not in signatures:
                try:
                    st = os.stat(unit)
                    signatures[unit] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    signatures[unit] = [-1, -1]
            entry = entries.get(unit)
            if entry is not None and entry[:2] == signatures[unit]:
                if member in entry[2]:
                    bad[i] = entry[2][member]
            else:
                todo.append(i)
    work = [(i, _where(source, i)) for i in todo]
    if workers > 1 and len(work) >= _PARALLEL_MIN:
        chunks = [work[k : k + _CHUNK] for k in range(0, len(work), _CHUNK)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for found in pool.map(_check_chunk, chunks, [full] * len(chunks)):
                bad.update(found)
    else:
        bad.update(_check_chunk(work, full))
    if cached and todo:
        for i in todo:
            unit, member = _unit(source, i)
            if entries.get(unit, [None, None])[:2] != signatures[unit]:
                entries[unit] = [*signatures[unit], {}]
            if i in bad:
                entries[unit][2][member] = bad[i]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": _CACHE_VERSION, "origin": source.origin, "units": entries}, f)
        os.replace(tmp, path)
    if not dali_formats_only:
        bad = {i: reason for i, reason in bad.items() if not reason.endswith(DALI_UNREADABLE)}
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataloading.verify", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="ImageFolder root, file list, .tar shard(s) (a glob in quotes) or a folder of shards")
    parser.add_argument("--full", action="store_true", help="decode every file with PIL (slower, finds more)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for big data sets")
    parser.add_argument("--no-cache", action="store_true", help="ignore and do not write the scan cache")
    args = parser.parse_args(argv)
    try:
        source = open_source(args.path)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in source.notes:
        print(f"NOTE {note}")
    start = time.perf_counter()
    found = scan(source, full=args.full, workers=args.workers, use_cache=not args.no_cache, dali_formats_only=True)
    elapsed = time.perf_counter() - start
    bad = {i: reason for i, reason in found.items() if not reason.endswith(DALI_UNREADABLE)}
    for i in sorted(found):
        if i not in bad:
            print(f"NOTE {source.names[i]}: {found[i]} (used by data_backend=torch and dali_source=sampler, "
                  "skipped by dali_source=reader)")
    for i in sorted(bad):
        print(f"SKIP {source.names[i]}: {bad[i]}")
    how = "full PIL decode" if args.full else "header + end-marker check"
    print(f"{len(bad)} of {len(source)} files would be skipped ({how}, {len(source) / max(elapsed, 1e-9):.0f} files/s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
