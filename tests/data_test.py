"""Tests of the vocabulary, the seqio Tasks and the packed batches."""

import collections
import hashlib
import os

import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from cyb_jax import data
from cyb_jax import shakespeare

BATCH_SIZE = 16
SEQ_LEN = 128
EOS = 1


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "task": "shakespeare_lm",
      "data_dir": str(data_dir),
      "vocab_size": 1024,
      "seq_len": SEQ_LEN,
      "batch_size": BATCH_SIZE,
      "seed": 0,
      "shuffle_buffer": 1000,
      "eval_max_batches": -1,
  })
  config.update(overrides)
  return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def config(data_dir):
  return make_config(data_dir)


@pytest.fixture(scope="session")
def vocab(config):
  return data.get_vocabulary(config)


@pytest.fixture(scope="session")
def scene_texts(config, vocab):
  """Map each split to its scene texts in the dataset's fixed order."""
  del vocab  # Requested so that the dataset is built.
  builder = shakespeare.ShakespearePlays(data_dir=config.data_dir)
  return {
      split: [
          example["text"].decode()
          for example in tfds.as_numpy(
              builder.as_dataset(split=split, shuffle_files=False)
          )
      ]
      for split in ("train", "validation")
  }


@pytest.fixture(scope="session")
def scene_tokens(vocab, scene_texts):
  """Tokenize each scene with the Python SentencePiece API and append EOS."""
  return {
      split: [np.array(vocab.tokenizer.encode(text) + [EOS]) for text in texts]
      for split, texts in scene_texts.items()
  }


@pytest.fixture(scope="session")
def train_rows(config):
  """Count each distinct packed row of the training split, by its hash."""
  rows = collections.Counter()
  for batch in data.eval_batches(config, split="train"):
    has_tokens = batch["weights"].any(axis=1)
    rows.update(np.array(row_hashes(batch))[has_tokens])
  return rows


@pytest.fixture(scope="session")
def num_train_rows(train_rows):
  return sum(train_rows.values())


def row_hashes(batch):
  rows = np.concatenate([batch["targets"], batch["segment_ids"]], axis=1)
  return [hashlib.sha1(row.tobytes()).hexdigest() for row in rows]


def assert_batches_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def check_packed_rows(batch, seq_len):
  """Assert the packing invariants of every row of a batch."""
  targets = batch["targets"]
  segment_ids = batch["segment_ids"]
  positions = batch["positions"]
  inputs = batch["inputs"]

  np.testing.assert_array_equal(batch["weights"], (targets != 0).astype(np.float32))
  np.testing.assert_array_equal(targets != 0, segment_ids != 0)
  for row in range(targets.shape[0]):
    segments = segment_ids[row]
    num_tokens = np.count_nonzero(segments)
    # Tokens come first and padding fills the rest of the row.
    assert not segments[num_tokens:].any()
    assert not inputs[row, num_tokens:].any()
    assert np.all(segments[:num_tokens] > 0)

    starts = np.flatnonzero(np.diff(segments[:num_tokens], prepend=0) != 0)
    ends = np.append(starts[1:], num_tokens)
    np.testing.assert_array_equal(segments[starts], np.arange(1, len(starts) + 1))
    for start, end in zip(starts, ends):
      np.testing.assert_array_equal(positions[row, start:end], np.arange(end - start))
      assert inputs[row, start] == 0
      np.testing.assert_array_equal(
          inputs[row, start + 1 : end], targets[row, start : end - 1]
      )
      # A chunk shorter than seq_len is the end of its example.
      if end - start < seq_len:
        assert targets[row, end - 1] == EOS


# ------------------------------------------------------------------ vocabulary


def test_vocabulary_size_and_special_ids(vocab):
  assert vocab.vocab_size == 1024
  assert vocab.pad_id == 0
  assert vocab.eos_id == 1
  assert vocab.unk_id == 2
  assert vocab.tokenizer.bos_id() == -1


def test_vocabulary_keeps_line_breaks(vocab, scene_texts):
  text = scene_texts["validation"][0]
  ids = vocab.tokenizer.encode(text)

  assert vocab.tokenizer.decode(ids) == text
  assert vocab.tokenizer.id_to_piece(ids).count("\n") == text.count("\n")
  assert 2 not in ids


def test_vocabulary_is_cached(config, vocab, monkeypatch):
  path = vocab.sentencepiece_model_file
  mtime = os.path.getmtime(path)

  def fail_training(*args, **kwargs):
    raise AssertionError("The cached vocabulary was trained again.")

  monkeypatch.setattr(data, "train_sentencepiece", fail_training)
  again = data.get_vocabulary(config)

  assert again.sentencepiece_model_file == path
  assert path == data.vocabulary_path(config.data_dir, 1024)
  assert os.path.getmtime(path) == mtime
  assert not [name for name in os.listdir(os.path.dirname(path)) if ".tmp-" in name]


def test_vocabulary_training_is_deterministic(vocab, scene_texts):
  first = data.train_sentencepiece(scene_texts["train"], 1024)
  second = data.train_sentencepiece(scene_texts["train"], 1024)

  assert first == second
  with open(vocab.sentencepiece_model_file, "rb") as file:
    assert file.read() == first


def test_failed_vocabulary_write_leaves_no_file(tmp_path, monkeypatch):
  path = str(tmp_path / "vocab" / "model")

  def fail_rename(*args, **kwargs):
    raise tf.errors.UnavailableError(None, None, "rename failed")

  monkeypatch.setattr(tf.io.gfile, "rename", fail_rename)
  with pytest.raises(tf.errors.UnavailableError):
    data._write_atomically(path, b"model")

  assert os.listdir(tmp_path / "vocab") == []


def test_other_vocab_size_gets_own_task(data_dir, config, vocab):
  small = data.get_task(make_config(data_dir, vocab_size=512))
  default = data.get_task(config)

  assert small.output_features["targets"].vocabulary.vocab_size == 512
  assert default.output_features["targets"].vocabulary.vocab_size == 1024
  assert seqio.TaskRegistry.get("shakespeare_lm") is default
  assert data.get_task(config) is default


def test_unwritable_data_dir_error_names_path(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  data_dir = str(blocker / "tfds")

  with pytest.raises(OSError, match=data_dir):
    data.get_vocabulary(make_config(data_dir))


def test_unknown_task_error_lists_tasks(config, vocab):
  with pytest.raises(ValueError, match="not registered") as error:
    data.get_task(make_config(config.data_dir, task="no_such_task"))

  assert "shakespeare_lm" in str(error.value)
  assert "text_files_task" in str(error.value)


# --------------------------------------------------------------------- batches


def test_train_batch_shapes_and_dtypes(config):
  batch = next(data.train_batches(config))

  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  for key, value in batch.items():
    assert value.shape == (BATCH_SIZE, SEQ_LEN), key
    expected = np.float32 if key == "weights" else np.int32
    assert value.dtype == expected, key


def test_packed_rows_are_consistent(config):
  batches = data.train_batches(config)
  for _ in range(3):
    check_packed_rows(next(batches), SEQ_LEN)
  for batch in data.eval_batches(config):
    check_packed_rows(batch, SEQ_LEN)


def test_eval_batches_cover_validation_once(config, scene_tokens):
  batches = data.eval_batches(config)
  expected = np.concatenate(scene_tokens["validation"])
  tokens = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])

  assert sum(b["weights"].sum() for b in batches) == len(expected)
  np.testing.assert_array_equal(tokens, expected)
  assert np.count_nonzero(tokens == EOS) == len(scene_tokens["validation"])
  assert all(b["targets"].shape == (BATCH_SIZE, SEQ_LEN) for b in batches)
  # Only the last batch may have padding rows, which carry no weight.
  row_has_tokens = np.concatenate([b["weights"].any(axis=1) for b in batches])
  assert row_has_tokens[: np.count_nonzero(row_has_tokens)].all()
  assert len(row_has_tokens) - np.count_nonzero(row_has_tokens) < BATCH_SIZE


def test_eval_max_batches_limits_batches(config):
  capped = data.eval_batches(make_config(config.data_dir, eval_max_batches=2))
  full = data.eval_batches(config)

  assert len(capped) == 2
  assert_batches_equal(capped[1], full[1])


def test_train_batches_depend_only_on_seed(config):
  first = data.train_batches(config)
  second = data.train_batches(config)
  other_seed = data.train_batches(make_config(config.data_dir, seed=1))

  for _ in range(3):
    assert_batches_equal(next(first), next(second))
  assert not np.array_equal(next(first)["targets"], next(other_seed)["targets"])


def test_epoch_visits_every_row_once(config, train_rows, num_train_rows):
  batches = data.train_batches(config)
  hashes = []
  while len(hashes) < 2 * num_train_rows:
    hashes.extend(row_hashes(next(batches)))
  first_epoch = hashes[:num_train_rows]
  second_epoch = hashes[num_train_rows : 2 * num_train_rows]

  # Identical rows occur, such as the last chunk "\\nExeunt" + EOS of several
  # scenes, so rows are compared as multisets.
  assert collections.Counter(first_epoch) == train_rows
  assert collections.Counter(second_epoch) == train_rows
  assert second_epoch != first_epoch


def test_resume_matches_advanced_stream(config, num_train_rows):
  # Batch `boundary` contains the last row of epoch 0, and the next batches
  # contain rows of epochs 1 and 2.
  boundary = (num_train_rows - 1) // BATCH_SIZE
  resume_points = [1, 7, boundary, boundary + 1, 2 * boundary + 3]
  batches = data.train_batches(config)
  for index in range(max(resume_points) + 1):
    batch = next(batches)
    if index in resume_points:
      resumed = next(data.train_batches(config, start_index=index))
      assert_batches_equal(resumed, batch)


def budget_row_hashes(config, num_rows):
  """Return the row hashes of the first `num_rows` rows the training stream yields."""
  batches = data.train_batches(config)
  hashes = []
  while len(hashes) < num_rows:
    hashes.extend(row_hashes(next(batches)))
  return hashes[:num_rows]


def test_row_budgets_nest_and_offsets_are_disjoint(config, train_rows):
  small = make_config(config.data_dir, train_rows=40)
  large = make_config(config.data_dir, train_rows=120)
  beside = make_config(config.data_dir, train_rows=40, train_rows_offset=120)

  small_epochs = budget_row_hashes(small, 80)
  large_epoch = budget_row_hashes(large, 120)
  beside_epoch = budget_row_hashes(beside, 40)

  # Each epoch visits exactly the budget, and the second epoch the same rows again.
  assert collections.Counter(small_epochs[:40]) == collections.Counter(small_epochs[40:])
  assert small_epochs[:40] != small_epochs[40:]
  assert not collections.Counter(small_epochs[:40]) - collections.Counter(large_epoch)
  assert not set(large_epoch) & set(beside_epoch)
  assert not collections.Counter(large_epoch + beside_epoch) - train_rows


def test_row_budget_ignores_data_seed(config):
  budget = dict(train_rows=40, train_rows_offset=7)
  seed_0 = budget_row_hashes(make_config(config.data_dir, **budget), 40)
  seed_1 = budget_row_hashes(make_config(config.data_dir, seed=1, **budget), 40)

  assert seed_0 != seed_1
  assert collections.Counter(seed_0) == collections.Counter(seed_1)


def test_streamed_row_budget_cycles_over_the_first_rows(config, monkeypatch):
  monkeypatch.setattr(data, "MAX_IN_MEMORY_EXAMPLES", 0)
  streamed = make_config(config.data_dir, train_rows=24, train_rows_offset=8)
  in_order = data.eval_batches(make_config(config.data_dir, batch_size=32), split="train")[0]

  hashes = budget_row_hashes(streamed, 48)

  expected = collections.Counter(row_hashes(in_order)[8:32])
  assert collections.Counter(hashes[:24]) == expected
  assert collections.Counter(hashes[24:]) == expected


@pytest.mark.parametrize(
    "budget, message",
    [
        (dict(train_rows=-1), r"data.train_rows=-1 .* must be 0 or more"),
        (dict(train_rows_offset=5), r"train_rows_offset=5 has no effect without a budget"),
        (dict(train_rows=10**7), r"exceeds the \d+ packed rows of the training split"),
    ],
)
def test_bad_row_budget_raises(config, budget, message):
  with pytest.raises(ValueError, match=message):
    next(data.train_batches(make_config(config.data_dir, **budget)))


def test_process_rows_concatenate_to_global_batch(config, num_train_rows):
  for index in [0, 5, num_train_rows // BATCH_SIZE]:
    whole = next(data.train_batches(config, start_index=index))
    parts = [
        next(data.train_batches(
            config, start_index=index, process_index=process, process_count=2
        ))
        for process in range(2)
    ]
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), whole[key]
      )
    assert parts[0]["targets"].shape == (BATCH_SIZE // 2, SEQ_LEN)
    assert not set(row_hashes(parts[0])) & set(row_hashes(parts[1]))


def test_indivisible_batch_size_raises(config):
  odd = make_config(config.data_dir, batch_size=15)

  with pytest.raises(ValueError, match=r"batch_size 15 .* process_count 2"):
    next(data.train_batches(odd, process_index=0, process_count=2))


def test_unigram_perplexity_matches_numpy(config, vocab, scene_tokens):
  train = np.concatenate(scene_tokens["train"])
  validation = np.concatenate(scene_tokens["validation"])
  counts = np.bincount(train, minlength=vocab.vocab_size)
  probs = (counts + 1) / (len(train) + vocab.vocab_size)
  expected = np.exp(-np.mean(np.log(probs[validation])))

  assert data.unigram_perplexity(config) == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------ text-file tasks


@pytest.fixture(scope="session")
def text_config(tmp_path_factory, config, vocab):
  """Register a small task over text files, which takes the streamed path."""
  directory = tmp_path_factory.mktemp("text")
  lines = {
      "train": [f"Line {i} of the training text, {'word ' * (i % 7)}end."
                for i in range(60)],
      "validation": ["", "First held-out line.", "  ", "Second held-out line."],
  }
  paths = {}
  for split, split_lines in lines.items():
    paths[split] = str(directory / f"{split}.txt")
    with open(paths[split], "w", encoding="utf-8") as file:
      file.write("\n".join(split_lines) + "\n")
  data.text_files_task("tiny_text_lm", paths, vocab)
  text_config = make_config(
      config.data_dir, task="tiny_text_lm", seq_len=16, batch_size=4,
      shuffle_buffer=8,
  )
  text_config.lines = lines
  return text_config


def test_text_files_task_registers_twice(text_config, vocab):
  paths = {"train": os.devnull}
  first = data.text_files_task("twice_registered_lm", paths, vocab)
  second = data.text_files_task("twice_registered_lm", paths, vocab)

  assert first is not second
  assert seqio.TaskRegistry.get("twice_registered_lm") is second
  assert data.get_vocabulary(text_config) is vocab


def test_text_files_eval_covers_lines_once(text_config, vocab):
  lines = [line for line in text_config.lines["validation"] if line.strip()]
  expected = sum(len(vocab.tokenizer.encode(line)) + 1 for line in lines)
  batches = data.eval_batches(text_config)

  assert sum(b["weights"].sum() for b in batches) == expected
  for batch in batches:
    check_packed_rows(batch, 16)


def test_streamed_batches_resume_and_shard(text_config):
  # 60 short lines fill only a few rows, so 25 batches span several epochs.
  batches = data.train_batches(text_config)
  for index in range(25):
    batch = next(batches)
    check_packed_rows(batch, 16)
    if index in (0, 3, 24):
      assert_batches_equal(
          next(data.train_batches(text_config, start_index=index)), batch
      )
      parts = [
          next(data.train_batches(
              text_config, start_index=index, process_index=process,
              process_count=2,
          ))
          for process in range(2)
      ]
      np.testing.assert_array_equal(
          np.concatenate([part["targets"] for part in parts]), batch["targets"]
      )
