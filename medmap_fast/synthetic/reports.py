"""Radiology reports for the synthetic demo, written from a study's finding attributes and acquired sequences.

A report has EXAMINATION, TECHNIQUE, FINDINGS and IMPRESSION sections. Phrasing is drawn at random (from the study's
generator, so a seed fixes the text); signal behaviour is described only for sequences that were acquired; the
study's class is named positively (with one of its :data:`CLASS_TERMS`) and a random selection of the organ's other
classes is explicitly negated ("No evidence of haemorrhage."). Terms of classes a study does not have occur only in
negated sentences, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .brain import BRAIN_CLASSES
from .liver import LIVER_CLASSES

# Lower-case substrings that name each abnormal class; used positively for the study's class, negated otherwise.
CLASS_TERMS: dict[str, tuple[str, ...]] = {
    "brain_tumour": ("tumour", "tumor", "neoplas", "glioma", "glioblastoma"),
    "ischaemic_infarct": ("infarct", "ischaemi", "ischemi", "stroke"),
    "intracranial_haemorrhage": ("haemorrhag", "hemorrhag", "haematoma", "hematoma", "bleed"),
    "demyelination": ("demyelinat", "multiple sclerosis", "plaque"),
    "cerebral_atrophy": ("atroph", "volume loss"),
    "hepatocellular_carcinoma": ("hepatocellular", "hcc"),
    "hepatic_cyst": ("cyst",),
    "hepatic_haemangioma": ("haemangioma", "hemangioma"),
    "hepatic_steatosis": ("steatosis", "fatty", "hepatic fat"),
    "hepatic_iron_overload": ("iron", "siderosis", "haemochromatosis", "hemochromatosis"),
    "cirrhosis": ("cirrho",),
}

# Noun phrases used to negate each class; every one contains one of the class's terms.
_NEGATABLE: dict[str, tuple[str, ...]] = {
    "brain_tumour": ("intracranial tumour", "neoplasm", "space-occupying tumour"),
    "ischaemic_infarct": ("acute infarct", "acute ischaemic infarct", "territorial infarction"),
    "intracranial_haemorrhage": ("intracranial haemorrhage", "haemorrhage", "intraparenchymal haematoma"),
    "demyelination": ("demyelinating plaques", "demyelinating white matter lesions"),
    "cerebral_atrophy": ("cerebral atrophy", "disproportionate volume loss"),
    "hepatocellular_carcinoma": ("hepatocellular carcinoma", "HCC"),
    "hepatic_cyst": ("hepatic cyst", "cystic liver lesion"),
    "hepatic_haemangioma": ("haemangioma", "hepatic haemangioma"),
    "hepatic_steatosis": ("hepatic steatosis", "fatty infiltration of the liver"),
    "hepatic_iron_overload": ("iron overload", "hepatic siderosis", "iron deposition in the liver"),
    "cirrhosis": ("cirrhosis", "cirrhotic morphology"),
}
_NEGATIONS = ("No {}.", "There is no {}.", "No evidence of {}.", "No MRI evidence of {}.", "Negative for {}.")

SEQUENCE_NAMES = {
    "T1": "T1-weighted",
    "T1c": "post-gadolinium T1-weighted",
    "T2": "T2-weighted",
    "FLAIR": "FLAIR",
    "DWI": "diffusion-weighted (b=1000)",
    "ADC": "ADC map",
    "T2WI": "T2-weighted",
    "T1_in_phase": "in-phase T1-weighted",
    "T1_opposed_phase": "opposed-phase T1-weighted",
    "arterial": "late arterial phase",
    "portal_venous": "portal venous phase",
    "delayed": "delayed phase",
}
_CONTRAST = {"T1c", "arterial", "portal_venous", "delayed"}

Writer = Callable[[dict[str, Any], set[str], np.random.Generator], tuple[list[str], str]]


def write_report(label: str, attributes: dict[str, Any], modalities: Sequence[str], rng: np.random.Generator) -> str:
    """The report of a study of class ``label`` with ``attributes`` whose acquired sequences are ``modalities``."""
    organ, classes = ("brain", BRAIN_CLASSES) if label in BRAIN_CLASSES else ("liver", LIVER_CLASSES)
    mods = set(modalities)
    findings, impression = _WRITERS[label](attributes, mods, rng)
    findings += _background(label, attributes, mods, rng)
    others = [c for c in classes[1:] if c != label]
    for c in rng.permutation(others)[: int(rng.integers(2, len(others) + 1))]:
        findings.append(_negate(rng, str(c)))
    contrast = "with and without intravenous gadolinium" if mods & _CONTRAST else "without contrast"
    region = "brain" if organ == "brain" else _pick(rng, ("liver", "upper abdomen (liver protocol)"))
    technique = _pick(rng, ("Sequences: {}.", "Technique: {} images were obtained.", "Acquired: {}."))
    sequences = [SEQUENCE_NAMES[m] for m in modalities]
    return "\n".join(
        [
            f"EXAMINATION: MRI {region} {contrast}.",
            technique.format(_join(sequences)),
            "FINDINGS: " + " ".join(findings),
            "IMPRESSION: " + impression,
        ]
    )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _negate(rng: np.random.Generator, label: str) -> str:
    phrase = _pick(rng, _NEGATABLE[label])
    sentence = _pick(rng, _NEGATIONS).format(phrase)
    if phrase.endswith("s") and not phrase.endswith("sis"):  # plural noun phrase
        sentence = sentence.replace("There is no", "There are no")
    return sentence[0].upper() + sentence[1:]


def _t2_flair(mods: set[str]) -> str:
    """How to name T2 and/or FLAIR signal, mentioning only the acquired ones."""
    return "/".join(m for m in ("T2", "FLAIR") if m in mods)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _background(label: str, a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> list[str]:
    """Statements about normal structures, omitting those the finding contradicts."""
    out: list[str] = []
    if label in BRAIN_CLASSES:
        if label != "cerebral_atrophy":
            out.append(_pick(rng, ("The ventricles and sulci are normal in size.", "Ventricles and sulci are normal.")))
        if a.get("midline_shift_mm", 0) < 2:
            out.append("No midline shift.")
        if label != "ischaemic_infarct":
            out.append(_pick(rng, ("Grey-white differentiation is preserved.", "Normal grey-white differentiation.")))
        out.append(_pick(rng, ("No extra-axial collection.", "The major intracranial flow voids are preserved.")))
        return out
    if label not in ("hepatocellular_carcinoma", "hepatic_cyst", "hepatic_haemangioma"):
        out.append(_pick(rng, ("No focal liver lesion.", "No focal hepatic lesion is identified.")))
    if label != "cirrhosis" and not a.get("spleen_involved"):
        out.append(_pick(rng, ("The spleen is normal in size.", "Normal spleen.")))
    if not a.get("ascites"):
        out.append("No ascites.")
    out.append(_pick(rng, ("The kidneys are unremarkable.", "The gallbladder and kidneys are unremarkable.")))
    if mods & {"portal_venous", "delayed"}:
        out.append("The portal vein is patent.")
    return out


def _normal_brain(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [_pick(rng, ("The brain parenchyma is of normal signal.", "Normal parenchymal signal on all sequences."))]
    return text, _pick(rng, ("Normal MRI of the brain.", "No intracranial abnormality.", "Unremarkable brain MRI."))


def _tumour(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    loc, size, high = f"{a['side']} {a['region']}", a["diameter_mm"], a["grade"] == "high"
    text = [
        _pick(
            rng,
            (
                f"There is a {size} mm intra-axial mass in the {loc}.",
                f"A {size} mm intra-axial mass is centred in the {loc}.",
                f"An intra-axial mass measuring {size} mm is seen in the {loc}.",
            ),
        )
    ]
    if "T1c" in mods:
        text.append(
            "It shows thick irregular rim enhancement around a non-enhancing necrotic centre."
            if high
            else "It does not enhance after gadolinium."
        )
    elif "T1" in mods:
        text.append("It is hypointense on T1-weighted images.")
    if mods & {"T2", "FLAIR"}:
        t2 = _t2_flair(mods)
        text.append(
            f"Surrounding {t2} hyperintense vasogenic oedema extends up to {a['oedema_mm']} mm."
            if high
            else f"The lesion is homogeneously {t2} hyperintense with little surrounding oedema."
        )
    if "DWI" in mods:
        text.append("The solid rim shows restricted diffusion." if high else "There is no restricted diffusion.")
    shift = a["midline_shift_mm"]
    text.append(
        f"There is mass effect with {shift} mm of midline shift." if shift >= 2 else "There is local mass effect."
    )
    kind = (
        _pick(rng, ("a high-grade glioma", "glioblastoma", "a high-grade primary brain tumour"))
        if high
        else _pick(rng, ("a low-grade glioma", "a low-grade primary brain tumour"))
    )
    lead = "Ring-enhancing necrotic mass" if high and "T1c" in mods else "Intra-axial mass"
    return text, f"{lead} in the {loc}, in keeping with {kind}."


_INFARCT_IMPRESSION = {"hyperacute": "Hyperacute", "acute": "Acute", "subacute": "Subacute"}


def _infarct(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    loc, stage = f"{a['side']} {a['region']}", a["stage"]
    text = []
    if "DWI" in mods:
        adc = " with corresponding low ADC" if "ADC" in mods else ""
        text.append(f"There is restricted diffusion in the cortex and subcortical white matter of the {loc}{adc}.")
    elif "ADC" in mods:
        text.append(f"There is reduced ADC in the cortex and subcortical white matter of the {loc}.")
    if mods & {"T2", "FLAIR"}:
        t2 = _t2_flair(mods)
        mismatch = " (DWI-FLAIR mismatch)" if {"DWI", "FLAIR"} <= mods else ""
        text.append(
            {
                "hyperacute": f"There is no corresponding {t2} signal change{mismatch}.",
                "acute": f"The region is {t2} hyperintense with mild swelling.",
                "subacute": f"The region is {t2} hyperintense.",
            }[stage]
        )
    if "T1c" in mods and stage == "subacute":
        text.append("There is gyral enhancement.")
    if not text:
        text.append(f"There is subtle T1 hypointensity with sulcal effacement in the {loc}.")
    text.append(_pick(rng, ("No haemorrhagic transformation.", "There is no haemorrhagic transformation.")))
    return text, f"{_INFARCT_IMPRESSION[stage]} ischaemic infarct in the {a['territory']} territory."


_HAEMATOMA_SIGNAL = {  # (T1, T2) appearance by age
    "hyperacute": ("isointense", "hyperintense"),
    "acute": ("isointense", "markedly hypointense"),
    "early subacute": ("hyperintense", "hypointense"),
    "late subacute": ("hyperintense", "hyperintense"),
}


def _haemorrhage(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    loc, stage = f"{a['side']} {a['region']}", a["stage"]
    text = [
        _pick(
            rng,
            (
                f"There is a {a['diameter_mm']} mm intraparenchymal haematoma in the {loc}.",
                f"A {a['diameter_mm']} mm intraparenchymal haemorrhage is present in the {loc}.",
            ),
        )
    ]
    t1, t2 = _HAEMATOMA_SIGNAL[stage]
    signal = ([f"{t1} on T1"] if mods & {"T1", "T1c"} else []) + ([f"{t2} on T2"] if "T2" in mods else [])
    if signal:
        text.append(f"It is {_join(signal)}, consistent with the {stage} stage.")
    text.append("There is a thin rim of surrounding oedema.")
    if a["midline_shift_mm"] >= 2:
        text.append(f"There is {a['midline_shift_mm']} mm of midline shift.")
    pattern = "deep (hypertensive-pattern)" if a["deep"] else "lobar"
    return text, f"{stage.capitalize()} {pattern} intraparenchymal haemorrhage in the {loc}."


def _demyelination(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    where = "periventricular and juxtacortical" if a["juxtacortical"] else "periventricular"
    signal = "T1 hypointense" if "T1" in mods else "abnormal"
    if mods & {"T2", "FLAIR"}:
        signal = f"{_t2_flair(mods)} hyperintense"
    text = [
        f"There are {a['count']} ovoid {signal} white matter lesions in a {where} distribution, oriented "
        f"perpendicular to the lateral ventricles; the largest measures {a['largest_mm']} mm."
    ]
    if "T1" in mods and a["black_holes"]:
        verb = "is" if a["black_holes"] == 1 else "are"
        text.append(f"{_plural(a['black_holes'], 'lesion')} {verb} T1 hypointense (black holes).")
    active = a["active_count"]
    if "T1c" in mods:
        text.append(
            f"{_plural(active, 'lesion')} enhance{'s' if active == 1 else ''}, indicating active inflammation."
            if active
            else "None of the lesions enhance."
        )
    disease = _pick(
        rng, ("demyelination", "demyelinating disease such as multiple sclerosis", "multiple sclerosis plaques")
    )
    activity = " with active lesions" if active and "T1c" in mods else ""
    return text, f"Multifocal {where} white matter lesions in keeping with {disease}{activity}."


def _atrophy(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    severity = a["severity"]
    text = [
        f"There is {severity} generalised cerebral volume loss with widening of the sulci and ex vacuo dilatation "
        "of the lateral ventricles."
    ]
    return text, f"{severity.capitalize()} generalised cerebral atrophy."


def _normal_liver(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [_pick(rng, ("The liver is normal in size, contour and signal.", "Normal liver size, contour and signal."))]
    return text, _pick(rng, ("Normal MRI of the liver.", "No hepatic abnormality.", "Unremarkable liver MRI."))


def _they(a: dict[str, Any]) -> str:
    return "It is" if a["count"] == 1 else "They are"


def _lesion_list(a: dict[str, Any], noun: str) -> str:
    parts = [f"{d} mm in segment {s}" for d, s in zip(a["diameters_mm"], a["segments"], strict=True)]
    return f"{_plural(a['count'], noun)} ({_join(parts)})"


def _hcc(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [f"There {'is' if a['count'] == 1 else 'are'} {_lesion_list(a, 'observation')}."]
    if "T2WI" in mods:
        text.append(f"{_they(a)} mildly T2 hyperintense.")
    if "arterial" in mods:
        text.append(f"{_they(a)} non-rim arterial phase hyperenhancing.")
    later = [SEQUENCE_NAMES[m].replace(" phase", "") for m in ("portal_venous", "delayed") if m in mods]
    if later:
        phases = f"{_join(later)} phase{'s' if len(later) > 1 else ''}"
        text.append(f"There is washout with an enhancing capsule on the {phases}.")
    if a["intralesional_fat"] and {"T1_in_phase", "T1_opposed_phase"} <= mods:
        text.append("Signal drop on opposed-phase images indicates intralesional fat.")
    dynamic = mods & {"arterial", "portal_venous", "delayed"}
    verdict = (
        "LI-RADS 5, definite hepatocellular carcinoma"
        if dynamic
        else "suspicious for hepatocellular carcinoma; multiphase contrast-enhanced MRI is recommended"
    )
    many = "s" if a["count"] > 1 else ""
    return text, f"Segment{many} {_join(a['segments'])} observation{many}, {verdict}."


def _cyst(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [f"There {'is' if a['count'] == 1 else 'are'} {_lesion_list(a, 'well-defined cyst')}."]
    if "T2WI" in mods:
        text.append(f"{_they(a)} markedly and homogeneously T2 hyperintense.")
    if mods & {"T1_in_phase", "T1_opposed_phase"}:
        text.append(f"{_they(a)} T1 hypointense.")
    if mods & {"arterial", "portal_venous", "delayed"}:
        text.append("There is no enhancement.")
    return text, _pick(rng, ("Simple hepatic cysts, benign.", "Benign simple liver cysts.")) if a[
        "count"
    ] > 1 else _pick(rng, ("Simple hepatic cyst, benign.", "Benign simple liver cyst."))


def _haemangioma(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [f"There {'is' if a['count'] == 1 else 'are'} {_lesion_list(a, 'lesion')}."]
    if "T2WI" in mods:
        text.append(f"{_they(a)} markedly T2 hyperintense (light-bulb sign).")
    if "arterial" in mods:
        text.append("There is peripheral discontinuous nodular enhancement in the arterial phase.")
    if mods & {"portal_venous", "delayed"}:
        text.append("There is progressive centripetal fill-in on later phases.")
    many = "s" if a["count"] > 1 else ""
    return text, f"Typical hepatic haemangioma{many} in segment{many} {_join(a['segments'])}."


def _steatosis(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    if {"T1_in_phase", "T1_opposed_phase"} <= mods:
        text = [
            f"There is diffuse signal loss of the liver on opposed-phase relative to in-phase images; the "
            f"estimated fat fraction is {a['fat_fraction_percent']}%."
        ]
    else:
        text = ["The liver shows diffusely altered signal; chemical-shift imaging was not acquired."]
    return text, f"{a['grade'].capitalize()} hepatic steatosis."


def _iron(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = []
    if "T2WI" in mods:
        text.append("The liver is diffusely and markedly hypointense on T2-weighted images.")
    if {"T1_in_phase", "T1_opposed_phase"} <= mods:
        text.append("Liver signal is lower on in-phase than on opposed-phase images, indicating T2* shortening.")
    if not text:
        text.append("The liver is diffusely hypointense.")
    text.append("The spleen is also hypointense." if a["spleen_involved"] else "The spleen is spared.")
    return text, f"Hepatic iron overload, {a['pattern']} pattern."


def _cirrhosis(a: dict[str, Any], mods: set[str], rng: np.random.Generator) -> tuple[list[str], str]:
    text = [
        "The liver has a nodular surface contour with a shrunken right lobe and hypertrophy of the caudate and "
        "left lobes."
    ]
    if mods & {"T2WI", "delayed"}:
        delayed = " with delayed enhancement" if "delayed" in mods else ""
        text.append(f"There is reticular parenchymal fibrosis{delayed}.")
    text.append(f"Splenomegaly, spleen length {a['spleen_length_mm']} mm.")
    if a["ascites"]:
        text.append("There is moderate perihepatic and pelvic ascites.")
    extra = " and ascites" if a["ascites"] else ""
    return text, (
        f"Cirrhotic liver morphology with splenomegaly{extra}, in keeping with cirrhosis and portal hypertension."
    )


_WRITERS: dict[str, Writer] = dict(
    zip(
        BRAIN_CLASSES + LIVER_CLASSES,
        (
            _normal_brain,
            _tumour,
            _infarct,
            _haemorrhage,
            _demyelination,
            _atrophy,
            _normal_liver,
            _hcc,
            _cyst,
            _haemangioma,
            _steatosis,
            _iron,
            _cirrhosis,
        ),
        strict=True,
    )
)
