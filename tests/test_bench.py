"""Smoke runs of the two benchmarks, `python -m kernels.bench` and `python -m dp.bench`, on the CPU at their smallest
sizes: each exits 0, and the figures it prints and writes as JSON are positive finite numbers, agree with each other,
follow the formulas the benchmarks state and carry the fields the README documents. The numbers themselves depend on
the machine and its load, so no speed is asserted, only what a reader of the table relies on.
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.machine import environment_line, timing_environment

REPO = Path(__file__).resolve().parents[1]
HAS_OPACUS = importlib.util.find_spec("opacus") is not None  # a benchmark-only dependency: a column when present


def module_env():
    """The environment the benchmarks run in here: this one, with one OpenMP thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_module(module, *argv):
    """`python -m module argv...` in the repository, one torch thread; its stdout (fails on a non-zero exit)."""
    env = module_env()
    cmd = [sys.executable, "-m", module, *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def positive_finite(value, what):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what} = {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{what} = {value!r} is not a positive finite number"


def table(lines, first_title):
    """The '|'-separated table whose header starts with `first_title`: (titles, rows of stripped cells)."""
    start = next(i for i, line in enumerate(lines) if line.split("|")[0].strip() == first_title)
    split = [[cell.strip() for cell in line.split("|")] for line in lines[start:]]
    titles, rows = split[0], []
    for cells in split[1:]:
        if len(cells) != len(titles):
            break
        rows.append(dict(zip(titles, cells)))
    return titles, rows


def test_kernels_bench_smallest_cpu_run(tmp_path):
    """B = 1, the smallest; P = 1e5, the smallest round size whose rounded GB/s and % copy still print non-zero (at
    P = 16, the least that gives each of the 16 tensors a coordinate, they print 0.0); median of 3 calls, so that one
    call delayed by another process on the machine does not decide the figure."""
    path = tmp_path / "kernels.json"
    stdout = run_module("kernels.bench", "--device", "cpu", "--sizes", "1x1e5", "--repeats", "3", "--threads", "1",
                        "--json", str(path))
    report = json.loads(path.read_text())
    assert report["device"].startswith("CPU") and report["dtype"] == "fp32" and report["skipped"] == []
    assert report["environment"] == timing_environment(module_env())  # OMP_NUM_THREADS=1 at least
    assert report["environment"]["OMP_NUM_THREADS"] == "1"
    assert environment_line(module_env()) in stdout.splitlines()
    assert report["formula"] == "2 * B * P * elem_size + P * 4"
    copy_bw = report["copy_bandwidth_bytes_per_s"]
    positive_finite(copy_bw, "copy bandwidth")
    [row] = report["rows"]
    assert (row["B"], row["P"], row["dtype"]) == (1, 10**5, "float32")
    assert row["bytes"] == 2 * 1 * 10**5 * 4 + 10**5 * 4  # gradients read twice, the result written once
    for key in ("reference_s", "multi_pass_s", "gb_per_s", "copy_share", "speedup_vs_multi_pass"):
        positive_finite(row[key], key)
    # on a CPU the figures are the plain-torch reference's (the "auto" path): no kernel timing, no kernel error
    assert "kernel_s" not in row and "rel_err" not in row and "speedup_vs_reference" not in row
    assert math.isclose(row["gb_per_s"], row["bytes"] / row["reference_s"] / 1e9, rel_tol=1e-12)
    assert math.isclose(row["copy_share"], row["bytes"] / row["reference_s"] / copy_bw, rel_tol=1e-12)
    assert math.isclose(row["speedup_vs_multi_pass"], row["multi_pass_s"] / row["reference_s"], rel_tol=1e-12)
    if HAS_OPACUS:
        positive_finite(row["opacus_s"], "opacus_s")
        positive_finite(row["speedup_vs_opacus"], "speedup_vs_opacus")
    else:
        assert row["opacus_s"] is None and row["speedup_vs_opacus"] is None
        assert "opacus not installed" in stdout.splitlines()

    lines = stdout.splitlines()
    assert "bytes = 2 * B * P * elem_size + P * 4" in lines[0]
    assert f"copy bandwidth {copy_bw / 1e9:.1f} GB/s" in lines[0]
    titles, rows = table(lines, "B")
    assert titles == ["B", "P", "ref ms", "multi ms", "opacus ms", "ref GB/s", "% copy", "x vs multi", "x vs opacus"]
    [cells] = rows
    assert cells["B"] == "1" and float(cells["P"]) == 1e5
    printed = {"ref ms": format(row["reference_s"] * 1e3, ".3f"),
               "multi ms": format(row["multi_pass_s"] * 1e3, ".3f"),
               "ref GB/s": format(row["gb_per_s"], ".1f"), "% copy": format(row["copy_share"], ".1%"),
               "x vs multi": format(row["speedup_vs_multi_pass"], ".2f")}
    for title, text in printed.items():
        assert cells[title] == text, (title, cells[title], text)  # the table shows the JSON's figures
        positive_finite(float(text.rstrip("%")), f"printed {title}")
    if not HAS_OPACUS:
        assert cells["opacus ms"] == cells["x vs opacus"] == "-"


def test_dp_bench_smallest_cpu_run(tmp_path):
    """Smoke preset (the smallest), one timed step, no warm-up, each method in its own subprocess (stepped in turn,
    the default schedule). Batch 2 in micro-batches of 1: the smallest batch at which the bench's own cross-check
    clips anything (C = the median per-sample norm clips the larger example; with one example C is its own norm and
    nothing is clipped), and more than one micro-batch per step."""
    path = tmp_path / "dp.json"
    stdout = run_module("dp.bench", "--preset", "smoke", "--batch", "2", "--physical-batch", "1", "--repeats", "1",
                        "--warmup", "0", "--threads", "1", "--device", "cpu", "--json", str(path))
    report = json.loads(path.read_text())
    assert {k: report["args"][k] for k in ("preset", "batch", "physical_batch", "repeats", "warmup")} == \
        {"preset": "smoke", "batch": 2, "physical_batch": 1, "repeats": 1, "warmup": 0}
    assert report["args"]["sequential"] is False  # the default: the methods' subprocesses stepped in turn
    names = {"a": "non-private", "b": "ours (DP, bk)", "v": "ours (DP, vmap)"}
    names |= {"c": "opacus (DP)", "g": "opacus ghost (DP)"} if HAS_OPACUS else {}
    results = report["results"]
    assert set(results) == set(names)
    for key, r in results.items():
        assert (r["method"], r["name"], r["threads"]) == (key, names[key], 1)
        for field in ("seconds", "cpu_seconds", "samples_per_s", "peak_rss_mib"):
            positive_finite(r[field], f"{key}.{field}")
        assert math.isfinite(r["step_rss_mib"]) and r["step_rss_mib"] >= 0  # growth during the steps: may be 0
        assert len(r["times"]) == len(r["cpu_times"]) == 1 and r["seconds"] == statistics.median(r["times"])
        assert math.isclose(r["samples_per_s"], 2 / r["seconds"], rel_tol=1e-12)  # samples/s = B / median seconds

    ratios = report["ratios"]
    expected = {"dp_over_nonprivate": results["a"]["seconds"] / results["b"]["seconds"],
                "dp_over_nonprivate_cpu": results["a"]["cpu_seconds"] / results["b"]["cpu_seconds"],
                "bk_over_vmap": results["v"]["seconds"] / results["b"]["seconds"],
                "vmap_over_nonprivate": results["a"]["seconds"] / results["v"]["seconds"]}
    if HAS_OPACUS:
        expected |= {"dp_over_opacus": results["c"]["seconds"] / results["b"]["seconds"],
                     "dp_over_opacus_cpu": results["c"]["cpu_seconds"] / results["b"]["cpu_seconds"],
                     "vmap_over_opacus": results["c"]["seconds"] / results["v"]["seconds"],
                     "dp_over_opacus_ghost": results["g"]["seconds"] / results["b"]["seconds"],
                     "dp_over_opacus_ghost_cpu": results["g"]["cpu_seconds"] / results["b"]["cpu_seconds"]}
    assert set(ratios) == set(expected)
    for key, value in expected.items():
        positive_finite(ratios[key], key)
        assert math.isclose(ratios[key], value, rel_tol=1e-12), key

    sanity = report["sanity"]  # sigma 0, C = the median per-sample norm
    positive_finite(sanity["clip"], "sanity.clip")
    assert sanity["clip"] == sanity["median_norm"] < sanity["max_norm"]  # the larger example is clipped
    for key in ("vs_autograd", "bk_vs_vmap", *(("vs_opacus", "vs_opacus_ghost") if HAS_OPACUS else ())):
        assert 0 <= sanity[key] < 1e-5, (key, sanity[key])  # relative differences of the same sums: fp32 rounding

    lines = stdout.splitlines()
    positive_finite(report["trainable"], "trainable")
    assert lines[0].startswith("dp.bench: preset smoke") and f"trainable {report['trainable']:,}" in lines[0]
    assert report["environment"] == timing_environment(module_env()) and report["environment"]["OMP_NUM_THREADS"] == "1"
    assert lines[1] == environment_line(module_env())  # what every method's subprocess inherited
    titles, rows = table(lines, "method")
    assert titles == ["method", "s/step", "samples/s", "CPU s/step", "peak RSS MiB", "+step MiB"]
    assert [row["method"] for row in rows] == [names[k] for k in results]
    for key, row in zip(results, rows):
        r = results[key]
        printed = {"s/step": format(r["seconds"], ".3f"), "samples/s": format(r["samples_per_s"], ".1f"),
                   "CPU s/step": format(r["cpu_seconds"], ".3f"), "peak RSS MiB": format(r["peak_rss_mib"], ".0f"),
                   "+step MiB": format(r["step_rss_mib"], ".0f")}
        for title, text in printed.items():
            assert row[title] == text, (key, title, row[title], text)  # the table shows the JSON's figures
    ratio_line = next(line for line in lines if line.startswith("ours / non-private samples/s:"))
    assert ratio_line.startswith(f"ours / non-private samples/s: {ratios['dp_over_nonprivate']:.2f} ")
    assert ratio_line.endswith((": met", ": NOT met"))  # the goal is machine-dependent: only that it is judged
    assert any(line.startswith("sanity: ours book-keeping vs ours vmap clipped sum") for line in lines)
    # every selected tensor with an all-zero gradient is the known structural case, named with its reason
    zero_line = next(line for line in lines if line.startswith("selected tensors with an all-zero gradient:"))
    assert "cross-attention to the single class-context token" in zero_line


@pytest.mark.parametrize("flags, needle", [(["--dp-lora", "-1"], "--dp-lora"), (["--dp-blocks", "nowhere"],
                                                                                 "--dp-blocks 'nowhere'")])
def test_dp_bench_refuses_a_bad_selection(flags, needle, capsys):
    from dp import bench
    with pytest.raises(SystemExit) as stop:
        bench.main(["--preset", "smoke", *flags])
    assert stop.value.code == 2 and needle in capsys.readouterr().err


def test_dp_bench_times_a_lora_selection(tmp_path):
    """--dp-lora: the bench trains the adapters' factors (and the class embedding), as training would."""
    path = tmp_path / "lora.json"
    run_module("dp.bench", "--preset", "smoke", "--batch", "2", "--physical-batch", "2", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--dp-lora", "2", "--json", str(path))
    report = json.loads(path.read_text())
    from dp.select import select_trainable
    from ldm.build import build_unet
    from ldm.config import make_config
    cfg = make_config("smoke", {"dp_lora": 2})
    params = select_trainable(build_unet(cfg), cfg)
    assert params and all(".down." in n or ".up." in n or n.startswith("class_embed.") for n in params)
    assert report["args"]["dp_lora"] == 2 and report["trainable"] == sum(p.numel() for p in params.values())
    assert 0 <= report["sanity"]["bk_vs_vmap"] < 1e-5


@pytest.mark.parametrize("sizes", ["1x1", "1x0", "0x16", "64xlots"])
def test_kernels_bench_refuses_sizes_it_cannot_run(sizes):
    from kernels import bench
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "cpu", "--sizes", sizes])
    assert stop.value.code == 2


def test_dp_bench_interleaved_rounds_rotate_the_leader():
    """Each round steps every method once, and over len(methods) rounds each method goes first exactly once (so no
    method always runs right after the same other one, or always first after a pause)."""
    from dp.bench import round_order
    methods = list("abvcg")
    orders = [round_order(methods, r) for r in range(2 * len(methods))]
    assert all(sorted(o) == sorted(methods) for o in orders)
    assert sorted(o[0] for o in orders[:len(methods)]) == sorted(methods)
    assert orders[len(methods)] == methods  # the rotation repeats
    assert [o[0] for o in orders[:3]] == ["a", "b", "v"]


def test_dp_bench_serve_protocol():
    """A serving subprocess's side, in this process: 'ready' after set-up and warm-up, one JSON line of positive
    times per 'step', then at 'done' the method's summary over exactly the steps it was asked for."""
    import io
    from dp import bench
    args = bench.parse_args(["--preset", "smoke", "--batch", "2", "--physical-batch", "1", "--warmup", "1",
                             "--threads", "1", "--only", "b", "--serve"])
    replies = io.StringIO()
    bench.serve(args, io.StringIO("step\nstep\ndone\nstep\n"), replies)
    lines = replies.getvalue().splitlines()
    assert lines[0] == "ready" and len(lines) == 4
    steps = [json.loads(line) for line in lines[1:3]]
    for t in steps:
        positive_finite(t["seconds"], "seconds")
        positive_finite(t["cpu_seconds"], "cpu_seconds")
    summary = json.loads(lines[3])
    assert summary["method"] == "b" and summary["times"] == [t["seconds"] for t in steps]
    assert summary["seconds"] == statistics.median(summary["times"])
    assert math.isclose(summary["samples_per_s"], 2 / summary["seconds"], rel_tol=1e-12)


def test_dp_bench_names_a_subprocess_that_died():
    """An interleaved run whose subprocess exits (say, out of memory) stops with an error naming the method and
    its exit code, not a JSON error on an empty line."""
    import io
    from dp import bench

    class Dead:
        stdout = io.StringIO("")

        def wait(self):
            return 137
    with pytest.raises(RuntimeError, match=r"'ours \(DP, vmap\)' exited with code 137"):
        bench.reply(Dead(), "v")


def test_dp_bench_serve_needs_a_method(capsys):
    from dp import bench
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--preset", "smoke", "--serve"])
    assert stop.value.code == 2 and "--serve needs --only" in capsys.readouterr().err


def test_dp_bench_sequential_schedule(tmp_path):
    """--sequential, the one-method-after-another schedule: the same report, each method timed in its own run."""
    path = tmp_path / "seq.json"
    run_module("dp.bench", "--preset", "smoke", "--batch", "2", "--physical-batch", "1", "--repeats", "2",
               "--warmup", "0", "--threads", "1", "--sequential", "--json", str(path))
    report = json.loads(path.read_text())
    assert report["args"]["sequential"] is True
    assert set(report["results"]) >= {"a", "b", "v"}
    for key, r in report["results"].items():
        assert len(r["times"]) == 2 and r["seconds"] == statistics.median(r["times"]), key
        positive_finite(r["peak_rss_mib"], f"{key}.peak_rss_mib")
