"""polymodal.schedulers against diffusers' schedulers, step for step over whole runs.

Each case runs diffusers' scheduler and ours side by side from the same starting latents, with the same fake model
(a fixed nonlinear function of the model input and the timestep, so any difference in the timesteps, the input
scaling or a step compounds through the run) and the same generator seeds for the samplers that draw noise. The
configs are those SD 1.5 (scaled_linear, leading spacing, steps_offset 1), SD 2.x (v_prediction), SDXL (Euler,
leading), zero-SNR / Turbo style runs (trailing) and SD3 (flow matching, shift 3) ship.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from polymodal import schedulers as S  # noqa: E402

# stable-diffusion-v1-5's scheduler_config.json (PNDMScheduler's; SD pipelines swap samplers on it)
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
# stable-diffusion-xl-base-1.0's (EulerDiscreteScheduler)
SDXL = {**SD15, "interpolation_type": "linear", "timestep_spacing": "leading", "use_karras_sigmas": False,
        "sample_max_value": 1.0}
# stable-diffusion-3-medium-diffusers' (FlowMatchEulerDiscreteScheduler)
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}

CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
           "flow_match_euler": "FlowMatchEulerDiscreteScheduler"}
RTOL = 1e-5  # both sides run the same fp32 arithmetic; 1e-5 of the latents' scale leaves room for rounding only


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the U-Net: depends on its input and timestep, bounded like a noise prediction."""
    return torch.tanh(0.8 * x + 0.3 * torch.sin(x * 3.0)) + 1e-3 * float(t)


def run_both(method: str, config: dict, steps: int, *, noisy: bool = False, shape=(2, 4, 8, 8)):
    """-> (diffusers' final latents, ours, diffusers' timesteps, our plan)."""
    ref = getattr(diffusers, CLASSES[method]).from_config({"_class_name": CLASSES[method], **config})
    ref.set_timesteps(steps)
    _, schedule = S.from_diffusers(config, method=method)
    plan = S.make_plan(method, schedule, steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    init = getattr(ref, "init_noise_sigma", 1.0)
    ours, theirs = x * plan.init_noise_sigma, x * init
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    state = None
    for i, t in enumerate(ref.timesteps):
        theirs_in = ref.scale_model_input(theirs, t) if hasattr(ref, "scale_model_input") else theirs
        kwargs = {"generator": g_ref} if noisy else {}
        theirs = ref.step(fake_model(theirs_in, t), t, theirs, **kwargs).prev_sample
        out = fake_model(plan.scale_model_input(ours, i), plan.timesteps[i])
        ours, state = S.step(plan, i, ours, out, state, generator=g_ours)
    return theirs, ours, ref.timesteps, plan


def assert_close_run(theirs, ours):
    assert torch.isfinite(ours).all()
    err = (theirs - ours).abs().max() / theirs.abs().max()
    assert err <= RTOL, f"relative difference {err:.2e}"


SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("method", ["ddpm", "ddim", "euler", "euler_ancestral", "dpmsolver++"])
def test_sampler_matches_diffusers_over_a_run(method, prediction, spacing):
    config = {**SD15, "timestep_spacing": spacing, "prediction_type": prediction}
    steps = {"ddpm": 50, "ddim": 50, "euler": 30, "euler_ancestral": 30, "dpmsolver++": 20}[method]
    theirs, ours, timesteps, plan = run_both(method, config, steps, noisy=method in ("ddpm", "euler_ancestral"))
    assert torch.equal(plan.timesteps, timesteps.to(plan.timesteps.dtype))
    assert_close_run(theirs, ours)


@pytest.mark.parametrize("method", ["euler", "dpmsolver++"])
@pytest.mark.parametrize("steps", [12, 25])  # DPM-Solver++ lowers its order at the end of runs under 15 steps
def test_karras_sigmas(method, steps):
    config = {**SDXL, "use_karras_sigmas": True}
    theirs, ours, timesteps, plan = run_both(method, config, steps)
    ref = getattr(diffusers, CLASSES[method]).from_config({"_class_name": CLASSES[method], **config})
    ref.set_timesteps(steps)
    torch.testing.assert_close(plan.sigmas, ref.sigmas, rtol=0, atol=0)
    assert torch.equal(plan.timesteps, timesteps.to(plan.timesteps.dtype))
    assert_close_run(theirs, ours)


def test_sdxl_euler_config_as_shipped():
    theirs, ours, timesteps, plan = run_both("euler", SDXL, 30)
    ref = diffusers.EulerDiscreteScheduler.from_config(SDXL)
    ref.set_timesteps(30)
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    assert_close_run(theirs, ours)


@pytest.mark.parametrize("steps", [20, 28])
def test_flow_matching_with_sd3_shift(steps):
    theirs, ours, timesteps, plan = run_both("flow_match_euler", SD3, steps, shape=(1, 16, 8, 8))
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3)
    ref.set_timesteps(steps)
    assert torch.equal(plan.timesteps, timesteps) and torch.equal(plan.sigmas, ref.sigmas)
    assert_close_run(theirs, ours)


def test_zero_snr_trailing_ddim_and_clipping():
    config = {**SD15, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "clip_sample": True, "set_alpha_to_one": True}
    theirs, ours, _, _ = run_both("ddim", config, 25)
    assert_close_run(theirs, ours)
    theirs, ours, _, _ = run_both("euler", config, 25)
    assert_close_run(theirs, ours)


def test_ddim_eta_noise_from_a_generator():
    _, schedule = S.from_diffusers(SD15, method="ddim")
    plan = S.make_plan("ddim", schedule, 20)
    ref = diffusers.DDIMScheduler.from_config(SD15)
    ref.set_timesteps(20)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = x.clone(), x.clone()
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(ref.timesteps):
        a = ref.step(fake_model(a, t), t, a, eta=0.5, generator=ga).prev_sample
        b = S.ddim_step(plan, i, b, fake_model(b, plan.timesteps[i]), eta=0.5, generator=gb)
    assert_close_run(a, b)


def test_from_diffusers_reads_class_defaults():
    method, schedule = S.from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    assert method == "euler" and schedule.timestep_spacing == "linspace" and schedule.beta_schedule == "linear"
    method, schedule = S.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert method == "flow_match_euler" and schedule.shift == 3.0
    # SD 1.5's PNDMScheduler file (skip_prk_steps true) is PLMS alone, what method "pndm" builds
    method, schedule = S.from_diffusers({"_class_name": "PNDMScheduler", **SD15})
    assert method == "pndm" and schedule.beta_schedule == "scaled_linear" and schedule.steps_offset == 1
    with pytest.raises(ValueError, match="PNDMScheduler.*Runge-Kutta warm-up.*is not built"):
        S.from_diffusers({"_class_name": "PNDMScheduler", **SD15, "skip_prk_steps": False})
    with pytest.raises(ValueError, match="PNDMScheduler.*Runge-Kutta warm-up.*is not built"):
        S.from_diffusers({"_class_name": "PNDMScheduler"})  # diffusers' default: skip_prk_steps false
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        S.from_diffusers(SD15, method="heun")
    with pytest.raises(ValueError, match="midpoint"):
        S.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"})


def test_bad_step_counts_are_refused():
    schedule = S.NoiseSchedule()
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer from 1 to"):
            S.make_plan("euler", schedule, bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.make_plan("plms", schedule, 10)


def test_classifier_free_guidance_matches_the_pipeline_formula():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    guided = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(S.classifier_free_guidance(uncond, cond, 7.5), guided, rtol=0, atol=0)
    torch.testing.assert_close(S.classifier_free_guidance(uncond, cond, 7.5, rescale=0.7),
                               rescale_noise_cfg(guided, cond, guidance_rescale=0.7), rtol=1e-6, atol=1e-6)
