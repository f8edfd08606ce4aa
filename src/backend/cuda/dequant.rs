//! Dequantisation of the activation store's int8 / int4 sections on the device.
//!
//! CPU reference: [`crate::store::codec`]'s `decode_rows` (the `Int8` and `Int4` arms): one f32 absmax
//! scale per row, all scales first, then the codes (int4: two per byte, low nibble first, offset by 8).

use super::context::{Gpu, Module, grid_1d};
use super::ffi::{CLT_CODEC_INT4, CLT_CODEC_INT8, CltDequantParams};
use super::memory::DBuf;
use crate::{Error, Result};

/// The quantised codecs the device decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Int8,
    Int4,
}

/// Decodes rows `r0 .. r0 + n_rows` of a section of `rows` rows of `d` values into f32 (and bf16 when
/// `bf16_out` is given).
#[allow(clippy::too_many_arguments)]
pub fn dequant_rows(
    gpu: &Gpu,
    section: &DBuf<u8>,
    codec: Quant,
    rows: usize,
    d: usize,
    r0: usize,
    n_rows: usize,
    bf16_out: Option<&DBuf<u16>>,
) -> Result<DBuf<f32>> {
    let row_bytes = match codec {
        Quant::Int8 => d,
        Quant::Int4 => d.div_ceil(2),
    };
    if section.len() != rows * (4 + row_bytes) || r0 + n_rows > rows {
        return Err(Error::Shape {
            what: "CUDA dequantisation (section bytes, rows)".into(),
            expected: vec![rows * (4 + row_bytes), rows],
            got: vec![section.len(), r0 + n_rows],
        });
    }
    let out = gpu.output::<f32>(n_rows * d)?;
    let p = CltDequantParams {
        section: section.ptr(gpu),
        out: out.ptr(gpu),
        out_bf16: bf16_out.map_or(0, |b| b.ptr(gpu)),
        rows: rows as u32,
        d: d as u32,
        r0: r0 as u32,
        n_rows: n_rows as u32,
        codec: match codec {
            Quant::Int8 => CLT_CODEC_INT8,
            Quant::Int4 => CLT_CODEC_INT4,
        },
        pad0: 0,
    };
    gpu.launch(
        Module::Dequant,
        "dequant_rows",
        grid_1d(n_rows * d, 256),
        &p,
    )?;
    Ok(out)
}
