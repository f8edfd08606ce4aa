#!/usr/bin/env python3
"""Writes the Parquet corpus fixtures in tests/fixtures/ the way Hugging Face datasets' files are written
(pyarrow; `pip install pyarrow`). The values follow formulas that src/corpus/mod.rs's tests recompute.

  python3 scripts/make-parquet-fixtures.py            # from the repository root
"""
import pyarrow as pa
import pyarrow.parquet as pq

from corpus_fixture_rows import ids, text

OUT = "tests/fixtures/"


# Text, snappy (pyarrow's default, as the Hub's files), row groups of 16 rows, an id column beside it;
# row 7 is null and row 9 empty (both skipped by the reader).
texts = [text(i) for i in range(50)]
texts[7] = None
texts[9] = ""
table = pa.table({"id": pa.array(range(50), pa.int64()), "text": pa.array(texts, pa.string())})
pq.write_table(table, OUT + "hf-text.parquet", row_group_size=16)

# Token ids as datasets' Sequence(Value("int32")): list<int32> with nullable elements, zstd, small pages so
# row 0 spans pages, and an attention mask beside it; row 3 is an empty list and row 5 null (skipped).
rows = [ids(i) for i in range(40)]
rows[3] = []
rows[5] = None
mask = [None if r is None else [1] * len(r) for r in rows]
table = pa.table({
    "input_ids": pa.array(rows, pa.list_(pa.int32())),
    "attention_mask": pa.array(mask, pa.list_(pa.int8())),
})
pq.write_table(table, OUT + "hf-input-ids.parquet", row_group_size=13, compression="zstd",
               data_page_size=1024, write_batch_size=64)

# int64 ids in a column named "tokens" (SAELens's name), the legacy list layout ("item", not "element").
table = pa.table({"tokens": pa.array([ids(i) for i in range(1, 9)], pa.list_(pa.int64()))})
pq.write_table(table, OUT + "legacy-tokens.parquet", use_compliant_nested_type=False)

# A null inside a list (an error), and ids in a string-list column (not usable).
table = pa.table({"input_ids": pa.array([[1, 2], [3, None, 5]], pa.list_(pa.int32()))})
pq.write_table(table, OUT + "null-token.parquet")
table = pa.table({"text": pa.array([["a", "b"]], pa.list_(pa.string()))})
pq.write_table(table, OUT + "nested-text.parquet")
