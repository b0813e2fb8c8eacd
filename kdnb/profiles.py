"""Profiles: named sets of defaults per notebook ('smoke' runs in CI on shipped samples, 'reduced' is a
named, smaller configuration, 'full' is the paper's). A notebook parameter left at None takes its
profile's value; anything given explicitly wins. `kdnb run` resolves the same way, so the run id
(a hash of the resolved parameters) is known before the notebook starts."""
from __future__ import annotations

import importlib
import re

from . import runner, runs, validate

# notebook name -> module holding its PROFILES dict
STUDY_MODULES = {
    "01_mnist_unseen_classes": "kdnb.unseen_classes",
    "05_self_distillation": "kdnb.self_distillation",
    "03_dml_kd_calibration": "kdnb.dml_calibration",
    "02_voc_segmentation_kd": "kdnb.voc_segmentation",
    "04_emnist_mlp_student": "kdnb.emnist_student",
}


def module(notebook: str):
    """The study module behind a notebook; None for a notebook without one (a user's own)."""
    return importlib.import_module(STUDY_MODULES[notebook]) if notebook in STUDY_MODULES else None


def profiles_of(notebook: str) -> dict:
    """A study notebook's profiles; a notebook without a study module has no defaults."""
    m = module(notebook)
    return m.PROFILES if m is not None else {p: {} for p in validate.PROFILES}


def check(notebook: str, params: dict) -> None:
    """The study's own check of resolved parameters (a ValueError naming the first bad one), if it has one."""
    m = module(notebook)
    if m is not None and hasattr(m, "check"):
        m.check(**params)


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
    if "download" in out:
        validate.boolean("download", out["download"])
    return dict(sorted(out.items()))


def trained_profile(params: dict, notebook: str, profile: str, free=("seeds",)) -> bool:
    """Whether a run record's parameters are `profile`'s configuration as defined today, `free` keys aside: a profile
    that grew (03's reduced, issue 16) leaves its older records behind under the same name."""
    from .runs import param

    return params.get("profile") == profile and all(
        param(params, k) == v for k, v in profiles_of(notebook)[profile].items() if k not in free)


# ---------------------------------------------------------------- papermill as a client: the notebook checks itself

# IPython's own names in every kernel's namespace; never parameters
KERNEL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit"})


def notebook_parameters(notebook: str) -> dict:
    """{name: default} of the notebook's `parameters` cell, in cell order."""
    return runner.notebook_parameters(runner.notebook_path(notebook))


def from_namespace(notebook: str, namespace: dict) -> dict:
    """What a notebook's setup cell calls first (through kdnb.study.setup), with `globals()`: `resolve` for the
    parameters as the kernel holds them, after the checks `kdnb run` makes before it starts a kernel. Plain papermill injects values unchecked
    (a misspelt name is only a warning there, YAML reads `1e-3` as a string, `-p` passes lists as strings), so:
    a name that is not a parameter stops here with `kdnb run`'s line; a string given for a parameter that is
    never a string is read as a Python literal (said once); device='cuda' without CUDA stops here."""
    path = runner.notebook_path(notebook)
    defaults = runner.notebook_parameters(path)
    runner.check_known(path, defaults, _strays(path, defaults, namespace))
    given = {k: _read_string(k, namespace[k], path.stem, defaults) for k in defaults if k in namespace}
    namespace.update(given)  # later cells that use a parameter's own name see the converted value
    resolved = resolve(path.stem, **{k: v for k, v in given.items() if k not in runs.LOCATION_PARAMS})
    if "device" in resolved:
        validate.device(resolved["device"])
    return resolved


def _strays(path, defaults: dict, namespace: dict) -> list[str]:
    """Public names in the kernel that neither a parameter nor any of the notebook's own cells defines: what papermill
    injected under a misspelt name. The notebook's own names are allowed so that rerunning the setup cell in Jupyter,
    after later cells ran, still works."""
    import types

    own = _names_bound_by_cells(path)
    return sorted(k for k, v in namespace.items()
                  if not k.startswith("_") and k not in KERNEL_NAMES and k not in defaults and k not in own
                  and not isinstance(v, types.ModuleType) and not callable(v))


def _names_bound_by_cells(path) -> set[str]:
    """Every name an assignment, import, loop or definition binds in the notebook's code cells (the parameters
    cell included; cells that are not plain Python, e.g. with %magics, are skipped)."""
    import ast
    import json

    names: set[str] = set()
    for c in json.loads(path.read_text()).get("cells", []):
        if c.get("cell_type") != "code":
            continue
        try:
            tree = ast.parse("".join(c.get("source", "")))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return names


def _read_string(name: str, value, notebook: str, defaults: dict):
    """`value`, or the literal a string spells when the parameter never takes a string (decided from its notebook
    default and profile values): lr='1e-3' -> 0.001, alphas='[0.5, 0.9]' -> [0.5, 0.9]. A string that spells no
    literal is kept, so that the study's own check rejects it with its one line."""
    if not isinstance(value, str):
        return value
    kinds = value_kinds(notebook, defaults).get(name, set())
    if not kinds or "str" in kinds:
        return value
    read = runner.parse_value(value)
    if isinstance(read, str):
        return value
    print(f"{name}={value!r} read as {read!r}")
    return read


# ---------------------------------------------------------------- the annotated parameters cell (papermill --help-notebook)

_KIND = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list"}


def value_kinds(notebook: str, defaults: dict | None = None) -> dict[str, set[str]]:
    """{parameter: the kinds of value it takes ('int', 'float', 'str', 'bool', 'list', 'None')}, from its notebook
    default, every profile's and every variant's value, and the study's PARAMETER_TYPES (for a parameter whose values
    are all None)."""
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    extra, sets = {k: "str" for k in runs.LOCATION_PARAMS}, list(profiles_of(notebook).values())
    m = module(notebook)
    if m is not None:
        extra.update(getattr(m, "PARAMETER_TYPES", {}))
        sets += list(getattr(m, "VARIANTS", {}).values())  # quirk flags: None = each variant's value
    out = {}
    for name, default in defaults.items():
        values = [default] + [p[name] for p in sets if name in p]
        kinds = {"None" if v is None else _KIND.get(type(v), type(v).__name__) for v in values}
        if name in extra:
            kinds.add(extra[name])
        if {"int", "float"} <= kinds:
            kinds.discard("int")  # an int where floats are taken (T = 10) is a float parameter
        out[name] = kinds
    return out


def annotation(kinds: set[str]) -> str:
    """The type papermill shows: 'float', or quoted 'Optional[float]' / 'Union[bool, list]' (quoted: a bare one would
    need `typing` imported into the parameters cell)."""
    base = sorted(kinds - {"None"})
    if not base:
        return '"None"'
    core = base[0] if len(base) == 1 else f"Union[{', '.join(base)}]"
    return f'"Optional[{core}]"' if "None" in kinds else (core if len(base) == 1 else f'"{core}"')


def parameter_help(notebook: str) -> dict[str, str]:
    """{parameter: its meaning} from the parameter table of the notebook's first markdown cell, whose rows read
    | `name` | meaning | smoke | reduced | full |  (a row may name several: | `epochs`, `batch_size` | ...)."""
    import json

    cells = json.loads(runner.notebook_path(notebook).read_text())["cells"]
    text = next(("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"), "")
    out, in_table = {}, False
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cols:
            in_table = False
        elif cols[0] == "parameter":
            in_table = True
        elif in_table and len(cols) >= 2 and not set(cols[0]) <= set("-: "):
            for name in re.findall(r"`(\w+)`", cols[0]):
                out.setdefault(name, _one_line_help(cols[1]))
    return out


def _one_line_help(text: str) -> str:
    # papermill skips a parameters-cell line holding more than one '=' (the help would hide the parameter)
    return re.sub(r"\s*=\s*", ": ", text.replace("`", ""))


def parameters_cell(notebook: str) -> str:
    """The notebook's parameters cell with a type and a one-line help on every parameter, papermill's
    `name: type = default  # help`; its comment lines stay where they are."""
    path = runner.notebook_path(notebook)
    defaults = runner.notebook_parameters(path)
    kinds, helps = value_kinds(path.stem, defaults), parameter_help(path)
    lines = []
    for line in _parameters_source(path).splitlines():
        m = re.match(r"(\w+)\s*(:[^=]*)?=", line)
        if line.lstrip().startswith("#") or not line.strip():
            lines.append(line)
        elif m and m.group(1) in defaults:
            name = m.group(1)
            help_ = helps.get(name, "")
            lines.append(f"{name}: {annotation(kinds[name])} = {_source_default(line)}" + (f"  # {help_}" if help_ else ""))
    return "\n".join(lines)


def _parameters_source(path) -> str:
    import json

    cells = json.loads(path.read_text())["cells"]
    cell = next(c for c in cells if "parameters" in (c.get("metadata", {}).get("tags") or []))
    return "".join(cell["source"])


def _source_default(line: str) -> str:
    """The default as written in the cell (its quotes kept), without annotation or trailing comment."""
    import ast

    rhs = line.split("=", 1)[1]
    for cut in [i for i, ch in enumerate(rhs) if ch == "#"] + [len(rhs)]:
        try:
            ast.parse(rhs[:cut].strip(), mode="eval")
            return rhs[:cut].strip()
        except SyntaxError:
            continue
    return rhs.strip()


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdnb.profiles")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("parameters-cell", help="print a notebook's annotated parameters cell (to paste)")
    pc.add_argument("notebook", help="name (05_self_distillation) or path of a notebook")
    args = ap.parse_args(argv)
    print(parameters_cell(args.notebook))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
