"""Issue 16: the thread policy every entry point gets (OMP_WAIT_POLICY=PASSIVE), and the opt-in `precision`
of the ResNet studies 03 and 05 (bf16 autocast + channels_last; recorded, in the run id, never in smoke)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from kdnb import numerics, profiles, runner, runs, sweep
from kdnb import dml_calibration as dc
from kdnb import self_distillation as sd

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- thread policy


def test_thread_policy_is_a_default_the_user_can_override():
    env = {}
    assert numerics.thread_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert numerics.thread_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_import_kdnb_sets_the_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys; import kdnb; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # torch is loaded by kdnb itself, after the policy was set: libgomp read PASSIVE
    assert out.split() == ["PASSIVE", "True"]


def test_installed_kernel_spec_carries_the_policy():
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    if not spec.is_file():
        pytest.skip(f"no python3 kernel spec installed under {sys.prefix} (the Makefile installs it)")
    env = json.loads(spec.read_text()).get("env") or {}
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE", (
        f"{spec} lacks env OMP_WAIT_POLICY=PASSIVE; reinstall it: {sys.executable} -m ipykernel install "
        "--sys-prefix --name python3 --env OMP_WAIT_POLICY PASSIVE")


ENV_PROBE = '''import os, json
from pathlib import Path
try:  # the process that started this kernel: kdnb run itself, or a sweep's worker
    parent = dict(e.split("=", 1) for e in Path(f"/proc/{os.getppid()}/environ").read_text().split("\\0") if "=" in e)
except OSError:
    parent = {}
Path(output_dir, "policy.json").write_text(json.dumps({"kernel": os.environ.get("OMP_WAIT_POLICY"),
                                                       "parent_at_start": parent.get("OMP_WAIT_POLICY")}))'''


def _probe_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('profile = "smoke"\nx = 1\noutput_dir = None')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(ENV_PROBE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_kdnb_run_and_sweep_children_get_the_policy(tmp_path, monkeypatch):
    nb = _probe_notebook(tmp_path / "probe.ipynb")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    out = runner.run(str(nb), {"x": 1}, results=tmp_path / "r1", progress_bar=False)
    assert json.loads((out / "policy.json").read_text())["kernel"] == "PASSIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set in kdnb run's own environment, inherited by the kernel

    monkeypatch.delenv("OMP_WAIT_POLICY")
    table = sweep.sweep(str(nb), ["x=2"], results=tmp_path / "r2", progress=False, echo=lambda *a: None)
    (trial,) = table.attrs["trials"]
    seen = json.loads((Path(trial["out"]) / "policy.json").read_text())
    assert seen["kernel"] == "PASSIVE"
    if Path("/proc/self/environ").is_file():  # the worker process was started with it, before any torch import
        assert seen["parent_at_start"] == "PASSIVE"


# ---------------------------------------------------------------- precision: parameters, record, run id

STUDIES = ("03_dml_kd_calibration", "05_self_distillation")


@pytest.mark.parametrize("nb", STUDIES)
def test_precision_defaults_and_checks(nb):
    expected = {"03_dml_kd_calibration": {"smoke": "fp32", "reduced": "bf16", "full": "bf16"},
                "05_self_distillation": {"smoke": "fp32", "reduced": "fp32", "full": "fp32"}}[nb]
    assert {p: profiles.resolve(nb, profile=p)["precision"] for p in expected} == expected
    reduced = profiles.resolve(nb, profile="reduced", precision="bf16")
    profiles.check(nb, reduced)  # allowed outside smoke
    with pytest.raises(ValueError, match=r"^precision='fp16' is not allowed: choose one of 'fp32', 'bf16'$"):
        profiles.check(nb, profiles.resolve(nb, profile="reduced", precision="fp16"))
    with pytest.raises(ValueError, match=r"^precision='bf16' is not allowed in the smoke profile") as e:
        profiles.check(nb, profiles.resolve(nb, profile="smoke", precision="bf16"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("nb", STUDIES)
def test_committed_run_ids_stay_valid_and_bf16_changes_the_id(nb):
    records = sorted((REPO / "results" / nb).glob("*/params.yaml"))
    if not records:
        pytest.skip(f"no committed records of {nb}")
    for f in records:
        old = yaml.safe_load(f.read_text())
        if "precision" in old:  # made since the parameter exists: its value is in the id
            assert runs.run_id(old) == f.parent.name
            continue
        # made before it existed, in fp32: resolved today with that value (03's reduced default is bf16 now)
        now = profiles.resolve(nb, **dict(old, precision=runs.param(old, "precision")))
        assert now["precision"] == "fp32" and runs.run_id(old) == runs.run_id(now) == f.parent.name
        assert runs.run_id(dict(now, precision="bf16")) != f.parent.name


def test_bf16_run_records_its_precision(tmp_path):
    params = profiles.resolve("05_self_distillation", profile="reduced", precision="bf16")
    out = tmp_path / runs.run_id(params)
    record = runs.Run("05_self_distillation", params, out).finish()
    assert record["params"]["precision"] == "bf16"
    assert yaml.safe_load((out / "params.yaml").read_text())["precision"] == "bf16"
    assert json.loads((out / "run.json").read_text())["params"]["precision"] == "bf16"


# ---------------------------------------------------------------- precision: what the training computes


def _cifar(n=32):
    g = torch.Generator().manual_seed(0)
    return sd.Cifar(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                    torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))


def test_05_bf16_autocasts_forward_passes_only(monkeypatch):
    seen = []
    real = sd.losses.self_distillation_mse

    def spy(z, y, t=None, **kw):
        seen.append((z.dtype, None if t is None else t.dtype, torch.is_autocast_enabled("cpu")))
        return real(z, y, t, **kw)

    monkeypatch.setattr(sd.losses, "self_distillation_mse", spy)
    kw = dict(seed=0, arch="resnet18", sd_alphas=[0.5], distillation_steps=2, epochs=1, batch_size=16, lr=1e-3,
              reg_coef=1e-4, teacher_bn_train_mode=False, shuffle=False, progress=False)
    bf16 = sd.run(_cifar(), precision="bf16", **kw)
    # the loss gets fp32 logits (student and teacher) and is computed outside autocast
    assert seen and {s for s in seen} <= {(torch.float32, None, False), (torch.float32, torch.float32, False)}
    fp32 = sd.run(_cifar(), **kw)
    # ... while the forward passes ran in bf16: the same seeds give other losses
    assert [r["history"][0]["train_loss"] for r in bf16] != [r["history"][0]["train_loss"] for r in fp32]


def test_03_bf16_uses_channels_last_and_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 1, 28, 28), generator=g, dtype=torch.uint8)
    xt = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    fm = dc.Fmnist(x, torch.arange(24) % 10, dc.normalise(xt[:10]), torch.arange(10), dc.normalise(xt),
                   torch.arange(20) % 10, 10)
    p = dict(dc.PROFILES["smoke"], batch_size=2, val_every=None, randaugment="none")
    res = {prec: dc.train_algorithm("baseline", fm, dict(p, precision=prec), seed=0, progress=False, keep_models=True)
           for prec in ("fp32", "bf16")}
    conv = lambda r: r["models"][0].conv1.weight
    assert conv(res["bf16"]).is_contiguous(memory_format=torch.channels_last)
    assert not conv(res["fp32"]).is_contiguous(memory_format=torch.channels_last)
    assert conv(res["bf16"]).dtype == torch.float32  # weights and AdamW stay fp32
    logits = {k: r["members"][0]["test_logits"] for k, r in res.items()}
    assert logits["bf16"].dtype == torch.float32 and not torch.equal(logits["bf16"], logits["fp32"])
    assert "precision" not in dc.teacher_config(p, fm, 0)  # fp32 teacher keys as before
    assert dc.teacher_config(dict(p, precision="bf16"), fm, 0)["precision"] == "bf16"
