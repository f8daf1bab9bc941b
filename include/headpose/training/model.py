"""Pre-activation ResNet v2 (He et al., "Identity Mappings in Deep Residual Networks").

Built with Keras' functional API in the shape of the TensorFlow official ResNet the
tutorial trained: a 7x7/2 stem and 3x3/2 max-pool, four stages, batch norm and ReLU
*before* each convolution, and one final batch norm + ReLU before global pooling.
Sizes 18 and 34 use basic blocks, 50 bottleneck blocks; 10 (one basic block a stage)
is a small size for demos and tests. ``base_filters`` scales the width (64 in the
paper); smaller values make CPU-sized models.
"""
from __future__ import annotations

# Keras 3 itself rather than ``tf.keras`` (the same classes under TensorFlow 2.21): the
# model then builds on any Keras backend, which lets the GPU benchmark run it where only
# JAX is installed. Training and export still run on the default TensorFlow backend.
import keras

from headpose.training import labels, serving

# resnet_size -> (bottleneck?, blocks per stage)
RESNET_SIZES: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    10: (False, (1, 1, 1, 1)),
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
}
INPUT_SHAPE = (84, 84, 3)
OUTPUT_NAME = serving.SOFTMAX_NODE


def build_resnet(
    resnet_size: int = 50,
    base_filters: int = 64,
    weight_decay: float = 2e-4,
    batch_norm_momentum: float = 0.99,
    num_classes: int = labels.NUM_CLASSES,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
) -> keras.Model:
    """A ResNet v2 mapping float32 images in [0, 1] to class probabilities.

    ``batch_norm_momentum`` defaults to Keras' 0.99 rather than the TF official model's
    0.997: with 0.997 the moving statistics of a short run (demos, tests) are still
    mostly their initial values when the model is exported.
    """
    if resnet_size not in RESNET_SIZES:
        raise ValueError(f"resnet_size must be one of {sorted(RESNET_SIZES)}, got {resnet_size}")
    bottleneck, stages = RESNET_SIZES[resnet_size]
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None

    def conv(x, filters: int, kernel: int, strides: int = 1, name: str | None = None):
        return keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=regularizer, name=name,
        )(x)

    def bn_relu(x, name: str):
        x = keras.layers.BatchNormalization(
            momentum=batch_norm_momentum, epsilon=1e-5, name=f"{name}_bn"
        )(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    def block(x, filters: int, strides: int, name: str):
        preact = bn_relu(x, f"{name}_pre")
        out_filters = filters * 4 if bottleneck else filters
        if strides != 1 or x.shape[-1] != out_filters:
            shortcut = conv(preact, out_filters, 1, strides, name=f"{name}_proj")
        else:
            shortcut = x
        if bottleneck:
            y = conv(preact, filters, 1, name=f"{name}_conv1")
            y = conv(bn_relu(y, f"{name}_2"), filters, 3, strides, name=f"{name}_conv2")
            y = conv(bn_relu(y, f"{name}_3"), out_filters, 1, name=f"{name}_conv3")
        else:
            y = conv(preact, filters, 3, strides, name=f"{name}_conv1")
            y = conv(bn_relu(y, f"{name}_2"), filters, 3, name=f"{name}_conv2")
        return keras.layers.Add(name=f"{name}_add")([shortcut, y])

    inputs = keras.Input(shape=input_shape, name=serving.INPUT_KEY, dtype="float32")
    x = conv(inputs, base_filters, 7, strides=2, name="stem_conv")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, num_blocks in enumerate(stages):
        for index in range(num_blocks):
            strides = 2 if index == 0 and stage > 0 else 1
            x = block(x, base_filters * 2**stage, strides, name=f"stage{stage + 1}_block{index + 1}")
    x = bn_relu(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(
        num_classes, kernel_regularizer=regularizer, name="logits",
    )(x)
    # float32 softmax even under mixed precision, named as the tutorial's output node.
    outputs = keras.layers.Activation("softmax", dtype="float32", name=OUTPUT_NAME)(logits)
    return keras.Model(inputs, outputs, name=f"resnet{resnet_size}_v2")


def learning_rate_schedule(
    batch_size: int, steps_per_epoch: int, boundaries_epochs: tuple[int, ...] = (100, 150, 200)
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The tutorial's schedule: 0.1 * batch / 128, divided by 10 at epochs 100, 150, 200."""
    initial = 0.1 * batch_size / 128
    boundaries = [max(1, int(e * steps_per_epoch)) for e in boundaries_epochs]
    values = [initial * 0.1**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
