"""Which floating-point precision training and the local engine compute in: fp32 or bf16.

A recipe says `finetune.precision` and `serve.precision`: fp32, bf16, or auto. Where a GPU is
present auto means bf16 (Axolotl's `bf16: auto`; CUDA GPUs since Ampere compute it natively).
On a CPU, auto means fp32 unless BF16_ON_NATIVE_CPU says otherwise: bf16 is only faster where
the CPU has bf16 matrix instructions (AVX-512 BF16, AMX) and is emulated, slower, elsewhere;
what it does to speed and accuracy is measured in docs/performance.md ("bf16 on CPU").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")

# CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix products.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# Whether auto picks bf16 on a CPU that has native bf16: only if it is faster there and the
# scores hold within noise (docs/performance.md, "bf16 on CPU"). Measured on Intel AMX: bf16
# training is 1.45x faster per step but its Iris fine-tune lost 5.4 test points (interval
# excluding 0); the batch-invariant bf16 engine is 0.5-0.75x fp32's speed on Iris and 1.2-1.3x
# on Banking77, where val fell a row. fp32 also keeps
# results equal across CPUs. A user who wants the training speed writes `precision: bf16`.
BF16_ON_NATIVE_CPU = False


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve(choice: str, cuda: bool, flags: set[str] | None = None) -> Precision:
    """The precision a recipe's `precision: <choice>` means on this machine."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision {choice!r}: write one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice  # type: ignore[return-value]
    if cuda:
        return "bf16"
    return "bf16" if BF16_ON_NATIVE_CPU and native_bf16_cpu(flags) else "fp32"


def torch_dtype(precision: Precision):  # -> torch.dtype (torch imported only here)
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def for_local_engine(choice: str) -> Precision:
    """serve.precision as copa's in-process engine resolves it (on the GPU where there is one)."""
    import torch

    return resolve(choice, torch.cuda.is_available())


def key_part(choice: str) -> list[str]:
    """What a stage key adds for serve.precision: nothing for fp32 (runs made before precision
    was a setting computed in fp32 and keep their keys), the resolved precision otherwise."""
    resolved = for_local_engine(choice)
    return [] if resolved == "fp32" else [f"precision={resolved}"]
