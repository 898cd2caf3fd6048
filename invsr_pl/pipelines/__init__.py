"""diffusers pipelines of the project: :class:`InvSRPipeline`, the one inference path (docs/sampling.md)."""

from invsr_pl.pipelines.pipeline_invsr import (
    DEFAULT_SEED,
    InvSRPipeline,
    InvSRPipelineOutput,
    check_noise_predictor,
    model_index,
)
from invsr_pl.pipelines.prompt_embedding import FixedPromptEmbedding

__all__ = [
    "DEFAULT_SEED",
    "FixedPromptEmbedding",
    "InvSRPipeline",
    "InvSRPipelineOutput",
    "check_noise_predictor",
    "model_index",
]
