"""Deploy passes: each turns the train-time pipeline a step closer to what runs on the phone.

A new pass is one new file and one line in PASSES.
"""

from mvd_deploy.passes.base import DeployPipeline, Pass, PassError, PassOptions
from mvd_deploy.passes.broadcast_temporal_attention import BroadcastTemporalAttention
from mvd_deploy.passes.chunk_attention import ChunkAttention
from mvd_deploy.passes.fold_conditioning import FoldConditioning
from mvd_deploy.passes.fold_sampler import FoldSampler
from mvd_deploy.passes.frames_as_batch import FramesAsBatch
from mvd_deploy.passes.merge_funnels import MergeFunnels
from mvd_deploy.passes.single_token_cross_attention import SingleTokenCrossAttentionPass
from mvd_deploy.passes.strip_temporal import StripTemporal
from mvd_deploy.passes.taesd_decoder import TAESDDecoderPass

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        MergeFunnels,
        StripTemporal,
        FramesAsBatch,
        SingleTokenCrossAttentionPass,
        FoldConditioning,
        FoldSampler,
        ChunkAttention,
        BroadcastTemporalAttention,
        TAESDDecoderPass,
    )
}
DEFAULT_PASSES = tuple(PASSES)

__all__ = ["DEFAULT_PASSES", "PASSES", "DeployPipeline", "Pass", "PassError", "PassOptions"]
