"""Quiet and quick by default: the real emitters' chatter is gone (invsr_pl/utils/quiet.py) and comes back
verbose; the entry points import no heavy library before they need one (README "Speed")."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import summarize

from invsr_pl.utils import quiet

# where Lightning's and pyiqa's records end up (each logger's records also reach these parents)
_PARENTS = ("lightning.pytorch", "lightning.fabric", "lightning_utilities", "pyiqa")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def _captured() -> Iterator[_Lines]:
    """Every record logged below :data:`_PARENTS` at INFO or above while the block runs."""
    handler = _Lines()
    loggers = [logging.getLogger(name) for name in _PARENTS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture
def quiet_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    quiet.quiet_dependencies()
    yield
    quiet.quiet_dependencies()  # as the package import leaves it


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.frozen = torch.nn.Linear(1, 1).requires_grad_(False)


def _trainer_and_summary(tmp_path: Path) -> None:
    """What ``train.py`` emits at start: the Trainer (Lightning's tips) and the model summary table."""
    L.Trainer(
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _Tiny()
    info = summarize(model, max_depth=1)
    ModelSummary.summarize(
        info._get_summary_data(),
        info.total_parameters,
        info.trainable_parameters,
        info.model_size,
        info.total_training_modes,
        total_flops=info.total_flops,
    )


def test_lightning_tips_and_zero_flops_are_dropped(quiet_mode, tmp_path: Path) -> None:
    with _captured() as out:
        _trainer_and_summary(tmp_path)
    assert "💡 Tip" not in out.text and "litlogger" not in out.text
    assert "FLOPs" not in out.text and "Total Flops" not in out.text
    # the rest of the summary stays, column-aligned: every table row has the same cells
    rows = [line for line in out.text.splitlines() if " | " in line]
    assert rows[0].split(" | ")[1].strip() == "Name" and "Mode" in rows[0]
    assert {len(r.split(" | ")) for r in rows} == {5} and any(" net " in r for r in rows), out.text
    assert "Trainable params" in out.text and "Modules in eval mode" in out.text


def test_verbose_brings_everything_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    try:
        assert quiet.quiet_dependencies() is True and not quiet.is_quiet()
        with _captured() as out:
            _trainer_and_summary(tmp_path)
    finally:
        monkeypatch.delenv(quiet.VERBOSE_ENV)
        quiet.quiet_dependencies()
    assert "💡 Tip" in out.text and "FLOPs" in out.text and "Total Flops" in out.text
    assert quiet.quiet_dependencies(verbose=True) is True and not quiet.is_quiet()  # the --verbose flag
    assert quiet.quiet_dependencies() is False and quiet.is_quiet()


def test_library_version_warnings_are_ignored(quiet_mode) -> None:
    from hydra.utils import instantiate

    def warned() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            instantiate({"_target_": "collections.OrderedDict"})  # Hydra 1.4: "... no _execution_whitelist_"
        return [str(w.message) for w in caught if "_execution_whitelist_" in str(w.message)]

    assert warned() == []
    quiet.quiet_dependencies(verbose=True)
    try:
        loud = warned()
    finally:
        quiet.quiet_dependencies()
    if not loud:
        pytest.skip("this Hydra does not warn about execution whitelists")
    assert warned() == []


def test_lightning_prints_once_under_a_root_console(quiet_mode) -> None:
    """Under Hydra the root logger prints Lightning's records; Lightning's own console must not print them
    again (train.py and evaluate.py call quiet_dependencies once Lightning is imported)."""
    import lightning

    root, package = logging.getLogger(), logging.getLogger("lightning")
    console = logging.StreamHandler(sys.stderr)
    had = lightning._console in package.handlers
    package.addHandler(lightning._console)  # as `import lightning` leaves it (no-op when already there)
    root.addHandler(console)
    try:
        quiet.quiet_dependencies()
        assert lightning._console not in package.handlers
    finally:
        root.removeHandler(console)
        if had:
            package.addHandler(lightning._console)


@pytest.mark.parametrize(("value", "verbose"), [("", False), ("0", False), ("off", False), ("1", True)])
def test_env_values(monkeypatch: pytest.MonkeyPatch, value: str, verbose: bool) -> None:
    monkeypatch.setenv(quiet.VERBOSE_ENV, value)
    assert quiet.env_verbose() is verbose


@pytest.mark.skipif(importlib.util.find_spec("pyiqa") is None, reason="pyiqa not installed")
def test_pyiqa_network_lines_are_dropped(
    quiet_mode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import pyiqa
    from pyiqa.archs.arch_util import load_pretrained_network

    with _captured() as out:
        pyiqa.create_metric("psnr", device="cpu")
    assert "is created" not in out.text
    quiet.quiet_dependencies(verbose=True)
    with _captured() as out:
        pyiqa.create_metric("psnr", device="cpu")
    assert "Network [" in out.text  # the line the quiet mode dropped
    quiet.quiet_dependencies()

    net = torch.nn.Linear(1, 1)
    weights = tmp_path / "net.pth"
    torch.save(net.state_dict(), weights)
    with quiet.library_prints():
        load_pretrained_network(net, str(weights))
    assert "Loading pretrained model" not in capsys.readouterr().out
    quiet.quiet_dependencies(verbose=True)
    with quiet.library_prints():
        load_pretrained_network(net, str(weights))
    assert "Loading pretrained model" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bitsandbytes_kernel_warning_is_dropped_at_import() -> None:
    """A fresh process: the warning is logged while bitsandbytes is imported (by diffusers, by pyiqa)."""

    def stderr(verbose: str) -> str:
        env = {**os.environ, quiet.VERBOSE_ENV: verbose}
        code = "import invsr_pl, bitsandbytes"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr

    loud = stderr("1")
    if "kernels-community" not in loud:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not warn here")
    assert "kernels-community" not in stderr("")


@pytest.mark.slow
def test_smoke_training_run_is_quiet(tmp_path: Path) -> None:
    """``train.py experiment=smoke`` as a user types it (with Lightning's default model summary back on):
    none of the dropped lines, one copy of each Lightning line, and the lines that matter still there."""
    root = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable, "train.py", "experiment=smoke", "trainer.enable_model_summary=true",
        f"paths.log_dir={tmp_path}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    for dropped in ("💡 Tip", "Total Flops", "| FLOPs", "_execution_whitelist_", "kernels-community"):
        assert dropped not in out, dropped
    assert sum("GPU available:" in line for line in out.splitlines()) == 1, out
    assert "Trainable params" in out and "Final validation:" in out and "Checkpoint:" in out


def test_entry_points_import_no_heavy_library() -> None:
    """`--help` and `--cfg job` must not wait on torch & co.: importing the package, the CLI modules and
    train.py pulls in none of them (a fresh process; evaluate.py still imports Lightning at the top)."""
    root = Path(__file__).resolve().parents[2]
    heavy = ("torch", "diffusers", "lightning", "transformers", "pyiqa", "gradio")
    code = (
        "import sys; sys.path.insert(0, '.'); import invsr_pl, invsr_pl.cli.sr, invsr_pl.cli.demo, train; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
