"""The engine on a CUDA device: every mode, named references and generation (KV cache,
batched sweep) give what they give on the CPU; mixture-of-experts routing, half precision and
TF32 keep relevance conserved and bounded on the device.

Skipped without a CUDA device, so CI (no GPU) skips them; they run on a lent GPU machine
(bench/README.md, "On a GPU")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from engine import DLBacktrace
from engine.generation import run_generation
from engine.rules import MODES

from .lm_models import conserved_and_paths_agree, prompts, tiny_lm
from .zoo import ZOO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW = 4


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """cuDNN convolutions round their inputs to TF32 by default (10-bit mantissa); without it
    the comparison with the CPU is float32 against float32."""
    with _tf32(False):
        yield


def _close(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = 1e-3) -> None:
    """Relative to the largest value: GPU kernels sum in another order."""
    assert gpu.device.type == "cuda"
    scale = float(cpu.abs().max()) or 1.0
    assert float((gpu.cpu() - cpu).abs().max()) <= rtol * scale


def _conserved(result: dict, atol: float = 1e-2) -> None:
    c = result["conservation"]
    assert abs(c["inputs"] + c["sinks"] - c["seed"]).max() < atol


# The random mobilenet_v2 barely responds to its input: mode reference sinks nearly all of the
# seed and contrast's signed shares cancel to 1e-12, so comparing them would test rounding.
CASES = [(m, mode) for m in ("resnet18", "bert", "distilbert") for mode in MODES]


def test_a_model_on_the_device_is_explained_there() -> None:
    """Without ``device``, where the model's weights are (it was moved to the CPU)."""
    model, inputs = ZOO["resnet18"]()
    dlb = DLBacktrace(model.cuda(), inputs)
    assert dlb.device.type == "cuda" and next(model.parameters()).is_cuda
    result = dlb.run_task(inputs=inputs, relevance_nodes="inputs")
    assert all(v.device.type == "cuda" for v in result["relevance"].values())
    _conserved(result)


@pytest.mark.parametrize("name,mode", CASES + [("mobilenet_v2", "default")])
def test_every_mode_matches_the_cpu(name: str, mode: str, no_tf32) -> None:
    model, inputs = ZOO[name]()
    kw = {"relevance_nodes": "inputs", "mode": mode}
    cpu = DLBacktrace(model, inputs).run_task(inputs=inputs, **kw)
    gpu = DLBacktrace(model, inputs, device="cuda").run_task(inputs=inputs, **kw)
    for key, value in cpu["relevance"].items():
        _close(gpu["relevance"][key], value)
    _conserved(gpu)


@pytest.mark.parametrize("reference", ["blur", "mean"])
def test_named_image_references_on_the_device(reference: str, no_tf32) -> None:
    model, inputs = ZOO["resnet18"]()
    kw = {"relevance_nodes": "inputs", "mode": "reference", "reference": reference}
    cpu = DLBacktrace(model, inputs).run_task(inputs=inputs, **kw)
    gpu = DLBacktrace(model, inputs, device="cuda").run_task(inputs=inputs, **kw)
    key = next(iter(cpu["relevance"]))
    _close(gpu["relevance"][key], cpu["relevance"][key])


def test_reference_mode_with_tf32_stays_bounded() -> None:
    """With TF32 on (cuDNN's default), the forward's rounding is as large as a blurred
    reference's small changes. Relevance stays close to the CPU's and nearly conserved; it
    used to reach 1e5 times the CPU's largest value (``Ctx.per_change``)."""
    model, inputs = ZOO["resnet18"]()
    kw = {"relevance_nodes": "inputs", "mode": "reference", "reference": "blur"}
    cpu = DLBacktrace(model, inputs).run_task(inputs=inputs, **kw)["relevance"]["x"]
    with _tf32(True):
        gpu = DLBacktrace(model, inputs, device="cuda").run_task(inputs=inputs, **kw)
    rel = gpu["relevance"]["x"].cpu()
    cosine = torch.nn.functional.cosine_similarity(rel.flatten(1), cpu.flatten(1))
    assert (cosine > 0.98).all(), cosine
    assert float(rel.abs().max()) < 2 * float(cpu.abs().max())
    _conserved(gpu, atol=2.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_matches_the_cpu(family: str, no_tf32) -> None:
    """Greedy decoding with the KV cache emits the CPU's tokens, and the batched sweep's
    relevance per step equals the CPU's and the stepwise path's on the device."""
    model, batch = tiny_lm(family, sharpen=5.0), prompts(3, 7, seed=1, pads=(0, 2, 4))
    kw = {"max_new_tokens": NEW, "return_relevance": True}
    cpu = run_generation(DLBacktrace(model, batch), batch, **kw)
    dlb = DLBacktrace(model, batch, device="cuda")
    gpu = run_generation(dlb, batch, **kw)
    stepwise = run_generation(dlb, batch, path="stepwise", **kw)
    assert torch.equal(gpu["generated_ids"].cpu(), cpu["generated_ids"])
    for i in range(NEW):
        got = gpu["relevance_trace"][i]["input_ids"]
        _close(got, cpu["relevance_trace"][i]["input_ids"])
        _close(got, stepwise["relevance_trace"][i]["input_ids"].cpu(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_mixture_of_experts_on_the_device(mode: str, no_tf32) -> None:
    model, batch = tiny_lm("mixtral"), prompts(2, 6, seed=4, pads=(0, 2))
    dlb = DLBacktrace(model, batch, device="cuda")
    conserved_and_paths_agree(dlb, batch, 1e-3, mode=mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_device(dtype: torch.dtype) -> None:
    """A half-precision model on the GPU (the service's dtype setting): the sweep runs in
    float32, conserves, and agrees with the float32 model to half precision's accuracy."""
    model, inputs = ZOO["resnet18"]()
    key = next(iter(inputs))
    full = DLBacktrace(model, inputs, device="cuda").run_task(
        inputs=inputs, relevance_nodes="inputs"
    )
    half_inputs = {k: v.to(dtype) for k, v in inputs.items()}
    half = DLBacktrace(model.to(dtype), half_inputs, device="cuda").run_task(
        inputs=half_inputs, relevance_nodes="inputs"
    )
    assert half["relevance"][key].dtype == torch.float32
    _conserved(half)
    a, b = half["relevance"][key].flatten(1), full["relevance"][key].flatten(1)
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.95
