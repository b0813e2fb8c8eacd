"""`kdnb sweep`: a grid over a tiny notebook, locally and on a local Ray cluster (2 CPUs).

The tiny notebook trains nothing: it resolves its parameters like a study notebook, appends to an
executions log (so the tests can count executions), can fail once on purpose (a marker file) or sleep in
the first execution of a sweep (so a test can SIGKILL the worker running it), and records
`score = 10 x + y + seed` through kdnb.runs.Run.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from kdnb import cli, runs, sweep

PARAMETERS = '''profile = "smoke"
seeds = None
x = 1
y = 2
output_dir = None
fail_once_marker = None
sleep = 0.0'''

BODY = '''import os, time
from pathlib import Path
from kdnb import runs, profiles
params = profiles.resolve("tiny", profile=profile, seeds=seeds, x=x, y=y, fail_once_marker=fail_once_marker,
                          sleep=sleep)
# the record's environment block imports torch (seconds per trial); these tests are about the sweep
runs.environment = lambda device="cpu": {"device": device, "stub": "tests/test_sweep.py"}
log = Path(output_dir).parent / "_log" if output_dir else None
if log:
    log.mkdir(exist_ok=True)
    with open(log / "executions.log", "a") as f:
        f.write(f"start {Path(output_dir).name}\\n")
    if sleep:
        try:  # only the first execution of the whole sweep sleeps: the one a test kills
            os.close(os.open(log / "slept", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            (log / "victim.tmp").write_text(f"{os.getppid()} {Path(output_dir).name}")  # parent = the worker
            os.replace(log / "victim.tmp", log / "victim")
            time.sleep(sleep)
        except FileExistsError:
            pass
if fail_once_marker:
    try:  # O_EXCL: exactly one of the concurrent trials creates the marker and fails
        fd = os.open(fail_once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        fd = None
    if fd is not None:
        os.write(fd, (Path(output_dir).name if output_dir else "").encode())
        os.close(fd)
        raise RuntimeError("failing once on purpose")
run = runs.Run("tiny", params, output_dir)
run.log(score=x * 10 + y + params["seeds"][0], nested={"half": x / 2, "name": "text"}, curve=[1, 2])
record = run.finish()
if log:
    with open(log / "executions.log", "a") as f:
        f.write(f"finish {Path(output_dir).name}\\n")'''


def write_tiny(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("nb") / "tiny.ipynb")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def executions(results: Path) -> list[str]:
    log = results / "tiny" / "_log" / "executions.log"
    return log.read_text().split("\n")[:-1] if log.is_file() else []


def run_folders(results: Path) -> list[Path]:
    return sorted(p for p in (results / "tiny").iterdir() if p.name != "_log")


def assert_exactly_once(results: Path, expected: int):
    folders = run_folders(results)
    assert len(folders) == expected
    for d in folders:
        assert sorted(p.name for p in d.iterdir()) == ["metrics.json", "notebook.ipynb", "params.yaml", "run.json"]
    finishes = [line.split()[1] for line in executions(results) if line.startswith("finish")]
    assert sorted(finishes) == [d.name for d in folders]  # every trial finished exactly once


# --------------------------------------------------------------------------- local backend, checks

def kill_when_ready(results: Path, killed: dict, timeout: float = 60) -> threading.Thread:
    """SIGKILL the worker process running the sweep's sleeping trial as soon as it reports itself."""
    victim = results / "tiny" / "_log" / "victim"

    def kill():
        deadline = time.time() + timeout
        while not victim.is_file() and time.time() < deadline:
            time.sleep(0.1)
        if victim.is_file():
            pid, run_id = victim.read_text().split()
            os.kill(int(pid), signal.SIGKILL)  # the worker process (the kernel's parent), mid-trial
            killed.update(pid=int(pid), run_id=run_id)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_local_backend_retries_failed_and_killed_trials(tiny, tmp_path):
    results = tmp_path / "results"
    marker = tmp_path / "failed-once"
    killed = {}
    killer = kill_when_ready(results, killed)
    table = sweep.sweep(str(tiny), ["x=1,2"], seeds=[0], fixed={"y": 5, "fail_once_marker": str(marker), "sleep": 2.0},
                        backend="local", workers=2, max_retries=2, results=results, progress=False)
    killer.join(timeout=5)
    assert killed and marker.is_file()
    assert {t["status"] for t in table.attrs["trials"]} == {"done"}
    assert table["score_mean"].tolist() == [15.0, 25.0] and table["n"].tolist() == [1, 1]
    assert_exactly_once(results, 2)
    starts = [line.split()[1] for line in executions(results) if line.startswith("start")]
    assert starts.count(killed["run_id"]) >= 2  # killed, then run again (the other trial failed once too)


@pytest.mark.parametrize("spec, named", [
    ("x", "'x'"), ("x=", "'x'"), ("=1", "missing parameter name"), ("x=1,,2", "empty value"),
    ("x=[1,2", "unbalanced"), ("z=1", "'z' is not a parameter of tiny.ipynb"),
    ("profile=smoke,bogus", "profile='bogus'"), ("output_dir=a,b", "'output_dir'"),
])
def test_bad_grid_is_rejected_before_anything_runs(tiny, tmp_path, capsys, spec, named):
    results = tmp_path / "results"
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        sweep.sweep(str(tiny), [spec], seeds="0", results=results, progress=False)
    assert cli.main(["sweep", str(tiny), "--grid", spec, "--seeds", "0", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not results.exists()


def test_bad_seeds_and_options_are_rejected(tiny, tmp_path):
    results = tmp_path / "results"
    for kwargs, named in [(dict(seeds="0,a"), "--seeds"), (dict(seeds="0,0"), "seeds"),
                          (dict(backend="slurm"), "backend"), (dict(address="h:6379"), "--backend ray"),
                          (dict(gpus_per_trial=1), "gpus_per_trial"), (dict(max_retries=-1), "max_retries"),
                          (dict(fixed={"y": 1}, grid=["y=1,2"]), "'y'")]:
        kwargs = {"grid": ["x=1,2"], **kwargs}
        with pytest.raises(ValueError, match=named):
            sweep.sweep(str(tiny), kwargs.pop("grid"), results=results, progress=False, **kwargs)
    assert not results.exists()


def test_grid_syntax():
    assert sweep.parse_grid(["sd_alphas=[0.0,0.6],[0.6]", "lr=1e-3, 1e-4", "arch=resnet18,'a,b'"]) == {
        "sd_alphas": [[0.0, 0.6], [0.6]], "lr": [1e-3, 1e-4], "arch": ["resnet18", "a,b"]}
    assert sweep.parse_grid(["x=[1,2]"]) == {"x": [[1, 2]]}  # brackets keep a list one grid point
    with pytest.raises(ValueError, match="repeats"):
        sweep.parse_grid(["x=1,1"])


def test_study_notebook_plans_one_run_per_point_and_seed(tmp_path):
    trials = sweep.plan("05_self_distillation", sweep.parse_grid(["sd_alphas=[0.0,0.6],[0.6]"]), seeds=[0, 1],
                        fixed={"profile": "reduced"}, results=tmp_path)
    assert [(t.resolved["sd_alphas"], t.resolved["seeds"]) for t in trials] == [
        ([0.0, 0.6], [0]), ([0.0, 0.6], [1]), ([0.6], [0]), ([0.6], [1])]
    assert len({t.out for t in trials}) == 4 and all(t.out.parent == tmp_path / "05_self_distillation" for t in trials)
    assert not any(tmp_path.iterdir())


def test_summary_of_records():
    rec = {"metrics": {"acc": 0.5, "flag": True, "per": {"a": 1, "b": [1]}, "nan": float("nan")},
           "claims": {"E3": {"values": [0.2, 0.4]}, "E1": {"values": [[1.0, 2.0]]}}}
    assert sweep.numeric_scalars(rec) == {"acc": 0.5, "per.a": 1.0, "claim:E3": pytest.approx(0.3)}


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tiny, tmp_path_factory):
    """2x2 grid x 2 seeds on the local Ray cluster; one trial fails once on purpose and is retried."""
    results = tmp_path_factory.mktemp("grid") / "results"
    marker = results.parent / "failed-once"
    start = time.time()
    table = sweep.sweep(str(tiny), ["x=1,2", "y=3,4"], seeds="0,1", fixed={"fail_once_marker": str(marker)},
                        backend="ray", max_retries=1, results=results, progress=False)
    return results, marker, table, time.time() - start


@pytest.mark.slow
def test_grid_on_ray(finished_sweep, tiny):
    results, marker, table, _ = finished_sweep
    assert len(list(results.glob("tiny/*/run.json"))) == 8
    assert_exactly_once(results, 8)
    starts = [line for line in executions(results) if line.startswith("start")]
    assert len(starts) == 9 and marker.is_file()  # the failed execution was retried once
    assert {t["status"] for t in table.attrs["trials"]} == {"done"}
    assert len(table) == 4 and list(table["n"]) == [2, 2, 2, 2]
    got = {(r.x, r.y): (r.score_mean, r.score_std) for r in table.itertuples()}
    for (x, y), (mean, std) in got.items():
        assert mean == pytest.approx(10 * x + y + 0.5) and std == pytest.approx(0.5 ** 0.5)
    assert table["nested.half_mean"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert "curve_mean" not in table and "nested.name_mean" not in table  # numeric scalars only
    # each run records exactly the parameters the CLI resolved before starting it
    for t in sweep.plan(str(tiny), {"x": [1, 2], "y": [3, 4]}, seeds=[0, 1],
                        fixed={"fail_once_marker": str(marker)}, results=results):
        assert yaml.safe_load((t.out / "params.yaml").read_text()) == t.resolved
        assert t.resolved["seeds"] == [t.seed] and t.out.name == runs.run_id(t.resolved)


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_runs_nothing(finished_sweep, tiny, capsys):
    results, marker, first, _ = finished_sweep
    before = executions(results)
    table = sweep.sweep(str(tiny), ["x=1,2", "y=3,4"], seeds="0,1", fixed={"fail_once_marker": str(marker)},
                        backend="ray", results=results, progress=False)
    assert executions(results) == before
    assert {t["status"] for t in table.attrs["trials"]} == {"cached"}
    assert table.drop(columns="status").equals(first.drop(columns="status"))
    assert "0 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_ray_worker_loses_nothing(ray_cluster, tiny, tmp_path):
    results = tmp_path / "results"
    killed = {}
    killer = kill_when_ready(results, killed)
    table = sweep.sweep(str(tiny), ["x=1,2", "y=3,4"], seeds="0,1", fixed={"sleep": 3.0},
                        backend="ray", max_retries=1, results=results, progress=False)
    killer.join(timeout=5)
    assert killed, "the sleeping trial never reported its worker"
    assert {t["status"] for t in table.attrs["trials"]} == {"done"}
    assert len(table.attrs["trials"]) == 8 and len({t["out"] for t in table.attrs["trials"]}) == 8
    assert list(table["n"]) == [2, 2, 2, 2]
    assert_exactly_once(results, 8)
    starts = [line.split()[1] for line in executions(results) if line.startswith("start")]
    assert len(starts) == 9 and starts.count(killed["run_id"]) == 2  # the killed trial ran again, once


# --------------------------------------------------------------------------- report (reads every run record)

def test_report_figure_links_and_offline_reason(tmp_path):
    from kdnb import papers, report

    def record(run_id, profile, claims):
        d = tmp_path / "05_self_distillation" / run_id
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"notebook": "05_self_distillation", "params": {"profile": profile},
                                                "claims": claims}))

    empty = tmp_path / "empty"
    empty.mkdir()
    md, _ = report.write(empty)  # no non-smoke runs: a table, no figure
    text = md.read_text()
    assert not (empty / "figures").exists() and "![" not in text
    assert "not runnable offline (full CIFAR-10" in text

    record("reduced-a", "reduced", {"E1": {"values": [papers.reported("05_self_distillation", "E1")]},
                                    "E3": {"values": [0.2041, 0.2043]}})
    record("reduced-b", "reduced", {"E3": {"values": [0.2042]}})
    record("smoke-c", "smoke", {"E3": {"values": [9.0]}})
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "gone.png").write_bytes(b"stale")
    md, _ = report.write(tmp_path)
    text = md.read_text()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["05_self_distillation.png"]
    assert "![05_self_distillation: reported vs reproduced](figures/05_self_distillation.png)" in text
    e3 = next(line for line in text.splitlines() if line.startswith("| **E3**"))
    assert "(n=3)" in e3 and "[reduced-a](05_self_distillation/reduced-a/notebook.ipynb)" in e3
    assert "[reduced-b](05_self_distillation/reduced-b/notebook.ipynb)" in e3 and "smoke-c" not in text
    assert [r["claim"] for r in report.plotted(report.rows(tmp_path), "05_self_distillation")] == ["E1", "E3"]


@pytest.mark.parametrize("ignored_by_parent", [False, True])
def test_ctrl_c_stops_the_sweep_and_its_trials_at_once(tiny, tmp_path, ignored_by_parent):
    """One SIGINT to the driver: no queued trial starts, the running one is stopped (its worker and kernel end),
    what is left is said in one line, exit code 130, within seconds (issue 18, fault 7). Also when the driver was
    started with SIGINT ignored (a parent that ignores it, as a background job's shell or this session's full test
    run did: the driver inherited SIG_IGN and hung until the sweep installed its own handler)."""
    import subprocess
    import sys

    import psutil

    res = tmp_path / "res"
    code = ("import sys; from kdnb import cli; sys.exit(cli.main(sys.argv[1:]))")
    driver = subprocess.Popen([sys.executable, "-c", code, "sweep", str(tiny), "--grid", "x=1,2,3", "-p", "sleep",
                               "120", "--seeds", "0", "--results", str(res), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored_by_parent
                              else None)
    try:
        victim = res / "tiny" / "_log" / "victim"
        deadline = time.time() + 60
        while not victim.is_file() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.1)
        assert victim.is_file(), driver.communicate(timeout=30)
        worker = int(victim.read_text().split()[0])
        kernel = [p.pid for p in psutil.Process(worker).children(recursive=True)]
        t0 = time.time()
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=30)
        assert driver.returncode == 130, (out, err)
        assert time.time() - t0 < 15
        assert "Traceback" not in err and "3 of 3 trials not finished" in err
        assert [line for line in executions(res) if line.startswith("start")] == executions(res)[:1]  # none started
        time.sleep(0.5)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in [worker] + kernel)
    finally:  # never leave a driver behind when an assertion fails
        if driver.poll() is None:
            for p in psutil.Process(driver.pid).children(recursive=True) + [psutil.Process(driver.pid)]:
                p.kill()


# --------------------------------------------------------------------------- Ray friction (issue 15, items 11-13)

def test_a_record_written_in_another_checkout_is_copied_back_and_said_so(tiny, tmp_path):
    """Two Ray nodes on one machine without --results: each writes into its own checkout's results/. The worker
    sends the record back because the folder it wrote is not the driver's, and the done line says where from."""
    import socket

    driver_root, worker_root = tmp_path / "driver", tmp_path / "worker"
    (t,) = sweep.plan(str(tiny), {}, seeds=[0], results=driver_root)
    result = sweep.execute(str(tiny), t.given, str(worker_root), socket.gethostname(), str(t.out))
    assert Path(result["out"]).parent.parent == worker_root and "files" in result  # same host, other folder
    sweep._finish(t, result)
    assert json.loads((t.out / "run.json").read_text())["run_id"] == t.out.name
    line = sweep._done_line(t)
    assert f"copied from {socket.gethostname()}:{worker_root}" in line and "checkpoints stay there" in line


def test_same_folder_sends_nothing_back(tiny, tmp_path):
    import socket

    (t,) = sweep.plan(str(tiny), {}, seeds=[0], results=tmp_path)
    result = sweep.execute(str(tiny), t.given, str(tmp_path), socket.gethostname(), str(t.out))
    assert "files" not in result
    sweep._finish(t, result)
    assert "copied" not in sweep._done_line(t)


@pytest.mark.parametrize("token, says", [(None, "this driver has no token"),
                                         ("wrong-token", "from RAY_AUTH_TOKEN (11 characters), does not match")])
def test_a_refused_token_is_one_line_and_exit_2_before_any_trial(tiny, tmp_path, capsys, monkeypatch, token, says):
    """The probe stands in for Ray's client: it prints what Ray 2.60's prints for a refused token, then hangs on
    retrying as Ray's does; the driver stops at the first refusal."""
    monkeypatch.setattr(sweep, "PROBE", "import sys, time\nprint('[2026-12-01 W gcs_client.cc:210] Failed to get "
                        "cluster ID from GCS server: Unauthenticated: RPC error: InvalidAuthToken: Authentication "
                        "token is missing or incorrect', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not be reached"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this module's local cluster may be up
    start = time.time()
    code = cli.main(["sweep", str(tiny), "--grid", "x=1,2", "--seeds", "0", "--backend", "ray", "--address", "127.0.0.1:6390",
                     "--results", str(tmp_path / "results"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and time.time() - start < 30
    assert len(err.strip().splitlines()) == 1 and "refused this driver's authentication token" in err and says in err
    assert executions(tmp_path / "results") == []  # nothing was submitted


def test_readme_stops_only_its_own_cluster(tmp_path):
    """The README's commands against two fake Ray clusters (process groups whose processes carry their
    --temp-dir, like gcs_server and raylet): only the one named goes."""
    import re
    import subprocess

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"# \.\.\. later, on each node:\n(.*?)```", readme, re.S).group(1)
    assert "ray stop" not in block

    def fake_cluster(temp_dir: Path) -> subprocess.Popen:
        script = (f'(exec -a "ray::RuntimeEnvAgent" sleep 300) & '
                  f'(exec -a "raylet --raylet_socket_name={temp_dir}/session_1/sockets/raylet" sleep 300) & '
                  f'exec -a "gcs_server --log_dir={temp_dir}/session_1/logs" sleep 300')
        return subprocess.Popen(["bash", "-c", script], start_new_session=True)

    mine, theirs = fake_cluster(tmp_path / "ray-me"), fake_cluster(tmp_path / "ray-other")
    time.sleep(0.5)
    group = lambda p: [int(x) for x in subprocess.run(["pgrep", "-g", str(os.getpgid(p.pid))], capture_output=True,
                                                       text=True).stdout.split()]
    mine_pids, theirs_pids = group(mine), group(theirs)
    assert len(mine_pids) == 3 and len(theirs_pids) == 3
    try:
        cmd = block.replace("/tmp/ray-$USER", str(tmp_path / "ray-me")).replace("sleep 10", "sleep 1")
        subprocess.run(["bash", "-c", cmd], check=True, timeout=30)
        mine.wait(timeout=5)
        alive = [p for p in mine_pids if Path(f"/proc/{p}").exists() and "Z" not in
                 Path(f"/proc/{p}/stat").read_text().split()[2]]
        assert alive == []
        assert all(Path(f"/proc/{p}").exists() for p in theirs_pids)  # the other cluster is untouched
    finally:
        os.killpg(os.getpgid(theirs.pid), signal.SIGKILL)
        theirs.wait()
