"""Train InvSR with Lightning + Hydra.

    python train.py trainer.devices=8                      # the paper recipe (the default), global batch 64
    python train.py experiment=quickstart                  # tiny trained backbone, sample photos, CPU, ~30 s
    python train.py ckpt_path=last                         # continue the latest run of that task
    python train.py experiment=finetune_x4 data.train_dataset.sources.0.root=/data/photos
    python train.py -m experiment=smoke model.gan_weight=0,0.1   # a sweep, one run folder per job
    python train.py -m model.lpips_weight=1,2 trainer.devices=8  # 8-GPU DDP jobs, one after another

``train(cfg)`` is the testable task; ``main`` is the Hydra shell that returns ``cfg.optimized_metric``. In a
local multirun, a job whose ranks Lightning starts by re-executing the command (``ddp`` over several devices)
runs as its own single-run process (invsr_pl/launch/job_process.py, docs/lightning.md#hydra-ddp-and-sweeps).
The run ends with its folder, checkpoint, validation images and the ``tensorboard --logdir`` command.

Exit codes (single runs; a multirun leaves failed jobs to Hydra's sweep, and exits 1 if any failed):
    0    done
    1    an unexpected error (full traceback)
    2    setup error: a command line Hydra cannot compose (unknown key, bad override; Hydra's message),
         config values that disagree, a missing/unreadable/unsafe ``ckpt_path`` or one that lacks trainable
         weights, bad constructor arguments, ``trainer.num_nodes > 1`` in a local multirun; one line,
         printed last
    3    training stopped by the non-finite guard (``model.max_consecutive_nonfinite``); one line
    143  SIGTERM (preemption, ``kill``, ``scancel``): ``checkpoints/last.ckpt`` was saved first, so
         ``ckpt_path=last`` continues the run. Under SLURM, Lightning's requeue (requeue signal) stays on.
Set ``HYDRA_FULL_ERROR=1`` for the full traceback of the one-line errors.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from invsr_pl.launch import exit_codes
from invsr_pl.launch.exit_codes import EXIT_ERROR, EXIT_NONFINITE, EXIT_SETUP, EXIT_SIGTERM

if TYPE_CHECKING:
    import lightning.pytorch as L

# torch, Lightning, diffusers and the system are imported once a config is composed (inside the functions
# below), so `--help` and `--cfg job` print in about a second (README.md#speed).

# Both are by design: the frozen SD-Turbo/LPIPS stay in eval mode, and manual-optimisation checkpoints hold
# the post-step weights together with the post-step counters (what exact resume needs).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as plain floats (tensors from callback_metrics included)."""
    import torch

    return {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}


def _log_outputs(trainer: L.Trainer) -> None:
    """The last lines of a run (rank zero): its folder, checkpoint, validation images, TensorBoard command."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from invsr_pl.utils.logging import get_logger, tracker_hints

    log = get_logger(__name__)
    log.info("Run folder: %s", trainer.default_root_dir)
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    if last and Path(last).is_file():
        log.info("Checkpoint: %s", last)
    else:  # fast_dev_run (debug=fdr) and runs without a checkpoint callback save nothing
        why = " (fast_dev_run saves none)" if trainer.fast_dev_run else ""
        log.info("Checkpoint: none written%s", why)
    pngs = [getattr(cb, "last_png", None) for cb in trainer.callbacks]
    folders = sorted({str(Path(p).parent) for p in pngs if p is not None and Path(p).is_file()})
    for folder in folders:
        log.info("Validation images: %s", folder)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and Path(logger.log_dir).is_dir():
            log.info("TensorBoard: tensorboard --logdir %s", logger.log_dir)
    for line in tracker_hints(trainer.loggers):  # MLflow / W&B: where the run is (docs/tracking.md)
        log.info("%s", line)


def _build(key: str, node: DictConfig) -> Any:
    """``hydra.utils.instantiate(cfg.<key>)``; a constructor refusing its arguments is a setup error.

    Hydra 1.3 wraps such errors in ``InstantiationException``; Hydra 1.4 passes the constructor's own
    ``ValueError`` / ``TypeError`` through, which would otherwise read as an unexpected error (exit 1).
    """
    from hydra.errors import InstantiationException

    from invsr_pl.launch.startup_checks import SetupError

    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException:
        raise
    except (ValueError, TypeError) as err:
        raise SetupError(f"{key}: {type(err).__name__}: {err}") from err


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Check the config, build everything from ``cfg``, fit (optionally resuming), optionally test.

    Returns:
        metrics: ``trainer.callback_metrics`` after fit (and test) as floats, e.g. ``val/psnr_1step``.
        objects: ``cfg``, ``datamodule``, ``model``, ``callbacks``, ``loggers``, ``trainer``, ``ckpt_path``.

    Raises:
        SetupError / WeightFileError / CheckpointMismatchError: before anything is built (the checkpoint's
            keys are checked once the model exists, before training).
        SIGTERMException: the run got SIGTERM; ``last.ckpt`` was saved first.
    """
    import lightning.pytorch as L
    import torch

    from invsr_pl.launch.instantiate import instantiate_callbacks, instantiate_loggers, instantiate_trainer
    from invsr_pl.launch.startup_checks import check_checkpoint_fits, check_config
    from invsr_pl.utils.logging import get_logger, log_hyperparameters
    from invsr_pl.utils.provenance import training_provenance
    from invsr_pl.utils.quiet import quiet_dependencies

    quiet_dependencies()  # Lightning is imported now: one copy of its lines under Hydra (README "Speed")
    log = get_logger(__name__)  # rank zero only
    ckpt_path = check_config(cfg)  # before instantiating anything: fail in seconds, with one line
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))  # tiny CPU models: extra threads only contend
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 as in the official trainer (docs/training.md)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    # _convert_="all": plain lists/dicts reach the constructors, so saved hyper-parameters hold no OmegaConf
    # types and checkpoints load with torch.load(weights_only=True) (Lightning's default when resuming)
    datamodule: L.LightningDataModule = _build("data", cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = _build("model", cfg.model)
    model.provenance = training_provenance(cfg)  # recorded in every checkpoint (utils/provenance.py)
    check_checkpoint_fits(ckpt_path, model)  # Lightning's non-strict load would keep random weights
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, loggers=loggers)
    objects: dict[str, Any] = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
        "ckpt_path": ckpt_path,
    }

    if loggers:
        log_hyperparameters(cfg, model, trainer)  # the composed config + parameter counts

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
        final = {k: v for k, v in sorted(metrics.items()) if k.startswith("val/")}
        if final:  # the numbers a run is judged by, next to their baselines (e.g. val/psnr_bicubic)
            log.info("Final validation: %s", ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    if cfg.get("test", False):
        # after fit: the weights in memory (EMA swapped in by its callback); test-only: the given checkpoint
        trainer.test(
            model=model, datamodule=datamodule, ckpt_path=None if cfg.get("train", True) else ckpt_path
        )
        metrics.update(_floats(trainer.callback_metrics))
    _log_outputs(trainer)
    return metrics, objects


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _exit(code: int, err: BaseException, result_file: str | None = None) -> None:
    """One readable line, printed last, then ``sys.exit(code)``; a traceback only with HYDRA_FULL_ERROR=1."""
    from invsr_pl.launch.job_process import write_job_result

    message = " ".join(str(err).split()) or type(err).__name__
    if result_file:
        write_job_result(result_file, error=message, exit_code=code)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _job_process_world(cfg: DictConfig) -> int:
    """For a job of a multirun: the number of processes when it must run as its own single-run process (a
    re-executing DDP trainer on this machine, see invsr_pl/launch/job_process.py); 0 when it runs here."""
    from invsr_pl.launch.job_process import is_slurm_launcher, starts_ranks_by_reexecution
    from invsr_pl.launch.startup_checks import SetupError, check_local_multirun
    from invsr_pl.utils.batching import resolve_world_size

    launcher = HydraConfig.get().launcher
    try:  # no job of this sweep could run: stop it at the first one
        check_local_multirun(cfg.trainer, launcher)
    except SetupError as err:
        _exit(EXIT_SETUP, err)
    if is_slurm_launcher(launcher) or "LOCAL_RANK" in os.environ:
        return 0  # the cluster (or torchrun) starts every rank itself; Lightning re-executes nothing
    if not starts_ranks_by_reexecution(cfg.trainer):
        return 0
    return resolve_world_size(cfg.trainer.get("devices", 1), 1, cfg.trainer.get("accelerator", "auto"))


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_codes.task
def main(cfg: DictConfig) -> float | None:
    from hydra.errors import InstantiationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from invsr_pl.launch.instantiate import metric_value
    from invsr_pl.launch.job_process import JOB_RESULT_ENV, run_job_process, write_job_result
    from invsr_pl.launch.startup_checks import SetupError
    from invsr_pl.systems.invsr import NonFiniteLossError
    from invsr_pl.utils.checkpoint import CheckpointMismatchError, WeightFileError

    # set by a sweep that started this process for one job (run_job_process); popped, so the ranks that
    # Lightning starts from here never see it and only rank 0 reports
    result_file = os.environ.pop(JOB_RESULT_ENV, None)
    world = _job_process_world(cfg) if _is_multirun() else 0
    if world:
        metrics = run_job_process(Path(__file__), HydraConfig.get(), world)  # SweepJobError: the job failed
        return metric_value(metrics, cfg.get("optimized_metric"))
    setup_errors = (
        SetupError,
        WeightFileError,
        CheckpointMismatchError,
        InstantiationException,
        FileNotFoundError,
    )
    try:
        metrics, _ = train(cfg)
    except SIGTERMException:
        if result_file:
            write_job_result(result_file, error="stopped by SIGTERM", exit_code=EXIT_SIGTERM)
        print(
            f"train.py: stopped by SIGTERM; checkpoints/last.ckpt saved, resume with ckpt_path=last "
            f"(exit {EXIT_SIGTERM})",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_SIGTERM)
    except setup_errors as err:
        if _is_multirun():
            raise
        _exit(EXIT_SETUP, err, result_file)
    except NonFiniteLossError as err:
        if _is_multirun():
            raise
        _exit(EXIT_NONFINITE, err, result_file)
    except Exception as err:  # the full traceback follows (Hydra); the sweep that started us gets one line
        if result_file:
            write_job_result(result_file, error=f"{type(err).__name__}: {err}", exit_code=EXIT_ERROR)
        raise
    finally:  # trackers (docs/tracking.md): each job ends its W&B run (failed when it raised), or the next
        from invsr_pl.utils.logging import finish_trackers  # job of a multirun would log into it

        finish_trackers(failed=sys.exc_info()[0] is not None)
    if result_file:
        write_job_result(result_file, metrics=metrics)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    exit_codes.run(main)
