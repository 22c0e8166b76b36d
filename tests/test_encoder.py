"""MedMAPEncoder and the modality registry: MONAI parity in both sharing modes, per-modality weights in a mixed
batch, output order in "separate" mode, bit-exact save/load, configuration mismatches, input validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medmap_fast.modalities import DEFAULT_MODALITY_NAMES, ModalityRegistry
from medmap_fast.models.encoder import MedMAPEncoder

SMALL = dict(embed_dim=12, window_size=5, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))
SHAPE = (4, 1, 20, 18, 22)  # stage grids 10x9x11, 5x5x6, 3x3x3, 2x2x2, 1x1x1


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def volumes() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))


def test_default_modalities() -> None:
    reg = ModalityRegistry()
    assert reg.names == ("T1", "T1c", "T2", "FLAIR", "DWI", "ADC", "T2WI", "T1_in_phase", "T1_opposed_phase",
                         "arterial", "portal_venous", "delayed") == DEFAULT_MODALITY_NAMES
    assert len(set(reg.descriptions)) == 12 and all(reg.descriptions)
    assert reg.description("T1c") == "contrast-enhanced T1-weighted"
    assert reg.index("flair") == reg.index("FLAIR") == 3 and "t2wi" in reg
    assert reg.ids(["ADC", "T1"]).tolist() == [5, 0]
    with pytest.raises(ValueError, match=r"modality: expected one of \('T1', .*got 'PD'"):
        reg.index("PD")


def test_custom_modalities() -> None:
    reg = ModalityRegistry(["T2", ("SWI", "susceptibility-weighted"), "PD"])
    assert reg.names == ("T2", "SWI", "PD") and reg.descriptions == ("T2-weighted", "susceptibility-weighted", "PD")
    assert ModalityRegistry({"SWI": "susceptibility-weighted"}).description(0) == "susceptibility-weighted"
    assert ModalityRegistry(reg.to_config()) == reg
    for bad in (["T1", "t1"], [], "T1", [("T1",)], [""]):
        with pytest.raises(ValueError, match="modalities"):
            ModalityRegistry(bad)


def monai_trunk() -> torch.nn.Module:
    swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr", reason="MONAI is needed for the parity test")
    model = swin_unetr.SwinTransformer(in_chans=1, window_size=(5, 5, 5), patch_size=(2, 2, 2),
                                       **{k: v for k, v in SMALL.items() if k != "window_size"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("sharing", ["gated", "separate"])
def test_equals_monai_after_from_monai(sharing: str, volumes: torch.Tensor) -> None:
    ref = monai_trunk()
    enc = MedMAPEncoder(sharing=sharing, **SMALL).from_monai(ref).eval()
    ids = torch.tensor([3, 0, 11, 3])
    with torch.no_grad():
        out, expected = enc(volumes, ids), ref(volumes)
    for a, b in zip(out.features, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    last = expected[-1].flatten(2).transpose(1, 2)
    assert out.tokens.shape == (4, 1, 192) and out.pooled.shape == (4, 192)
    torch.testing.assert_close(out.tokens, last, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out.pooled, last.mean(1), rtol=1e-4, atol=2e-5)


def test_gated_mixed_batch_uses_each_volumes_patch_weights(volumes: torch.Tensor) -> None:
    enc = MedMAPEncoder(modalities=["T1", "T2", "FLAIR"], **SMALL).eval()
    ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        before = enc(volumes, ids).tokens
        enc.trunk.patch_embed.proj.weight[2].mul_(1.5)  # perturb FLAIR's patch embedding only
        after = enc(volumes, ids).tokens
    assert torch.equal(after[[1, 3]], before[[1, 3]])  # T1 and T2 volumes: bit-identical
    assert not torch.allclose(after[[0, 2]], before[[0, 2]])  # FLAIR volumes change
    single = enc(volumes[2:3], torch.tensor([2])).tokens.detach()  # one pass for all == each volume on its own
    torch.testing.assert_close(after[2:3], single, rtol=1e-5, atol=1e-6)


def test_separate_groups_by_modality_and_restores_order(volumes: torch.Tensor) -> None:
    enc = MedMAPEncoder(modalities=["T1", "T2", "FLAIR"], sharing="separate", **SMALL).eval()
    ids = ["FLAIR", "T1", "FLAIR", "T2"]
    with torch.no_grad():
        out = enc(volumes, ids)
        for i, name in enumerate(ids):
            alone = enc.trunks[enc.modalities.index(name)](volumes[i : i + 1])
            for a, b in zip(out.features, alone):
                torch.testing.assert_close(a[i : i + 1], b, rtol=1e-5, atol=1e-6)
        enc.trunks[1].layers1[0].blocks[0].attn.proj.bias.add_(0.5)  # only the T2 trunk
        moved = enc(volumes, ids).tokens
    assert torch.equal(moved[[0, 1, 2]], out.tokens[[0, 1, 2]]) and not torch.allclose(moved[3], out.tokens[3])


def test_gradients_reach_only_the_modalities_present(volumes: torch.Tensor) -> None:
    enc = MedMAPEncoder(modalities=["T1", "T2", "FLAIR"], **SMALL)
    pooled = enc(volumes[:2], torch.tensor([0, 2])).pooled
    (pooled * torch.randn(pooled.shape)).sum().backward()  # (a plain sum of LayerNorm'd tokens is constant)
    grad = enc.trunk.patch_embed.proj.weight.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0


@pytest.mark.parametrize("sharing", ["gated", "separate"])
def test_save_load_round_trip_is_bit_exact(sharing: str, tmp_path, volumes: torch.Tensor) -> None:
    enc = MedMAPEncoder(modalities=["T1", ("SWI", "susceptibility-weighted")], sharing=sharing, **SMALL).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-zero gates too
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    loaded = MedMAPEncoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.modalities == enc.modalities and loaded.sharing == sharing
    ours, theirs = enc.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        assert torch.equal(enc(volumes, ids).tokens, loaded(volumes, ids).tokens)


def test_from_pretrained_reports_mismatches(tmp_path) -> None:
    MedMAPEncoder(modalities=["T1", "T2"], **SMALL).save_pretrained(tmp_path / "a")
    MedMAPEncoder(modalities=["T1", "T2"], **{**SMALL, "embed_dim": 24}).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"a/config\.json: stored modalities=\['T1', 'T2'\] does not match"):
        MedMAPEncoder.from_pretrained(tmp_path / "a", modalities=None)
    with pytest.raises(ValueError, match=r"config\.json: stored embed_dim=12 does not match the requested embed_dim=24"):
        MedMAPEncoder.from_pretrained(tmp_path / "a", embed_dim=24)
    MedMAPEncoder.from_pretrained(tmp_path / "a", modalities=["t1", "T2"], window_size=5, sharing="gated")
    shutil.copyfile(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")  # embed_dim 24
    with pytest.raises(ValueError, match=r"a/model\.safetensors: weights do not match config\.json .*embed_dim=12.*"
                                         r"'trunk\.patch_embed\.proj\.weight' has shape \(2, 24, 1, 2, 2, 2\)"):
        MedMAPEncoder.from_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "modalities": [["T1", "T1"]]}))
    with pytest.raises(ValueError, match=r"b/model\.safetensors: .*1 modalities.*has shape \(2, 24"):
        MedMAPEncoder.from_pretrained(tmp_path / "b")  # config.json inconsistent with the weights
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"b/config\.json: expected a medmap-fast/MedMAPEncoder configuration"):
        MedMAPEncoder.from_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MedMAPEncoder.from_pretrained(tmp_path / "missing")


def test_from_pretrained_checks_defaults_not_only_stored_values(tmp_path) -> None:
    MedMAPEncoder(modalities=["T1", "T2"], **SMALL).save_pretrained(tmp_path / "a")  # mlp_ratio etc. not stored
    MedMAPEncoder.from_pretrained(tmp_path / "a", mlp_ratio=4.0, qkv_bias=True, downsample="merging",
                                  patch_size=(2, 2, 2), depths=list(SMALL["depths"]))
    with pytest.raises(ValueError, match=r"a/config\.json: stored mlp_ratio=4\.0 does not match the requested "
                                         r"mlp_ratio=2"):
        MedMAPEncoder.from_pretrained(tmp_path / "a", mlp_ratio=2)
    with pytest.raises(ValueError, match=r"a/config\.json: cannot check widht=12: not a MedMAPEncoder setting"):
        MedMAPEncoder.from_pretrained(tmp_path / "a", widht=12)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: {**c, "swin": {**c["swin"], "embed_dim": "12"}}, r"expected 'embed_dim' to be int, got '12'"),
    (lambda c: {**c, "swin": {**c["swin"], "embed_dim": 12.0}}, r"expected 'embed_dim' to be int, got 12\.0"),
    (lambda c: {**c, "swin": {**c["swin"], "depths": "22"}}, r"expected 'depths' to be int list, got '22'"),
    (lambda c: {**c, "swin": {**c["swin"], "mlp_ratio": "4"}}, r"expected 'mlp_ratio' to be number, got '4'"),
    (lambda c: {**c, "swin": {**c["swin"], "qkv_bias": "false"}}, r"expected 'qkv_bias' to be bool, got 'false'"),
    (lambda c: {**c, "swin": {**c["swin"], "depths": [2, 2, 2]}}, r"describes no valid MedMAPEncoder \(num_heads"),
    (lambda c: {**c, "swin": {**c["swin"], "width": 3}}, r"describes no valid MedMAPEncoder .*'width'"),
    (lambda c: {**c, "format_version": "2"}, r"expected 'format_version' to be int, got '2'"),
    (lambda c: {**c, "modalities": ["T1", "T2"]}, r"expected 'modalities' to be a list of \[name, description\] pairs"),
    (lambda c: {**c, "modalities": []}, r"expected 'modalities' to be a list of \[name, description\] pairs"),
    (lambda c: {**c, "swin": None}, r"expected 'swin' to be an object of SwinViT3D arguments"),
    (lambda c: [c], r"expected a JSON object, got a list"),
], ids=["str-int", "float-int", "str-list", "str-number", "str-bool", "inconsistent", "unknown", "version",
        "names-only", "no-modalities", "no-swin", "list"])
def test_corrupt_config_json_is_an_error_naming_it(tmp_path, edit, pattern: str) -> None:
    MedMAPEncoder(modalities=["T1", "T2"], **SMALL).save_pretrained(tmp_path / "enc")
    path = tmp_path / "enc" / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=r"enc/config\.json: " + pattern):
        MedMAPEncoder.from_pretrained(tmp_path / "enc")


def test_corrupt_or_missing_weights_are_errors_naming_the_file(tmp_path) -> None:
    MedMAPEncoder(modalities=["T1", "T2"], **SMALL).save_pretrained(tmp_path / "enc")
    weights = tmp_path / "enc" / "model.safetensors"
    data = weights.read_bytes()
    (tmp_path / "enc" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"enc/config\.json: not valid JSON"):
        MedMAPEncoder.from_pretrained(tmp_path / "enc")
    MedMAPEncoder(modalities=["T1", "T2"], **SMALL).save_pretrained(tmp_path / "enc")
    for broken in (data[: len(data) // 2], data[:5], b""):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=r"enc/model\.safetensors: not a readable safetensors file"):
            MedMAPEncoder.from_pretrained(tmp_path / "enc")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"enc/model\.safetensors: not found"):
        MedMAPEncoder.from_pretrained(tmp_path / "enc")


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="sharing"):
        MedMAPEncoder(sharing="shared", **SMALL)
    with pytest.raises(ValueError, match="num_modalities"):
        MedMAPEncoder(num_modalities=3, **SMALL)
    with pytest.raises(TypeError, match="norm_layer"):
        MedMAPEncoder(norm_layer=torch.nn.LayerNorm, **SMALL).get_config()


@pytest.mark.parametrize(
    "make_volumes, ids, pattern",
    [
        (lambda v: v[0], [0], r"volumes: expected a float tensor \[V, 1, D, H, W\].*got shape \(1, 20, 18, 22\)"),
        (lambda v: v.long(), [0, 0, 0, 0], r"volumes: .*got shape \(4, 1, 20, 18, 22\) dtype torch\.int64"),
        (lambda v: v[:, :, :1], [0, 0, 0, 0], r"volumes: .*D, H, W >= \(2, 2, 2\).*got shape \(4, 1, 1, 18, 22\)"),
        (lambda v: v.expand(4, 2, -1, -1, -1), [0, 0, 0, 0], r"volumes: expected a float tensor \[V, 1, D, H, W\]"),
        (lambda v: v.index_fill(2, torch.tensor([3]), float("nan")), [0, 0, 0, 0], r"volumes: expected finite"),
        (lambda v: v, [0, 0, 0], r"modality_ids: expected a 1-D integer tensor \[4\] .*got shape \(3,\)"),
        (lambda v: v, [0, 0, 12, 0], r"modality_ids: .*modality ids in \[0, 12\).*got values in \[0, 12\]"),
        (lambda v: v, ["T1", "T1", "T1", "PD"], r"modality_ids: expected one of .*got 'PD'"),
        (lambda v: v, torch.zeros(4), r"modality_ids: .*got shape \(4,\) dtype torch\.float32"),
    ],
    ids=["ndim", "dtype", "smaller-than-patch", "channels", "nan", "length", "unknown-id", "unknown-name", "float-ids"],
)
def test_validation_errors(make_volumes, ids, pattern: str, volumes: torch.Tensor) -> None:
    enc = MedMAPEncoder(**SMALL)
    with pytest.raises(ValueError, match=pattern):
        enc(make_volumes(volumes), ids if isinstance(ids, torch.Tensor) or isinstance(ids[0], str)
            else torch.tensor(ids))
