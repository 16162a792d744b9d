import sys
from pathlib import Path

# the benchmarks are scripts beside the package, not part of it
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
