"""NVIDIA DALI backend: JPEG decode, RandomResizedCrop, flip and normalize inside a DALI graph.

The graph (one per pipeline, `_augment`): decode -> crop -> resize to S x S (cubic,
antialiased) -> crop_mirror_normalize (ImageNet mean/std, flip, CHW, fp32 or fp16) ->
(B, 3, S, S). On a GPU the decoder runs with device="mixed" (nvJPEG; the hardware JPEG
decoder of A100/H100 takes `hw_decoder_load` of the images) and everything after it on the
GPU, so batches arrive on the device; on a CPU the same graph runs with device_id=None.

Two sources feed it (LoaderSpec.dali_source):

"sampler" (default): Python reads the encoded bytes of this rank's slice of each global
  batch (GlobalBatchSampler, exactly as the torch backend) and draws each crop box with
  `augment_params(seed, epoch, index)`; DALI decodes only that window
  (fn.decoders.image_slice, region-of-interest decode), resizes, flips, normalizes. So the
  samples and boxes are those of the torch backend: world-size invariance and batch-exact
  resume from (epoch, step) hold, and pixels differ from torchvision's only by decoder and
  resampler rounding. Unusable files are skipped as on the torch backend: `check_image` at
  feed time, the next usable file takes the slot. A decode error DALI raises anyway
  (damage in the middle of the data, which a header check cannot see) does not end the
  run: that batch's files are decoded with PIL, those that fail are skipped, those PIL can
  read but DALI cannot are fed re-encoded as BMP, and the batch is re-run on a fresh
  pipeline (a failed DALI pipeline cannot be reused).

"reader": DALI's own readers, fn.readers.file over the file list or fn.readers.webdataset
  over the tar shards, sharded by shard_id=rank / num_shards=world_size with
  random_shuffle (a shuffle buffer of `initial_fill` samples), stick_to_shard=False and
  pad_last_batch=True, and DALI's own random crop (fn.decoders.image_random_crop, same
  scale and ratio ranges) and coin-flip mirror. DALI cannot skip a file it fails to
  decode, so unusable files are removed before the reader sees them: a pre-scan
  (`verify.scan`, check_image on every file, cached per data set) filters `files=` or the
  tar index. What holds: every rank runs the same steps_per_epoch per epoch; within an
  epoch the shards are disjoint and cover every usable file once (drop_last drops at most
  one batch's worth per shard); each epoch is a fresh pipeline seeded by (seed, epoch) over
  the file list permuted by (seed, epoch) (tar shards: the shard order), so resume at
  (epoch, step) is exact, but it replays the epoch's first `step` batches through the
  decoder. What does not: the batches depend on world_size, and they are not the torch
  backend's. A decode error here triggers a full PIL decode of this rank's part of the
  epoch, then the epoch is rebuilt without the failing files and replayed to the step.
"""
from __future__ import annotations

import io
import logging
import math
from collections import deque
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .datasets import IMAGENET_MEAN, IMAGENET_STD, PERMUTATION_STREAM, RATIO, SCALE, augment_params, derive_seed
from .loader import DTYPES, Batch, BaseLoader, GlobalBatchSampler, LoaderSpec
from .sources import DALI_FORMATS, IMAGE_EXTENSIONS, BadImage, Source, TarSource, check_image, decode_rgb, write_filtered_index

log = logging.getLogger("img2vec.data")

_READER = "reader"  # the name DALI's reader gets in the graph


def dali_import_error() -> str | None:
    """None when nvidia.dali imports, else why not (one line)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:  # ImportError, or an OSError from a missing CUDA library
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _to_bmp(data: bytes) -> bytes:
    """Re-encode an image PIL can read (any format, any mode) as an RGB BMP, which every DALI decoder reads."""
    out = io.BytesIO()
    decode_rgb(data).save(out, format="BMP")
    return out.getvalue()


def _seed31(*keys: int) -> int:
    """A DALI seed (non-negative int32) derived from integer keys."""
    return derive_seed(*keys) % (2**31 - 1)


class DaliLoader(BaseLoader):
    """One rank's batches from a DALI pipeline; the same interface as the torch loader."""

    def __init__(self, source: Source, spec: LoaderSpec, device: str) -> None:
        super().__init__()
        from nvidia.dali import Pipeline  # noqa: F401  (fail here, at build time, if DALI cannot load)

        self.source = source
        self.spec = spec
        self.device = device
        self.backend = f"dali-{device}"
        self.device_id = torch.cuda.current_device() if device == "gpu" else None
        self._dtype = DTYPES[spec.dtype]
        self._bad: set[int] = set()  # files found unusable on this rank
        self._transcode: set[int] = set()  # files PIL reads but DALI did not: fed as BMP
        if spec.dali_source == "sampler":
            self.sampler = GlobalBatchSampler(len(source), spec)
            self.steps_per_epoch = self.sampler.steps_per_epoch
        else:
            self._prepare_reader()
        smoke = self._build(self._smoke_graph)  # a pipeline that cannot run here fails now, not mid-run
        smoke.build()
        smoke.run()
        del smoke

    # ---- graph ----

    def _pipeline(self, seed: int):
        from nvidia.dali import Pipeline

        return Pipeline(batch_size=self.spec.micro_batch, num_threads=max(1, self.spec.num_workers),
                        device_id=self.device_id, seed=seed, prefetch_queue_depth=self.spec.prefetch)

    def _build(self, graph, seed: int = 0, *args):
        pipe = self._pipeline(seed)
        with pipe:
            pipe.set_outputs(*graph(*args))
        return pipe

    def _augment(self, encoded, crop=None):
        """Encoded images (B,) -> normalized (B, 3, S, S); crop = (anchor (2,), shape (2,), flip) per sample, or DALI's own draw."""
        from nvidia.dali import fn, types

        S, spec = self.spec.image_size, self.spec
        decode = dict(device="mixed" if self.device == "gpu" else "cpu", output_type=types.RGB,
                      adjust_orientation=False)  # PIL (torch backend) ignores EXIF orientation too
        if self.device == "gpu":
            decode["hw_decoder_load"] = spec.hw_decoder_load
        cubic = dict(interp_type=types.INTERP_CUBIC, antialias=True)  # PIL's bicubic also antialiases when shrinking
        if crop is not None:
            anchor, shape, flip = crop
            images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", normalized_anchor=False,
                                             normalized_shape=False, **decode)  # (h, w, 3), only the window decoded
            images = fn.resize(images, size=[S, S], **cubic)
        elif spec.augment:
            images = fn.decoders.image_random_crop(encoded, random_area=list(SCALE), random_aspect_ratio=list(RATIO),
                                                   num_attempts=10, **decode)
            images = fn.resize(images, size=[S, S], **cubic)
            flip = fn.random.coin_flip(probability=0.5)
        else:  # the central square, as augment_params(augment=False) gives the torch backend
            from nvidia.dali import math as dmath

            shape = fn.peek_image_shape(encoded, adjust_orientation=False)  # (H, W, C) from the header
            side = fn.cast(dmath.min(shape[0], shape[1]), dtype=types.FLOAT)
            images = fn.decoders.image_crop(encoded, crop_h=side, crop_w=side, rounding="truncate", **decode)
            images = fn.resize(images, size=[S, S], **cubic)
            flip = 0
        return fn.crop_mirror_normalize(
            images, mirror=flip, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
            dtype=types.FLOAT if self._dtype == torch.float32 else types.FLOAT16,
        )  # (B, 3, S, S)

    def _smoke_graph(self):
        """The decode graph on one constant encoded image, to check at build time that DALI runs here."""
        from nvidia.dali import fn, types

        blank = io.BytesIO()
        Image.new("RGB", (8, 8)).save(blank, format="JPEG")
        encoded = fn.constant(idata=list(blank.getvalue()), dtype=types.UINT8)
        return (self._augment(encoded),)

    def _to_torch(self, pipe, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        tensor = output.as_tensor()
        if self.device == "gpu":
            with torch.cuda.device(self.device_id):
                images = to_torch_tensor(tensor, copy=not pipe.exec_dynamic)
        else:
            images = to_torch_tensor(tensor, copy=not pipe.exec_dynamic)
        return images if images.dtype == self._dtype else images.to(self._dtype)

    # ---- source "sampler": our batches, our boxes ----

    def _usable(self, index: int, skipped: list) -> tuple[int, bytes, int, int]:
        """(file index, bytes, height, width) of sample `index`, or of the next usable file after it."""
        n = len(self.source)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                data = self.source.read(i)
                fmt, height, width = check_image(data)
                if fmt not in DALI_FORMATS or i in self._transcode:
                    data = _to_bmp(data)
                return i, data, height, width
            except (BadImage, OSError) as err:
                self._bad.add(i)
                skipped.append((self.source.names[i], str(err)))
        raise RuntimeError(f"none of the {n} images could be decoded; run python -m dataloading.verify")

    def _feed(self, epoch: int, start_step: int, fed: deque) -> Iterator[tuple[list, ...]]:
        """Per step: encoded bytes, crop anchors (top, left), shapes (h, w) and flips of this rank's batch."""
        sampler = GlobalBatchSampler(len(self.source), self.spec)
        sampler.epoch, sampler.start_step = epoch, start_step
        for indices in sampler:
            encoded, anchors, shapes, flips, files, skipped = [], [], [], [], [], []
            for index in indices:
                i, data, height, width = self._usable(index, skipped)
                # Seeded by the requested index, so a substitute gets the box the missing sample would have had.
                top, left, h, w, flip = augment_params(height, width, self.spec.seed, epoch, index, self.spec.augment)
                encoded.append(np.frombuffer(data, np.uint8))
                anchors.append(np.array([top, left], np.int32))
                shapes.append(np.array([h, w], np.int32))
                flips.append(np.array(flip, np.int32))
                files.append(i)
            self._skips.add(skipped)
            fed.append(files)
            yield encoded, anchors, shapes, flips

    def _sampler_graph(self, feed):
        from nvidia.dali import fn

        encoded, anchor, shape, flip = fn.external_source(source=feed, num_outputs=4)
        return (self._augment(encoded, (anchor, shape, flip)),)

    def _iter_sampler(self, epoch: int, step: int) -> Iterator[Batch]:
        while step < self.steps_per_epoch:
            fed: deque = deque()  # file indices of each batch fed, oldest first: outputs come back in order
            pipe = self._build(self._sampler_graph, 0, self._feed(epoch, step, fed))
            try:
                pipe.build()
                while step < self.steps_per_epoch:
                    (images,) = pipe.run()
                    yield {"images": self._to_torch(pipe, images), "index": torch.tensor(fed.popleft(), dtype=torch.long)}
                    step += 1
            except RuntimeError as err:
                if "none of the" in str(err) or not _is_dali_error(err):
                    raise
                self._recover_batch(epoch, step, err)  # then rebuild at the same step
            finally:
                del pipe

    def _recover_batch(self, epoch: int, step: int, err: Exception) -> None:
        """DALI failed on batch `step`: PIL-decode its files, skip those that fail, re-encode the rest."""
        skipped: list = []
        files = [self._usable(index, skipped)[0] for index in self._batch_indices(epoch, step)]
        for i in files:
            try:
                decode_rgb(self.source.read(i))
            except (BadImage, OSError) as bad:
                self._bad.add(i)
                skipped.append((self.source.names[i], f"{bad} (DALI: decode error)"))
        self._skips.add(skipped)
        if skipped:
            return
        new = set(files) - self._transcode
        if not new:
            raise RuntimeError(f"DALI failed on step {step} of epoch {epoch} even with its files re-encoded by PIL: "
                               f"{_first_line(err)}; use data_backend=torch")
        log.warning("DALI could not decode one of %d files that PIL reads (step %d, e.g. %s); feeding them "
                    "re-encoded as BMP", len(new), step, self.source.names[min(new)])
        self._transcode |= new

    def _batch_indices(self, epoch: int, step: int) -> list[int]:
        sampler = GlobalBatchSampler(len(self.source), self.spec)
        sampler.epoch, sampler.start_step = epoch, step
        return next(iter(sampler))

    # ---- source "reader": DALI's readers, sharding and random crop ----

    def _prepare_reader(self) -> None:
        """Pre-scan (cached), keep the usable files, size the epoch; tar shards get filtered indexes."""
        from .verify import scan

        bad = scan(self.source, workers=max(1, self.spec.num_workers), dali_formats_only=True)
        self._skips.add([(self.source.names[i], reason) for i, reason in sorted(bad.items())])
        self._bad = set(bad)
        self._set_usable()
        G = self.spec.micro_batch * self.spec.world_size
        divide = math.floor if self.spec.drop_last else math.ceil
        self.steps_per_epoch = divide(len(self._usable_files) / G)
        if self.steps_per_epoch == 0:
            raise ValueError(f"only {len(self._usable_files)} of {len(self.source)} files are usable, fewer than "
                             f"one global batch ({G}); use a smaller micro_batch or more images")

    def _set_usable(self) -> None:
        self._usable_files = np.array([i for i in range(len(self.source)) if i not in self._bad], np.int64)
        if isinstance(self.source, TarSource):
            self._tar_indexes = [write_filtered_index(self.source, s, files)
                                 for s, files in enumerate(self._usable_by_shard())]
            self._shard_ids = {str(path): s for s, path in enumerate(self.source.shards)}

    def _usable_by_shard(self) -> list[np.ndarray]:
        """The usable sample indices of each tar shard."""
        bounds = np.searchsorted(self.source.shard_of[self._usable_files], np.arange(len(self.source.shards) + 1))
        return [self._usable_files[bounds[s] : bounds[s + 1]] for s in range(len(self.source.shards))]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The usable files (tar shards: the shards) in this epoch's order: a permutation seeded by (seed, epoch)."""
        items = len(self.source.shards) if isinstance(self.source, TarSource) else len(self._usable_files)
        if not self.spec.shuffle:
            return np.arange(items)
        generator = torch.Generator().manual_seed(derive_seed(PERMUTATION_STREAM, self.spec.seed, epoch))
        return torch.randperm(items, generator=generator).numpy()

    def _reader_graph(self, epoch: int):
        from nvidia.dali import fn

        spec, order = self.spec, self._epoch_order(epoch)
        shard_size = max(1, len(self._usable_files) // spec.world_size)
        common = dict(shard_id=spec.rank, num_shards=spec.world_size, random_shuffle=spec.shuffle,
                      initial_fill=min(1024, shard_size), stick_to_shard=False, pad_last_batch=True,
                      seed=_seed31(PERMUTATION_STREAM, spec.seed, epoch, 1), name=_READER)
        if isinstance(self.source, TarSource):
            encoded = fn.readers.webdataset(
                paths=[str(self.source.shards[s]) for s in order], index_paths=[str(self._tar_indexes[s]) for s in order],
                ext=[";".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)], case_sensitive_extensions=False,
                missing_component_behavior="skip", **common)
            index = fn.get_property(encoded, key="source_info")  # "shard.tar:offset:member" per sample
        else:
            files = self._usable_files[order]
            encoded, index = fn.readers.file(files=[self.source.names[i] for i in files], labels=files.tolist(), **common)
        return self._augment(encoded), index

    def _index_of(self, index_output) -> torch.Tensor:
        """The reader's per-sample index output -> file indices (B,): labels, or tar 'shard:offset:member'."""
        if not isinstance(self.source, TarSource):
            return torch.from_numpy(np.array(index_output.as_tensor()).reshape(-1).astype(np.int64))
        infos = [bytes(np.array(index_output[k])).decode().rsplit(":", 2) for k in range(len(index_output))]
        return torch.tensor([self.source.index_at(self._shard_ids[shard], int(offset)) for shard, offset, _ in infos],
                            dtype=torch.long)

    def _iter_reader(self, epoch: int, step: int) -> Iterator[Batch]:
        done = 0  # batches of this epoch already run through the pipeline
        while done < self.steps_per_epoch:
            pipe = self._build(self._reader_graph, _seed31(self.spec.seed, epoch, self.spec.rank), epoch)
            try:
                pipe.build()
                for _ in range(done):  # replay to the resume point: the reader and the RNGs advance with it
                    pipe.run()
                while done < self.steps_per_epoch:
                    images, index = pipe.run()
                    done += 1
                    if done > step:
                        yield {"images": self._to_torch(pipe, images), "index": self._index_of(index)}
            except RuntimeError as err:
                if not _is_dali_error(err):
                    raise
                self._recover_reader(epoch, done, err)
            finally:
                del pipe
            step = max(step, done)

    def _epoch_files(self, epoch: int) -> np.ndarray:
        """The usable files in the order the reader of `epoch` lists them (before sharding and shuffling)."""
        order = self._epoch_order(epoch)
        if not isinstance(self.source, TarSource):
            return self._usable_files[order]
        by_shard = self._usable_by_shard()
        return np.concatenate([by_shard[s] for s in order])

    def _recover_reader(self, epoch: int, step: int, err: Exception) -> None:
        """DALI failed mid-epoch: fully decode this rank's shard of the epoch, drop what fails, rebuild."""
        from .verify import scan

        files, rank, world = self._epoch_files(epoch), self.spec.rank, self.spec.world_size
        mine = files[len(files) * rank // world : len(files) * (rank + 1) // world]  # DALI's shard bounds
        log.warning("DALI failed at step %d of epoch %d (%s); decoding this rank's %d files with PIL to find the cause",
                    step, epoch, _first_line(err), len(mine))
        bad = scan(self.source, full=True, indices=mine.tolist(), workers=max(1, self.spec.num_workers), use_cache=False)
        if not bad:
            raise RuntimeError(f"DALI failed at step {step} of epoch {epoch} on a file PIL decodes: {_first_line(err)}; "
                               "use dali_source=sampler (it re-encodes such files) or data_backend=torch")
        self._skips.add([(self.source.names[i], f"{reason} (DALI: decode error)") for i, reason in sorted(bad.items())])
        self._bad |= set(bad)
        self._set_usable()

    # ---- interface ----

    def iter_from(self, epoch: int, step_in_epoch: int) -> Iterator[Batch]:
        """Yield batches step_in_epoch .. steps_per_epoch-1 of `epoch` (see the module docstring for how exact)."""
        self._check_step(step_in_epoch)
        self.set_epoch(epoch)
        if self.spec.dali_source == "sampler":
            return self._iter_sampler(epoch, step_in_epoch)
        return self._iter_reader(epoch, step_in_epoch)


def _is_dali_error(err: Exception) -> bool:
    return "Critical error in pipeline" in str(err) or "pipeline object is no longer valid" in str(err)


def _first_line(err: Exception) -> str:
    """The informative line of a DALI error: the first one after 'encountered:', else the last one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = [line for k, line in enumerate(lines) if k and lines[k - 1].endswith("encountered:")]
    return (after or lines or [type(err).__name__])[0 if after else -1]
