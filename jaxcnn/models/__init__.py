"""Model registry and model families.

`get(name, **kwargs)` builds a registered model, `names()` lists them, `spec(name)` tells a model's
input shape and task. Every model maps (N, H, W, C) float input to logits (no softmax inside) through
`model.apply(variables, x, train=...)`; BatchNorm statistics live in `batch_stats`, dropout draws from
the `dropout` rng, and models with BatchNorm take `bn_momentum` and `axis_name` (for pmap BatchNorm).

Registered: mnist_convnet, lenet5, keras_mnist_cnn, mnist_bn_cnn, mnist_fast_cnn, cifar10_cnn (the Keras
example's), cifar10_cnn_same, cifar_3conv, vgg16, resnet18, resnet20, conv_autoencoder, airbench,
mobilenet_cifar, conv_transpose_autoencoder.
"""
from jaxcnn.models.registry import ModelSpec, get, names, register, registry_entry, spec
from jaxcnn.models import airbench as _airbench  # noqa: F401  (registers its models)
from jaxcnn.models import autoencoders as _autoencoders  # noqa: F401
from jaxcnn.models import mobilenet as _mobilenet  # noqa: F401
from jaxcnn.models import resnet as _resnet  # noqa: F401
from jaxcnn.models import small as _small  # noqa: F401
from jaxcnn.models import vgg as _vgg  # noqa: F401
from jaxcnn.models.airbench import AirbenchNet
from jaxcnn.models.resnet import BasicBlock, ResNet
from jaxcnn.models.vgg import VGG16

__all__ = ["AirbenchNet", "BasicBlock", "ModelSpec", "ResNet", "VGG16", "get", "names", "register", "registry_entry",
           "spec"]
