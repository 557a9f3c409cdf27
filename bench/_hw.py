"""What a benchmark ran on, printed above its table: CPU, the ISA flags vLLM's CPU kernels depend
on, cores, load average (before and after), vLLM's version and thread binding, dtype.

    from _hw import hardware_lines            # bench scripts run as `python bench/x.py`
    print("\\n".join(hardware_lines(dtype="float32", load_before=os.getloadavg())))

Or `python bench/_hw.py [--vllm-python PATH]` on its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path

# AVX-512 (vLLM's _C_AVX512 kernels; _C with avx512_bf16), AMX (bf16 tiles); else _C_AVX2
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
VLLM_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD",
            "OMP_NUM_THREADS")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = Path(os.environ.get("CKPT_WATCH_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")


def cpu_info() -> tuple[str, set[str]]:
    """CPU model name and flags from /proc/cpuinfo (platform.processor() off Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("unknown", platform.processor()):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def vllm_version(python: Path | None = DEFAULT_VLLM_PYTHON) -> str:
    if python is None or not Path(python).exists():
        return "not installed"
    code = "import vllm; print(vllm.__version__)"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def hardware_lines(*, dtype: str = "float32", load_before: tuple[float, float, float] | None = None,
                   vllm_python: Path | None = DEFAULT_VLLM_PYTHON, server_env: dict[str, str] | None = None,
                   binding: str | None = None) -> list[str]:
    """The lines to print with a table. `server_env`: what the vLLM server got on top of ours;
    `binding`: vLLM's own account of its OpenMP binding (from its log), if known."""
    model, flags = cpu_info()
    isa = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ISA_FLAGS)
    env = {**{k: os.environ[k] for k in VLLM_ENV if k in os.environ}, **(server_env or {})}
    env_text = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none set"
    now = os.getloadavg()
    lines = [
        f"cpu: {model}; {os.cpu_count()} logical cores; {platform.machine()}",
        f"isa: {isa}",
        f"vllm: {vllm_version(vllm_python)}; dtype {dtype}; binding env: {env_text} "
        "(unset: VLLM_CPU_OMP_THREADS_BIND=auto, one core reserved for the engine's scheduler)",
    ]
    if binding:
        lines.append(f"vllm binding (its log): {binding}")
    load = f"load average before {fmt_load(load_before)}, after {fmt_load(now)}" if load_before else (
        f"load average {fmt_load(now)}")
    lines.append(load)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print("\n".join(hardware_lines(dtype=args.dtype, vllm_python=args.vllm_python)))


if __name__ == "__main__":
    main()
