"""Weighted mixtures of token sources: data.mixture = 'web:0.7,code:0.2,books:0.1'.

Each `path:weight` item is opened exactly as data.path would be (same
data.source, tokenizer, specials and data.max_docs, per source; a prepared store
is read window by window) and split into train/validation by data.val_tokens
(capped by data.val_fraction), per source. Weights are relative (normalized by
their sum).

Training draws windows with Grain's `MapDataset.mix`: every source's train
windows are shuffled (a seed per source, reshuffled each of its epochs) and
repeated forever, then interleaved deterministically in the weight ratio. So a
step's batch is a fixed function of (config, step), a small source is simply
revisited more often, and the iterator state is still Grain's single index.

Evaluation mixes every source's validation windows in the same ratio, so the
validation loss measures the distribution being trained on.
"""

import dataclasses
import logging
from typing import List, Sequence, Tuple

import grain
import numpy as np

from jaxlm.core.errors import ConfigError
from jaxlm.data import packing, sources


@dataclasses.dataclass
class Source:
  """One mixture component: where it came from, its weight, its token stream and windows."""
  name: str
  weight: float
  store: object  # sources.TokenStore or store.MappedStore
  train: packing.Windows
  val: packing.Windows


def parse(spec: str) -> List[Tuple[str, float]]:
  """'path1:0.7,path2:0.3' -> [('path1', 0.7), ('path2', 0.3)]; the last ':' splits."""
  items = []
  for item in [s.strip() for s in spec.split(',') if s.strip()]:
    path, _, weight = item.rpartition(':')
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not path or not w > 0 or not np.isfinite(w):
      raise ConfigError(f"data.mixture item '{item}' is not 'path:weight' with a weight > 0")
    items.append((path, w))
  if not items:
    raise ConfigError(f"data.mixture '{spec}' names no sources")
  return items


def make_source(name: str, weight: float, store, data_cfg) -> Source:
  """`store`'s windows, split per data.val_tokens / data.val_fraction (`packing.train_tokens`)."""
  seq_len = int(data_cfg.seq_len)
  cut = packing.train_tokens(len(store), int(data_cfg.val_tokens), float(data_cfg.val_fraction))
  return Source(name, weight, store, packing.Windows(store, seq_len, 0, cut),
                packing.Windows(store, seq_len, cut, len(store)))


def load_sources(cfg, tokenizer) -> List[Source]:
  """Reads every source of `cfg.data.mixture` and logs its size and share of training."""
  out = []
  for path, weight in parse(cfg.data.mixture):
    data = cfg.data.copy_and_resolve_references()
    data.path = path
    out.append(make_source(path, weight, sources.open_tokens(data, tokenizer), cfg.data))
  total = sum(s.weight for s in out)
  for s in out:
    share = s.weight / total
    # How often training will revisit this source: > 1 epoch means it is upsampled.
    epochs = cfg.train.steps * cfg.train.batch_size * share / max(len(s.train), 1)
    logging.info("data: mixture source '%s': weight %.3f (%.1f%% of windows), %d docs, "
                 '%d tokens, %d train / %d val windows, %.2f epochs in %d steps', s.name,
                 s.weight, 100 * share, s.store.num_docs, len(s.store), len(s.train), len(s.val),
                 epochs, cfg.train.steps)
  return out


def _seed(seed: int, index: int) -> int:
  # Independent streams per source; Grain adds the epoch number to each.
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def train_dataset(parts: Sequence[Source], seed: int, shuffle: bool) -> grain.MapDataset:
  """The infinite mixed stream of train windows (a `packing.pack_window` dict each)."""
  streams = []
  for i, s in enumerate(parts):
    ds = grain.MapDataset.source(s.train)
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, i))
    streams.append(ds.repeat())
  return grain.MapDataset.mix(streams, [s.weight for s in parts])


def val_dataset(parts: Sequence[Source]) -> grain.MapDataset:
  """The infinite mixed stream of validation windows, in order within each source."""
  streams = [grain.MapDataset.source(s.val).repeat() for s in parts]
  return grain.MapDataset.mix(streams, [s.weight for s in parts])


def epoch_windows(parts: Sequence[Source]) -> int:
  """Mixed windows drawn before the first source runs out (one 'epoch' of the mixture)."""
  ds = grain.MapDataset.mix([grain.MapDataset.source(s.train) for s in parts],
                            [s.weight for s in parts])
  return len(ds)
