"""``invsr-export-lpips CKPT OUT.pth`` (or ``python -m invsr_pl.cli.export_latent_lpips``): a trained latent
LPIPS out of a ``train.py model=latent_lpips`` checkpoint, in the layout of ``vgg16_sdturbo_lpips.pth``
(docs/latent_lpips.md). An existing OUT is never replaced.

Exit codes: 0 written, 2 setup error (no such checkpoint, no latent LPIPS in it, OUT exists).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invsr_pl.systems.latent_lpips import export_checkpoint

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 written, 2 setup error)."""
    parser = argparse.ArgumentParser(
        prog="invsr-export-lpips",
        description="Export a trained latent LPIPS to the vgg16_sdturbo_lpips.pth layout. "
        "Exit codes: 0 written, 2 setup error.",
    )
    parser.add_argument(
        "checkpoint", help="train.py checkpoint (e.g. logs/latent_lpips/runs/<time>/checkpoints/last.ckpt)"
    )
    parser.add_argument("output", help="weights file to write (e.g. weights/vgg16_latent_lpips.pth)")
    args = parser.parse_args(argv)
    if Path(args.output).exists():
        print(
            f"invsr-export-lpips: error: {args.output} exists already; choose another name", file=sys.stderr
        )
        return 2
    try:
        written = export_checkpoint(args.checkpoint, args.output)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"invsr-export-lpips: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
