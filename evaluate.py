"""Evaluate a noise predictor: super-resolve benchmarks, score them under a named protocol, write tables.

    python evaluate.py                                   # tiny backbone, random NP, built-in samples (smoke)
    python evaluate.py model/backbone=sd_turbo model/noise_predictor=default ckpt_path=logs/.../last.ckpt \
        benchmark=[imagenet_test,realsr,realset80] protocol=invsr metrics=all study=steps
    python evaluate.py study=table1 ...                  # the paper's Table-1 timestep sweep + plot
    torchrun --nproc_per_node=4 evaluate.py ...          # images split across GPUs, one gathered table

``ckpt_path``: a Lightning ``.ckpt`` (EMA weights ``checkpoint["ema_noise_predictor"]`` when ``use_ema``,
else the module's ``noise_predictor.*`` keys), a ``save_pretrained`` folder, or an official ``.pth`` /
``.safetensors``; ``null`` = randomly initialised noise predictor (smoke runs only). Multi-GPU: under
torchrun (WORLD_SIZE > 1) each rank takes ``images[rank::world]``; metric states reduce through torchmetrics,
per-image rows are gathered with ``all_gather_object`` and rank 0 writes the outputs (ARCHITECTURE C4 rules
8, 11). Latency is SR time only (device synchronised before and after), never metric time.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from invsr_pl import evaluation as E
from invsr_pl import metrics as M


def load_noise_predictor(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """Build the noise predictor and load ``cfg.ckpt_path``; returns it with a note saying which weights."""
    from invsr_pl.export import load_noise_predictor as load

    if cfg.ckpt_path is None:
        return instantiate(cfg.model.noise_predictor), "random init (no ckpt_path)"
    return load(str(cfg.ckpt_path), bool(cfg.use_ema), default=lambda: instantiate(cfg.model.noise_predictor))


def _dist_setup(device: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, initialised_here); starts a process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, world, dev, started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantise(img: torch.Tensor) -> torch.Tensor:
    # The official scripts score 8-bit PNGs read back from disk (USERS_AND_PEERS §4.1), so SR is rounded.
    return (img.clamp(0, 1) * 255).round() / 255


def run_row(sampler, dataset, indices, row, metrics, device, seed, image_dir, warmup) -> list[dict[str, Any]]:
    """Super-resolve ``dataset[indices]`` with ``row["timesteps"]``, update ``metrics`` (SR and GT as
    (1,3,H,W) float in [0,1]), and return one row per image (name, SR seconds, per-image scores)."""
    from invsr_pl.utils.images import write_image

    rows = []
    if warmup and indices:
        for _ in range(warmup):  # untimed: CUDA context, cuDNN autotune, allocator
            sampler(dataset[indices[0]]["lq"][None].to(device), timesteps=row["timesteps"], generator=seed)
    for index in indices:
        item = dataset[index]
        lq = item["lq"][None].to(device)  # (1,3,h,w) [0,1]
        gen = torch.Generator(device=device).manual_seed(seed + index)  # independent of the sharding
        _sync(device)
        start = time.perf_counter()
        sr = sampler(lq, timesteps=row["timesteps"], generator=gen)  # (1,3,sh,sw) [0,1]
        _sync(device)
        seconds = time.perf_counter() - start  # SR only: metrics below are excluded
        sr = _quantise(sr)
        gt = item.get("gt")
        if gt is not None:
            gt = gt[None].to(device)
            gt_file = getattr(dataset, "gt_files", None) or {}
            E.check_pair(
                f"{item['name']}.png", sr.shape, str(gt_file.get(item["name"], item["name"])), gt.shape
            )
        scores, errors = {}, {}
        for key, metric in metrics.items():
            try:
                metric.update(sr, gt)
                scores[key] = float(metric.last_scores[0])
            except Exception as err:  # e.g. an image too small for NIQE: report it, keep the other metrics
                scores[key], errors[key] = None, f"{type(err).__name__}: {err}"
        if image_dir is not None:
            write_image(Path(image_dir) / f"{item['name']}.png", sr[0].cpu())
        rows.append({"index": index, "name": item["name"], "seconds": seconds, **scores, "errors": errors})
    return rows


def _study_rows(cfg: DictConfig) -> list[dict[str, Any]]:
    from invsr_pl.sampling.timesteps import default_timesteps, validate_timesteps

    out = []
    for r in cfg.study.rows:
        steps = (
            validate_timesteps(list(r.timesteps)) if r.get("timesteps") else default_timesteps(r.num_steps)
        )
        out.append({"label": r.get("label") or f"InvSR-{len(steps)}", "timesteps": steps})
    return out


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run every benchmark x study row; returns ``({"<bench>/<label>/<metric>": value}, objects)``."""
    from invsr_pl.sampling.sampler import InvSRSampler

    rank, world, device, started = _dist_setup(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output.dir)
    if world > 1:  # Hydra's ${now:...} run folder can differ by a second between ranks: use rank 0's
        shared = [str(out_dir)]
        dist.broadcast_object_list(shared, src=0)
        out_dir = Path(shared[0])
    backbone = instantiate(cfg.model.backbone).to(device)
    noise_predictor, weights_note = load_noise_predictor(cfg)
    noise_predictor = noise_predictor.to(device).eval()
    protocol: M.Protocol = instantiate(cfg.protocol, _convert_="all")
    specs, unavailable = protocol.select(list(cfg.metrics.names))
    metric_device = torch.device(cfg.metrics.device or device)
    scorers, missing = M.build_scorers(
        specs, metric_device, cfg.metrics.weights_dir, cfg.metrics.allow_download
    )
    unavailable.update(missing)
    headers = {k: s.header for k, s in specs.items() if k in scorers}
    study = _study_rows(cfg)
    summary, per_image = [], []
    for bench, bcfg in cfg.benchmark.items():
        dataset = instantiate(bcfg.dataset)
        paired = len(dataset) > 0 and "gt" in dataset[0]
        sampler = InvSRSampler(
            backbone,
            noise_predictor,
            chopping_size=cfg.sampler.chopping_size,
            chopping_batch=cfg.sampler.chopping_batch,
            color_fix=bcfg.get("color_fix") or cfg.sampler.color_fix,
        )
        indices = E.shard(list(range(len(dataset))), rank, world)
        for row in study:
            metrics = {k: m.to(metric_device) for k, m in M.make_metrics(scorers, specs, paired).items()}
            image_dir = _image_dir(cfg, out_dir, bench, row["label"], "fid" in scorers)
            rows = run_row(sampler, dataset, indices, row, metrics, device, cfg.seed, image_dir, cfg.warmup)
            base = {"benchmark": bench, "method": row["label"], "timesteps": row["timesteps"]}
            rows = _gather([{**base, "order": len(summary), "rank": rank, **r} for r in rows], world)
            means = {k: float(m.compute()) for k, m in metrics.items()}  # torchmetrics reduces across ranks
            for key in metrics:  # images a metric failed on are left out of its mean and reported
                failed = [r for r in rows if r["errors"].get(key)]
                if failed:
                    first = f"{failed[0]['name']}: {failed[0]['errors'][key]}"
                    unavailable[f"{key} ({bench}/{row['label']})"] = (
                        f"failed on {len(failed)} image(s): {first}"
                    )
            wall = max(sum(r["seconds"] for r in rows if r["rank"] == q) for q in range(world))
            if "fid" in scorers and rank == 0:
                means["fid"] = _fid(
                    scorers["fid"], specs["fid"], bcfg, dataset, image_dir, out_dir, bench, unavailable
                )
            stats = E.latency_summary([r["seconds"] for r in rows], wall_seconds=wall)
            summary.append({**base, "num_images": len(rows), **{k: means.get(k) for k in headers}, **stats})
            per_image += rows
    metadata = {
        "protocol": protocol.name, "protocol_description": protocol.description, "checkpoint": cfg.ckpt_path,
        "weights": weights_note, "use_ema": cfg.use_ema, "seed": cfg.seed, "config_name": "evaluate",
        "world_size": world, "device": str(device), "unavailable": unavailable, "study": study,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
        "config": _plain_config(cfg),
    }  # fmt: skip
    report = E.report_text(summary, headers, protocol.name, protocol.description, unavailable, cfg.ckpt_path)
    files: dict[str, Path] = {}
    if rank == 0:
        print(report)
        files = E.write_outputs(out_dir, summary, per_image, headers, report, metadata)
        if cfg.output.plot and summary:
            try:
                x_key, y_key = E.choose_plot_axes(headers)
            except ValueError as err:  # e.g. metrics.names=[psnr]: nothing to plot against
                print(f"plot skipped: {err}")
            else:
                title = f"protocol {protocol.name}"
                files["plot"] = E.fidelity_realism_plot(
                    summary, x_key, y_key, headers, out_dir / "fidelity_realism.png", title
                )
    if started:
        dist.destroy_process_group()
    flat = {
        f"{r['benchmark']}/{r['method']}/{k}": r[k] for r in summary for k in headers if r.get(k) is not None
    }
    objects = {
        "summary": summary, "per_image": per_image, "files": files, "unavailable": unavailable,
        "protocol": protocol, "headers": headers, "metadata": metadata,
    }  # fmt: skip
    return flat, objects


def _gather(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's per-image rows, merged in dataset order (``all_gather_object`` under torchrun)."""
    gathered: list[Any] = [rows]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
    return E.merge_gathered(gathered)


def _plain_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run (tests call evaluate(cfg) directly)
        return OmegaConf.to_container(cfg, resolve=False)


def _image_dir(cfg: DictConfig, out_dir: Path, bench: str, label: str, need_for_fid: bool) -> Path | None:
    if not (cfg.output.save_images or need_for_fid):
        return None
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    return out_dir / "images" / bench / safe


def _fid(scorer, spec, bcfg, dataset, sr_dir, out_dir, bench, unavailable) -> float | None:
    """FID of one row's SR folder against the GT folder (paired, ``mode``, §4.1) or ``fid_reference_dir``
    (LQ-only, ``mode_no_reference``, §4.2)."""
    if "gt" in dataset[0]:
        gt_dir = getattr(dataset, "gt_dir", None)
        if gt_dir is None:  # synthesised GT (built-in samples): written once per run
            from invsr_pl.utils.images import write_image

            gt_dir = out_dir / "images" / bench / "_gt"
            for i in range(len(dataset)):
                item = dataset[i]
                if not (gt_dir / f"{item['name']}.png").exists():
                    write_image(gt_dir / f"{item['name']}.png", item["gt"])
        return M.compute_fid(scorer, sr_dir, gt_dir, spec.options.get("mode", "clean"))
    reference = bcfg.get("fid_reference_dir")
    if reference:
        return M.compute_fid(scorer, sr_dir, reference, spec.options.get("mode_no_reference", "clean"))
    unavailable[f"fid ({bench})"] = "LQ-only benchmark without fid_reference_dir"
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
