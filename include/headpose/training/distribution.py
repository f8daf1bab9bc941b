"""Training on every GPU of a host and on several hosts, with TensorFlow's own strategies.

Which strategy (``start``):

- several hosts (``cluster.Cluster``): ``MultiWorkerMirroredStrategy``, every host a
  worker, each training on all of its GPUs;
- one host with several GPUs: ``MirroredStrategy`` over all of them;
- ``--cpu_devices N`` on a host without GPUs: ``MirroredStrategy`` over N logical CPU
  devices, which stand in for a host's GPUs (tests, the local backend);
- otherwise the default strategy: one device, as before this module existed.

What a step means on R replicas: every replica takes ``batch_size`` images, so the
global batch is ``batch_size * R``; the entry point runs ``ceil(training_steps / R)``
optimizer steps, the same number of images as ``training_steps`` on one device, and the
learning rate follows the global batch (``0.1 * global batch / 128``, the linear rule).

Data: every input pipeline reads its own share of the training shards,
``shards[i::n]``: one pipeline per worker on several hosts (its local replicas take its
batches in turn), one per replica on one host when there are enough shards. A host
never reads another's share, so a job needs at least as many shards as hosts.

Why a training loop of its own (``train_replicated``) rather than ``Model.fit``: Keras
3.15's ``fit`` fails under ``MultiWorkerMirroredStrategy`` before the first step (its
symbolic build reduces the whole ``(images, labels)`` batch, which that strategy cannot
do, and its logs are reduced along an axis that scalars lack; keras-team/keras#20585,
tensorflow/tensorflow#72388). And with mixed precision, Keras' ``LossScaleOptimizer``
decides to apply or skip a step on each replica's own gradients, before they are
summed, so replicas could disagree and stall in the all-reduce; the loop makes them
agree first. The same loop trains every layout with more than one replica, so one host
over N devices is the reference that several hosts are tested against.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import tensorflow as tf

from headpose.training import shards
from headpose.training.cluster import Cluster


@dataclass(frozen=True)
class Layout:
    """The strategy in force and what it spans."""

    strategy: Any
    cluster: Cluster
    name: str  # the strategy's class name, for the log

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def replicated(self) -> bool:
        return self.replicas > 1

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    def optimizer_steps(self, training_steps: int) -> int:
        """Steps of the global batch that see the images of ``training_steps`` on one device."""
        return math.ceil(training_steps / self.replicas)

    def describe(self, batch_size: int, training_steps: int) -> str:
        where = (f"this host {self.cluster.current_host} is worker {self.cluster.worker_index}"
                 f"{' (the chief)' if self.is_chief else ''} of {self.cluster.size}")
        return (f"distribution: strategy={self.name} hosts={self.cluster.size} replicas={self.replicas} "
                f"({where}); batch {batch_size} per replica, {batch_size * self.replicas} global; "
                f"{self.optimizer_steps(training_steps)} optimizer steps for training_steps={training_steps} "
                f"({training_steps * batch_size} images, as on one device)")


def start(cluster: Cluster, cpu_devices: int = 0) -> Layout:
    """The strategy for ``cluster`` and this host's devices.

    Called before any other TensorFlow operation: logical devices and the collective
    ops of several workers can only be set up while TensorFlow's runtime is not.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_devices > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if cluster.size > 1:
        # The strategy's cluster resolver reads TF_CONFIG from the environment.
        os.environ["TF_CONFIG"] = json.dumps(cluster.tf_config)
        return Layout(tf.distribute.MultiWorkerMirroredStrategy(), cluster, "MultiWorkerMirroredStrategy")
    if len(gpus) > 1:
        return Layout(tf.distribute.MirroredStrategy(), cluster, "MirroredStrategy")
    if cpu_devices > 1 and not gpus:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return Layout(tf.distribute.MirroredStrategy(devices), cluster, "MirroredStrategy")
    return Layout(tf.distribute.get_strategy(), cluster, "one device")


def training_data(layout: Layout, paths: Sequence[Path], batch_size: int, seed: int):
    """The training batches: a dataset on one device, else each pipeline's share of ``paths``."""
    if not layout.replicated:
        return shards.dataset(paths, batch_size, training=True, seed=seed)
    if layout.cluster.size > len(paths):
        raise ValueError(f"{len(paths)} training shards for {layout.cluster.size} hosts: "
                         "every host needs a shard of its own (write the dataset with more shards)")
    options = None
    if layout.cluster.size == 1 and len(paths) >= layout.replicas:
        # One pipeline per replica (pipeline i is replica i's): the same shares as the
        # same number of one-device hosts would read.
        options = tf.distribute.InputOptions(
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)

    def share(context: tf.distribute.InputContext) -> tf.data.Dataset:
        mine = list(paths)[context.input_pipeline_id::context.num_input_pipelines]
        return shards.dataset(mine, batch_size, training=True, seed=seed)

    return layout.strategy.distribute_datasets_from_function(share, options)


def checkpoint_write_dir(layout: Layout, directory: str) -> str:
    """Where this worker writes checkpoints: ``directory`` on the chief, scratch elsewhere.

    Every host syncs its ``/opt/ml/checkpoints`` to the job's one checkpoint URI, and
    SageMaker restores that URI on every host of a restarted job. Chief-only writes keep
    one set of files there, which every worker restores from; the others must still save
    (saving is a collective step) and do it outside the synced folder, where nothing
    uploads it.
    """
    if layout.is_chief:
        return directory
    scratch = tempfile.mkdtemp(prefix=f"checkpoints-worker{layout.cluster.worker_index}-")
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def train_replicated(net, layout: Layout, data, steps: int, global_batch: int, jit_compile: bool,
                     callbacks: Sequence[Any]) -> None:
    """``steps`` optimizer steps of ``net`` (compiled, built in the strategy's scope) on ``data``.

    The same loss as ``Model.fit``: each replica's mean over the global batch plus its
    share of the regularisation, summed over replicas by the optimizer. ``callbacks``
    are Keras callbacks, called as ``fit`` calls them, with the running loss and accuracy.
    """
    strategy, optimizer = layout.strategy, net.optimizer
    per_image_loss = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def gradients(images, labels):
        with tf.GradientTape() as tape:
            probabilities = net(images, training=True)
            loss = tf.nn.compute_average_loss(per_image_loss(labels, probabilities), global_batch_size=global_batch)
            if net.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(net.losses))
            scaled = optimizer.scale_loss(loss) if loss_scaled else loss
        grads = tape.gradient(scaled, net.trainable_variables)
        predicted = tf.cast(tf.argmax(probabilities, axis=1), labels.dtype)
        return grads, loss, tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))

    # XLA compiles the forward and backward pass; the all-reduce stays outside it.
    forward_backward = tf.function(gradients, jit_compile=True) if jit_compile else gradients

    def replica_step(images, labels):
        grads, loss, correct = forward_backward(images, labels)
        if loss_scaled:
            grads = _finite_everywhere_or_nowhere(grads)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss, correct

    @tf.function
    def step(iterator):
        loss, correct = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", correct, axis=None)

    if not optimizer.built:
        with strategy.scope():  # its slots, before the step function: variables cannot be made in it
            optimizer.build(net.trainable_variables)
    iterator = iter(data)
    total_loss, total_correct = tf.constant(0.0), tf.constant(0.0)
    for callback in callbacks:
        callback.on_train_begin()
    for batch in range(steps):
        loss, correct = step(iterator)
        total_loss, total_correct = total_loss + loss, total_correct + correct
        logs = {"loss": total_loss / (batch + 1), "accuracy": total_correct / ((batch + 1) * global_batch)}
        for callback in callbacks:
            callback.on_train_batch_end(batch, logs)
    for callback in callbacks:
        callback.on_train_end()


def _finite_everywhere_or_nowhere(grads: list) -> list:
    """``grads``, made non-finite on every replica if they are on any.

    ``LossScaleOptimizer`` skips the step (and lowers its scale) when the gradients it is
    given are not finite, and it looks at this replica's own, not yet summed. All
    replicas must take the same branch, so the verdict is agreed across them first.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    # Replicas whose gradients are not finite, summed (the all-reduce has no minimum).
    failing = tf.distribute.get_replica_context().all_reduce("SUM", 1.0 - tf.cast(finite, tf.float32))
    factor = tf.where(failing > 0, float("nan"), 1.0)
    return [g * tf.cast(factor, g.dtype) for g in grads]


def wait_for_chief(layout: Layout) -> None:
    """Hold every worker until the chief arrives here, after its evaluation and export.

    A worker that exits while the chief still works is reported to the chief as a
    crashed task (it stops sending heartbeats); one collective step at the end keeps the
    workers alive until the chief no longer needs them, and fails them if it fails.
    """
    if layout.cluster.size > 1:
        strategy = layout.strategy

        def one() -> tf.Tensor:
            return tf.constant(1.0)

        @tf.function
        def barrier() -> tf.Tensor:
            return strategy.reduce("SUM", strategy.run(one), axis=None)

        barrier()
