"""The configuration and its command line: every flag explains itself in --help, --config re-runs a stored
configuration, bad configuration files are one clear error, and the documented exit statuses are main's."""

import dataclasses
import json
import os
import re

import pytest

import train
from dp import audit
from ldm.checkpoint import atomic_write_json
from ldm.config import (CHOICES, COMPONENTS, Config, FIELD_OWNER, config_from_args, config_to_dict, load_config,
                        make_config)
from ldm.errors import UserError

ALL_FIELDS = [(comp, f) for comp in COMPONENTS for f in dataclasses.fields(Config.__dataclass_fields__[comp].type)]


def flag(name):
    return "--" + name.replace("_", "-")


def help_of(parse_args, capsys, monkeypatch, *argv):
    """The --help text of a script, on one line (argparse wraps it to the terminal)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def stored(tmp_path, cfg, name="config.json"):
    """`cfg` written as train.py writes <out>/config.json."""
    path = str(tmp_path / name)
    atomic_write_json(path, config_to_dict(cfg))
    return path


def test_every_field_has_a_one_line_help():
    assert len(ALL_FIELDS) == len(FIELD_OWNER)
    for _, f in ALL_FIELDS:
        text = f.metadata.get("help", "")
        assert text.strip() and "\n" not in text and len(text) <= 120, f.name


@pytest.mark.parametrize("preset,ae_steps,epochs", [("smoke", "60", "1.0"), ("quick", "2500", "1.0"),
                                                     ("paper-cifar10", "100000", "30.0")])
def test_help_shows_each_flags_meaning_and_the_chosen_presets_value(capsys, monkeypatch, preset, ae_steps, epochs):
    text = help_of(train.parse_args, capsys, monkeypatch, "--preset", preset)
    for comp, f in ALL_FIELDS:
        assert flag(f.name) in text and f.metadata["help"] in text, f.name
    assert f"--ae-steps N optimiser steps of the autoencoder stage ({preset}: {ae_steps})" in text
    assert f"T = round(epochs / q), fixed upfront ({preset}: {epochs})" in text


def test_help_without_preset_shows_the_default_preset_also_when_the_preset_is_bad(capsys, monkeypatch):
    assert "(paper-mnist: 50000)" in help_of(train.parse_args, capsys, monkeypatch)
    assert "(paper-mnist: 50000)" in help_of(train.parse_args, capsys, monkeypatch, "--preset", "nosuch")
    assert "(paper-mnist: 50000)" in help_of(audit.parse_args, capsys, monkeypatch, "--config", "/no/such.json")


def test_help_lists_allowed_values_formats_and_marks_the_dp_flags(capsys, monkeypatch):
    text = help_of(train.parse_args, capsys, monkeypatch, "--preset", "smoke")
    for name, allowed in CHOICES.items():
        assert f"{flag(name)} {{{','.join(allowed)}}}" in text, name
    assert "--grad-method {auto,bookkeeping,vmap}" in text
    assert "--ae-mult A,B,... channel multiplier" in text and "comma-separated integers (smoke: 1,2,2)" in text
    assert "(smoke: unset)" in text and "(smoke: on)" in text  # --noise-seed, --dp-class-embed
    for comp, f in ALL_FIELDS:
        assert (f"[DP stage] {f.metadata['help']}" in text) == (comp == "dp"), f.name
    assert "dp: DP fine-tuning (stage 3, private set). Read only by the private stage" in text


def test_the_allowed_values_table_is_the_one_validation_uses():
    for name, allowed in CHOICES.items():
        for value in allowed:
            if value != "cuda":
                make_config("smoke", {name: value})
        with pytest.raises(UserError, match=re.escape(f"{flag(name)} must be one of {', '.join(allowed)},")):
            make_config("smoke", {name: "nosuch"})


def test_epilogs_list_the_exit_statuses(capsys, monkeypatch):
    text = help_of(train.parse_args, capsys, monkeypatch)
    assert "exit status: 0 every stage asked for finished 2 bad input" in text
    assert " 3 distributed run (torchrun)" in text and " 130 interrupted" in text
    text = help_of(audit.parse_args, capsys, monkeypatch)
    assert "exit status: 0 consistent" in text and " 1 inconsistent" in text and " 2 bad input" in text


def raising(exc):
    def run(argv=None):
        raise exc
    return run


def test_train_main_exits_with_the_documented_statuses(monkeypatch, capsys):
    codes = {line.split()[0] for line in train.EXIT_STATUS.splitlines()[1:] if line.split()[0].isdigit()}
    assert codes == {"0", "2", "3", "130"}
    monkeypatch.setattr(train, "run", lambda argv=None: None)
    assert train.main([]) == 0
    monkeypatch.setattr(train, "run", raising(UserError("bad")))
    assert train.main([]) == 2
    monkeypatch.setattr(train, "run", raising(KeyboardInterrupt()))
    assert train.main([]) == 130
    monkeypatch.setattr(train, "run", raising(RuntimeError("peer gone")))
    with pytest.raises(RuntimeError):  # a single process: a bug, with its traceback
        train.main([])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert train.main([]) == 3
    capsys.readouterr()


def test_audit_main_exits_with_the_documented_statuses(monkeypatch, capsys):
    codes = {line.split()[0] for line in audit.EXIT_STATUS.splitlines()[1:] if line.split()[0].isdigit()}
    assert codes == {"0", "1", "2"}
    for verdict, code in (("consistent", 0), ("inconsistent", 1)):
        monkeypatch.setattr(audit, "run", lambda argv=None, v=verdict: {"verdict": v})
        assert audit.main([]) == code
    monkeypatch.setattr(audit, "run", raising(UserError("bad")))
    assert audit.main([]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("parse_args", [train.parse_args, audit.parse_args], ids=["train", "audit"])
def test_config_file_round_trips_and_flags_override_it(tmp_path, parse_args):
    cfg = make_config("smoke", {"fake_n": 64, "unet_heads": 4, "ae_mult": (1, 2), "noise_seed": 5,
                                "dp_class_embed": False, "sampler": "dpm++2m", "epsilon": 3.5})
    path = stored(tmp_path, cfg)
    assert config_from_args(parse_args(["--config", path])) == cfg
    again = config_from_args(parse_args(["--config", path, "--ae-steps", "7", "--no-dp-class-embed"]))
    assert again == dataclasses.replace(cfg, ae=dataclasses.replace(cfg.ae, ae_steps=7))
    assert again.preset == "smoke"


def test_help_with_config_shows_the_stored_values(tmp_path, capsys, monkeypatch):
    path = stored(tmp_path, make_config("smoke", {"fake_n": 64}))
    assert "number of images of each generated `fake` set (tests) (--config: 64)" in \
        help_of(train.parse_args, capsys, monkeypatch, "--config", path)


def test_preset_and_config_together_is_an_error_naming_both(tmp_path, capsys):
    path = stored(tmp_path, make_config("smoke"))
    assert train.main(["--preset", "quick", "--config", path, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--preset quick" in err[0] and f"--config {path}" in err[0], err
    assert not os.path.exists(tmp_path / "never")


def write(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return str(path)


def edited(tmp_path, edit):
    d = config_to_dict(make_config("smoke"))
    edit(d)
    return write(tmp_path, json.dumps(d))


@pytest.mark.parametrize("make_file,needle", [
    (lambda tmp: str(tmp / "missing.json"), "cannot be read"),
    (lambda tmp: str(tmp), "cannot be read"),  # a folder
    (lambda tmp: write(tmp, "{not json"), "not a JSON configuration"),
    (lambda tmp: write(tmp, "[1, 2]"), "malformed"),
    (lambda tmp: edited(tmp, lambda d: d["ae"].pop("ae_steps")), "does not match this version (fields ae_steps)"),
    (lambda tmp: edited(tmp, lambda d: d["dp"].update(gone=1)), "does not match this version (fields gone)"),
    (lambda tmp: edited(tmp, lambda d: d.pop("unet")), "incomplete or malformed"),
    (lambda tmp: edited(tmp, lambda d: d["ae"].update(ae_steps="60")), "field ae_steps holds '60'"),
    (lambda tmp: edited(tmp, lambda d: d["dp"].update(expected_batch=16.5)), "field expected_batch holds 16.5"),
    (lambda tmp: edited(tmp, lambda d: d["dp"].update(dp_class_embed=1)), "field dp_class_embed holds 1"),
    (lambda tmp: edited(tmp, lambda d: d["ae"].update(ae_steps=0)), "--ae-steps must be a positive number"),
])
def test_bad_config_file_is_a_user_error_naming_it(tmp_path, capsys, make_file, needle):
    path = make_file(tmp_path)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert f"--config {path}" in str(e.value) and needle in str(e.value), str(e.value)
    assert train.main(["--config", path, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and path in err[0], err


def test_config_file_accepts_integers_for_floats_and_older_files_without_later_fields(tmp_path):
    path = edited(tmp_path, lambda d: (d["dp"].update(epochs=2), d["diffusion"].pop("sampler")))
    cfg = load_config(path)
    assert cfg.dp.epochs == 2 and cfg.diffusion.sampler == "ddim"


def test_a_bad_override_of_a_config_file_names_the_flag(tmp_path):
    path = stored(tmp_path, make_config("smoke"))
    with pytest.raises(UserError, match="^--ae-steps must be a positive number"):
        load_config(path, {"ae_steps": 0})


def test_config_json_written_by_train_runs_again(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--preset", "smoke", "--fake-n", "64", "--ae-steps", "2", "--ckpt-every", "2",
                       "--stage", "autoencoder", "--out", out, "--cache-dir", str(tmp_path / "cache")]) == 0
    path = os.path.join(out, "config.json")
    cfg = config_from_args(train.parse_args(["--config", path]))
    assert cfg == make_config("smoke", {"fake_n": 64, "ae_steps": 2, "ckpt_every": 2,
                                        "cache_dir": str(tmp_path / "cache")})
    assert train.main(["--config", path, "--stage", "autoencoder", "--out", out, "--resume"]) == 0  # finished
    capsys.readouterr()


def test_laptop_is_quick_with_its_tuned_dp_settings_and_trains_quicks_public_stages_on():
    from ldm.run_folder import EXTENDABLE, STAGE_COMPONENTS, check_compatible
    quick, laptop = config_to_dict(make_config("quick")), config_to_dict(make_config("laptop"))
    differ = {(c, k) for c in COMPONENTS for k in quick[c] if quick[c][k] != laptop[c][k]}
    assert differ == {("pretrain", "pretrain_steps"), ("dp", "epochs"), ("dp", "tune_holdout"), ("dp", "lr"),
                      ("dp", "clip")}
    assert laptop["dp"]["epochs"] > quick["dp"]["epochs"] and laptop["dp"]["tune_holdout"] == 5000
    assert (laptop["dp"]["lr"], laptop["dp"]["clip"]) == (1e-3, 1e-1)  # results/tune_synthsvhn_p6k.md's best
    # quick's autoencoder.pt loads in a laptop run; its pretrain.pt differs only in the one step count that
    # --resume may raise, and laptop raises it
    check_compatible(make_config("quick"), make_config("laptop"), "autoencoder", "runs/quick/autoencoder.pt")
    assert EXTENDABLE["pretrain"] == ("pretrain", "pretrain_steps") and "dp" not in STAGE_COMPONENTS["pretrain"]
    assert laptop["pretrain"]["pretrain_steps"] > quick["pretrain"]["pretrain_steps"]
    check_compatible(make_config("quick"), make_config("laptop"), "pretrain", "runs/quick/pretrain.pt",
                     {"pretrain_steps"})


def test_sampling_settings_never_make_a_checkpoint_incompatible():
    """The grids' sampler, steps and eta never touch training: a run may sample differently from its checkpoints."""
    from ldm.run_folder import check_compatible
    sampling = make_config("quick", {"sampler": "ddim", "sample_steps": 50, "eta": 0.5})
    for stage in ("pretrain", "finetune"):
        check_compatible(make_config("quick"), sampling, stage, "pretrain.pt")
    with pytest.raises(UserError, match="--timesteps 1000 \\(stored\\) vs 500"):
        check_compatible(make_config("quick"), make_config("quick", {"timesteps": 500}), "pretrain", "pretrain.pt")
