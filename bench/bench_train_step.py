"""End-to-end training step: volumes/s and peak memory of one AdamW update of our stage 1 (``MedMAPPretrainModel``:
encoder, report projections, asymmetric contrastive loss; ``pretrain_step``) and stage 2 (``MedMAPClassifier``:
encoder, CSA, CCT, head, loss; ``finetune_step``) against the encoder as the authors' code trains it.

    python bench/bench_train_step.py --threads 1        # CPU: 2 studies x 2 modalities x 1 x 64^3, feature 48
    python bench/bench_train_step.py --stages 2 --repeats 2 --rows ours reference

On a CPU shared with other jobs, ``--threads 1`` keeps the timings steady: ours runs many small window-attention
products, and with two threads every one of them waits at an OpenMP barrier for a core another job holds.

Rows (every one starts from the same weights and gets the same batch: S studies x M modalities = V volumes):
  ours                        MedMAPEncoder (sharing "gated", from_monai of the reference's Swin): all V volumes in
                              one pass through our ops (torch backend on CPU, Triton on CUDA)
  ours + checkpointing        the same model with ``TrainConfig(activation_checkpointing=True)``, applied as fit()
                              applies it (every Swin block recomputes its activations in the backward)
  ours + compile              ``TrainConfig(compile=True)``: ``nn.Module.compile`` of the encoder (Inductor); the
                              compilation happens in the parity run, so it is not timed
  reference                   the authors' way (``AuthorsEncoder``): one MONAI ``SwinUNETR`` shared by every modality,
                              called once per modality on that modality's volumes (their one loader per modality), its
                              whole forward run (the UNETR decoder's output discarded), eager attention
  reference + use_checkpoint  the same with MONAI's ``use_checkpoint=True``, which the authors' fine-tuning hard-codes

Only the encoder differs between rows: the heads, the loss, the optimiser (``fit``'s AdamW, lr 1e-4, weight decay
1e-5, gradient clipping at 1) and the step are the same code, and the heads start with the same weights. Before
timing, each row's step (loss and every gradient the rows share) must pass the flash-attention rule against a float64
run of the reference, and ours and the reference must have fed the same number of volumes of the same size to their
Swin trunks; a row that fails is not timed. On the CPU each repeat runs every row in turn; volumes/s is V over the
median wall time, each row's ratio is to the reference row (ours / reference volumes/s), and peak memory is what one
step allocates beyond what was allocated before it (CUDA: the allocator's peak; CPU: the allocations the profiler
sees).
``pytest bench/bench_train_step.py`` runs every row at a small size (:func:`small_case`); ``gpu_rows()``
feeds bench/gpu_check.py (4 studies x 2 modalities, stage 1 at 96^3, stage 2 at 128^3, bf16 autocast).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
from collections.abc import Callable

import pytest
import torch
from _compare import Checked, Step, flash_rule, keep_passing, step_or_skip
from _swin_rows import paper_config
from _timing import cpu_peak_mib, cuda_time_ms, interleaved_cpu, peak_mib
from bench_swin_cpu import device_line
from torch import nn

import medmap_fast as mf
from medmap_fast.modalities import ModalityRegistry
from medmap_fast.models.encoder import EncoderOutput, MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.train.finetune import finetune_step
from medmap_fast.train.loop import Batch, TrainConfig, adamw, apply_train_options, autocast, cpu_compiler_missing
from medmap_fast.train.pretrain import pretrain_step
from medmap_fast.validation import check_index

OURS, OURS_CKPT, OURS_COMPILED, REFERENCE, REFERENCE_CKPT = (
    "ours", "ours + checkpointing", "ours + compile", "reference (MONAI SwinUNETR, authors' way)",
    "reference + use_checkpoint")
ROWS = (OURS, OURS_CKPT, OURS_COMPILED, REFERENCE, REFERENCE_CKPT)
OPTIONS = {OURS: TrainConfig(), OURS_CKPT: TrainConfig(activation_checkpointing=True),
           OURS_COMPILED: TrainConfig(compile=True)}
STAGES = {1: ("pretrain", pretrain_step), 2: ("finetune", finetune_step)}
TEXT_DIM, NUM_CLASSES = 384, 7  # the MiniLM-L6 report embeddings; the paper's 7-class liver task
# configs/paper.yaml's heads; dropout 0 so that every row computes the same function (the parity check)
HEADS = {1: dict(embed_dim=512, lam=0.5), 2: dict(dim=256, depth=2, num_heads=8, dropout=0.0)}
TRAIN = TrainConfig()  # lr 1e-4, weight decay 1e-5 (the paper's), betas, gradient clipping 1.0
TRUNKS = ("encoder.trunk.", "encoder.unetr.swinViT.")  # ours' and the reference's Swin trunk, same keys below


class AuthorsEncoder(nn.Module):
    """The encoder as the authors' code trains it, with :class:`MedMAPEncoder`'s interface: one MONAI ``SwinUNETR``
    for every modality, called once per modality present on that modality's volumes, its whole forward run (encoders,
    UNETR decoder, output conv), the logits dropped as their ``SwinEncoder`` drops them, and the features taken from
    its ``swinViT``: the normalised stage-4 map. ``run_decoder=False`` runs ``swinViT`` alone (the same features,
    for the float64 parity run: the decoder is not on the loss's graph).

    ``forward(volumes [V, 1, D, H, W], modality_ids [V])`` -> ``EncoderOutput``: tokens [V, N, C], pooled [V, C],
    features = [the stage-4 map [V, C, D4, H4, W4]], no detections (the authors' encoder has no conv branch, as ours
    here has none).
    """

    def __init__(self, unetr: nn.Module, modalities: ModalityRegistry, run_decoder: bool = True) -> None:
        super().__init__()
        self.unetr, self.modalities, self.run_decoder = unetr, modalities, run_decoder
        self.num_features = unetr.swinViT.num_features
        self.conv_branch = None

    def modality_id_tensor(self, modality_ids: torch.Tensor, num_volumes: int, device: torch.device) -> torch.Tensor:
        return check_index(modality_ids, "modality_ids", num_volumes, len(self.modalities), what="modality ids")

    def _stage4(self, x: torch.Tensor) -> torch.Tensor:
        if not self.run_decoder:
            return self.unetr.swinViT(x, self.unetr.normalize)[4]
        kept: list[torch.Tensor] = []
        handle = self.unetr.swinViT.register_forward_hook(lambda _module, _args, maps: kept.append(maps[4]))
        try:
            self.unetr(x)  # the logits are dropped: nothing of the decoder reaches the loss
        finally:
            handle.remove()
        return kept[0]

    def forward(self, volumes: torch.Tensor, modality_ids: torch.Tensor) -> EncoderOutput:
        ids = self.modality_id_tensor(modality_ids, volumes.shape[0], volumes.device)
        where = [torch.nonzero(ids == m).squeeze(1) for m in ids.unique().tolist()]  # one call per modality
        maps = torch.cat([self._stage4(volumes[w]) for w in where])[torch.argsort(torch.cat(where))]
        tokens = maps.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens, tokens.mean(1), [maps])


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: stage 1 or 2, S studies x M modalities (V = S * M volumes) of side ``size`` (a multiple of
    32: SwinUNETR's rule; 64 at least, for its instance norms in training), the paper's trunk at feature size
    ``feature`` (a multiple of 12), window ``window`` and ``heads`` per stage."""

    stage: int
    size: int
    feature: int = 48
    studies: int = 2
    modalities: int = 2
    window: int = 7
    heads: tuple[int, ...] = (3, 6, 12, 24)

    @property
    def volumes(self) -> int:
        return self.studies * self.modalities

    def label(self) -> str:
        trunk = "" if (self.window, self.heads) == (7, (3, 6, 12, 24)) else f" window {self.window} heads {self.heads}"
        return f"stage {self.stage}, {self.studies}x{self.modalities}x1x{self.size}^3 f{self.feature}{trunk}"


def make_batch(case: Case, device: str, seed: int = 0) -> Batch:
    """The batch contract of the loaders: every study has modalities 0..M-1, volumes in study order; report embeddings
    [S, 384] (stage 1) or class labels [S] (stage 2)."""
    g = torch.Generator().manual_seed(seed)
    s, m, side = case.studies, case.modalities, case.size
    batch = {"volumes": torch.randn(s * m, 1, side, side, side, generator=g),
             "modality_ids": torch.arange(m).repeat(s), "study_index": torch.arange(s).repeat_interleave(m),
             "report_embeddings": torch.randn(s, TEXT_DIM, generator=g),
             "labels": torch.randint(0, NUM_CLASSES, (s,), generator=g)}
    return {**{k: v.to(device) for k, v in batch.items()}, "num_studies": s}


def build_model(stage: int, encoder: nn.Module, seed: int) -> nn.Module:
    """Stage 1's or stage 2's model around ``encoder``, the heads seeded by ``seed`` (same seed, same heads)."""
    torch.manual_seed(seed)
    if stage == 1:
        return MedMAPPretrainModel(encoder, TEXT_DIM, **HEADS[1])
    prompts = torch.randn(len(encoder.modalities), TEXT_DIM)  # one frozen prompt embedding per modality
    return MedMAPClassifier(encoder, NUM_CLASSES, prompts, **HEADS[2])


def build_rows(case: Case, device: str, names: tuple[str, ...] = ROWS, seed: int = 0) -> dict[str, nn.Module]:
    """Every row's model, all holding one set of weights: the reference's MONAI SwinUNETR (and a use_checkpoint copy),
    ours from its swinViT; the twelve default modalities."""
    from monai.networks.nets import SwinUNETR

    modalities = ModalityRegistry(None)
    torch.manual_seed(seed)
    trunk = dict(feature_size=case.feature, window_size=case.window, num_heads=case.heads)
    unetr = SwinUNETR(in_channels=1, out_channels=2, **trunk)
    unetr_ckpt = SwinUNETR(in_channels=1, out_channels=2, **trunk, use_checkpoint=True)
    unetr_ckpt.load_state_dict(unetr.state_dict())
    swin = {**paper_config(case.feature), "window_size": case.window, "num_heads": case.heads}
    encoder = MedMAPEncoder(modalities, sharing="gated", **swin).from_monai(unetr)
    models = {OURS: build_model(case.stage, encoder, seed + 1),
              REFERENCE: build_model(case.stage, AuthorsEncoder(unetr, modalities), seed + 1),
              REFERENCE_CKPT: build_model(case.stage, AuthorsEncoder(unetr_ckpt, modalities), seed + 1)}
    for name in (OURS_CKPT, OURS_COMPILED):
        if name in names:
            models[name] = apply_train_options(copy.deepcopy(models[OURS]), OPTIONS[name])
    return {name: models[name].to(device) for name in names if name in models}


def shared_name(name: str) -> str:
    """A parameter's name with either trunk's prefix as ``trunk.`` (ours and MONAI's trunks share their keys)."""
    for prefix in TRUNKS:
        if name.startswith(prefix):
            return "trunk." + name[len(prefix):]
    return name


def shared_parameters(ours: nn.Module, reference: nn.Module) -> list[str]:
    """The parameters both models have under one (shared) name and shape: every head parameter and the trunk's, less
    the per-modality patch embedding and the gates (ours) and the UNETR decoder (the reference's)."""
    theirs = {shared_name(n): p.shape for n, p in reference.named_parameters()}
    return [s for n, p in ours.named_parameters() if theirs.get(s := shared_name(n)) == p.shape]


def parameter_line(ours: nn.Module, reference: nn.Module) -> str:
    """How the parameter counts compare (the fairness of "same architecture")."""
    shared = set(shared_parameters(ours, reference))

    def count(model: nn.Module, inside: bool, prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters()
                   if (shared_name(n) in shared) == inside and n.startswith(prefix))

    heads = count(ours, True, "") - count(ours, True, "encoder.")
    return (f"parameters: heads {heads:,} in both; Swin trunk {count(ours, True, 'encoder.'):,} in both, plus "
            f"{count(ours, False, 'encoder.'):,} ours only (12 patch-embedding slots, modality gates) against the "
            f"reference's one patch embedding {count(reference, False, TRUNKS[1]):,}; the reference's UNETR "
            f"decoder {count(reference, False, 'encoder.') - count(reference, False, TRUNKS[1]):,} (run, no gradient)")


def probe(model: nn.Module, batch: Batch, stage: int, names: list[str], backend: str, amp: str) -> Step:
    """One forward + backward of the stage's step loss (no update): [loss, the gradients of ``names``]."""
    step_loss = STAGES[stage][1]

    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with mf.kernels.backend(backend), autocast(batch["volumes"].device, amp):
            loss, _ = step_loss(model, batch)
            loss.backward()
        params = {shared_name(n): p for n, p in model.named_parameters()}
        return [loss.detach()] + [torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.clone()
                                  for n in names]

    return run


def train_step(model: nn.Module, batch: Batch, stage: int, backend: str, amp: str) -> Callable[[], None]:
    """One update as fit() makes it (no accumulation): zero the gradients, the stage's step loss under autocast,
    backward, gradient clipping, AdamW (the same optimiser in every row)."""
    optimizer, step_loss = adamw(model, TRAIN, batch["volumes"].device), STAGES[stage][1]

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mf.kernels.backend(backend), autocast(batch["volumes"].device, amp):
            loss, _ = step_loss(model, batch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
        optimizer.step()

    return run


def heads_differ(ours: nn.Module, reference: nn.Module) -> bool:
    """Whether anything but the encoder (names, shapes, values) differs between two rows' models."""
    a, b = ({n: t for n, t in m.state_dict().items() if not n.startswith("encoder.")} for m in (ours, reference))
    return a.keys() != b.keys() or not all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def recording_trunk_inputs(model: nn.Module, run: Step, seen: list[tuple[int, ...]]) -> Step:
    """``run``, appending to ``seen`` the shape of every input of the model's Swin patch embedding (one per trunk
    call)."""
    embeds = [m for n, m in model.named_modules() if n.endswith("patch_embed")]

    def recorded() -> list[torch.Tensor]:
        handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape))) for m in embeds]
        try:
            return run()
        finally:
            for h in handles:
                h.remove()

    return recorded


@dataclasses.dataclass
class Prepared:
    """The rows of one case after the checks: which passed (``checked``), their models, the timed batch, and what the
    fairness check found."""

    models: dict[str, nn.Module]
    checked: Checked
    batch: Batch
    notes: list[str]


def prepare(case: Case, device: str, names: tuple[str, ...] = ROWS, backend: str = "torch", amp: str = "off",
            parity_case: Case | None = None) -> Prepared:
    """Build the rows and check, before any update, that the comparison is fair and every row computes the same step:
    the heads alike, the same volumes of the same size through ours' and the reference's trunk, and each row's loss
    and shared gradients within the flash rule of a float64 run of the reference (its decoder off), the reference row
    in the working precision being the rule's reference. On ``parity_case``'s batch if given (a float64 step of the
    whole batch at full size may not fit a GPU), else on the timed one."""
    models = build_rows(case, device, tuple(dict.fromkeys((OURS, REFERENCE, *names))))
    ours, reference = models[OURS], models[REFERENCE]
    if heads_differ(ours, reference):
        raise AssertionError("unfair comparison: the heads of ours and the reference differ")
    shared = shared_parameters(ours, reference)
    check = parity_case or case
    batch = make_batch(check, device)
    exact_model = copy.deepcopy(reference).double()
    exact_model.encoder.run_decoder = False
    batch64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    exact = probe(exact_model, batch64, case.stage, shared, "torch", "off")()
    del exact_model, batch64
    seen: dict[str, list[tuple[int, ...]]] = {OURS: [], REFERENCE: []}
    ref_step = probe(reference, batch, case.stage, shared, backend, amp)
    ref = recording_trunk_inputs(reference, ref_step, seen[REFERENCE])()
    steps = {name: probe(models[name], batch, case.stage, shared, backend, amp) for name in names if name != REFERENCE}
    steps[OURS] = recording_trunk_inputs(ours, steps[OURS], seen[OURS])
    checked = keep_passing(steps, ref, exact, {})
    checked.steps[REFERENCE], checked.errors[REFERENCE] = ref_step, flash_rule(ref, ref, exact)[:2]
    want = (check.volumes, {(1, *(check.size,) * 3)})  # volumes in all, the one shape of each
    through = {name: (sum(s[0] for s in shapes), {s[1:] for s in shapes}) for name, shapes in seen.items()}
    if seen[OURS] and not through[OURS] == through[REFERENCE] == want:
        raise AssertionError(f"unfair comparison: through the trunks went {seen}, expected {want}")
    notes = [f"through the Swin trunk per step: ours {len(seen[OURS])} call(s) of {[s[0] for s in seen[OURS]]} "
             f"volumes, the reference {len(seen[REFERENCE])} (one per modality) of {[s[0] for s in seen[REFERENCE]]}; "
             f"1 x {check.size}^3 each (parity batch)", parameter_line(ours, reference)]
    if parity_case is not None and parity_case != case:  # the compiled row then recompiles for the timed batch
        torch._dynamo.reset()
    return Prepared({n: models[n] for n in names}, checked, make_batch(case, device), notes)


def ratio_table(case: Case, medians: dict[str, tuple[float, float]], peaks: dict[str, float], checked: Checked) -> str:
    """Markdown rows: seconds per step (wall, process CPU), volumes/s, each row's ratio to the reference row (ours /
    reference volumes/s; wall and CPU time), peak MiB and its ratio, and the parity errors."""
    base_wall, base_cpu = medians.get(REFERENCE, (float("nan"), float("nan")))
    base_peak = peaks.get(REFERENCE, float("nan"))
    lines = ["| row | s/step | volumes/s | x reference | CPU s/step | x reference (CPU) | peak MiB | x reference "
             "(peak) | err vs fp64 (reference's) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (wall, cpu) in medians.items():
        err, ref_err = checked.errors[name]
        lines.append(f"| {name} | {wall:.2f} | {case.volumes / wall:.3g} | {base_wall / wall:.2f} | {cpu:.2f} | "
                     f"{base_cpu / cpu:.2f} | {peaks[name]:.0f} | {peaks[name] / base_peak:.2f} | {err:.2g} "
                     f"({ref_err:.2g}) |")
    lines += [f"| {name} | not timed: {reason} | | | | | | | |" for name, reason in checked.skipped.items()]
    return "\n".join(lines)


def cpu_rows(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` less the compiled row where the CPU cannot compile (said once)."""
    reason = cpu_compiler_missing()
    if reason and OURS_COMPILED in names:
        print(f"{OURS_COMPILED}: skipped, torch.compile needs {reason}", file=sys.stderr)
        return tuple(n for n in names if n != OURS_COMPILED)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=STAGES)
    parser.add_argument("--size", type=int, default=64, help="cubic volume side, a multiple of 32 (default 64)")
    parser.add_argument("--feature", type=int, default=48, help="Swin feature size, a multiple of 12 (default 48)")
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--modalities", type=int, default=2, help="volumes per study (default 2, as the authors')")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = cpu_rows(tuple(dict.fromkeys([REFERENCE, *args.rows])))  # the ratios need the reference row
    print(f"device: {device_line()}; optimiser AdamW lr {TRAIN.lr} weight decay {TRAIN.weight_decay}, fp32")
    failed = False
    for stage in args.stages:
        case = Case(stage, args.size, args.feature, args.studies, args.modalities)
        prepared = prepare(case, "cpu", names)
        steps = {name: train_step(prepared.models[name], prepared.batch, stage, "torch", "off")
                 for name in names if name in prepared.checked.steps}
        medians = interleaved_cpu(steps, args.repeats, args.warmup)
        peaks = {name: cpu_peak_mib(step) for name, step in steps.items()}
        print(f"\n{case.label()}: one {STAGES[stage][0]} update, median of {args.repeats} interleaved repeats after "
              f"{args.warmup} warm-up\n" + "\n".join(f"- {note}" for note in prepared.notes) + "\n")
        print(ratio_table(case, medians, peaks, prepared.checked), flush=True)
        failed |= bool(prepared.checked.failed)
        del prepared, steps
    return 1 if failed else 0


def gpu_rows(cases: tuple[Case, ...] = (Case(1, 96, studies=4), Case(2, 128, studies=4))) -> list[dict]:
    """Rows for bench/gpu_check.py: every row against the reference, bf16 autocast, Triton backend; parity on two
    studies of one volume each at the timed size (a float64 step of the whole batch would not fit)."""
    rows = []
    for case in cases:
        prepared = prepare(case, "cuda", ROWS, "triton", "auto", dataclasses.replace(case, studies=2, modalities=1))
        torch.cuda.empty_cache()
        timed = {}
        for name in prepared.checked.steps:  # the peak after the timing, the optimiser state allocated by then
            step = train_step(prepared.models[name], prepared.batch, case.stage, "triton", "auto")
            timed[name] = (cuda_time_ms(step, warmup=2, repeats=5), peak_mib(step))
        base_ms, base_peak = timed.get(REFERENCE, (None, None))
        skipped = prepared.checked.skipped
        for i, name in enumerate(n for n in ROWS if n != REFERENCE):
            ms, peak = timed.get(name, (None, None))
            err, ref_err = prepared.checked.errors.get(name, (None, None))
            rows.append({"op": f"train step stage {case.stage} ({name})", "case": case.label(),
                         "dtype": "bf16-autocast", "pass": "fwd+bwd+AdamW", "ms": ms, "baseline": REFERENCE,
                         "baseline_ms": base_ms, "speedup": None if ms is None or base_ms is None else base_ms / ms,
                         "peak_mib": peak, "baseline_peak_mib": base_peak, "metric": "volumes/s",
                         "value": None if ms is None else case.volumes / ms * 1e3, "max_err": err, "ref_err": ref_err,
                         "ok": name in prepared.checked.steps,
                         "note": "; ".join([*(prepared.notes if i == 0 else []),  # the case's, once
                                            *(f"{k}: {skipped[k]}" for k in (name, REFERENCE) if k in skipped)])})
        del prepared
        torch.cuda.empty_cache()
    return rows


def small_case(stage: int) -> Case:
    """The pytest size: 2 studies x 2 modalities x 1 x 64^3 (SwinUNETR's smallest in training), feature 12, window 4,
    heads 1-2-4-8 (head size 12)."""
    return Case(stage, 64, feature=12, window=4, heads=(1, 2, 4, 8))


@functools.lru_cache(maxsize=2)
def small(stage: int) -> Prepared:
    """Every row of the small case, checked once per stage."""
    return prepare(small_case(stage), "cpu", cpu_rows(ROWS))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ROWS)
def test_train_step_cpu(benchmark, name: str, stage: int) -> None:
    pytest.importorskip("monai.networks.nets", reason="the reference is MONAI's SwinUNETR")
    if name == OURS_COMPILED and (reason := cpu_compiler_missing()):
        pytest.skip(f"torch.compile on the CPU needs {reason}")
    prepared = small(stage)
    step_or_skip(prepared.checked, name)
    benchmark.group = f"train step cpu {small_case(stage).label()}"
    benchmark.extra_info.update(device=device_line(), max_err=prepared.checked.errors[name][0],
                                ref_err=prepared.checked.errors[name][1], volumes=small_case(stage).volumes)
    benchmark.pedantic(train_step(prepared.models[name], prepared.batch, stage, "torch", "off"), rounds=2,
                       warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
