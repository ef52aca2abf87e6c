"""Looking inside models: `summary` (a Keras-style table of layers, output shapes and parameters)."""
from jaxcnn.inspect.summary import ModelSummary, SummaryRow, summary

__all__ = ["ModelSummary", "SummaryRow", "summary"]
