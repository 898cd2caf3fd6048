"""Image-quality metrics: the factory (pyiqa, lpips, torchmetrics), weight files, FID, report tables."""
