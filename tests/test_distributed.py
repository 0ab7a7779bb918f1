"""Several processes (gloo on this CPU): the DP step is the one-process step, and failures stop the run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp

from conftest import ROOT


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_dp_step(rank, world, port, out_path):
    """The same DP step (data, Poisson sample, loss draws, noise seed) on `world` processes."""
    import torch.distributed as tdist

    from dp.randomness import seeded_secret
    from dp.select import select_parameters
    from dp.step import Mechanism, Task, private_gradient
    from ldm.config import make_config
    from ldm.diffusion import Diffusion
    from ldm.distributed import Dist
    from ldm.build import build_unet

    torch.set_num_threads(1)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    unet = build_unet(make_config("smoke"))
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = select_parameters(unet, "all")
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(12, 3, 8, 8, generator=g), torch.rand(12, 3, 8, 8, generator=g) * 0.1
    idx = torch.tensor([0, 1, 4, 5, 7, 9, 11])
    task = Task(unet, Diffusion(), params, (mean, std), torch.arange(12) % 10, physical_batch=2)
    grads = private_gradient(task, Mechanism(q=0.5, clip=0.05, sigma=0.7, divisor=4.0), seeded_secret(99, "test"),
                             5, idx, dist=Dist(rank, world))
    torch.save(grads, f"{out_path}.{rank}")
    if world > 1:
        tdist.destroy_process_group()


def test_two_process_dp_step_equals_one_process(tmp_path):
    one_dp_step(0, 1, 0, str(tmp_path / "single"))
    mp.spawn(one_dp_step, args=(2, free_port(), str(tmp_path / "multi")), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.0")
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"multi.{rank}")
        for a, b in zip(single, multi):  # same noise (added once, by rank 0) and same clipped sum
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def launch(rank, world, port, argv, log):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_torchrun_smoke_run_has_one_ledger_entry_per_step(tmp_path):
    out = tmp_path / "ddp"
    argv = ["--preset", "smoke", "--stage", "all", "--out", str(out), "--ae-steps", "8", "--pretrain-steps", "8",
            "--sample-steps", "4", "--grid-n", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "privacy_report.json").read_text())
    ledger = [json.loads(line) for line in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == list(range(report["steps"])) and report["steps"] == 16
    assert "2 process(es)" in proc.stdout and proc.stdout.count("Privacy: the fine-tuned model is") == 1


def test_killing_one_rank_stops_the_other_with_a_clear_error(tmp_path):
    port = free_port()
    argv = ["--preset", "smoke", "--stage", "autoencoder", "--out", str(tmp_path / "run"),
            "--ae-steps", "100000", "--dist-timeout", "20"]
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(2)]
    procs = [launch(r, 2, port, argv, logs[r]) for r in range(2)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "autoencoder:" not in (tmp_path / "rank0.log").read_text():
            time.sleep(0.5)  # wait until training has started
        procs[1].send_signal(signal.SIGKILL)
        code = procs[0].wait(timeout=120)  # must end on its own, well before forever
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    text = (tmp_path / "rank0.log").read_text()
    assert code != 0 and "error: rank 0: another process of the distributed run failed" in text, text[-1500:]
