"""The deblur worker: a batch of frames in, deblurred samples + per-frame statistics out (no Ray here).

Frames are encoded and classified one at a time (sizes differ), then the patches of *all* frames in
the batch are pooled and decoded together: `AdaRevD.decode` sorts the pool by exit depth so column j
runs once, on every patch (of any frame) that needs it. Then each frame is stitched, quantised and
encoded back into its sample. The result for a frame equals `model.restore` on it (up to float
rounding from the batch size), and depends only on the batch it came in, so a fixed batching gives
fixed bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adarevd import AdaRevD
from adarevd.errors import InvalidInput
from adarevd.metrics import tone_shift
from adarevd.speed import compile_for_inference, precision_for
from adarevd.tiling import PatchGrid
from pipeline.deblur.depth_pools import DepthGroup, EncodedBatch, EncodedFrame, GroupPart
from pipeline.deblur.job import RestoreOptions
from pipeline.deblur.scores import blur_score, seam_score
from pipeline.formats.frames import FrameIn, FrameOut, PatchMap, Rejected, encode_output
from pipeline.formats.shards import Sample


@dataclass
class _Encoded:
    frame: FrameIn
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    grid: PatchGrid
    features: list[torch.Tensor]  # per level (P, C, k, k)
    depths: torch.Tensor  # (P,)
    encode_ms: float
    notes: tuple[str, ...] = ()
    residual: torch.Tensor | None = None
    decode_ms: float = 0.0


class FrameRestorer:
    """Holds one model; `restorer(frames)` deblurs a batch of frames."""

    def __init__(self, model: AdaRevD, options: RestoreOptions | None = None, device: str = "cpu") -> None:
        options = options or RestoreOptions()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision_for(options.precision, self.device)
        if options.compile == "on":
            compile_for_inference(self.model)
        self.options = options

    @property
    def num_columns(self) -> int:
        return self.model.num_columns

    @torch.no_grad()
    def __call__(self, frames: Sequence[FrameIn]) -> list[FrameOut | Rejected]:
        encoded, results = self._encode_all(frames)
        self._decode_all(encoded, results)
        self._finish_all(encoded, results)
        return [results[f.key] for f in frames]

    @torch.no_grad()
    def restore_images(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """(H, W, 3) uint8 RGB arrays of any sizes -> (the deblurred array, its mean exit depth) each,
        the same pixels `__call__` writes into samples. A frame that fails raises, naming its index."""
        frames = [FrameIn(str(i), "png", image, Sample(str(i), {})) for i, image in enumerate(images)]
        encoded, results = self._encode_all(frames)
        self._decode_all(encoded, results)
        for key, result in results.items():
            assert isinstance(result, Rejected)
            raise InvalidInput(f"image {key} of the batch: {result.reason}")
        return [(self._rgb(item), float(item.depths.float().mean())) for item in encoded]

    def _decode_all(self, encoded: list[_Encoded], results: dict[str, FrameOut | Rejected]) -> None:
        """Decode every encoded frame, pooled by patch shape; a frame that fails alone is rejected."""
        # Pool the patches of every frame with the same patch shape (frames smaller than a patch differ).
        groups: dict[tuple[int, int], list[_Encoded]] = defaultdict(list)
        for item in encoded:
            groups[item.grid.size_h, item.grid.size_w].append(item)
        for group in groups.values():
            try:
                self._decode_pooled(group)
            except RuntimeError:
                # One bad frame must not take its batch with it: decode each alone, reject what fails.
                for item in group:
                    try:
                        self._decode_pooled([item])
                    except RuntimeError as e:
                        results[item.frame.key] = Rejected(item.frame.key, f"decoder failed: {e}", item.frame.sample)

    # ---- the depth-pools layout: the same work in three calls, on different actors ------------------

    @torch.no_grad()
    def encode_by_depth(self, frames: Sequence[FrameIn]) -> list[EncodedBatch | DepthGroup]:
        """Encode + classify a batch: [EncodedBatch, DepthGroup(1), ..., DepthGroup(N)], the features
        of each depth's patches pooled over the batch's frames (numpy: shard workers hold no torch)."""
        encoded, rejected = self._encode_all(frames)
        batch = EncodedBatch(
            tuple(EncodedFrame(e.frame.key, _shape(e), e.depths.cpu().numpy(), e.encode_ms, e.notes) for e in encoded),
            tuple(rejected.values()),
        )
        by_shape: dict[tuple[int, int], list[_Encoded]] = defaultdict(list)
        for item in encoded:
            by_shape[_shape(item)].append(item)
        groups: list[EncodedBatch | DepthGroup] = [batch]
        for depth in range(1, self.num_columns + 1):
            parts = []
            for shape, items in by_shape.items():
                masks = [item.depths == depth for item in items]
                counts = tuple(int(m.sum()) for m in masks)
                if sum(counts):
                    levels = zip(*(item.features for item in items), strict=True)
                    # fp32 on the wire: bf16 has no numpy type, and the cast is exact.
                    arrays = tuple(
                        torch.cat([f[m] for f, m in zip(level, masks, strict=True)]).float().cpu().numpy()
                        for level in levels
                    )
                    parts.append(GroupPart(shape, arrays, counts))
            groups.append(DepthGroup(depth, tuple(parts)))
        return groups

    @torch.no_grad()
    def decode_depth(self, group: DepthGroup) -> DepthGroup:
        """Columns 1..k and head k over a depth-k group: its residuals, part by part."""
        start = time.perf_counter()
        parts = []
        for part in group.parts:
            # Arrays from Ray's object store are read-only views; torch wants writable memory.
            features = [torch.from_numpy(np.array(a)).to(self.device) for a in part.arrays]
            depths = torch.full((features[0].shape[0],), group.depth, dtype=torch.long, device=self.device)
            with self._autocast():
                residual = self.model.decode(*self.model.initial_state(features), depths).float()
            parts.append(GroupPart(part.shape, (residual.cpu().numpy(),), part.counts))
        return DepthGroup(group.depth, tuple(parts), (time.perf_counter() - start) * 1e3)

    @torch.no_grad()
    def finish_routed(
        self, frames: Sequence[FrameIn], batch: EncodedBatch, *residuals: DepthGroup
    ) -> list[FrameOut | Rejected]:
        """Stitch and encode a batch from its depth pools' residuals (depth 0 is a zero residual)."""
        results: dict[str, FrameOut | Rejected] = {r.key: r for r in batch.rejected}
        by_key = {f.key: f for f in frames}
        items: dict[str, _Encoded] = {}
        for e in batch.frames:
            image, _, grid = self._image(by_key[e.key])
            depths = torch.from_numpy(np.array(e.depths)).to(self.device)
            residual = torch.zeros(len(e.depths), 3, *e.shape, device=self.device)
            items[e.key] = _Encoded(by_key[e.key], image, grid, [], depths, e.encode_ms, e.notes, residual)
        for group in residuals:
            patches = max(group.patches, 1)
            for part in group.parts:
                owners = [items[e.key] for e in batch.frames if e.shape == part.shape]
                chunks = torch.from_numpy(np.array(part.arrays[0])).to(self.device).split(list(part.counts))
                for item, chunk, count in zip(owners, chunks, part.counts, strict=True):
                    assert item.residual is not None
                    item.residual[item.depths == group.depth] = chunk
                    item.decode_ms += group.decode_ms * count / patches  # this frame's share of the call
        self._finish_all(list(items.values()), results)
        return [results[f.key] for f in frames]

    # ---- shared steps ---------------------------------------------------------------------------------

    def _encode_all(self, frames: Sequence[FrameIn]) -> tuple[list[_Encoded], dict[str, FrameOut | Rejected]]:
        results: dict[str, FrameOut | Rejected] = {}
        encoded: list[_Encoded] = []
        for frame in frames:
            try:
                encoded.append(self._encode(frame))
            except (RuntimeError, ValueError) as e:
                results[frame.key] = Rejected(frame.key, f"encoder failed: {e}", frame.sample)
        return encoded, results

    def _finish_all(self, encoded: list[_Encoded], results: dict[str, FrameOut | Rejected]) -> None:
        for item in encoded:
            if item.frame.key in results:
                continue
            try:
                results[item.frame.key] = self._finish(item)
            except (RuntimeError, ValueError) as e:
                results[item.frame.key] = Rejected(item.frame.key, f"stitch or encode failed: {e}", item.frame.sample)

    def _image(self, frame: FrameIn) -> tuple[torch.Tensor, torch.Tensor, PatchGrid]:
        """The frame as (1, 3, H, W) in [0, 1] on the device, padded, and the padded frame's patch grid."""
        # Frames from Ray's object store are read-only views; torch wants a writable array.
        image = torch.from_numpy(np.array(frame.rgb)).to(self.device).permute(2, 0, 1)[None].float().div_(255)
        padded = self.model.pad(image)
        return image, padded, self.model.grid(*padded.shape[-2:])

    def _autocast(self) -> torch.autocast:
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _encode(self, frame: FrameIn) -> _Encoded:
        start = time.perf_counter()
        model = self.model
        image, padded, grid = self._image(frame)
        notes: list[str] = []
        budget = self.options.max_frame_pixels
        per_patch = self.options.encoder_mode == "patch"
        if not per_patch and budget and frame.rgb.shape[0] * frame.rgb.shape[1] > budget:
            per_patch = True
            notes.append(
                f"encoded per patch: {frame.rgb.shape[1]}x{frame.rgb.shape[0]} is over the frame-mode "
                f"budget of {budget} pixels"
            )
        with self._autocast():
            features = None
            if not per_patch:
                try:
                    features = model.encode_patches(padded, grid, "frame")
                except RuntimeError as e:  # torch.OutOfMemoryError is one too
                    if not _out_of_memory(e):
                        raise
                    notes.append("encoded per patch: the whole frame ran out of memory")
            if features is None:
                features = model.encode_patches(padded, grid, "patch")
            depths = model.choose_depths(features, self.options.exit)
        elapsed = (time.perf_counter() - start) * 1e3
        return _Encoded(frame, image, grid, features, depths.to(self.device), elapsed, notes=tuple(notes))

    def _decode_pooled(self, group: list[_Encoded]) -> None:
        start = time.perf_counter()
        features = [torch.cat(level) for level in zip(*(g.features for g in group), strict=True)]
        depths = torch.cat([g.depths for g in group])
        with self._autocast():
            residuals = self.model.decode(*self.model.initial_state(features), depths).float()
        elapsed = (time.perf_counter() - start) * 1e3
        work = max(int(depths.sum()), 1)
        for g, r in zip(group, residuals.split([len(g.depths) for g in group]), strict=True):
            g.residual = r
            g.decode_ms = elapsed * int(g.depths.sum()) / work  # this frame's share of the column work
            g.features = []  # free the pooled inputs early

    def _rgb(self, item: _Encoded) -> np.ndarray:
        """The deblurred frame, stitched and quantised: (H, W, 3) uint8."""
        assert item.residual is not None
        h, w = item.image.shape[-2:]
        residual = self.model.stitch(item.residual, item.grid, self.options.blend)
        restored = (residual[..., :h, :w] + item.image).clamp_(0, 1)
        return np.ascontiguousarray(restored[0].mul(255).round_().byte().permute(1, 2, 0).cpu().numpy())

    def _finish(self, item: _Encoded) -> FrameOut:
        start = time.perf_counter()
        h, w = item.image.shape[-2:]
        rgb = self._rgb(item)
        sample = encode_output(item.frame, rgb, self.options.jpeg_quality)
        n = self.num_columns
        depths = item.depths.cpu()  # one copy off the device for the histogram, mean and patch map
        histogram = torch.bincount(depths, minlength=n + 1).tolist()
        mean_depth = float(depths.float().mean())
        return FrameOut(
            sample=sample,
            member=item.frame.member,
            width=w,
            height=h,
            sha256=hashlib.sha256(sample.members[item.frame.member]).hexdigest(),
            depth_histogram=tuple(histogram),
            mean_depth=mean_depth,
            compute_saved=1 - mean_depth / n if n else 0.0,
            blur_before=blur_score(item.frame.rgb),
            blur_after=blur_score(rgb),
            seam=seam_score(rgb, item.grid),
            tone_shift=tone_shift(item.frame.rgb, rgb),
            encode_ms=item.encode_ms,
            decode_ms=item.decode_ms,
            stitch_ms=(time.perf_counter() - start) * 1e3,
            notes=item.frame.notes + item.notes,
            patches=PatchMap(item.grid.ys, item.grid.xs, item.grid.size_h, item.grid.size_w, tuple(depths.tolist())),
        )


def _shape(item: _Encoded) -> tuple[int, int]:
    return item.grid.size_h, item.grid.size_w


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator giving up."""
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "can't allocate memory" in str(error)
        or ("out of memory" in str(error).lower())
    )
