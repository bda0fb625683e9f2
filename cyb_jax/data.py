"""Vocabulary, seqio Tasks and deterministic packed batches for language modeling.

Every function takes `data_config`, an `ml_collections.ConfigDict` with fields:

  task              seqio Task name, such as the built-in "shakespeare_lm"
  data_dir          TFDS data directory, None for the TFDS default
  vocab_size        SentencePiece pieces of the Shakespeare vocabulary
  seq_len           tokens per packed sequence
  batch_size        global batch size, in sequences
  seed              seed of the training order (non-negative)
  shuffle_buffer    shuffle buffer of large training splits, in examples
  eval_max_batches  maximum evaluation batches, -1 for the whole split

A batch is a dict of numpy arrays, each of shape [batch, seq_len]:

  targets      int32 token ids, 0 is padding
  inputs       int32 targets shifted right by one within each segment, 0 at
               each segment start
  weights      float32 1.0 on real tokens, 0.0 on padding
  segment_ids  int32 1, 2, ... for the examples packed into a row, 0 on padding
  positions    int32 position within the segment, restarting at 0

Examples longer than `seq_len` are split into chunks of `seq_len` tokens before
packing, so no token is dropped. Each chunk is its own segment, and only the
last chunk of an example ends with EOS.
"""

from collections.abc import Iterable, Iterator, Mapping
import functools
import os
import time
import uuid

from absl import logging
import ml_collections
import numpy as np
import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

from cyb_jax import shakespeare

SHAKESPEARE_TASK = "shakespeare_lm"
SHAKESPEARE_TFDS_NAME = (
    f"{shakespeare.ShakespearePlays.name}:{shakespeare.ShakespearePlays.VERSION}"
)

# Splits with at most this many input examples are packed once and kept in
# memory, which makes resuming at any batch free. Larger splits, and splits of
# unknown size, are streamed. At 20k examples of 2k tokens each, the packed
# arrays take about 800 MB.
MAX_IN_MEMORY_EXAMPLES = 20_000
# The unigram baseline counts at most this many training tokens, so that it
# stays cheap on corpora such as C4.
UNIGRAM_MAX_TRAIN_TOKENS = 100_000_000

_MODEL_KEYS = {
    "decoder_target_tokens": "targets",
    "decoder_input_tokens": "inputs",
    "decoder_loss_weights": "weights",
    "decoder_segment_ids": "segment_ids",
    "decoder_positions": "positions",
}

# Memoized objects of this process. Keys name everything their values depend on.
_SHAKESPEARE_TASKS: dict[tuple[str, int], seqio.Task] = {}
_SPLIT_ROWS: dict[tuple[seqio.Task, str, int], dict[str, np.ndarray]] = {}


# ------------------------------------------------------------------ vocabulary


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
  """Train a SentencePiece BPE model on `texts` and return the serialized model.

  Ids: pad 0, EOS 1, unknown 2, no BOS. The newline is a piece of its own and
  the normalizer is the identity, so decoding restores line breaks and spaces.
  Training reads every text and runs on one thread. With SentencePiece 0.2.3,
  two trainings on the same texts give byte-identical models (a test checks
  this), and the trained pieces do not depend on the thread count.

  Raises:
    ValueError: if SentencePiece rejects the vocabulary size, for example one
      smaller than the number of distinct characters.
  """
  texts = list(texts)
  longest = max((len(text.encode("utf-8")) for text in texts), default=1)
  model = _BytesWriter()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        # The default limit of 4192 bytes would silently skip long examples.
        max_sentence_length=longest,
        input_sentence_size=0,
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as error:
    raise ValueError(
        f"SentencePiece training failed for vocab_size={vocab_size}: {error}"
    ) from error
  return model.data


class _BytesWriter:
  """Buffer that receives the serialized model from `SentencePieceTrainer.train`."""

  def __init__(self):
    self.data = b""

  def write(self, data: bytes) -> None:
    self.data += data


def vocabulary_path(data_dir_root: str, vocab_size: int) -> str:
  """Return the cache path of the Shakespeare vocabulary with `vocab_size` pieces."""
  version = str(shakespeare.ShakespearePlays.VERSION)
  return os.path.join(
      data_dir_root,
      shakespeare.ShakespearePlays.name,
      "vocab",
      version,
      f"spm_bpe_{vocab_size}.model",
  )


def _write_atomically(path: str, data: bytes) -> None:
  """Write `data` to `path` through a temporary file and a rename.

  A process killed while writing leaves only the temporary file, never a
  partial file at `path`.
  """
  tf.io.gfile.makedirs(os.path.dirname(path))
  temp_path = f"{path}.tmp-{uuid.uuid4().hex}"
  try:
    with tf.io.gfile.GFile(temp_path, "wb") as file:
      file.write(data)
    tf.io.gfile.rename(temp_path, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(temp_path):
      tf.io.gfile.remove(temp_path)


def _prepare_shakespeare(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Build the Shakespeare TFDS dataset unless it exists, and return its builder."""
  # `tfds.builder("name:version")` returns a read-only builder for an existing
  # dataset, whose `data_dir_root` is the version directory (TFDS 4.9.10), so
  # the class is constructed directly.
  # NOTE: processes that share a data_dir and start together may race to build
  # the dataset, and TFDS may then fail to rename its temporary directory. On a
  # new shared data_dir, call get_vocabulary in one process first.
  try:
    builder = shakespeare.ShakespearePlays(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  except (OSError, tf.errors.OpError) as error:
    shown_dir = data_dir or "the TFDS default data_dir"
    raise OSError(
        f"Failed to build the Shakespeare dataset in '{shown_dir}': {error}. "
        "Set data.data_dir to a writable directory."
    ) from error
  return builder


def _shakespeare_vocabulary(data_config: ml_collections.ConfigDict):
  """Load the cached Shakespeare vocabulary, training it first if missing."""
  builder = _prepare_shakespeare(data_config.data_dir)
  vocab_size = int(data_config.vocab_size)
  path = vocabulary_path(os.fspath(builder.data_dir_root), vocab_size)
  if not tf.io.gfile.exists(path):
    start = time.time()
    dataset = builder.as_dataset(split="train", shuffle_files=False)
    texts = [
        example["text"].decode("utf-8") for example in tfds.as_numpy(dataset)
    ]
    model = train_sentencepiece(texts, vocab_size)
    try:
      _write_atomically(path, model)
    except (OSError, tf.errors.OpError) as error:
      raise OSError(
          f"Failed to write the vocabulary to '{path}': {error}. Set "
          "data.data_dir to a writable directory."
      ) from error
    logging.info(
        "Trained a %d-piece SentencePiece vocabulary in %.1f s and wrote it to %s",
        vocab_size,
        time.time() - start,
        path,
    )
  vocabulary = seqio.SentencePieceVocabulary(path)
  if vocabulary.pad_id != 0 or vocabulary.eos_id != 1:
    raise ValueError(
        f"The vocabulary at '{path}' has pad id {vocabulary.pad_id} and EOS id "
        f"{vocabulary.eos_id}, but 0 and 1 are required. Delete the file to "
        "train a new one."
    )
  return vocabulary


def hide_accelerators_from_tensorflow() -> None:
  """Keep TensorFlow, which only reads data here, off the GPUs, so JAX keeps their memory.

  Call it before TensorFlow runs its first op.
  """
  tf.config.set_visible_devices([], "GPU")


def get_vocabulary(data_config: ml_collections.ConfigDict) -> seqio.Vocabulary:
  """Return the vocabulary of `data_config.task`.

  For "shakespeare_lm", the first call builds the dataset and trains a
  SentencePiece model with `data_config.vocab_size` pieces on the training split
  (see `train_sentencepiece`). It caches the model beside the dataset, at
  `vocabulary_path`, and later calls load it. Other tasks return the vocabulary
  of their "targets" feature and ignore `vocab_size`.

  `vocab_size` of the result is the number of real token ids V, including pad 0,
  EOS 1 and unknown 2.
  """
  return get_task(data_config).output_features["targets"].vocabulary


# ----------------------------------------------------------------------- tasks


def _lm_preprocessors(text_key: str) -> list:
  """Return preprocessors that turn the text in `text_key` into EOS-ended targets."""
  return [
      functools.partial(
          seqio.preprocessors.rekey, key_map={"targets": text_key}
      ),
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
  ]


def _lm_output_features(vocabulary: seqio.Vocabulary) -> dict:
  return {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}


def _register(task: seqio.Task) -> seqio.Task:
  """Register `task`, replacing any task of the same name."""
  if task.name in seqio.TaskRegistry.names():
    if seqio.TaskRegistry.get(task.name) is task:
      return task
    seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)
  return task


@seqio.map_over_dataset
def _line_to_example(line: tf.Tensor) -> dict[str, tf.Tensor]:
  return {"text": line}


def _drop_blank_lines(dataset: tf.data.Dataset) -> tf.data.Dataset:
  return dataset.filter(
      lambda example: tf.strings.length(tf.strings.strip(example["text"])) > 0
  )


def text_files_task(
    name: str,
    paths_by_split: Mapping[str, str | Iterable[str]],
    vocabulary: seqio.Vocabulary,
) -> seqio.Task:
  """Register and return a language-modeling Task over plain text files.

  Each non-blank line is one example, so write one document per line.
  `paths_by_split` maps split names ("train", "validation", ...) to file paths
  or glob patterns. Registering a name again replaces the earlier Task.
  """
  source = seqio.TextLineDataSource(
      split_to_filepattern=dict(paths_by_split)
  )
  task = seqio.Task(
      name,
      source=source,
      output_features=_lm_output_features(vocabulary),
      preprocessors=[
          _line_to_example,
          _drop_blank_lines,
          *_lm_preprocessors("text"),
      ],
  )
  return _register(task)


def tfds_text_task(
    name: str,
    tfds_name: str,
    text_key: str,
    vocabulary: seqio.Vocabulary,
    data_dir: str | None = None,
) -> seqio.Task:
  """Register and return a language-modeling Task over a TFDS text dataset.

  `tfds_name` needs a version, as in "lm1b:1.1.0" or "c4/en:3.0.1", and
  `text_key` names the feature that contains the text. Registering a name again
  replaces the earlier Task.
  """
  source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir)
  task = seqio.Task(
      name,
      source=source,
      output_features=_lm_output_features(vocabulary),
      preprocessors=_lm_preprocessors(text_key),
  )
  return _register(task)


def _shakespeare_task(data_config: ml_collections.ConfigDict) -> seqio.Task:
  """Return the Shakespeare Task for the config's data_dir and vocabulary size.

  Tasks are memoized per (data_dir, vocab_size). The registry entry
  "shakespeare_lm" points to the Task of the latest config.
  """
  vocabulary = _shakespeare_vocabulary(data_config)
  key = (os.path.abspath(vocabulary.sentencepiece_model_file), vocabulary.vocab_size)
  if key not in _SHAKESPEARE_TASKS:
    _SHAKESPEARE_TASKS[key] = seqio.Task(
        SHAKESPEARE_TASK,
        source=seqio.TfdsDataSource(
            SHAKESPEARE_TFDS_NAME, tfds_data_dir=data_config.data_dir
        ),
        output_features=_lm_output_features(vocabulary),
        preprocessors=_lm_preprocessors("text"),
    )
  return _register(_SHAKESPEARE_TASKS[key])


def get_task(data_config: ml_collections.ConfigDict) -> seqio.Task:
  """Return the registered seqio Task named by `data_config.task`.

  "shakespeare_lm" is built on first use, as `get_vocabulary` describes.

  Raises:
    ValueError: if no Task of that name is registered, or it has no "targets"
      feature.
  """
  name = data_config.task
  if name == SHAKESPEARE_TASK:
    return _shakespeare_task(data_config)
  if name not in seqio.TaskRegistry.names():
    raise ValueError(
        f"Task '{name}' is not registered. Registered tasks: "
        f"{sorted(seqio.TaskRegistry.names())}. Register one before reading "
        "data, with cyb_jax.data.text_files_task, cyb_jax.data.tfds_text_task "
        "or seqio.TaskRegistry.add, or set data.task to 'shakespeare_lm'."
    )
  task = seqio.TaskRegistry.get(name)
  if "targets" not in task.output_features:
    raise ValueError(
        f"Task '{name}' has no 'targets' feature, which language modeling "
        f"reads. Its features are {sorted(task.output_features)}."
    )
  return task


# --------------------------------------------------------------------- packing


def _split_into_chunks(dataset: tf.data.Dataset, length: int) -> tf.data.Dataset:
  """Split each example's targets into chunks of at most `length` tokens."""

  def split(example):
    targets = example["targets"]
    size = tf.size(targets)
    full_chunks = size // length
    remainder = size - full_chunks * length
    row_lengths = tf.concat(
        [tf.fill([full_chunks], length), tf.reshape(remainder, [1])], axis=0
    )
    row_lengths = tf.boolean_mask(row_lengths, row_lengths > 0)
    chunks = tf.RaggedTensor.from_row_lengths(targets, row_lengths)
    return tf.data.Dataset.from_tensor_slices({"targets": chunks})

  return dataset.flat_map(split)


def _packed_rows(
    task: seqio.Task,
    split: str,
    seq_len: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    num_epochs: int | None = 1,
    shuffle_buffer: int | None = None,
) -> tf.data.Dataset:
  """Return the split as packed rows of `seq_len` tokens with model features."""
  dataset = task.get_dataset(
      sequence_length=None,
      split=split,
      shuffle=shuffle,
      seed=seed,
      num_epochs=num_epochs,
      shuffle_buffer_size=shuffle_buffer,
  )
  dataset = _split_into_chunks(dataset, seq_len)
  converter = seqio.LMFeatureConverter(pack=True)
  return converter(dataset, {"targets": seq_len})


def _to_batch_arrays(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename seqio's model features to batch keys and set their dtypes."""
  arrays = {_MODEL_KEYS[key]: np.asarray(value) for key, value in rows.items()}
  arrays = {key: value.astype(np.int32) for key, value in arrays.items()}
  arrays["weights"] = arrays["weights"].astype(np.float32)
  return arrays


def _stack_rows(dataset: tf.data.Dataset, max_rows: int | None, seq_len: int):
  """Read up to `max_rows` rows of a packed dataset into [rows, seq_len] arrays."""
  if max_rows is not None:
    dataset = dataset.take(max_rows)
  dataset = dataset.batch(4096)
  parts = [_to_batch_arrays(rows) for rows in dataset.as_numpy_iterator()]
  if not parts:
    empty_int = np.zeros((0, seq_len), np.int32)
    arrays = {key: empty_int for key in _MODEL_KEYS.values()}
    arrays["weights"] = np.zeros((0, seq_len), np.float32)
    return arrays
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _fits_in_memory(task: seqio.Task, split: str) -> bool:
  size = task.num_input_examples(split)
  return size is not None and size <= MAX_IN_MEMORY_EXAMPLES


def _split_rows(
    task: seqio.Task, split: str, seq_len: int, max_rows: int | None = None
) -> dict[str, np.ndarray]:
  """Return the first `max_rows` packed rows of a split in its fixed order.

  Splits that fit in memory are packed completely once and memoized.
  """
  if not _fits_in_memory(task, split):
    return _stack_rows(_packed_rows(task, split, seq_len), max_rows, seq_len)
  key = (task, split, seq_len)
  if key not in _SPLIT_ROWS:
    start = time.time()
    _SPLIT_ROWS[key] = _stack_rows(_packed_rows(task, split, seq_len), None, seq_len)
    logging.info(
        "Packed split '%s' of task '%s' into %d rows of %d tokens in %.1f s",
        split,
        task.name,
        len(_SPLIT_ROWS[key]["targets"]),
        seq_len,
        time.time() - start,
    )
  rows = _SPLIT_ROWS[key]
  if max_rows is None:
    return rows
  return {name: value[:max_rows] for name, value in rows.items()}


# --------------------------------------------------------------------- batches


def _local_batch_size(batch_size: int, process_count: int, process_index: int) -> int:
  if batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} is not divisible by process_count "
        f"{process_count}. Set data.batch_size to a multiple of the number of "
        "processes."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} is outside [0, {process_count})."
    )
  return batch_size // process_count


def train_batches(
    data_config: ml_collections.ConfigDict,
    *,
    start_index: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Return an endless iterator over the training batches from `start_index` on.

  Batch k depends only on the config, seed included, and on k. A run that
  resumes at `start_index=k` therefore gets the batches it would have seen. Each
  process gets rows [i * b, (i + 1) * b) of every global batch, where
  i = process_index and b = batch_size // process_count. Concatenating the
  processes' batches in index order gives the global batch.

  A training split that fits in memory (see MAX_IN_MEMORY_EXAMPLES) is packed
  once in a fixed order when this function is called. Epoch e then visits all
  rows in a permutation drawn by numpy from (seed, e), and batches may span
  epochs. Starting at any k costs nothing, and `shuffle_buffer` is unused.
  NOTE: numpy does not promise the same permutations across its versions.

  A larger split is streamed: seqio shuffles examples and this function shuffles
  packed rows, both with buffers of `shuffle_buffer` and the same seed. The
  stream repeats the split forever. Starting at k reads, tokenizes and packs
  the k batches before it again.

  `train_rows` > 0 limits training to a budget of packed rows: rows
  [train_rows_offset, train_rows_offset + train_rows) of a fixed order that
  depends on neither the seed nor the budget, so a larger budget contains a
  smaller one and budgets at different offsets share no row. That order is a
  fixed permutation of the packed split when it fits in memory, and the packed
  split's own order when it is streamed. Epochs then cycle over the budget.

  Raises:
    ValueError: if batch_size is not divisible by process_count, the seed is
      negative, or the row budget is negative or runs past the split.
  """
  local_size = _local_batch_size(
      data_config.batch_size, process_count, process_index
  )
  seed = int(data_config.seed)
  if seed < 0:
    raise ValueError(f"seed {seed} is negative. Set data.seed to 0 or more.")
  task = get_task(data_config)
  budget = _training_rows_budget(data_config)
  if not _fits_in_memory(task, "train"):
    return _streamed_batches(
        task, data_config, start_index, local_size, process_index, budget
    )
  rows = _split_rows(task, "train", int(data_config.seq_len))
  if not len(rows["targets"]):
    raise ValueError(f"The training split of task '{task.name}' has no tokens.")
  if budget is not None:
    rows = _subset_rows(rows, *budget)
  return _permuted_batches(
      rows, data_config.batch_size, seed, start_index, local_size, process_index
  )


# Seed of the fixed row order from which data budgets (train_rows) are taken.
_BUDGET_ORDER_SEED = 20_251_015


def _training_rows_budget(
    data_config: ml_collections.ConfigDict,
) -> tuple[int, int] | None:
  """Return (offset, rows) of the training-row budget, or None for the whole split."""
  rows = int(data_config.get("train_rows", 0))
  offset = int(data_config.get("train_rows_offset", 0))
  if rows < 0 or offset < 0:
    raise ValueError(
        f"data.train_rows={rows} and data.train_rows_offset={offset} must be 0 or"
        " more; data.train_rows=0 trains on the whole split."
    )
  if rows == 0:
    if offset:
      raise ValueError(
          f"data.train_rows_offset={offset} has no effect without a budget; set"
          " data.train_rows to the number of rows to train on."
      )
    return None
  return offset, rows


def _subset_rows(
    rows: dict[str, np.ndarray], offset: int, count: int
) -> dict[str, np.ndarray]:
  """Return the budget rows [offset, offset + count) of the fixed budget order."""
  num_rows = len(rows["targets"])
  if offset + count > num_rows:
    raise ValueError(
        f"data.train_rows_offset + data.train_rows = {offset} + {count} exceeds the"
        f" {num_rows} packed rows of the training split at this seq_len; lower"
        " them or use a larger corpus."
    )
  order = np.random.default_rng(_BUDGET_ORDER_SEED).permutation(num_rows)
  # Sorted, so that the rows keep the split's fixed order before the epoch shuffles.
  chosen = np.sort(order[offset : offset + count])
  return {name: value[chosen] for name, value in rows.items()}


def _permuted_batches(
    rows: dict[str, np.ndarray],
    batch_size: int,
    seed: int,
    start_index: int,
    local_size: int,
    process_index: int,
) -> Iterator[dict[str, np.ndarray]]:
  num_rows = len(rows["targets"])
  permutations: dict[int, np.ndarray] = {}

  def permutation(epoch: int) -> np.ndarray:
    if epoch not in permutations:
      if len(permutations) > 2:
        permutations.pop(min(permutations))
      rng = np.random.default_rng([seed, epoch])
      permutations[epoch] = rng.permutation(num_rows)
    return permutations[epoch]

  index = start_index
  while True:
    # Positions of this process's rows in the endless sequence of epochs.
    first = index * batch_size + process_index * local_size
    stream_positions = np.arange(first, first + local_size)
    epochs, offsets = np.divmod(stream_positions, num_rows)
    row_indices = np.empty(local_size, np.int64)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      row_indices[in_epoch] = permutation(int(epoch))[offsets[in_epoch]]
    yield {name: value[row_indices] for name, value in rows.items()}
    index += 1


def _streamed_batches(
    task: seqio.Task,
    data_config: ml_collections.ConfigDict,
    start_index: int,
    local_size: int,
    process_index: int,
    budget: tuple[int, int] | None,
) -> Iterator[dict[str, np.ndarray]]:
  if budget is None:
    dataset = _packed_rows(
        task,
        "train",
        int(data_config.seq_len),
        shuffle=True,
        seed=int(data_config.seed),
        num_epochs=None,
        shuffle_buffer=int(data_config.shuffle_buffer),
    )
    dataset = dataset.shuffle(
        int(data_config.shuffle_buffer), seed=int(data_config.seed)
    )
  else:
    # Shuffled before repeating, so that every epoch visits the budget exactly once.
    offset, count = budget
    dataset = _packed_rows(task, "train", int(data_config.seq_len))
    dataset = dataset.skip(offset).take(count)
    dataset = dataset.shuffle(
        int(data_config.shuffle_buffer), seed=int(data_config.seed)
    ).repeat()
  dataset = dataset.batch(data_config.batch_size, drop_remainder=True)
  # NOTE: every process reads, tokenizes and packs the whole global stream and
  # keeps only its own rows of each batch.
  dataset = dataset.skip(start_index).prefetch(2)
  first = process_index * local_size
  for rows in dataset.as_numpy_iterator():
    arrays = _to_batch_arrays(rows)
    yield {name: value[first : first + local_size] for name, value in arrays.items()}


def eval_batches(
    data_config: ml_collections.ConfigDict,
    split: str = "validation",
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Return a split as packed batches in a fixed order.

  Every token of the split occurs exactly once, unless `eval_max_batches` >= 0
  keeps only that many batches. The last batch is filled with padding rows,
  whose weights are 0. With several processes, each gets its own rows of every
  batch, as in `train_batches`.
  """
  local_size = _local_batch_size(
      data_config.batch_size, process_count, process_index
  )
  task = get_task(data_config)
  batch_size = int(data_config.batch_size)
  max_batches = int(data_config.eval_max_batches)
  max_rows = None if max_batches < 0 else max_batches * batch_size
  rows = _split_rows(task, split, int(data_config.seq_len), max_rows)

  num_batches = -(-len(rows["targets"]) // batch_size)
  padding = num_batches * batch_size - len(rows["targets"])
  first = process_index * local_size
  batches = []
  for index in range(num_batches):
    batch = {}
    for name, value in rows.items():
      value = value[index * batch_size : (index + 1) * batch_size]
      if index == num_batches - 1 and padding:
        value = np.pad(value, [(0, padding), (0, 0)])
      batch[name] = value[first : first + local_size]
    batches.append(batch)
  return batches


def unigram_perplexity(
    data_config: ml_collections.ConfigDict, split: str = "validation"
) -> float:
  """Return the perplexity of a unigram model of the training tokens on `split`.

  With c(t) the count of token t among the N training target tokens, EOS
  included, and V = vocab_size, the model is p(t) = (c(t) + 1) / (N + V), which
  is add-one smoothing over all V ids. The result is exp of the mean of
  -log p(t) over the target tokens of `eval_batches(data_config, split)` whose
  weight is positive, so `eval_max_batches` applies. Counting stops after
  UNIGRAM_MAX_TRAIN_TOKENS training tokens, in the split's fixed order.
  """
  task = get_task(data_config)
  vocab_size = task.output_features["targets"].vocabulary.vocab_size
  seq_len = int(data_config.seq_len)
  train = _split_rows(task, "train", seq_len, UNIGRAM_MAX_TRAIN_TOKENS // seq_len)
  train_tokens = train["targets"][train["weights"] > 0]
  counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
  log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)

  eval_counts = np.zeros(vocab_size, np.float64)
  for batch in eval_batches(data_config, split):
    tokens = batch["targets"][batch["weights"] > 0]
    eval_counts += np.bincount(tokens, minlength=vocab_size)
  if not eval_counts.sum():
    raise ValueError(f"Split '{split}' of task '{task.name}' contains no tokens.")
  return float(np.exp(-(eval_counts @ log_probs) / eval_counts.sum()))
