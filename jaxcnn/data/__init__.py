"""Datasets and input pipelines: offline-first resolution, device-resident and streaming pipelines.

`from_arrays` wraps in-memory arrays; `make_pipeline` resolves a named dataset (raw files -> the
project's own tfds builder -> tfds catalog) or an image folder. Augmentation runs on device.

Each named dataset is one `DatasetSpec` in `specs.REGISTRY` (`specs.names()`: mnist, fashion_mnist,
cifar10): name and aliases, raw format (`idx.IDX` or `idx.CIFAR_BINARY`) and file names, image shape,
class names, expected counts and decompressed SHA-256s, the folders to look in (under `data_dir` /
$JAXCNN_DATA_DIR and /usr/share/datasets) and the archive's top folder, the tfds catalog name, and the
files the "not found" message asks for. Resolution reads only the spec, so adding a dataset is one
`specs.register(DatasetSpec(...))`; an unregistered name is read as an MNIST-like IDX dataset.
"""
from __future__ import annotations

from jaxcnn.data.augment import AugmentConfig, augment_batch, compute_stats
from jaxcnn.data.folder import ImageFolder, image_folder
from jaxcnn.data.pipeline import (PREPROCESSING_FORMAT, ArraySource, InputPipeline, ResidentPipeline,
                                  StreamingPipeline, check_preprocessing, from_arrays, preprocess)
from jaxcnn.data.datasets import Resolved, load_arrays, make_pipeline, resolve, split_validation
from jaxcnn.data.specs import DatasetSpec

__all__ = [
    "AugmentConfig", "augment_batch", "compute_stats",
    "ArraySource", "InputPipeline", "PREPROCESSING_FORMAT", "ResidentPipeline", "StreamingPipeline",
    "check_preprocessing", "from_arrays", "preprocess",
    "ImageFolder", "image_folder",
    "Resolved", "load_arrays", "make_pipeline", "resolve", "split_validation",
    "DatasetSpec",
]
