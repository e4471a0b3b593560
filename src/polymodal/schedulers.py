"""Diffusion samplers as small functions of a timestep/sigma table (STYLE.md, point 13).

    plan = make_plan("euler", NoiseSchedule(timestep_spacing="leading", steps_offset=1), num_inference_steps=30)
    x = randn(...) * plan.init_noise_sigma
    for i, t in enumerate(plan.timesteps):
        eps = unet(plan.scale_model_input(x, i), t, ...)
        x = euler_step(plan, i, x, eps)

A `Plan` holds what diffusers' `set_timesteps` computes (the timesteps the model is called at, the sigmas between
steps, the training schedule's cumulative alphas); a step function maps (plan, step index, x_t, model output) to
x_{t-1}. Multistep DPM-Solver++ takes and returns its history (`DPMState`); the stochastic samplers take a
`generator` (noise drawn as diffusers draws it) or the `noise` itself.

    DDPM        Ho et al. 2020, eq. 7 (posterior mean + fixed variance)          diffusers DDPMScheduler
    DDIM        Song et al. 2021, eq. 12 (eta = 0: deterministic)                DDIMScheduler
    PLMS        Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models  PNDMScheduler (skip_prk_steps)
                on Manifolds", eqs. 9, 12 (linear multistep, no Runge-Kutta warm-up)
    Euler       Karras et al. 2022, Alg. 1 without churn (k-diffusion's sampler) EulerDiscreteScheduler
    Euler a     k-diffusion's ancestral Euler (sigma_up / sigma_down split)      EulerAncestralDiscreteScheduler
    DPM++ 2M    Lu et al. 2022, "DPM-Solver++", Alg. 2 (multistep, order 2)      DPMSolverMultistepScheduler
    flow Euler  rectified flow, x += (sigma_next - sigma) v (Esser et al. 2024,  FlowMatchEulerDiscreteScheduler
                SD3, with its timestep shift sigma' = s sigma / (1 + (s-1) sigma))

Each is checked step for step against the diffusers scheduler on the configs SD 1.5, SDXL and SD3 ship
(tests/test_schedulers.py). The arithmetic follows diffusers' order of operations and dtypes (fp32 tables, numpy
float64 where diffusers interpolates), so the two agree to float rounding over whole runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from polymodal.config import from_dict
from polymodal.nn.diffusion import gaussian_noise

Method = Literal["ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++", "flow_match_euler"]


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule and sampler options, under diffusers' scheduler_config.json names.

    Defaults are Stable Diffusion's (scaled_linear betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction);
    `from_diffusers` fills what a file leaves out with the defaults of the scheduler class it names."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False  # DDPM, DDIM: clamp the predicted x0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False  # DDIM: alpha-bar after the last step is 1 (else the first training step's)
    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"  # DDPM
    use_karras_sigmas: bool = False  # Euler, DPM-Solver: Karras et al. 2022's rho = 7 spacing of the sigmas
    solver_order: Literal[1, 2] = 2  # DPM-Solver++
    lower_order_final: bool = True  # DPM-Solver++: first order for the last step(s) of short runs
    euler_at_final: bool = False
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"  # Euler, DPM-Solver: the sigma after the last step
    shift: float = 1.0  # flow matching: SD3's timestep shift (3.0 in its config)


# diffusers' defaults where its scheduler classes differ from NoiseSchedule's (for files that leave them out)
_CLASS_DEFAULTS: dict[str, tuple[Method, dict]] = {
    "DDPMScheduler": ("ddpm", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                               "clip_sample": True}),
    "PNDMScheduler": ("pndm", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}),
    "DDIMScheduler": ("ddim", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                               "clip_sample": True, "set_alpha_to_one": True}),
    "EulerDiscreteScheduler": ("euler", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                         "timestep_spacing": "linspace"}),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", {"beta_start": 0.0001, "beta_end": 0.02,
                                                            "beta_schedule": "linear", "timestep_spacing": "linspace"}),
    "DPMSolverMultistepScheduler": ("dpmsolver++", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                                    "timestep_spacing": "linspace"}),
    "FlowMatchEulerDiscreteScheduler": ("flow_match_euler", {}),
}
METHODS: dict[Method, str] = {m: cls for cls, (m, _) in _CLASS_DEFAULTS.items()}


def from_diffusers(config: dict, method: Method | None = None) -> tuple[Method, NoiseSchedule]:
    """A diffusers scheduler_config.json -> (method, schedule). `method` picks another sampler on the same schedule
    (diffusers' `OtherScheduler.from_config(pipe.scheduler.config)`); fields the file leaves out take that sampler's
    diffusers defaults. PNDMScheduler as a whole (its Runge-Kutta warm-up) is not built: its PLMS steps alone, what
    SD 1.5's file asks for with skip_prk_steps, are method="pndm", which such a file gets without asking."""
    name = config.get("_class_name")
    if method is None:
        if name == "PNDMScheduler" and not config.get("skip_prk_steps", False):
            raise ValueError(f"scheduler 'PNDMScheduler' with its Runge-Kutta warm-up (skip_prk_steps false) is not "
                             f"built; set skip_prk_steps true for its PLMS steps alone (method='pndm', Stable "
                             f"Diffusion's setting), or pass method= another of {sorted(METHODS)}")
        if name not in _CLASS_DEFAULTS:
            raise ValueError(f"scheduler {name!r} is not built; pass method= one of {sorted(METHODS)} to sample "
                             f"its noise schedule with another sampler")
        method = _CLASS_DEFAULTS[name][0]
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; known: {sorted(METHODS)}")
    if (config.get("algorithm_type", "dpmsolver++"), config.get("solver_type", "midpoint")) != ("dpmsolver++",
                                                                                             "midpoint"):
        raise ValueError("only DPM-Solver++ with the midpoint solver type is built")
    if method == "pndm" and not config.get("skip_prk_steps", False):
        raise ValueError(f"scheduler 'PNDMScheduler' with its Runge-Kutta warm-up steps (skip_prk_steps false) is "
                         f"not built; pass method= one of {sorted(METHODS)} to sample its noise schedule with another "
                         f"sampler, or set skip_prk_steps true (PLMS alone, Stable Diffusion's setting)")
    if config.get("trained_betas") is not None or config.get("use_dynamic_shifting"):
        raise ValueError("trained_betas and dynamic shifting are not supported")
    defaults = _CLASS_DEFAULTS[METHODS[method]][1]
    return method, from_dict(NoiseSchedule, {**defaults, **{k: v for k, v in config.items() if k != "_class_name"}})


# --------------------------------------------------------------------------------------- the training schedule


def betas(schedule: NoiseSchedule) -> Tensor:
    """beta_t, (T,) fp32: linear, scaled_linear (linear in sqrt(beta), LDM's) or squaredcos_cap_v2 (Nichol &
    Dhariwal 2021's cosine alpha-bar), with Lin et al. 2024's zero-terminal-SNR rescale when asked."""
    s, T = schedule, schedule.num_train_timesteps
    if s.beta_schedule == "linear":
        b = torch.linspace(s.beta_start, s.beta_end, T, dtype=torch.float32)
    elif s.beta_schedule == "scaled_linear":
        b = torch.linspace(s.beta_start**0.5, s.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif s.beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                         dtype=torch.float32)
    else:
        raise ValueError(f"unknown beta_schedule {s.beta_schedule!r}")
    return _zero_terminal_snr(b) if s.rescale_betas_zero_snr else b


def _zero_terminal_snr(b: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha-bar) so the last step is pure noise and the first unchanged (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1)."""
    root = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    bar = root**2
    return 1 - torch.cat([bar[0:1], bar[1:] / bar[:-1]])


def alphas_cumprod(schedule: NoiseSchedule) -> Tensor:
    """alpha-bar_t = prod_{s <= t} (1 - beta_s), (T,) fp32."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """One sampling run's table. timesteps (N,): what the model is called with (int64 for DDPM/DDIM/DPM-Solver,
    fp32 for the Euler and flow samplers); sigmas (N+1,) fp32: the noise level at each step and after the last
    (None for DDPM/DDIM); alphas_cumprod (T,): the training schedule (None for flow matching)."""

    method: Method
    schedule: NoiseSchedule
    timesteps: Tensor
    sigmas: Tensor | None
    alphas_cumprod: Tensor | None
    init_noise_sigma: float = 1.0
    num_inference_steps: int | None = None  # PLMS: the N asked for (its plan calls the model N + 1 times)

    def __len__(self) -> int:
        return len(self.timesteps)

    def scale_model_input(self, x: Tensor, i: int) -> Tensor:
        """The model's input at step i: x / sqrt(sigma^2 + 1) for the Euler samplers (their x carries sigma-scaled
        noise, the model was trained on unit-variance inputs); x itself for the others."""
        if self.method in ("euler", "euler_ancestral"):
            return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)
        return x


def make_plan(method: Method, schedule: NoiseSchedule, num_inference_steps: int) -> Plan:
    """The timestep/sigma table of `num_inference_steps` steps for a sampler (diffusers' `set_timesteps`)."""
    T = schedule.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not (
            1 <= num_inference_steps <= T):
        raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                         f"got {num_inference_steps!r}")
    if method == "flow_match_euler":
        return _flow_plan(schedule, num_inference_steps)
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; known: {sorted(METHODS)}")
    if schedule.prediction_type == "sample" and method == "euler_ancestral":
        raise ValueError("Euler ancestral takes epsilon or v_prediction models")
    ac = alphas_cumprod(schedule)
    if method in ("ddpm", "ddim"):
        return Plan(method, schedule, torch.from_numpy(_spaced(schedule, num_inference_steps).astype(np.int64)),
                    None, ac)
    if method == "pndm":
        if schedule.prediction_type == "sample":
            raise ValueError("PLMS takes epsilon or v_prediction models")
        up = _spaced(schedule, num_inference_steps)[::-1].astype(np.int64)  # ascending
        # PLMS without the warm-up runs the second-to-last timestep twice: the first step is redone from the same
        # sample with the average of two model outputs (diffusers' plms_timesteps)
        steps = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].copy()
        return Plan(method, schedule, torch.from_numpy(steps), None, ac, num_inference_steps=num_inference_steps)
    if method == "dpmsolver++":
        return _dpm_plan(schedule, num_inference_steps, ac)
    if schedule.rescale_betas_zero_snr:  # the Euler samplers' sigma_T would be infinite (diffusers' fix)
        ac = ac.clone()
        ac[-1] = 2**-24
    steps = _spaced(schedule, num_inference_steps, rounded_linspace=False).astype(np.float32)
    table = (((1 - ac) / ac) ** 0.5).numpy()  # (T,) fp32 sigma of each training step
    sigmas = np.interp(steps, np.arange(T), table)  # float64, as diffusers
    if method == "euler" and schedule.use_karras_sigmas:
        sigmas = _karras(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
        steps = _sigma_to_t(sigmas, np.log(table))
    last = ((1 - ac[0]) / ac[0]) ** 0.5 if method == "euler" and schedule.final_sigmas_type == "sigma_min" else 0.0
    sigmas = torch.from_numpy(np.concatenate([sigmas, [float(last)]]).astype(np.float32))
    top = sigmas.max()
    init = top if schedule.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Plan(method, schedule, torch.from_numpy(np.asarray(steps).astype(np.float32)), sigmas, ac, float(init))


def _spaced(s: NoiseSchedule, n: int, *, rounded_linspace: bool = True) -> np.ndarray:
    """diffusers' timestep_spacing (its Table 2 in Lin et al. 2024): `linspace` over [0, T-1], `leading`
    multiples of T // n (+ steps_offset), `trailing` counted down from T - 1; descending."""
    T = s.num_train_timesteps
    if s.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        return (t.round() if rounded_linspace else t.astype(np.float32))[::-1].copy()
    if s.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy() + s.steps_offset
    if s.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {s.timestep_spacing!r}")


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, interpolating log sigma over the training table."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_table[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def _dpm_plan(s: NoiseSchedule, n: int, ac: Tensor) -> Plan:
    T = s.num_train_timesteps
    # DPM-Solver spaces n + 1 points and drops the last (t = 0)
    if s.timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
    elif s.timestep_spacing == "leading":
        steps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy() + s.steps_offset
    else:
        steps = _spaced(s, n)
    table = (((1 - ac) / ac) ** 0.5).numpy()
    if s.use_karras_sigmas:
        full = np.flip(table).copy()
        sigmas = _karras(full[-1].item(), full[0].item(), n)
        steps = _sigma_to_t(sigmas, np.log(table))
        if s.beta_schedule != "squaredcos_cap_v2":
            steps = steps.round()
    else:
        sigmas = np.interp(steps, np.arange(T), table)
    last = ((1 - ac[0]) / ac[0]) ** 0.5 if s.final_sigmas_type == "sigma_min" else 0.0
    sigmas = torch.from_numpy(np.concatenate([sigmas, [float(last)]]).astype(np.float32))
    return Plan("dpmsolver++", s, torch.from_numpy(np.asarray(steps)).to(torch.int64), sigmas, ac)


def _flow_plan(s: NoiseSchedule, n: int) -> Plan:
    T = s.num_train_timesteps

    def shifted(sig):
        return s.shift * sig / (1 + (s.shift - 1) * sig)

    # the training table's ends, shifted (fp32, as diffusers builds them) ...
    train = shifted(torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T)
    hi, lo = train[0].item(), train[-1].item()
    # ... then n points between them, shifted once more: what diffusers' set_timesteps does
    sigmas = torch.from_numpy(shifted(np.linspace(hi * T, lo * T, n) / T)).to(torch.float32)
    return Plan("flow_match_euler", s, sigmas * T, torch.cat([sigmas, torch.zeros(1)]), None)


# ------------------------------------------------------------------------------------------------ the steps


def _x0_eps(schedule: NoiseSchedule, x: Tensor, out: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(predicted x0, predicted noise) from the model output at alpha-bar a, b = 1 - a (DDPM/DDIM)."""
    kind = schedule.prediction_type
    if kind == "epsilon":
        return (x - b ** (0.5) * out) / a ** (0.5), out
    if kind == "v_prediction":  # v = sqrt(a) eps - sqrt(b) x0 (Salimans & Ho 2022)
        return (a**0.5) * x - (b**0.5) * out, (a**0.5) * out + (b**0.5) * x
    return out, (x - a ** (0.5) * out) / b ** (0.5)


def _clip(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    r = schedule.clip_sample_range
    return x0.clamp(-r, r) if schedule.clip_sample else x0


def ddpm_step(plan: Plan, i: int, x: Tensor, model_output: Tensor, *, generator: torch.Generator | None = None,
              noise: Tensor | None = None) -> Tensor:
    """Ancestral DDPM step: the posterior mean of x_{t'} given x_t and the predicted x0, plus sigma_t z (Ho et al.
    2020, eqs. 6-7), over the plan's subsequence of timesteps; no noise at t = 0."""
    s, ac = plan.schedule, plan.alphas_cumprod
    t = int(plan.timesteps[i])
    prev = int(plan.timesteps[i + 1]) if i + 1 < len(plan) else -1
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else torch.tensor(1.0)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x0 = _clip(s, _x0_eps(s, x, model_output, a_t, b_t)[0])
    mean = ((a_prev ** (0.5) * beta) / b_t) * x0 + (alpha ** (0.5) * b_prev / b_t) * x
    if t == 0:
        return mean
    if noise is None:
        noise = gaussian_noise(model_output.shape, generator=generator, device=model_output.device,
                               dtype=model_output.dtype)
    variance = beta if s.variance_type == "fixed_large" else torch.clamp(b_prev / b_t * beta, min=1e-20)
    return mean + variance**0.5 * noise


def ddim_step(plan: Plan, i: int, x: Tensor, model_output: Tensor, *, eta: float = 0.0,
              generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_{t'} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps [+ s z], s = eta * the DDPM
    posterior std. The previous timestep is t - T // N whatever the spacing, as diffusers computes it."""
    s, ac = plan.schedule, plan.alphas_cumprod
    t = int(plan.timesteps[i])
    prev = t - s.num_train_timesteps // len(plan)
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else (torch.tensor(1.0) if s.set_alpha_to_one else ac[0])
    b_t = 1 - a_t
    x0, eps = _x0_eps(s, x, model_output, a_t, b_t)
    x0 = _clip(s, x0)
    std = eta * ((1 - a_prev) / b_t * (1 - a_t / a_prev)) ** (0.5)
    out = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
    if eta > 0:
        if noise is None:
            noise = gaussian_noise(model_output.shape, generator=generator, device=model_output.device,
                                   dtype=model_output.dtype)
        out = out + std * noise
    return out


@dataclass(frozen=True)
class PLMSState:
    """PLMS's history: up to four past model outputs, the steps taken, and the first step's sample (the second
    step restarts from it)."""

    outputs: tuple[Tensor, ...] = ()
    counter: int = 0
    sample: Tensor | None = None


def plms_step(plan: Plan, i: int, x: Tensor, model_output: Tensor, state: PLMSState | None = None
              ) -> tuple[Tensor, PLMSState]:
    """Pseudo linear multistep (Liu et al. 2022, eq. 12): the noise estimate is an Adams-Bashforth combination of
    the last 1-4 model outputs (55, -59, 37, -9) / 24 once four exist; the first step is taken twice (Euler, then
    from the same sample with the two outputs averaged), then the transfer of eq. 9 moves x_t to x_{t - T/N}.
    Returns (x', the state for step i + 1); the step counter, not i, drives it, so a run may start late."""
    s, ac = plan.schedule, plan.alphas_cumprod
    state = state or PLMSState()
    ratio = s.num_train_timesteps // plan.num_inference_steps
    t = int(plan.timesteps[i])
    outputs, counter, first = list(state.outputs), state.counter, state.sample
    prev = t - ratio
    if counter != 1:
        outputs = outputs[-3:] + [model_output]
    else:  # the repeated first step: from the first sample, over the first step's span
        prev, t = t, t + ratio
    if len(outputs) == 1 and counter == 0:
        eps, first = model_output, x
    elif len(outputs) == 1 and counter == 1:
        eps, x, first = (model_output + outputs[-1]) / 2, first, None
    elif len(outputs) == 2:
        eps = (3 * outputs[-1] - outputs[-2]) / 2
    elif len(outputs) == 3:
        eps = (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
    else:
        eps = (1 / 24) * (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4])
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else (torch.tensor(1.0) if s.set_alpha_to_one else ac[0])
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if s.prediction_type == "v_prediction":
        eps = (a_t**0.5) * eps + (b_t**0.5) * x
    # eq. 9: x' = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
    denom = a_t * b_prev ** (0.5) + (a_t * b_t * a_prev) ** (0.5)
    out = (a_prev / a_t) ** (0.5) * x - (a_prev - a_t) * eps / denom
    return out, PLMSState(tuple(outputs), counter + 1, first)


def _euler_x0(schedule: NoiseSchedule, x: Tensor, out: Tensor, sigma: Tensor) -> Tensor:
    if schedule.prediction_type == "epsilon":
        return x - sigma * out
    if schedule.prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return out


def euler_step(plan: Plan, i: int, x: Tensor, model_output: Tensor) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1, no churn)."""
    sigma = plan.sigmas[i]
    h = x.to(torch.float32)
    d = (h - _euler_x0(plan.schedule, h, model_output, sigma)) / sigma
    return (h + d * (plan.sigmas[i + 1] - sigma)).to(model_output.dtype)


def euler_ancestral_step(plan: Plan, i: int, x: Tensor, model_output: Tensor, *,
                         generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """Ancestral Euler: an ODE step down to sigma_down, then fresh noise of sigma_up, with
    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2. Noise is drawn at
    every step (the last with sigma_up = 0), so a generator stays in step with diffusers'."""
    sigma, nxt = plan.sigmas[i], plan.sigmas[i + 1]
    h = x.to(torch.float32)
    x0 = _euler_x0(plan.schedule, h, model_output, sigma)
    up = (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5
    down = (nxt**2 - up**2) ** 0.5
    h = h + (h - x0) / sigma * (down - sigma)
    if noise is None:
        noise = gaussian_noise(model_output.shape, generator=generator, device=model_output.device,
                               dtype=model_output.dtype)
    return (h + noise * up).to(model_output.dtype)


@dataclass(frozen=True)
class DPMState:
    """DPM-Solver++'s history: the previous step's x0 prediction and how many steps have run (up to the order)."""

    previous: Tensor | None = None
    lower_order_nums: int = 0


def dpm_solver_step(plan: Plan, i: int, x: Tensor, model_output: Tensor, state: DPMState | None = None
                    ) -> tuple[Tensor, DPMState]:
    """DPM-Solver++(2M) in the data-prediction form: with lambda = log(alpha / sigma) and h = lambda' - lambda,
    x' = (sigma' / sigma) x - alpha' (e^-h - 1) (D0 + D1 / 2), D0 = x0 now, D1 = (x0 now - x0 before) / r
    (midpoint), first order for the first step and, as diffusers, for the last (final sigma zero or a run shorter
    than 15 steps). Returns (x', the state for step i + 1)."""
    s = plan.schedule
    state = state or DPMState()
    N = len(plan)
    final = i == N - 1 and (s.euler_at_final or (s.lower_order_final and N < 15) or s.final_sigmas_type == "zero")
    sig = plan.sigmas

    def alpha_sigma(v):  # VP: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha
        a = 1 / ((v**2 + 1) ** 0.5)
        return a, v * a

    a_s, s_s = alpha_sigma(sig[i])
    if s.prediction_type == "epsilon":
        x0 = (x - s_s * model_output) / a_s
    elif s.prediction_type == "v_prediction":
        x0 = a_s * x - s_s * model_output
    else:
        x0 = model_output
    h_x = x.to(torch.float32)
    a_t, s_t = alpha_sigma(sig[i + 1])
    lam_t, lam_s = torch.log(a_t) - torch.log(s_t), torch.log(a_s) - torch.log(s_s)
    h = lam_t - lam_s
    if s.solver_order == 1 or state.lower_order_nums < 1 or final:
        out = (s_t / s_s) * h_x - (a_t * (torch.exp(-h) - 1.0)) * x0
    else:
        a_1, s_1 = alpha_sigma(sig[i - 1])
        r = (lam_s - (torch.log(a_1) - torch.log(s_1))) / h
        d0, d1 = x0, (1.0 / r) * (x0 - state.previous)
        out = (s_t / s_s) * h_x - (a_t * (torch.exp(-h) - 1.0)) * d0 - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * d1
    nums = min(state.lower_order_nums + 1, s.solver_order)
    return out.to(model_output.dtype), DPMState(x0, nums)


def flow_match_step(plan: Plan, i: int, x: Tensor, model_output: Tensor) -> Tensor:
    """Rectified-flow Euler: x_{sigma'} = x_sigma + (sigma' - sigma) v, v the predicted velocity noise - x0."""
    h = x.to(torch.float32)
    return (h + (plan.sigmas[i + 1] - plan.sigmas[i]) * model_output).to(model_output.dtype)


def step(plan: Plan, i: int, x: Tensor, model_output: Tensor, state: DPMState | PLMSState | None = None, *,
         generator: torch.Generator | None = None) -> tuple[Tensor, DPMState | PLMSState | None]:
    """One step of the plan's sampler -> (x_{i+1}, state): the uniform entry a pipeline's loop calls."""
    m = plan.method
    if m == "dpmsolver++":
        return dpm_solver_step(plan, i, x, model_output, state)
    if m == "pndm":
        return plms_step(plan, i, x, model_output, state)
    if m == "ddpm":
        return ddpm_step(plan, i, x, model_output, generator=generator), None
    if m == "ddim":
        return ddim_step(plan, i, x, model_output), None
    if m == "euler":
        return euler_step(plan, i, x, model_output), None
    if m == "euler_ancestral":
        return euler_ancestral_step(plan, i, x, model_output, generator=generator), None
    return flow_match_step(plan, i, x, model_output), None


def add_noise(plan: Plan, i: int, x0: Tensor, noise: Tensor) -> Tensor:
    """Clean latents x0 noised to the level of the plan's step i, where a run that starts at step i begins
    (img2img's strength, inpainting's re-noised image): sqrt(a_t) x0 + sqrt(1 - a_t) noise for DDPM/DDIM/PLMS,
    x0 + sigma noise for the Euler samplers, alpha x0 + sigma alpha noise (VP) for DPM-Solver, (1 - sigma) x0 +
    sigma noise for flow matching; diffusers' `add_noise` / `scale_noise` with its begin index at i."""
    m = plan.method
    if m in ("ddpm", "ddim", "pndm"):
        a = plan.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[int(plan.timesteps[i])]
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise
    sigma = plan.sigmas.to(device=x0.device, dtype=x0.dtype)[i]
    if m == "dpmsolver++":
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha * x0 + sigma * alpha * noise
    if m == "flow_match_euler":
        return sigma * noise + (1.0 - sigma) * x0
    return x0 + noise * sigma


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """uncond + scale (cond - uncond) (Ho & Salimans 2022); rescale > 0 pulls the result's per-sample std toward
    cond's (Lin et al. 2024, sec. 3.4; diffusers' guidance_rescale)."""
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = list(range(1, cond.ndim))
        fixed = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * fixed + (1 - rescale) * guided
    return guided


__all__ = [
    "DPMState", "METHODS", "NoiseSchedule", "PLMSState", "Plan", "add_noise", "alphas_cumprod", "betas",
    "classifier_free_guidance",
    "ddim_step", "ddpm_step", "dpm_solver_step", "euler_ancestral_step", "euler_step", "flow_match_step",
    "from_diffusers", "make_plan", "plms_step", "step",
]
