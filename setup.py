import sys

from setuptools import find_packages, setup

setup(
    name="fairseq_adaptive_moe",
    version="0.1.0",
    description="Adaptive-gating mixture-of-experts for fairseq (Li et al., EMNLP 2023)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_adaptive_moe", "fairseq_adaptive_moe.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
        'fairseq==0.12.2; python_version < "3.11"',
        "fairscale==0.4.13",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.99",
        "rouge-score>=0.1.2",
        "matplotlib>=3.5",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3"]},
    entry_points={
        "console_scripts": [
            "adaptive-moe-bench = fairseq_adaptive_moe.cli.bench:main",
            "adaptive-moe-routing = fairseq_adaptive_moe.cli.routing:main",
            "adaptive-moe-upcycle = fairseq_adaptive_moe.cli.upcycle:main",
            "adaptive-moe-consolidate = fairseq_adaptive_moe.cli.consolidate:main",
        ],
    },
)
