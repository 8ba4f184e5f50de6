from setuptools import find_packages, setup


def requirements(path):
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f
                if line.split("#")[0].strip() and not line.startswith("-r")]


setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 inference: Meta's reference API and checkpoint format, on CPU or GPU, "
                "any shard count on any number of processes",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["demo_model/*", "server/static/*", "kernels/*.cpp", "kernels/*.h"]},
    python_requires=">=3.9",
    install_requires=requirements("requirements.txt"),
    extras_require={"dev": requirements("requirements-dev.txt"),
                    "hf": ["transformers"],
                    "server": ["fastapi", "uvicorn>=0.30"]},
    entry_points={"console_scripts": ["llama-reshard=llama.checkpoints.reshard:main",
                                      "llama-convert=llama.hf.convert:main",
                                      "llama-quantize=llama.quantize.cli:main",
                                      "llama-server=llama.server.app:main"]},
)
