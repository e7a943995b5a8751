"""The pass manager: runs an ordered list of passes and proves each exact one kept the outputs.

Every exact pass is checked against its own input model on fixed random inputs (fp32): the UNet's
output before and after (as the 1-step sampler's clean latent, so that fold_sampler is checked too)
must agree to ``tolerance`` (max abs error relative to the output's largest magnitude). The check
runs at a reduced latent size (the passes rewrite weights and layer structure, never anything that
depends on the spatial size), so full-size models check in seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from mvd_deploy.model.sampler import denoised
from mvd_deploy.passes import PASSES, DeployPipeline, Pass, PassError, PassOptions

DEFAULT_TOLERANCE = 1e-4


@dataclass
class PassResult:
    name: str
    component: str
    exact: bool
    changed: str  # what the pass did, in words; "" when it had nothing to do
    params_before: int
    params_after: int
    flops_before: int  # one call of the component at the recipe's shape
    flops_after: int
    max_abs_error: float | None  # exact passes, when checked
    rel_error: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def make_passes(names, options: PassOptions | None = None) -> list[Pass]:
    """Pass instances for ``names``, in order; unknown or repeated names are refused."""
    seen = set()
    passes = []
    for name in names:
        if name not in PASSES:
            raise PassError(f"unknown pass {name!r}; known passes: {', '.join(PASSES)}")
        if name in seen:
            raise PassError(f"pass {name!r} is named twice; every pass is idempotent, name it once")
        seen.add(name)
        passes.append(PASSES[name](options))
    return passes


def check_latent_hw(unet) -> tuple[int, int]:
    """A quarter of the recipe's latent size, kept a multiple of 8 (three 2x down-samplers)."""
    return tuple(min(n, max(8, 8 * math.ceil(n / 32))) for n in unet.spec.latent_shape[3:])


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def run_passes(
    pipeline: DeployPipeline,
    passes: list[Pass],
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    progress=None,
) -> list[PassResult]:
    """Run ``passes`` in order on ``pipeline`` (in place); one result per pass.

    Raises PassError when a pass cannot run at its place in the list, or when an exact pass changed
    the outputs by more than ``tolerance``.
    """
    unet = pipeline.unet
    check = check and unet.conv_in.weight.device.type != "meta"
    hw = check_latent_hw(unet)
    results = []
    counted: dict[str, tuple[int, int]] = {}  # component -> (params, FLOPs) as the last pass left it
    with torch.no_grad():
        inputs = unet.example_inputs(seed=seed, latent_hw=hw)
        reference = denoised(unet, inputs) if check else None
        for i, p in enumerate(passes):
            if progress:
                progress(i, len(passes), p.name)
            reason = p.why_not(pipeline)
            if reason:
                raise PassError(f"pass {p.name!r} (number {i + 1} in the list) cannot run: {reason}")
            component = p.component
            if component not in counted:  # later passes start from the previous pass's counts
                counted[component] = (_params(pipeline.components().get(component)), pipeline.flops(component))
            params_before, flops_before = counted[component]
            start = time.perf_counter()
            changed = p.run(pipeline)
            seconds = time.perf_counter() - start
            max_abs = rel = None
            if check and p.exact:
                output = denoised(unet, unet.example_inputs(seed=seed, latent_hw=hw))
                max_abs = float((output - reference).abs().max())
                rel = max_abs / max(float(reference.abs().max()), 1e-30)
                if not rel <= tolerance:  # also catches NaN
                    raise PassError(
                        f"pass {p.name!r} broke equivalence: max abs error {max_abs:.3g}, relative {rel:.3g} "
                        f"> tolerance {tolerance:g}"
                    )
                reference = output  # the next pass is checked against this pass's output
            if check and component == "decoder" and pipeline.decoder is not None:
                frames = pipeline.decoder(reference)
                if not torch.isfinite(frames).all():
                    raise PassError(f"pass {p.name!r}: the decoder produced non-finite frames")
            counted[component] = (_params(pipeline.components().get(component)), pipeline.flops(component))
            results.append(
                PassResult(
                    name=p.name,
                    component=component,
                    exact=p.exact,
                    changed=changed,
                    params_before=params_before,
                    params_after=counted[component][0],
                    flops_before=flops_before,
                    flops_after=counted[component][1],
                    max_abs_error=max_abs,
                    rel_error=rel,
                    seconds=round(seconds, 3),
                )
            )
    return results
