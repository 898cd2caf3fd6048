"""The run's Hydra config as tracker hyper-parameters, and the names trackers group runs by
(docs/tracking.md).

* :func:`flatten_config`: the resolved config as one flat mapping, ``{"model.optimizer_g.lr": 0.002, ...}``
  (the keys are Hydra override paths), without secrets and with the home folder written as ``~``.
* Run metadata for ``conf/logger/mlflow.yaml`` and ``conf/logger/wandb.yaml``, as OmegaConf resolvers that
  :func:`register_resolvers` installs (importing this module does it; ``invsr_pl.utils.logging`` imports it,
  so every entry point that builds loggers has them):

  ``${invsr.group:${task_name}}``
      ``task_name`` for a single run; ``"<task_name> sweep <multirun folder name>"`` for every job of one
      multirun, so a sweep is one MLflow experiment / one W&B group.
  ``${invsr.run_name:}``
      the run folder's name (its start time) for a single run; ``"job <n>: key=value,..."`` (the swept
      overrides) for a multirun job.
  ``${invsr.tags:${tags},dict}`` / ``${invsr.tags:${tags},list}``
      the config's ``tags`` plus the overrides a sweep varies: MLflow's ``{tag: value}`` or W&B's
      ``["tag", "key=value", ...]``.
  ``${invsr.wandb_offline:}``
      ``True`` unless W&B has an API key (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``) or
      ``WANDB_MODE`` is set (then wandb follows it), so a fresh machine logs offline instead of failing.

Outside a Hydra run (``hydra.compose`` in tests, notebooks) the resolvers fall back to the single-run values.
"""

from __future__ import annotations

import inspect
import netrc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

# key names whose values never go to a tracker (the whole last key component, case-insensitive): api_key,
# hf_token, WANDB_API_KEY, db_password, secret, credentials, ... but not tokenizer or num_tokens
SECRET_KEY = re.compile(
    r"(.*[_-])?(api[_-]?key|access[_-]?key|secret([_-]?key)?|private[_-]?key|token|passw(or)?d|credentials?)",
    re.I,
)
# scheme://user:password@host: the password is dropped
URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]+):[^@/\s]+@", re.I)
WANDB_TAG_LIMIT = 64  # characters (W&B rejects longer tags)


def _scrub(value: Any, home: str | None) -> Any:
    """A string with the home folder written as ``~`` and URI passwords removed; other values as they are."""
    if isinstance(value, str):
        value = URI_PASSWORD.sub(r"\g<head>@", value)
        if home:
            value = re.sub(re.escape(home) + r"(?=/|$)", "~", value)
        return value
    if isinstance(value, list):
        return [_scrub(v, home) for v in value]
    return value


def _home() -> str | None:
    home = str(Path.home()).rstrip("/")
    return home or None  # a home of "/" would turn every absolute path into "~"


def flatten_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"a.b.c": value}``: what a tracker shows as the run's parameters.

    Mappings nest with ``.``; lists of mappings are indexed (``data.train_dataset.sources.0.root``, as in a
    Hydra override); lists of plain values stay one value (``model.val_num_steps: [1, 3]``). Keys that look
    like secrets (``api_key``, ``token``, ``password``, ...) are left out, passwords in URIs are removed and
    the home folder is written as ``~``. An empty mapping is kept as ``{}`` so that its key still shows.
    """
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg
    home, flat = _home(), {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            if not node and key:
                flat[key] = "{}"
            for name, child in node.items():
                if not SECRET_KEY.fullmatch(str(name)):
                    walk(child, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list) and any(isinstance(v, Mapping | list) for v in node):
            for i, child in enumerate(node):
                walk(child, f"{key}.{i}")
        else:
            flat[key] = _scrub(node, home)

    walk(container or {}, "")
    return flat


# ------------------------------------------------------------------------------------------ run metadata
def _hydra() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hc: DictConfig | None) -> bool:
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _parse(overrides: list[str]) -> list[Any]:
    # deferred: the override grammar (antlr) is only needed inside a multirun job
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides=list(overrides))


def swept_overrides() -> dict[str, str]:
    """``{key: value}`` of this multirun job for the keys its sweep varies; ``{}`` outside a multirun.

    The swept keys are the sweep overrides of the command line (``model.gan_weight=0,0.1``, as Hydra saved
    them in ``<sweep dir>/multirun.yaml``) and the keys of ``hydra.sweeper.params`` (``hparams_search``
    presets, Optuna). When neither can be read, every override of the job counts.
    """
    hc = _hydra()
    if not _is_multirun(hc):
        return {}
    job = {o.key_or_group: o.get_value_element_as_str() for o in _parse(hc.overrides.task)}
    swept = set((OmegaConf.select(hc, "sweeper.params") or {}).keys())
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        sweep_cfg = OmegaConf.load(saved)
        task = OmegaConf.select(sweep_cfg, "hydra.overrides.task") or []
        swept |= {o.key_or_group for o in _parse(task) if o.is_sweep_override()}
    if not swept:
        return job
    return {k: v for k, v in job.items() if k in swept}


def run_group(task_name: str) -> str:
    """``task_name``, or ``"<task_name> sweep <multirun folder>"`` for a job of a multirun."""
    hc = _hydra()
    if not _is_multirun(hc):
        return str(task_name)
    return f"{task_name} sweep {Path(hc.sweep.dir).name}"


def run_name() -> str | None:
    """The run folder's name, ``"job <n>: key=value,..."`` in a multirun, None outside a Hydra run."""
    hc = _hydra()
    if hc is None:
        return None
    if not _is_multirun(hc):
        return Path(hc.runtime.output_dir).name
    swept = ",".join(f"{k}={v}" for k, v in swept_overrides().items())
    return f"job {hc.job.num}: {swept}" if swept else f"job {hc.job.num}"


def tracker_tags(tags: Any, style: str = "dict") -> dict[str, str] | list[str]:
    """The config's ``tags`` and this job's swept overrides in a tracker's tag format.

    ``style="dict"`` (MLflow): ``{"tags": "quickstart,tiny", "sweep": "<group>", "model.gan_weight": "0"}``;
    ``style="list"`` (W&B): ``["quickstart", "tiny", "model.gan_weight=0"]`` (each at most 64 characters).
    """
    tags = [str(t) for t in (tags or [])]
    swept = swept_overrides()
    if style == "list":
        return [t[:WANDB_TAG_LIMIT] for t in [*tags, *(f"{k}={v}" for k, v in swept.items())]]
    if style != "dict":
        raise ValueError(f"invsr.tags style must be 'dict' or 'list', got {style!r}")
    out = {"tags": ",".join(tags)} if tags else {}
    hc = _hydra()
    if _is_multirun(hc):
        out["sweep_dir"] = _scrub(str(hc.sweep.dir), _home())
        out["job"] = str(hc.job.num)
    return {**out, **swept}


def wandb_has_key() -> bool:
    """Whether W&B can authenticate: ``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline() -> bool:
    """Offline unless W&B has a key or ``WANDB_MODE`` says what to do (wandb reads it itself)."""
    return not os.environ.get("WANDB_MODE") and not wandb_has_key()


def register_resolvers() -> None:
    """Install the ``invsr.*`` resolvers above (idempotent)."""
    register = getattr(OmegaConf, "register_resolver", None)
    if register is None or "use_cache" not in inspect.signature(register).parameters:
        register = (
            OmegaConf.register_new_resolver
        )  # OmegaConf < 2.4 (2.4 deprecates it for register_resolver)
    resolvers = {  # plain lambdas: nothing for OmegaConf 2.4's annotation checks to trip on
        "invsr.group": lambda task_name: run_group(task_name),
        "invsr.run_name": lambda: run_name(),
        "invsr.tags": lambda tags, style="dict": tracker_tags(tags, style),
        "invsr.wandb_offline": lambda: wandb_offline(),
    }
    for name, fn in resolvers.items():
        register(name, fn, replace=True)


register_resolvers()
