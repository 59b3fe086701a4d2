"""lora_ops is pure Python: its Triton kernels compile at run time, so there is no C++ build."""

from setuptools import find_packages, setup

setup(
    name="lora_ops",
    version="0.1.0",
    description="Multi-LoRA batch ops for PyTorch: torch.ops.lora.*, compilable and CUDA-graph safe",
    packages=find_packages(include=["lora_ops", "lora_ops.*", "csrc_triton", "csrc_triton.*"]),
    python_requires=">=3.11",
    # Pinning no torch build here: the set-up commands install the CPU wheel first, and a GPU
    # machine keeps the CUDA build it has.
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        # numpy: Triton's CPU interpreter needs it
        "test": ["triton>=3.6", "numpy", "pytest", "hypothesis", "peft", "transformers", "safetensors"],
        "bench": ["triton>=3.6", "numpy", "matplotlib"],
    },
)
