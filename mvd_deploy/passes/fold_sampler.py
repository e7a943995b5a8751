"""fold_sampler: the 1-step sampler's EDM preconditioning inside the deployed UNet.

SVD's UNet predicts v at a noise level σ; its scheduler scales the noise before the call and
combines the UNet's output with the noisy latent after it (mvd_deploy.model.sampler). A 1-step model
runs at one fixed σ, so all of it is constants: this pass installs them in the UNet, which then maps
``sample`` = (unit noise ε, image latent) and the image embedding to the clean latent x₀ that the
decoder reads — the app needs no scheduler code. σ is the checkpoint's ``conditioning.sigma`` (700:
what SVD's Karras schedule gives for one step). Exact: the same multiplies and adds as the scheduler
(the pass manager compares every pass on the 1-step sampler's clean latent). Leave the pass out of
the list to keep the UNet's raw v-prediction output.
"""

from __future__ import annotations

from mvd_deploy.model.sampler import FoldedSampler, sampler_scalings
from mvd_deploy.passes.base import DeployPipeline, Pass, needs_one_step


class FoldSampler(Pass):
    name = "fold_sampler"

    def why_not(self, pipeline: DeployPipeline) -> str | None:
        return needs_one_step(pipeline, "a multi-step sampler changes σ per step")

    def call(self, pipeline: DeployPipeline) -> str:
        unet = pipeline.unet
        if unet.sampler is not None:
            return ""
        scalings = sampler_scalings(unet.spec)
        unet.sampler = FoldedSampler(scalings, unet.spec.unet["out_channels"])
        return (
            f"folded the 1-step EDM sampler at sigma {scalings.sigma:g} (c_in {scalings.c_in:.4g}, "
            f"c_skip {scalings.c_skip:.3g}, c_out {scalings.c_out:.6g}): output is the clean latent"
        )
