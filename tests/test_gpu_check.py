"""kernels/gpu_check.sh, run here with a stand-in for Python: every step runs and is reported, a failing step does
not stop the others, the wheels are installed without the network and reach every step, and OUT holds what a lent
GPU machine sends back (at most 8 plain files, no folders)."""

import os
import stat
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "kernels", "gpu_check.sh")
STEPS = ("kernel-tests", "kernels-bench-fp32", "kernels-bench-bf16", "dp-bench-quick", "smoke-stages", "smoke-sample")

# Logs each call with the PYTHONPATH it saw, writes what --json / --out name, stands in for pip, fails dp.bench when
# FAIL_DP is set, and hands the summary's inline script (`PY - OUT`) to the real Python.
FAKE_PY = """#!/usr/bin/env bash
if [ "$1" = "-" ]; then exec "$REAL_PY" "$@"; fi
echo "$* || PYTHONPATH=${PYTHONPATH:-}" >> "$CALLS"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --json) echo '{"figure": 1.5}' > "${args[i+1]}";;
    --target) mkdir -p "${args[i+1]}/fake-1.0.dist-info";;
    --out) case ${args[i+1]} in *.png) echo png > "${args[i+1]}";;
             *) mkdir -p "${args[i+1]}"; echo ckpt > "${args[i+1]}/finetune.pt"; echo log > "${args[i+1]}/log.txt";; esac;;
  esac
done
case "$*" in *dp.bench*) [ -n "${FAIL_DP:-}" ] && exit 3;; esac
exit 0
"""


def run_check(tmp_path, fail_dp=False, wheels=True):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    bin_dir = tmp_path / "bin"  # an nvidia-smi that names a GPU
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/usr/bin/env bash\necho 'Fake GPU, 1.0, 80 GiB'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    if wheels:
        (wheel_dir / "fake-1.0-py3-none-any.whl").write_text("not really a wheel")
    env = dict(os.environ, PY=str(fake), REAL_PY=sys.executable, CALLS=str(tmp_path / "calls.txt"),
               WHEELS=str(wheel_dir), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    if fail_dp:
        env["FAIL_DP"] = "1"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    return proc, out, calls


def test_the_script_parses_and_names_every_step():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    text = open(SCRIPT).read()
    for needle in ("TRITON_INTERPRET=0", "kernels.bench --device cuda --dtype fp32 --sizes 256x1e7",
                   "--dtype bf16 --sizes 256x1e7", "dp.bench --device cuda --preset quick",
                   "train.py --preset smoke --device cuda"):
        assert needle in text, needle


def test_every_step_runs_and_out_is_what_a_lent_machine_sends_back(tmp_path):
    proc, out, calls = run_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "Fake GPU" in summary and "wheels: 1 installed" in summary
    for name in STEPS:
        assert any(line.startswith(name) and "pass" in line for line in summary.splitlines()), name
    assert 'dp_bench_quick: {"figure": 1.5}' in summary
    assert summary in proc.stdout
    files = sorted(os.listdir(out))
    assert files == ["dp_bench_quick.json", "kernels_bf16.json", "kernels_fp32.json", "logs.tar.gz", "smoke_grid.png",
                     "summary.txt"]
    assert all((out / f).is_file() for f in files)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert all(any(n.endswith(f"{name}.log") for n in names) for name in STEPS)
    assert any(n.endswith("smoke/log.txt") for n in names)
    assert not any(n.endswith(".pt") or "/site" in n for n in names)


def test_wheels_are_installed_offline_and_reach_every_step(tmp_path):
    _, _, calls = run_check(tmp_path)
    pip = [c for c in calls if " pip install " in f" {c} "]
    assert len(pip) == 1 and "--no-index" in pip[0] and "--target" in pip[0]
    site = pip[0].split("--target ")[1].split()[0]
    steps = [c for c in calls if " pip " not in f" {c} "]
    assert len(steps) == len(STEPS)
    assert all(c.split("|| PYTHONPATH=")[1].split(os.pathsep)[0] == site for c in steps)
    assert not os.path.exists(site)  # the temporary folder is removed at the end


def test_without_wheels_nothing_is_installed(tmp_path):
    proc, out, calls = run_check(tmp_path, wheels=False)
    assert not [c for c in calls if " pip " in f" {c} "]
    assert "wheels: 0 installed" in (out / "summary.txt").read_text()


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    proc, out, calls = run_check(tmp_path, fail_dp=True)
    lines = (out / "summary.txt").read_text().splitlines()
    assert any(line.startswith("dp-bench-quick") and "FAIL (rc 3)" in line for line in lines)
    assert any(line.startswith("smoke-sample") and "pass" in line for line in lines)
    assert "failing steps' logs" in proc.stdout


@pytest.mark.parametrize("env_py, expected", [(None, "python3"), ("/opt/py", "/opt/py")])
def test_python_is_py_else_the_checkouts_venv_else_python3(tmp_path, env_py, expected):
    """The rule, run in a copy of the script with no .venv beside it (a lent machine's checkout)."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    script = kernels / "gpu_check.sh"
    text = open(SCRIPT).read().split("WORK=$(mktemp -d)")[0]  # everything up to the steps
    script.write_text(text + 'echo "chosen: $PY"\n')
    env = {k: v for k, v in os.environ.items() if k != "PY"}
    if env_py:
        env["PY"] = env_py
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == f"chosen: {expected}"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_py = tmp_path / ".venv" / "bin" / "python"
    venv_py.write_text("")
    venv_py.chmod(0o755)
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == f"chosen: {env_py or '.venv/bin/python'}"
