"""``medmap-fast embed``: per-volume and per-study embeddings of the studies of a prepared cache.

Every volume is centre-cropped or padded as when the model is evaluated (the crop size of its stage, else
``data.size``) and run through the model in eval mode.

* volume embedding [C]: the encoder's pooled output (the mean of its last-stage tokens, ``EncoderOutput.pooled``);
* study embedding, the way the saved model combines a study's volumes:
  a stage-2 classifier: its fused CCT features [F] (``ClassifierOutput.features``, what its head reads);
  a stage-1 model: its joint-space study embedding [E] (``pool_studies`` of the projected volume embeddings, what
  report retrieval and zero-shot scoring compare with text);
  an encoder alone: ``pool_studies`` of the volume embeddings [C].

Files: ``.npz`` (numpy, no pickles)::

    study_ids [S] str   splits [S] str   study_embeddings [S, D] float32
    volume_embeddings [V, C] float32   volume_study [V] int64 (row in the study arrays)   volume_modalities [V] str
    study_embedding  0-d str: which of the three study embeddings above

or ``.parquet`` (needs pyarrow): one row per study with ``study_id``, ``split``, ``study_embedding`` [D],
``modalities`` [M] and ``volume_embeddings`` [M][C]; the study-embedding kind in the schema metadata.

Beside FILE, ``FILE.config.yaml`` (:func:`config_file`) holds the resolved config the embeddings were made with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmap_fast.data.cache import SPLITS, CacheEntry
from medmap_fast.fileio import atomic_path
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.train.config import RunConfig
from medmap_fast.train.data import CacheData, stage_batches
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.export import SavedModel, encoder_of
from medmap_fast.train.loop import Batch, to_device
from medmap_fast.train.pretrain import pool_studies
from medmap_fast.validation import fail

FORMATS = (".npz", ".parquet")
# the stage whose crop size a model is evaluated at (None: data.size)
STAGE_OF = {MedMAPClassifier: "finetune", MedMAPPretrainModel: "pretrain", MedMAPEncoder: None}
STUDY_EMBEDDINGS = {
    MedMAPClassifier: "stage-2 classifier features (fused CCT streams, what the head reads)",
    MedMAPPretrainModel: "stage-1 joint space (renormalised mean of the normalised projected volume embeddings)",
    MedMAPEncoder: "encoder space (renormalised mean of the normalised pooled volume embeddings)",
}


@dataclass
class Embeddings:
    """What :func:`embed_cache` computes: S studies holding V volumes."""

    study_ids: list[str]
    splits: list[str]
    study: np.ndarray  # [S, D] float32
    volume: np.ndarray  # [V, C] float32
    volume_study: np.ndarray  # [V] int64, the row of each volume's study
    volume_modalities: list[str]  # [V]
    kind: str  # which study embedding (a value of STUDY_EMBEDDINGS)


def check_output(path: str | Path) -> Path:
    """``path`` ends in .npz or .parquet (and pyarrow imports for .parquet); checked before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        fail("--out", f"a file ending in {' or '.join(FORMATS)}", repr(str(path)))
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError(
                f"--out {path}: writing .parquet needs pyarrow, which is not installed; "
                "`pip install pyarrow`, or write .npz"
            ) from None
    return path


def config_file(path: str | Path) -> Path:
    """Where the resolved config of the embeddings file ``path`` goes: ``path`` + ``.config.yaml``."""
    path = Path(path)
    return path.with_name(f"{path.name}.config.yaml")


def cache_entries(cache: CacheData, split: str) -> list[CacheEntry]:
    """The studies of ``split`` ("all": every split, train, val, test in turn); none is an error naming the cache."""
    if split != "all":
        return cache.split(split)
    entries = [e for name in SPLITS for e in cache.splits[name]]
    if not entries:
        fail(f"{cache.path}", "prepared studies", "an empty index.jsonl")
    return entries


def _study_embeddings(model: SavedModel, batch: Batch) -> torch.Tensor:
    """[S, D] study embeddings of one batch (see the module docstring)."""
    volumes, ids = batch["volumes"], batch["modality_ids"]
    if isinstance(model, MedMAPClassifier):
        return model(volumes, ids, batch["study_index"], batch["num_studies"]).features
    if isinstance(model, MedMAPPretrainModel):
        volume_emb = model.embed_volumes(volumes, ids)
    else:
        volume_emb = model(volumes, ids).pooled
    return pool_studies(volume_emb, batch["study_index"], batch["num_studies"])


@torch.no_grad()
def embed_cache(
    model: SavedModel,
    entries: Sequence[CacheEntry],
    cache: CacheData,
    config: RunConfig,
    batch_size: int,
    ctx: DistributedContext,
    progress: bool = True,
) -> Embeddings:
    """Embeddings of every volume and study of ``entries`` (in order), ``batch_size`` studies per forward pass."""
    from tqdm.auto import tqdm

    encoder = encoder_of(model)
    model.eval().to(ctx.device)
    # labels are not needed, and a study without them must not stop the loader
    batches = stage_batches(
        entries,
        dataclasses.replace(cache, labels=None),
        config,
        None,
        ctx,
        encoder.modalities.names,
        batch_size,
        size_of=STAGE_OF[type(model)],
    )
    pooled: list[torch.Tensor] = []
    hook = encoder.register_forward_hook(lambda _module, _args, out: pooled.append(out.pooled.float().cpu()))
    studies, volume_study, modality_ids, done = [], [], [], 0
    try:
        for batch in tqdm(
            batches.epoch(0),
            total=len(batches),
            desc=f"embedding {len(entries)} studies",
            unit="batch",
            disable=not progress,
            dynamic_ncols=True,
        ):
            batch = to_device(batch, ctx.device)
            studies.append(_study_embeddings(model, batch).float().cpu())
            volume_study.append(batch["study_index"].cpu() + done)
            done += batch["num_studies"]
            modality_ids.append(batch["modality_ids"].cpu())
    finally:
        hook.remove()
    names = encoder.modalities.names
    return Embeddings(
        [e.study_id for e in entries],
        [e.split for e in entries],
        torch.cat(studies).numpy(),
        torch.cat(pooled).numpy(),
        torch.cat(volume_study).numpy(),
        [names[i] for i in torch.cat(modality_ids).tolist()],
        STUDY_EMBEDDINGS[type(model)],
    )


def write_embeddings(emb: Embeddings, path: str | Path) -> None:
    """Write ``emb`` atomically as .npz or .parquet (by the suffix of ``path``; see the module docstring)."""
    path = check_output(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npz":
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
                np.savez(
                    f,
                    study_ids=np.array(emb.study_ids),
                    splits=np.array(emb.splits),
                    study_embeddings=emb.study,
                    volume_embeddings=emb.volume,
                    volume_study=emb.volume_study,
                    volume_modalities=np.array(emb.volume_modalities),
                    study_embedding=np.array(emb.kind),
                )
        else:
            _write_parquet(emb, tmp)


def _write_parquet(emb: Embeddings, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the volumes of a study are contiguous and in study order: one list offset per study
    offsets = np.r_[0, np.cumsum(np.bincount(emb.volume_study, minlength=len(emb.study_ids)))].astype(np.int32)

    def rows(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

    table = pa.table(
        {
            "study_id": emb.study_ids,
            "split": emb.splits,
            "study_embedding": rows(emb.study),
            "modalities": pa.ListArray.from_arrays(offsets, pa.array(emb.volume_modalities)),
            "volume_embeddings": pa.ListArray.from_arrays(offsets, rows(emb.volume)),
        }
    )
    pq.write_table(table.replace_schema_metadata({"study_embedding": emb.kind}), str(path))


def summary(emb: Embeddings, path: str | Path) -> dict[str, Any]:
    """What the command prints: the file and its config file, the counts and widths, and which study embedding it
    holds."""
    return {
        "out": str(path),
        "config": str(config_file(path)),
        "studies": len(emb.study_ids),
        "volumes": len(emb.volume_modalities),
        "study_dim": int(emb.study.shape[1]),
        "volume_dim": int(emb.volume.shape[1]),
        "study_embedding": emb.kind,
    }
