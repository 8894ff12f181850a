from pathlib import Path

from setuptools import find_packages, setup

# kernels/ and benchmarks/ install under the package (autoglm_fast.kernels, autoglm_fast.benchmarks):
# a top-level `kernels` would shadow an unrelated PyPI package of that name which transformers probes for.
# checkpoints/ (the trained nano model, data files only) installs as autoglm_fast.checkpoints.
SUBDIRS = {"autoglm_fast.kernels": "kernels", "autoglm_fast.benchmarks": "benchmarks",
           "autoglm_fast.checkpoints": "checkpoints"}
packages = find_packages(include=["autoglm_fast", "autoglm_fast.*"])
for name, folder in SUBDIRS.items():
    packages += [name] + [f"{name}.{p}" for p in find_packages(folder)]

serve = ["fastapi>=0.110", "uvicorn>=0.29", "pillow>=10", "tokenizers>=0.19", "tqdm"]
bench = ["matplotlib>=3.7"]  # `autoglm-fast bench --plot`
# The server's tests start it for real and the benchmark tests draw the plots: test includes both extras.
test = serve + bench + ["pytest>=8", "pytest-benchmark>=4", "transformers>=4.46", "httpx", "openai", "langchain-openai"]

setup(
    name="autoglm-fast",
    version="0.1.0",
    description="Triton kernels and an inference engine for the AutoGLM-Phone-9B multimodal model",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=SUBDIRS,
    package_data={"autoglm_fast.checkpoints": ["*/*"], "autoglm_fast.kernels": ["tuned/*.json"]},
    install_requires=["torch>=2.4", "triton>=3.6", "numpy", "safetensors>=0.4"],
    extras_require={"serve": serve, "bench": bench, "test": test, "dev": sorted(set(serve + test))},
    entry_points={"console_scripts": ["autoglm-fast=autoglm_fast.cli:main"]},
)
