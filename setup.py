"""ptl_torchreid: Progressive Transfer Learning and COP pruning for torchreid."""
import os.path as osp

from setuptools import find_packages, setup


def read_version():
    path = osp.join(osp.dirname(__file__), "ptl_torchreid", "__init__.py")
    with open(path) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in " + path)


EXPORT_REQUIRES = ["onnx", "onnxscript", "onnxruntime", "openvino", "nncf"]
RETRIEVAL_REQUIRES = ["faiss-cpu"]
BENCH_REQUIRES = ["torch-pruning"]

setup(
    name="ptl_torchreid",
    version=read_version(),
    description="Progressive Transfer Learning (BConv-Cells) and COP filter pruning for torchreid",
    long_description=open(osp.join(osp.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ptl_torchreid", "ptl_torchreid.*"]),
    python_requires=">=3.9",
    # torch and torchvision are resolved together from the registry (see README).
    install_requires=[
        "torch",
        "torchvision",
        "torchreid==0.2.5",
        "gdown",  # gdown and scipy are imported by torchreid 0.2.5 but not declared by it
        "scipy",
        "h5py",  # h5py and imageio: torchreid needs them to prepare CUHK03 from its .mat file
        "imageio",
        "numpy",
        "opencv-python-headless",
        "yacs",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    # The export (ONNX / OpenVINO / NNCF INT8) and retrieval (faiss's exact search) extras are part of the test
    # extra, so CI runs their tests; ruff is the linter CI runs before them (configured in ruff.toml).
    # bench: the peers tools/benchmark_prune.py compares COP against (Torch-Pruning's L1, Taylor and random), part
    # of the test extra too, so CI runs the benchmark's peer rows.
    extras_require={"export": EXPORT_REQUIRES, "retrieval": RETRIEVAL_REQUIRES, "bench": BENCH_REQUIRES,
                    "test": ["pytest", "hypothesis", "ruff"] + EXPORT_REQUIRES + RETRIEVAL_REQUIRES + BENCH_REQUIRES},
    entry_points={"console_scripts": ["ptl-torchreid=ptl_torchreid.cli:main"]},
)
