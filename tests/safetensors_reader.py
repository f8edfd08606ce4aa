"""Reading Hugging Face `*.safetensors` files in pure Python (standard library only), for the reference
forwards `gpt2_reference.py` and `gemma2_reference.py`: headers parsed with json + struct; F32, F16, BF16 and
F64 tensors as flat lists of floats."""

import glob
import json
import math
import os
import struct


def read_dir(model_dir):
    """Every tensor of every *.safetensors file in model_dir: {name: (shape, values)}."""
    tensors = {}
    for p in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update(read_safetensors(p))
    return tensors


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[base + a : base + b]
        dtype = info["dtype"]
        if dtype == "F32":
            vals = list(struct.unpack("<%df" % (len(raw) // 4), raw))
        elif dtype == "F16":
            vals = list(struct.unpack("<%de" % (len(raw) // 2), raw))
        elif dtype == "BF16":
            halves = struct.unpack("<%dH" % (len(raw) // 2), raw)
            vals = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        elif dtype == "F64":
            vals = list(struct.unpack("<%dd" % (len(raw) // 8), raw))
        else:
            raise SystemExit("%s: %s has unsupported dtype %s" % (path, name, dtype))
        if len(vals) != math.prod(info["shape"]):
            raise SystemExit("%s: %s has %d values for shape %s" % (path, name, len(vals), info["shape"]))
        out[name] = (info["shape"], vals)
    return out


def matrix(shape_vals):
    """A 2-D tensor as a list of rows."""
    (rows, cols), vals = shape_vals
    return [vals[r * cols : (r + 1) * cols] for r in range(rows)]


def vector(shape_vals):
    return list(shape_vals[1])
