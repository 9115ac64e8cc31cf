"""The GPU default candidate set: what has won on GPUs, and what is installed to try."""

from __future__ import annotations

import importlib.util

from aitune.defaults import BASELINE, CandidateDef, torchao_installed

#: where torchao is installed: int8 (weight-only, and dynamic activations) and float8 dynamic, all
#: in bfloat16 (torchao's usual GPU precision) and compiled. float8 needs compute capability 8.9
#: or newer; this set doesn't know the device, so on an older GPU the backend reports it unsupported.
GPU_TORCHAO: tuple[CandidateDef, ...] = (
    ("TorchAOBackend", {"scheme": "int8_dynamic", "precision": "bfloat16"}),
    ("TorchAOBackend", {"scheme": "int8_weight_only", "precision": "bfloat16"}),
    ("TorchAOBackend", {"scheme": "float8_dynamic", "precision": "bfloat16"}),
)


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def tensorrt_major() -> int | None:
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return int(metadata.version(dist).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def onnxruntime_cuda_installed() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_candidates(include_max_autotune: bool = False) -> list[CandidateDef]:
    """Eager in three precisions, CUDA graphs, torch.compile, AOTInductor, and TensorRT / ONNX
    Runtime on CUDA / TorchAO (``GPU_TORCHAO``) where installed. ``max-autotune`` builds slowly: it is opt-in."""
    fp16 = {"precision": "float16"}
    candidates: list[CandidateDef] = [
        BASELINE,
        ("TorchEagerBackend", dict(fp16)),
        ("TorchEagerBackend", {"precision": "bfloat16"}),
        ("CudaGraphBackend", dict(fp16)),
        ("TorchInductorJitBackend", dict(fp16)),
        ("TorchInductorJitBackend", {"mode": "reduce-overhead", **fp16}),
        ("TorchInductorAotBackend", dict(fp16)),
        ("TorchInductorAotBackend", {"cuda_graphs": True, **fp16}),
    ]
    if include_max_autotune:
        candidates.append(("TorchInductorJitBackend", {"mode": "max-autotune", **fp16}))
    if tensorrt_installed():
        # TensorRT 11 dropped the FP16 builder flag (weak typing): there a plain fp32 ONNX model
        # builds as fp32, with TF32 off: it is judged with the fp32 tolerance, which TF32's
        # 10-bit mantissa would fail on any deep model.
        major = tensorrt_major()
        candidates.append(("TensorRTBackend", dict(fp16) if major is None or major < 11 else {"precision": "float32", "tf32": False}))
    if onnxruntime_cuda_installed():
        candidates.append(("OnnxRuntimeBackend", {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}))
    if torchao_installed():
        candidates.extend((name, dict(fields)) for name, fields in GPU_TORCHAO)
    return candidates
