//! Element types of the graph IR.

use std::fmt;

/// Element type of a tensor. Floats narrower than f32 are *storage* types: the interpreter
/// computes in f32 and rounds every result to the node's dtype (design.md, "Precision").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    F8E5M2,
    I32,
    I64,
    Bool,
}

impl DType {
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I32,
        DType::I64,
        DType::Bool,
    ];

    /// Short name as written in the DSL and printed in the IR.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The dtype named by an HF `torch_dtype` value ("bfloat16", "float32", ...).
    pub fn from_torch(s: &str) -> Option<DType> {
        Some(match s {
            "float32" | "fp32" | "float" => DType::F32,
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "fp16" | "half" => DType::F16,
            _ => return None,
        })
    }

    /// safetensors dtype tag.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::Bool => "BOOL",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// Rank used for type promotion of mixed float operands: the wider type wins.
    fn float_rank(self) -> u8 {
        match self {
            DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 3,
            _ => 0,
        }
    }

    /// Result type of a binary arithmetic op on `a` and `b`; None when they don't mix
    /// (bool with numbers, ints with floats must be cast explicitly).
    pub fn promote(a: DType, b: DType) -> Option<DType> {
        if a == b {
            return Some(a);
        }
        if a.is_float() && b.is_float() {
            // bf16 with f16 (same rank): widen to f32 rather than pick one silently.
            return Some(match a.float_rank().cmp(&b.float_rank()) {
                std::cmp::Ordering::Greater => a,
                std::cmp::Ordering::Less => b,
                std::cmp::Ordering::Equal => DType::F32,
            });
        }
        if a.is_int() && b.is_int() {
            return Some(DType::I64);
        }
        None
    }

    /// Round an f32 value to this storage type (identity for f32; ints and bools unaffected).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            DType::F16 => half::f16::from_f32(x).to_f32(),
            // OCP FP8: E4M3 ("fn": no infinities) has exponent bias 7, E5M2 bias 15
            DType::F8E4M3 => round_f8(x, 3, 7, 448.0),
            DType::F8E5M2 => round_f8(x, 2, 15, 57344.0),
            _ => x,
        }
    }
}

impl DType {
    /// The storage bits (little-endian, `size_bytes()` of them) of `x`, which is first rounded
    /// to this dtype: the layout every runtime uses (docs/kernel-abi.md). Floats only.
    pub fn encode_float(self, x: f32) -> u32 {
        match self {
            DType::F32 => x.to_bits(),
            DType::BF16 => u32::from(half::bf16::from_f32(x).to_bits()),
            DType::F16 => u32::from(half::f16::from_f32(x).to_bits()),
            DType::F8E4M3 => u32::from(encode_f8(self.round(x), 3, 7)),
            DType::F8E5M2 => u32::from(encode_f8(self.round(x), 2, 15)),
            _ => panic!("encode_float({self})"),
        }
    }

    /// The value of storage bits `bits` of this float dtype.
    pub fn decode_float(self, bits: u32) -> f32 {
        match self {
            DType::F32 => f32::from_bits(bits),
            DType::BF16 => f32::from_bits(bits << 16),
            DType::F16 => half::f16::from_bits(bits as u16).to_f32(),
            DType::F8E4M3 => decode_f8(bits as u8, 3, 7),
            DType::F8E5M2 => decode_f8(bits as u8, 2, 15),
            _ => panic!("decode_float({self})"),
        }
    }
}

/// Bits of an already-rounded 8-bit float (`mbits` mantissa bits, exponent bias `bias`).
/// E4M3 has no infinities: NaN is 0x7f; E5M2 NaN is 0x7e.
fn encode_f8(x: f32, mbits: u32, bias: i32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return if mbits == 3 { 0x7f } else { 0x7e };
    }
    let a = x.abs();
    if a == 0.0 {
        return sign;
    }
    let e = a.log2().floor() as i32;
    if e < 1 - bias {
        // subnormal: a = m · 2^(1 - bias - mbits)
        let m = (a / 2f32.powi(1 - bias - mbits as i32)).round() as u8;
        return sign | m;
    }
    let m = ((a / 2f32.powi(e) - 1.0) * (1u32 << mbits) as f32).round() as u32;
    sign | (((e + bias) as u32) << mbits | m) as u8
}

fn decode_f8(b: u8, mbits: u32, bias: i32) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((b & 0x7f) >> mbits);
    let m = f32::from(b & ((1u8 << mbits) - 1));
    let scale = (1u32 << mbits) as f32;
    let special = if mbits == 3 { b & 0x7f == 0x7f } else { e == 31 };
    if special {
        return if mbits == 2 && m == 0.0 {
            sign * f32::INFINITY
        } else {
            f32::NAN
        };
    }
    if e == 0 {
        return sign * m / scale * 2f32.powi(1 - bias);
    }
    sign * (1.0 + m / scale) * 2f32.powi(e - bias)
}

/// Round to nearest-even of an 8-bit float with `mbits` mantissa bits, exponent bias `bias`,
/// saturating at `max` (the `satfinite` conversion used on the GPU). NaN stays NaN.
fn round_f8(x: f32, mbits: i32, bias: i32, max: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a == 0.0 {
        return x;
    }
    let min_normal_exp = 1 - bias;
    let e = (a.log2().floor() as i32).max(min_normal_exp);
    let quantum = (2.0f32).powi(e - mbits);
    let q = (a / quantum).round_ties_even() * quantum;
    q.min(max).copysign(x)
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_rounding_known_values() {
        // E4M3: 1.0625 lies between 1.0 and 1.125 (3 mantissa bits): ties to even -> 1.0
        assert_eq!(DType::F8E4M3.round(1.0625), 1.0);
        assert_eq!(DType::F8E4M3.round(1.07), 1.125);
        assert_eq!(DType::F8E4M3.round(1000.0), 448.0);
        assert_eq!(DType::F8E4M3.round(-3.3), -3.25);
        // smallest E4M3 subnormal is 2^-9
        assert_eq!(DType::F8E4M3.round(2f32.powi(-9)), 2f32.powi(-9));
        // E4M3's smallest normal is 2^-6: below it the spacing is 2^-9 (3 bits below 2^-6)
        assert_eq!(DType::F8E4M3.round(2f32.powi(-6)), 2f32.powi(-6));
        assert_eq!(DType::F8E4M3.round(2f32.powi(-7) + 2f32.powi(-10)), 2f32.powi(-7));
        assert_eq!(DType::F8E4M3.round(3.0 * 2f32.powi(-10)), 2f32.powi(-8));
        assert_eq!(DType::F8E4M3.round(2f32.powi(-10)), 0.0);
        assert_eq!(DType::F8E4M3.round(1.1 * 2f32.powi(-10)), 2f32.powi(-9));
        assert_eq!(DType::F8E4M3.round(448.0 + 16.0), 448.0);
        // E5M2: smallest normal 2^-14, smallest subnormal 2^-16, largest 57344
        assert_eq!(DType::F8E5M2.round(2f32.powi(-16)), 2f32.powi(-16));
        assert_eq!(DType::F8E5M2.round(2f32.powi(-17)), 0.0);
        assert_eq!(DType::F8E5M2.round(2f32.powi(-14) + 2f32.powi(-17)), 2f32.powi(-14));
        assert_eq!(DType::F8E5M2.round(1e6), 57344.0);
        assert_eq!(DType::F8E5M2.round(1.2), 1.25);
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 512.0), 1.0);
    }

    #[test]
    fn fp8_bits_round_trip_every_code() {
        for dt in [DType::F8E4M3, DType::F8E5M2] {
            for b in 0u32..256 {
                let x = dt.decode_float(b);
                if x.is_finite() {
                    // -0 and +0 are distinct codes; every finite code decodes to a value of the
                    // format (a fixed point of `round`) that encodes back to itself
                    assert_eq!(dt.round(x), x, "{dt} code {b:#x} decodes to a non-value {x}");
                    assert_eq!(dt.encode_float(x), b, "{dt} code {b:#x} = {x}");
                }
            }
        }
        assert_eq!(DType::F8E4M3.decode_float(0x7e), 448.0);
        assert_eq!(DType::F8E4M3.decode_float(0x38), 1.0);
        assert_eq!(DType::F8E4M3.decode_float(0x01), 2f32.powi(-9));
        assert_eq!(DType::F8E5M2.decode_float(0x3c), 1.0);
        assert_eq!(DType::BF16.decode_float(DType::BF16.encode_float(1.5)), 1.5);
    }

    #[test]
    fn promotion() {
        assert_eq!(DType::promote(DType::BF16, DType::F32), Some(DType::F32));
        assert_eq!(DType::promote(DType::BF16, DType::F16), Some(DType::F32));
        assert_eq!(DType::promote(DType::I32, DType::I64), Some(DType::I64));
        assert_eq!(DType::promote(DType::I64, DType::F32), None);
    }
}
