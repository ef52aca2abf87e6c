"""Weight import from other frameworks: Keras `.h5` files (Keras 3 and legacy Keras 2 layouts).

    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    variables = jaxcnn.interop.load_keras_weights("vgg16_weights_tf_dim_ordering_tf_kernels.h5", template)

Files are read with h5py alone (arrays only); Keras is not needed to import weights.
"""
from jaxcnn.interop.keras import load_keras_weights, read_keras_weights

__all__ = ["load_keras_weights", "read_keras_weights"]
