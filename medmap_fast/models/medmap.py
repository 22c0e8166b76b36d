"""The two MedMAP models: stage-1 vision-language pre-training and the stage-2 abnormality classifier.

Both take the flat batch contract of DESIGN §2: volumes [V, 1, D, H, W], modality_ids [V], study_index [V] (the study
of every volume, 0..S-1). Report and prompt text embeddings come from the frozen :class:`TextEncoder` (cached), so
the models only hold trainable projections of them.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from medmap_fast.fileio import atomic_path, load_safetensors, read_json_object, save_safetensors
from medmap_fast.losses import AsymmetricContrastiveLoss, FocalLoss, LabelPromptAlignmentLoss
from medmap_fast.models.encoder import MedMAPEncoder, check_state_dict, saved_encoder_dir
from medmap_fast.models.fusion import (
    CrossCognitionTransformer,
    CrossModalSemanticAggregation,
    pack_by_study,
    study_max,
)
from medmap_fast.validation import check_float_tensor, check_index, check_json_fields, describe, fail

TASKS = ("multiclass", "binary", "multilabel")
HEADS_FILE, HEADS_CONFIG = "heads.safetensors", "heads.json"
PRETRAIN_FORMAT = "medmap-fast/MedMAPPretrainModel"
PRETRAIN_JSON_KINDS = {
    "text_dim": "int",
    "embed_dim": "int",
    "lam": "number",
    "local_loss": "bool",
    "logit_scale_init": "number",
    "logit_scale_max": "number",
    "learnable_scale": "bool",
}


def token_dim(encoder: MedMAPEncoder) -> int:
    """Width of the encoder's tokens: its last map, after the PatchMerging that follows every stage (2 x MONAI's
    ``num_features``)."""
    return 2 * encoder.num_features


class PretrainOutput(NamedTuple):
    """loss (scalar); volume_emb [V, E] and report_emb [S, E] (projected, not normalised); parts: loss terms."""

    loss: torch.Tensor
    volume_emb: torch.Tensor
    report_emb: torch.Tensor
    parts: dict[str, torch.Tensor]


class MedMAPPretrainModel(nn.Module):
    """Stage 1: modality-aware encoder + projections of volumes and (frozen, cached) report embeddings into a joint
    space, trained with the asymmetric contrastive loss.

    Args:
        encoder: the vision encoder (its pooled last-stage features are projected; with a conv branch, a projection of
            its detections is added).
        text_dim: width E_text of the report embeddings (384 for the MiniLM-L6 default).
        embed_dim: width of the joint space.
        lam, local_loss and ``loss_kwargs`` (logit_scale_init, logit_scale_max, learnable_scale): see
            :class:`AsymmetricContrastiveLoss`.
    """

    def __init__(
        self,
        encoder: MedMAPEncoder,
        text_dim: int,
        embed_dim: int = 256,
        lam: float = 0.5,
        local_loss: bool = False,
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = {
            "text_dim": text_dim,
            "embed_dim": embed_dim,
            "lam": lam,
            "local_loss": local_loss,
            **loss_kwargs,
        }
        self.vision_proj = nn.Linear(token_dim(encoder), embed_dim)
        if encoder.conv_branch is not None:
            self.detection_proj = nn.Linear(encoder.conv_branch.out_channels, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.loss_fn = AsymmetricContrastiveLoss(lam=lam, local_loss=local_loss, **loss_kwargs)

    def embed_volumes(self, volumes: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """[V, 1, D, H, W], [V] -> projected volume embeddings [V, E]."""
        out = self.encoder(volumes, modality_ids)
        emb = self.vision_proj(out.pooled)
        return emb if out.detections is None else emb + self.detection_proj(out.detections)

    def embed_reports(self, report_embeddings: torch.Tensor) -> torch.Tensor:
        """Frozen text embeddings [S, E_text] -> projected report embeddings [S, E]."""
        text_dim = self.text_proj.in_features
        check_float_tensor(report_embeddings, "report_embeddings", f"[S, {text_dim}] with S >= 1", 2)
        if report_embeddings.shape[0] == 0 or report_embeddings.shape[1] != text_dim:
            fail("report_embeddings", f"a float tensor [S, {text_dim}] with S >= 1", describe(report_embeddings))
        return self.text_proj(report_embeddings.to(self.text_proj.weight.dtype))

    def forward(
        self,
        volumes: torch.Tensor,
        modality_ids: torch.Tensor,
        study_index: torch.Tensor,
        report_embeddings: torch.Tensor,
    ) -> PretrainOutput:
        """volumes [V,1,D,H,W], modality_ids [V], study_index [V] in [0, S), report_embeddings [S, E_text].

        The loss checks ``study_index`` against V and S (after the encoder has checked the volumes).
        """
        report_emb = self.embed_reports(report_embeddings)
        volume_emb = self.embed_volumes(volumes, modality_ids)
        loss, parts = self.loss_fn(volume_emb, report_emb, study_index, return_parts=True)
        return PretrainOutput(loss, volume_emb, report_emb, parts)

    def save_pretrained(self, directory: str | Path) -> None:
        """``encoder/`` (the encoder's own format) + the projection and loss weights, each written atomically."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory / "encoder")
        save_head_weights(self, directory / HEADS_FILE)
        with atomic_path(directory / HEADS_CONFIG, durable=True) as tmp:
            tmp.write_text(json.dumps({"format": PRETRAIN_FORMAT, **self.config}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MedMAPPretrainModel:
        """Inverse of :meth:`save_pretrained`; a corrupt file, or weights of another configuration, are errors naming
        the file."""
        directory = Path(directory)
        path = directory / HEADS_CONFIG
        config = read_json_object(path, "MedMAPPretrainModel.save_pretrained")
        if config.pop("format", None) != PRETRAIN_FORMAT:
            raise ValueError(f"{path}: expected a {PRETRAIN_FORMAT} configuration")
        check_json_fields(path, config, PRETRAIN_JSON_KINDS)
        encoder = MedMAPEncoder.from_pretrained(saved_encoder_dir(directory))
        try:
            model = cls(encoder, **config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: describes no valid MedMAPPretrainModel ({err})") from err
        load_head_weights(model, directory / HEADS_FILE, f"the heads of {HEADS_CONFIG}")
        return model


class ClassifierOutput(NamedTuple):
    """logits [S, K] (K = 1 for a binary task); features [S, cct.out_dim]: the fused, pooled CCT streams (what the
    head reads; with a conv branch, the logits also hold its detection head's term)."""

    logits: torch.Tensor
    features: torch.Tensor


class MedMAPClassifier(nn.Module):
    """Stage 2: encoder -> CSA (visual and vision-language streams) -> CCT -> head, one prediction per study. With an
    encoder conv branch, a linear detection head on each study's maximum of its volumes' detections adds to the logits.

    Args:
        encoder: the vision encoder (fine-tuned; load stage-1 weights with :meth:`load_pretrained_encoder`).
        num_classes: K classes (multiclass), labels (multilabel), or 1/2 for a binary task.
        prompt_embeddings: frozen text embeddings [M, E_text] of one prompt per encoder modality (e.g. "T2-weighted
            MRI of the liver"), from :class:`TextEncoder`.
        task: "multiclass" (softmax cross-entropy), "binary" (one logit) or "multilabel" (one logit per label).
        loss: "auto" (cross-entropy for multiclass, sigmoid focal otherwise), "ce", "bce" or "focal".
        label_embeddings: optional frozen text embeddings [K, E_text] of label prompts; adds the alignment term
            ``align_weight * LabelPromptAlignmentLoss(proj(features), label_embeddings)``.
        dim, depth, num_heads, mlp_ratio, dropout: CSA/CCT width, CCT layers, heads, FFN ratio, dropout.
        pool: how CCT pools each stream's tokens: "mean" (default), "max" or "mean_max" (see
            :class:`CrossCognitionTransformer`).
    """

    def __init__(
        self,
        encoder: MedMAPEncoder,
        num_classes: int,
        prompt_embeddings: torch.Tensor,
        task: str = "multiclass",
        loss: str = "auto",
        label_embeddings: torch.Tensor | None = None,
        align_weight: float = 0.1,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            fail("task", f"one of {TASKS}", repr(task))
        num_modalities = len(encoder.modalities)
        check_float_tensor(prompt_embeddings, "prompt_embeddings", f"[{num_modalities}, E_text]", 2)
        if prompt_embeddings.shape[0] != num_modalities:
            fail(
                "prompt_embeddings",
                f"one row per encoder modality [{num_modalities}, E_text]",
                describe(prompt_embeddings),
            )
        if task == "binary" and num_classes not in (1, 2):
            fail("num_classes", "1 or 2 for a binary task", repr(num_classes))
        self.task, self.num_classes = task, num_classes
        self.encoder = encoder
        self.csa = CrossModalSemanticAggregation(token_dim(encoder), dim, prompt_embeddings)
        self.cct = CrossCognitionTransformer(dim, depth, num_heads, num_modalities, mlp_ratio, dropout, pool)
        outputs = 1 if task == "binary" else num_classes
        fused = self.cct.out_dim
        self.head = nn.Sequential(
            nn.LayerNorm(fused), nn.Linear(fused, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, outputs)
        )
        if encoder.conv_branch is not None:
            self.detection_head = nn.Linear(encoder.conv_branch.out_channels, outputs)
        loss = {"multiclass": "ce"}.get(task, "focal") if loss == "auto" else loss
        if loss not in ("ce", "bce", "focal") or (loss == "ce") != (task == "multiclass"):
            fail("loss", f"'auto', or 'ce' for multiclass and 'bce'/'focal' otherwise (task={task!r})", repr(loss))
        self.loss_name = loss
        self.focal = FocalLoss(focal_alpha, focal_gamma) if loss == "focal" else None
        self.align_weight = align_weight if label_embeddings is not None else 0.0
        if label_embeddings is not None:
            rows = 2 if task == "binary" else num_classes
            check_float_tensor(label_embeddings, "label_embeddings", f"[{rows}, E_text]", 2)
            if label_embeddings.shape[0] != rows:
                fail("label_embeddings", f"one prompt embedding per class [{rows}, E_text]", describe(label_embeddings))
            self.register_buffer("label_embeddings", label_embeddings.detach().float().clone())
            self.align_proj = nn.Linear(fused, label_embeddings.shape[1])
            self.align_loss = LabelPromptAlignmentLoss()

    def forward(
        self,
        volumes: torch.Tensor,
        modality_ids: torch.Tensor,
        study_index: torch.Tensor,
        num_studies: int | None = None,
    ) -> ClassifierOutput:
        """volumes [V,1,D,H,W], modality_ids [V], study_index [V] in [0, S) -> logits [S, K] and fused features.

        ``num_studies`` defaults to ``study_index.max() + 1``; a study with no volume is an error.
        """
        out = self.encoder(volumes, modality_ids)
        v = out.tokens.shape[0]
        modality_ids = self.encoder.modality_id_tensor(modality_ids, v, out.tokens.device)
        if num_studies is None:
            num_studies = int(study_index.max()) + 1 if isinstance(study_index, torch.Tensor) and v else 0
        elif not isinstance(num_studies, numbers.Integral) or isinstance(num_studies, bool) or num_studies < 1:
            fail("num_studies", "None or a positive int (the number of studies S)", repr(num_studies))
        study_index = check_index(study_index, "study_index", v, num_studies, what="study numbers")
        visual, vision_language = self.csa(out.tokens, modality_ids)
        # both streams in one packing: one slot count (a host sync eagerly, one unbacked size when compiled)
        both = pack_by_study(torch.cat([visual, vision_language], -1), modality_ids, study_index, num_studies)
        visual_packed, vl_packed = both.tokens.chunk(2, dim=-1)
        features = self.cct(both._replace(tokens=visual_packed), vl_packed)
        logits = self.head(features)
        if out.detections is not None:
            logits = logits + self.detection_head(study_max(out.detections, study_index, num_studies))
        return ClassifierOutput(logits, features)

    def compute_loss(self, output: ClassifierOutput, labels: torch.Tensor) -> torch.Tensor:
        """Supervised loss (+ the label-prompt alignment term when label embeddings were given).

        labels: [S] class indices (multiclass), [S] 0/1 (binary) or [S, K] multi-hot (multilabel).
        """
        logits = output.logits
        s = logits.shape[0]
        if self.task == "multiclass":
            labels = check_index(labels, "labels", s, self.num_classes, "study", "class indices")
            loss = nn.functional.cross_entropy(logits, labels)
        else:
            target = self._binary_labels(labels, s).to(logits.dtype)
            loss = (
                self.focal(logits, target)
                if self.focal is not None
                else nn.functional.binary_cross_entropy_with_logits(logits, target)
            )
        if self.align_weight:
            # one prompt per class (multiclass), per label (multilabel), or "absent"/"present" (binary)
            target = labels.reshape(s, -1).float() if self.task == "multilabel" else labels.reshape(s).long()
            loss = loss + self.align_weight * self.align_loss(
                self.align_proj(output.features), self.label_embeddings, target
            )
        return loss

    def _binary_labels(self, labels: object, s: int) -> torch.Tensor:
        """Binary labels [S] or [S, 1], or multi-hot labels [S, K], in [0, 1] -> [S, 1] / [S, K]."""
        shapes = [(s,), (s, 1)] if self.task == "binary" else [(s, self.num_classes)]
        expected = f"labels in [0, 1] of shape {' or '.join(str(x) for x in shapes)}"
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) not in shapes or labels.is_complex():
            fail("labels", expected, describe(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__)
        labels = labels.float()
        bad = ~((labels >= 0) & (labels <= 1))  # NaN too
        if bool(bad.any()):
            fail(
                "labels",
                expected,
                f"{int(bad.sum())} of {labels.numel()} outside [0, 1] or NaN, e.g. {labels[bad][0].item()}",
            )
        return labels.reshape(s, -1)

    def load_pretrained_encoder(self, source: str | Path | MedMAPEncoder | MedMAPPretrainModel) -> MedMAPClassifier:
        """Initialise the encoder from stage 1: a MedMAPPretrainModel (or its saved folder, which holds
        ``encoder/``), or an encoder (or its saved folder). An encoder of another architecture is an error naming
        the settings that differ; training-time settings (dropout, drop path, checkpointing) may differ."""
        if isinstance(source, (str, Path)):
            source = MedMAPEncoder.from_pretrained(saved_encoder_dir(source))
        if isinstance(source, MedMAPPretrainModel):
            source = source.encoder
        differences = self.encoder.architecture_differences(source)
        if differences:
            fail(
                "source",
                "an encoder of this classifier's architecture",
                "one that differs in " + "; ".join(differences) + " (this classifier's vs the source's)",
            )
        self.encoder.load_state_dict(source.state_dict())
        return self


def save_head_weights(model: nn.Module, path: Path) -> None:
    """Every parameter and buffer of ``model`` outside ``encoder.`` (saved in its own folder) to ``path``."""
    save_safetensors(path, {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")})


def load_head_weights(model: nn.Module, path: Path, what: str) -> None:
    """Inverse of :func:`save_head_weights`: strict keys and shapes, else ValueError naming ``path`` and ``what``."""
    state = load_safetensors(path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    check_state_dict(path, own, state, what)
    model.load_state_dict(state, strict=False)
