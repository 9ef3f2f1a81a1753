"""Packaging for geventpool; tool settings live in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="geventpool",
    version="0.1.0",  # also geventpool.__version__
    description="Client-side high availability for Thrift services on gevent: "
    "ZooKeeper discovery, a bounded connection pool, failover and alerting.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["geventpool", "geventpool.*"]),
    package_data={"geventpool.testing": ["*.thrift"], "geventpool": ["py.typed"]},
    install_requires=[
        "gevent>=24.2",
        "kazoo>=2.10,<3",
        "thriftpy2>=0.5,<0.8",
        "structlog>=24.1",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100",
            "aiosmtpd>=1.4",
            "trustme>=1.1",
            "mypy>=1.10",
            "ruff>=0.5",
        ],
        "load": ["locust>=2.30"],
        "bench": ["thrift-connector>=0.24", "matplotlib>=3.8"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: gevent",
        "Typing :: Typed",
    ],
)
