"""The DALI loader: one pipeline per epoch over the cache files (``fn.readers.numpy``), on the GPU of the training
device or on DALI's CPU backend (``device_id=None``, what CI tests).

Per study, the pipeline
  1. reads only the crop: ``fn.readers.numpy`` with a per-sample ``roi_start`` (negative = padding before) and
     ``roi_shape = size`` over the spatial axes, ``out_of_bounds_policy="pad"`` with 0 (background): crop and pad in
     one read of the memory-mapped file;
  2. moves it to the GPU (when there is one) and casts to float32 (DALI's CPU flip has no float16 kernel);
  3. flips and rotates: ``torch.rot90(x, k, dims=(X, Y))`` is flips followed by an X <-> Y transpose for odd k, so
     the study's flips and its rotation fold into one ``fn.flip`` plus a ``fn.transpose`` taken conditionally per
     sample (exact, no interpolation; the shape is kept because rot90 needs X == Y);
  4. applies ``x * scale[m] + shift[m]`` per modality (broadcast [M, 1, 1, 1]).

Where the parameters come from: the host. The epoch's study order and each study's :class:`AugmentParams` are the
torch loader's (:meth:`StudyLoader.plan`, :meth:`StudyDataset.params`); the pipeline reads the files in that order
(``files=`` the rank's shard, no reader shuffling, one shard) and takes the parameters through one
``fn.external_source`` indexed by iteration, so both loaders give the same batches, and a resumed epoch starts its
file list after the batches already done. The reader's own ``random_shuffle`` (a shuffle buffer) and
``shard_id/num_shards`` are deliberately unused: their order cannot be reproduced by the torch loader nor resumed
mid-epoch. ``fn.get_property(key="source_info")`` (the file each sample came from) is checked against the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from medmap_fast.data.augment import AugmentParams, Size
from medmap_fast.data.loaders import Batch, StudyLoader, assemble_batch

Columns = tuple[Sequence[np.ndarray | np.generic], ...]  # per column, one array or scalar per sample


def dali_ops(params: AugmentParams) -> tuple[np.ndarray, tuple[bool, bool, bool], bool]:
    """(roi_start int32 [3], flips along X, Y, Z, transpose X <-> Y) equivalent to the params' flips then rot90:
    rot90 by k = flip Y then transpose (k=1), flip X and Y (k=2), flip X then transpose (k=3)."""
    k = params.k % 4
    fx, fy, fz = params.flip
    flips = (fx != (k in (2, 3)), fy != (k in (1, 2)), fz)
    return np.asarray(params.start, dtype=np.int32), flips, k % 2 == 1


def param_columns(params: Sequence[AugmentParams]) -> Columns:
    """The external source's 7 per-sample columns of a batch: roi_start, flip X, Y, Z, transpose, scale, shift."""
    ops = [dali_ops(p) for p in params]
    return (
        [start for start, _, _ in ops],
        *([np.int32(flips[a]) for _, flips, _ in ops] for a in range(3)),
        [np.bool_(t) for _, _, t in ops],
        [p.scale.reshape(-1, 1, 1, 1) for p in params],
        [p.shift.reshape(-1, 1, 1, 1) for p in params],
    )


def study_pipeline(
    files: Sequence[str],
    source: Callable[[Any], Columns],
    size: Size,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
) -> Any:
    """A built DALI pipeline reading ``files`` in order; outputs (volumes [M, *size] float32 per sample, on the GPU
    when ``device_id`` is given; source_info of each sample). ``source(batch_info)`` gives the parameter columns of
    iteration ``batch_info.iteration``."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.types import DALIDataType as DType  # the enum behind types.INT32 etc. (those are untyped)

    # device_id None (the CPU backend) is DALI's documented default; its pipeline_def overload types it int only.
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,  # type: ignore[arg-type]
        enable_conditionals=True,
        prefetch_queue_depth=2,
    )
    def pipeline() -> tuple[Any, Any]:
        start, fx, fy, fz, transpose, scale, shift = fn.external_source(
            source=source,
            num_outputs=7,
            batch=True,
            batch_info=True,
            dtype=[DType.INT32, DType.INT32, DType.INT32, DType.INT32, DType.BOOL, DType.FLOAT, DType.FLOAT],
        )
        data = fn.readers.numpy(
            files=list(files),
            roi_start=start,
            roi_shape=list(size),
            roi_axes=[1, 2, 3],
            out_of_bounds_policy="pad",
            fill_value=0.0,
            name="reader",
        )
        source_info = fn.get_property(data, key="source_info")
        if device_id is not None:
            data, scale, shift = data.gpu(), scale.gpu(), shift.gpu()
        # layout CDHW: depthwise flips X, vertical Y, horizontal Z
        data = fn.reshape(fn.cast(data, dtype=DType.FLOAT), layout="CDHW")
        data = fn.flip(data, depthwise=fx, vertical=fy, horizontal=fz)
        if transpose:
            data = fn.transpose(data, perm=[0, 2, 1, 3], transpose_layout=False)
        return data * scale + shift, source_info

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliStudyLoader(StudyLoader):
    """DALI loader with ``num_threads`` CPU threads; volumes land on ``device`` (CUDA: the pipeline runs on that
    GPU; CPU: DALI's CPU backend). Same order, parameters and batches as :class:`TorchStudyLoader`."""

    kind = "dali"

    def __init__(self, *args: Any, num_threads: int = 1) -> None:
        super().__init__(*args)
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "loader: expected nvidia-dali to be installed for loader 'dali' "
                f"(pip install nvidia-dali-cuda130), got ImportError: {err}"
            ) from err
        self.num_threads = num_threads
        self.device_id: int | None = None  # None: DALI's CPU backend
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        plan = self.plan(epoch, skip_batches)
        return self._run(epoch, plan) if plan else iter(())

    def _run(self, epoch: int, plan: list[list[int]]) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        bs = self.batch_size
        flat = [i for b in plan for i in b]
        flat += [flat[-1]] * (len(plan) * bs - len(flat))  # a short last batch is padded, the extra samples dropped
        files = [str(self.dataset.entries[i].path(self.dataset.cache_dir)) for i in flat]
        columns = [
            param_columns([self.dataset.params(epoch, i) for i in flat[b * bs : (b + 1) * bs]])
            for b in range(len(plan))
        ]

        def source(info: Any) -> Columns:
            if info.iteration >= len(columns):
                raise StopIteration
            return columns[info.iteration]

        pipe = study_pipeline(files, source, self.dataset.augment.size, bs, self.num_threads, self.device_id)
        stream = torch.cuda.current_stream(self.device) if self.device_id is not None else None
        try:
            for b, indices in enumerate(plan):
                data, source_info = pipe.run()
                items = [self.dataset.item(i, None) for i in indices]
                volumes = torch.empty(
                    (sum(len(it.modality_ids) for it in items), 1, *self.dataset.augment.size),
                    dtype=torch.float32,
                    device=self.device,
                )
                offset = 0
                for j, it in enumerate(items):
                    got = np.array(source_info[j]).tobytes().decode()
                    if got != files[b * bs + j]:
                        raise RuntimeError(f"DALI read {got}, expected {files[b * bs + j]} (pipeline out of step)")
                    m = len(it.modality_ids)
                    feed_ndarray(data[j], volumes[offset : offset + m, 0], cuda_stream=stream)
                    offset += m
                yield assemble_batch(volumes, items)
        finally:
            del pipe
