from setuptools import find_packages, setup

setup(
    name="epmq",
    version="0.1.0",
    description="Merge fine-tuned experts and quantize the merged model to low bit (E-PMQ), "
    "with Triton kernels for the GPTQ solver and packed int4 inference.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The floors are versions the test suite has passed with (2026-12-06): Python 3.11 and 3.12;
    # torch 2.14 with transformers 5.25 (CI); torch 2.11, Triton 3.6 and Python 3.12 (the GPU
    # card's image) with transformers 5.24 failed 9 tests, every one passing with 5.25 (families
    # 5.24 lacks; pinned hub revisions offline with huggingface_hub 1.x). Older transformers lose
    # features: 4.57 fails 63 of 593 walker, checkpoint and merge tests (CLIP vision naming, tied
    # heads, MoE families), 5.0 43 of 396. transformers 5.21 and later need Python 3.11; open_clip
    # 3.3 is the one tested. (Triton 3.6's interpreter, the CPU tests' path, needs numpy < 2.4.)
    python_requires=">=3.11",
    # the example configs (configs/, which `epmq --help` and the README name) go into the
    # installed package as epmq/configs: without them a pip-installed epmq pointed its users at
    # files it did not have
    packages=find_packages(include=["epmq", "epmq.*", "epmq_kernels", "epmq_kernels.*"]) + ["epmq.configs"],
    package_dir={"epmq.configs": "configs"},
    package_data={"epmq.configs": ["*.yaml", "files/*.yaml"]},
    # the command's entry point, which imports the package itself (Ctrl-C during that import)
    py_modules=["epmq_cli"],
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "transformers>=5.25",
        "open_clip_torch>=3.3",
        "safetensors",
        "tqdm",
        "pyyaml",
        "scikit-learn",
        "matplotlib",
        "pillow",  # calibration images
        "scipy",  # calibration audio (WAV files, resampling)
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "peft>=0.21", "pyarrow", "soundfile"],
                    "parquet": ["pyarrow"], "audio": ["soundfile"]},
    entry_points={"console_scripts": ["epmq=epmq_cli:main"]},
)
