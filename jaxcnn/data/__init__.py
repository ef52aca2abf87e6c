"""Datasets and input pipelines: offline-first resolution, device-resident and streaming pipelines.

`from_arrays` wraps in-memory arrays; `make_pipeline` resolves a named dataset (raw IDX dir -> the
project's own tfds builder -> tfds catalog) or an image folder. Augmentation runs on device.
"""
from __future__ import annotations

from jaxcnn.data.augment import AugmentConfig, augment_batch, compute_stats
from jaxcnn.data.folder import ImageFolder, image_folder
from jaxcnn.data.pipeline import (PREPROCESSING_FORMAT, ArraySource, InputPipeline, ResidentPipeline,
                                  StreamingPipeline, check_preprocessing, from_arrays, preprocess)
from jaxcnn.data.datasets import Resolved, load_arrays, make_pipeline, resolve, split_validation

__all__ = [
    "AugmentConfig", "augment_batch", "compute_stats",
    "ArraySource", "InputPipeline", "PREPROCESSING_FORMAT", "ResidentPipeline", "StreamingPipeline",
    "check_preprocessing", "from_arrays", "preprocess",
    "ImageFolder", "image_folder",
    "Resolved", "load_arrays", "make_pipeline", "resolve", "split_validation",
]
