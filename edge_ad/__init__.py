"""edge-ad: visual defect inspection for factory lines (D3AD, Ray, MLflow, Kafka)."""

__version__ = "0.1.0"
