"""Execution settings chosen from the hardware, the stage-2 learning-rate schedules, and bf16 against fp32."""

from __future__ import annotations

import math

import pytest
import torch

from her2_monai import runtime
from her2_monai.engines.schedules import WarmupCosine, classifier_lr_scheduler


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has the given bf16 hardware flag (or none) for one test."""

    def _set(flag: str | None) -> runtime.ExecutionSettings:
        monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: flag)
        runtime._settings.cache_clear()
        return runtime.execution_settings("cpu")

    yield _set
    runtime._settings.cache_clear()


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_bf16_hardware_gets_bf16_and_channels_last_everywhere(cpu_with, flag):
    settings = cpu_with(flag)
    assert settings.amp is True
    assert runtime.default_channels_last("cpu") is True
    assert runtime.default_channels_last("cpu", training=True) is True
    assert flag in settings.reason


def test_cpu_without_bf16_gets_fp32_channels_last_for_inference_only(cpu_with):
    settings = cpu_with(None)
    assert settings.amp is False and runtime.default_amp("cpu") is False
    # measured on an AVX2-only EPYC: channels-last speeds up inference, slows down the training steps
    assert runtime.default_channels_last("cpu") is True
    assert runtime.default_channels_last("cpu", training=True) is False
    assert "float32" in settings.reason


@pytest.mark.parametrize("flag", [None, "avx512_bf16", "amx_bf16"])
def test_precision_can_be_forced_whatever_the_hardware(cpu_with, monkeypatch, flag):
    monkeypatch.setenv(runtime.PRECISION_ENV, "bf16")
    forced = cpu_with(flag)
    assert forced.amp is True and forced.memory_format_for(True) and "HER2_CPU_PRECISION=bf16" in forced.reason
    monkeypatch.setenv(runtime.PRECISION_ENV, "fp32")
    pinned = runtime.execution_settings("cpu")  # the variable is read on every call; no cache to clear
    assert pinned.amp is False and runtime.default_amp("cpu") is False
    assert runtime.default_channels_last("cpu", training=True) is False
    monkeypatch.setenv(runtime.PRECISION_ENV, "auto")
    assert runtime.execution_settings("cpu").amp is (flag is not None)
    monkeypatch.setenv(runtime.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="HER2_CPU_PRECISION='fp16' is not one of auto, bf16, fp32"):
        runtime.execution_settings("cpu")
    assert runtime.execution_settings("cuda").amp is True  # the variable is about the CPU only


def test_cuda_gets_amp_and_channels_last():
    runtime._settings.cache_clear()
    settings = runtime.execution_settings(torch.device("cuda", 0))  # decided from the device type alone
    assert settings.amp is True and settings.memory_format_for(True) and settings.memory_format_for(False)
    runtime._settings.cache_clear()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse2 avx2 fma", None),  # the AMD EPYC of docs/performance.md
        ("fpu avx2 avx512f avx512_bf16", "avx512_bf16"),
        ("fpu avx512_bf16 amx_tile amx_bf16 amx_int8", "amx_bf16"),
    ],
)
def test_bf16_flag_read_from_cpuinfo(flags, expected):
    text = f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\nbugs\t\t: amx_bf16\n\nprocessor\t: 1\n"
    assert runtime.bf16_flag_in(text) == expected
    assert runtime.bf16_flag_in("processor : 0\n") is None  # no flags line


def test_warmup_cosine_shape():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10, final_factor=0.01)
    factors = [schedule(step) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # warm-up rises
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then only falls
    assert factors[-1] == pytest.approx(0.01)
    assert factors[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


@pytest.mark.parametrize(
    "args, match",
    [((0, 0), "total_steps"), ((10, 10), "warmup_steps"), ((10, -1), "warmup_steps"), ((10, 0, 1.5), "final_factor")],
)
def test_warmup_cosine_rejects_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(*args)


def test_cosine_classifier_schedule_reaches_near_zero_at_the_last_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = classifier_lr_scheduler(optimizer, "cosine", epochs=3, steps_per_epoch=5)
    rates = []
    for _ in range(15):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[5] == pytest.approx(1e-3)  # one epoch of warm-up
    assert rates[-1] == pytest.approx(1e-5)
    assert max(rates) == pytest.approx(1e-3)


def test_plateau_schedule_and_bad_name():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    assert isinstance(classifier_lr_scheduler(optimizer, "plateau", 3, 5), torch.optim.lr_scheduler.ReduceLROnPlateau)
    with pytest.raises(ValueError, match="lr_schedule"):
        classifier_lr_scheduler(optimizer, "step", 3, 5)
    with pytest.raises(ValueError, match="at least one step"):
        classifier_lr_scheduler(optimizer, "cosine", 3, 0)


#: bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); through the encoders, the attention and the head the
#: logits of the small network below drift by well under this share of their range.
BF16_LOGIT_TOLERANCE = 0.05


def test_bf16_autocast_logits_stay_close_to_fp32():
    from her2_monai.networks import CrossModalGAN, HER2FlexibleNet
    from her2_monai.stain_batch import autocast

    torch.manual_seed(0)
    net = HER2FlexibleNet(
        shared_backbone="resnet18", specific_backbone="resnet10", cmgan=CrossModalGAN(ngf=8, n_blocks=1),
        attention_channels=64, fusion_channels=128,
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    n = 12
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).repeat(n // 3, 1)
    he = (torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1) * mask[:, :1, None, None]
    ihc = (torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1) * mask[:, 1:, None, None]
    with torch.no_grad():
        fp32 = net(he, ihc, mask)["logits"].float()
        with autocast("cpu", True):
            bf16 = net(he, ihc, mask)["logits"].float()
    assert torch.isfinite(bf16).all()
    scale = max(1.0, float(fp32.abs().max()))
    assert float((bf16 - fp32).abs().max()) <= BF16_LOGIT_TOLERANCE * scale
    # wherever fp32 has a clear winner, bf16 picks the same class
    top2 = fp32.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_TOLERANCE * scale
    assert torch.equal(bf16.argmax(1)[clear], fp32.argmax(1)[clear])
