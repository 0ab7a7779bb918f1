"""The privacy report of a DP fine-tuning run: `privacy_report.json`, the same in words, and in the checkpoint.

Every value in it is public by the threat model of dp/finetune.py: the configuration, the mechanism
(q, sigma, C, T), the accounted epsilon (a function of those only) and N, which is treated as public (or is
the public bound --private-size). No value computed from private data appears here.
"""

import os

from dp.accountant import neighbouring_relation
from dp.select import selection_size
from ldm.checkpoint import atomic_write_json

THREAT_MODEL = ("The adversary knows the code, the resolved configuration (seeds included), every file the run "
                "writes (checkpoints, logs, the privacy ledger, this report, sample grids) and every private "
                "example but one. The only secret is the randomness drawn from the operating system (a 256-bit "
                "key, never stored in a release run). The released model is the Poisson-subsampled Gaussian "
                "mechanism accounted here, with sensitivity C, post-processed.")
NOT_COVERED = ("the public data sets used for the autoencoder and pretraining (assumed public)",
               "hyperparameter search or repeated runs on the private data (each run spends its own budget)",
               "the number N of private examples, treated as public unless --private-size gives a public bound",
               "floating-point artefacts of the Gaussian sampler (Jin et al. 2022)",
               "wall-clock timing: a step's duration grows with its sampled batch size; the progress bar shows no "
               "rate or time, but file timestamps and the metrics log's record times remain")


def privacy_report(run):
    """The report of a FinetuneRun (dp/finetune.py) after the steps its ledger records, as a flat dict."""
    d, mech = run.cfg.dp, run.mech
    eps = run.ledger.epsilon(d.delta)
    n_train, share = selection_size(run.task.unet, run.task.params)
    return dict(
        differentially_private=True, epsilon=eps.epsilon if eps else 0.0, delta=d.delta,
        epsilon_remove=eps.epsilon_remove if eps else None, epsilon_add=eps.epsilon_add if eps else None,
        directions=("epsilon is the larger of the two directions of add/remove: 'remove' (the neighbour lacks "
                    "the example) and 'add' (the neighbour has one more)"),
        sigma=mech.sigma, q=mech.q, steps=run.ledger.steps, steps_planned=run.steps, clip=mech.clip,
        expected_batch=d.expected_batch, n_private=run.n, n_source=run.n_source, private_set=run.cfg.data.private,
        accountant=(None if eps is None else "prv-accountant, upper estimate" if eps.accountant == "prv"
                    else "RDP (PRV failed)"),
        epsilon_rdp_crosscheck=eps.epsilon_rdp if eps else None, accountant_warning=eps.warning if eps else None,
        neighbouring_relation=neighbouring_relation, sampling="Poisson, each example independently with rate q",
        trainable_parameters=n_train, selection_size=share, dp_blocks=d.dp_blocks, dp_lora=d.dp_lora,
        per_sample_clipping=run.task.method, noise_source=run.secret.source, threat_model=THREAT_MODEL,
        tune_holdout=d.tune_holdout, not_covered=list(NOT_COVERED) + held_out(run.cfg))


def held_out(cfg):
    """The not-covered line of the tuning images --tune-holdout keeps out of the private set, if any."""
    k = cfg.dp.tune_holdout
    return [f"the last {k} training images of '{cfg.data.private}', held out for tuning (--tune-holdout): never "
            f"in the private set, and no guarantee for them or for the settings chosen with them"] if k else []


def report_text(report):
    """The report in one paragraph of words."""
    return (f"Privacy: the fine-tuned model is ({report['epsilon']:.3f}, {report['delta']:g})-DP with respect to "
            f"the private set '{report['private_set']}' (N = {report['n_private']}, {report['n_source']}) under "
            f"{report['neighbouring_relation']}, both directions (remove {_fmt(report['epsilon_remove'])}, add "
            f"{_fmt(report['epsilon_add'])}), by {report['accountant']} (RDP cross-check "
            f"{_fmt(report['epsilon_rdp_crosscheck'])}) of {report['steps']} steps of the Poisson-subsampled "
            f"Gaussian mechanism with q={report['q']:.6g}, sigma={report['sigma']:.4f}, clipping C={report['clip']:g}, "
            f"training {report['trainable_parameters']:,} parameters ({100 * report['selection_size']:.1f}% of the "
            f"UNet{_lora(report)}). Randomness: {report['noise_source']}. Threat model: {report['threat_model']} "
            f"Not covered: {'; '.join(report['not_covered'])}.")


def _lora(report):
    rank = report.get("dp_lora")
    return f", LoRA factors of rank {rank}" if rank else ""


def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def write_report(out, report, log):
    """privacy_report.json plus the same in words, printed and stored in the metrics log."""
    atomic_write_json(os.path.join(out, "privacy_report.json"), report)
    text = report_text(report)
    print(text)
    log.write(stage="finetune", event="privacy_report", text=text, report=report)
