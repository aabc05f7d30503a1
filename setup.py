"""Installs the five packages of the real-time patch defense: realtime, kernels, engines, calibration, benchmarks,
and console scripts for the main commands (``zmask-run``, ``zmask-calibrate``, ...).

CPU installs use requirements/cpu.txt (exact torch pin: see README). GPU-only extras are optional and
imported lazily, never required on a CPU machine.
"""
from setuptools import find_packages, setup

setup(
    name="zmask-realtime",
    version="0.1.0",
    description="Real-time defense against physical adversarial patches (Z-Mask) for camera perception",
    python_requires=">=3.10",
    packages=find_packages(include=["realtime", "realtime.*", "kernels", "kernels.*", "engines", "engines.*",
                                    "calibration", "calibration.*", "benchmarks", "benchmarks.*"]),
    package_data={"realtime.models": ["weights/*.pt", "weights/*.json"], "kernels": ["*.cu", "*.cpp", "*.c"],
                  "realtime.defenses": ["weights/*.pt", "weights/*.json"],
                  "calibration": ["shipped/*"],
                  "realtime.attacks": ["library/*.png", "library/*.json"],   # the demo's patch
                  "realtime.live.sources": ["assets/demo_0016E5/*"]},        # the embedded demo clip
    install_requires=[
        # torch is deliberately left unpinned here so GPU users keep their CUDA build; CPU machines
        # install requirements/cpu.txt first (torch==2.13.0 CPU wheel), which satisfies this.
        "torch>=2.4", "torchvision>=0.19", "numpy>=1.26", "pillow>=10", "opencv-python-headless>=4.10",
        "av>=12", "tqdm>=4.66", "matplotlib>=3.8", "safetensors>=0.4", "scikit-learn>=1.4",
        "pycocotools>=2.0.7",
    ],
    # The main commands, also reachable as ``python -m <module>`` (the README uses that form).
    entry_points={"console_scripts": [
        "zmask-run = realtime.run:main",
        "zmask-demo-overlay = realtime.demo:main",
        "zmask-train = realtime.train:main",
        "zmask-train-detection = realtime.train_detection:main",
        "zmask-calibrate = calibration.fit:main",
        "zmask-evaluate = calibration.evaluate:main",
        "zmask-train-patchzero = calibration.patchzero_train:main",
        "zmask-craft = realtime.attacks.craft:main",
        "zmask-craft-detection = realtime.attacks.craft_detection:main",
        "zmask-accuracy = benchmarks.accuracy:main",
        "zmask-robustness = benchmarks.robustness:main",
        "zmask-latency = benchmarks.latency:main",
    ]},
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        "gpu": ["cupy-cuda13x"],
        "tensorrt": ["tensorrt", "torch-tensorrt"],
        "pycuda": ["pycuda"],
        "test": ["pytest>=8"],
    },
)
