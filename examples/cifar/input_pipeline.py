"""CIFAR-10/100 through ``tfds.data_source`` (no TensorFlow), NumPy batching and augmentation.

The whole data set (50k + 10k images of 32x32x3 uint8, 180 MB) is read once into
memory from the random-access data source. Training data is split into K equal
per-worker shards (worker k owns examples ``[k n/K, (k+1) n/K)`` of a seeded
permutation). Every batch is a pure function of ``(seed, worker, step)``: worker k
visits its shard in a fresh seeded order every epoch and augments with a random
32x32 crop of the 4-pixel zero-padded image and a random horizontal flip, seeded by
``(seed, worker, step)``. So a run resumed at step t sees exactly the batches an
uninterrupted run would have seen, and each process of a multi-host run builds the
batches of its own workers only.

Images stay uint8 until they are on the device (``normalize`` runs inside the step).
"""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import numpy as np

# Per-channel statistics of the CIFAR-10 training images (0-255 scale).
MEAN = np.array([125.31, 122.95, 113.87], np.float32)
STD = np.array([62.99, 62.09, 66.70], np.float32)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class DataError(Exception):
  """The data set cannot be loaded (tfds missing, data not prepared, no network)."""


class Data(NamedTuple):
  train_images: np.ndarray  # [n, 32, 32, 3] uint8
  train_labels: np.ndarray  # [n] int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


def _read_all(source, chunk=1024):
  n = len(source)
  images = np.empty((n, 32, 32, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    try:
      records = source.__getitems__(keys)
    except (AttributeError, TypeError):  # sources without batched reads
      records = [source[k] for k in keys]
    for k, r in zip(keys, records):
      images[k] = r["image"]
      labels[k] = r["label"]
  return images, labels


def load(dataset: str, data_dir: str | None = None, download: bool = True) -> Data:
  """Read a CIFAR data set through ``tfds.data_source``; DataError with one line if not."""
  if dataset not in NUM_CLASSES:
    raise DataError(f"unknown --dataset {dataset!r}; choose one of {', '.join(NUM_CLASSES)}.")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError("tensorflow-datasets is not installed: pip install tensorflow-datasets "
                    "array-record") from None
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # keep the error to one line
  hint = (f"Prepare it once on a machine with network access: tfds build {dataset} "
          f"--file_format=array_record --data_dir DIR, then pass --data-dir DIR")
  try:
    if not download and not tfds.builder(dataset, data_dir=data_dir).is_prepared():
      raise DataError(f"{dataset} is not prepared in {data_dir or 'the default data dir'} "
                      f"and --no-download is set. {hint}")
    source = tfds.data_source(dataset, split=["train", "test"], data_dir=data_dir,
                              download=download)
    train = _read_all(source[0])
    test = _read_all(source[1])
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001 -- any failure becomes one readable line
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    raise DataError(f"cannot load {dataset} with tensorflow-datasets "
                    f"({type(e).__name__}: {msg}). {hint}") from None
  finally:
    absl_logging.set_verbosity(verbosity)
  return Data(train[0], train[1], test[0], test[1], NUM_CLASSES[dataset])


def normalize(images):
  """uint8 [..., 32, 32, 3] -> float32, per-channel standardised (NumPy or jax arrays)."""
  return (images.astype(np.float32) - MEAN) / STD


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crop of the zero-padded images and random horizontal flip (vectorised)."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oy = rng.integers(0, 2 * pad + 1, size=b)
  ox = rng.integers(0, 2 * pad + 1, size=b)
  flip = rng.random(b) < 0.5
  rows = oy[:, None] + np.arange(h)[None, :]                   # [b, h]
  cols = ox[:, None] + np.arange(w)[None, :]                   # [b, w]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


SAMPLING = ("shards", "whole")


class WorkerBatches:
  """Per-worker training batches as a pure function of the global step.

  Args:
    images, labels: the training set (n examples).
    num_workers: K.
    batch_size: examples per worker per step.
    seed: seed of the shard split, the orders and the augmentation.
    workers: the workers whose batches this process builds (default all).
    sampling: ``"shards"``: the set is cut into K disjoint shards of ``n // K``
      examples, each worker passes over its own; ``"whole"``: each worker passes over
      the whole set in its own order (the LSGD authors' ``--random_sampler``, and the
      parameter-server setting of the EASGD and staleness-aware papers).

  An epoch is ``n // K // batch_size`` steps in both modes: the workers together
  consume about n examples.
  """

  def __init__(self, images, labels, num_workers, batch_size, seed=0, workers=None,
               sampling="shards"):
    if sampling not in SAMPLING:
      raise ValueError(f"unknown --sampling {sampling!r}; choose one of {', '.join(SAMPLING)}")
    n_local = len(images) // num_workers
    pool = n_local if sampling == "shards" else len(images)
    if batch_size > pool:
      raise ValueError(f"--batch-size {batch_size} exceeds the {pool} training examples "
                       f"each of the {num_workers} workers draws from.")
    self.workers = list(range(num_workers)) if workers is None else list(workers)
    if sampling == "shards":
      perm = np.random.default_rng([seed, 0]).permutation(len(images))[:n_local * num_workers]
      self.pools = perm.reshape(num_workers, n_local)[self.workers]  # [k_local, n_local]
    else:
      self.pools = None  # every worker: all of 0..n-1
    self.images, self.labels = images, labels
    self.pool_size = pool
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = n_local // batch_size
    self._orders = {}

  def _order(self, j, p):
    """Worker j's order of its pool in its p-th pass over it (indices into the set)."""
    key = (j, p)
    if key not in self._orders:
      if len(self._orders) > 4 * len(self.workers):
        self._orders.clear()
      order = np.random.default_rng([self.seed, 1, self.workers[j], p]).permutation(
          self.pool_size)
      self._orders[key] = order if self.pools is None else self.pools[j][order]
    return self._orders[key]

  def __call__(self, step: int):
    """``(images [k_local, B, 32, 32, 3] uint8, labels [k_local, B] int32)`` of ``step``."""
    p, i = divmod(step, self.pool_size // self.batch_size)
    xs, ys = [], []
    for j, w in enumerate(self.workers):
      idx = self._order(j, p)[i * self.batch_size:(i + 1) * self.batch_size]
      rng = np.random.default_rng([self.seed, 2, w, step])
      xs.append(augment(self.images[idx], rng))
      ys.append(self.labels[idx])
    return np.stack(xs), np.stack(ys)


def prefetch(fn, steps, size=2):
  """Yield ``fn(t)`` for t in ``steps``, computed ``size`` ahead in a background thread."""
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def work():
    try:
      for t in steps:
        if stop.is_set():
          return
        q.put((t, fn(t)))
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
      q.put((None, e))
      return
    q.put((None, None))

  th = threading.Thread(target=work, daemon=True)
  th.start()
  try:
    while True:
      t, item = q.get()
      if t is None:
        if item is not None:
          raise item
        return
      yield t, item
  finally:
    stop.set()
    while th.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        th.join(0.05)


def eval_batches(images, labels, num_workers, batch_size, workers=None):
  """The test set cut into K worker slices, padded, in batches.

  Yields ``(images [k_local, B, ...], labels [k_local, B], mask [k_local, B])``;
  ``mask`` is 0 on padding. Every example is seen by exactly one worker once.
  """
  n = len(images)
  per = -(-n // num_workers)
  nb = -(-per // batch_size)
  total = num_workers * nb * batch_size
  pad = total - n
  ws = list(range(num_workers)) if workers is None else list(workers)
  x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  y = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  m = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (num_workers, nb, batch_size)
  x = x.reshape(shape + images.shape[1:])[ws]
  y = y.reshape(shape)[ws]
  m = m.reshape(shape)[ws]
  for b in range(nb):
    yield x[:, b], y[:, b], m[:, b]
