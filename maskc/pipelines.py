"""diffusers pipelines: ``apply`` swaps the compiled step modules in for the backbone, ``remove`` swaps back.

``apply(pipe, mask)`` compiles ``pipe.unet`` (or ``pipe.transformer``) with ``mask`` and
registers the ``TimestepModules`` in its place with ``pipe.register_modules``, so
``pipe.components`` and ``pipe.config`` name what the pipeline runs; no diffusers
class is patched. The pipeline's own loop is unchanged, classifier-free guidance
included: it calls the backbone once per step on its batched [cond; uncond] input,
and the step modules trace that batch at step 0 (a new batch size or resolution is
traced anew at the next step 0).

Invariants:
- Every pipeline call is a fresh generation. Each call runs ``scheduler.set_timesteps``,
  which assigns a new ``scheduler.timesteps`` tensor; the step modules follow that
  object (``TimestepModules.follow``) and reset when it changes, so nothing leaks
  between calls, also after a call that raised midway.
- The mask is checked against the schedule once per generation, at the first backbone
  call, before any backbone work: the scheduler class when the mask records one
  (also at ``apply``), the step count, and the timesteps when the mask records them.
  A mismatch raises ``MaskMismatchError``.
- ``remove(pipe)`` registers the original backbone again; the pipeline is as it was.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any, Callable, Sequence

import torch

from maskc.errors import MaskcError, MaskMismatchError
from maskc.mask import Mask
from maskc.runtime import TimestepModules, compile

__all__ = ["apply", "remove", "backbone", "backbone_name", "learn_inputs"]

BACKBONES = ("unet", "transformer")  # the attribute that holds the denoiser, in the order looked up


def backbone_name(pipe: Any) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline attribute that holds the denoising backbone."""
    for name in BACKBONES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise MaskcError(
        f"{type(pipe).__name__} has no 'unet' or 'transformer' module; maskc.apply works on diffusers pipelines "
        "around one denoising backbone (DDPM, DDIM, DiT, PixArt-Alpha, Stable Diffusion)"
    )


def backbone(pipe: Any) -> torch.nn.Module:
    """The pipeline's original backbone, also while maskc is applied to it."""
    m = getattr(pipe, backbone_name(pipe))
    return m.model if isinstance(m, TimestepModules) else m


def _check_scheduler_class(mask: Mask, scheduler: Any) -> None:
    want = mask.meta.get("scheduler")
    if want is not None and want != type(scheduler).__name__:
        raise MaskMismatchError(
            f"the pipeline's scheduler is a {type(scheduler).__name__}, but the mask was made for a {want}; "
            f"set pipe.scheduler to a {want} (e.g. {want}.from_config(pipe.scheduler.config)) or make a mask "
            "for this scheduler (maskc.learn(pipe, ...))"
        )


class _SchedulerTimesteps:
    """What the swapped-in step modules follow: the pipeline's current ``scheduler.timesteps``.

    A scheduler object not seen before is checked against the mask's scheduler class
    first. Holds the pipeline weakly (the pipeline holds the step modules).
    """

    def __init__(self, pipe: Any, mask: Mask) -> None:
        self._pipe = weakref.ref(pipe)
        self._mask = mask
        self._scheduler: Any = None

    def __call__(self) -> Any:
        pipe = self._pipe()
        sched = getattr(pipe, "scheduler", None)
        if sched is None:
            return None
        if sched is not self._scheduler:
            _check_scheduler_class(self._mask, sched)
            self._scheduler = sched
        return getattr(sched, "timesteps", None)


def apply(pipe: Any, mask: Mask, backend: Any = "eager", **compile_options: Any) -> TimestepModules:
    """Put ``maskc.compile(backbone, mask, backend, **compile_options)`` in place of the pipeline's backbone.

    Returns the step modules now at ``pipe.unet`` / ``pipe.transformer``. Applying
    again replaces the mask (the original backbone is compiled anew). The mask is
    checked against the backbone and the scheduler class now, and against each
    generation's timesteps at its first backbone call.
    """
    if not isinstance(mask, Mask):
        raise MaskcError(f"expected a maskc.Mask, got {type(mask).__name__}; learn one with maskc.learn(pipe, ...)")
    name = backbone_name(pipe)
    model = backbone(pipe)
    sched = getattr(pipe, "scheduler", None)
    if sched is not None:
        _check_scheduler_class(mask, sched)
    tm = compile(model, mask, backend=backend, **compile_options)
    tm.follow(_SchedulerTimesteps(pipe, mask))
    pipe.register_modules(**{name: tm})
    return tm


def remove(pipe: Any) -> torch.nn.Module:
    """Put the original backbone back where ``apply`` put the step modules; returns it."""
    name = backbone_name(pipe)
    tm = getattr(pipe, name)
    if not isinstance(tm, TimestepModules):
        raise MaskcError(f"pipe.{name} is a {type(tm).__name__}, not maskc's step modules: nothing to remove")
    tm.follow(None)
    tm.reset()
    pipe.register_modules(**{name: tm.model})
    return tm.model


# -- learning from a pipeline -------------------------------------------------------

PIPELINE_LEARN_ARGS = (
    "prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
    "negative_prompt_attention_mask", "class_labels", "num_inference_steps", "height", "width",
)


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (it has ``components`` and a scheduler), as opposed to a bare backbone."""
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "scheduler") and hasattr(type(obj), "components")


def _call_default(pipe: Any, arg: str) -> Any:
    p = inspect.signature(type(pipe).__call__).parameters.get(arg)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _cycle(t: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of ``t``, its rows in turn (prompts or labels for a batch of n)."""
    return t[torch.arange(n, device=t.device) % t.shape[0]]


def learn_inputs(
    pipe: Any,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """The arguments of ``maskc.learn(model, scheduler, steps, sample_shape, ...)`` that ``pipe`` implies.

    Model: the original backbone. Scheduler: a copy of the pipeline's. Steps and
    guidance scale: the given ones, else the pipeline's defaults. Conditioning: the
    prompts encoded once with the pipeline's own ``encode_prompt`` (or the given
    embeddings), or the class labels, cycled over the learning batch; the
    unconditional half is what the pipeline uses (negative prompts, DiT's null label
    1000). Guidance is off where the pipeline turns it off (scale <= 1).
    """
    model = backbone(pipe)
    steps = num_inference_steps if num_inference_steps is not None else _call_default(pipe, "num_inference_steps")
    if steps is None:
        raise MaskcError(f"{type(pipe).__name__} has no default num_inference_steps; pass num_inference_steps=T")
    scheduler = copy.deepcopy(pipe.scheduler)
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    if float(getattr(probe, "init_noise_sigma", 1.0)) != 1.0:
        raise MaskcError(
            f"learning from a pipeline needs a scheduler whose inputs are not rescaled (init_noise_sigma 1: DDIM, "
            f"DDPM, PNDM, DPM-Solver...); {type(scheduler).__name__} has init_noise_sigma "
            f"{float(probe.init_noise_sigma):g}. Learn with one of those and apply the mask with it"
        )
    scale = guidance_scale if guidance_scale is not None else _call_default(pipe, "guidance_scale")
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
    vae_f = int(getattr(pipe, "vae_scale_factor", 1) or 1)
    sample_shape = (c.in_channels, (height // vae_f) if height else size[0], (width // vae_f) if width else size[1])
    kind = type(pipe).__name__
    cond = uncond = None
    guided = scale is not None and scale > 1
    device = getattr(pipe, "_execution_device", model.device)

    if "encode_prompt" in dir(pipe):  # text-conditioned: Stable Diffusion, PixArt-Alpha
        if prompt is None and prompt_embeds is None:
            raise MaskcError(f"{kind} is text-conditioned: pass prompt=... or prompt_embeds=...")
        if getattr(c, "time_cond_proj_dim", None) is not None:
            raise MaskcError(f"{kind}'s U-Net embeds the guidance scale (time_cond_proj_dim); maskc.learn does not support it")
        if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)  # encode_prompt wants the same type
        with torch.no_grad():
            if "prompt_attention_mask" in inspect.signature(pipe.encode_prompt).parameters:  # PixArt
                pe, pm, ne, nm = pipe.encode_prompt(
                    prompt, guided, negative_prompt=negative_prompt or "", device=device, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                    negative_prompt_attention_mask=negative_prompt_attention_mask)
            else:
                pe, ne = pipe.encode_prompt(prompt, device, 1, guided, negative_prompt, prompt_embeds=prompt_embeds,
                                            negative_prompt_embeds=negative_prompt_embeds)
                pm = nm = None
        added: Callable[[int], dict] | None = None
        if getattr(model, "use_additional_conditions", None) is not None:  # PixArt: resolution conditioning
            h, w = sample_shape[1] * vae_f, sample_shape[2] * vae_f
            extra = model.use_additional_conditions

            def resolution(n: int) -> dict:
                if not extra:
                    return {"resolution": None, "aspect_ratio": None}
                return {"resolution": torch.tensor([[h, w]], dtype=pe.dtype, device=device).repeat(n, 1),
                        "aspect_ratio": torch.tensor([[h / w]], dtype=pe.dtype, device=device).repeat(n, 1)}

            added = resolution

        def text(e: torch.Tensor, m: torch.Tensor | None) -> Any:
            def kw(n: int, _g: torch.Generator) -> dict:
                d: dict[str, Any] = {"encoder_hidden_states": _cycle(e, n)}
                if m is not None:
                    d["encoder_attention_mask"] = _cycle(m, n)
                if added is not None:
                    d["added_cond_kwargs"] = added(n)
                return d
            return kw

        cond = text(pe, pm)
        uncond = text(ne, nm) if guided else None
    elif "transformer" == backbone_name(pipe) and kind.startswith("DiT"):
        if class_labels is None:
            raise MaskcError(f"{kind} is class-conditional: pass class_labels=[...] (ImageNet ids, as the pipeline takes)")
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        null = 1000  # DiTPipeline's null label
        cond = lambda n, g: {"class_labels": _cycle(labels, n)}  # noqa: E731
        uncond = (lambda n, g: {"class_labels": torch.full((n,), null, device=device)}) if guided else None  # noqa: E731
    elif prompt is not None or prompt_embeds is not None or class_labels is not None:
        raise MaskcError(f"{kind} is unconditional: it takes no prompt or class labels")
    else:
        guided = False
    return {
        "model": model,
        "scheduler": scheduler,
        "steps": int(steps),
        "sample_shape": sample_shape,
        "cond": cond,
        "uncond": uncond,
        "guidance_scale": float(scale) if guided else None,
    }
