"""NVIDIA DALI backend: JPEG decode, RandomResizedCrop, flip and normalize inside a DALI graph.

The graph (one per pipeline, `_augment`): decode -> crop -> resize to S x S (cubic,
antialiased) -> crop_mirror_normalize (ImageNet mean/std, flip, CHW, fp32 or fp16) ->
(B, 3, S, S). On a GPU the decoder runs with device="mixed" (nvJPEG; the hardware JPEG
decoder of A100/H100 takes `hw_decoder_load` of the images) and everything after it on the
GPU, so batches arrive on the device; on a CPU the same graph runs with device_id=None.

Python feeds it: it reads the encoded bytes of this rank's slice of each global batch
(GlobalBatchSampler, exactly as the torch backend) and draws each crop box with
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

DALI's own readers (fn.readers.file / webdataset with their shuffling) were measured on the
DALI CPU pipeline at 0.94-0.97x this source's images/s on the sample set, and they give up
world-size invariance, so they are not offered.
"""
from __future__ import annotations

import io
import logging
from collections import deque
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .base import DTYPES, Batch, BaseLoader, GlobalBatchSampler, LoaderSpec
from .datasets import IMAGENET_MEAN, IMAGENET_STD, augment_params
from .sources import DALI_FORMATS, BadImage, DataError, Source, check_image, decode_rgb

log = logging.getLogger("img2vec.data")


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
        self.sampler = GlobalBatchSampler(len(source), spec)
        self.steps_per_epoch = self.sampler.steps_per_epoch
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

    def _augment(self, encoded, anchor, shape, flip):
        """Encoded images (B,) and per-sample crop (anchor (2,) top-left, shape (2,) h-w, flip ()) -> (B, 3, S, S)."""
        from nvidia.dali import fn, types

        S, spec = self.spec.image_size, self.spec
        decode = dict(device="mixed" if self.device == "gpu" else "cpu", output_type=types.RGB,
                      adjust_orientation=False)  # PIL (torch backend) ignores EXIF orientation too
        if self.device == "gpu":
            decode["hw_decoder_load"] = spec.hw_decoder_load
        images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", normalized_anchor=False,
                                         normalized_shape=False, **decode)  # (h, w, 3), only the window decoded
        # PIL's bicubic (torch backend) also antialiases when shrinking.
        images = fn.resize(images, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)  # (S, S, 3)
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
        anchor = fn.constant(idata=[0, 0], dtype=types.INT32)
        shape = fn.constant(idata=[8, 8], dtype=types.INT32)
        return (self._augment(encoded, anchor, shape, fn.constant(idata=0, dtype=types.INT32)),)

    def _to_torch(self, pipe, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        tensor = output.as_tensor()
        if self.device == "gpu":
            with torch.cuda.device(self.device_id):
                images = to_torch_tensor(tensor, copy=not pipe.exec_dynamic)
        else:
            images = to_torch_tensor(tensor, copy=not pipe.exec_dynamic)
        return images if images.dtype == self._dtype else images.to(self._dtype)

    # ---- feeding: our batches, our boxes ----

    def _usable(self, index: int, skipped: list) -> tuple[int, bytes, int, int]:
        """(file index, bytes, height, width) of sample `index`, or of the next usable file after it."""
        n = len(self.source)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                data = self.source.read(i)
                fmt, height, width = check_image(data, self.spec.max_image_pixels)
                if fmt not in DALI_FORMATS or i in self._transcode:
                    data = _to_bmp(data)
                return i, data, height, width
            except (BadImage, OSError) as err:
                self._bad.add(i)
                skipped.append((self.source.names[i], str(err)))
        raise DataError(f"none of the {n} images could be decoded; run python -m dataloading.verify --full on the data")

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
        return (self._augment(encoded, anchor, shape, flip),)

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
                if not _is_dali_error(err):
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

    # ---- interface ----

    def iter_from(self, epoch: int, step_in_epoch: int) -> Iterator[Batch]:
        """Yield batches step_in_epoch .. steps_per_epoch-1 of `epoch` identical to a full pass's tail."""
        self._check_step(step_in_epoch)
        self.set_epoch(epoch)
        return self._iter_sampler(epoch, step_in_epoch)


def _is_dali_error(err: Exception) -> bool:
    return "Critical error in pipeline" in str(err) or "pipeline object is no longer valid" in str(err)


def _first_line(err: Exception) -> str:
    """The informative line of a DALI error: the first one after 'encountered:', else the last one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = [line for k, line in enumerate(lines) if k and lines[k - 1].endswith("encountered:")]
    return (after or lines or [type(err).__name__])[0 if after else -1]
