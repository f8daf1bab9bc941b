"""The training entry point, under SageMaker's script-mode contract.

The SageMaker training toolkit (in SageMaker's TensorFlow image, and on the project's
local backend, which runs the same toolkit) starts
``python train.py --<hyperparameter> <value> ...`` with the code folder as working
directory and these environment variables:

``SM_CHANNEL_TRAINING``  folder with ``train-*.tfrecord`` (and ``eval-*`` unless an
                         eval channel is given)
``SM_CHANNEL_EVAL``      optional folder with ``eval-*.tfrecord``
``SM_MODEL_DIR``         where the model goes; SageMaker tars it into model.tar.gz
``SM_OUTPUT_DIR``        ``failure`` is written here when training fails
``SM_OUTPUT_DATA_DIR``   extra outputs (metrics.json)
``SM_HOSTS`` / ``SM_CURRENT_HOST``  the cluster; several hosts train together under
                         ``TF_CONFIG`` (``headpose.training.cluster``), and only the
                         chief (the first) evaluates and writes the model

Lines that a SageMaker ``MetricDefinitions`` regex reads (see ``METRIC_REGEXES``)::

    metric: step=100 train_loss=1.2345 train_accuracy=0.5000
    metric: eval_loss=0.3456 eval_accuracy=0.9100

the precision in force, once, before training::

    precision: dtype_policy=mixed_float16 jit_compile=True channel_order=bgr

how the work is spread (``headpose.training.distribution``)::

    distribution: strategy=MultiWorkerMirroredStrategy hosts=2 replicas=2 (...); batch 200 per replica, ...

and a progress line every ``--log_every`` steps::

    progress: step=100/25000 (0.4%) images_per_sec=210.3 elapsed_s=95 eta_s=23600
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from headpose.training.serving import CHANNEL_ORDERS, DEFAULT_CHANNEL_ORDER

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
METRIC_REGEXES: dict[str, str] = {
    "train:loss": r"train_loss=([0-9.eE+-]+)",
    "train:accuracy": r"train_accuracy=([0-9.eE+-]+)",
    "eval:loss": r"eval_loss=([0-9.eE+-]+)",
    "eval:accuracy": r"eval_accuracy=([0-9.eE+-]+)",
}


class TrainingError(Exception):
    """A failure whose message is meant for the person reading the job's FailureReason."""


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the head-pose ResNet v2 on TFRecord shards and export a SavedModel "
        "under <SM_MODEL_DIR>/export/Servo/<timestamp>/.",
    )
    add = parser.add_argument
    add("--training_steps", type=int, default=25000,
        help="steps of --batch_size images, as on one device (default 25000); on R replicas "
        "ceil(training_steps / R) optimizer steps of the global batch see the same images")
    add("--evaluation_steps", type=int, default=700,
        help="at most this many eval batches after training (default 700; stops early when "
        "the eval split is exhausted)")
    add("--batch_size", type=int, default=200,
        help="images per step of one device (default 200); on R replicas (GPUs, hosts) the "
        "global batch is R times this")
    add("--resnet_size", type=int, default=50, choices=(10, 18, 34, 50),
        help="ResNet v2 depth (default 50; 10 is a small size for demos)")
    add("--base_filters", type=int, default=64, help="filters of the first stage (default 64)")
    add("--weight_decay", type=float, default=2e-4, help="L2 weight decay (default 2e-4)")
    add("--batch_norm_momentum", type=float, default=0.99,
        help="moving-average momentum of the batch-norm statistics (default 0.99)")
    add("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    add("--learning_rate", type=float, default=None,
        help="initial learning rate of the global batch (default 0.1 * global batch / 128, "
        "the tutorial's rule, which scales it linearly with the replicas)")
    add("--decay_epochs", type=str, default="100,150,200",
        help="epochs at which the learning rate is divided by 10 (default 100,150,200)")
    add("--log_every", type=int, default=100, help="steps between progress and metric lines")
    add("--seed", type=int, default=0, help="random seed for weights and data order")
    add("--dtype_policy", default="float32", choices=DTYPE_POLICIES,
        help="Keras dtype policy of training: mixed_float16 for GPUs with float16 tensor "
        "cores, float32 (default) elsewhere; the export is float32 whatever this says")
    add("--jit_compile", type=int, default=0, choices=(0, 1),
        help="1 compiles the training step with XLA; 0 (default) does not")
    add("--channel_order", default=DEFAULT_CHANNEL_ORDER, choices=CHANNEL_ORDERS,
        help="channel order of the training images, recorded in the export for the "
        f"consumers of the model (default {DEFAULT_CHANNEL_ORDER})")
    add("--model_dir", type=str, default=None,
        help="set by the SageMaker SDK to an S3 URI; ignored: the model goes to SM_MODEL_DIR")
    add("--train_dir", default=os.environ.get("SM_CHANNEL_TRAINING"),
        help="training shards (default: $SM_CHANNEL_TRAINING)")
    add("--eval_dir", default=os.environ.get("SM_CHANNEL_EVAL"),
        help="eval shards (default: $SM_CHANNEL_EVAL, else the training channel)")
    add("--output_model_dir", default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model"),
        help="where the export goes (default: $SM_MODEL_DIR)")
    add("--checkpoint_dir", default=None,
        help="save the training state here and resume from the latest one found (SageMaker "
        "syncs /opt/ml/checkpoints for managed spot training); unset: no checkpoints")
    add("--checkpoint_every", type=int, default=500,
        help="optimizer steps between checkpoints when --checkpoint_dir is set (default 500)")
    add("--cpu_devices", type=int, default=0,
        help="on a host without GPUs, train over this many logical CPU devices as over as many "
        "GPUs (MirroredStrategy; tests and the local backend); 0 (default): one device")
    add("--manifest_sha256", default=None,
        help="sha256 of the training channel's manifest.json; with it, the manifest and every shard "
        "are verified before the first step (training.integrity)")
    add("--source_sha256s", default=None,
        help="JSON object {file: sha256} of this code; with it, every file is verified before the first step")
    return parser


def log(line: str) -> None:
    # One flushed line at a time: the log is streamed to CloudWatch / the Airflow task log.
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        from headpose.training import cluster

        found = cluster.from_environment()
        _verify_inputs(args)
        metrics = train(args, found)
    except Exception as error:  # every failure must reach the job's FailureReason
        reason = f"{type(error).__name__}: {error}"
        log(traceback.format_exc())
        _write_failure(reason)
        log(f"training failed: {reason}")
        return 1
    log(f"training finished: {json.dumps(metrics, sort_keys=True)}")
    return 0


def _verify_inputs(args: argparse.Namespace) -> None:
    """The code and the data are the ones recorded (``training.integrity``), or an ``IntegrityError``."""
    from headpose.training import integrity

    files = integrity.verify_sources(args.source_sha256s)
    shards = integrity.verify_dataset(args.manifest_sha256, args.train_dir, args.eval_dir)
    log(f"integrity: {files} source files and {shards} shards match their recorded sha256"
        + ("" if files and shards else " (a check without its recorded sha256s was skipped)"))


def _write_failure(reason: str) -> None:
    output_dir = Path(os.environ.get("SM_OUTPUT_DIR", "/opt/ml/output"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "failure").write_text(reason[:4096] + "\n")
    except OSError as error:
        log(f"could not write the failure file in {output_dir}: {error}")


def _shards(directory: str | None, split: str) -> list[Path]:
    from headpose.training import shards

    if not directory:
        raise TrainingError(f"no {split} data: set SM_CHANNEL_TRAINING (or --train_dir)")
    found = shards.shard_paths(directory, split)
    if not found:
        raise TrainingError(f"no {split}-*{shards.SHARD_SUFFIX} shards in {directory}")
    return found


def _count_records(paths: list[Path]) -> int:
    """Exact record count of the training shards, streamed (used for epoch boundaries)."""
    import tensorflow as tf

    return int(tf.data.TFRecordDataset([str(p) for p in paths]).reduce(0, lambda n, _: n + 1))


def train(args: argparse.Namespace, cluster) -> dict:
    # model.py builds on whichever Keras backend is chosen; training and export need
    # TensorFlow's, so a KERAS_BACKEND left in the container's environment cannot win.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    # Heavy imports here, after argument parsing, so that --help is instant.
    import tensorflow as tf

    from headpose.training import distribution, export, model, shards

    for name in ("training_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be at least 1, got {getattr(args, name)}")
    layout = distribution.start(cluster, args.cpu_devices)  # before any other TensorFlow op
    tf.keras.utils.set_random_seed(args.seed)
    tf.keras.mixed_precision.set_global_policy(args.dtype_policy)

    train_paths = _shards(args.train_dir, "train")
    eval_paths = _shards(args.eval_dir or args.train_dir, "eval")
    num_train = _count_records(train_paths)
    global_batch = args.batch_size * layout.replicas
    steps, steps_per_epoch = layout.optimizer_steps(args.training_steps), max(1, num_train // global_batch)
    log(layout.describe(args.batch_size, args.training_steps))
    log(f"data: {num_train} training images in {len(train_paths)} shards, "
        f"{len(eval_paths)} eval shards, {steps_per_epoch} steps per epoch")

    with layout.strategy.scope():
        net = model.build_resnet(
            args.resnet_size, args.base_filters, args.weight_decay, args.batch_norm_momentum
        )
        schedule = _learning_rate(args, global_batch, steps_per_epoch, model)
        net.compile(
            optimizer=tf.keras.optimizers.SGD(learning_rate=schedule, momentum=args.momentum),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            # Explicit: Keras' default ("auto") would turn XLA on wherever a GPU is visible.
            jit_compile=bool(args.jit_compile),
        )
    # What is in force, not what was asked: Keras drops XLA for a model it cannot compile.
    log(f"precision: dtype_policy={net.dtype_policy.name} jit_compile={bool(net.jit_compile)} "
        f"channel_order={args.channel_order}")
    done, callbacks = 0, []
    if args.checkpoint_dir:
        with layout.strategy.scope():
            done, saver = resume_from_checkpoint(net, args.checkpoint_dir, args.checkpoint_every,
                                                 distribution.checkpoint_write_dir(layout, args.checkpoint_dir))
        callbacks.append(saver)
    if layout.is_chief:  # the lines SageMaker reads metrics from, once per job
        callbacks.append(progress_logger(steps, global_batch, args.log_every, done))
    if done < steps:
        train_data = distribution.training_data(layout, train_paths, args.batch_size, args.seed)
        started = time.monotonic()
        if layout.replicated:
            distribution.train_replicated(net, layout, train_data, steps - done, global_batch,
                                          bool(net.jit_compile), callbacks)
        else:
            net.fit(train_data, epochs=1, steps_per_epoch=steps - done, verbose=0, callbacks=callbacks)
        # Each phase's time in the log: where a slow run spent it, without a profiler.
        log(f"training loop returned after {time.monotonic() - started:.1f} s")
    else:
        log(f"nothing left to train: the checkpoint is at step {done} of {steps}")
    if not layout.is_chief:
        log(f"worker {layout.cluster.worker_index}: trained; the chief evaluates and writes the model")
        distribution.wait_for_chief(layout)
        return {"training_steps": args.training_steps, "optimizer_steps": steps, "chief": False}

    started = time.monotonic()
    exported = float32_twin(net, args, model, replicated=layout.replicated)
    eval_data = shards.dataset(eval_paths, args.batch_size, training=False)
    eval_data = eval_data.take(args.evaluation_steps)
    results = exported.evaluate(eval_data, verbose=0, return_dict=True)
    log(f"metric: eval_loss={results['loss']:.4f} eval_accuracy={results['accuracy']:.4f}")
    log(f"(eval_accuracy is a quick check on at most {args.evaluation_steps} batches; validate_model's "
        "accuracy on the whole evaluation set is the figure that gates publishing)")
    log(f"evaluated in {time.monotonic() - started:.1f} s")

    started = time.monotonic()
    export_path = export.export_saved_model(exported, args.output_model_dir, args.channel_order)
    log(f"exported SavedModel to {export_path} in {time.monotonic() - started:.1f} s")
    metrics = {
        "eval_loss": float(results["loss"]),
        "eval_accuracy": float(results["accuracy"]),
        "training_steps": args.training_steps,
        "batch_size": args.batch_size,
        "optimizer_steps": steps,
        "replicas": layout.replicas,
        "hosts": layout.cluster.size,
        "resnet_size": args.resnet_size,
        "base_filters": args.base_filters,
        "train_images": num_train,
        "dtype_policy": args.dtype_policy,
        "jit_compile": bool(args.jit_compile),
        "channel_order": args.channel_order,
        "export_dir": str(export_path.relative_to(args.output_model_dir)),
    }
    _write_metrics(metrics, Path(args.output_model_dir))
    distribution.wait_for_chief(layout)
    return metrics


def float32_twin(net, args: argparse.Namespace, model_module, replicated: bool = False):
    """``net`` itself if it computes in float32 on one device, else its weights in a plain float32 model.

    The export must be a float32 graph whatever the training precision: edge runtimes
    and the frozen graph's consumers expect float32 ops, and the parity checks compare
    against float32. A mixed-precision model keeps its variables in float32 already, so
    copying them into a model built under the float32 policy loses nothing. A
    ``replicated`` model's variables belong to its strategy; the copy, built outside it,
    is what the chief evaluates and exports alone. The evaluation runs on the model that
    is exported.
    """
    import tensorflow as tf

    if net.dtype_policy.compute_dtype == "float32" and not replicated:
        return net
    tf.keras.mixed_precision.set_global_policy("float32")
    twin = model_module.build_resnet(
        args.resnet_size, args.base_filters, args.weight_decay, args.batch_norm_momentum
    )
    twin.set_weights(net.get_weights())
    twin.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # for the evaluation
    return twin


def _learning_rate(args, global_batch: int, steps_per_epoch: int, model_module):
    if args.learning_rate is None:
        decay_epochs = tuple(int(e) for e in args.decay_epochs.split(",") if e.strip())
        return model_module.learning_rate_schedule(global_batch, steps_per_epoch, decay_epochs)
    return args.learning_rate


def _write_metrics(metrics: dict, model_dir: Path) -> None:
    text = json.dumps(metrics, indent=2, sort_keys=True)
    (model_dir / "metrics.json").write_text(text)
    data_dir = os.environ.get("SM_OUTPUT_DATA_DIR")
    if data_dir:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        (Path(data_dir) / "metrics.json").write_text(text)


def resume_from_checkpoint(net, directory: str, every: int, write_directory: str | None = None):
    """``(steps already trained, a callback saving the state every ``every`` steps)``.

    The state is restored from ``directory`` and saved to ``write_directory`` (default:
    the same): on several hosts only the chief writes there (``distribution``).

    The state is the model's and the optimizer's variables (its step counter, hence the
    learning-rate schedule, included), as a ``tf.train.Checkpoint``: what a spot
    interruption must not lose. The input pipeline restarts from its seed, so a resumed
    run sees the first batches of the data order again; nothing else changes.
    """
    import tensorflow as tf

    if every < 1:
        raise TrainingError(f"--checkpoint_every must be at least 1, got {every}")
    net.optimizer.build(net.trainable_variables)  # its slots must exist to be restored
    checkpoint = tf.train.Checkpoint(model=net, optimizer=net.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, write_directory or directory, max_to_keep=2)
    latest = tf.train.latest_checkpoint(directory)
    done = 0
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        done = int(net.optimizer.iterations.numpy())
        log(f"resumed from {latest} at step {done}")

    class CheckpointSaver(tf.keras.callbacks.Callback):
        saved_step = done

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % every == 0:
                self._save()

        def on_train_end(self, logs=None):
            self._save()  # an interruption during evaluation or export trains nothing again

        def _save(self):
            step = int(net.optimizer.iterations.numpy())
            if step != self.saved_step:
                manager.save(checkpoint_number=step)
                self.saved_step = step
                log(f"checkpoint saved at step {step}")

    return done, CheckpointSaver()


def progress_logger(total_steps: int, batch_size: int, every: int, first_step: int = 0):
    """A Keras callback printing the progress and metric lines at a steady step cadence.

    ``first_step`` is where a resumed run starts: steps are numbered for the whole job.

    The class is defined here rather than at module level so that importing this module
    (for ``--help``, or ``METRIC_REGEXES`` in the request builder) does not import TF.
    """
    import tensorflow as tf

    class ProgressLogger(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            step = first_step + batch + 1
            if step % every and step != total_steps:
                return
            elapsed = time.monotonic() - self.start
            rate = (batch + 1) * batch_size / elapsed if elapsed else 0.0
            eta = (total_steps - step) * elapsed / (batch + 1)
            logs = logs or {}
            log(f"progress: step={step}/{total_steps} ({100 * step / total_steps:.1f}%) "
                f"images_per_sec={rate:.1f} elapsed_s={elapsed:.0f} eta_s={eta:.0f}")
            log(f"metric: step={step} train_loss={logs.get('loss', float('nan')):.4f} "
                f"train_accuracy={logs.get('accuracy', float('nan')):.4f}")

    return ProgressLogger()


if __name__ == "__main__":
    sys.exit(main())
