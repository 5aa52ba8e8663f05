"""lmpipe: a reproducible language-model pipeline on DVC, MLflow and Prefect."""

__version__ = "0.1.0"
