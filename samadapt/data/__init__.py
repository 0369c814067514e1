"""Data pipeline: readers -> cases -> intensity preprocessing -> 2D slices -> (embedding cache) -> batches.

A reader never knows about methods; a method never reads files. See ``docs/data.md`` for the formats.

Main entry points (each module documents its shapes):

- ``open_dataset(path, format="auto") -> DatasetSource`` and ``load_case(path)`` (``readers``)
- ``Case``, ``write_label_like(label, case, path)`` (``cases``)
- ``make_split(...) -> Split``, ``fewshot_slices(...)`` (``splits``)
- ``IntensityConfig``, ``normalize_intensity``, ``resize_pad``, ``resize_pad_label``, ``restore`` (``preprocessing``)
- ``SliceDataset``, ``collate``, ``volume_slices``, ``reassemble`` (``slices``)
- ``EmbeddingCache`` (``cache``), ``check_dataset`` (``check``), ``DEMO_DATASETS`` (``demo_data``)
"""

from .cases import Case, write_label_like
from .preprocessing import IntensityConfig, PadInfo, normalize_intensity, resize_pad, resize_pad_label, restore
from .readers import READERS, DatasetSource, load_case, open_dataset
from .slices import SliceDataset, collate, reassemble, volume_slices
from .splits import Split, fewshot_slices, make_split

__all__ = ["READERS", "Case", "DatasetSource", "IntensityConfig", "PadInfo", "SliceDataset", "Split", "collate",
           "fewshot_slices", "load_case", "make_split", "normalize_intensity", "open_dataset", "reassemble",
           "resize_pad", "resize_pad_label", "restore", "volume_slices", "write_label_like"]
