"""Training: state, losses, optimizers, pure steps, parallel layouts, the fit loop, checkpoints.

    result = jaxcnn.train.fit(model, (images, labels), config=dict(epochs=3, batch_size=128,
                              validation_split=0.1), workdir="runs/mnist")
    result.history["val_accuracy"], result.preprocessing
    result.predict(x_test), result.evaluate(x_test, y_test), result.save("my_model")
    model = jaxcnn.train.load("my_model")            # a TrainedModel: predictions bitwise equal

`fit` is the only place that compiles training programs; `make_steps` gives the pure
`train_step`/`eval_step` it compiles, a `Strategy` (make_strategy) the execution mode and a feed
(jaxcnn.train.feed) where the batches come from. `DEFAULTS` is fit's whole config.
"""
from jaxcnn.train.callbacks import Callback, CSVLogger, EarlyStopping, JSONLogger, Progress, TensorBoard
from jaxcnn.train.checkpoint import Checkpointer, digest_tree
from jaxcnn.train.config import DEFAULTS, augment_config, default_config, validate_config
from jaxcnn.train.losses import (LOSSES, binary_crossentropy, categorical_crossentropy, get_loss, mae,
                                 mean_absolute_error, mean_squared_error, mse, output_activation,
                                 resolve_from_logits, sigmoid_binary_cross_entropy, softmax_cross_entropy,
                                 sparse_categorical_crossentropy)
from jaxcnn.train.loop import TRACE_COUNTS, FitResult, Preempted, evaluate, fit
from jaxcnn.train.model import MODEL_FORMAT, TrainedModel, load
from jaxcnn.train.optim import make_optimizer, make_schedule, param_paths
from jaxcnn.train.parallel import (AXIS, MeshStrategy, PmapStrategy, Strategy, make_mesh, make_strategy,
                                   maybe_initialize_distributed)
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import dropout_key, make_steps

__all__ = [
    "AXIS", "CSVLogger", "Callback", "Checkpointer", "DEFAULTS", "EarlyStopping", "FitResult", "JSONLogger",
    "LOSSES", "MODEL_FORMAT", "MeshStrategy", "PmapStrategy", "Preempted", "Progress", "Strategy", "TRACE_COUNTS",
    "TensorBoard", "TrainState", "TrainedModel", "augment_config", "binary_crossentropy", "categorical_crossentropy",
    "create_train_state", "default_config", "digest_tree", "dropout_key", "evaluate", "fit", "get_loss", "load", "mae",
    "make_mesh", "make_optimizer", "make_schedule", "make_steps", "make_strategy", "maybe_initialize_distributed",
    "mean_absolute_error", "mean_squared_error", "mse", "output_activation", "param_paths", "resolve_from_logits",
    "sigmoid_binary_cross_entropy", "softmax_cross_entropy", "sparse_categorical_crossentropy", "validate_config",
]
