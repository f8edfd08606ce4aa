//! A minimal GGUF v3 writer for tests: metadata of the kinds model files use, and F32 tensors (or tensors of
//! any type, as bytes).

use std::path::Path;

/// A metadata value.
pub enum Meta {
    Str(String),
    U32(u32),
    F32(f32),
    Bool(bool),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// Writes a GGUF file with these metadata keys (in order) and F32 tensors `(name, ne, values)`, where `ne`
/// lists ggml's dimensions, fastest first (a PyTorch `(out, in)` matrix is `[in, out]`).
pub fn write_gguf<K: AsRef<str>>(
    path: &Path,
    meta: &[(K, Meta)],
    tensors: &[(String, Vec<u64>, Vec<f32>)],
) {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, ne, v)| {
            assert_eq!(ne.iter().product::<u64>() as usize, v.len(), "{name}");
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), ne.clone(), 0, bytes)
        })
        .collect();
    write_gguf_raw(path, meta, &raw);
}

/// A tensor as stored: name, ggml dimensions (fastest first), ggml type id, its bytes.
pub type RawTensor = (String, Vec<u64>, u32, Vec<u8>);

/// Writes a GGUF file with these metadata keys and tensors of any type, their bytes as given.
pub fn write_gguf_raw<K: AsRef<str>>(path: &Path, meta: &[(K, Meta)], tensors: &[RawTensor]) {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, v) in meta {
        string(&mut b, key.as_ref());
        match v {
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            Meta::U32(v) => {
                b.extend(4u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                b.extend(6u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                b.extend(7u32.to_le_bytes());
                b.push(u8::from(*v));
            }
            Meta::Strs(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|s| string(&mut b, s));
            }
            Meta::F32s(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(6u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|v| b.extend(v.to_le_bytes()));
            }
            Meta::I32s(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|v| b.extend(v.to_le_bytes()));
            }
        }
    }
    let mut off = 0u64;
    for (name, ne, ty, data) in tensors {
        string(&mut b, name);
        b.extend((ne.len() as u32).to_le_bytes());
        ne.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        off += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}
