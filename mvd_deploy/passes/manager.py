"""The pass manager: runs an ordered list of passes and proves each exact one kept the outputs.

Every exact pass that changed something is checked against its own input model on fixed random
inputs (fp32; a pass with nothing to do left the model as it was, and is neither checked nor counted
again): the UNet's output before and after (as the 1-step sampler's clean latent, so that
fold_sampler is checked too; fp32 Linear through oneDNN, mvd_deploy.onednn) must agree to
``tolerance`` (max abs error relative to the output's largest magnitude). The check runs at a
reduced latent size (the passes rewrite weights and layer structure, never anything that depends on
the spatial size), so full-size models check in seconds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch

from mvd_deploy.model.sampler import denoised
from mvd_deploy.onednn import onednn_linear
from mvd_deploy.passes import PASSES, DeployPipeline, Pass, PassError, PassOptions
from mvd_deploy.progress import progress_bar

DEFAULT_TOLERANCE = 1e-4
logger = logging.getLogger(__name__)


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
    max_abs_error: float | None  # exact passes that changed something, when checked
    rel_error: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def make_passes(names, options: PassOptions | None = None, *, source: str | None = None) -> list[Pass]:
    """Pass instances for ``names``, in order; unknown or repeated names are refused. The one place
    pass names are checked: ``source`` says where a configured list came from (``<file>: key
    'mobilevd.deploy_passes'``) and starts the error."""
    prefix = f"{source}: " if source else ""
    seen = set()
    passes = []
    for name in names:
        if name not in PASSES:
            raise PassError(f"{prefix}unknown pass {name!r}; known passes: {', '.join(PASSES)}")
        if name in seen:
            raise PassError(f"{prefix}pass {name!r} is named twice; every pass is idempotent, name it once")
        seen.add(name)
        passes.append(PASSES[name](options))
    return passes


def check_latent_hw(unet) -> tuple[int, int]:
    """A quarter of the recipe's latent size, kept a multiple of 8 (three 2x down-samplers)."""
    return tuple(min(n, max(8, 8 * math.ceil(n / 32))) for n in unet.spec.latent_shape[3:])


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# (origin, component, passes applied so far) → FLOPs. A count runs the model through FlopCounterMode on
# the meta device (0.7–0.9 s on the tiny recipe, seconds at full size, once per pass); a process that
# deploys the same checkpoint again (the API, the tests) gets the same figures without counting.
_FLOPS: dict[tuple, int] = {}


class _Counts:
    """Parameters and FLOPs per component, as the last pass left them (a pass starts from its
    predecessor's counts instead of counting again)."""

    def __init__(self, pipeline: DeployPipeline, origin: str | None):
        self.pipeline, self.origin, self.counted = pipeline, origin, {}
        self.applied: tuple[str, ...] = ()

    def before(self, component: str) -> tuple[int, int]:
        if component not in self.counted:
            self.recount(component)
        return self.counted[component]

    def recount(self, component: str) -> tuple[int, int]:
        module = self.pipeline.components().get(component)
        key = (self.origin, component, self.applied)
        flops = _FLOPS.get(key) if self.origin is not None else None
        if flops is None:
            flops = self.pipeline.flops(component)
            if self.origin is not None:
                _FLOPS[key] = flops
        self.counted[component] = (_params(module), flops)
        return self.counted[component]


class _EquivalenceCheck:
    """The UNet's output on fixed inputs at a reduced latent size, compared after each exact pass
    with the output before it (None figures where unchecked: meta weights, or check=False)."""

    def __init__(self, pipeline: DeployPipeline, enabled: bool, tolerance: float, seed: int):
        unet = pipeline.unet
        self.pipeline, self.tolerance, self.seed = pipeline, tolerance, seed
        self.enabled = enabled and unet.conv_in.weight.device.type != "meta"
        self.hw = check_latent_hw(unet)
        self.reference = self._unet_output() if self.enabled else None

    def _unet_output(self) -> torch.Tensor:
        unet = self.pipeline.unet  # as the 1-step sampler's clean latent, so that fold_sampler is checked too
        with onednn_linear():
            return denoised(unet, unet.example_inputs(seed=self.seed, latent_hw=self.hw))

    def after(self, p: Pass) -> tuple[float | None, float | None]:
        """(max abs error, relative error) of an exact pass against its input; PassError past tolerance."""
        if not (self.enabled and p.exact):
            return None, None
        output = self._unet_output()
        max_abs = float((output - self.reference).abs().max())
        rel = max_abs / max(float(self.reference.abs().max()), 1e-30)
        if not rel <= self.tolerance:  # also catches NaN
            raise PassError(
                f"pass {p.name!r} broke equivalence: max abs error {max_abs:.3g}, relative {rel:.3g} "
                f"> tolerance {self.tolerance:g}"
            )
        self.reference = output  # the next pass is checked against this pass's output
        return max_abs, rel

    def decoder_finite(self, p: Pass) -> None:
        if self.enabled and p.component == "decoder" and self.pipeline.decoder is not None:
            frames = self.pipeline.decoder(self.reference)
            if not torch.isfinite(frames).all():
                raise PassError(f"pass {p.name!r}: the decoder produced non-finite frames")


def run_passes(
    pipeline: DeployPipeline,
    passes: list[Pass],
    *,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    origin: str | None = None,
) -> list[PassResult]:
    """Run ``passes`` in order on ``pipeline`` (in place); one result per pass.

    ``origin``: what ``pipeline`` was built from, where its layers are a function of it (a spec as
    canonical JSON, as deploy_checkpoint gives); FLOPs are then counted once per process for each
    (origin, passes applied so far). None (a pipeline changed by hand): every count is made.

    Raises PassError when a pass cannot run at its place in the list, or when an exact pass changed
    the outputs by more than ``tolerance``.
    """
    results = []
    with torch.no_grad():
        counts = _Counts(pipeline, origin)
        equivalence = _EquivalenceCheck(pipeline, check, tolerance, seed)
        bar = progress_bar(logger, passes, desc="      passes", unit="pass", leave=False)
        for position, p in enumerate(bar, 1):
            bar.set_postfix_str(p.name)
            params_before, flops_before = counts.before(p.component)
            start = time.perf_counter()
            changed = p(pipeline, position=position)
            seconds = time.perf_counter() - start
            counts.applied += (p.name,)
            if changed:
                max_abs, rel = equivalence.after(p)
                equivalence.decoder_finite(p)
                params_after, flops_after = counts.recount(p.component)
            else:  # passes are idempotent: nothing to do means the very same model as before it
                max_abs = rel = None
                params_after, flops_after = params_before, flops_before
            results.append(
                PassResult(
                    name=p.name,
                    component=p.component,
                    exact=p.exact,
                    changed=changed,
                    params_before=params_before,
                    params_after=params_after,
                    flops_before=flops_before,
                    flops_after=flops_after,
                    max_abs_error=max_abs,
                    rel_error=rel,
                    seconds=round(seconds, 3),
                )
            )
    return results
