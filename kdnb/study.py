"""What every study notebook's setup cell calls, and the shape every study shares (CONTRIBUTING.md).

    params, run, device = study.setup("01_mnist_unseen_classes", globals())

A study is one module, named in `profiles.STUDY_MODULES`, holding:
  PROFILES                 {'smoke' | 'reduced' | 'full': {parameter: value}}
  check(**params)          a ValueError naming the first bad parameter, before any data is read
  describe(params) -> str  optional: what setup prints about the run below the parameters that are set
  require_data(params, data_dir)  optional: missing data stops the setup cell, for a study that works before
                           it loads its data (05's exact kernel part)
  claim_applies(claim, params) -> bool  optional: whether a run records a claim (03: not an ablation run); the
                           report counts a record's claim only where it says so
  QUIRKS, ATTRIBUTION...   the quirk flags and claims `kdnb sweep --ablate` / `kdnb report` read (kdnb.attribution)
and its notebook has the sections of SECTIONS, in that order (tests/test_study_contract.py)."""
from __future__ import annotations

from . import profiles, runs, validate

# H2 headings of every study notebook, in order, after the title. The middle ones are numbered "1 · Data", and may
# go on after a colon ("3 · Results: per-class test accuracy"); "Beyond the source" (what the source did not ask) is
# the only optional one. Anything finer is a ### inside one of them.
SECTIONS = ("Results at a glance", "Data", "Training", "Results", "Beyond the source", "Claims",
            "Why not: one quirk at a time", "What this notebook establishes")
NUMBERED = ("Data", "Training", "Results", "Beyond the source", "Claims")
OPTIONAL = ("Beyond the source",)


module = profiles.module  # the study module behind a notebook


def setup(notebook: str, namespace: dict):
    """The parameters as the kernel holds them, resolved and checked (a misspelt or unusable one stops here, before
    any data is read), the device, and the run that records them; prints what the run will do."""
    params = profiles.from_namespace(notebook, namespace)
    profiles.check(notebook, params)
    study = module(notebook)
    device = validate.device(params["device"])
    if hasattr(study, "require_data"):
        study.require_data(params, namespace.get("data_dir"))
    run = runs.Run(notebook, params, namespace.get("output_dir"), device)
    _plot_defaults()
    extra = study.describe(params) if hasattr(study, "describe") else ""
    print(set_values(params), *([extra] if extra else []), sep="\n")
    return params, run, device


def variant_flags(variants: dict, variant: str, params: dict) -> dict:
    """The quirk flags a variant (a key of the study's VARIANTS) runs with: the variant's values, overridden by any
    flag given explicitly."""
    validate.choice("variants", variant, variants)
    return {k: (v if params.get(k) is None else params[k]) for k, v in variants[variant].items()}


def set_values(params: dict) -> dict:
    """The parameters that have a value (None ones are each variant's own, said where they apply)."""
    return {k: v for k, v in params.items() if v is not None}


def _plot_defaults() -> None:
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    pd.set_option("display.width", 200)
