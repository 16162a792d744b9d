from pathlib import Path

from setuptools import find_packages, setup

# scipy: .mat files (every published cross-modal set ships them); h5py: MATLAB v7.3 / HDF5
# files (DCMH's IAll, GCH's FLICKR-25K.mat); tqdm: progress bars; xxhash: the index's checksums
# (XXH3 checks a chunk at memory speed, zlib's CRC32 at ~3 GB/s). torch is pinned to the
# release whose CPU wheel the project's machines carry (an unpinned torch pulls CUDA).
# swagger-ui-bundle-v2: Swagger UI's files as a package (kept by the connexion maintainers), so
# /docs works without internet. jsonschema (dev): the tests check real replies against /openapi.json.
SERVE = ["fastapi>=0.110", "uvicorn[standard]>=0.29", "prometheus_client>=0.20", "swagger-ui-bundle-v2>=5.17"]

setup(
    name="hashret",
    version="0.1.0",
    description="Cross-modal (image <-> text) hashing search: GCH, distilled matcher hash heads, "
                "an LMDB code store and a Numba Hamming scan",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hashret", "hashret.*"]),
    package_data={"hashret.data": ["packaged/wikipedia/*", "packaged/mirflickr25k/*.txt",
                                   "packaged/mirflickr25k/*.md", "packaged/mirflickr25k/split/*/*"],
                  "hashret.serve": ["search.html"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.24",
        "numba>=0.60",
        "bitarray>=2.8",
        "lmdb>=1.4",
        "click>=8.1",
        "scipy>=1.10",
        "h5py>=3.8",
        "tqdm>=4.60",
        "xxhash>=3.0",
    ],
    # serve: FastAPI + uvicorn are the convention of Python model serving (uvicorn[standard]
    # brings uvloop and httptools, its fast event loop and HTTP parser); prometheus_client
    # writes the /metrics text format that monitoring systems scrape.
    extras_require={
        "plots": ["matplotlib>=3.7"],
        "serve": SERVE,
        # ray: actors that hold state, pure Python, pip-installable, one laptop to a cluster --
        # the sharded index's engine across machines, instead of a home-made RPC layer
        "distributed": ["ray>=2.9"],
        "dev": ["pytest>=7", "import-linter>=2.1", "jsonschema>=4.18", "matplotlib>=3.7", "faiss-cpu>=1.8", *SERVE, "ray>=2.9"],
    },
    entry_points={"console_scripts": ["hashret=hashret.cli:main"]},
)
