"""The rows of the corpus fixtures in tests/fixtures/, shared by scripts/make-parquet-fixtures.py and
scripts/make-arrow-fixtures.py; src/corpus/mod.rs's tests recompute them (`fixture_text`, `fixture_ids`)."""


def text(i):
    return f"Document {i}: the café ☕ opens at {i % 12} o'clock.\nSecond line {i}."


def ids(i):
    # Row i: i % 7 + 1 ids below 512; row 0 is long enough to span several data pages.
    n = 3000 if i == 0 else i % 7 + 1
    return [(i * 31 + j * 17) % 512 for j in range(n)]
