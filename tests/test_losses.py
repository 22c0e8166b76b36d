"""Losses: the asymmetric contrastive loss against a brute-force loop (values, gradients, 2-process gloo run),
sigmoid focal loss against the formula and MONAI, the label-prompt alignment loss, and input validation."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medmap_fast.losses import AsymmetricContrastiveLoss, FocalLoss, LabelPromptAlignmentLoss

# ---------------------------------------------------------------------------------------------------------------
# asymmetric contrastive loss


def brute_force(v, t, study, lam, logit_scale, logit_scale_max):
    """The DESIGN definition written as plain loops over volumes and reports (autograd-friendly scalar ops)."""
    scale = torch.exp(torch.clamp(logit_scale, max=logit_scale_max))
    vn = [v[i] / torch.sqrt((v[i] * v[i]).sum()) for i in range(v.shape[0])]
    tn = [t[s] / torch.sqrt((t[s] * t[s]).sum()) for s in range(t.shape[0])]
    sim = [[scale * (vn[i] * tn[s]).sum() for s in range(len(tn))] for i in range(len(vn))]
    v2t = 0.0
    for i in range(len(vn)):
        v2t = v2t - (sim[i][study[i]] - torch.log(sum(torch.exp(x) for x in sim[i])))
    v2t = v2t / len(vn)
    t2v, reports_with_volume = 0.0, 0
    for s in range(len(tn)):
        positives = [i for i in range(len(vn)) if study[i] == s]
        if not positives:
            continue
        reports_with_volume += 1
        numerator = sum(torch.exp(sim[i][s]) for i in positives)
        denominator = sum(torch.exp(sim[i][s]) for i in range(len(vn)))
        t2v = t2v - torch.log(numerator / denominator)
    t2v = t2v / reports_with_volume
    return lam * v2t + (1 - lam) * t2v, v2t, t2v


STRUCTURES = {
    "one_volume_per_study": ([0, 1, 2, 3], 4),
    "two_per_study": ([0, 0, 1, 1, 2, 2], 3),
    "unequal_counts": ([0, 0, 0, 1, 2, 2], 3),
    "report_without_volume": ([0, 0, 2, 2, 3], 4),
    "shuffled_order": ([2, 0, 1, 0, 2, 1, 1], 3),
}


def _batch(study: list[int], n_reports: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(study), dim, generator=g, dtype=torch.float64)
    t = torch.randn(n_reports, dim, generator=g, dtype=torch.float64)
    return v, t, torch.tensor(study)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_contrastive_matches_brute_force_values_and_gradients(structure, lam):
    study, n_reports = STRUCTURES[structure]
    v, t, idx = _batch(study, n_reports)
    loss_fn = AsymmetricContrastiveLoss(lam=lam, logit_scale_init=math.log(1 / 0.3)).double()
    v1, t1 = v.clone().requires_grad_(), t.clone().requires_grad_()
    loss, parts = loss_fn(v1, t1, idx, return_parts=True)
    loss.backward()

    v2, t2 = v.clone().requires_grad_(), t.clone().requires_grad_()
    s2 = loss_fn.logit_scale.detach().clone().requires_grad_()
    ref, ref_v2t, ref_t2v = brute_force(v2, t2, study, lam, s2, math.log(100))
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["loss_v2t"], ref_v2t.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["loss_t2v"], ref_t2v.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.logit_scale.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_report_without_volume_is_only_a_negative():
    """Report 1 has no volume: it stays in the v2t softmax denominators but adds no t2v term."""
    v, t, idx = _batch([0, 0, 2, 2, 3], 4)
    loss_fn = AsymmetricContrastiveLoss(lam=0.0).double()
    t_moved = t.clone()
    t_moved[1] = torch.randn(8, dtype=torch.float64)
    # t2v of the other reports depends on report 1 not at all ...
    torch.testing.assert_close(loss_fn(v, t, idx), loss_fn(v, t_moved, idx))
    # ... while v2t (lam=1) does, through the denominators
    v2t_only = AsymmetricContrastiveLoss(lam=1.0).double()
    assert not torch.allclose(v2t_only(v, t, idx), v2t_only(v, t_moved, idx))


def test_clamped_scale_matches_brute_force_and_has_no_scale_gradient():
    v, t, idx = _batch([0, 0, 1, 2], 3)
    loss_fn = AsymmetricContrastiveLoss(logit_scale_init=math.log(500)).double()
    assert loss_fn.scale().item() == pytest.approx(100.0)
    loss = loss_fn(v, t, idx)
    loss.backward()
    ref, _, _ = brute_force(v, t, [0, 0, 1, 2], 0.5, torch.tensor(math.log(500), dtype=torch.float64), math.log(100))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert loss_fn.logit_scale.grad == 0.0


def test_one_volume_per_study_equals_symmetric_clip_loss():
    """With one volume per study and lam=0.5 the loss is CLIP's symmetric InfoNCE (open_clip ClipLoss)."""
    v, t, idx = _batch([0, 1, 2, 3, 4], 5, dim=16)
    loss_fn = AsymmetricContrastiveLoss(lam=0.5).double()
    logits = loss_fn.scale() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    labels = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss_fn(v, t, idx), clip)


def test_invariant_to_embedding_norm():
    v, t, idx = _batch([0, 0, 1, 2, 2], 3)
    loss_fn = AsymmetricContrastiveLoss().double()
    rescaled_v = v * torch.rand(5, 1, dtype=torch.float64).add(0.1) * 30
    rescaled_t = t * torch.rand(3, 1, dtype=torch.float64).add(0.1) * 0.01
    torch.testing.assert_close(loss_fn(v, t, idx), loss_fn(rescaled_v, rescaled_t, idx))


def test_gradcheck_float64():
    v, t, idx = _batch([1, 0, 0, 2], 4, dim=5)
    loss_fn = AsymmetricContrastiveLoss(lam=0.3).double()
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn(a, b, idx), (v.requires_grad_(), t.requires_grad_()), eps=1e-6, atol=1e-7
    )


def test_low_precision_inputs_computed_in_float32():
    v, t, idx = _batch([0, 1, 1, 2], 3, dim=32)
    loss_fn = AsymmetricContrastiveLoss()
    reference = loss_fn(v.float(), t.float(), idx)
    low = loss_fn(v.bfloat16(), t.bfloat16(), idx)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, rtol=2e-2, atol=2e-2)


def test_fixed_scale_is_a_buffer():
    loss_fn = AsymmetricContrastiveLoss(learnable_scale=False)
    assert not list(loss_fn.parameters())
    assert "logit_scale" in loss_fn.state_dict()


V4, S2, IDX4 = torch.randn(4, 8), torch.randn(2, 8), torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(4), S2, IDX4), r"volume_emb: expected a float tensor \[V, E\]"),
        ((V4.long(), S2, IDX4), r"volume_emb: expected a float tensor"),
        ((torch.full((4, 8), float("nan")), S2, IDX4), r"volume_emb: expected finite"),
        ((V4, torch.randn(2, 7), IDX4), r"report_emb: expected a float tensor \[S, 8\].*\(2, 7\)"),
        ((V4, torch.randn(0, 8), IDX4), r"report_emb: .*S >= 1"),
        ((V4, S2, torch.tensor([0, 1, 0])), r"study_index: expected a 1-D integer tensor \[4\]"),
        ((V4, S2, torch.tensor([0, 1, 2, 1])), r"study_index: .*\[0, 2\).*values in \[0, 2\]"),
        ((V4, S2, IDX4.float()), r"study_index: .*dtype torch.float32"),
    ],
)
def test_contrastive_validation(args, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricContrastiveLoss()(*args)


def test_contrastive_constructor_validation():
    with pytest.raises(ValueError, match="lam: expected a weight in"):
        AsymmetricContrastiveLoss(lam=1.5)
    with pytest.raises(ValueError, match="logit_scale: expected a finite value"):
        AsymmetricContrastiveLoss(logit_scale_init=float("inf"))
    with pytest.raises(ValueError, match="logit_scale_max: expected a finite value"):
        AsymmetricContrastiveLoss(logit_scale_max=float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes on CPU against one process on the global batch

# rank 0 holds studies 0-2 (5 volumes), rank 1 holds studies 3-6 (3 volumes; report 6 has none): unequal counts
GLOBAL_STUDY = [0, 1, 0, 2, 2, 3, 4, 3]
RANK_VOLUMES = [slice(0, 5), slice(5, 8)]
RANK_REPORTS = [slice(0, 3), slice(3, 7)]
DIST_LAM = 0.3


def _global_batch():
    return _batch(GLOBAL_STUDY, 7, dim=6, seed=3)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        v, t, idx = _global_batch()
        vs, ts = RANK_VOLUMES[rank], RANK_REPORTS[rank]
        results = {}
        for local_loss in (False, True):
            loss_fn = AsymmetricContrastiveLoss(lam=DIST_LAM, local_loss=local_loss).double()
            v_local, t_local = v[vs].clone().requires_grad_(), t[ts].clone().requires_grad_()
            loss = loss_fn(v_local, t_local, idx[vs] - ts.start)
            loss.backward()
            results[local_loss] = {
                "loss": loss.detach(), "v_grad": v_local.grad, "t_grad": t_local.grad,
                "scale_grad": loss_fn.logit_scale.grad,
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves while its peer still uses the group (gloo aborts the peer otherwise)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # results are saved; skip interpreter finalisation, where gloo's threads can still abort (SIGABRT)


def test_distributed_gather_equals_single_process(tmp_path):
    world = 2
    ctx = mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.terminate()
            pytest.fail("the 2 gloo workers did not finish within 180 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    v, t, idx = _global_batch()
    v.requires_grad_()
    t.requires_grad_()
    single = AsymmetricContrastiveLoss(lam=DIST_LAM).double()
    loss = single(v, t, idx)
    loss.backward()

    for local_loss in (False, True):
        got = [r[local_loss] for r in ranks]
        if local_loss:  # each rank returns W x its share: the mean over ranks is the global loss
            torch.testing.assert_close(sum(g["loss"] for g in got) / world, loss.detach())
        else:  # every rank returns the global loss
            for g in got:
                torch.testing.assert_close(g["loss"], loss.detach())
        # DDP averages gradients over ranks: W x the global gradient of local rows, averaged scale gradient
        for rank, g in enumerate(got):
            torch.testing.assert_close(g["v_grad"] / world, v.grad[RANK_VOLUMES[rank]])
            torch.testing.assert_close(g["t_grad"] / world, t.grad[RANK_REPORTS[rank]])
        torch.testing.assert_close(sum(g["scale_grad"] for g in got) / world, single.logit_scale.grad)


# ---------------------------------------------------------------------------------------------------------------
# focal loss


def focal_formula(x: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p = torch.sigmoid(x)
    return -(alpha * y * (1 - p) ** gamma * torch.log(p) + (1 - alpha) * (1 - y) * p**gamma * torch.log(1 - p))


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.5), (0.9, 3.0)])
def test_focal_matches_formula_binary_and_multilabel(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(6, 4, 3, generator=g) > 0.6).double()
    expected = focal_formula(x, y, alpha, gamma)
    torch.testing.assert_close(FocalLoss(alpha, gamma, "none")(x, y), expected)
    torch.testing.assert_close(FocalLoss(alpha, gamma, "mean")(x, y), expected.mean())
    torch.testing.assert_close(FocalLoss(alpha, gamma, "sum")(x, y), expected.sum())
    binary = FocalLoss(alpha, gamma)(x[:, 0, 0], y[:, 0, 0].long())  # [N] logits with 0/1 integer labels
    torch.testing.assert_close(binary, expected[:, 0, 0].mean())


def test_focal_soft_targets_match_formula():
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.rand(5, 3, dtype=torch.float64)
    p = torch.sigmoid(x)
    one_minus_pt = 1 - (p * y + (1 - p) * (1 - y))
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    expected = (0.25 * y + 0.75 * (1 - y)) * one_minus_pt**2 * ce
    torch.testing.assert_close(FocalLoss()(x, y), expected.mean())


def test_focal_gamma0_no_alpha_is_bce():
    x, y = torch.randn(4, 5), (torch.rand(4, 5) > 0.5).float()
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=0.0)(x, y), F.binary_cross_entropy_with_logits(x, y))


def test_focal_matches_monai():
    monai_losses = pytest.importorskip("monai.losses", reason="monai (the [monai] extra) is not installed")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 5, generator=g) * 2
    y = (torch.rand(3, 4, 5, 5, generator=g) > 0.7).float()
    ref = monai_losses.FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False, reduction="mean")
    torch.testing.assert_close(FocalLoss(0.25, 2.0)(x, y), ref(x, y))
    classes = torch.randint(0, 4, (3, 5, 5), generator=g)  # multi-class indices -> one-hot, as MONAI's to_onehot_y
    ref_onehot = monai_losses.FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False, to_onehot_y=True)
    torch.testing.assert_close(FocalLoss(0.25, 2.0)(x, classes), ref_onehot(x, classes[:, None]))


def test_focal_class_indices_and_single_logit():
    x = torch.randn(6, 3)
    classes = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.testing.assert_close(FocalLoss()(x, classes), FocalLoss()(x, F.one_hot(classes, 3).float()))
    x1 = torch.randn(6, 1)
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    torch.testing.assert_close(FocalLoss()(x1, labels), FocalLoss()(x1, labels[:, None].float()))
    torch.testing.assert_close(FocalLoss()(x1, labels), FocalLoss()(x1[:, 0], labels.bool()))


def test_focal_confident_logits_have_finite_gradients():
    x = torch.tensor([30.0, -30.0, 60.0, 120.0, -200.0, 1e4], requires_grad=True)  # sigmoid underflows past ~87
    loss = FocalLoss(gamma=0.5)(x, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("logits", "target", "match"),
    [
        (torch.randn(4, 3), torch.rand(4, 2), r"target: expected labels of shape \(4, 3\)"),
        (torch.randn(4, 3), torch.tensor([0, 1, 3, 1]), r"target: .*class indices .* in \[0, 3\).*values in \[0, 3\]"),
        (torch.randn(4, 3), torch.full((4, 3), 2.0), r"target: .*values in \[2.0, 2.0\]"),
        (torch.randn(4, 3), torch.full((4, 3), 2), r"target: .*values in \[2.0, 2.0\]"),
        (torch.randn(4, 3), torch.rand(4), r"target: .*dtype torch.float32"),
        (torch.randn(4), torch.tensor([0, 1]), r"target: expected labels of shape \(4,\)"),
        (torch.tensor(1.0), torch.tensor(1.0), r"logits: expected a float tensor"),
        (torch.randint(0, 2, (4, 3)), torch.rand(4, 3), r"logits: expected a float tensor"),
        (torch.randn(4, 3), [0, 1, 2, 1], r"target: .* got list"),
    ],
)
def test_focal_validation(logits, target, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss()(logits, target)


def test_focal_constructor_validation():
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="avg")


# ---------------------------------------------------------------------------------------------------------------
# label-prompt alignment


def test_alignment_cross_entropy_to_class():
    g = torch.Generator().manual_seed(4)
    f, p = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1, 0])
    loss_fn = LabelPromptAlignmentLoss(logit_scale_init=math.log(10.0), bias_init=-1.0).double()
    cosine = torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in p] for a in f], dtype=torch.float64)
    torch.testing.assert_close(loss_fn.logits(f, p), 10.0 * cosine - 1.0)
    torch.testing.assert_close(loss_fn(f, p, target), F.cross_entropy(10.0 * cosine, target))
    torch.testing.assert_close(loss_fn(f * 7, p * 0.1, target), loss_fn(f, p, target))  # norm invariant


def test_alignment_multilabel_bce_with_bias():
    f, p = torch.randn(4, 8), torch.randn(5, 8)
    multi_hot = (torch.rand(4, 5) > 0.5).float()
    loss_fn = LabelPromptAlignmentLoss(logit_scale_init=math.log(5.0), bias_init=-2.0)
    logits = 5.0 * F.normalize(f, dim=-1) @ F.normalize(p, dim=-1).T - 2.0
    torch.testing.assert_close(loss_fn(f, p, multi_hot), F.binary_cross_entropy_with_logits(logits, multi_hot))
    loss_fn(f, p, multi_hot).backward()
    assert loss_fn.logit_bias.grad != 0 and loss_fn.logit_scale.grad != 0


def test_alignment_learns_prompts():
    """A few steps of gradient descent on the features make the right prompt the nearest one."""
    torch.manual_seed(5)
    prompts = torch.randn(4, 12)
    features = torch.randn(8, 12, requires_grad=True)
    target = torch.arange(8) % 4
    loss_fn = LabelPromptAlignmentLoss(learnable=False)
    optimiser = torch.optim.SGD([features], lr=1.0)
    for _ in range(50):
        optimiser.zero_grad()
        loss_fn(features, prompts, target).backward()
        optimiser.step()
    assert torch.equal(loss_fn.logits(features, prompts).argmax(1), target)


@pytest.mark.parametrize(
    ("features", "prompts", "target", "match"),
    [
        (torch.randn(4, 8), torch.randn(3, 6), torch.tensor([0, 1, 2, 0]), r"prompt_emb: expected .* \[K, 8\]"),
        (torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 1, 3, 0]), r"target: .*class indices in \[0, 3\)"),
        (torch.randn(4, 8), torch.randn(3, 8), torch.rand(4, 2), r"target: expected multi-hot float labels \[4, 3\]"),
        (torch.randn(4, 8), torch.randn(3, 8), torch.full((4, 3), 1.5), r"target: expected multi-hot.*values in"),
        (torch.randn(8), torch.randn(3, 8), torch.tensor([0]), r"features: expected a float tensor \[B, E\]"),
    ],
)
def test_alignment_validation(features, prompts, target, match):
    with pytest.raises(ValueError, match=match):
        LabelPromptAlignmentLoss()(features, prompts, target)
