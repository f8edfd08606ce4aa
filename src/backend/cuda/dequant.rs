//! Dequantisation of the activation store's int8 / int4 sections on the device: the CUDA trainer's
//! batches staged as the store holds them (a quarter or an eighth of the f32 bytes across the bus) and
//! decoded where they are used.
//!
//! CPU reference: [`crate::store::codec`]'s `decode_rows` (the `Int8` and `Int4` arms): one f32 absmax
//! scale per row, all scales first, then the codes (int4: two per byte, low nibble first, offset by 8);
//! with a layer scale, then [`crate::clt::NormScales::apply`]'s multiplication. Both are exact: the device
//! rounds the same two products.

use super::context::{Gpu, Module, grid_1d};
use super::ffi::{CLT_CODEC_INT4, CLT_CODEC_INT8, CltDequantParams};
use super::memory::DBuf;
use crate::store::Codec;
use crate::{Error, Result};

/// The quantised codecs the device decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Int8,
    Int4,
}

impl Quant {
    /// The device codec of a store codec, if the device decodes it (int8 and int4: a scale per row and
    /// nothing else; the predictive and outlier codecs need more of their block).
    pub fn of(codec: Codec) -> Option<Quant> {
        match codec {
            Codec::Int8 => Some(Quant::Int8),
            Codec::Int4 => Some(Quant::Int4),
            _ => None,
        }
    }

    /// The store codec.
    pub fn codec(self) -> Codec {
        match self {
            Quant::Int8 => Codec::Int8,
            Quant::Int4 => Codec::Int4,
        }
    }

    /// Bytes of one encoded row of `d` values: its f32 scale and its codes.
    pub fn row_bytes(self, d: usize) -> usize {
        4 + self.codec().row_code_bytes(d)
    }
}

/// Where [`dequant_into`] writes and how it scales.
pub struct DequantOut<'a> {
    /// f32 `[n_rows][d]`.
    pub out: &'a DBuf<f32>,
    /// bf16 `[n_rows][d]`, the same values rounded to nearest even, or none.
    pub bf16: Option<&'a DBuf<u16>>,
    /// A factor per layer (rows are token-major, row `r` of layer `r % len`), applied after the row's
    /// scale, or none.
    pub layer_scale: Option<&'a DBuf<f32>>,
}

/// Decodes rows `r0 .. r0 + n_rows` of a section of `rows` rows of `d` values into f32 (and bf16 when
/// `bf16_out` is given), into a new buffer.
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
    let out = gpu.output::<f32>(n_rows * d)?;
    let dst = DequantOut {
        out: &out,
        bf16: bf16_out,
        layer_scale: None,
    };
    dequant_into(gpu, section, codec, rows, d, r0, &dst)?;
    Ok(out)
}

/// Decodes rows `r0 ..` of a section of `rows` rows of `d` values into `dst` (as many rows as `dst.out`
/// holds). Queued on the compute stream.
pub fn dequant_into(
    gpu: &Gpu,
    section: &DBuf<u8>,
    codec: Quant,
    rows: usize,
    d: usize,
    r0: usize,
    dst: &DequantOut,
) -> Result<()> {
    let n_rows = dst.out.len() / d.max(1);
    let layers = dst.layer_scale.map_or(1, DBuf::len);
    if section.len() != rows * codec.row_bytes(d)
        || r0 + n_rows > rows
        || dst.out.len() != n_rows * d
        || dst.bf16.is_some_and(|b| b.len() != n_rows * d)
        || layers == 0
        || rows > u32::MAX as usize
        || d > u32::MAX as usize
    {
        return Err(Error::Shape {
            what: "CUDA dequantisation (section bytes, rows, output values, bf16 values, layers)"
                .into(),
            expected: vec![rows * codec.row_bytes(d), rows, n_rows * d, n_rows * d],
            got: vec![
                section.len(),
                r0 + n_rows,
                dst.out.len(),
                dst.bf16.map_or(n_rows * d, DBuf::len),
                layers,
            ],
        });
    }
    if n_rows * d == 0 {
        return Ok(());
    }
    let p = CltDequantParams {
        section: section.ptr(gpu),
        out: dst.out.ptr(gpu),
        out_bf16: dst.bf16.map_or(0, |b| b.ptr(gpu)),
        rows: rows as u32,
        d: d as u32,
        r0: r0 as u32,
        n_rows: n_rows as u32,
        codec: match codec {
            Quant::Int8 => CLT_CODEC_INT8,
            Quant::Int4 => CLT_CODEC_INT4,
        },
        layers: layers as u32,
        layer_scale: dst.layer_scale.map_or(0, |b| b.ptr(gpu)),
    };
    gpu.launch(
        Module::Dequant,
        "dequant_rows",
        grid_1d(n_rows * d, 256),
        &p,
    )
}
