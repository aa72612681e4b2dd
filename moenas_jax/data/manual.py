"""Files that users bring in `manual_dir`: finding them and naming their prepared copies."""

from __future__ import annotations

import hashlib
import os


def locate(manual_dir: str, filename: str, contents: str) -> str:
  """Absolute path of `filename` in manual_dir, or an error saying what to put there."""
  path = os.path.abspath(os.path.join(manual_dir, filename))
  if not os.path.isfile(path):
    raise ValueError(f"no {filename} in manual_dir {manual_dir!r}: put the {contents} there, "
                     f"or set the file name in the data config")
  return path


def content_name(prefix: str, path: str, *settings: object) -> str:
  """A config name from the file's path, size and time and the settings: changed data or
  settings are prepared anew instead of reusing a stale copy."""
  stat = os.stat(path)
  key = "|".join(map(str, (path, stat.st_size, stat.st_mtime_ns, *settings)))
  return f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
