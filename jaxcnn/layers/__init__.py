"""Flax linen layers over `jaxcnn.ops`, with Keras names and defaults, plus `Sequential`.

Every layer's `__call__(x, train: bool = False)` accepts `train` (layers that ignore it too), so a
`Sequential` passes it to all of them. NHWC activations, HWIO kernels; batch statistics live in the
`batch_stats` collection; `Dropout` draws from the `dropout` rng stream.
"""
from jaxcnn.layers.activations import ACTIVATIONS, Activation, resolve_activation
from jaxcnn.layers.conv import Conv1D, Conv2D
from jaxcnn.layers.conv_extra import Conv1DTranspose, Conv2DTranspose, DepthwiseConv2D, SeparableConv2D
from jaxcnn.layers.core import Dense, Dropout, Flatten
from jaxcnn.layers.norm_extra import GroupNormalization, LayerNormalization
from jaxcnn.layers.normalization import BatchNorm, LocalResponseNorm
from jaxcnn.layers.pooling import (AvgPool1D, AvgPool2D, GlobalAvgPool1D, GlobalAvgPool2D, GlobalMaxPool1D,
                                   GlobalMaxPool2D, MaxPool1D, MaxPool2D)
from jaxcnn.layers.reshaping import UpSampling2D, ZeroPadding2D
from jaxcnn.layers.sequential import Sequential
from jaxcnn.layers.serialization import architecture_spec, from_architecture_spec
from jaxcnn.layers.spatial import Cropping2D, SpatialDropout2D

# Keras' names for the same classes (a model transcribed from Keras runs unchanged).
AveragePooling1D, AveragePooling2D = AvgPool1D, AvgPool2D
BatchNormalization = BatchNorm
GlobalAveragePooling1D, GlobalAveragePooling2D = GlobalAvgPool1D, GlobalAvgPool2D
GlobalMaxPooling1D, GlobalMaxPooling2D = GlobalMaxPool1D, GlobalMaxPool2D
MaxPooling1D, MaxPooling2D = MaxPool1D, MaxPool2D

__all__ = [
    "ACTIVATIONS", "Activation", "AvgPool1D", "AvgPool2D", "BatchNorm", "Conv1D", "Conv2D", "Dense",
    "Dropout", "Flatten", "GlobalAvgPool1D", "GlobalAvgPool2D", "GlobalMaxPool1D", "GlobalMaxPool2D",
    "LocalResponseNorm", "MaxPool1D", "MaxPool2D", "Sequential", "UpSampling2D", "ZeroPadding2D",
    "resolve_activation",
    "Conv1DTranspose", "Conv2DTranspose", "Cropping2D", "DepthwiseConv2D", "GroupNormalization",
    "LayerNormalization", "SeparableConv2D", "SpatialDropout2D",
    "architecture_spec", "from_architecture_spec",
    # Keras names
    "AveragePooling1D", "AveragePooling2D", "BatchNormalization", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "MaxPooling1D", "MaxPooling2D",
]
