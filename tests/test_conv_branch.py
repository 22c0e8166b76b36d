"""The encoder's optional conv branch: its reference computation (odd shapes, no unshuffle), that it leaves the trunk's
(MONAI) outputs alone, how both models use its detections, gradients, save/load, and configuration errors naming
the setting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from medmap_fast.models.conv_branch import ConvBranch, space_to_depth
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.train.config import EncoderConfig

SMALL = dict(embed_dim=12, patch_size=2, window_size=4, depths=(2, 2), num_heads=(3, 6))
BRANCH = {"stages": [[4], [6, 5]], "unshuffle": 2}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def unshuffle_reference(x: torch.Tensor, f: int) -> torch.Tensor:
    """Space-to-depth by loops: channel c*f^3 + (a*f + b)*f + e of position (i, j, k) is voxel (f*i+a, f*j+b, f*k+e)
    of channel c, 0 past the end."""
    v, c, d, h, w = x.shape
    out = x.new_zeros(v, c * f**3, -(-d // f), -(-h // f), -(-w // f))
    for a in range(f):
        for b in range(f):
            for e in range(f):
                part = x[:, :, a::f, b::f, e::f]
                out[:, (a * f + b) * f + e :: f**3, : part.shape[2], : part.shape[3], : part.shape[4]] = part
    return out


def branch_reference(branch: ConvBranch, x: torch.Tensor) -> torch.Tensor:
    """The branch written out with functional ops in float64 (eval mode: BatchNorm with its running statistics)."""
    x = unshuffle_reference(x.double(), branch.unshuffle)
    convs = [m for m in branch.blocks if isinstance(m, torch.nn.Conv3d)]
    norms = [m for m in branch.blocks if isinstance(m, torch.nn.BatchNorm3d)]
    first_of_stage = {sum(len(s) for s in branch.stages[:i]) for i in range(1, len(branch.stages))}
    for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
        if i in first_of_stage:
            x = F.max_pool3d(x, 2)
        x = F.conv3d(x, conv.weight.double(), padding=1)
        mean, var = norm.running_mean.double(), norm.running_var.double()
        x = (x - mean[:, None, None, None]) / torch.sqrt(var[:, None, None, None] + norm.eps)
        x = F.relu(x * norm.weight.double()[:, None, None, None] + norm.bias.double()[:, None, None, None])
    return x.amax((2, 3, 4))


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_space_to_depth_keeps_every_voxel(factor: int) -> None:
    x = torch.randn(2, 2, 7, 6, 5)
    out = space_to_depth(x, factor)
    assert torch.equal(out, unshuffle_reference(x, factor))
    assert torch.equal(out[out != 0].sort().values, x.flatten().sort().values)  # a permutation plus zeros


@pytest.mark.parametrize("shape, unshuffle", [((3, 1, 16, 16, 16), 2), ((2, 1, 13, 9, 11), 2), ((2, 1, 9, 8, 7), 1)])
def test_branch_matches_its_reference(shape, unshuffle: int) -> None:
    branch = ConvBranch(1, BRANCH["stages"], unshuffle)
    with torch.no_grad():  # non-trivial normalisation statistics and affine
        for norm in (m for m in branch.blocks if isinstance(m, torch.nn.BatchNorm3d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(shape)
    out = branch.eval()(x)
    assert out.shape == (shape[0], 5) and branch.out_channels == 5
    torch.testing.assert_close(out.double(), branch_reference(branch, x), rtol=1e-5, atol=1e-5)


def test_encoder_adds_detections_and_keeps_the_trunk_outputs() -> None:
    plain = MedMAPEncoder(modalities=["T1", "T2"], **SMALL).eval()
    with_branch = MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL).eval()
    missing, unexpected = with_branch.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("conv_branch.") for k in missing)
    x, ids = torch.randn(3, 1, 15, 12, 17), torch.tensor([0, 1, 1])
    with torch.no_grad():
        a, b = plain(x, ids), with_branch(x, ids)
        assert a.detections is None and torch.equal(b.detections, with_branch.conv_branch(x))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)  # MONAI's outputs unchanged
    assert all(torch.equal(p, q) for p, q in zip(a.features, b.features, strict=True))
    assert b.detections.shape == (3, 5)


def test_gradients_reach_the_branch() -> None:
    enc = MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL)
    out = enc(torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 0, 1]))
    (out.detections * torch.randn(out.detections.shape)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.conv_branch.parameters())


def test_models_add_a_linear_map_of_the_detections() -> None:
    """Stage 1: volume embedding + detection_proj(detections); stage 2: logits + detection_head(each study's maximum
    of its volumes' detections)."""
    enc = MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL).eval()
    x, ids, study = torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 1])
    pre = MedMAPPretrainModel(enc, text_dim=8, embed_dim=6).eval()
    clf = MedMAPClassifier(enc, 3, torch.randn(2, 8), dim=16, num_heads=2).eval()
    with torch.no_grad():
        out = enc(x, ids)
        want = pre.vision_proj(out.pooled) + pre.detection_proj(out.detections)
        torch.testing.assert_close(pre.embed_volumes(x, ids), want)
        got = clf(x, ids, study)
        per_study = torch.stack([out.detections[study == s].amax(0) for s in range(2)])
        torch.testing.assert_close(got.logits, clf.head(got.features) + clf.detection_head(per_study))
    plain = MedMAPClassifier(MedMAPEncoder(modalities=["T1", "T2"], **SMALL), 3, torch.randn(2, 8), dim=16, num_heads=2)
    assert not hasattr(plain, "detection_head")


def test_save_load_round_trip_and_config_mismatch(tmp_path) -> None:
    enc = MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL)
    enc(torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 0, 1]))  # training mode: BatchNorm statistics move
    enc.eval().save_pretrained(tmp_path / "branch")
    config = json.loads((tmp_path / "branch" / "config.json").read_text())
    assert config["conv_branch"] == BRANCH and config["format_version"] == 2
    loaded = MedMAPEncoder.from_pretrained(tmp_path / "branch", conv_branch=BRANCH).eval()
    ours, theirs = enc.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, ids = torch.randn(2, 1, 16, 16, 16), torch.tensor([1, 0])
    with torch.no_grad():
        assert torch.equal(enc(x, ids).tokens, loaded(x, ids).tokens)
    with pytest.raises(ValueError, match=r"branch/config\.json: stored conv_branch=\{'stages': \[\[4\], \[6, 5\]\], "
                                         r"'unshuffle': 2\} does not match the requested conv_branch=None"):
        MedMAPEncoder.from_pretrained(tmp_path / "branch", conv_branch=None)
    plain = MedMAPEncoder(modalities=["T1", "T2"], **SMALL)
    plain.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["format_version"] == 1  # older readers
    assert plain.architecture_differences(enc) == [f"conv_branch: None vs {BRANCH!r}"]
    (tmp_path / "branch" / "model.safetensors").replace(tmp_path / "plain" / "model.safetensors")
    with pytest.raises(ValueError, match=r"plain/model\.safetensors: weights do not match .*unexpected "
                                         r"\['conv_branch\.blocks\.0\.weight'"):
        MedMAPEncoder.from_pretrained(tmp_path / "plain")


@pytest.mark.parametrize(
    "setting",
    [[4, 8], {"stages": []}, {"stages": [[4, 0]]}, {"stages": [4, 8]}, {"stages": [[]]}, {"stages": "16"},
     {"stages": [[4.0]]}, {"stages": [[True]]}, {"stages": [[4]], "unshuffle": 0}, {"stages": [[4]], "width": 2},
     {"unshuffle": 2}],
    ids=["list", "empty", "zero", "flat", "empty-stage", "str", "float", "bool", "unshuffle", "unknown", "no-stages"],
)
def test_bad_settings_are_errors_naming_the_setting(setting) -> None:
    with pytest.raises(ValueError, match=r"conv_branch: expected null \(no branch\) or \{stages: "):
        MedMAPEncoder(conv_branch=setting, **SMALL)
    with pytest.raises(ValueError, match=r"encoder\.conv_branch: expected null \(no branch\) or \{stages: "):
        EncoderConfig(conv_branch=setting)


def test_volumes_smaller_than_the_branch_pools_are_an_error() -> None:
    # unshuffle 2, then 2 pools: sides of at least 8
    enc = MedMAPEncoder(modalities=["T1"], conv_branch={"stages": [[4], [4], [4]]}, **SMALL).eval()
    with pytest.raises(ValueError, match=r"volumes: .*D, H, W >= \(8, 8, 8\).*got shape \(1, 1, 8, 7, 8\)"):
        enc(torch.randn(1, 1, 8, 7, 8), [0])
    assert enc(torch.randn(1, 1, 8, 9, 8), [0]).detections.shape == (1, 4)


def test_stage1_branch_reaches_stage2_and_a_mismatch_is_refused(tmp_path) -> None:
    pre = MedMAPPretrainModel(MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL), text_dim=8)
    pre.encoder(torch.randn(4, 1, 16, 16, 16), [0, 1, 0, 1])  # moves the BatchNorm statistics
    pre.save_pretrained(tmp_path / "stage1")
    clf = MedMAPClassifier(MedMAPEncoder(modalities=["T1", "T2"], conv_branch=BRANCH, **SMALL), 3, torch.randn(2, 8))
    clf.load_pretrained_encoder(tmp_path / "stage1")
    ours, theirs = clf.encoder.state_dict(), pre.encoder.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("conv_branch."))
    plain = MedMAPClassifier(MedMAPEncoder(modalities=["T1", "T2"], **SMALL), 3, torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"source: expected an encoder of this classifier's architecture, got one "
                                         r"that differs in conv_branch: None vs \{'stages'"):
        plain.load_pretrained_encoder(tmp_path / "stage1")
