"""Training: state, losses, optimizers, pure steps, parallel layouts, the fit loop, checkpoints.

    result = jaxcnn.train.fit(model, train_pipeline, config=dict(epochs=3, optimizer="adam"),
                              workdir="runs/mnist", val_data=test_pipeline)
    result.history["val_accuracy"]

`fit` is the only place that jits; `make_steps` gives the pure `train_step`/`eval_step` it compiles.
"""
from jaxcnn.train.callbacks import Callback, CSVLogger, EarlyStopping, JSONLogger, Progress, TensorBoard
from jaxcnn.train.checkpoint import Checkpointer, digest_tree
from jaxcnn.train.config import DEFAULTS, validate_config
from jaxcnn.train.losses import (LOSSES, binary_crossentropy, categorical_crossentropy, get_loss, mae,
                                 mean_absolute_error, mean_squared_error, mse, output_activation,
                                 resolve_from_logits, sigmoid_binary_cross_entropy, softmax_cross_entropy,
                                 sparse_categorical_crossentropy)
from jaxcnn.train.loop import TRACE_COUNTS, FitResult, Preempted, evaluate, fit
from jaxcnn.train.optim import make_optimizer, make_schedule, param_paths
from jaxcnn.train.parallel import AXIS, Layout, make_layout, make_mesh, maybe_initialize_distributed
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import dropout_key, make_steps

__all__ = [
    "AXIS", "CSVLogger", "Callback", "Checkpointer", "DEFAULTS", "EarlyStopping", "FitResult", "JSONLogger",
    "LOSSES", "Layout", "Preempted", "Progress", "TRACE_COUNTS", "TensorBoard", "TrainState",
    "binary_crossentropy", "categorical_crossentropy", "create_train_state", "digest_tree", "dropout_key",
    "evaluate", "fit", "get_loss", "mae", "make_layout", "make_mesh", "make_optimizer", "make_schedule",
    "make_steps", "maybe_initialize_distributed", "mean_absolute_error", "mean_squared_error", "mse",
    "output_activation", "param_paths", "resolve_from_logits", "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy", "sparse_categorical_crossentropy", "validate_config",
]
