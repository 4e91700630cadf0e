"""nnunet-ssp: self-supervised pretraining for nnU-Net v2 2D cardiac cine segmentation."""

from setuptools import find_packages, setup

setup(
    name="nnunet-ssp",
    version="0.1.0",
    description="Self-supervised pretraining (SimCLR, PCL, DINO, MIM) for nnU-Net v2 2D CMR cine segmentation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["nnunet_ssp", "nnunet_ssp.*", "pretraining", "pretraining.*", "trainers", "trainers.*"]
    ),
    package_data={"trainers": ["nnunet_ext/*.py"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1.2",
        "batchgeneratorsv2>=0.3.2",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "PyYAML>=5.4",
        "nibabel>=5",  # already required by nnunetv2; read directly to check NIfTI files before SimpleITK
    ],
    extras_require={"test": ["pytest>=7", "import-linter>=2.6", "ruff>=0.6"]},  # import-linter 2.6: acyclic_siblings
    entry_points={
        "console_scripts": [
            "nnunet_ssp=nnunet_ssp.cli:main",
            "ssp_pretrain=pretraining.cli:main",
        ]
    },
)
