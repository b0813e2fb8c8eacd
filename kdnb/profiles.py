"""Profiles: named sets of defaults per notebook ('smoke' runs in CI on shipped samples, 'reduced' is a
named, smaller configuration, 'full' is the paper's). A notebook parameter left at None takes its
profile's value; anything given explicitly wins. `kdnb run` resolves the same way, so the run id
(a hash of the resolved parameters) is known before the notebook starts."""
from __future__ import annotations

import importlib

from . import validate

# notebook name -> module holding its PROFILES dict
STUDY_MODULES = {
    "01_mnist_unseen_classes": "kdnb.unseen_classes",
    "05_self_distillation": "kdnb.self_distillation",
    "03_dml_kd_calibration": "kdnb.dml_calibration",
    "02_voc_segmentation_kd": "kdnb.voc_segmentation",
    "04_emnist_mlp_student": "kdnb.emnist_student",
}


def profiles_of(notebook: str) -> dict:
    """A study notebook's profiles; a notebook without a study module (a user's own) has no defaults."""
    if notebook not in STUDY_MODULES:
        return {p: {} for p in validate.PROFILES}
    return importlib.import_module(STUDY_MODULES[notebook]).PROFILES


def check(notebook: str, params: dict) -> None:
    """The study's own check of resolved parameters (a ValueError naming the first bad one), if it has one."""
    if notebook in STUDY_MODULES:
        module = importlib.import_module(STUDY_MODULES[notebook])
        if hasattr(module, "check"):
            module.check(**params)


def resolve(notebook: str, **params) -> dict:
    """Fill every None-valued parameter from the profile; return all parameters, sorted by name."""
    profile = validate.profile(params.get("profile", "smoke"))
    defaults = profiles_of(notebook)[profile]
    out = dict(params, profile=profile)
    for k, v in defaults.items():
        if out.get(k) is None:
            out[k] = v
    if "seeds" in out:
        out["seeds"] = validate.seeds(out["seeds"])
    return dict(sorted(out.items()))
