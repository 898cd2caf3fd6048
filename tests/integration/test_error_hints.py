"""Every hint in an error message names something that exists where the message is shown (issue 26).

Walks the start-up errors of train.py and evaluate.py, the backbone's missing-weights error and evaluate's
random-weights warning: Hydra overrides they suggest (``key=value``) name keys of the composed config or
options of a config group, commands in backticks are installed (``hf``, ``python train.py``), and ``--flags``
after a command exist in that command's ``--help``. invsr-sr's own texts are walked by its tests.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from invsr_pl.launch import checkpoint_provenance as CP

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}
_OVERRIDE = re.compile(r"(?<![\w./<>-])([+~]?[A-Za-z_]\w*(?:[./]\w+)*)=([^\s`'\",;:)]+)")
_KEY = re.compile(r"^[a-z_]\w*(?:\.\w+)*$")
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate"}
_MISSING = object()


def _compose(config: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=["paths.output_dir=/nonexistent", *overrides])


def _is_group(key: str) -> bool:
    return "/" in key or key in GROUPS


def _check_overrides(text: str, config: str, context: list[str], bare: tuple[str, ...] = ()) -> list[str]:
    """Problems with the ``key=value`` hints of ``text`` against ``config`` composed with ``context``."""
    found = [(k.lstrip("+~"), v.rstrip(".")) for k, v in _OVERRIDE.findall(text) if not k.isupper()]
    problems, groups = [], []
    for key, value in found:
        if _is_group(key):
            absent = [o for o in value.strip("[]").split(",") if not (CONF / key / f"{o}.yaml").is_file()]
            problems += [f"{key}={option}: no conf/{key}/{option}.yaml" for option in absent]
            if not absent and not key.startswith("hydra/"):
                groups.append(f"{key}={value}")
    # a key must exist in the config the message is about, or in it once the message's group choices apply
    # (e.g. "your own folders: data=paired data.val_dataset.lq_dir=LQ")
    configs = [_compose(config, list(context))] + ([_compose(config, [*context, *groups])] if groups else [])
    keys = [k for k, _ in found if not _is_group(k)] + list(bare)
    for key in keys:
        if all(OmegaConf.select(cfg, key, default=_MISSING) is _MISSING for cfg in configs):
            problems.append(f"{key}: not a key of the composed {config} config")
    return problems


def _help(command: list[str]) -> str:
    return subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout


def _check_commands(text: str) -> list[str]:
    """Problems with the commands in backticks: installed, scripts present, flags in their --help, and a
    script's overrides in its own config."""
    problems = []
    for span in re.findall(r"`([^`]+)`", text):
        words = span.split()
        if len(words) == 1 or "=" in words[0] or words[0].startswith("-"):
            continue  # a key, an override or a flag, not a command
        if words[0] == "python":
            if not (ROOT / words[1]).is_file():
                problems.append(f"{span}: no {words[1]}")
            elif words[1] in SCRIPTS:
                problems += _check_overrides(" ".join(words[2:]), SCRIPTS[words[1]], [])
            continue
        if shutil.which(words[0]) is None:
            problems.append(f"{span}: {words[0]} is not installed")
            continue
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        command = words[:2] if len(words) > 1 and not words[1].startswith("-") else words[:1]
        usage = _help(command) if flags else ""
        problems += [f"{span}: {' '.join(command)} has no {f}" for f in flags if f not in usage]
    return problems


def _walk(text: str, config: str, context: list[str] = ()) -> None:
    spans = re.findall(r"`([^`]+)`", text)
    commands = [s for s in spans if len(s.split()) > 1 and "=" not in s.split()[0]]
    bare = tuple(s for s in spans if _KEY.match(s))  # `scale`: a key named on its own
    rest = text
    for span in commands:  # a command's overrides belong to that command's config
        rest = rest.replace(f"`{span}`", "")
    problems = _check_overrides(rest, config, list(context), bare) + _check_commands(text)
    assert not problems, f"{text}\n-> {problems}"


# ---------------------------------------------------------------------------------------------- train.py
@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the paper recipe without its data: the data folders and the keys to point elsewhere
        ["experiment=smoke", "model.noise_predictor.scale=2"],  # scales disagree
        ["experiment=smoke", "data.train_dataset.gt_size=60"],  # GT crop not a multiple of 8
        ["experiment=smoke", "ckpt_path=/nonexistent/last.ckpt"],
    ],
)
def test_train_startup_errors_name_existing_keys(tmp_path: Path, overrides: list[str]) -> None:
    from invsr_pl.launch.startup_checks import SetupError, check_config

    cfg = _compose("train", [f"paths.data_dir={tmp_path}", f"paths.log_dir={tmp_path}", *overrides])
    with pytest.raises(SetupError) as info:
        check_config(cfg)
    _walk(str(info.value), "train", overrides)


def test_local_multirun_error_names_the_slurm_launcher() -> None:
    from invsr_pl.launch.startup_checks import SetupError, check_local_multirun

    with pytest.raises(SetupError) as info:
        check_local_multirun({"num_nodes": 2}, {"_target_": "hydra._internal.core_plugins.basic_launcher"})
    _walk(str(info.value), "train")


def test_backbone_missing_weights_error() -> None:
    from invsr_pl.models.sd_turbo import _not_found

    message = str(_not_found("stabilityai/sd-turbo", "the hub is offline (HF_HUB_OFFLINE=1)"))
    assert "`hf download stabilityai/sd-turbo --local-dir" in message
    _walk(message, "train")  # the paper recipe's backbone: model.backbone.model exists there
    _walk(message, "evaluate", ["model/backbone=sd_turbo"])


# ---------------------------------------------------------------------------------------------- evaluate.py
def _evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_hints", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluate_cfg(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", "trainer=cpu"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*base, *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_evaluate_errors_and_warning_name_existing_things(tmp_path: Path) -> None:
    from invsr_pl.utils.provenance import PROVENANCE_KEY, training_provenance

    ev = _evaluate_module()
    messages = []
    for overrides in (["benchmark=[samples,realsr]"], ["benchmark=[samples,folder]"]):
        with pytest.raises(ev.SetupError) as info:  # a missing folder; folder.lq_dir not set
            ev.evaluate(_evaluate_cfg(tmp_path, overrides))
        messages.append((str(info.value), overrides))
    assert "folder.lq_dir" in messages[1][0]

    ckpt = tmp_path / "last.ckpt"
    recorded = training_provenance(_compose("train", ["experiment=quickstart"]))
    torch.save({"state_dict": {}, PROVENANCE_KEY: recorded}, ckpt)
    with pytest.raises(ev.SetupError) as info:
        CP.use_checkpoint_provenance(_evaluate_cfg(tmp_path, [f"ckpt_path={ckpt}", "model/backbone=tiny"]))
    messages.append((str(info.value), []))

    warning = CP.random_weights_warning(_evaluate_cfg(tmp_path, []))
    assert warning is not None and "`python train.py experiment=quickstart`" in warning
    messages.append((warning, []))
    for text, context in messages:
        assert "\n" not in text
        _walk(text, "evaluate", context)
