"""Random access to a TFDS split prepared as `tfrecord` shards (TFDS's default format).

TFDS reads such splits only sequentially (`as_data_source` needs `array_record`), but the epoch plan
reads any example by position. A TFRecord file is a sequence of
`[uint64 length][uint32 crc][length bytes][uint32 crc]` records, so one pass over the record
headers (seeking over the payloads) gives every record's offset; a record is then one seek and
one read, decoded by the dataset's own features exactly as TFDS's `ArrayRecordDataSource` decodes
(`features.deserialize_example_np`). Positions follow TFDS's order: shard after shard.
"""

import bisect
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the payload


def record_offsets(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(payload offsets [R] int64, payload lengths [R] int64) of one TFRecord file."""
    offsets, lengths = [], []
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        position = 0
        while position < size:
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise ValueError(f"{path}: truncated TFRecord header at byte {position}")
            (length,) = struct.unpack("<Q", header[:8])
            offsets.append(position + _HEADER)
            lengths.append(length)
            position += _HEADER + length + _FOOTER
            if position > size:
                raise ValueError(f"{path}: truncated TFRecord payload at byte {offsets[-1]}")
            f.seek(position)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class TfrecordRecords:
    """Serialized records of TFRecord files, by global position (file after file)."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(p) for p in paths]
        self._offsets, self._lengths = [], []
        for path in self.paths:
            offsets, lengths = record_offsets(path)
            self._offsets.append(offsets)
            self._lengths.append(lengths)
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()
        self._local = threading.local()

    def __len__(self) -> int:
        return self._starts[-1]

    def _file(self, k: int):
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if k not in handles:
            handles[k] = open(self.paths[k], "rb")  # noqa: SIM115 - kept open for reuse
        return handles[k]

    def __getitem__(self, position: int) -> bytes:
        if not 0 <= position < len(self):
            raise IndexError(f"record {position} outside 0..{len(self) - 1}")
        k = bisect.bisect_right(self._starts, position) - 1
        i = position - self._starts[k]
        f = self._file(k)
        f.seek(int(self._offsets[k][i]))
        return f.read(int(self._lengths[k][i]))

    def __getitems__(self, positions: Sequence[int]) -> list[bytes]:
        return [self[int(p)] for p in positions]


class TfrecordDataSource:
    """Decoded examples of one split of a prepared tfrecord TFDS dataset (module docstring)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, decoders: Any = None):
        info = builder.info
        if split not in info.splits:
            raise ValueError(f"{builder.data_dir}: no split {split!r} (have {list(info.splits)})")
        instructions = info.splits[split].file_instructions
        if any(fi.skip or (fi.take not in (-1, fi.examples_in_shard)) for fi in instructions):
            raise ValueError(f"split {split!r}: only whole splits are supported, not slices")
        self._records = TfrecordRecords([fi.filename for fi in instructions])
        self._features = info.features
        self._decoders = decoders
        expected = info.splits[split].num_examples
        if len(self._records) != expected:
            raise ValueError(
                f"{builder.data_dir}: found {len(self._records)} records in split {split!r}, "
                f"the dataset info says {expected}"
            )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, position: int) -> Any:
        return self._features.deserialize_example_np(
            self._records[position], decoders=self._decoders
        )

    def __getitems__(self, positions: Sequence[int]) -> list[Any]:
        return [self[int(p)] for p in positions]
