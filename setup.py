from setuptools import find_packages, setup

setup(
    name="epmq",
    version="0.1.0",
    description="Merge fine-tuned experts and quantize the merged model to low bit (E-PMQ), "
    "with Triton kernels for the GPTQ solver and packed int4 inference.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the example configs (configs/, which `epmq --help` and the README name) go into the
    # installed package as epmq/configs: without them a pip-installed epmq pointed its users at
    # files it did not have
    packages=find_packages(include=["epmq", "epmq.*", "epmq_kernels", "epmq_kernels.*"]) + ["epmq.configs"],
    package_dir={"epmq.configs": "configs"},
    package_data={"epmq.configs": ["*.yaml", "files/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "transformers>=4.40",
        "open_clip_torch>=2.24",
        "safetensors",
        "tqdm",
        "pyyaml",
        "scikit-learn",
        "matplotlib",
        "pillow",  # calibration images
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "peft>=0.21", "pyarrow"],
                    "parquet": ["pyarrow"]},
    entry_points={"console_scripts": ["epmq=epmq.cli:main"]},
)
