#!/usr/bin/env python3
"""Writes the Arrow IPC corpus fixtures in tests/fixtures/ the way Hugging Face datasets writes its
`save_to_disk` and cache files (pyarrow's IPC stream writer; `pip install pyarrow`), plus one in the IPC file
format. The rows are those of scripts/make-parquet-fixtures.py (scripts/corpus_fixture_rows.py), so src/corpus/mod.rs's
tests check that each .arrow file gives the documents of its .parquet twin.

  python3 scripts/make-arrow-fixtures.py            # from the repository root
"""
import json

import pyarrow as pa

from corpus_fixture_rows import ids, text

OUT = "tests/fixtures/"


def stream(path, table, batch_rows, compression=None):
    """An IPC stream of `batch_rows`-row record batches, as datasets' ArrowWriter writes (with its schema
    metadata)."""
    meta = {"huggingface": json.dumps({"info": {"features": {}}})}
    table = table.replace_schema_metadata(meta)
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema, options=options) as w:
        for batch in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(batch)


# Text beside an id column, batches of 16 rows; row 7 null and row 9 empty (both skipped).
texts = [text(i) for i in range(50)]
texts[7] = None
texts[9] = ""
stream(OUT + "hf-text.arrow",
       pa.table({"id": pa.array(range(50), pa.int64()), "text": pa.array(texts, pa.string())}), 16)

# datasets' Sequence(Value("int32")) with an attention mask, batches of 13 rows, zstd-compressed buffers;
# row 3 an empty list and row 5 null (skipped).
rows = [ids(i) for i in range(40)]
rows[3] = []
rows[5] = None
mask = [None if r is None else [1] * len(r) for r in rows]
stream(OUT + "hf-input-ids.arrow",
       pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())),
                 "attention_mask": pa.array(mask, pa.list_(pa.int8()))}), 13, compression="zstd")

# The IPC file format (Feather v2): large_list<uint32> "tokens" (rows 1..8) beside large_string "text",
# lz4-compressed, batches of 3 rows.
table = pa.table({"text": pa.array([text(i) for i in range(1, 9)], pa.large_string()),
                  "tokens": pa.array([ids(i) for i in range(1, 9)], pa.large_list(pa.uint32()))})
with pa.OSFile(OUT + "tokens-file.arrow", "wb") as sink, \
        pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
    for batch in table.to_batches(max_chunksize=3):
        w.write_batch(batch)

# A null inside a list (an error), and strings in a list column (not usable).
stream(OUT + "null-token.arrow",
       pa.table({"input_ids": pa.array([[1, 2], [3, None, 5]], pa.list_(pa.int32()))}), 1)
stream(OUT + "nested-text.arrow", pa.table({"text": pa.array([["a", "b"]], pa.list_(pa.string()))}), 1)
