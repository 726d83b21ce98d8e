"""sparselab: prune LLMs, recover them, evaluate them, and compare the runs in MLflow."""
from sparselab.models import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
