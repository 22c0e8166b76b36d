"""The embedded synthetic demo data: anatomy, contrasts, lesions, reports, labels, determinism, batch contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from medmap_fast.modalities import DEFAULT_MODALITY_NAMES as MODALITIES
from medmap_fast.synthetic.abdomen import ABDOMEN_CENTER_MM, ABDOMEN_FOV_MM, LIVER_CONTRASTS, Abdomen, AbdomenParams
from medmap_fast.synthetic.anatomy import BRAIN_CONTRASTS, BRAIN_FOV_MM, brain_atlas, sample_brain
from medmap_fast.synthetic.brain import BRAIN_CLASSES, render_brain
from medmap_fast.synthetic.demo import (
    CLASSES,
    ORGAN_CLASSES,
    ORGAN_MODALITIES,
    DemoConfig,
    DemoDataset,
    generate_studies,
    generate_study,
)
from medmap_fast.synthetic.geometry import Grid
from medmap_fast.synthetic.liver import LIVER_CLASSES, render_liver
from medmap_fast.synthetic.reports import CLASS_TERMS
from medmap_fast.synthetic.study import Study

pytestmark = pytest.mark.usefixtures("one_thread")
NEGATION = re.compile(r"\b(no|not|without|negative for)\b", re.IGNORECASE)
CLEAN = dict(noise=0.0, bias=0.0, max_rotation_deg=0.0, max_shift_mm=0.0, max_scale=0.0, p_modality=1.0)


def brain_grid(n: int = 32) -> Grid:
    return Grid.centered((n, n, n), BRAIN_FOV_MM, brain_atlas().center)


def liver_grid(n: int = 32) -> Grid:
    return Grid.centered((n, n, n), ABDOMEN_FOV_MM, ABDOMEN_CENTER_MM)


def sentences(report: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+|\n", report.lower()) if s]


def mentions(sentence: str, label: str) -> bool:
    return any(term in sentence for term in CLASS_TERMS[label])


# ---------------------------------------------------------------------------------------------------- records


def test_studies_have_the_documented_shapes_and_types():
    studies = generate_studies(10, seed=0, config=DemoConfig(size=(20, 24, 16)))
    for s in studies:
        assert s.volume.dtype == torch.float32 and s.volume.shape == (len(s.modalities), 20, 24, 16)
        assert set(s.modalities) <= set(ORGAN_MODALITIES[s.organ]) and len(s.modalities) >= 1
        assert CLASSES[s.label] in ORGAN_CLASSES[s.organ] and s.attributes["organ"] == s.organ
        assert len(set(s.spacing)) == 1 and s.spacing[0] == pytest.approx((200.0 if s.organ == "brain" else 380.0) / 24)
        assert torch.isfinite(s.volume).all() and (s.volume >= 0).all()  # magnitude images
        assert s.report.startswith("EXAMINATION: MRI") and "IMPRESSION:" in s.report
    assert {s.organ for s in studies} == {"brain", "liver"}


def test_registry_covers_the_organ_sequences_and_classes_are_per_organ():
    assert set(ORGAN_MODALITIES["brain"]) | set(ORGAN_MODALITIES["liver"]) == set(MODALITIES)
    assert CLASSES == BRAIN_CLASSES + LIVER_CLASSES and len(LIVER_CLASSES) == 7  # the paper's 7-class liver task
    assert CLASSES.index("normal_brain") == 0 and CLASSES.index("normal_liver") == 6
    assert len([c for c in CLASSES if not c.startswith("normal")]) >= 6


def test_96_cubed_on_request():
    study = generate_study(0, seed=1, config=DemoConfig(size=96, classes=("brain_tumour",), p_modality=0.3))
    assert study.volume.shape[1:] == (96, 96, 96)
    assert study.spacing[0] == pytest.approx(200 / 96)


# ---------------------------------------------------------------------------------------------------- contrasts


def test_brain_tissue_ordering_follows_each_contrast():
    grid = brain_grid(40)  # at 32^3 (6 mm voxels) almost no voxel is pure CSF
    study = generate_study(0, seed=0, config=DemoConfig(size=40, classes=("normal_brain",), **CLEAN))
    gm, wm, csf = (sample_brain(grid.coords(), grid.spacing)[i] > 0.7 for i in range(3))
    assert gm.sum() > 20 and wm.sum() > 20 and csf.sum() > 20
    mean = {m: {t: float(study.volume[i][mask].mean()) for t, mask in (("gm", gm), ("wm", wm), ("csf", csf))}
            for i, m in enumerate(study.modalities)}
    assert mean["T1"]["wm"] > mean["T1"]["gm"] > mean["T1"]["csf"]
    assert mean["T2"]["csf"] > mean["T2"]["gm"] > mean["T2"]["wm"]
    assert mean["FLAIR"]["gm"] > mean["FLAIR"]["wm"] > mean["FLAIR"]["csf"]  # CSF nulled
    assert mean["DWI"]["gm"] > mean["DWI"]["wm"] > mean["DWI"]["csf"]
    assert mean["ADC"]["csf"] > mean["ADC"]["gm"] > mean["ADC"]["wm"]


def test_abdominal_tissues_follow_each_sequence():
    grid = liver_grid(48)
    images, _ = render_liver("normal_liver", np.random.default_rng(3), grid)
    rng = np.random.default_rng(3)
    scene = Abdomen(np.random.default_rng(int(rng.integers(2**63))), AbdomenParams()).scene(grid)  # same anatomy
    masks = {t: scene.fraction(name) > 0.75 for t, name in (("liver", "liver"), ("spleen", "spleen"),
                                                           ("fat", "visceral_fat"), ("aorta", "aorta"))}
    assert all(m.sum() > 10 for m in masks.values())
    mean = {c: {t: float(images[i][m].mean()) for t, m in masks.items()} for i, c in enumerate(LIVER_CONTRASTS)}
    assert mean["T2WI"]["spleen"] > mean["T2WI"]["liver"]
    assert mean["T1_in_phase"]["fat"] > mean["T1_in_phase"]["liver"] > mean["T1_in_phase"]["spleen"]
    assert mean["arterial"]["aorta"] > max(mean["arterial"]["liver"], mean["arterial"]["spleen"])
    assert mean["portal_venous"]["liver"] > mean["arterial"]["liver"]  # the liver enhances via the portal vein
    assert mean["arterial"]["fat"] < 0.2 * mean["T1_in_phase"]["fat"]  # fat-suppressed dynamic phases


# ---------------------------------------------------------------------------------------------------- lesions


def lesion_change(render, label: str, grid: Grid, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-contrast mean signed change [C] against the normal study of the same seed, and the attributes.

    The mean is taken over the lesion's ball (focal brain lesions, which also push the anatomy aside) or else over
    every voxel that changed by more than 0.05 in some contrast (the anatomy of both studies is the same).
    """
    normal_label = ORGAN_CLASSES["brain" if label in BRAIN_CLASSES else "liver"][0]
    normal, _ = render(normal_label, np.random.default_rng(seed), grid)
    abnormal, attributes = render(label, np.random.default_rng(seed), grid)
    diff = abnormal - normal
    region = diff.abs().amax(0) > 0.05
    if "center_mm" in attributes:
        distance = (grid.coords() - torch.tensor(attributes["center_mm"])).norm(dim=-1)
        region = distance < 0.4 * attributes["diameter_mm"]
    return diff[:, region].mean(1), region, attributes


@pytest.mark.parametrize("organ", ["brain", "liver"])
def test_every_class_changes_the_images_differently_per_sequence(organ):
    render, grid = (render_brain, brain_grid(32)) if organ == "brain" else (render_liver, liver_grid(32))
    profiles = {}
    for label in ORGAN_CLASSES[organ][1:]:
        change, region, _ = lesion_change(render, label, grid, seed=11)
        assert region.sum() >= 3 and change.abs().max() > 0.05, f"{label} left the images unchanged"
        # Not one uniform change: signs differ between sequences, or magnitudes differ at least threefold.
        size = change.abs()
        assert (change.min() < 0 < change.max()) or size.max() > 3 * size.min(), (label, change)
        profiles[label] = change / change.norm()
    labels = list(profiles)
    for i, a in enumerate(labels):  # no two classes alter the sequences in the same proportions
        for b in labels[i + 1:]:
            assert float(profiles[a] @ profiles[b]) < 0.98, (a, b)


def first_seed(render, label: str, grid: Grid, want) -> tuple[torch.Tensor, dict]:
    for seed in range(40):
        change, _, attributes = lesion_change(render, label, grid, seed)
        if want(attributes):
            return change, attributes
    raise AssertionError(f"no seed below 40 gives {label} with the wanted attributes")


def test_brain_lesions_look_as_in_the_textbook():
    grid, c = brain_grid(32), {m: i for i, m in enumerate(BRAIN_CONTRASTS)}
    tumour, _ = first_seed(render_brain, "brain_tumour", grid, lambda a: a["grade"] == "high")
    assert tumour[c["T1c"]] > tumour[c["T1"]] + 0.05  # enhancement
    assert tumour[c["FLAIR"]] > 0.05 and tumour[c["T2"]] > 0.05  # oedema
    infarct, _ = first_seed(render_brain, "ischaemic_infarct", grid, lambda a: a["stage"] == "acute")
    assert infarct[c["DWI"]] > 0.1 and infarct[c["ADC"]] < 0 and infarct[c["FLAIR"]] > 0
    hyperacute, _ = first_seed(render_brain, "ischaemic_infarct", grid, lambda a: a["stage"] == "hyperacute")
    assert hyperacute[c["DWI"]] > 4 * abs(float(hyperacute[c["FLAIR"]]))  # DWI-FLAIR mismatch
    bleed, _ = first_seed(render_brain, "intracranial_haemorrhage", grid, lambda a: a["stage"] == "early subacute")
    assert bleed[c["T1"]] > 0.1 and bleed[c["T2"]] < -0.1  # intracellular methaemoglobin
    plaques, _ = first_seed(render_brain, "demyelination", grid, lambda a: True)
    assert plaques[c["FLAIR"]] > 0.05 and plaques[c["T2"]] > 0.05 and plaques[c["FLAIR"]] > plaques[c["DWI"]]
    atrophy, _ = first_seed(render_brain, "cerebral_atrophy", grid, lambda a: True)
    assert atrophy[c["T2"]] > 0 > atrophy[c["T1"]]  # brain replaced by CSF


def test_liver_lesions_look_as_in_the_textbook():
    grid, c = liver_grid(32), {m: i for i, m in enumerate(LIVER_CONTRASTS)}
    hcc, _ = first_seed(render_liver, "hepatocellular_carcinoma", grid, lambda a: True)
    assert hcc[c["arterial"]] > 0.1 and hcc[c["portal_venous"]] < hcc[c["arterial"]] - 0.1  # APHE and washout
    cyst, _ = first_seed(render_liver, "hepatic_cyst", grid, lambda a: True)
    assert cyst[c["T2WI"]] > 0.1 and cyst[c["portal_venous"]] < -0.1
    fat, attributes = first_seed(render_liver, "hepatic_steatosis", grid, lambda a: a["fat_fraction_percent"] > 20)
    assert fat[c["T1_opposed_phase"]] < -0.1 and abs(float(fat[c["T1_in_phase"]])) < 0.05
    iron, _ = first_seed(render_liver, "hepatic_iron_overload", grid, lambda a: True)
    assert iron[c["T2WI"]] < 0 and iron[c["T1_in_phase"]] < iron[c["T1_opposed_phase"]] < 0


# ---------------------------------------------------------------------------------------------------- reports


@pytest.mark.parametrize("label", CLASSES)
def test_reports_agree_with_labels(label):
    organ_classes = ORGAN_CLASSES["brain" if label in BRAIN_CLASSES else "liver"]
    for study in generate_studies(4, seed=5, config=DemoConfig(size=8, classes=(label,), p_modality=0.6)):
        assert CLASSES[study.label] == label
        parts = sentences(study.report)
        for other in organ_classes[1:]:
            positive = [s for s in parts if mentions(s, other) and not NEGATION.search(s)]
            if other == label:
                assert positive, f"{label} is never named in:\n{study.report}"
            else:
                assert not positive, f"{other} is named without negation in a {label} report:\n{study.report}"
        if label.startswith("normal"):
            assert sum(bool(NEGATION.search(s)) for s in parts) >= 2  # absent findings are negated


def test_reports_describe_only_acquired_sequences():
    tokens = {"FLAIR": "flair", "ADC": "adc", "DWI": "diffusion", "arterial": "arterial",
              "portal_venous": "portal venous", "delayed": "delayed", "T1_opposed_phase": "opposed-phase"}
    for study in generate_studies(40, seed=9, config=DemoConfig(size=8, p_modality=0.5)):
        text = study.report.lower()
        for modality, token in tokens.items():
            if modality in ORGAN_MODALITIES[study.organ]:
                assert (token in text) == (modality in study.modalities), (modality, study.report)


def test_reports_vary_in_wording_and_findings():
    studies = generate_studies(30, seed=2, config=DemoConfig(size=8, classes=("brain_tumour", "hepatic_cyst")))
    impressions = {s.report.split("IMPRESSION:")[1] for s in studies}
    assert len(impressions) >= 10
    first_sentences = {sentences(s.report)[1].split()[0] for s in studies}  # "sequences:", "technique:", "acquired:"
    assert len(first_sentences) >= 3


# ---------------------------------------------------------------------------------------------------- sampling


def test_missing_modalities_occur_but_never_all():
    studies = generate_studies(30, seed=4, config=DemoConfig(size=8))
    counts = [len(s.modalities) for s in studies]
    assert min(counts) >= 1 and any(c < 6 for c in counts) and any(c == 6 for c in counts)
    assert all(set(s.attributes["missing_modalities"]).isdisjoint(s.modalities) for s in studies)
    sparse = generate_studies(20, seed=4, config=DemoConfig(size=8, p_modality=0.01))
    assert all(len(s.modalities) == 1 for s in sparse)


def test_same_seed_gives_identical_studies_and_other_seeds_differ():
    config = DemoConfig(size=16)
    a, b = generate_study(3, seed=7, config=config), generate_study(3, seed=7, config=config)
    assert torch.equal(a.volume, b.volume) and a.report == b.report and a.attributes == b.attributes
    assert generate_studies(2, seed=7, config=config, start=3)[0].report == a.report
    others = [generate_study(3, seed=s, config=config) for s in (8, 9, 10)]
    assert all(o.report != a.report for o in others)
    same_class = generate_studies(6, seed=1, config=DemoConfig(size=16, classes=("ischaemic_infarct",)))
    assert len({tuple(s.attributes["center_mm"]) for s in same_class}) == 6  # lesion position varies
    assert len({s.attributes["diameter_mm"] for s in same_class}) > 1  # and size
    poses = {tuple(s.attributes["pose"]["shift_mm"]) for s in same_class}
    assert len(poses) == 6


def test_anatomy_lesions_and_report_do_not_depend_on_the_output_size():
    small = generate_study(5, seed=3, config=DemoConfig(size=12))
    large = generate_study(5, seed=3, config=DemoConfig(size=24))
    assert small.report == large.report and small.attributes == large.attributes
    assert large.spacing[0] == pytest.approx(small.spacing[0] / 2)


def test_config_validation():
    with pytest.raises(ValueError, match="classes"):
        DemoConfig(classes=("glioma",))
    with pytest.raises(ValueError, match="organs"):
        DemoConfig(organs=("lung",))
    with pytest.raises(ValueError, match="p_modality"):
        DemoConfig(p_modality=0.0)
    with pytest.raises(ValueError, match="size"):
        DemoConfig(size=(32, 32))


def test_dataset_is_deterministic_and_knows_its_labels():
    dataset = DemoDataset(6, seed=2, config=DemoConfig(size=8))
    assert dataset.labels() == [dataset[i].label for i in range(6)]
    assert dataset[-1].study_id == dataset[5].study_id
    with pytest.raises(IndexError):
        dataset[6]


def test_study_checks_its_fields():
    with pytest.raises(ValueError, match="one channel per modality"):
        Study("x", "brain", ("T1", "T2"), torch.zeros(1, 4, 4, 4), (1.0, 1.0, 1.0), "", 0)
    with pytest.raises(ValueError, match="distinct"):
        Study("x", "brain", ("T1", "T1"), torch.zeros(2, 4, 4, 4), (1.0, 1.0, 1.0), "", 0)
    with pytest.raises(ValueError, match="float tensor"):
        Study("x", "brain", ("T1",), torch.zeros(1, 4, 4), (1.0, 1.0, 1.0), "", 0)
    with pytest.raises(ValueError, match="spacing"):
        Study("x", "brain", ("T1",), torch.zeros(1, 4, 4, 4), (1.0, 0.0, 1.0), "", 0)
